//! The state machine of one key, and the map of keys shared by clones.
//!
//! Each key's state sits in a `std::sync::Mutex` held for a few dozen instructions; the map of
//! keys is behind an `RwLock` whose write side is only taken for a new key. Nothing here
//! allocates for a key already seen.
//!
//! The happy path takes no lock and reads no clock: a CLOSED breaker under a
//! consecutive-failures policy without a slow-call policy, with no failure pending, publishes
//! its generation in one atomic word ([`KeyState::fast`]). Admission is then a load (and a
//! counter increment), and a success of the current generation another load: nothing changes
//! when a success follows a success. Everything else (a failure, a probe, OPEN, HALF_OPEN, the
//! window policies) takes the mutex, and every release of the mutex republishes the word.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt::Debug;
use std::hash::Hash;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;

use super::config::CircuitBreakerConfig;
use super::events::{CircuitMetrics, CircuitState, Transition, TransitionReason};
use super::window::Recorder;

/// What every key of one layer shares: name, configuration, event channel.
pub(crate) struct Common<K> {
    pub(crate) name: Arc<str>,
    pub(crate) config: CircuitBreakerConfig,
    pub(crate) events: broadcast::Sender<Transition<K>>,
}

/// The map of keys, shared by the layer, its services, their clones and handles.
pub(crate) struct Shared<K> {
    pub(crate) common: Arc<Common<K>>,
    keys: RwLock<HashMap<K, Arc<KeyState<K>>>>,
}

impl<K> Shared<K>
where
    K: Clone + Eq + Hash + Debug + Send + Sync + 'static,
{
    pub(crate) fn new(name: Arc<str>, config: CircuitBreakerConfig) -> Self {
        let (events, _) = broadcast::channel(super::EVENT_CAPACITY);
        Shared {
            common: Arc::new(Common {
                name,
                config,
                events,
            }),
            keys: RwLock::new(HashMap::new()),
        }
    }

    pub(crate) fn get<Q>(&self, key: &Q) -> Option<Arc<KeyState<K>>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        keys.get(key).cloned()
    }

    pub(crate) fn get_or_insert(&self, key: K) -> Arc<KeyState<K>> {
        if let Some(state) = self.get(&key) {
            return state;
        }
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        keys.entry(key.clone())
            .or_insert_with(|| Arc::new(KeyState::new(key, self.common.clone())))
            .clone()
    }

    pub(crate) fn keys(&self) -> Vec<K> {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        keys.keys().cloned().collect()
    }
}

/// A call's claim on its key: the generation it was admitted under, and its half-open probe
/// slot if it is a probe.
#[derive(Debug)]
pub(crate) struct Permit {
    generation: u64,
    probe: Option<Probe>,
    /// When it was admitted; only read (and only set) under a slow-call policy.
    admitted: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Probe {
    slot: usize,
    ticket: u64,
}

/// How a call ended, as the breaker counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    Success,
    Failure,
    /// Not a breaker failure, or cancelled.
    Ignored,
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
    fn public(self) -> CircuitState {
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

/// The metrics' counters: atomics, so that the lock-free path counts too.
#[derive(Debug, Default)]
struct Counters {
    calls: AtomicU64,
    successes: AtomicU64,
    failures: AtomicU64,
    slow_calls: AtomicU64,
    rejected: AtomicU64,
    ignored: AtomicU64,
}

impl Counters {
    fn all(&self) -> [&AtomicU64; 6] {
        [
            &self.calls,
            &self.successes,
            &self.failures,
            &self.slow_calls,
            &self.rejected,
            &self.ignored,
        ]
    }
}

/// Adds one to a counter.
fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

struct Inner {
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

/// One key's breaker.
pub(crate) struct KeyState<K> {
    key: K,
    common: Arc<Common<K>>,
    inner: Mutex<Inner>,
    counters: Counters,
    /// The lock-free CLOSED path: `generation << 1 | 1` while it is open to it (CLOSED, no
    /// failure pending, and a configuration that needs nothing else: [`Self::fast_eligible`]),
    /// 0 otherwise. Written only under the mutex, when it is released ([`Locked`]).
    fast: AtomicU64,
    /// A consecutive-failures policy and no slow-call policy: a success of the current
    /// generation changes nothing when no failure is pending.
    fast_eligible: bool,
}

/// The mutex guard of one key: republishes [`KeyState::fast`] when released.
struct Locked<'a> {
    inner: MutexGuard<'a, Inner>,
    fast: &'a AtomicU64,
    eligible: bool,
}

impl Deref for Locked<'_> {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

impl DerefMut for Locked<'_> {
    fn deref_mut(&mut self) -> &mut Inner {
        &mut self.inner
    }
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let open_to_fast = self.eligible
            && matches!(self.inner.phase, Phase::Closed)
            && self.inner.consecutive_failures == 0;
        let word = if open_to_fast {
            self.inner.generation << 1 | 1
        } else {
            0
        };
        // Before the mutex is released (the guard's field drops after this).
        self.fast.store(word, Ordering::Release);
    }
}

impl<K> KeyState<K>
where
    K: Clone + Debug + Send + Sync + 'static,
{
    fn new(key: K, common: Arc<Common<K>>) -> Self {
        let now = Instant::now();
        let config = &common.config;
        let failure_window = match &config.trip {
            super::TripPolicy::FailureRate { window, .. } => Some(Recorder::new(*window, now)),
            super::TripPolicy::ConsecutiveFailures { .. } => None,
        };
        let slow_window = config
            .slow_calls
            .as_ref()
            .map(|s| Recorder::new(s.window, now));
        let inner = Inner {
            phase: Phase::Closed,
            generation: 0,
            trips: 0,
            consecutive_failures: 0,
            failure_window,
            slow_window,
            probes: vec![Slot::default(); config.half_open_probes as usize].into_boxed_slice(),
            next_ticket: 0,
        };
        let fast_eligible = matches!(config.trip, super::TripPolicy::ConsecutiveFailures { .. })
            && config.slow_calls.is_none();
        KeyState {
            key,
            common,
            inner: Mutex::new(inner),
            counters: Counters::default(),
            // Generation 0, CLOSED, no failure.
            fast: AtomicU64::new(u64::from(fast_eligible)),
            fast_eligible,
        }
    }

    /// The key.
    pub(crate) fn key(&self) -> &K {
        &self.key
    }

    fn lock(&self) -> Locked<'_> {
        Locked {
            inner: self.inner.lock().unwrap_or_else(PoisonError::into_inner),
            fast: &self.fast,
            eligible: self.fast_eligible,
        }
    }

    /// Admits a call, or says how long until the breaker may admit one.
    pub(crate) fn admit(&self) -> Result<Permit, Duration> {
        let fast = self.fast.load(Ordering::Acquire);
        if fast & 1 == 1 {
            bump(&self.counters.calls);
            return Ok(Permit {
                generation: fast >> 1,
                probe: None,
                admitted: None,
            });
        }
        self.admit_locked(Instant::now())
    }

    fn admit_locked(&self, now: Instant) -> Result<Permit, Duration> {
        let mut inner = self.lock();
        let event = self.refresh(&mut inner, now);
        let result = match inner.phase {
            Phase::Closed => Ok(None),
            Phase::Open { until } => Err(until.map_or(self.common.config.recovery_timeout, |u| {
                u.saturating_duration_since(now)
            })),
            Phase::HalfOpen { .. } => {
                let wait = self.common.config.max_probe_wait;
                let free = inner
                    .probes
                    .iter()
                    .position(|s| s.since.is_none_or(|since| since + wait <= now));
                match free {
                    Some(slot) => {
                        let ticket = inner.next_ticket;
                        inner.next_ticket += 1;
                        inner.probes[slot] = Slot {
                            ticket,
                            since: Some(now),
                        };
                        Ok(Some(Probe { slot, ticket }))
                    }
                    // Every probe is in flight: refuse until the oldest permit expires.
                    None => Err(inner
                        .probes
                        .iter()
                        .filter_map(|s| s.since)
                        .min()
                        .map_or(Duration::ZERO, |oldest| {
                            (oldest + wait).saturating_duration_since(now)
                        })),
                }
            }
        };
        let result = match result {
            Ok(probe) => {
                bump(&self.counters.calls);
                Ok(Permit {
                    generation: inner.generation,
                    probe,
                    admitted: self.common.config.slow_calls.is_some().then_some(now),
                })
            }
            Err(retry_after) => {
                bump(&self.counters.rejected);
                Err(retry_after)
            }
        };
        drop(inner);
        emit(event);
        result
    }
}

/// Records how an admitted call ended; lets a permit forget its key's type.
pub(crate) trait Complete: Send + Sync {
    fn complete(&self, permit: &Permit, outcome: Outcome);
}

impl<K> Complete for KeyState<K>
where
    K: Clone + Debug + Send + Sync + 'static,
{
    fn complete(&self, permit: &Permit, outcome: Outcome) {
        if permit.probe.is_none() {
            match outcome {
                // Whatever the state, an ignored outcome of a call that is not a probe only
                // counts as ignored.
                Outcome::Ignored => return bump(&self.counters.ignored),
                // Still CLOSED in the permit's generation with no failure pending: a success
                // changes nothing but its counter.
                Outcome::Success
                    if self.fast.load(Ordering::Acquire) == permit.generation << 1 | 1 =>
                {
                    return bump(&self.counters.successes);
                }
                Outcome::Success | Outcome::Failure => {}
            }
        }
        self.complete_locked(permit, outcome, Instant::now());
    }
}

impl<K> KeyState<K>
where
    K: Clone + Debug + Send + Sync + 'static,
{
    fn complete_locked(&self, permit: &Permit, outcome: Outcome, now: Instant) {
        let mut inner = self.lock();
        let current = permit.generation == inner.generation
            && match permit.probe {
                None => true,
                Some(p) => {
                    let slot = &mut inner.probes[p.slot];
                    // A probe whose permit expired and was handed on no longer counts.
                    let holds = slot.ticket == p.ticket && slot.since.is_some();
                    if holds {
                        slot.since = None;
                    }
                    holds
                }
            };
        if !current || outcome == Outcome::Ignored {
            bump(&self.counters.ignored);
            return;
        }
        let config = &self.common.config;
        let failure = outcome == Outcome::Failure;
        let slow = match (&config.slow_calls, permit.admitted) {
            (Some(s), Some(admitted)) => now.saturating_duration_since(admitted) >= s.threshold,
            _ => false,
        };
        let c = &self.counters;
        bump(if failure { &c.failures } else { &c.successes });
        if slow {
            bump(&c.slow_calls);
        }

        let event = match inner.phase {
            Phase::Closed => self.judge(&mut inner, failure, slow, now),
            Phase::HalfOpen { successes } => {
                if failure || slow {
                    Some(self.open(&mut inner, TransitionReason::ProbeFailed, now))
                } else if successes + 1 >= config.half_open_probes {
                    let reason = TransitionReason::ProbesSucceeded {
                        count: successes + 1,
                    };
                    Some(self.close(&mut inner, reason, now))
                } else {
                    inner.phase = Phase::HalfOpen {
                        successes: successes + 1,
                    };
                    None
                }
            }
            // Nothing is admitted while open, and opening bumps the generation.
            Phase::Open { .. } => None,
        };
        drop(inner);
        emit(event);
    }
}

impl<K> KeyState<K>
where
    K: Clone + Debug + Send + Sync + 'static,
{
    /// Records a CLOSED outcome in the trip policy; opens if it says so.
    fn judge(
        &self,
        inner: &mut Inner,
        failure: bool,
        slow: bool,
        now: Instant,
    ) -> Option<Transition<K>> {
        let config = &self.common.config;
        if failure {
            inner.consecutive_failures += 1;
        } else {
            inner.consecutive_failures = 0;
        }
        let mut reason = None;
        match (&config.trip, inner.failure_window.as_mut()) {
            (super::TripPolicy::ConsecutiveFailures { threshold }, _) => {
                if inner.consecutive_failures >= *threshold {
                    reason = Some(TransitionReason::ConsecutiveFailures {
                        count: inner.consecutive_failures,
                    });
                }
            }
            (
                super::TripPolicy::FailureRate {
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
            (super::TripPolicy::FailureRate { .. }, None) => {}
        }
        if let (Some(policy), Some(window)) = (&config.slow_calls, inner.slow_window.as_mut()) {
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
        reason.map(|r| self.open(inner, r, now))
    }

    /// The OPEN → HALF_OPEN transition, evaluated lazily.
    fn refresh(&self, inner: &mut Inner, now: Instant) -> Option<Transition<K>> {
        match inner.phase {
            Phase::Open { until: Some(until) } if now >= until => Some(self.transition(
                inner,
                Phase::HalfOpen { successes: 0 },
                TransitionReason::RecoveryTimeout,
                now,
            )),
            _ => None,
        }
    }

    fn open(&self, inner: &mut Inner, reason: TransitionReason, now: Instant) -> Transition<K> {
        inner.trips = inner.trips.saturating_add(1);
        let until = now + self.common.config.open_duration(inner.trips);
        self.transition(inner, Phase::Open { until: Some(until) }, reason, now)
    }

    fn close(&self, inner: &mut Inner, reason: TransitionReason, now: Instant) -> Transition<K> {
        inner.trips = 0;
        clear_windows(inner);
        self.transition(inner, Phase::Closed, reason, now)
    }

    /// Moves to `to`, invalidating every permit, and sends the event (under the lock, so that
    /// events of one key arrive in order). The caller logs it with [`emit`] after unlocking.
    fn transition(
        &self,
        inner: &mut Inner,
        to: Phase,
        reason: TransitionReason,
        now: Instant,
    ) -> Transition<K> {
        let from = inner.phase.public();
        inner.phase = to;
        inner.generation += 1;
        inner.probes.fill(Slot::default());
        let event = Transition {
            name: self.common.name.clone(),
            key: self.key.clone(),
            from,
            to: to.public(),
            at: now,
            reason,
        };
        // No receiver is not an error.
        let _ = self.common.events.send(event.clone());
        event
    }

    pub(crate) fn state(&self, now: Instant) -> CircuitState {
        let mut inner = self.lock();
        let event = self.refresh(&mut inner, now);
        let state = inner.phase.public();
        drop(inner);
        emit(event);
        state
    }

    pub(crate) fn metrics(&self, now: Instant) -> CircuitMetrics {
        let mut inner = self.lock();
        let event = self.refresh(&mut inner, now);
        let c = &self.counters;
        let metrics = CircuitMetrics {
            state: inner.phase.public(),
            calls: c.calls.load(Ordering::Relaxed),
            successes: c.successes.load(Ordering::Relaxed),
            failures: c.failures.load(Ordering::Relaxed),
            slow_calls: c.slow_calls.load(Ordering::Relaxed),
            rejected: c.rejected.load(Ordering::Relaxed),
            ignored: c.ignored.load(Ordering::Relaxed),
            consecutive_failures: inner.consecutive_failures,
        };
        drop(inner);
        emit(event);
        metrics
    }

    pub(crate) fn force_open(&self, now: Instant) {
        let mut inner = self.lock();
        let event = match inner.phase {
            Phase::Open { .. } => {
                inner.phase = Phase::Open { until: None };
                None
            }
            _ => Some(self.transition(
                &mut inner,
                Phase::Open { until: None },
                TransitionReason::ForcedOpen,
                now,
            )),
        };
        drop(inner);
        emit(event);
    }

    pub(crate) fn force_closed(&self, now: Instant) {
        let mut inner = self.lock();
        let event = match inner.phase {
            Phase::Closed => None,
            _ => Some(self.close(&mut inner, TransitionReason::ForcedClosed, now)),
        };
        drop(inner);
        emit(event);
    }

    pub(crate) fn reset(&self, now: Instant) {
        let mut inner = self.lock();
        for counter in self.counters.all() {
            counter.store(0, Ordering::Relaxed);
        }
        let event = match inner.phase {
            Phase::Closed => {
                inner.trips = 0;
                clear_windows(&mut inner);
                inner.generation += 1;
                None
            }
            _ => Some(self.close(&mut inner, TransitionReason::Reset, now)),
        };
        drop(inner);
        emit(event);
    }
}

fn clear_windows(inner: &mut Inner) {
    inner.consecutive_failures = 0;
    if let Some(w) = inner.failure_window.as_mut() {
        w.clear();
    }
    if let Some(w) = inner.slow_window.as_mut() {
        w.clear();
    }
}

/// Logs a transition, as the seed's logger did: a warning when a breaker opens.
fn emit<K: Debug>(event: Option<Transition<K>>) {
    let Some(t) = event else { return };
    if t.to == CircuitState::Open {
        tracing::warn!(
            breaker = %t.name, key = ?t.key, from = %t.from, to = %t.to, reason = %t.reason,
            "circuit breaker opened"
        );
    } else {
        tracing::info!(
            breaker = %t.name, key = ?t.key, from = %t.from, to = %t.to, reason = %t.reason,
            "circuit breaker {}", if t.to == CircuitState::Closed { "closed" } else { "half-open" }
        );
    }
}
