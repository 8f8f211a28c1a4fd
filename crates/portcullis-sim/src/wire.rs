//! Wire details shared by both APIs: the response body, error bodies, ids and header formats.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
use http_body::Frame;
use rand::Rng;
use serde_json::{Value, json};

use crate::scenario::Family;

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

/// An error body in the family's exact shape.
///
/// OpenAI: `{"error":{"message","type","param","code"}}`;
/// Anthropic: `{"type":"error","error":{"type","message"},"request_id"}`.
pub(crate) fn error_body(
    family: Family,
    request_id: &str,
    err: &WireError<'_>,
) -> Response<SimBody> {
    let body = match family {
        Family::Anthropic => json!({
            "type": "error",
            "error": {"type": err.anthropic_type(), "message": err.message},
            "request_id": request_id,
        }),
        _ => json!({
            "error": {
                "message": err.message,
                "type": err.openai_type(),
                "param": err.param,
                "code": err.code,
            }
        }),
    };
    json_response(
        StatusCode::from_u16(err.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        &body,
    )
}

/// An error to send: status, message and, where the provider's type is not the one its status
/// implies, the explicit type and code.
#[derive(Debug, Clone)]
pub(crate) struct WireError<'a> {
    pub status: u16,
    pub message: String,
    pub kind: Option<&'a str>,
    pub param: Option<&'a str>,
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
    pub(crate) fn param(mut self, param: &'a str) -> Self {
        self.param = Some(param);
        self
    }
    pub(crate) fn code(mut self, code: &'a str) -> Self {
        self.code = Some(code);
        self
    }

    fn openai_type(&self) -> &'a str {
        self.kind.unwrap_or(match self.status {
            s if s >= 500 => "server_error",
            _ => "invalid_request_error",
        })
    }

    fn anthropic_type(&self) -> &'a str {
        self.kind.unwrap_or(match self.status {
            401 => "authentication_error",
            402 => "billing_error",
            403 => "permission_error",
            404 => "not_found_error",
            413 => "request_too_large",
            429 => "rate_limit_error",
            504 => "timeout_error",
            529 => "overloaded_error",
            s if s >= 500 => "api_error",
            _ => "invalid_request_error",
        })
    }
}

/// The canned message for an error status, per family.
pub(crate) fn status_message(family: Family, status: u16) -> &'static str {
    match (family, status) {
        (Family::Anthropic, 529) => "Overloaded",
        (Family::Anthropic, s) if s >= 500 => "Internal server error",
        (_, 500) => "The server had an error while processing your request. Sorry about that!",
        (_, 502) => "Bad gateway.",
        (_, 503) => "The server is overloaded or not ready yet.",
        (_, 504) => "Gateway timeout.",
        (_, s) if s >= 500 => "The server had an error while processing your request.",
        _ => "Simulated error.",
    }
}

const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const BASE58: &[u8] = b"123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";

fn random_str(rng: &mut impl Rng, alphabet: &[u8], n: usize) -> String {
    (0..n)
        .map(|_| alphabet[rng.random_range(0..alphabet.len())] as char)
        .collect()
}

/// `chatcmpl-` + 29 alphanumerics, as OpenAI's.
pub(crate) fn chatcmpl_id(rng: &mut impl Rng) -> String {
    format!("chatcmpl-{}", random_str(rng, ALNUM, 29))
}

/// `msg_01` + 22 base58 characters, as Anthropic's.
pub(crate) fn message_id(rng: &mut impl Rng) -> String {
    format!("msg_01{}", random_str(rng, BASE58, 22))
}

/// A request id: OpenAI `req_` + 32 hex digits; Anthropic `req_011C` + 20 base58 characters.
pub(crate) fn request_id(family: Family, rng: &mut impl Rng) -> String {
    match family {
        Family::Anthropic => format!("req_011C{}", random_str(rng, BASE58, 20)),
        _ => format!("req_{}", random_str(rng, b"0123456789abcdef", 32)),
    }
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
