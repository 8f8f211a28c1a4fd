//! A non-2xx answer as a typed [`LlmError`]: its bounded body read, the provider's error object
//! (`error.type` / `error.code` / `error.message`) classified by [`ErrorKind::from_wire`], the
//! message scrubbed of the key.

use std::borrow::Cow;

use http::Response;
use hyper::body::Incoming;
use portcullis_core::{ErrorKind, LlmError, RateLimitHints};
use serde::Deserialize;

use crate::call::Endpoint;
use crate::key::ApiKey;

/// Turns a non-2xx response into a typed error: the body's `error.type` / `error.code` /
/// `error.message` (both providers use that shape) through [`ErrorKind::from_wire`], the
/// rate-limit headers, the request id. A body that is not JSON still gives a typed error
/// from the status.
pub(crate) async fn status_error(ep: &Endpoint, resp: Response<Incoming>) -> LlmError {
    let (parts, body) = resp.into_parts();
    let status = parts.status.as_u16();
    let request_id = ep.request_id(&parts.headers);
    let hints = RateLimitHints::from_headers(&parts.headers);
    let err = match ep.transport.read(body).await {
        Ok(bytes) => error_from_body(status, &bytes, ep.key.as_ref()),
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

/// The error object both providers send: `{"error":{"type","code","message"}}` (OpenAI adds
/// `param`; Anthropic adds a top-level `"type":"error"` and `request_id`).
#[derive(Debug, Deserialize)]
pub(crate) struct WireError {
    #[serde(default, rename = "type")]
    pub(crate) error_type: Option<String>,
    #[serde(default)]
    pub(crate) code: Option<serde_json::Value>,
    #[serde(default)]
    pub(crate) message: Option<String>,
    #[serde(default)]
    pub(crate) param: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: WireError,
    #[serde(default)]
    request_id: Option<String>,
}

impl WireError {
    /// The typed error, its message scrubbed of `key`; `status` is `None` for an error event
    /// inside a 200 stream.
    pub(crate) fn into_error(self, status: Option<u16>, key: Option<&ApiKey>) -> LlmError {
        let code = match self.code {
            Some(serde_json::Value::String(s)) => Some(s),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        let kind = ErrorKind::from_wire(status, self.error_type.as_deref(), code.as_deref());
        let mut message = self.message.unwrap_or_default();
        if let Some(serde_json::Value::String(p)) = self.param {
            message = format!("{message} (param: {p})");
        }
        let mut e = LlmError::new(kind, scrub(key, message));
        if let Some(t) = self.error_type {
            e = e.with_error_type(t);
        }
        if let Some(c) = code {
            e = e.with_code(c);
        }
        e
    }
}

/// Parses an error body; a body that is not the documented shape still gives a typed error.
pub(crate) fn error_from_body(status: u16, body: &[u8], key: Option<&ApiKey>) -> LlmError {
    match serde_json::from_slice::<ErrorEnvelope>(body) {
        Ok(env) => {
            let e = env.error.into_error(Some(status), key);
            match env.request_id {
                Some(id) => e.with_request_id(id),
                None => e,
            }
        }
        Err(_) => {
            let text = String::from_utf8_lossy(&body[..body.len().min(512)]);
            LlmError::new(
                ErrorKind::from_wire(Some(status), None, None),
                scrub(key, format!("HTTP {status}: {}", text.trim())),
            )
        }
    }
}

fn scrub(key: Option<&ApiKey>, text: String) -> String {
    match key.map(|k| k.scrub(&text)) {
        Some(Cow::Owned(clean)) => clean,
        _ => text,
    }
}
