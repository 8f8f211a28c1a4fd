//! The one decision a fallback makes before every attempt, kept apart so that anything that
//! routes between services (a pool of deployments of one model, too) makes it the same way:
//! **take the best entry that can take the call now; if none can, the one that can soonest.**

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// An entry's answer to "how long until you could take this call?": [`Duration::ZERO`] when it
/// can now. Built from the entry's own layers, and reading them only (nothing is reserved or
/// counted): [`CircuitBreakerHandle::availability`](crate::circuit_breaker::CircuitBreakerHandle::availability)
/// (zero unless OPEN, or HALF_OPEN with every probe slot taken) and
/// [`TokenBucketHandle::availability`](crate::token_bucket::TokenBucketHandle::availability)
/// (zero unless paused by a provider's 429, or queued beyond its `max_wait`); the later of the
/// two when an entry has both.
///
/// A gate sees the caller's request, before the entry's remap: a gate of an entry that remaps
/// the model asks its layers about the model it sends.
pub type Gate<Req> = Arc<dyn Fn(&Req) -> Duration + Send + Sync>;

/// What [`choose`] picked: the candidate and how long it would wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Choice {
    /// The candidate's index, as the caller numbered it.
    pub index: usize,
    /// How long until it can take the call (zero: now).
    pub wait: Duration,
}

impl Choice {
    /// Whether the candidate can take the call now.
    pub fn is_now(&self) -> bool {
        self.wait.is_zero()
    }
}

/// The chooser: the first candidate, in the caller's order of preference, that can take the
/// call now; if none can, the one that can soonest (the first of them on a tie). `None` when
/// there is no candidate.
///
/// `candidates` are `(index, wait)` pairs, best first; a candidate that can take the call now
/// (a zero wait) ends the search, so the rest are never asked. A
/// [`Fallback`](super::Fallback) passes its entries in priority order (primary first), each
/// with the later of its [`Gate`] and its own backoff; a pool passes its deployments ordered
/// by headroom. The caller decides what to do with a wait: a fallback sleeps only on a
/// backoff, and otherwise calls the chosen entry and lets its own layers wait or refuse.
///
/// ```
/// use std::time::Duration;
/// use portcullis_layers::fallback::choose;
///
/// let s = Duration::from_secs;
/// // The primary is paused for 20 s by a 429; the second entry can take the call now.
/// let pick = choose([(0, s(20)), (1, s(0)), (2, s(0))]).unwrap();
/// assert_eq!((pick.index, pick.is_now()), (1, true));
/// // Nobody can take it now: the one that can soonest.
/// let pick = choose([(0, s(20)), (1, s(3)), (2, s(3))]).unwrap();
/// assert_eq!((pick.index, pick.wait), (1, s(3)));
/// assert!(choose([]).is_none());
/// ```
pub fn choose<I>(candidates: I) -> Option<Choice>
where
    I: IntoIterator<Item = (usize, Duration)>,
{
    let mut best: Option<Choice> = None;
    for (index, wait) in candidates {
        if wait.is_zero() {
            return Some(Choice { index, wait });
        }
        if best.is_none_or(|b| wait < b.wait) {
            best = Some(Choice { index, wait });
        }
    }
    best
}

/// In which order a [`Fallback`](super::Fallback) spends its attempts after a failure that
/// allows a fallback (the classification table's "fall back" column).
///
/// | | after a failure | sleeps |
/// |---|---|---|
/// | [`FailoverFirst`](Self::FailoverFirst) (default) | the next entry that can take the call **now**, at once | only when no entry can: until the earliest entry's backoff or `Retry-After` ends; then entries in order again |
/// | [`RetryEachThenFallback`](Self::RetryEachThenFallback) | the same entry again, after its backoff, until its retry policy gives up; then the next entry | on every retry of an entry (LiteLLM's order) |
///
/// In serde form: `"failover_first"` or `"retry_each_then_fallback"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailoverPolicy {
    /// Fail over at once to an entry that can take the call now; back off only when none can.
    #[default]
    FailoverFirst,
    /// Retry each entry by its policy, then fall back to the next.
    RetryEachThenFallback,
}

impl fmt::Display for FailoverPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailoverPolicy::FailoverFirst => "failover_first",
            FailoverPolicy::RetryEachThenFallback => "retry_each_then_fallback",
        })
    }
}
