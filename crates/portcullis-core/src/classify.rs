//! The traits every layer is generic over, and the one classification table they all use.
//!
//! | trait | what it tells a layer |
//! |---|---|
//! | [`Classify`] | for an error: retry the same provider? a breaker failure? fail over? wait how long? the provider's rate-limit headers |
//! | [`OnFinish`] | for a response: when it is really over (a stream ends later), its usage, its rate-limit headers, and the failure it stands for if it is one (an HTTP 503) |
//! | [`RequestInfo`] | for a request: its model and deadline |
//! | [`CostOf`](crate::CostOf) | for a request: its token cost (in [`tokens`](crate::tokens)) |
//!
//! # The contract for your own types
//!
//! - **Your error** needs `Classify` and one `From<`[`Refusal`](crate::Refusal)`>`: every layer
//!   refuses through that one type (circuit open, throttled, over capacity, deadline, attempt
//!   timeout). [`LlmError`](crate::LlmError) and [`BoxError`](crate::BoxError) have both.
//! - **Your response**, if you own its type, implements `OnFinish` (a response that is over at
//!   once needs only the one-line `on_finish` body shown on the trait). A type you do not own
//!   (`bytes::Bytes`, a client library's response) passes every layer as
//!   [`Finished<T>`](crate::Finished): wrap it under the layers with `map_response`.
//!   `http::Response<B>` and the chat types implement `OnFinish` already.
//! - **Your request** needs `RequestInfo` (all of whose methods have defaults) for the layers
//!   that key by model or respect deadlines, and a [`CostOf`](crate::CostOf) for the token
//!   bucket.
//!
//! [`LlmError`](crate::LlmError) and the chat types implement all of them.
//!
//! The table itself is [`ErrorKind::classification`] (a kind's row) and
//! [`ErrorKind::from_wire`] (an HTTP status and a provider's error `type` / `code` to a kind):
//! the only two places that decide what an upstream outcome means.

use std::time::Duration;

use crate::hints::RateLimitHints;
use crate::kind::ErrorKind;
use crate::response::Usage;

/// Whether a failure may move to another provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failover {
    /// Never fail over (the request itself is wrong: another provider would refuse it too).
    Never,
    /// Fail over to the next entry.
    Eligible,
    /// Fail over only to an entry declared as having a larger context window.
    LargerContext,
}

/// What one outcome means to each layer: one row of the classification table
/// ([`ErrorKind::classification`]; the README's "classification table" section shows it whole).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Classification {
    /// Retry the same provider.
    pub retry: bool,
    /// Count as a circuit-breaker failure.
    pub breaker_failure: bool,
    /// Whether and where a fallback layer may fail over.
    pub failover: Failover,
    /// The provider's hint of how long to wait before trying again.
    pub retry_after: Option<Duration>,
    /// The provider rate-limited this key: a token bucket pauses the key.
    pub rate_limited: bool,
}

impl Classification {
    /// How an HTTP response of this status classifies, by the one table
    /// ([`ErrorKind::from_wire`] then [`ErrorKind::classification`]), with the `Retry-After` of
    /// its headers: `None` below 400 (a success), `Some` row for every error status.
    ///
    /// ```
    /// use http::{HeaderMap, HeaderValue, StatusCode};
    /// use portcullis_core::Classification;
    ///
    /// let mut headers = HeaderMap::new();
    /// assert!(Classification::of_http(StatusCode::OK, &headers).is_none());
    /// assert!(Classification::of_http(StatusCode::SERVICE_UNAVAILABLE, &headers).unwrap().breaker_failure);
    /// headers.insert("retry-after", HeaderValue::from_static("7"));
    /// let limited = Classification::of_http(StatusCode::TOO_MANY_REQUESTS, &headers).unwrap();
    /// assert!(limited.rate_limited && limited.retry);
    /// assert_eq!(limited.retry_after, Some(std::time::Duration::from_secs(7)));
    /// ```
    pub fn of_http(status: http::StatusCode, headers: &http::HeaderMap) -> Option<Classification> {
        if status.as_u16() < 400 {
            return None;
        }
        let kind = ErrorKind::from_wire(Some(status.as_u16()), None, None);
        let hints = RateLimitHints::from_headers(headers);
        Some(kind.classification_with(hints.retry_after, hints.should_retry))
    }

    /// A permanent failure: no retry, no breaker failure, no failover.
    pub const PERMANENT: Classification = Classification {
        retry: false,
        breaker_failure: false,
        failover: Failover::Never,
        retry_after: None,
        rate_limited: false,
    };

    /// A transient upstream failure: retry, breaker failure, failover.
    pub const TRANSIENT: Classification = Classification {
        retry: true,
        breaker_failure: true,
        failover: Failover::Eligible,
        retry_after: None,
        rate_limited: false,
    };

    /// A local refusal (circuit open, throttled): no retry here, never a breaker failure, but
    /// another provider may serve it.
    pub const REFUSED_LOCALLY: Classification = Classification {
        retry: false,
        breaker_failure: false,
        failover: Failover::Eligible,
        retry_after: None,
        rate_limited: false,
    };
}

/// Classifies an error for the layers. Implemented by [`LlmError`](crate::LlmError), by the
/// layers' own [`Refusal`](crate::Refusal), and by [`BoxError`](crate::BoxError) (which
/// downcasts to those).
///
/// A user's own error plugs in with this and one `From<Refusal>`:
///
/// ```
/// use portcullis_core::{Classification, Classify, Refusal};
///
/// #[derive(Debug)]
/// enum JobError {
///     Busy,
///     BadInput,
///     Refused(Refusal),
/// }
///
/// impl Classify for JobError {
///     fn classify(&self) -> Classification {
///         match self {
///             JobError::Busy => Classification::TRANSIENT,
///             JobError::BadInput => Classification::PERMANENT,
///             JobError::Refused(r) => r.classify(),
///         }
///     }
/// }
///
/// impl From<Refusal> for JobError {
///     fn from(r: Refusal) -> Self {
///         JobError::Refused(r)
///     }
/// }
///
/// assert!(JobError::Busy.classify().breaker_failure);
/// ```
pub trait Classify {
    /// This outcome's row of the classification table.
    fn classify(&self) -> Classification;

    /// The provider that produced the error, for logs (`None` when unknown).
    fn provider(&self) -> Option<&str> {
        None
    }

    /// The provider's rate-limit headers that came with the error, if any (a token bucket
    /// pauses or clamps its key by them).
    fn rate_limits(&self) -> Option<&RateLimitHints> {
        None
    }

    /// Called by a retry layer when it gives up and returns this (its last) error: it made
    /// `attempts` attempts and stopped for `stop`. [`LlmError`](crate::LlmError) records both;
    /// the default returns the error unchanged.
    fn retries_exhausted(self, attempts: u32, stop: crate::RetryStop) -> Self
    where
        Self: Sized,
    {
        let _ = (attempts, stop);
        self
    }
}

/// How a response ended, as seen by a hook registered with [`OnFinish`].
#[derive(Debug, Clone, PartialEq)]
pub enum Finish {
    /// It ended normally, with the usage it reported (if any).
    Completed {
        /// The final usage.
        usage: Option<Usage>,
    },
    /// A stream failed after its commit point.
    Failed {
        /// The usage seen before the failure.
        usage: Option<Usage>,
        /// How the failure classifies.
        class: Classification,
    },
    /// The caller dropped it before the end.
    Cancelled {
        /// The usage seen before it was dropped.
        usage: Option<Usage>,
    },
}

impl Finish {
    /// The usage reported, if any.
    pub fn usage(&self) -> Option<Usage> {
        match self {
            Finish::Completed { usage }
            | Finish::Failed { usage, .. }
            | Finish::Cancelled { usage } => *usage,
        }
    }
}

/// A response that can say when it is over.
///
/// A complete response is over at once: `on_finish` calls the hook immediately. A stream is over
/// when it ends, fails, or is dropped: the hook runs then, exactly once.
///
/// A response type of your own implements it in a few lines:
///
/// ```
/// use portcullis_core::{Finish, OnFinish};
///
/// struct Report(String);
///
/// impl OnFinish for Report {
///     fn on_finish<F: FnOnce(&Finish) + Send + 'static>(&mut self, f: F) {
///         f(&Finish::Completed { usage: None }) // over at once, no token usage
///     }
/// }
/// ```
///
/// A type you do not own passes as [`Finished<T>`](crate::Finished).
pub trait OnFinish {
    /// Runs `f` once, when this response is over.
    fn on_finish<F>(&mut self, f: F)
    where
        F: FnOnce(&Finish) + Send + 'static;

    /// Whether the outcome is only known later (a stream). Defaults to `false`.
    fn is_streaming(&self) -> bool {
        false
    }

    /// The provider's rate-limit headers that came with the response, if any (a token bucket
    /// learns and clamps its levels by them).
    fn rate_limits(&self) -> Option<&RateLimitHints> {
        None
    }

    /// The failure this response stands for, if it is one: an `Ok` HTTP 503 is the 503 error in
    /// all but name. Every layer reads it as it reads [`Classify::classify`] of an error: the
    /// breaker counts it, the retry retries it (after its `retry_after`), a fallback fails over
    /// on it, a token bucket pauses on a `rate_limited` one. What the layers cannot do is turn it
    /// into an error: when nothing is left to try, the response itself is returned.
    ///
    /// `None`, the default, is a success. `http::Response<B>` classifies by its status with the
    /// one table ([`Classification::of_http`]); [`Finished::classified`] carries a
    /// classification you compute for a type you do not own.
    fn failure(&self) -> Option<Classification> {
        None
    }
}

impl<B> OnFinish for http::Response<B> {
    fn on_finish<F>(&mut self, f: F)
    where
        F: FnOnce(&Finish) + Send + 'static,
    {
        f(&Finish::Completed { usage: None })
    }

    fn failure(&self) -> Option<Classification> {
        Classification::of_http(self.status(), self.headers())
    }
}

/// A response of a type that does not implement [`OnFinish`] (one you do not own, such as
/// `bytes::Bytes` or a client library's response), made to pass every layer: it is over as soon
/// as it arrives, with no usage.
///
/// Wrap it under the layers and unwrap it above them:
///
/// ```
/// use portcullis_core::{BoxError, Finished};
/// use tower::{ServiceBuilder, ServiceExt};
///
/// # async fn run() -> Result<(), BoxError> {
/// let bytes_service = tower::service_fn(|_: String| async { Ok::<_, BoxError>(bytes::Bytes::from("ok")) });
/// let svc = ServiceBuilder::new()
///     .map_response(Finished::into_inner) // above the layers: the plain value again
///     // .layer(circuit_breaker) .layer(token_bucket) …
///     .map_response(Finished::new) // under the layers: a response they can watch
///     .service(bytes_service);
/// assert_eq!(svc.oneshot("hi".to_owned()).await?, "ok");
/// # Ok(()) }
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(run()).unwrap();
/// ```
///
/// A response that can stand for a failure (a client library's response with a status) says so
/// with [`Finished::classified`], by the same table as errors:
///
/// ```
/// use portcullis_core::{ErrorKind, Finished, OnFinish};
///
/// struct JobReply { code: u16 }
///
/// let wrap = |r: JobReply| {
///     let class = (r.code >= 500).then(|| ErrorKind::Server.classification());
///     Finished::classified(r, class)
/// };
/// assert!(wrap(JobReply { code: 503 }).failure().unwrap().breaker_failure);
/// assert!(wrap(JobReply { code: 200 }).failure().is_none());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Finished<T> {
    inner: T,
    failure: Option<Classification>,
}

impl<T> Finished<T> {
    /// Wraps a response that is a success.
    pub fn new(inner: T) -> Self {
        Finished {
            inner,
            failure: None,
        }
    }

    /// Wraps a response that stands for the failure `failure` (`None`: a success); the layers
    /// read it through [`OnFinish::failure`].
    pub fn classified(inner: T, failure: Option<Classification>) -> Self {
        Finished { inner, failure }
    }

    /// The response.
    pub fn into_inner(self) -> T {
        self.inner
    }

    /// The response, borrowed.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T> OnFinish for Finished<T> {
    fn on_finish<F>(&mut self, f: F)
    where
        F: FnOnce(&Finish) + Send + 'static,
    {
        f(&Finish::Completed { usage: None })
    }

    fn failure(&self) -> Option<Classification> {
        self.failure
    }
}

/// What a layer may read from (or set on) a request: its model, for logs and keys, and the
/// overall deadline that every sleeping layer respects.
///
/// [`ChatRequest`](crate::ChatRequest) implements it; `http::Request<B>` keeps the deadline in
/// its extensions; plain types used in tests (`String`, `&str`, integers, `()`) carry nothing.
pub trait RequestInfo {
    /// The model asked for, if the request names one.
    fn model(&self) -> Option<&str> {
        None
    }
    /// When the whole call must be over.
    fn deadline(&self) -> Option<tokio::time::Instant> {
        None
    }
    /// Records the deadline so that inner layers see it. Types that cannot carry one ignore it;
    /// the deadline layer still enforces it around them.
    fn set_deadline(&mut self, _at: tokio::time::Instant) {}
    /// A per-attempt timeout this request asks for, overriding the timeout layer's own.
    fn attempt_timeout(&self) -> Option<std::time::Duration> {
        None
    }
}

/// A request that a retry or fallback layer can send again: each attempt gets its own copy.
///
/// `ChatRequest` and plain values are cloned; `http::Request<B>` is copied (method, URI,
/// version, headers, extensions and body) when its body is `Clone`. A request that cannot be
/// copied returns `None` and is sent once: the retry layer returns its outcome as it is, and
/// fallback tries no other entry. Your own `Clone` request type implements it in one line:
///
/// ```
/// use portcullis_core::{Replay, RequestInfo};
///
/// #[derive(Clone)]
/// struct Job(u32);
///
/// impl RequestInfo for Job {}
/// impl Replay for Job {
///     fn replay(&self) -> Option<Self> {
///         Some(self.clone())
///     }
/// }
/// ```
pub trait Replay: Sized {
    /// A copy to send, or `None` if this request can be sent only once.
    fn replay(&self) -> Option<Self>;
}

impl Replay for crate::ChatRequest {
    fn replay(&self) -> Option<Self> {
        Some(self.clone())
    }
}

impl<B: Clone> Replay for http::Request<B> {
    fn replay(&self) -> Option<Self> {
        let mut copy = http::Request::new(self.body().clone());
        *copy.method_mut() = self.method().clone();
        *copy.uri_mut() = self.uri().clone();
        *copy.version_mut() = self.version();
        *copy.headers_mut() = self.headers().clone();
        *copy.extensions_mut() = self.extensions().clone();
        Some(copy)
    }
}

/// Plain values (what mocks and tests answer, or ask with) carry no usage, no rate-limit
/// headers, no model and no deadline: a response is over at once.
macro_rules! plain_values {
    ($($t:ty),*) => {$(
        impl OnFinish for $t {
            fn on_finish<F>(&mut self, f: F)
            where
                F: FnOnce(&Finish) + Send + 'static,
            {
                f(&Finish::Completed { usage: None })
            }
        }
        impl RequestInfo for $t {}
        impl Replay for $t {
            fn replay(&self) -> Option<Self> {
                Some(self.clone())
            }
        }
    )*};
}
plain_values!(
    (),
    String,
    &'static str,
    u8,
    u16,
    u32,
    u64,
    usize,
    i32,
    i64,
    bool
);

/// The deadline of an `http::Request`, kept in its extensions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DeadlineExt(tokio::time::Instant);

impl<B> RequestInfo for http::Request<B> {
    fn deadline(&self) -> Option<tokio::time::Instant> {
        self.extensions().get::<DeadlineExt>().map(|d| d.0)
    }
    fn set_deadline(&mut self, at: tokio::time::Instant) {
        self.extensions_mut().insert(DeadlineExt(at));
    }
}

impl RequestInfo for crate::ChatRequest {
    fn model(&self) -> Option<&str> {
        Some(&self.model)
    }
    fn deadline(&self) -> Option<tokio::time::Instant> {
        self.deadline
    }
    fn set_deadline(&mut self, at: tokio::time::Instant) {
        self.deadline = Some(match self.deadline {
            Some(existing) if existing < at => existing,
            _ => at,
        });
    }
    fn attempt_timeout(&self) -> Option<std::time::Duration> {
        self.options.timeout
    }
}

// ---- the table --------------------------------------------------------------------------

impl ErrorKind {
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
    /// | CircuitOpen, Throttled, Unsupported | no | no | yes | no |
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
            CircuitOpen | Throttled | Unsupported => Classification::REFUSED_LOCALLY,
        }
    }

    /// This kind's row with what the server said of it: its `retry-after` hint, and its
    /// `x-should-retry` verdict, which overrides the "retry same provider" column (the server
    /// knows best whether the same request can succeed) and nothing else.
    pub const fn classification_with(
        self,
        retry_after: Option<Duration>,
        should_retry: Option<bool>,
    ) -> Classification {
        let mut c = self.classification();
        c.retry_after = retry_after;
        if let Some(retry) = should_retry {
            c.retry = retry && !matches!(self, ErrorKind::StreamInterrupted);
        }
        c
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
            // Azure OpenAI's content filter (400 `code: content_filter`, or the same error as
            // a stream event): the same request is refused again anywhere it is sent.
            Some(
                "invalid_request_error"
                | "invalid_request"
                | "unsupported_parameter"
                | "content_filter",
            ) => ErrorKind::InvalidRequest,
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
    fn content_filter_is_an_invalid_request_even_inside_a_stream() {
        for status in [Some(400), None] {
            let kind = ErrorKind::from_wire(status, None, Some("content_filter"));
            assert_eq!(kind, ErrorKind::InvalidRequest, "{status:?}");
            let c = kind.classification();
            assert!(!c.retry && !c.breaker_failure);
            assert_eq!(c.failover, Failover::Never);
        }
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
}
