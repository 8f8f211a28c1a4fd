//! The layers' own refusals: one type, [`Refusal`], over small marker types ([`CircuitOpen`],
//! [`Throttled`], [`OverCapacity`], [`DeadlineExceeded`], [`AttemptTimedOut`]); and what a retry
//! layer returns when it gives up ([`RetriesExhausted`], [`RetryStop`]).

use std::borrow::Cow;
use std::error::Error as StdError;
use std::fmt;
use std::time::Duration;

use crate::classify::{Classification, Classify};
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

/// A marker refusal: its fields, its kind, its wait hint, its static message (so that a refusal
/// on the hot path allocates only the error's box) and its `Display`.
macro_rules! marker_error {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $f:ident : $t:ty),* } => $kind:expr,
     hint: |$s:ident| $hint:expr, message: $msg:expr, $fmt:literal $(, $arg:ident)*) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name { $($(#[$fm])* pub $f: $t),* }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, $fmt $(, self.$arg)*)
            }
        }

        impl StdError for $name {}

        impl RefusalInfo for $name {
            #[allow(unused_variables)]
            fn hint(&self) -> Option<Duration> {
                let $s = self;
                $hint
            }
            #[allow(unused_variables)]
            fn message(&self) -> Cow<'static, str> {
                let $s = self;
                $msg
            }
            fn kind(&self) -> ErrorKind {
                $kind
            }
        }

        impl Classify for $name {
            fn classify(&self) -> Classification {
                Classification {
                    retry_after: self.hint(),
                    ..self.kind().classification()
                }
            }
        }

        impl From<$name> for LlmError {
            fn from(e: $name) -> LlmError {
                let err = LlmError::new($kind, e.message());
                match e.hint() {
                    Some(after) => err.with_retry_after(after),
                    None => err,
                }
            }
        }
    };
}

/// What every marker refusal tells: its wait hint, its message and its kind.
trait RefusalInfo: fmt::Display + Classify {
    fn hint(&self) -> Option<Duration>;
    fn message(&self) -> Cow<'static, str>;
    fn kind(&self) -> ErrorKind;
}

marker_error!(
    /// The circuit breaker is open: the call was refused without reaching the provider.
    CircuitOpen {
        /// How long until the breaker lets a probe through.
        retry_after: Duration
    } => ErrorKind::CircuitOpen, hint: |r| Some(r.retry_after),
    message: Cow::Borrowed("circuit open"), "circuit open; retry in {:?}", retry_after
);
marker_error!(
    /// The token bucket would make the call wait longer than allowed (`max_wait` or the deadline).
    Throttled {
        /// When the call could have been admitted.
        retry_after: Duration
    } => ErrorKind::Throttled, hint: |r| Some(r.retry_after),
    message: Cow::Borrowed("throttled by the local rate limiter"),
    "throttled by the local rate limiter; admission in {:?}", retry_after
);
marker_error!(
    /// The request costs more tokens or requests than the bucket can ever hold.
    OverCapacity {
        /// The request's cost.
        cost: u64,
        /// The bucket's capacity.
        capacity: u64
    } => ErrorKind::Throttled, hint: |r| None, message: Cow::Owned(r.to_string()),
    "request cost {} exceeds the bucket capacity {}", cost, capacity
);
marker_error!(
    /// The overall deadline passed before the call could finish.
    DeadlineExceeded {} => ErrorKind::DeadlineExceeded, hint: |r| None,
    message: Cow::Borrowed("deadline exceeded"), "deadline exceeded"
);
marker_error!(
    /// One attempt took longer than its timeout.
    AttemptTimedOut {
        /// The timeout that elapsed.
        after: Duration
    } => ErrorKind::Timeout, hint: |r| None, message: Cow::Borrowed("attempt timed out"),
    "attempt timed out after {:?}", after
);

/// Every refusal a layer makes, in one type: a user's error needs one `From<Refusal>` to pass
/// every layer (and `Classify`). Nothing here reached the provider.
///
/// [`LlmError`] converts it to the matching [`ErrorKind`] with its `retry_after`;
/// [`BoxError`] boxes it (downcast to `Refusal` to match on it).
///
/// ```
/// use std::time::Duration;
/// use portcullis_core::{CircuitOpen, ErrorKind, LlmError, Refusal};
///
/// let r = Refusal::from(CircuitOpen { retry_after: Duration::from_secs(3) });
/// assert_eq!(r.retry_after(), Some(Duration::from_secs(3)));
/// let e = LlmError::from(r);
/// assert_eq!(e.kind(), ErrorKind::CircuitOpen);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refusal {
    /// The circuit breaker is open.
    CircuitOpen(CircuitOpen),
    /// The token bucket would wait too long.
    Throttled(Throttled),
    /// The request costs more than the token bucket can ever hold.
    OverCapacity(OverCapacity),
    /// The overall deadline passed.
    DeadlineExceeded(DeadlineExceeded),
    /// One attempt took longer than its timeout.
    AttemptTimedOut(AttemptTimedOut),
}

macro_rules! refusal_variants {
    ($($v:ident),*) => {
        $(impl From<$v> for Refusal {
            fn from(r: $v) -> Refusal {
                Refusal::$v(r)
            }
        })*

        impl Refusal {
            fn inner(&self) -> &(dyn RefusalInfo + Send + Sync) {
                match self {
                    $(Refusal::$v(r) => r),*
                }
            }
        }

        impl From<Refusal> for LlmError {
            fn from(r: Refusal) -> LlmError {
                match r {
                    $(Refusal::$v(r) => r.into()),*
                }
            }
        }
    };
}
refusal_variants!(
    CircuitOpen,
    Throttled,
    OverCapacity,
    DeadlineExceeded,
    AttemptTimedOut
);

impl Refusal {
    /// When the call could be tried again, where the layer knows it.
    pub fn retry_after(&self) -> Option<Duration> {
        self.inner().hint()
    }

    /// The matching kind of [`LlmError`].
    pub fn kind(&self) -> ErrorKind {
        self.inner().kind()
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self.inner(), f)
    }
}

impl StdError for Refusal {}

impl Classify for Refusal {
    fn classify(&self) -> Classification {
        self.inner().classify()
    }
}

/// A retry layer gave up: it made `attempts` attempts and returns the `last` error, saying why
/// it stopped.
///
/// The retry layer hands its last error to [`Classify::retries_exhausted`]: [`LlmError`] keeps
/// the last error's kind (so an outer fallback still sees an `Overloaded`) and records the
/// attempts and the reason; [`BoxError`] wraps it in this type.
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
        if let Some(e) = self.downcast_ref::<Refusal>() {
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

    fn rate_limits(&self) -> Option<&RateLimitHints> {
        self.downcast_ref::<LlmError>()
            .and_then(|e| e.rate_limits())
    }

    /// Wraps the last error in a [`RetriesExhausted`], which says how many attempts were made.
    fn retries_exhausted(self, attempts: u32, stop: RetryStop) -> Self {
        Box::new(RetriesExhausted {
            attempts,
            stop,
            last: self,
        })
    }
}
