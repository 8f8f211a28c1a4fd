//! [`LlmError`], its [`ErrorKind`], the layers' own typed refusals, and the one place that maps
//! an HTTP status and a provider error `type`/`code` to a kind ([`ErrorKind::from_wire`]).

use std::borrow::Cow;
use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use crate::classify::{Classification, Classify, Failover, RateLimitInfo};
use crate::hints::RateLimitHints;

/// A boxed, thread-safe error, as tower uses.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

/// What went wrong, one variant per row of the classification table (DESIGN.md).
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
    /// 500 / 502 / 504, `server_error`, `api_error`.
    Server,
    /// Connection refused or reset, DNS, TLS.
    Connect,
    /// An attempt timed out, or a stream went idle.
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
        }
    }

    /// This kind's row of the classification table (without a `retry-after` hint).
    ///
    /// | kind | retry same provider | breaker failure | fall back | pauses the limiter |
    /// |---|---|---|---|---|
    /// | RateLimited | yes, after Retry-After | no | yes | yes |
    /// | QuotaExhausted | no | no | yes | no |
    /// | Overloaded, Server, Connect, Timeout, Protocol | yes | yes | yes | no |
    /// | StreamInterrupted | no | yes | no | no |
    /// | ContextLengthExceeded | no | no | to a larger context | no |
    /// | InvalidRequest, Authentication, PermissionDenied, NotFound, RequestTooLarge, ResponseTooLarge, Configuration | no | no | no | no |
    /// | CircuitOpen, Throttled | no | no | yes | no |
    /// | DeadlineExceeded | no | no | no | no |
    pub const fn classification(self) -> Classification {
        use ErrorKind::*;
        match self {
            RateLimited => Classification {
                retry: true,
                breaker_failure: false,
                failover: Failover::Eligible,
                retry_after: None,
                rate_limited: true,
            },
            QuotaExhausted => Classification {
                retry: false,
                breaker_failure: false,
                failover: Failover::Eligible,
                retry_after: None,
                rate_limited: false,
            },
            Overloaded | Server | Connect | Timeout | Protocol => Classification::TRANSIENT,
            StreamInterrupted => Classification {
                retry: false,
                breaker_failure: true,
                failover: Failover::Never,
                retry_after: None,
                rate_limited: false,
            },
            ContextLengthExceeded => Classification {
                retry: false,
                breaker_failure: false,
                failover: Failover::LargerContext,
                retry_after: None,
                rate_limited: false,
            },
            InvalidRequest | Authentication | PermissionDenied | NotFound | RequestTooLarge
            | ResponseTooLarge | Configuration | DeadlineExceeded => Classification::PERMANENT,
            CircuitOpen | Throttled => Classification::REFUSED_LOCALLY,
        }
    }

    /// Maps what a provider sent (an HTTP status, and the error body's `type` and `code`) to a
    /// kind. This is the only place that does it; providers, the simulator and mid-stream error
    /// events all call it. `status` is `None` for an error event inside a 200 stream.
    ///
    /// Specific codes win over the status (429 `insufficient_quota` is quota, not a rate limit;
    /// 400 `context_length_exceeded` is its own kind), then the status, then the type.
    ///
    /// ```
    /// use portcullis_core::ErrorKind;
    /// assert_eq!(ErrorKind::from_wire(Some(429), Some("insufficient_quota"), None), ErrorKind::QuotaExhausted);
    /// assert_eq!(ErrorKind::from_wire(Some(429), Some("tokens"), Some("rate_limit_exceeded")), ErrorKind::RateLimited);
    /// assert_eq!(ErrorKind::from_wire(None, Some("overloaded_error"), None), ErrorKind::Overloaded);
    /// ```
    pub fn from_wire(
        status: Option<u16>,
        error_type: Option<&str>,
        code: Option<&str>,
    ) -> ErrorKind {
        let is = |s: &str| error_type == Some(s) || code == Some(s);
        if is("insufficient_quota") || is("billing_error") {
            return ErrorKind::QuotaExhausted;
        }
        if is("context_length_exceeded") {
            return ErrorKind::ContextLengthExceeded;
        }
        if let Some(status) = status {
            match status {
                400 | 422 => return ErrorKind::InvalidRequest,
                401 => return ErrorKind::Authentication,
                402 => return ErrorKind::QuotaExhausted,
                403 => return ErrorKind::PermissionDenied,
                404 => return ErrorKind::NotFound,
                408 => return ErrorKind::Timeout,
                413 => return ErrorKind::RequestTooLarge,
                429 => return ErrorKind::RateLimited,
                503 | 529 => return ErrorKind::Overloaded,
                504 => return ErrorKind::Timeout,
                500..=599 => {
                    if is("overloaded_error") {
                        return ErrorKind::Overloaded;
                    }
                    return ErrorKind::Server;
                }
                _ => {}
            }
        }
        match error_type.or(code) {
            Some("rate_limit_exceeded" | "rate_limit_error" | "requests" | "tokens") => {
                ErrorKind::RateLimited
            }
            Some("overloaded_error") => ErrorKind::Overloaded,
            Some("server_error" | "api_error" | "internal_server_error") => ErrorKind::Server,
            Some("timeout_error") => ErrorKind::Timeout,
            Some("invalid_request_error" | "invalid_request" | "unsupported_parameter") => {
                ErrorKind::InvalidRequest
            }
            Some("authentication_error" | "invalid_api_key") => ErrorKind::Authentication,
            Some("permission_error") => ErrorKind::PermissionDenied,
            Some("not_found_error" | "model_not_found") => ErrorKind::NotFound,
            Some("request_too_large") => ErrorKind::RequestTooLarge,
            _ => match status {
                Some(s) if (400..500).contains(&s) => ErrorKind::InvalidRequest,
                // An unknown error event inside a 200 stream, or an unknown status: transient.
                _ => ErrorKind::Server,
            },
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a retry layer stopped retrying and returned its last error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RetryStop {
    /// `max_retries` attempts were all used.
    Exhausted,
    /// The retry budget shared by all clones was spent.
    BudgetExhausted,
    /// The next wait would outlive the deadline.
    Deadline,
    /// The provider asked for a wait above the configured cap.
    RetryAfterTooLong,
    /// After at least one retry, an attempt failed with an error that is not retried (e.g. a
    /// 401, or the circuit breaker opened between attempts).
    NotRetryable,
}

impl fmt::Display for RetryStop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RetryStop::Exhausted => "retries exhausted",
            RetryStop::BudgetExhausted => "retry budget exhausted",
            RetryStop::Deadline => "deadline would pass before the next attempt",
            RetryStop::RetryAfterTooLong => "retry-after above the cap",
            RetryStop::NotRetryable => "stopped on an error that is not retried",
        })
    }
}

/// The one error type of the chat services and of the whole stack: match on
/// [`kind`](LlmError::kind).
///
/// It carries the provider, the HTTP status, the provider's own error `type` / `code` and
/// message, a `retry-after` hint, the request id and a source. It is a single boxed pointer, so
/// `Result<_, LlmError>` stays small.
pub struct LlmError(Box<Inner>);

struct Inner {
    kind: ErrorKind,
    message: Cow<'static, str>,
    provider: Option<Cow<'static, str>>,
    status: Option<u16>,
    error_type: Option<String>,
    code: Option<String>,
    retry_after: Option<Duration>,
    should_retry: Option<bool>,
    request_id: Option<String>,
    rate_limits: Option<RateLimitHints>,
    attempts: Option<u32>,
    retry_stop: Option<RetryStop>,
    source: Option<BoxError>,
}

impl LlmError {
    /// A new error of `kind` with a message.
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        LlmError(Box::new(Inner {
            kind,
            message: message.into(),
            provider: None,
            status: None,
            error_type: None,
            code: None,
            retry_after: None,
            should_retry: None,
            request_id: None,
            rate_limits: None,
            attempts: None,
            retry_stop: None,
            source: None,
        }))
    }

    /// Sets the provider.
    pub fn with_provider(mut self, provider: impl Into<Cow<'static, str>>) -> Self {
        self.0.provider = Some(provider.into());
        self
    }
    /// Sets the HTTP status.
    pub fn with_status(mut self, status: u16) -> Self {
        self.0.status = Some(status);
        self
    }
    /// Sets the provider's error `type`.
    pub fn with_error_type(mut self, t: impl Into<String>) -> Self {
        self.0.error_type = Some(t.into());
        self
    }
    /// Sets the provider's error `code`.
    pub fn with_code(mut self, c: impl Into<String>) -> Self {
        self.0.code = Some(c.into());
        self
    }
    /// Sets the `retry-after` hint.
    pub fn with_retry_after(mut self, d: Duration) -> Self {
        self.0.retry_after = Some(d);
        self
    }
    /// Sets the request id.
    pub fn with_request_id(mut self, id: impl Into<String>) -> Self {
        self.0.request_id = Some(id.into());
        self
    }
    /// Sets the source.
    pub fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.0.source = Some(source.into());
        self
    }
    /// Attaches parsed rate-limit headers; their `retry-after` and `x-should-retry` become this
    /// error's hints.
    pub fn with_rate_limits(mut self, hints: RateLimitHints) -> Self {
        if hints.retry_after.is_some() {
            self.0.retry_after = hints.retry_after;
        }
        if hints.should_retry.is_some() {
            self.0.should_retry = hints.should_retry;
        }
        self.0.rate_limits = Some(hints);
        self
    }
    /// Overrides "retry the same provider" (the `x-should-retry` header).
    pub fn with_should_retry(mut self, retry: bool) -> Self {
        self.0.should_retry = Some(retry);
        self
    }
    /// Changes the kind (e.g. an error event after the commit point becomes
    /// [`ErrorKind::StreamInterrupted`]).
    pub fn with_kind(mut self, kind: ErrorKind) -> Self {
        self.0.kind = kind;
        self
    }

    /// What went wrong.
    pub fn kind(&self) -> ErrorKind {
        self.0.kind
    }
    /// The message (the provider's own, when it sent one).
    pub fn message(&self) -> &str {
        &self.0.message
    }
    /// The provider that produced it.
    pub fn provider(&self) -> Option<&str> {
        self.0.provider.as_deref()
    }
    /// The HTTP status.
    pub fn status(&self) -> Option<u16> {
        self.0.status
    }
    /// The provider's error `type` (e.g. `insufficient_quota`, `overloaded_error`).
    pub fn error_type(&self) -> Option<&str> {
        self.0.error_type.as_deref()
    }
    /// The provider's error `code` (e.g. `rate_limit_exceeded`).
    pub fn code(&self) -> Option<&str> {
        self.0.code.as_deref()
    }
    /// How long the provider asked to wait.
    pub fn retry_after(&self) -> Option<Duration> {
        self.0.retry_after
    }
    /// The `x-should-retry` override, when the server sent one.
    pub fn should_retry(&self) -> Option<bool> {
        self.0.should_retry
    }
    /// The provider's request id.
    pub fn request_id(&self) -> Option<&str> {
        self.0.request_id.as_deref()
    }
    /// How many attempts a retry layer made before returning this error.
    pub fn attempts(&self) -> Option<u32> {
        self.0.attempts
    }
    /// Why a retry layer stopped, when one did.
    pub fn retry_stop(&self) -> Option<RetryStop> {
        self.0.retry_stop
    }
    /// Whether the retry budget was spent when this error was returned.
    pub fn is_budget_exhausted(&self) -> bool {
        self.0.retry_stop == Some(RetryStop::BudgetExhausted)
    }
}

impl fmt::Debug for LlmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.0;
        let mut d = f.debug_struct("LlmError");
        d.field("kind", &i.kind).field("message", &i.message);
        if let Some(p) = &i.provider {
            d.field("provider", p);
        }
        if let Some(s) = i.status {
            d.field("status", &s);
        }
        if let Some(t) = &i.error_type {
            d.field("error_type", t);
        }
        if let Some(c) = &i.code {
            d.field("code", c);
        }
        if let Some(r) = i.retry_after {
            d.field("retry_after", &r);
        }
        if let Some(r) = i.should_retry {
            d.field("should_retry", &r);
        }
        if let Some(r) = &i.request_id {
            d.field("request_id", r);
        }
        if let Some(a) = i.attempts {
            d.field("attempts", &a);
        }
        if let Some(s) = i.retry_stop {
            d.field("retry_stop", &s);
        }
        if let Some(s) = &i.source {
            d.field("source", s);
        }
        d.finish()
    }
}

impl fmt::Display for LlmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let i = &self.0;
        if let (Some(n), Some(stop)) = (i.attempts, i.retry_stop) {
            write!(
                f,
                "{stop} after {n} attempt{}; last error: ",
                if n == 1 { "" } else { "s" }
            )?;
        }
        write!(f, "{}", i.kind)?;
        let mut parts = Vec::new();
        if let Some(p) = &i.provider {
            parts.push(p.to_string());
        }
        if let Some(s) = i.status {
            parts.push(format!("HTTP {s}"));
        }
        if let Some(t) = i.error_type.as_ref().or(i.code.as_ref()) {
            parts.push(t.clone());
        }
        if !parts.is_empty() {
            write!(f, " ({})", parts.join(", "))?;
        }
        if !i.message.is_empty() {
            write!(f, ": {}", i.message)?;
        }
        if let Some(d) = i.retry_after {
            write!(f, " (retry after {d:?})")?;
        }
        Ok(())
    }
}

impl StdError for LlmError {
    fn source(&self) -> Option<&(dyn StdError + 'static)> {
        self.0
            .source
            .as_ref()
            .map(|e| &**e as &(dyn StdError + 'static))
    }
}

impl Classify for LlmError {
    fn classify(&self) -> Classification {
        let mut c = self.0.kind.classification();
        c.retry_after = self.0.retry_after;
        if let Some(retry) = self.0.should_retry {
            // The server knows best whether the same request can succeed: `x-should-retry`
            // overrides the "retry same provider" column, nothing else.
            c.retry = retry && !matches!(self.0.kind, ErrorKind::StreamInterrupted);
        }
        c
    }

    fn provider(&self) -> Option<&str> {
        self.0.provider.as_deref()
    }
}

impl RateLimitInfo for LlmError {
    fn rate_limits(&self) -> Option<&RateLimitHints> {
        self.0.rate_limits.as_ref()
    }
}

// ---- the layers' own refusals: small marker types -------------------------------------------

macro_rules! marker_error {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $f:ident : $t:ty),* } => $kind:expr, $fmt:literal $(, $arg:ident)*) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name { $($(#[$fm])* pub $f: $t),* }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, $fmt $(, self.$arg)*)
            }
        }

        impl StdError for $name {}

        impl From<$name> for LlmError {
            fn from(e: $name) -> LlmError {
                // A static message where the fields are kept elsewhere: a refusal on the hot
                // path allocates only the error's box.
                let mut err = LlmError::new($kind, e.message());
                err.0.retry_after = e.hint();
                err
            }
        }
    };
}

marker_error!(
    /// The circuit breaker is open: the call was refused without reaching the provider.
    CircuitOpen {
        /// How long until the breaker lets a probe through.
        retry_after: Duration
    } => ErrorKind::CircuitOpen, "circuit open; retry in {:?}", retry_after
);
marker_error!(
    /// The token bucket would make the call wait longer than allowed (`max_wait` or the deadline).
    Throttled {
        /// When the call could have been admitted.
        retry_after: Duration
    } => ErrorKind::Throttled, "throttled by the local rate limiter; admission in {:?}", retry_after
);
marker_error!(
    /// The request costs more tokens or requests than the bucket can ever hold.
    OverCapacity {
        /// The request's cost.
        cost: u64,
        /// The bucket's capacity.
        capacity: u64
    } => ErrorKind::Throttled, "request cost {} exceeds the bucket capacity {}", cost, capacity
);
marker_error!(
    /// The overall deadline passed before the call could finish.
    DeadlineExceeded {} => ErrorKind::DeadlineExceeded, "deadline exceeded"
);
marker_error!(
    /// One attempt took longer than its timeout.
    AttemptTimedOut {
        /// The timeout that elapsed.
        after: Duration
    } => ErrorKind::Timeout, "attempt timed out after {:?}", after
);

trait Hint {
    fn hint(&self) -> Option<Duration>;
    fn message(&self) -> Cow<'static, str>;
}
impl Hint for CircuitOpen {
    fn hint(&self) -> Option<Duration> {
        Some(self.retry_after)
    }
    fn message(&self) -> Cow<'static, str> {
        Cow::Borrowed("circuit open")
    }
}
impl Hint for Throttled {
    fn hint(&self) -> Option<Duration> {
        Some(self.retry_after)
    }
    fn message(&self) -> Cow<'static, str> {
        Cow::Borrowed("throttled by the local rate limiter")
    }
}
impl Hint for OverCapacity {
    fn hint(&self) -> Option<Duration> {
        None
    }
    fn message(&self) -> Cow<'static, str> {
        Cow::Owned(self.to_string())
    }
}
impl Hint for DeadlineExceeded {
    fn hint(&self) -> Option<Duration> {
        None
    }
    fn message(&self) -> Cow<'static, str> {
        Cow::Borrowed("deadline exceeded")
    }
}
impl Hint for AttemptTimedOut {
    fn hint(&self) -> Option<Duration> {
        None
    }
    fn message(&self) -> Cow<'static, str> {
        Cow::Borrowed("attempt timed out")
    }
}

impl Classify for CircuitOpen {
    fn classify(&self) -> Classification {
        Classification {
            retry_after: Some(self.retry_after),
            ..ErrorKind::CircuitOpen.classification()
        }
    }
}
impl Classify for Throttled {
    fn classify(&self) -> Classification {
        Classification {
            retry_after: Some(self.retry_after),
            ..ErrorKind::Throttled.classification()
        }
    }
}
impl Classify for OverCapacity {
    fn classify(&self) -> Classification {
        ErrorKind::Throttled.classification()
    }
}
impl Classify for DeadlineExceeded {
    fn classify(&self) -> Classification {
        ErrorKind::DeadlineExceeded.classification()
    }
}
impl Classify for AttemptTimedOut {
    fn classify(&self) -> Classification {
        ErrorKind::Timeout.classification()
    }
}

/// A retry layer gave up: it made `attempts` attempts and returns the `last` error, saying why
/// it stopped.
///
/// Layers produce it through `E: From<RetriesExhausted<E>>`: for [`LlmError`] the conversion
/// keeps the last error's kind (so an outer fallback still sees an `Overloaded`) and records
/// the attempts and the reason; for [`BoxError`] it wraps.
#[derive(Debug)]
pub struct RetriesExhausted<E> {
    /// How many attempts were made (the first one included).
    pub attempts: u32,
    /// Why retrying stopped.
    pub stop: RetryStop,
    /// The last attempt's error.
    pub last: E,
}

impl<E: fmt::Display> fmt::Display for RetriesExhausted<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} after {} attempts; last error: {}",
            self.stop, self.attempts, self.last
        )
    }
}

impl<E: fmt::Debug + fmt::Display> StdError for RetriesExhausted<E> {}

impl<E: Classify> Classify for RetriesExhausted<E> {
    fn classify(&self) -> Classification {
        let mut c = self.last.classify();
        c.retry = false;
        c
    }
}

impl From<RetriesExhausted<LlmError>> for LlmError {
    fn from(e: RetriesExhausted<LlmError>) -> LlmError {
        let mut last = e.last;
        last.0.attempts = Some(e.attempts);
        last.0.retry_stop = Some(e.stop);
        last
    }
}

impl Classify for BoxError {
    /// Downcasts to the known error types; an unknown error is treated as a transient upstream
    /// failure (retry, breaker failure, failover), as tower's own middleware would.
    fn classify(&self) -> Classification {
        if let Some(e) = self.downcast_ref::<LlmError>() {
            return e.classify();
        }
        if let Some(e) = self.downcast_ref::<CircuitOpen>() {
            return e.classify();
        }
        if let Some(e) = self.downcast_ref::<Throttled>() {
            return e.classify();
        }
        if let Some(e) = self.downcast_ref::<OverCapacity>() {
            return e.classify();
        }
        if let Some(e) = self.downcast_ref::<DeadlineExceeded>() {
            return e.classify();
        }
        if let Some(e) = self.downcast_ref::<AttemptTimedOut>() {
            return e.classify();
        }
        if let Some(e) = self.downcast_ref::<RetriesExhausted<BoxError>>() {
            return e.classify();
        }
        Classification::TRANSIENT
    }

    fn provider(&self) -> Option<&str> {
        self.downcast_ref::<LlmError>().and_then(|e| e.provider())
    }
}

impl RateLimitInfo for BoxError {
    fn rate_limits(&self) -> Option<&RateLimitHints> {
        self.downcast_ref::<LlmError>()
            .and_then(|e| e.rate_limits())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_is_not_rate_limit() {
        assert_eq!(
            ErrorKind::from_wire(
                Some(429),
                Some("insufficient_quota"),
                Some("insufficient_quota")
            ),
            ErrorKind::QuotaExhausted
        );
        assert_eq!(
            ErrorKind::from_wire(Some(429), Some("rate_limit_error"), None),
            ErrorKind::RateLimited
        );
        assert_eq!(
            ErrorKind::from_wire(Some(402), Some("billing_error"), None),
            ErrorKind::QuotaExhausted
        );
        assert!(!ErrorKind::QuotaExhausted.classification().retry);
        assert!(ErrorKind::RateLimited.classification().retry);
    }

    #[test]
    fn statuses_map() {
        assert_eq!(
            ErrorKind::from_wire(Some(529), Some("overloaded_error"), None),
            ErrorKind::Overloaded
        );
        assert_eq!(
            ErrorKind::from_wire(Some(503), None, None),
            ErrorKind::Overloaded
        );
        assert_eq!(
            ErrorKind::from_wire(Some(500), Some("api_error"), None),
            ErrorKind::Server
        );
        assert_eq!(
            ErrorKind::from_wire(Some(502), None, None),
            ErrorKind::Server
        );
        assert_eq!(
            ErrorKind::from_wire(
                Some(400),
                Some("invalid_request_error"),
                Some("context_length_exceeded")
            ),
            ErrorKind::ContextLengthExceeded
        );
        assert_eq!(
            ErrorKind::from_wire(Some(401), Some("authentication_error"), None),
            ErrorKind::Authentication
        );
        assert_eq!(
            ErrorKind::from_wire(Some(403), None, None),
            ErrorKind::PermissionDenied
        );
        assert_eq!(
            ErrorKind::from_wire(Some(404), Some("not_found_error"), None),
            ErrorKind::NotFound
        );
        assert_eq!(
            ErrorKind::from_wire(Some(413), None, None),
            ErrorKind::RequestTooLarge
        );
        assert_eq!(
            ErrorKind::from_wire(None, Some("api_error"), None),
            ErrorKind::Server
        );
        assert_eq!(
            ErrorKind::from_wire(None, Some("rate_limit_error"), None),
            ErrorKind::RateLimited
        );
    }

    #[test]
    fn should_retry_overrides_retry_column_only() {
        let e = LlmError::new(ErrorKind::InvalidRequest, "x").with_should_retry(true);
        let c = e.classify();
        assert!(c.retry);
        assert!(!c.breaker_failure);
        let e = LlmError::new(ErrorKind::Server, "x").with_should_retry(false);
        assert!(!e.classify().retry);
        assert!(e.classify().breaker_failure);
    }

    #[test]
    fn retries_exhausted_keeps_kind() {
        let last = LlmError::new(ErrorKind::Overloaded, "busy").with_provider("anthropic");
        let e: LlmError = RetriesExhausted {
            attempts: 4,
            stop: RetryStop::Exhausted,
            last,
        }
        .into();
        assert_eq!(e.kind(), ErrorKind::Overloaded);
        assert_eq!(e.attempts(), Some(4));
        assert!(
            e.to_string()
                .starts_with("retries exhausted after 4 attempts"),
            "{e}"
        );
    }

    #[test]
    fn box_error_downcasts() {
        let b: BoxError = Box::new(CircuitOpen {
            retry_after: Duration::from_secs(3),
        });
        let c = b.classify();
        assert!(!c.breaker_failure && !c.retry && c.failover == Failover::Eligible);
        assert_eq!(c.retry_after, Some(Duration::from_secs(3)));
        let b: BoxError = "boom".into();
        assert_eq!(b.classify(), Classification::TRANSIENT);
        let b: BoxError = Box::new(LlmError::new(ErrorKind::Authentication, "no"));
        assert_eq!(b.classify(), Classification::PERMANENT);
    }
}
