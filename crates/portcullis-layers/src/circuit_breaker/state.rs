//! The locking around each key's [`Machine`], and the map of keys shared by clones.
//!
//! Each key's machine sits in a `std::sync::Mutex` held for a few dozen instructions; the map
//! of keys is a [`KeyMap`] (bounded: idle neutral keys are evicted, keys beyond the cap share
//! an overflow breaker) behind an `RwLock` whose write side is only taken for a new key.
//! Nothing here allocates for a key already seen.
//!
//! The happy path takes no lock and reads no clock: a CLOSED breaker under a
//! consecutive-failures policy without a slow-call policy, with no failure pending, publishes
//! its generation in one atomic word ([`KeyState::fast`]). Admission is then a load (and a
//! counter increment), and a success of the current generation another load: nothing changes
//! when a success follows a success ([`Machine::quiet`]). Everything else runs the machine
//! under the mutex ([`KeyState::run`]), which republishes the word before releasing it.

use std::borrow::Borrow;
use std::collections::hash_map::RandomState;
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::broadcast;
use tokio::time::Instant;

use super::config::{CircuitBreakerConfig, TripPolicy};
use super::events::{CircuitMetrics, CircuitState, Transition};
use super::machine::{Input, Machine, Outcome, Permit, Step, Verdict};
use crate::keyed::{Entry, KeyMap, Kind, Neutral, Room};

/// A key's breaker as the map holds it.
pub(crate) type Breaker<K> = Arc<Entry<KeyState<K>>>;

/// What every key of one layer shares: name, configuration, event channel.
pub(crate) struct Common<K> {
    pub(crate) name: Arc<str>,
    pub(crate) config: CircuitBreakerConfig,
    pub(crate) events: broadcast::Sender<Transition<K>>,
}

/// The map of keys, shared by the layer, its services, their clones and handles.
pub(crate) struct Shared<K> {
    pub(crate) common: Arc<Common<K>>,
    /// Hashed with SipHash and a random key: a client chooses the keys, and must not be able
    /// to aim them at one bucket. (The common path skips hashing: a service keeps the last
    /// key's breaker.)
    pub(crate) keys: KeyMap<K, KeyState<K>, RandomState>,
}

impl<K> Shared<K>
where
    K: Clone + Eq + Hash + Debug + Send + Sync + 'static,
{
    pub(crate) fn new(name: Arc<str>, config: CircuitBreakerConfig) -> Self {
        let (events, _) = broadcast::channel(super::EVENT_CAPACITY);
        let keys = KeyMap::new(config.keys, super::config::COMPONENT, name.clone());
        Shared {
            common: Arc::new(Common {
                name,
                config,
                events,
            }),
            keys,
        }
    }

    pub(crate) fn get<Q>(&self, key: &Q) -> Option<Breaker<K>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.keys.get(key)
    }

    /// `key`'s breaker, marked used: a request's key (`Room::Capped`, which may get the
    /// overflow breaker) or one the operator names (`Room::Exempt`).
    pub(crate) fn get_or_insert(&self, key: &K, room: Room) -> Breaker<K> {
        self.keys.entry(key, room, |kind| {
            KeyState::new(key.clone(), self.common.clone(), kind == Kind::Overflow)
        })
    }

    pub(crate) fn keys(&self) -> Vec<K> {
        let mut keys = Vec::new();
        self.keys.for_each(|k, _| keys.push(k.clone()));
        keys
    }
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
    /// Admitted calls whose outcome is not recorded yet (never reset: they are real).
    in_flight: AtomicU64,
}

/// Adds one to a counter.
fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// Reads a counter.
fn read(counter: &AtomicU64) -> u64 {
    counter.load(Ordering::Relaxed)
}

/// One key's breaker.
pub(crate) struct KeyState<K> {
    key: K,
    common: Arc<Common<K>>,
    machine: Mutex<Machine>,
    counters: Counters,
    /// The lock-free CLOSED path: `generation << 1 | 1` while it is open to it (the machine is
    /// [quiet](Machine::quiet) and the configuration needs nothing else:
    /// [`Self::fast_eligible`]), 0 otherwise. Written only under the mutex, by [`Self::run`].
    fast: AtomicU64,
    /// A consecutive-failures policy and no slow-call policy: a success of the current
    /// generation changes nothing when no failure is pending.
    fast_eligible: bool,
    /// The breaker shared by the keys beyond the cap (`key` is the first of them).
    overflow: bool,
}

impl<K> KeyState<K>
where
    K: Clone + Debug + Send + Sync + 'static,
{
    fn new(key: K, common: Arc<Common<K>>, overflow: bool) -> Self {
        let config = &common.config;
        let machine = Machine::new(config, Instant::now());
        let fast_eligible = matches!(config.trip, TripPolicy::ConsecutiveFailures { .. })
            && config.slow_calls.is_none();
        KeyState {
            key,
            machine: Mutex::new(machine),
            counters: Counters::default(),
            // Generation 0, CLOSED, no failure.
            fast: AtomicU64::new(u64::from(fast_eligible)),
            fast_eligible,
            overflow,
            common,
        }
    }

    /// The key.
    pub(crate) fn key(&self) -> &K {
        &self.key
    }

    /// Admits a call, or says how long until the breaker may admit one.
    pub(crate) fn admit(&self) -> Result<Permit, Duration> {
        let fast = self.fast.load(Ordering::Acquire);
        if fast & 1 == 1 {
            bump(&self.counters.calls);
            bump(&self.counters.in_flight);
            return Ok(Permit {
                generation: fast >> 1,
                probe: None,
                admitted: None,
            });
        }
        match self.run(Input::Admit, Instant::now()) {
            Verdict::Admitted(permit) => Ok(permit),
            Verdict::Rejected(retry_after) => Err(retry_after),
            other => unreachable!("admission answered {other:?}"),
        }
    }

    /// `Duration::ZERO` if a call would be admitted now, else how long until one may be;
    /// nothing is taken or counted. The happy path is one atomic load.
    pub(crate) fn availability(&self, now: Instant) -> Duration {
        if self.fast.load(Ordering::Acquire) & 1 == 1 {
            return Duration::ZERO;
        }
        match self.run(Input::Peek, now) {
            Verdict::Peeked(wait) => wait.unwrap_or(Duration::ZERO),
            other => unreachable!("a peek answered {other:?}"),
        }
    }

    /// The state now; like a call, it moves an OPEN breaker whose recovery timeout elapsed to
    /// HALF_OPEN.
    pub(crate) fn state(&self, now: Instant) -> CircuitState {
        self.observe(now).0
    }

    pub(crate) fn metrics(&self, now: Instant) -> CircuitMetrics {
        let (state, consecutive_failures) = self.observe(now);
        let c = &self.counters;
        CircuitMetrics {
            state,
            calls: read(&c.calls),
            successes: read(&c.successes),
            failures: read(&c.failures),
            slow_calls: read(&c.slow_calls),
            rejected: read(&c.rejected),
            ignored: read(&c.ignored),
            in_flight: read(&c.in_flight),
            consecutive_failures,
        }
    }

    fn observe(&self, now: Instant) -> (CircuitState, u32) {
        match self.run(Input::Observe, now) {
            Verdict::Observed {
                state,
                consecutive_failures,
            } => (state, consecutive_failures),
            other => unreachable!("observation answered {other:?}"),
        }
    }

    pub(crate) fn force_open(&self, now: Instant) {
        self.run(Input::ForceOpen, now);
    }

    pub(crate) fn force_closed(&self, now: Instant) {
        self.run(Input::ForceClosed, now);
    }

    pub(crate) fn reset(&self, now: Instant) {
        self.run(Input::Reset, now);
    }

    /// Runs one input through the machine under the mutex and applies its step, in this one
    /// place: the counters, the fast path's word, and the transition, sent under the lock (so
    /// that one key's events arrive in order) and logged after it.
    fn run(&self, input: Input, now: Instant) -> Verdict {
        let mut machine = self.machine.lock().unwrap_or_else(PoisonError::into_inner);
        let Step { change, verdict } = machine.step(&self.common.config, input, now);
        let c = &self.counters;
        match verdict {
            Verdict::Admitted(_) => {
                bump(&c.calls);
                bump(&c.in_flight);
            }
            Verdict::Rejected(_) => bump(&c.rejected),
            Verdict::Ignored => bump(&c.ignored),
            Verdict::Counted { failure, slow } => {
                bump(if failure { &c.failures } else { &c.successes });
                if slow {
                    bump(&c.slow_calls);
                }
            }
            Verdict::Reset => {
                for counter in [
                    &c.calls,
                    &c.successes,
                    &c.failures,
                    &c.slow_calls,
                    &c.rejected,
                    &c.ignored,
                ] {
                    counter.store(0, Ordering::Relaxed);
                }
            }
            Verdict::Observed { .. } | Verdict::Peeked(_) | Verdict::Done => {}
        }
        let word = match machine.quiet() {
            Some(generation) if self.fast_eligible => generation << 1 | 1,
            _ => 0,
        };
        self.fast.store(word, Ordering::Release);
        let event = change.map(|change| {
            let event = Transition {
                name: self.common.name.clone(),
                key: self.key.clone(),
                from: change.from,
                to: change.to,
                at: now,
                reason: change.reason,
            };
            // No receiver is not an error.
            let _ = self.common.events.send(event.clone());
            event
        });
        drop(machine);
        if let Some(event) = event {
            log(&event, self.overflow);
        }
        verdict
    }
}

impl<K> Neutral for KeyState<K> {
    /// CLOSED with no failure pending: as a new breaker (only its counters differ).
    fn is_neutral(&self, now: Instant) -> bool {
        self.machine.try_lock().is_ok_and(|m| m.is_neutral(now))
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
        // Every admitted call completes exactly once (its guard records or drops).
        self.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
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
        self.run(Input::Complete(*permit, outcome), Instant::now());
    }
}

impl<V: Complete> Complete for Entry<V> {
    fn complete(&self, permit: &Permit, outcome: Outcome) {
        (**self).complete(permit, outcome);
    }
}

/// Logs a transition, as the seed's logger did: a warning when a breaker opens. `overflow`:
/// the breaker shared by the keys beyond the cap.
fn log<K: Debug>(t: &Transition<K>, overflow: bool) {
    let state = |s: CircuitState| match s {
        CircuitState::Closed => ("closed", 0.0),
        CircuitState::HalfOpen => ("half_open", 1.0),
        CircuitState::Open => ("open", 2.0),
    };
    let (from, to) = (state(t.from), state(t.to));
    crate::telemetry::breaker(&t.name, from.0, to.0, to.1);
    if t.to == CircuitState::Open {
        tracing::warn!(
            breaker = %t.name, key = ?t.key, overflow, from = %t.from, to = %t.to,
            reason = %t.reason, "circuit breaker opened"
        );
    } else {
        tracing::info!(
            breaker = %t.name, key = ?t.key, overflow, from = %t.from, to = %t.to,
            reason = %t.reason,
            "circuit breaker {}", if t.to == CircuitState::Closed { "closed" } else { "half-open" }
        );
    }
}
