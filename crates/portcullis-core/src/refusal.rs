//! The layers' own refusals, as small marker types ([`CircuitOpen`], [`Throttled`],
//! [`OverCapacity`], [`DeadlineExceeded`], [`AttemptTimedOut`]), and what a retry layer returns
//! when it gives up ([`RetriesExhausted`], [`RetryStop`]).

use std::borrow::Cow;
use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use crate::classify::{Classification, Classify, RateLimitInfo};
use crate::error::{BoxError, LlmError};
use crate::hints::RateLimitHints;
use crate::kind::ErrorKind;

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
                let err = LlmError::new($kind, e.message());
                match e.hint() {
                    Some(after) => err.with_retry_after(after),
                    None => err,
                }
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
        e.last.with_retry_stop(e.attempts, e.stop)
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
