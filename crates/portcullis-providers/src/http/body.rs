//! [`MeteredBody`]: a response body passed through untouched, read on the way for the usage it
//! reports and for when it is over.

use std::fmt;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use portcullis_core::{BoxError, ErrorKind, Finish, LlmError, Usage};
use serde::Deserialize;
use tokio::time::Sleep;

use super::call::Format;
use crate::error_body::ErrorBody;
use crate::sse::{DEFAULT_MAX_EVENT_BYTES, SseDecoder, SseEvent};

type Hook = Box<dyn FnOnce(&Finish) + Send>;

/// How the usage is read from the body.
enum Watch {
    /// Nothing to read: an error body (already classified), or a body past the cap.
    Nothing,
    /// An SSE stream, event by event.
    Sse(Box<SseDecoder>),
    /// A JSON body, read whole (up to `DEFAULT_MAX_EVENT_BYTES`) at its end.
    Json(Vec<u8>),
}

/// A response body that passes every byte through as it arrives, and reads on the way what
/// the layers need: the usage it reports (OpenAI's `usage`, the Responses API's
/// `response.usage`, Anthropic's `message.usage` and cumulative `message_delta` usage, in a
/// JSON body or an SSE stream), an error event inside a stream, and when it is over.
///
/// The hooks registered through [`Metered`](super::Metered)'s `OnFinish` run exactly once:
/// - [`Finish::Completed`] at the stream's last event (`data: [DONE]`, `message_stop`,
///   `response.completed`) or at the end of a JSON body, with the usage read;
/// - [`Finish::Failed`] on an error event (classified by its `type` / `code`), on a chat stream
///   that ends without its last event (a `Protocol` failure), on a body error, or when the
///   stream goes quiet for longer than its idle limit (the body then ends with a `Timeout`
///   error);
/// - [`Finish::Cancelled`] when it is dropped before any of those, with the usage seen so far.
///
/// Memory is bounded: SSE events by the decoder's cap, a JSON body is kept for its usage only up
/// to 4 MiB (beyond, the body still passes, without usage).
///
/// ```
/// use bytes::Bytes;
/// use http_body_util::BodyExt;
/// use portcullis_providers::http::MeterLayer;
/// use tower::{Layer, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// // An Anthropic stream, read by whoever called: the usage is read on the way.
/// let events = "event: message_start\ndata: {\"message\":{\"usage\":{\"input_tokens\":10,\"output_tokens\":1}}}\n\n\
///               event: message_delta\ndata: {\"usage\":{\"output_tokens\":7}}\n\n\
///               event: message_stop\ndata: {}\n\n";
/// let upstream = service_fn(move |_req: http::Request<Bytes>| async move {
///     let res = http::Response::builder().header("content-type", "text/event-stream");
///     Ok::<_, std::convert::Infallible>(res.body(http_body_util::Full::new(Bytes::from(events))).unwrap())
/// });
/// let res = MeterLayer::new().layer(upstream)
///     .oneshot(http::Request::post("http://h/v1/messages").body(Bytes::new()).unwrap())
///     .await
///     .unwrap();
/// let mut body = res.into_inner().into_body();
/// while let Some(frame) = body.frame().await {
///     frame.unwrap(); // every byte, as the upstream sent it
/// }
/// let usage = body.usage().unwrap();
/// assert_eq!((usage.input_tokens, usage.output_tokens), (10, 7));
/// assert!(body.is_finished());
/// # }
/// ```
pub struct MeteredBody<B> {
    /// Bytes already read from `inner` (a buffered error body), passed on first.
    prefix: Option<Bytes>,
    inner: Option<B>,
    format: Format,
    watch: Watch,
    input: Option<u64>,
    output: Option<u64>,
    /// A stream's last event was seen.
    ended: bool,
    hooks: Mutex<Vec<Hook>>,
    done: bool,
    /// The idle limit, its timer, and when the last frame came: the timer is not reset per
    /// frame (a timer-wheel update per chunk); when it fires, it is pushed back to `last +
    /// limit` if a frame came since it was set.
    idle: Option<(Duration, Pin<Box<Sleep>>, tokio::time::Instant)>,
}

impl<B> fmt::Debug for MeteredBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeteredBody")
            .field("format", &self.format)
            .field("usage", &self.usage())
            .field("done", &self.done)
            .finish_non_exhaustive()
    }
}

impl<B> MeteredBody<B> {
    /// A success body of `format`: an SSE stream when `sse` (with an `idle` limit between
    /// frames, if any), else JSON.
    pub(crate) fn watching(inner: B, format: Format, sse: bool, idle: Option<Duration>) -> Self {
        let watch = match sse {
            true => Watch::Sse(Box::default()),
            false => Watch::Json(Vec::new()),
        };
        let idle = idle.filter(|_| sse).map(|d| {
            let sleep = Box::pin(tokio::time::sleep_until(crate::http::after(d)));
            (d, sleep, tokio::time::Instant::now())
        });
        MeteredBody {
            prefix: None,
            inner: Some(inner),
            format,
            watch,
            input: None,
            output: None,
            ended: false,
            hooks: Mutex::new(Vec::new()),
            done: false,
            idle,
        }
    }

    /// An error body: `prefix` (what was buffered to classify it), then the rest of `inner`
    /// if it was longer. It reports no usage and is over at once.
    pub(crate) fn error(prefix: Bytes, inner: Option<B>, format: Format) -> Self {
        MeteredBody {
            prefix: Some(prefix).filter(|p| !p.is_empty()),
            inner,
            format,
            watch: Watch::Nothing,
            input: None,
            output: None,
            ended: true,
            hooks: Mutex::new(Vec::new()),
            done: true,
            idle: None,
        }
    }

    /// The usage read so far (`None` until any was reported).
    pub fn usage(&self) -> Option<Usage> {
        match (self.input, self.output) {
            (None, None) => None,
            (i, o) => Some(Usage::new(i.unwrap_or(0), o.unwrap_or(0))),
        }
    }

    /// Whether it is over for the layers (its hooks have run).
    pub fn is_finished(&self) -> bool {
        self.done
    }

    /// Runs `f` once, when the body is over (at once if it is already).
    pub(crate) fn on_finish(&mut self, f: Hook) {
        if self.done {
            f(&Finish::Completed {
                usage: self.usage(),
            });
        } else {
            self.hooks
                .get_mut()
                .unwrap_or_else(|p| p.into_inner())
                .push(f);
        }
    }

    fn finish(&mut self, how: Finish) {
        if std::mem::replace(&mut self.done, true) {
            return;
        }
        self.watch = Watch::Nothing;
        let hooks = std::mem::take(self.hooks.get_mut().unwrap_or_else(|p| p.into_inner()));
        for hook in hooks {
            hook(&how);
        }
    }

    fn completed(&mut self) {
        let usage = self.usage();
        self.finish(Finish::Completed { usage });
    }

    fn failed(&mut self, kind: ErrorKind) {
        let usage = self.usage();
        let class = kind.classification();
        self.finish(Finish::Failed { usage, class });
    }

    /// Reads what passes: SSE events as they complete, or a JSON body into its buffer.
    fn read(&mut self, data: &[u8]) {
        match &mut self.watch {
            Watch::Nothing => {}
            Watch::Json(buf) => {
                if buf.len() + data.len() > DEFAULT_MAX_EVENT_BYTES {
                    self.watch = Watch::Nothing;
                } else {
                    buf.extend_from_slice(data);
                }
            }
            Watch::Sse(decoder) => {
                decoder.push(data);
                loop {
                    let Watch::Sse(decoder) = &mut self.watch else {
                        return;
                    };
                    match decoder.next_event() {
                        Ok(Some(ev)) => self.event(ev),
                        Ok(None) => return,
                        // Past the decoder's cap: the body still passes, unread.
                        Err(_) => self.watch = Watch::Nothing,
                    }
                }
            }
        }
    }

    /// One SSE event: its usage, an error, or the stream's last event.
    fn event(&mut self, ev: SseEvent) {
        if ev.data == "[DONE]" {
            self.ended = true;
            return self.completed();
        }
        if ev.event == "error" || ev.data.contains("\"error\"") {
            if let Some(e) = ErrorBody::from_envelope(ev.data.as_bytes()) {
                let kind = ErrorKind::from_wire(None, e.error_type.as_deref(), e.code.as_deref());
                return self.failed(kind);
            }
        }
        if ev.data.contains("\"usage\"") {
            self.take_usage(ev.data.as_bytes());
        }
        if matches!(&*ev.event, "message_stop" | "response.completed") {
            self.ended = true;
            self.completed();
        }
    }

    fn take_usage(&mut self, json: &[u8]) {
        if let Ok(peek) = serde_json::from_slice::<Peek>(json) {
            let nested = |n: Option<Nested>| n.and_then(|n| n.usage);
            if let Some(u) = peek
                .usage
                .or(nested(peek.message))
                .or(nested(peek.response))
            {
                self.input = u.prompt_tokens.or(u.input_tokens).or(self.input);
                self.output = u.completion_tokens.or(u.output_tokens).or(self.output);
            }
        }
    }

    /// The end of the inner body.
    fn at_end(&mut self) {
        match std::mem::replace(&mut self.watch, Watch::Nothing) {
            Watch::Json(buf) => self.take_usage(&buf),
            Watch::Sse(mut decoder) => {
                while let Ok(Some(ev)) = decoder.finish() {
                    self.event(ev);
                }
                // A chat stream must end with its last event; anything else is cut short.
                let chat = matches!(self.format, Format::OpenAiChat | Format::AnthropicMessages);
                if chat && !self.ended {
                    return self.failed(ErrorKind::Protocol);
                }
            }
            Watch::Nothing => {}
        }
        self.completed();
    }
}

impl<B> Drop for MeteredBody<B> {
    fn drop(&mut self) {
        if !self.done {
            let usage = self.usage();
            self.finish(Finish::Cancelled { usage });
        }
    }
}

impl<B> Body for MeteredBody<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(prefix) = this.prefix.take() {
            return Poll::Ready(Some(Ok(Frame::data(prefix))));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Pending => {
                let Some((limit, sleep, last)) = &mut this.idle else {
                    return Poll::Pending;
                };
                loop {
                    std::task::ready!(sleep.as_mut().poll(cx));
                    let due = last.checked_add((*limit).min(portcullis_core::config::MAX_DURATION));
                    match due {
                        Some(due) if due > sleep.deadline() => sleep.as_mut().reset(due),
                        _ => break,
                    }
                }
                let limit = *limit;
                this.inner = None;
                this.failed(ErrorKind::Timeout);
                let err = LlmError::new(
                    ErrorKind::Timeout,
                    format!("the stream was idle for {limit:?}"),
                );
                Poll::Ready(Some(Err(err.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some((_, _, last)) = &mut this.idle {
                    *last = tokio::time::Instant::now();
                }
                let frame = frame.map_data(|mut d| d.copy_to_bytes(d.remaining()));
                if let Some(data) = frame.data_ref() {
                    this.read(data);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.inner = None;
                this.failed(ErrorKind::Connect);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.inner = None;
                this.at_end();
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let prefix = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        let mut hint = self
            .inner
            .as_ref()
            .map_or(SizeHint::with_exact(0), |b| b.size_hint());
        hint.set_lower(hint.lower().saturating_add(prefix));
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper.saturating_add(prefix));
        }
        hint
    }
}

/// Where the usage may be, in any of the formats.
#[derive(Deserialize)]
struct Peek {
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    message: Option<Nested>,
    #[serde(default)]
    response: Option<Nested>,
}

#[derive(Deserialize)]
struct Nested {
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
}
