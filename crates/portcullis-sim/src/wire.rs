//! Wire details shared by both APIs: the response body, JSON and SSE answers and how a fault
//! bends them, the error to send, random ids, header formats and helpers.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body::Frame;
use rand::Rng;
use serde_json::Value;

use crate::limits::LimitView;

/// The body of every simulator response: a list of chunks, sent one frame each, optionally
/// paced by a delay (from `tokio::time`, so paused-time tests drive it).
#[derive(Debug)]
pub struct SimBody {
    chunks: VecDeque<Bytes>,
    delay: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A whole body (sent with `content-length`), not a stream (sent chunked).
    whole: bool,
}

impl SimBody {
    pub(crate) fn full(b: impl Into<Bytes>) -> Self {
        SimBody {
            whole: true,
            ..Self::chunks(vec![b.into()], Duration::ZERO)
        }
    }

    pub(crate) fn chunks(chunks: Vec<Bytes>, delay: Duration) -> Self {
        SimBody {
            chunks: chunks.into(),
            delay,
            sleep: None,
            whole: false,
        }
    }
}

impl http_body::Body for SimBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if this.chunks.is_empty() {
            return Poll::Ready(None);
        }
        if let Some(sleep) = this.sleep.as_mut() {
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            this.sleep = None;
        }
        let chunk = this.chunks.pop_front();
        if !this.delay.is_zero() && !this.chunks.is_empty() {
            this.sleep = Some(Box::pin(tokio::time::sleep(this.delay)));
        }
        Poll::Ready(chunk.map(|c| Ok(Frame::data(c))))
    }

    fn is_end_stream(&self) -> bool {
        self.chunks.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        if self.whole {
            http_body::SizeHint::with_exact(self.chunks.iter().map(|c| c.len() as u64).sum())
        } else {
            http_body::SizeHint::default()
        }
    }
}

/// A JSON response.
pub(crate) fn json_response(status: StatusCode, body: &Value) -> Response<SimBody> {
    let mut r = Response::new(SimBody::full(body.to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// An SSE response of already-framed events.
pub(crate) fn sse_response(events: Vec<Bytes>, delay: Duration) -> Response<SimBody> {
    let mut r = Response::new(SimBody::chunks(events, delay));
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}

/// One SSE event: `event: name` (Anthropic) when given, then `data:`.
pub(crate) fn sse_event(event: Option<&str>, data: &str) -> Bytes {
    match event {
        Some(e) => format!("event: {e}\ndata: {data}\n\n").into(),
        None => format!("data: {data}\n\n").into(),
    }
}

/// An error to send: status, message and, where the provider's type is not the one its status
/// implies, the explicit type and code.
#[derive(Debug, Clone)]
pub(crate) struct WireError<'a> {
    pub status: u16,
    pub message: String,
    pub kind: Option<&'a str>,
    pub param: Option<String>,
    pub code: Option<&'a str>,
}

impl<'a> WireError<'a> {
    pub(crate) fn new(status: u16, message: impl Into<String>) -> Self {
        WireError {
            status,
            message: message.into(),
            kind: None,
            param: None,
            code: None,
        }
    }
    pub(crate) fn kind(mut self, kind: &'a str) -> Self {
        self.kind = Some(kind);
        self
    }
    pub(crate) fn param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }
    pub(crate) fn code(mut self, code: &'a str) -> Self {
        self.code = Some(code);
        self
    }
}

/// Letters and digits, as OpenAI's ids.
pub(crate) const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
/// Base58, as Anthropic's ids.
pub(crate) const BASE58: &[u8] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

/// `n` characters drawn from `alphabet` (the random part of an id).
pub(crate) fn random_str(rng: &mut impl Rng, alphabet: &[u8], n: usize) -> String {
    (0..n)
        .map(|_| alphabet[rng.random_range(0..alphabet.len())] as char)
        .collect()
}

/// A duration the way Go prints one (`6m0s`, `1.5s`, `120ms`, `0s`), as OpenAI's reset headers.
pub fn go_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms == 0 {
        return if d.is_zero() {
            "0s".into()
        } else {
            "1ms".into()
        };
    }
    if ms < 1000 {
        return format!("{ms}ms");
    }
    let (h, m) = (ms / 3_600_000, ms / 60_000 % 60);
    let s = (ms % 60_000) as f64 / 1000.0;
    let secs = format!("{s:.3}");
    let secs = secs.trim_end_matches('0').trim_end_matches('.');
    match (h, m) {
        (0, 0) => format!("{secs}s"),
        (0, m) => format!("{m}m{secs}s"),
        (h, m) => format!("{h}h{m}m{secs}s"),
    }
}

/// A time as RFC 3339 UTC with whole seconds (`2026-02-17T23:44:11Z`), as Anthropic's resets.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The first half of a string, cut at a char boundary (a malformed-JSON fault).
pub(crate) fn cut_half(s: &str) -> &str {
    let mut i = s.len() / 2;
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    &s[..i]
}

/// Sets a header from a string known to be a valid value (ids, numbers, dates).
pub(crate) fn set(h: &mut HeaderMap, name: &'static str, value: impl AsRef<str>) {
    if let Ok(v) = HeaderValue::from_str(value.as_ref()) {
        h.insert(name, v);
    }
}

/// A header's value as text, trimmed.
pub(crate) fn header(h: &HeaderMap, name: impl header::AsHeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::trim)
}

/// The key of `Authorization: Bearer KEY`, trimmed.
pub(crate) fn bearer(h: &HeaderMap) -> Option<&str> {
    h.get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// `retry-after` in whole seconds, rounded up; returns the wait in milliseconds, rounded up.
pub(crate) fn retry_after(h: &mut HeaderMap, wait: Duration) -> u128 {
    let ms = wait.as_nanos().div_ceil(1_000_000);
    set(h, "retry-after", ms.div_ceil(1000).to_string());
    ms
}

/// The limit, remaining and reset headers of each named limit: `name(limit, field)` spells a
/// header's name, `reset` the time until the limit is whole again.
pub(crate) fn limit_headers(
    h: &mut HeaderMap,
    limits: &[(&str, LimitView)],
    name: impl Fn(&str, &str) -> String,
    reset: impl Fn(Duration) -> String,
) {
    for (limit, view) in limits {
        for (field, value) in [
            ("limit", view.limit.to_string()),
            ("remaining", view.remaining.to_string()),
            ("reset", reset(view.reset)),
        ] {
            if let (Ok(n), Ok(v)) = (
                http::HeaderName::try_from(name(limit, field)),
                HeaderValue::try_from(value),
            ) {
                h.insert(n, v);
            }
        }
    }
}

/// How a fault bends a successful answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mangle {
    /// Not at all.
    None,
    /// An error event instead of the content.
    ErrorBeforeContent,
    /// An error event after two content events.
    ErrorAfterContent,
    /// The stream ends halfway through the content.
    Truncated,
    /// One event (or the JSON body) is cut in half.
    MalformedJson,
}

impl Mangle {
    /// Appends the content events to `events` (which hold the stream's preamble), bent by the
    /// fault. Returns `true` when the stream must end right there (an error event, or a cut).
    pub(crate) fn apply(
        self,
        events: &mut Vec<Bytes>,
        mut content: Vec<Bytes>,
        error: impl FnOnce() -> Bytes,
    ) -> bool {
        match self {
            Mangle::ErrorBeforeContent => {
                events.push(error());
                true
            }
            Mangle::ErrorAfterContent => {
                events.extend(content.into_iter().take(2));
                events.push(error());
                true
            }
            Mangle::Truncated => {
                let half = content.len().div_ceil(2);
                events.extend(content.into_iter().take(half));
                true
            }
            Mangle::MalformedJson => {
                if let Some(second) = content.get_mut(1).or(events.get_mut(0)) {
                    let s = String::from_utf8_lossy(second);
                    *second = Bytes::from(format!("{}\n\n", cut_half(&s)));
                }
                events.extend(content);
                false
            }
            Mangle::None => {
                events.extend(content);
                false
            }
        }
    }

    /// A complete (not streamed) answer: `200` with `body`, cut in half by a malformed-JSON
    /// fault.
    pub(crate) fn json_ok(self, body: &Value) -> Response<SimBody> {
        let mut r = json_response(StatusCode::OK, body);
        if self == Mangle::MalformedJson {
            *r.body_mut() = SimBody::full(cut_half(&body.to_string()).to_owned());
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use portcullis_core::hints::{parse_go_duration, parse_rfc3339};

    #[test]
    fn go_durations_round_trip() {
        for (ms, s) in [
            (0, "0s"),
            (120, "120ms"),
            (1500, "1.5s"),
            (360_000, "6m0s"),
            (3_723_000, "1h2m3s"),
            (17_280, "17.28s"),
        ] {
            let d = Duration::from_millis(ms);
            assert_eq!(go_duration(d), s);
            assert_eq!(parse_go_duration(s), Some(d));
        }
    }

    #[test]
    fn rfc3339_round_trips() {
        let t = UNIX_EPOCH + Duration::from_secs(1_771_371_851); // 2026-02-17T23:44:11Z
        assert_eq!(rfc3339(t), "2026-02-17T23:44:11Z");
        assert_eq!(parse_rfc3339("2026-02-17T23:44:11Z"), Some(t));
    }
}
