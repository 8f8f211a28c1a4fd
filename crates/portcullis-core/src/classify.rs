//! The traits every layer is generic over, and the one classification table they all use.
//!
//! | trait | what it tells a layer |
//! |---|---|
//! | [`Classify`] | for an error: retry the same provider? a breaker failure? fail over? wait how long? |
//! | [`OnFinish`] | for a response: when it is really over (a stream ends later) and its usage |
//! | [`RateLimitInfo`] | for a response or an error: the provider's rate-limit headers |
//! | [`CostOf`](crate::CostOf) | for a request: its token cost (in [`tokens`](crate::tokens)) |
//!
//! [`LlmError`](crate::LlmError) and the chat types implement all of them. A user's own service
//! plugs in by implementing them for its own types.

use std::time::Duration;

use crate::hints::RateLimitHints;
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

/// What one outcome means to each layer: one row of DESIGN.md's classification table.
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
/// layers' own refusals, and by [`BoxError`](crate::BoxError) (which downcasts to those).
pub trait Classify {
    /// This outcome's row of the classification table.
    fn classify(&self) -> Classification;

    /// The provider that produced the error, for logs (`None` when unknown).
    fn provider(&self) -> Option<&str> {
        None
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
pub trait OnFinish {
    /// Runs `f` once, when this response is over.
    fn on_finish<F>(&mut self, f: F)
    where
        F: FnOnce(&Finish) + Send + 'static;

    /// Whether the outcome is only known later (a stream). Defaults to `false`.
    fn is_streaming(&self) -> bool {
        false
    }
}

impl<B> OnFinish for http::Response<B> {
    fn on_finish<F>(&mut self, f: F)
    where
        F: FnOnce(&Finish) + Send + 'static,
    {
        f(&Finish::Completed { usage: None })
    }
}

/// A response or error that carries the provider's rate-limit headers.
pub trait RateLimitInfo {
    /// The parsed headers, if any came with it.
    fn rate_limits(&self) -> Option<&RateLimitHints> {
        None
    }
}

impl<B> RateLimitInfo for http::Response<B> {}

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
        impl RateLimitInfo for $t {}
        impl RequestInfo for $t {}
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
