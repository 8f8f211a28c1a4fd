//! [`ErrorKind`]: what went wrong, one variant per row of the classification table (whose
//! columns are in [`classify`](crate::classify)).

use std::fmt;

/// What went wrong, one variant per row of the classification table ([`ErrorKind::classification`]).
///
/// Match on it; never on a message string. [`ErrorKind::classification`] gives the row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// 429 `rate_limit_exceeded` / `rate_limit_error`: too many requests or tokens per minute.
    RateLimited,
    /// 429 `insufficient_quota`, 402 `billing_error`: the account is out of credit. Never retried.
    QuotaExhausted,
    /// 529 `overloaded_error`, 503: the provider is overloaded.
    Overloaded,
    /// 500 / 502 and any other 5xx but 503 / 504 / 529, `server_error`, `api_error`.
    Server,
    /// Connection refused or reset, DNS, TLS.
    Connect,
    /// An attempt timed out, a stream went idle, or the provider answered 408 / 504.
    Timeout,
    /// An error after content already reached the caller. Never retried, never failed over.
    StreamInterrupted,
    /// A truncated stream, malformed JSON, a missing field.
    Protocol,
    /// 400 `context_length_exceeded`: only a larger-context model can serve it.
    ContextLengthExceeded,
    /// 400 / 422: the request is wrong.
    InvalidRequest,
    /// 401: the key is wrong or missing.
    Authentication,
    /// 403.
    PermissionDenied,
    /// 404: unknown model or path.
    NotFound,
    /// 413: the request body is too large.
    RequestTooLarge,
    /// The response body exceeded the configured cap.
    ResponseTooLarge,
    /// Bad configuration: no key, a key over plain http to a remote host, an invalid URL.
    Configuration,
    /// Local refusal: the circuit breaker is open.
    CircuitOpen,
    /// Local refusal: the token bucket would wait too long, or the cost exceeds its capacity.
    Throttled,
    /// Local refusal: the overall deadline passed.
    DeadlineExceeded,
    /// Local refusal, before sending: this provider cannot carry what the request holds (a
    /// feature it lacks, content it cannot translate, an image over its size limit). Not
    /// retried; fails over, since another provider may take it.
    Unsupported,
}

impl ErrorKind {
    /// A short snake_case name, stable for logs and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::QuotaExhausted => "quota_exhausted",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::Server => "server",
            ErrorKind::Connect => "connect",
            ErrorKind::Timeout => "timeout",
            ErrorKind::StreamInterrupted => "stream_interrupted",
            ErrorKind::Protocol => "protocol",
            ErrorKind::ContextLengthExceeded => "context_length_exceeded",
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::Authentication => "authentication",
            ErrorKind::PermissionDenied => "permission_denied",
            ErrorKind::NotFound => "not_found",
            ErrorKind::RequestTooLarge => "request_too_large",
            ErrorKind::ResponseTooLarge => "response_too_large",
            ErrorKind::Configuration => "configuration",
            ErrorKind::CircuitOpen => "circuit_open",
            ErrorKind::Throttled => "throttled",
            ErrorKind::DeadlineExceeded => "deadline_exceeded",
            ErrorKind::Unsupported => "unsupported",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
