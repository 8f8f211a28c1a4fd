//! # portcullis-layers
//!
//! Tower layers that make calls to LLM APIs survive the real world. Each resilience concern is
//! its own [`tower_layer::Layer`]; they stack with `tower::ServiceBuilder` over any service
//! whose error implements [`Classify`](portcullis_core::Classify) and
//! `From<`[`Refusal`](portcullis_core::Refusal)`>`, and whose response implements
//! [`OnFinish`](portcullis_core::OnFinish) (or is wrapped in
//! [`Finished`](portcullis_core::Finished)).
//!
//! | layer | module |
//! |---|---|
//! | retry with jittered backoff, Retry-After and a budget | [`retry`] |
//! | circuit breaker, CLOSED / OPEN / HALF_OPEN | [`circuit_breaker`] |
//! | dual RPM + TPM token bucket | [`token_bucket`] |
//! | fallback across providers | [`fallback`] |
//! | attempt timeouts and deadlines | [`timeout`] |
//!
//! The breaker and the in-memory bucket keep one state per key (by default per model, which a
//! client may choose): both maps are bounded in size and drop idle keys, see [`keyed`].
//!
//! This crate does not depend on hyper: a non-LLM service can use the breaker alone.
#![forbid(unsafe_code)]

pub mod circuit_breaker;
pub mod fallback;
pub mod key;
pub mod keyed;
pub mod pool;
pub mod retry;
pub mod telemetry;
pub mod timeout;
pub mod token_bucket;

pub use key::{ByModel, KeyClosure, KeyFn, SingleKey};
pub use keyed::KeyBounds;

pub use circuit_breaker::{CircuitBreaker, CircuitBreakerLayer};
pub use fallback::{Entry, FailoverPolicy, Fallback, FallbackLayer};
pub use retry::{Retry, RetryLayer};
pub use timeout::{Deadline, DeadlineLayer, StreamIdleLayer, Timeout, TimeoutLayer};
pub use token_bucket::{TokenBucket, TokenBucketLayer};

/// Whether `deadline` has already passed (the clock is read only when there is one): such a
/// request fails with [`DeadlineExceeded`](portcullis_core::DeadlineExceeded) before any
/// upstream call or charge.
pub(crate) fn expired(deadline: Option<tokio::time::Instant>) -> bool {
    deadline.is_some_and(|d| d <= tokio::time::Instant::now())
}

/// `now + d`, saturating: a duration too large for the clock (`Duration::MAX`, from a
/// caller's timeout) means "no limit", the far future `now + MAX_DURATION` (tokio clamps timers
/// that far out itself). Never panics.
pub(crate) fn after(now: tokio::time::Instant, d: std::time::Duration) -> tokio::time::Instant {
    use portcullis_core::config::MAX_DURATION;
    now.checked_add(d.min(MAX_DURATION))
        .or_else(|| now.checked_add(MAX_DURATION))
        .unwrap_or(now)
}

/// A layer's refusal as the service's error: every layer asks only `E: From<Refusal>`.
pub(crate) fn refuse<E: From<portcullis_core::Refusal>>(
    r: impl Into<portcullis_core::Refusal>,
) -> E {
    E::from(r.into())
}
