//! A provider's error as a typed [`LlmError`]: the bounded body of a non-2xx answer read, the
//! wire's [`ErrorBody`] (from [`Wire::parse_error`], or an error event in a stream) classified
//! by [`ErrorKind::from_wire`], the one classification table, and its message scrubbed of the
//! key.

use std::borrow::Cow;

use http::Response;
use hyper::body::Incoming;
use portcullis_core::{ErrorKind, LlmError, RateLimitHints};
use serde::Deserialize;

use crate::call::Endpoint;
use crate::key::ApiKey;
use crate::wire::Wire;

/// Turns a non-2xx response into a typed error: the wire's reading of the (capped) body, the
/// rate-limit headers, the request id. A body that is not the wire's error object still gives
/// a typed error from the status.
pub(crate) async fn status_error<W: Wire>(ep: &Endpoint<W>, resp: Response<Incoming>) -> LlmError {
    let (parts, body) = resp.into_parts();
    let status = parts.status.as_u16();
    let request_id = ep.request_id(&parts.headers);
    let hints = RateLimitHints::from_headers(&parts.headers);
    let err = match ep.transport.read(body).await {
        Ok(bytes) => match ep.wire.parse_error(status, &bytes) {
            Some(body) => body.into_error(Some(status), ep.key.as_ref()),
            None => untyped_body(status, &bytes, ep.key.as_ref()),
        },
        Err(e) => LlmError::new(
            ErrorKind::from_wire(Some(status), None, None),
            format!("HTTP {status}; the error body could not be read ({e})"),
        ),
    };
    let err = err.with_status(status).with_rate_limits(hints);
    tracing::debug!(
        provider = ep.provider,
        status,
        kind = %err.kind(),
        request_id = request_id.as_deref().unwrap_or(""),
        "provider returned an error status"
    );
    ep.finish_error(err, request_id.as_deref())
}

/// A provider's error object: what [`Wire::parse_error`] reads from a non-2xx body, and what
/// an error event inside a stream carries ([`Step::Error`](crate::wire::Step::Error)). Its
/// `error_type` and `code` go through [`ErrorKind::from_wire`].
///
/// It deserializes from the object OpenAI and Anthropic send as `error`:
/// `{"type","code","message"}`, where a numeric `code` is kept as text and OpenAI's `param` is
/// appended to the message.
///
/// ```
/// use portcullis_providers::ErrorBody;
/// let e = ErrorBody::from_envelope(br#"{"error":{"type":"invalid_request_error","code":400,"message":"bad","param":"n"}}"#).unwrap();
/// assert_eq!((e.error_type.as_deref(), e.code.as_deref()), (Some("invalid_request_error"), Some("400")));
/// assert_eq!(e.message.as_deref(), Some("bad (param: n)"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(from = "RawError")]
#[non_exhaustive]
pub struct ErrorBody {
    /// The error's type (`error.type`, e.g. `rate_limit_error`).
    pub error_type: Option<String>,
    /// The error's code (`error.code`, e.g. `insufficient_quota`).
    pub code: Option<String>,
    /// The human-readable message (scrubbed of the key before it reaches an [`LlmError`]).
    pub message: Option<String>,
    /// A request id in the body (Anthropic's); a request-id header wins over it.
    pub request_id: Option<String>,
}

#[derive(Deserialize)]
struct RawError {
    #[serde(default, rename = "type")]
    error_type: Option<String>,
    #[serde(default)]
    code: Option<serde_json::Value>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    param: Option<serde_json::Value>,
}

impl From<RawError> for ErrorBody {
    fn from(raw: RawError) -> Self {
        let code = match raw.code {
            Some(serde_json::Value::String(s)) => Some(s),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        let message = match raw.param {
            Some(serde_json::Value::String(p)) => {
                Some(format!("{} (param: {p})", raw.message.unwrap_or_default()))
            }
            _ => raw.message,
        };
        ErrorBody {
            error_type: raw.error_type,
            code,
            message,
            request_id: None,
        }
    }
}

#[derive(Deserialize)]
struct Envelope {
    error: ErrorBody,
    #[serde(default)]
    request_id: Option<String>,
}

impl ErrorBody {
    /// Reads `{"error": {…}, "request_id": …}` (`request_id` optional), the envelope OpenAI,
    /// Anthropic and most compatible servers send; `None` for any other body.
    pub fn from_envelope(body: &[u8]) -> Option<ErrorBody> {
        let env: Envelope = serde_json::from_slice(body).ok()?;
        Some(ErrorBody {
            request_id: env.request_id,
            ..env.error
        })
    }

    /// The typed error, its message scrubbed of `key`; `status` is `None` for an error event
    /// inside a 2xx stream.
    pub(crate) fn into_error(self, status: Option<u16>, key: Option<&ApiKey>) -> LlmError {
        let kind = ErrorKind::from_wire(status, self.error_type.as_deref(), self.code.as_deref());
        let mut e = LlmError::new(kind, scrub(key, self.message.unwrap_or_default()));
        if let Some(t) = self.error_type {
            e = e.with_error_type(t);
        }
        if let Some(c) = self.code {
            e = e.with_code(c);
        }
        match self.request_id {
            Some(id) => e.with_request_id(id),
            None => e,
        }
    }
}

/// The error for a body that is not the wire's error object: typed from the status alone.
fn untyped_body(status: u16, body: &[u8], key: Option<&ApiKey>) -> LlmError {
    let text = String::from_utf8_lossy(&body[..body.len().min(512)]);
    LlmError::new(
        ErrorKind::from_wire(Some(status), None, None),
        scrub(key, format!("HTTP {status}: {}", text.trim())),
    )
}

fn scrub(key: Option<&ApiKey>, text: String) -> String {
    match key.map(|k| k.scrub(&text)) {
        Some(Cow::Owned(clean)) => clean,
        _ => text,
    }
}
