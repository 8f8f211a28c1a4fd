//! [`LlmError`]: the one error of the chat services and of the whole stack.

use std::borrow::Cow;
use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use crate::classify::{Classification, Classify};
use crate::hints::RateLimitHints;
use crate::kind::ErrorKind;
use crate::refusal::RetryStop;

/// A boxed, thread-safe error, as tower uses.
pub type BoxError = Box<dyn StdError + Send + Sync + 'static>;

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

    /// Records that a retry layer gave up after `attempts` attempts, and why.
    pub(crate) fn with_retry_stop(mut self, attempts: u32, stop: RetryStop) -> Self {
        self.0.attempts = Some(attempts);
        self.0.retry_stop = Some(stop);
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
        self.0
            .kind
            .classification_with(self.0.retry_after, self.0.should_retry)
    }

    fn provider(&self) -> Option<&str> {
        self.0.provider.as_deref()
    }

    fn rate_limits(&self) -> Option<&RateLimitHints> {
        self.0.rate_limits.as_ref()
    }

    fn retries_exhausted(self, attempts: u32, stop: RetryStop) -> Self {
        self.with_retry_stop(attempts, stop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::classify::Failover;
    use crate::refusal::{CircuitOpen, RetriesExhausted};

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
