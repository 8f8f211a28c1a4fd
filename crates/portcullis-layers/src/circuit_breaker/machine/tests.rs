//! The machine on its own: each transition at its boundary, then a proptest of its invariants
//! under any sequence of inputs and time.

use std::time::Duration;

use proptest::prelude::*;
use tokio::time::Instant;

use super::*;
use crate::circuit_breaker::{SlowCallPolicy, Window};
use CircuitState::{Closed, HalfOpen, Open};

const SEC: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

/// Opens after 2 failures in a row for 10 s; `probes` probes, each holding its permit 5 s.
fn config(probes: u32) -> CircuitBreakerConfig {
    CircuitBreakerConfig {
        trip: TripPolicy::consecutive(2),
        recovery_timeout: 10 * SEC,
        half_open_probes: probes,
        max_probe_wait: 5 * SEC,
        ..Default::default()
    }
}

/// A machine and its configuration, with a shorthand per input.
struct M {
    m: Machine,
    config: CircuitBreakerConfig,
}

impl M {
    fn new(config: CircuitBreakerConfig, now: Instant) -> Self {
        M {
            m: Machine::new(&config, now),
            config,
        }
    }

    fn step(&mut self, input: Input, now: Instant) -> Step {
        self.m.step(&self.config, input, now)
    }

    fn admit(&mut self, now: Instant) -> Permit {
        match self.step(Input::Admit, now).verdict {
            Verdict::Admitted(permit) => permit,
            other => panic!("refused: {other:?}"),
        }
    }

    fn refused(&mut self, now: Instant) -> Duration {
        match self.step(Input::Admit, now).verdict {
            Verdict::Rejected(wait) => wait,
            other => panic!("admitted: {other:?}"),
        }
    }

    fn end(&mut self, permit: Permit, outcome: Outcome, now: Instant) -> Option<Change> {
        self.step(Input::Complete(permit, outcome), now).change
    }

    fn state(&self) -> CircuitState {
        self.m.phase.state()
    }

    /// Trips a [`config`] breaker at `now`.
    fn trip(&mut self, now: Instant) {
        for _ in 0..2 {
            let p = self.admit(now);
            self.end(p, Outcome::Failure, now);
        }
        assert_eq!(self.state(), Open);
    }
}

fn change(from: CircuitState, to: CircuitState, reason: TransitionReason) -> Option<Change> {
    Some(Change { from, to, reason })
}

/// The step of an outcome that counted.
fn counted(failure: bool, slow: bool, change: Option<Change>) -> Step {
    let verdict = Verdict::Counted { failure, slow };
    Step { change, verdict }
}

/// The step of an outcome that did not count.
const IGNORED: Step = Step {
    change: None,
    verdict: Verdict::Ignored,
};

#[test]
fn consecutive_failures_open_and_a_success_resets_the_run() {
    let t = Instant::now();
    let mut m = M::new(config(1), t);
    let (a, b, c) = (m.admit(t), m.admit(t), m.admit(t));
    assert_eq!(m.end(a, Outcome::Failure, t), None);
    assert_eq!(m.m.quiet(), None);
    assert_eq!(m.end(b, Outcome::Success, t), None);
    assert_eq!(m.m.quiet(), Some(0));
    assert_eq!(m.end(c, Outcome::Failure, t), None);
    let d = m.admit(t);
    let reason = TransitionReason::ConsecutiveFailures { count: 2 };
    assert_eq!(
        m.step(Input::Complete(d, Outcome::Failure), t),
        counted(true, false, change(Closed, Open, reason))
    );
    assert_eq!(m.m.generation, 1);
    assert_eq!(m.refused(t + 3 * SEC), 7 * SEC);
}

#[test]
fn recovery_is_lazy_and_n_probe_successes_close() {
    let t = Instant::now();
    let mut m = M::new(config(2), t);
    m.trip(t);
    assert_eq!(m.refused(t + 10 * SEC - MS), MS);
    let step = m.step(Input::Observe, t + 10 * SEC);
    let reason = TransitionReason::RecoveryTimeout;
    assert_eq!(step.change, change(Open, HalfOpen, reason));
    let now = t + 11 * SEC;
    let (p, q) = (m.admit(now), m.admit(now));
    assert!(p.probe.is_some() && q.probe.is_some());
    // Both probes in flight: refused until the oldest permit expires.
    assert_eq!(m.refused(now + SEC), 4 * SEC);
    assert_eq!(m.end(p, Outcome::Success, now), None);
    assert_eq!(m.state(), HalfOpen);
    let reason = TransitionReason::ProbesSucceeded { count: 2 };
    assert_eq!(
        m.end(q, Outcome::Success, now),
        change(HalfOpen, Closed, reason)
    );
    assert_eq!(m.m.quiet(), Some(m.m.generation));
}

#[test]
fn any_probe_failure_reopens_for_a_longer_time_under_backoff() {
    let t = Instant::now();
    let mut m = M::new(
        CircuitBreakerConfig {
            open_backoff: Some(crate::circuit_breaker::OpenBackoff {
                multiplier: 2.0,
                max: 60 * SEC,
            }),
            ..config(3)
        },
        t,
    );
    m.trip(t);
    let now = t + 10 * SEC;
    let (p, q) = (m.admit(now), m.admit(now));
    assert_eq!(m.state(), HalfOpen);
    assert_eq!(m.end(p, Outcome::Success, now), None);
    let reason = TransitionReason::ProbeFailed;
    assert_eq!(
        m.end(q, Outcome::Failure, now),
        change(HalfOpen, Open, reason)
    );
    assert_eq!(m.refused(now), 20 * SEC);
}

#[test]
fn a_slow_probe_reopens_and_slow_calls_trip() {
    let t = Instant::now();
    let mut m = M::new(
        CircuitBreakerConfig {
            slow_calls: Some(SlowCallPolicy {
                threshold: SEC,
                rate: 0.5,
                window: Window::Count(4),
                min_calls: 2,
            }),
            ..config(1)
        },
        t,
    );
    let (a, b) = (m.admit(t), m.admit(t));
    assert_eq!(a.admitted, Some(t));
    assert_eq!(m.end(a, Outcome::Success, t + SEC), None);
    let reason = TransitionReason::SlowCallRate {
        rate: 1.0,
        calls: 2,
    };
    assert_eq!(
        m.step(Input::Complete(b, Outcome::Success), t + SEC),
        counted(false, true, change(Closed, Open, reason))
    );
    let now = t + 11 * SEC;
    let p = m.admit(now);
    let reason = TransitionReason::ProbeFailed;
    assert_eq!(
        m.end(p, Outcome::Success, now + SEC),
        change(HalfOpen, Open, reason)
    );
}

#[test]
fn failure_rate_waits_for_min_calls() {
    let t = Instant::now();
    let mut m = M::new(
        CircuitBreakerConfig {
            trip: TripPolicy::failure_rate(0.5, Window::Count(10), 4),
            ..config(1)
        },
        t,
    );
    for outcome in [Outcome::Failure, Outcome::Failure, Outcome::Success] {
        let p = m.admit(t);
        assert_eq!(m.end(p, outcome, t), None);
    }
    let p = m.admit(t);
    let reason = TransitionReason::FailureRate {
        rate: 0.5,
        calls: 4,
    };
    assert_eq!(m.end(p, Outcome::Success, t), change(Closed, Open, reason));
}

#[test]
fn stale_and_expired_outcomes_are_ignored() {
    let t = Instant::now();
    let mut m = M::new(config(1), t);
    let stale = m.admit(t);
    m.trip(t);
    let now = t + 10 * SEC;
    let hung = m.admit(now);
    assert_eq!(
        m.step(Input::Complete(stale, Outcome::Failure), now),
        IGNORED
    );
    assert_eq!(m.state(), HalfOpen);
    // The hung probe's permit expires and is handed on; its late outcome no longer counts.
    let next = m.admit(now + 5 * SEC);
    let late = m.step(Input::Complete(hung, Outcome::Failure), now + 6 * SEC);
    assert_eq!(late, IGNORED);
    let reason = TransitionReason::ProbesSucceeded { count: 1 };
    assert_eq!(
        m.end(next, Outcome::Success, now + 6 * SEC),
        change(HalfOpen, Closed, reason)
    );
}

#[test]
fn forcing_and_reset() {
    let t = Instant::now();
    let mut m = M::new(config(1), t);
    let reason = TransitionReason::ForcedOpen;
    assert_eq!(
        m.step(Input::ForceOpen, t).change,
        change(Closed, Open, reason)
    );
    assert_eq!(m.step(Input::ForceOpen, t).change, None);
    // No recovery timeout while forced open.
    assert_eq!(m.step(Input::Observe, t + 3600 * SEC).change, None);
    assert_eq!(m.refused(t), 10 * SEC);
    let reason = TransitionReason::ForcedClosed;
    assert_eq!(
        m.step(Input::ForceClosed, t).change,
        change(Open, Closed, reason)
    );
    assert_eq!(m.step(Input::ForceClosed, t).change, None);

    let p = m.admit(t);
    m.end(p, Outcome::Failure, t);
    let generation = m.m.generation;
    let step = m.step(Input::Reset, t);
    assert_eq!((step.change, step.verdict), (None, Verdict::Reset));
    assert_eq!(
        (m.m.generation, m.m.quiet()),
        (generation + 1, Some(generation + 1))
    );
    m.trip(t);
    let reason = TransitionReason::Reset;
    assert_eq!(m.step(Input::Reset, t).change, change(Open, Closed, reason));
}

#[derive(Debug, Clone)]
enum Op {
    Admit,
    End(usize, Outcome),
    Advance(u64),
    Observe,
    ForceOpen,
    ForceClosed,
    Reset,
}

fn op() -> impl Strategy<Value = Op> {
    let outcome = prop_oneof![
        3 => Just(Outcome::Success),
        2 => Just(Outcome::Failure),
        1 => Just(Outcome::Ignored),
    ];
    prop_oneof![
        6 => Just(Op::Admit),
        6 => (any::<usize>(), outcome).prop_map(|(i, o)| Op::End(i, o)),
        3 => (0u64..3000).prop_map(Op::Advance),
        1 => Just(Op::Observe),
        1 => Just(Op::ForceOpen),
        1 => Just(Op::ForceClosed),
        1 => Just(Op::Reset),
    ]
}

fn any_config() -> impl Strategy<Value = CircuitBreakerConfig> {
    (1u32..4, 1u32..4, any::<bool>(), any::<bool>()).prop_map(|(probes, n, rate, slow)| {
        CircuitBreakerConfig {
            trip: if rate {
                TripPolicy::failure_rate(0.5, Window::Count(4), n)
            } else {
                TripPolicy::consecutive(n)
            },
            slow_calls: slow.then(|| SlowCallPolicy {
                threshold: 400 * MS,
                rate: 0.5,
                window: Window::Time(5 * SEC),
                min_calls: 2,
            }),
            recovery_timeout: 2 * SEC,
            half_open_probes: probes,
            max_probe_wait: 3 * SEC,
            ..Default::default()
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// At most N probes in HALF_OPEN at once; N successes close; any failure reopens; exactly
    /// one event per transition; the generation grows on every transition and outcomes of an
    /// earlier one are ignored; where the lock-free path stands in, the machine does nothing.
    #[test]
    fn invariants_hold_under_any_inputs(
        config in any_config(),
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        let n = config.half_open_probes;
        let lock_free = config.slow_calls.is_none()
            && matches!(config.trip, TripPolicy::ConsecutiveFailures { .. });
        let mut now = Instant::now();
        let mut m = M::new(config, now);
        // Admitted and not ended: the permit and when it was admitted.
        let mut flight: Vec<(Permit, Instant)> = Vec::new();
        // Probe successes counted in this HALF_OPEN.
        let mut successes = 0;
        for op in ops {
            let (before, generation) = (m.state(), m.m.generation);
            let quiet = m.m.quiet();
            let snapshot = format!("{:?}", m.m);
            let (input, ended) = match op {
                Op::Admit => (Input::Admit, None),
                Op::End(i, outcome) if !flight.is_empty() => {
                    let (permit, _) = flight.swap_remove(i % flight.len());
                    (Input::Complete(permit, outcome), Some((permit, outcome)))
                }
                Op::End(..) | Op::Observe => (Input::Observe, None),
                Op::Advance(ms) => {
                    now += Duration::from_millis(ms);
                    (Input::Observe, None)
                }
                Op::ForceOpen => (Input::ForceOpen, None),
                Op::ForceClosed => (Input::ForceClosed, None),
                Op::Reset => (Input::Reset, None),
            };
            let step = m.step(input, now);
            let after = m.state();

            // Exactly one event per transition, and the generation grows on each.
            prop_assert_eq!(step.change.is_some(), before != after);
            if let Some(c) = step.change {
                prop_assert_eq!((c.from, c.to), (before, after));
                prop_assert!(m.m.generation > generation);
            } else {
                prop_assert!(m.m.generation >= generation);
            }
            if after == HalfOpen && step.change.is_some() {
                successes = 0;
            }

            match (step.verdict, ended) {
                (Verdict::Admitted(permit), _) => {
                    prop_assert_eq!(permit.generation, m.m.generation);
                    prop_assert_eq!(permit.probe.is_some(), after == HalfOpen);
                    if lock_free && quiet.is_some() {
                        // The lock-free path admits with the same permit, and changes nothing.
                        prop_assert_eq!(permit.generation, quiet.unwrap());
                        prop_assert!(permit.admitted.is_none());
                        prop_assert_eq!(&format!("{:?}", m.m), &snapshot);
                    }
                    flight.push((permit, now));
                }
                (Verdict::Rejected(_), _) => prop_assert!(after != Closed),
                (verdict, Some((permit, outcome))) => {
                    if permit.generation != generation || outcome == Outcome::Ignored {
                        // Stale or ignored: nothing changes.
                        prop_assert_eq!(step, IGNORED);
                        if permit.probe.is_none() {
                            // As the lock-free path, which only counts it.
                            prop_assert_eq!(&format!("{:?}", m.m), &snapshot);
                        }
                    }
                    if let Verdict::Counted { failure, slow } = verdict {
                        prop_assert_eq!(failure, outcome == Outcome::Failure);
                        if before == HalfOpen && (failure || slow) {
                            let reopen = change(HalfOpen, Open, TransitionReason::ProbeFailed);
                            prop_assert_eq!(step.change, reopen);
                        } else if before == HalfOpen {
                            successes += 1;
                            let closes = successes == n;
                            prop_assert_eq!(step.change.is_some(), closes);
                            if closes {
                                let reason = TransitionReason::ProbesSucceeded { count: n };
                                prop_assert_eq!(step.change, change(HalfOpen, Closed, reason));
                            }
                        } else if lock_free && quiet == Some(permit.generation) && !failure {
                            // The lock-free path records this success alone.
                            prop_assert_eq!(&format!("{:?}", m.m), &snapshot);
                        }
                    }
                }
                _ => {}
            }

            // At most N probes hold a permit of this HALF_OPEN.
            if after == HalfOpen {
                let held = flight
                    .iter()
                    .filter(|(p, at)| {
                        p.probe.is_some()
                            && p.generation == m.m.generation
                            && *at + m.config.max_probe_wait > now
                    })
                    .count();
                prop_assert!(held <= n as usize, "{} probes in flight", held);
            }
        }
    }
}
