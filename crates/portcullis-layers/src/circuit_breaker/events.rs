//! What the breakers report: the [`CircuitState`] of a key, each [`Transition`] and its
//! [`TransitionReason`], and [`CircuitMetrics`] snapshots.

use std::fmt;
use std::sync::Arc;

use tokio::time::Instant;

/// The state of one key's breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CircuitState {
    /// Calls flow; outcomes are judged by the trip policy.
    Closed,
    /// Calls are refused with [`CircuitOpen`](portcullis_core::CircuitOpen).
    Open,
    /// A limited number of probes may pass; their outcomes close or reopen the breaker.
    HalfOpen,
}

impl CircuitState {
    /// `closed`, `open` or `half_open`.
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a breaker changed state.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub enum TransitionReason {
    /// `count` failures in a row (CLOSED → OPEN).
    ConsecutiveFailures {
        /// Failures in a row.
        count: u32,
    },
    /// The window's failure rate reached the threshold (CLOSED → OPEN).
    FailureRate {
        /// The rate measured.
        rate: f64,
        /// Outcomes in the window.
        calls: u32,
    },
    /// The window's slow-call rate reached the threshold (CLOSED → OPEN).
    SlowCallRate {
        /// The rate measured.
        rate: f64,
        /// Outcomes in the window.
        calls: u32,
    },
    /// The recovery timeout elapsed (OPEN → HALF_OPEN).
    RecoveryTimeout,
    /// A half-open probe failed, or was slow (HALF_OPEN → OPEN).
    ProbeFailed,
    /// Enough half-open probes succeeded (HALF_OPEN → CLOSED).
    ProbesSucceeded {
        /// Successful probes.
        count: u32,
    },
    /// [`CircuitBreakerHandle::force_open`](super::CircuitBreakerHandle::force_open).
    ForcedOpen,
    /// [`CircuitBreakerHandle::force_closed`](super::CircuitBreakerHandle::force_closed).
    ForcedClosed,
    /// [`CircuitBreakerHandle::reset`](super::CircuitBreakerHandle::reset).
    Reset,
}

impl fmt::Display for TransitionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TransitionReason::ConsecutiveFailures { count } => {
                write!(f, "{count} consecutive failures")
            }
            TransitionReason::FailureRate { rate, calls } => {
                write!(f, "failure rate {:.1}% over {calls} calls", rate * 100.0)
            }
            TransitionReason::SlowCallRate { rate, calls } => {
                write!(f, "slow-call rate {:.1}% over {calls} calls", rate * 100.0)
            }
            TransitionReason::RecoveryTimeout => f.write_str("recovery timeout elapsed"),
            TransitionReason::ProbeFailed => f.write_str("half-open probe failed"),
            TransitionReason::ProbesSucceeded { count } => {
                write!(f, "{count} half-open probes succeeded")
            }
            TransitionReason::ForcedOpen => f.write_str("forced open"),
            TransitionReason::ForcedClosed => f.write_str("forced closed"),
            TransitionReason::Reset => f.write_str("reset"),
        }
    }
}

/// One state change of one key's breaker. Exactly one is sent per transition.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition<K> {
    /// The breaker's name (its provider, e.g. `openai`).
    pub name: Arc<str>,
    /// The key (by default the model).
    pub key: K,
    /// The state left.
    pub from: CircuitState,
    /// The state entered.
    pub to: CircuitState,
    /// When it happened (`tokio::time`). OPEN → HALF_OPEN is evaluated lazily: its time is that
    /// of the first call or query after the recovery timeout.
    pub at: Instant,
    /// Why.
    pub reason: TransitionReason,
}

impl<K: fmt::Debug> fmt::Display for Transition<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "circuit {}:{:?} {} -> {} ({})",
            self.name, self.key, self.from, self.to, self.reason
        )
    }
}

/// A snapshot of one key's breaker. Counters run since the key's first call or last
/// [`reset`](super::CircuitBreakerHandle::reset).
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct CircuitMetrics {
    /// The current state.
    pub state: CircuitState,
    /// Calls admitted to the inner service.
    pub calls: u64,
    /// Successes that counted.
    pub successes: u64,
    /// Breaker failures that counted.
    pub failures: u64,
    /// Counted outcomes that were slow (only with a slow-call policy).
    pub slow_calls: u64,
    /// Calls refused with `CircuitOpen`.
    pub rejected: u64,
    /// Outcomes that did not count: errors that are not breaker failures (4xx, local
    /// refusals), cancellations, and late outcomes of calls admitted under an earlier state.
    pub ignored: u64,
    /// Calls admitted whose outcome is not known yet (each holds a permit; a stream until its
    /// end). Zero once every call has finished, been cancelled or dropped.
    pub in_flight: u64,
    /// Current run of failures in a row.
    pub consecutive_failures: u32,
}

impl CircuitMetrics {
    /// `failures / (successes + failures)`, or 0 before any counted outcome.
    pub fn failure_rate(&self) -> f64 {
        let n = self.successes + self.failures;
        if n == 0 {
            0.0
        } else {
            self.failures as f64 / n as f64
        }
    }
}
