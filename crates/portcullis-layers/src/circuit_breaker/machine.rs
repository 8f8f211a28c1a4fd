//! One key's state machine, apart from its locking: [`Machine::step`] takes the state, an
//! [`Input`] and the time as a value, and returns the [`Step`] it made: the transition to send,
//! if any, and the [`Verdict`] (the admission decision, or how to count an outcome).
//!
//! It reads no clock, takes no lock and sends nothing; `state.rs` runs it under the key's
//! mutex and applies its step in one place. The state is updated in place rather than returned
//! by value, so that its windows are never copied.

use std::time::Duration;

use tokio::time::Instant;

use super::config::{CircuitBreakerConfig, TripPolicy};
use super::events::{CircuitState, TransitionReason};
use super::window::Recorder;

/// What happens to a breaker.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Input {
    /// A call asks to be admitted. Also hands on the slot of a probe whose permit expired.
    Admit,
    /// An admitted call ended.
    Complete(Permit, Outcome),
    /// Time passes: a query of the state or the metrics.
    Observe,
    /// Would a call be admitted now? Like [`Input::Observe`], it only moves time on: nothing is
    /// taken or counted.
    Peek,
    /// Open until forced closed or reset.
    ForceOpen,
    /// Close, clearing the windows.
    ForceClosed,
    /// Close, clearing the windows and the counters; calls in flight no longer count.
    Reset,
}

/// How a call ended, as the breaker counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    Failure,
    /// Not a breaker failure, or cancelled.
    Ignored,
}

/// A call's claim on its key: the generation it was admitted under, and its half-open probe
/// slot if it is a probe.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Permit {
    pub(crate) generation: u64,
    pub(crate) probe: Option<Probe>,
    /// When it was admitted; only set under a slow-call policy.
    pub(crate) admitted: Option<Instant>,
}

/// A half-open probe's slot, and the ticket that says it still holds it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Probe {
    slot: usize,
    ticket: u64,
}

/// What the caller applies for an input, besides the transition.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Verdict {
    /// Admitted: count a call.
    Admitted(Permit),
    /// Refused, for this long at least: count a rejection.
    Rejected(Duration),
    /// An outcome that does not count (ignored, or of an earlier generation or expired probe).
    Ignored,
    /// An outcome that counted.
    Counted {
        /// A breaker failure (otherwise a success).
        failure: bool,
        /// It took at least the slow-call threshold.
        slow: bool,
    },
    /// The state seen by [`Input::Observe`].
    Observed {
        /// The state.
        state: CircuitState,
        /// The current run of failures in a row.
        consecutive_failures: u32,
    },
    /// [`Input::Peek`]: `None` if a call would be admitted now, else how long until one may be.
    Peeked(Option<Duration>),
    /// [`Input::Reset`]: zero the counters.
    Reset,
    /// Nothing to count ([`Input::ForceOpen`], [`Input::ForceClosed`]).
    Done,
}

/// A state change, which the caller sends exactly once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Change {
    pub(crate) from: CircuitState,
    pub(crate) to: CircuitState,
    pub(crate) reason: TransitionReason,
}

/// What one input did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Step {
    /// At most one transition per input.
    pub(crate) change: Option<Change>,
    pub(crate) verdict: Verdict,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Closed,
    /// `until: None` when forced open.
    Open {
        until: Option<Instant>,
    },
    HalfOpen {
        successes: u32,
    },
}

impl Phase {
    fn state(self) -> CircuitState {
        match self {
            Phase::Closed => CircuitState::Closed,
            Phase::Open { .. } => CircuitState::Open,
            Phase::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    ticket: u64,
    since: Option<Instant>,
}

/// One key's breaker state. Allocated once (its windows and probe slots); nothing after.
#[derive(Debug)]
pub(crate) struct Machine {
    phase: Phase,
    /// Bumped on every transition (and reset): outcomes of older admissions are ignored.
    generation: u64,
    /// Consecutive trips without closing in between, for the open backoff.
    trips: u32,
    consecutive_failures: u32,
    failure_window: Option<Recorder>,
    slow_window: Option<Recorder>,
    probes: Box<[Slot]>,
    next_ticket: u64,
}

impl Machine {
    /// A CLOSED breaker of generation 0.
    pub(crate) fn new(config: &CircuitBreakerConfig, now: Instant) -> Self {
        let failure_window = match &config.trip {
            TripPolicy::FailureRate { window, .. } => Some(Recorder::new(*window, now)),
            TripPolicy::ConsecutiveFailures { .. } => None,
        };
        Machine {
            phase: Phase::Closed,
            generation: 0,
            trips: 0,
            consecutive_failures: 0,
            failure_window,
            slow_window: config
                .slow_calls
                .as_ref()
                .map(|s| Recorder::new(s.window, now)),
            probes: vec![Slot::default(); config.half_open_probes as usize].into_boxed_slice(),
            next_ticket: 0,
        }
    }

    /// The generation while CLOSED with no failure pending. Under a consecutive-failures policy
    /// without a slow-call policy, admitting a call or recording a success of this generation
    /// (not a probe) changes nothing, which lets the caller do both without the machine.
    pub(crate) fn quiet(&self) -> Option<u64> {
        (matches!(self.phase, Phase::Closed) && self.consecutive_failures == 0)
            .then_some(self.generation)
    }

    /// Whether it is as a new breaker at `now`: CLOSED, no failure in a row, and no failure or
    /// slow call in its windows.
    pub(crate) fn is_neutral(&self, now: Instant) -> bool {
        let clean = |w: &Option<Recorder>| {
            w.as_ref().is_none_or(|w| {
                let t = w.totals(now);
                t.failures == 0 && t.slow == 0
            })
        };
        matches!(self.phase, Phase::Closed)
            && self.consecutive_failures == 0
            && clean(&self.failure_window)
            && clean(&self.slow_window)
    }

    /// Runs one input at `now`.
    #[inline]
    pub(crate) fn step(
        &mut self,
        config: &CircuitBreakerConfig,
        input: Input,
        now: Instant,
    ) -> Step {
        use TransitionReason::{ForcedClosed, ForcedOpen, Reset};
        let (change, verdict) = match input {
            Input::Admit => (self.recover(now), self.admit(config, now)),
            Input::Observe => (
                self.recover(now),
                Verdict::Observed {
                    state: self.phase.state(),
                    consecutive_failures: self.consecutive_failures,
                },
            ),
            Input::Peek => {
                let change = self.recover(now);
                (change, Verdict::Peeked(self.vacancy(config, now).err()))
            }
            Input::Complete(permit, outcome) => self.complete(config, permit, outcome, now),
            Input::ForceOpen => {
                let change = match self.phase {
                    Phase::Open { .. } => None,
                    _ => Some(self.transition(Phase::Open { until: None }, ForcedOpen)),
                };
                // An open breaker stays open, with no recovery timeout.
                self.phase = Phase::Open { until: None };
                (change, Verdict::Done)
            }
            Input::ForceClosed => match self.phase {
                Phase::Closed => (None, Verdict::Done),
                _ => (Some(self.close(ForcedClosed)), Verdict::Done),
            },
            Input::Reset => match self.phase {
                Phase::Closed => {
                    self.clear();
                    self.generation += 1;
                    (None, Verdict::Reset)
                }
                _ => (Some(self.close(Reset)), Verdict::Reset),
            },
        };
        Step { change, verdict }
    }

    /// The OPEN → HALF_OPEN transition, evaluated lazily.
    fn recover(&mut self, now: Instant) -> Option<Change> {
        match self.phase {
            Phase::Open { until: Some(until) } if now >= until => Some(self.transition(
                Phase::HalfOpen { successes: 0 },
                TransitionReason::RecoveryTimeout,
            )),
            _ => None,
        }
    }

    /// Where a call would be admitted now: `Ok(None)` while CLOSED, `Ok(Some(slot))` for a free
    /// HALF_OPEN probe slot, else how long until one may be.
    fn vacancy(
        &self,
        config: &CircuitBreakerConfig,
        now: Instant,
    ) -> Result<Option<usize>, Duration> {
        match self.phase {
            Phase::Closed => Ok(None),
            Phase::Open { until } => Err(until.map_or(config.recovery_timeout, |u| {
                u.saturating_duration_since(now)
            })),
            Phase::HalfOpen { .. } => {
                let wait = config.max_probe_wait;
                let free = self
                    .probes
                    .iter()
                    .position(|s| s.since.is_none_or(|since| since + wait <= now));
                match free {
                    Some(slot) => Ok(Some(slot)),
                    // Every probe is in flight: refused until the oldest permit expires.
                    None => {
                        let oldest = self.probes.iter().filter_map(|s| s.since).min();
                        Err(oldest.map_or(Duration::ZERO, |oldest| {
                            (oldest + wait).saturating_duration_since(now)
                        }))
                    }
                }
            }
        }
    }

    fn admit(&mut self, config: &CircuitBreakerConfig, now: Instant) -> Verdict {
        let probe = match self.vacancy(config, now) {
            Err(retry_after) => return Verdict::Rejected(retry_after),
            Ok(None) => None,
            Ok(Some(slot)) => {
                let ticket = self.next_ticket;
                self.next_ticket += 1;
                self.probes[slot] = Slot {
                    ticket,
                    since: Some(now),
                };
                Some(Probe { slot, ticket })
            }
        };
        Verdict::Admitted(Permit {
            generation: self.generation,
            probe,
            admitted: config.slow_calls.is_some().then_some(now),
        })
    }

    fn complete(
        &mut self,
        config: &CircuitBreakerConfig,
        permit: Permit,
        outcome: Outcome,
        now: Instant,
    ) -> (Option<Change>, Verdict) {
        let current = permit.generation == self.generation
            && permit.probe.is_none_or(|p| {
                let slot = &mut self.probes[p.slot];
                // A probe whose permit expired and was handed on no longer counts.
                let holds = slot.ticket == p.ticket && slot.since.is_some();
                if holds {
                    slot.since = None;
                }
                holds
            });
        if !current || outcome == Outcome::Ignored {
            return (None, Verdict::Ignored);
        }
        let failure = outcome == Outcome::Failure;
        let slow = match (&config.slow_calls, permit.admitted) {
            (Some(s), Some(admitted)) => now.saturating_duration_since(admitted) >= s.threshold,
            _ => false,
        };
        let change = match self.phase {
            Phase::Closed => self
                .judge(config, failure, slow, now)
                .map(|reason| self.open(config, reason, now)),
            Phase::HalfOpen { .. } if failure || slow => {
                Some(self.open(config, TransitionReason::ProbeFailed, now))
            }
            Phase::HalfOpen { successes } if successes + 1 >= config.half_open_probes => {
                let count = successes + 1;
                Some(self.close(TransitionReason::ProbesSucceeded { count }))
            }
            Phase::HalfOpen { successes } => {
                self.phase = Phase::HalfOpen {
                    successes: successes + 1,
                };
                None
            }
            // Nothing is admitted while open, and opening bumps the generation.
            Phase::Open { .. } => None,
        };
        (change, Verdict::Counted { failure, slow })
    }

    /// Records a CLOSED outcome in the trip policy; says why to open, if it should.
    fn judge(
        &mut self,
        config: &CircuitBreakerConfig,
        failure: bool,
        slow: bool,
        now: Instant,
    ) -> Option<TransitionReason> {
        self.consecutive_failures = if failure {
            self.consecutive_failures + 1
        } else {
            0
        };
        let mut reason = None;
        match (&config.trip, self.failure_window.as_mut()) {
            (TripPolicy::ConsecutiveFailures { threshold }, _) => {
                if self.consecutive_failures >= *threshold {
                    reason = Some(TransitionReason::ConsecutiveFailures {
                        count: self.consecutive_failures,
                    });
                }
            }
            (
                TripPolicy::FailureRate {
                    threshold,
                    min_calls,
                    ..
                },
                Some(window),
            ) => {
                window.record(now, failure, slow);
                let t = window.totals(now);
                let rate = f64::from(t.failures) / f64::from(t.calls);
                if t.calls >= *min_calls && rate >= *threshold {
                    reason = Some(TransitionReason::FailureRate {
                        rate,
                        calls: t.calls,
                    });
                }
            }
            (TripPolicy::FailureRate { .. }, None) => {}
        }
        if let (Some(policy), Some(window)) = (&config.slow_calls, self.slow_window.as_mut()) {
            window.record(now, failure, slow);
            let t = window.totals(now);
            let rate = f64::from(t.slow) / f64::from(t.calls);
            if reason.is_none() && t.calls >= policy.min_calls && rate >= policy.rate {
                reason = Some(TransitionReason::SlowCallRate {
                    rate,
                    calls: t.calls,
                });
            }
        }
        reason
    }

    fn open(
        &mut self,
        config: &CircuitBreakerConfig,
        reason: TransitionReason,
        now: Instant,
    ) -> Change {
        self.trips = self.trips.saturating_add(1);
        let until = crate::after(now, config.open_duration(self.trips));
        self.transition(Phase::Open { until: Some(until) }, reason)
    }

    fn close(&mut self, reason: TransitionReason) -> Change {
        self.clear();
        self.transition(Phase::Closed, reason)
    }

    fn clear(&mut self) {
        self.trips = 0;
        self.consecutive_failures = 0;
        for window in [&mut self.failure_window, &mut self.slow_window]
            .into_iter()
            .flatten()
        {
            window.clear();
        }
    }

    /// Moves to `to`, invalidating every permit.
    fn transition(&mut self, to: Phase, reason: TransitionReason) -> Change {
        let from = self.phase.state();
        self.phase = to;
        self.generation += 1;
        self.probes.fill(Slot::default());
        Change {
            from,
            to: to.state(),
            reason,
        }
    }
}

#[cfg(test)]
mod tests;
