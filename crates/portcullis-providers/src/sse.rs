//! One spec-compliant Server-Sent Events decoder, shared by both providers.
//!
//! [`SseDecoder`] follows the WHATWG "event stream interpretation" rules: `data:` lines are
//! joined with `\n`, `:` comments are skipped, `event:` names the event, `id:` and `retry:` are
//! ignored, and lines may end in CRLF, LF or CR. Bytes may arrive split anywhere, down to single
//! bytes and between the `\r` and `\n` of a CRLF. At the end of the body, a complete last event
//! that lacks its trailing blank line is still dispatched (the spec would drop it; some servers
//! and recordings end that way).
//!
//! Lines and events are capped in size; going over is a [`Protocol`](ErrorKind::Protocol)
//! error, never unbounded memory.
//!
//! [`SseStream`] adapts any [`http_body::Body`] into a [`Stream`] of events.
//!
//! ```
//! use portcullis_providers::sse::SseDecoder;
//!
//! let mut dec = SseDecoder::new();
//! dec.push(b"event: greeting\r\ndata: hel");
//! assert!(dec.next_event().unwrap().is_none()); // not complete yet
//! dec.push(b"lo\r\ndata: world\r\n\r\n: a comment\n");
//! let ev = dec.next_event().unwrap().unwrap();
//! assert_eq!(ev.event, "greeting");
//! assert_eq!(ev.data, "hello\nworld");
//! dec.push(b"data: last, no blank line");
//! assert!(dec.next_event().unwrap().is_none());
//! assert_eq!(dec.finish().unwrap().unwrap().data, "last, no blank line");
//! ```

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Buf;
use futures_core::Stream;
use http_body::Body;
use pin_project_lite::pin_project;
use portcullis_core::{BoxError, ErrorKind, LlmError};

/// The default cap on one line and on one event's data: 4 MiB.
pub const DEFAULT_MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    /// The event name (`event:`), or `message` when none was given (then borrowed: an
    /// unnamed event, every OpenAI one, allocates no name).
    pub event: std::borrow::Cow<'static, str>,
    /// The data lines, joined with `\n`.
    pub data: String,
}

/// An incremental SSE decoder: [`push`](SseDecoder::push) bytes as they arrive, take events
/// with [`next_event`](SseDecoder::next_event), and call [`finish`](SseDecoder::finish) once the
/// body has ended.
#[derive(Debug, Clone)]
pub struct SseDecoder {
    buf: Vec<u8>,
    /// Start of the unread part of `buf`.
    pos: usize,
    /// The previous line ended in `\r`: a `\n` right after it belongs to that line ending.
    after_cr: bool,
    /// Still at the very start of the stream (a UTF-8 BOM is skipped there).
    at_start: bool,
    event: String,
    data: String,
    has_data: bool,
    max_line: usize,
    max_event: usize,
    failed: bool,
}

impl Default for SseDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl SseDecoder {
    /// A decoder with the default caps ([`DEFAULT_MAX_EVENT_BYTES`] per line and per event).
    pub fn new() -> Self {
        Self::with_limits(DEFAULT_MAX_EVENT_BYTES, DEFAULT_MAX_EVENT_BYTES)
    }

    /// A decoder with the given caps on one line and on one event's data (in bytes).
    pub fn with_limits(max_line: usize, max_event: usize) -> Self {
        SseDecoder {
            buf: Vec::new(),
            pos: 0,
            after_cr: false,
            at_start: true,
            event: String::new(),
            data: String::new(),
            has_data: false,
            max_line,
            max_event,
            failed: false,
        }
    }

    /// Appends bytes as they arrived from the wire.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.pos > 0 && self.pos >= self.buf.len() / 2 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete event, if one is buffered.
    ///
    /// Returns a [`Protocol`](ErrorKind::Protocol) error when a line or an event exceeds its
    /// cap; the decoder then stays failed.
    pub fn next_event(&mut self) -> Result<Option<SseEvent>, LlmError> {
        self.check_failed()?;
        loop {
            if self.after_cr && self.pos < self.buf.len() {
                if self.buf[self.pos] == b'\n' {
                    self.pos += 1;
                }
                self.after_cr = false;
            }
            if self.at_start {
                let rest = &self.buf[self.pos..];
                if rest.len() < 3 && b"\xEF\xBB\xBF".starts_with(rest) {
                    return Ok(None); // maybe a BOM, wait for more
                }
                if rest.starts_with(b"\xEF\xBB\xBF") {
                    self.pos += 3;
                }
                self.at_start = false;
            }
            let rest = &self.buf[self.pos..];
            let Some(end) = memchr::memchr2(b'\n', b'\r', rest) else {
                if rest.len() > self.max_line {
                    return Err(self.fail("SSE line exceeds the size cap"));
                }
                return Ok(None);
            };
            if end > self.max_line {
                return Err(self.fail("SSE line exceeds the size cap"));
            }
            self.after_cr = rest[end] == b'\r';
            let (start, stop) = (self.pos, self.pos + end);
            self.pos = stop + 1;
            if let Some(ev) = self.line(start, stop)? {
                return Ok(Some(ev));
            }
        }
    }

    /// Call once the body has ended, until it returns `Ok(None)`: yields what is still
    /// buffered. An unterminated last line counts as a line, and a pending event is dispatched
    /// even without its trailing blank line.
    pub fn finish(&mut self) -> Result<Option<SseEvent>, LlmError> {
        if let Some(ev) = self.next_event()? {
            return Ok(Some(ev));
        }
        if self.pos < self.buf.len() {
            let (start, stop) = (self.pos, self.buf.len());
            self.pos = stop;
            self.at_start = false;
            if let Some(ev) = self.line(start, stop)? {
                return Ok(Some(ev));
            }
        }
        Ok(self.dispatch())
    }

    fn check_failed(&self) -> Result<(), LlmError> {
        if self.failed {
            return Err(LlmError::new(
                ErrorKind::Protocol,
                "SSE decoder failed earlier",
            ));
        }
        Ok(())
    }

    fn fail(&mut self, msg: &'static str) -> LlmError {
        self.failed = true;
        LlmError::new(ErrorKind::Protocol, msg)
    }

    /// Processes the line `buf[start..stop]` (without its terminator).
    fn line(&mut self, start: usize, stop: usize) -> Result<Option<SseEvent>, LlmError> {
        let line = &self.buf[start..stop];
        if line.is_empty() {
            return Ok(self.dispatch());
        }
        if line[0] == b':' {
            return Ok(None); // comment
        }
        let (field, value) = match memchr::memchr(b':', line) {
            Some(i) => {
                let v = &line[i + 1..];
                (&line[..i], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &[][..]),
        };
        match field {
            b"event" => self.event = String::from_utf8_lossy(value).into_owned(),
            b"data" => {
                if self.data.len() + value.len() + 1 > self.max_event {
                    return Err(self.fail("SSE event exceeds the size cap"));
                }
                // Valid UTF-8 (every provider's) is checked on the fast path; anything else is
                // kept with replacement characters.
                match std::str::from_utf8(value) {
                    Ok(v) => self.data.push_str(v),
                    Err(_) => self.data.push_str(&String::from_utf8_lossy(value)),
                }
                self.data.push('\n');
                self.has_data = true;
            }
            _ => {} // id, retry and unknown fields are ignored
        }
        Ok(None)
    }

    fn dispatch(&mut self) -> Option<SseEvent> {
        let event = std::mem::take(&mut self.event);
        if !std::mem::take(&mut self.has_data) {
            return None;
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop(); // the last '\n'
        let event = if event.is_empty() {
            std::borrow::Cow::Borrowed("message")
        } else {
            std::borrow::Cow::Owned(event)
        };
        Some(SseEvent { event, data })
    }
}

pin_project! {
    /// A [`Stream`] of [`SseEvent`]s read from an HTTP body.
    ///
    /// A body error becomes a typed [`LlmError`]: [`ResponseTooLarge`](ErrorKind::ResponseTooLarge)
    /// when the body was wrapped in [`http_body_util::Limited`] and went over its cap,
    /// [`Connect`](ErrorKind::Connect) otherwise (the connection failed mid-body).
    #[derive(Debug)]
    pub struct SseStream<B> {
        #[pin]
        body: B,
        decoder: SseDecoder,
        body_done: bool,
        done: bool,
    }
}

impl<B> SseStream<B> {
    /// Decodes `body` with the given decoder.
    pub fn new(body: B, decoder: SseDecoder) -> Self {
        SseStream {
            body,
            decoder,
            body_done: false,
            done: false,
        }
    }
}

impl<B> Stream for SseStream<B>
where
    B: Body,
    B::Error: Into<BoxError>,
{
    type Item = Result<SseEvent, LlmError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        loop {
            if *this.done {
                return Poll::Ready(None);
            }
            let next = if *this.body_done {
                this.decoder.finish()
            } else {
                this.decoder.next_event()
            };
            match next {
                Ok(Some(ev)) => return Poll::Ready(Some(Ok(ev))),
                Err(e) => {
                    *this.done = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Ok(None) if *this.body_done => {
                    *this.done = true;
                    return Poll::Ready(None);
                }
                Ok(None) => {}
            }
            match ready!(this.body.as_mut().poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Ok(mut data) = frame.into_data() {
                        while data.has_remaining() {
                            let chunk = data.chunk();
                            let n = chunk.len();
                            this.decoder.push(chunk);
                            data.advance(n);
                        }
                    }
                }
                Some(Err(e)) => {
                    *this.done = true;
                    return Poll::Ready(Some(Err(body_error(e.into()))));
                }
                None => *this.body_done = true,
            }
        }
    }
}

/// Maps an error from reading a response body to a typed error.
pub(crate) fn body_error(e: BoxError) -> LlmError {
    if e.is::<http_body_util::LengthLimitError>() {
        LlmError::new(
            ErrorKind::ResponseTooLarge,
            "response body exceeds the configured cap",
        )
    } else {
        LlmError::new(ErrorKind::Connect, "reading the response body failed").with_source(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(input: &[u8]) -> Vec<SseEvent> {
        let mut d = SseDecoder::new();
        d.push(input);
        let mut out = Vec::new();
        while let Some(e) = d.next_event().unwrap() {
            out.push(e);
        }
        while let Some(e) = d.finish().unwrap() {
            out.push(e);
        }
        out
    }

    fn ev(event: &str, data: &str) -> SseEvent {
        SseEvent {
            event: event.to_owned().into(),
            data: data.into(),
        }
    }

    #[test]
    fn line_endings_and_fields() {
        let expect = vec![ev("message", "a\nb"), ev("x", "")];
        for sep in ["\n", "\r\n", "\r"] {
            let s = format!(
                ":c{sep}data: a{sep}id: 7{sep}retry: 10{sep}data:b{sep}{sep}event: x{sep}data{sep}{sep}"
            );
            assert_eq!(all(s.as_bytes()), expect, "{sep:?}");
        }
    }

    #[test]
    fn event_without_data_is_not_dispatched_and_name_resets() {
        assert_eq!(all(b"event: a\n\ndata: 1\n\n"), vec![ev("message", "1")]);
    }

    #[test]
    fn bom_and_split_crlf() {
        let input = b"\xEF\xBB\xBFdata: x\r\n\r\ndata: y\r\n\r\n";
        let mut d = SseDecoder::new();
        let mut out = Vec::new();
        for b in input {
            d.push(&[*b]);
            while let Some(e) = d.next_event().unwrap() {
                out.push(e);
            }
        }
        assert!(d.finish().unwrap().is_none());
        assert_eq!(out, vec![ev("message", "x"), ev("message", "y")]);
    }

    #[test]
    fn caps() {
        let mut d = SseDecoder::with_limits(8, 100);
        d.push(b"data: 0123456789");
        assert_eq!(d.next_event().unwrap_err().kind(), ErrorKind::Protocol);
        assert!(d.next_event().is_err(), "stays failed");
        let mut d = SseDecoder::with_limits(100, 10);
        d.push(b"data: 123456\ndata: 123456\n\n");
        assert_eq!(d.next_event().unwrap_err().kind(), ErrorKind::Protocol);
    }
}
