//! The state behind the buckets: the [`BucketStore`] trait and its in-memory implementation,
//! [`MemoryStore`].
//!
//! # The algorithm: reservation at decision time (GCRA)
//!
//! Each bucket of a key keeps one number, its *theoretical arrival time* `tat`: the instant at
//! which the bucket would be full again. Its level at `t` is `capacity - rate·max(0, tat - t)`,
//! negative while reservations are queued. A request costing `c` fits at the earliest `t` with
//! `level(t) ≥ c`. A reservation:
//!
//! 1. refuses at once, consuming nothing, if `c > capacity` ([`Denied::OverCapacity`]);
//! 2. computes its admission instant `at`: the latest of now, the key's pause, the previous
//!    reservation's `at` (the FIFO floor) and, for every bucket, the instant it can afford its
//!    share of the cost;
//! 3. refuses at once, consuming nothing, if `at - now` exceeds the allowed wait
//!    ([`Denied::Throttled`]);
//! 4. otherwise charges every bucket *at `at`* (`tat = max(tat, at) + c / rate`), atomically.
//!
//! Admission instants never decrease, so the charges are applied in time order, which makes
//! this exactly the Generic Cell Rate Algorithm for each bucket: the cost admitted in any
//! window of length `T` is at most `capacity + rate·T`. A large request is never starved: the
//! small ones that come after it are queued after it.
//!
//! # Refunds: what is guaranteed
//!
//! A refund (a dropped waiter, or reconciliation with real usage below the estimate) must not
//! make a bucket more generous than if the refunded cost had never been charged. Reservations
//! made after the refunded one were already scheduled, so:
//!
//! - the **latest** reservation of a key, dropped before admission, is undone exactly: the
//!   buckets and the FIFO floor are as if it had never been made, and the next arrival takes its
//!   place;
//! - any other refund returns `min(refund, rate·(tat_after_it - latest_admission))`, the part
//!   provably unused by the reservations scheduled after it, and nothing for a bucket that was
//!   full again (or clamped, or re-limited) since;
//! - a reservation cancelled in the middle of the queue keeps what it could not return then;
//!   once every reservation after it is undone too, that rest is returned, so a queue dropped
//!   in any order gives everything back;
//! - waiters already sleeping keep their slot (it never moves later); the refund goes to the
//!   next reservations.
//!
//! An overrun (real usage above the estimate) is charged at once, as consumed now.
//!
//! # Writing a shared store
//!
//! [`BucketStore::reserve`] is the only asynchronous method: one call is one admission, and a
//! shared store implements it as one atomic round trip (a Redis Lua script that runs the steps
//! above on both buckets, with the server's clock). It returns the *wait*, not an instant, so the
//! store's clock and the caller's need not agree. The other methods are synchronous and
//! infallible: they run in `Drop` and in response hooks, so a remote store sends them in the
//! background.

use std::collections::HashMap;
use std::fmt::Debug;
use std::future::{Future, Ready, ready};
use std::hash::Hash;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use super::config::{KeyLimits, Rate, TokenBucketConfig};
use crate::key::FxBuildHasher;

/// How a key reads in configuration and logs. The layer displays a key as `name:label`.
pub trait KeyLabel {
    /// The label (`gpt-4o-mini` for the default model key).
    fn label(&self) -> std::borrow::Cow<'_, str>;
}

impl KeyLabel for Arc<str> {
    fn label(&self) -> std::borrow::Cow<'_, str> {
        std::borrow::Cow::Borrowed(self)
    }
}

impl KeyLabel for String {
    fn label(&self) -> std::borrow::Cow<'_, str> {
        std::borrow::Cow::Borrowed(self)
    }
}

impl KeyLabel for &'static str {
    fn label(&self) -> std::borrow::Cow<'_, str> {
        std::borrow::Cow::Borrowed(self)
    }
}

impl KeyLabel for () {
    fn label(&self) -> std::borrow::Cow<'_, str> {
        std::borrow::Cow::Borrowed("")
    }
}

macro_rules! int_label {
    ($($t:ty),*) => {$(
        impl KeyLabel for $t {
            fn label(&self) -> std::borrow::Cow<'_, str> {
                std::borrow::Cow::Owned(self.to_string())
            }
        }
    )*};
}
int_label!(u16, u32, u64, usize, i32, i64);

/// What one request costs, per unit of each bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct Cost {
    /// Requests (1 per call).
    pub requests: u64,
    /// Prompt tokens (estimated before the call, reported after).
    pub input_tokens: u64,
    /// Output tokens (`max_tokens` before the call, reported after).
    pub output_tokens: u64,
}

impl Cost {
    /// The cost in each bucket: requests, tokens (input + output), input tokens, output tokens.
    pub fn per_bucket(&self) -> [u64; 4] {
        [
            self.requests,
            self.input_tokens.saturating_add(self.output_tokens),
            self.input_tokens,
            self.output_tokens,
        ]
    }
}

/// A granted reservation: wait this long, then call.
#[derive(Debug)]
pub struct Admission<T> {
    /// How long until the reserved slot.
    pub wait: Duration,
    /// What the store needs to settle the reservation later.
    pub ticket: T,
}

/// A reservation refused at once, with nothing consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// One bucket's share of the cost exceeds its capacity: it can never be admitted.
    OverCapacity {
        /// The share of the cost.
        cost: u64,
        /// That bucket's capacity.
        capacity: u64,
    },
    /// The slot is further away than the allowed wait.
    Throttled {
        /// How long until the slot would have been.
        retry_after: Duration,
    },
}

/// How a reservation ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settlement {
    /// It was never used (the waiter was dropped, or refused later): refund it.
    Cancelled,
    /// It was used, and this is the real cost: refund the difference, or charge the overrun.
    Used(Cost),
}

/// What a server said remains in each bucket (`x-ratelimit-remaining-*`,
/// `anthropic-ratelimit-*-remaining`). A store lowers its levels to these, never raises them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Remaining {
    /// Requests.
    pub requests: Option<u64>,
    /// Tokens.
    pub tokens: Option<u64>,
    /// Input tokens.
    pub input_tokens: Option<u64>,
    /// Output tokens.
    pub output_tokens: Option<u64>,
}

impl Remaining {
    /// From parsed rate-limit headers.
    pub fn from_hints(h: &portcullis_core::RateLimitHints) -> Self {
        Remaining {
            requests: h.requests.remaining,
            tokens: h.tokens.remaining,
            input_tokens: h.input_tokens.remaining,
            output_tokens: h.output_tokens.remaining,
        }
    }

    fn per_bucket(&self) -> [Option<u64>; 4] {
        [
            self.requests,
            self.tokens,
            self.input_tokens,
            self.output_tokens,
        ]
    }

    /// Whether nothing is known.
    pub fn is_empty(&self) -> bool {
        self.per_bucket().iter().all(Option::is_none)
    }
}

/// A snapshot of one key.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Levels {
    /// Its limits.
    pub limits: KeyLimits,
    /// Units left in each bucket now, in the order requests, tokens, input tokens, output
    /// tokens (`None` for a bucket not configured). Negative while reservations are queued.
    pub levels: [Option<f64>; 4],
    /// How long admissions stay paused after a provider's 429.
    pub paused_for: Option<Duration>,
    /// How long a request arriving now would wait for a slot costing nothing (the queue).
    pub queued_for: Duration,
}

impl Levels {
    /// A snapshot, for stores outside this crate.
    pub fn new(
        limits: KeyLimits,
        levels: [Option<f64>; 4],
        paused_for: Option<Duration>,
        queued_for: Duration,
    ) -> Self {
        Levels {
            limits,
            levels,
            paused_for,
            queued_for,
        }
    }

    /// Requests left now.
    pub fn requests(&self) -> Option<f64> {
        self.levels[0]
    }
    /// Tokens left now.
    pub fn tokens(&self) -> Option<f64> {
        self.levels[1]
    }
}

/// The state behind a token bucket layer. See the [module docs](self) for the algorithm a
/// store must follow and for what refunds guarantee.
pub trait BucketStore<K>: Clone + Send + Sync + 'static {
    /// What a reservation keeps until it is settled.
    type Ticket: Send + 'static;
    /// The future of a reservation: immediate for the in-memory store, one round trip for a
    /// shared one.
    type Reserve: Future<Output = Result<Admission<Self::Ticket>, Denied>> + Send + 'static;

    /// Reserves `cost` in every bucket of `key`, atomically (all or none), unless the wait would
    /// exceed `max_wait` or the cost a capacity (then nothing is consumed).
    fn reserve(&self, key: &K, cost: Cost, max_wait: Duration) -> Self::Reserve;

    /// Ends a reservation: a refund, or a reconciliation with the real cost. Dropping a ticket
    /// without settling it keeps the charge as reserved.
    fn settle(&self, ticket: Self::Ticket, settlement: Settlement);

    /// How long the reservation's key is still paused (checked when a waiter wakes).
    fn paused_for(&self, ticket: &Self::Ticket) -> Option<Duration>;

    /// Pauses new admissions of `key` for `duration` (after a provider's 429).
    fn pause(&self, key: &K, duration: Duration);

    /// Lowers the levels of `key` to what the server says remains.
    fn clamp(&self, key: &K, remaining: Remaining);

    /// Changes the limits of `key`, keeping its levels and its queued reservations.
    fn set_limits(&self, key: &K, limits: KeyLimits);

    /// A snapshot of `key`, if the store knows it.
    fn levels(&self, key: &K) -> Option<Levels>;

    /// A snapshot of every key the store knows.
    fn snapshot(&self) -> Vec<(K, Levels)>;
}

/// Nanoseconds since the store's origin: the store's virtual clock.
type Nanos = u64;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    capacity: u64,
    nanos_per_unit: f64,
}

impl Bucket {
    fn new(rate: Rate) -> Self {
        Bucket {
            capacity: rate.capacity(),
            nanos_per_unit: 1e9 / rate.refill_per_sec(),
        }
    }
    /// Time to refill `units`, rounded up (charging more is the safe side).
    fn refill_time(&self, units: u64) -> Nanos {
        ceil_nanos(units as f64 * self.nanos_per_unit)
    }
    /// How far ahead of `tat` a cost of `units` may be admitted, rounded down.
    fn tolerance(&self, units: u64) -> Nanos {
        // `as` truncates toward zero, which for a value ≥ 0 is rounding down (and saturates
        // as `floor() as u64` does), without a call to libm's `floor`.
        (self.capacity.saturating_sub(units) as f64 * self.nanos_per_unit) as u64
    }
    fn level(&self, tat: Nanos, now: Nanos) -> f64 {
        let debt = tat as f64 - now as f64;
        if debt <= 0.0 {
            self.capacity as f64
        } else {
            self.capacity as f64 - debt / self.nanos_per_unit
        }
    }
}

/// `x.ceil() as u64` for `x ≥ 0`, without a call to libm's `ceil`: truncate, then add one if
/// that dropped a fraction. Saturates as the cast does.
fn ceil_nanos(x: f64) -> Nanos {
    let t = x as u64;
    if (t as f64) < x {
        t.saturating_add(1)
    } else {
        t
    }
}

#[derive(Debug)]
struct KeyState {
    limits: KeyLimits,
    buckets: [Option<Bucket>; 4],
    tat: [Nanos; 4],
    /// Bumped whenever a bucket's chain of reservations restarts (it was full), or is clamped or
    /// re-limited: refunds of earlier reservations then return nothing to it.
    epoch: [u64; 4],
    /// The latest admission instant (FIFO floor).
    floor: Nanos,
    paused_until: Nanos,
    seq: u64,
    /// Reservations cancelled while later ones were queued: only part of their cost could be
    /// returned then. When every reservation after one of them is undone, the rest is.
    cancelled: Vec<Cancelled>,
}

/// At most this many mid-queue cancellations are remembered per key.
const MAX_CANCELLED: usize = 64;

/// A reservation cancelled in the middle of the queue, waiting to become the tail.
#[derive(Debug)]
struct Cancelled {
    seq: u64,
    /// What it charged each bucket that was not yet returned.
    owed: [Nanos; 4],
    epoch: [u64; 4],
    prev_floor: Nanos,
}

impl KeyState {
    fn new(limits: KeyLimits, now: Nanos) -> Self {
        KeyState {
            limits,
            buckets: limits.buckets().map(|r| r.map(Bucket::new)),
            tat: [now; 4],
            epoch: [0; 4],
            floor: now,
            paused_until: now,
            seq: 0,
            cancelled: Vec::new(),
        }
    }

    fn snapshot(&self, now: Nanos) -> Levels {
        let mut levels = [None; 4];
        for (i, b) in self.buckets.iter().enumerate() {
            levels[i] = b.map(|b| b.level(self.tat[i], now));
        }
        let mut queued = self.floor.max(self.paused_until);
        for (i, b) in self.buckets.iter().enumerate() {
            if let Some(b) = b {
                queued = queued.max(self.tat[i].saturating_sub(b.tolerance(0)));
            }
        }
        Levels {
            limits: self.limits,
            levels,
            paused_for: (self.paused_until > now)
                .then(|| Duration::from_nanos(self.paused_until - now)),
            queued_for: Duration::from_nanos(queued.saturating_sub(now)),
        }
    }
}

type Slot = Arc<Mutex<KeyState>>;

fn lock(slot: &Slot) -> MutexGuard<'_, KeyState> {
    // A panic while holding the lock cannot leave the plain numbers half-written in a way that
    // matters more than losing the limiter: keep going.
    slot.lock().unwrap_or_else(PoisonError::into_inner)
}

struct MemShared<K> {
    name: Arc<str>,
    config: TokenBucketConfig,
    keys: RwLock<HashMap<K, Slot, FxBuildHasher>>,
    origin: Instant,
}

/// The default store: every key's buckets in this process's memory.
///
/// One `std::sync::Mutex` per key, held for a few arithmetic operations; a read lock on the key
/// map to find it. A reservation for a key already seen allocates nothing. Keys are kept for
/// the life of the store (one per model: a handful).
///
/// Cloning shares the state.
pub struct MemoryStore<K = Arc<str>> {
    shared: Arc<MemShared<K>>,
}

impl<K> Clone for MemoryStore<K> {
    fn clone(&self) -> Self {
        MemoryStore {
            shared: self.shared.clone(),
        }
    }
}

impl<K> Debug for MemoryStore<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("name", &self.shared.name)
            .finish_non_exhaustive()
    }
}

/// A reservation in a [`MemoryStore`].
#[derive(Debug)]
pub struct MemoryTicket {
    slot: Slot,
    seq: u64,
    cost: [u64; 4],
    tat_before: [Nanos; 4],
    tat_after: [Nanos; 4],
    epoch: [u64; 4],
    prev_floor: Nanos,
}

impl<K> MemoryStore<K>
where
    K: Clone + Eq + Hash + KeyLabel + Send + Sync + 'static,
{
    /// A store whose keys take their limits from `config` (validated here), displayed under
    /// `name` (the provider: `openai`).
    pub fn new(
        name: impl Into<Arc<str>>,
        config: TokenBucketConfig,
    ) -> Result<Self, super::ConfigError> {
        config.validate()?;
        Ok(MemoryStore {
            shared: Arc::new(MemShared {
                name: name.into(),
                config,
                keys: RwLock::new(HashMap::default()),
                origin: Instant::now(),
            }),
        })
    }

    /// An empty store with the same name and configuration, for another key type.
    pub fn rekeyed<K2>(&self) -> MemoryStore<K2> {
        MemoryStore {
            shared: Arc::new(MemShared {
                name: self.shared.name.clone(),
                config: self.shared.config.clone(),
                keys: RwLock::new(HashMap::default()),
                origin: self.shared.origin,
            }),
        }
    }

    /// The configuration the store was built with.
    pub fn config(&self) -> &TokenBucketConfig {
        &self.shared.config
    }

    fn now(&self) -> Nanos {
        Instant::now()
            .saturating_duration_since(self.shared.origin)
            .as_nanos() as u64
    }

    fn slot(&self, key: &K) -> Slot {
        if let Some(s) = self
            .shared
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
        {
            return s.clone();
        }
        let label = key.label();
        let limits = match self.shared.config.resolve(&self.shared.name, &label) {
            Some(l) => l,
            None => {
                tracing::warn!(
                    key = %super::KeyDisplay(&self.shared.name, &label),
                    "token bucket: no limits configured for this key and no default; not limited"
                );
                KeyLimits::unlimited()
            }
        };
        let now = self.now();
        self.shared
            .keys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Mutex::new(KeyState::new(limits, now))))
            .clone()
    }

    fn existing(&self, key: &K) -> Option<Slot> {
        self.shared
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    // The four buckets are parallel arrays: indexing reads better than zipped iterators.
    #[allow(clippy::needless_range_loop)]
    fn reserve_now(
        &self,
        key: &K,
        cost: Cost,
        max_wait: Duration,
    ) -> Result<Admission<MemoryTicket>, Denied> {
        let slot = self.slot(key);
        let now = self.now();
        let mut s = lock(&slot);
        let c = cost.per_bucket();
        let mut at = now.max(s.floor).max(s.paused_until);
        for (i, b) in s.buckets.iter().enumerate() {
            if let Some(b) = b {
                if c[i] > b.capacity {
                    return Err(Denied::OverCapacity {
                        cost: c[i],
                        capacity: b.capacity,
                    });
                }
                at = at.max(s.tat[i].saturating_sub(b.tolerance(c[i])));
            }
        }
        let wait = Duration::from_nanos(at - now);
        if wait > max_wait {
            return Err(Denied::Throttled { retry_after: wait });
        }
        let tat_before = s.tat;
        let prev_floor = s.floor;
        for i in 0..4 {
            if let Some(b) = s.buckets[i] {
                if at > s.tat[i] {
                    s.epoch[i] += 1;
                }
                s.tat[i] = s.tat[i].max(at) + b.refill_time(c[i]);
            }
        }
        s.floor = at;
        s.seq += 1;
        let (seq, tat_after, epoch) = (s.seq, s.tat, s.epoch);
        drop(s);
        // The slot's `Arc` moves into the ticket: no second reference count update.
        let ticket = MemoryTicket {
            slot,
            seq,
            cost: c,
            tat_before,
            tat_after,
            epoch,
            prev_floor,
        };
        Ok(Admission { wait, ticket })
    }
}

impl<K> BucketStore<K> for MemoryStore<K>
where
    K: Clone + Eq + Hash + KeyLabel + Send + Sync + 'static,
{
    type Ticket = MemoryTicket;
    type Reserve = Ready<Result<Admission<MemoryTicket>, Denied>>;

    fn reserve(&self, key: &K, cost: Cost, max_wait: Duration) -> Self::Reserve {
        ready(self.reserve_now(key, cost, max_wait))
    }

    #[allow(clippy::needless_range_loop)]
    fn settle(&self, t: MemoryTicket, settlement: Settlement) {
        let now = self.now();
        let mut s = lock(&t.slot);
        let actual = match settlement {
            Settlement::Cancelled => [0; 4],
            Settlement::Used(cost) => cost.per_bucket(),
        };
        let tail = settlement == Settlement::Cancelled && s.seq == t.seq;
        let mut owed = [0; 4];
        for i in 0..4 {
            let Some(b) = s.buckets[i] else { continue };
            if actual[i] > t.cost[i] {
                // An overrun: consumed now.
                if now > s.tat[i] {
                    s.epoch[i] += 1;
                }
                s.tat[i] = s.tat[i].max(now) + b.refill_time(actual[i] - t.cost[i]);
            } else if actual[i] < t.cost[i] && s.epoch[i] == t.epoch[i] {
                let charged = t.tat_after[i] - t.tat_before[i];
                let refund = if tail {
                    charged
                } else {
                    b.refill_time(t.cost[i] - actual[i])
                        .min(t.tat_after[i].saturating_sub(s.floor))
                };
                s.tat[i] = s.tat[i].saturating_sub(refund);
                owed[i] = charged.saturating_sub(refund);
            }
        }
        if tail {
            s.floor = t.prev_floor;
            s.seq = t.seq - 1;
            // Earlier reservations cancelled mid-queue are now the tail: return the rest.
            while let Some(pos) = s.cancelled.iter().position(|c| c.seq == s.seq) {
                let c = s.cancelled.swap_remove(pos);
                for i in 0..4 {
                    if s.buckets[i].is_some() && s.epoch[i] == c.epoch[i] {
                        s.tat[i] = s.tat[i].saturating_sub(c.owed[i]);
                    }
                }
                s.floor = c.prev_floor;
                s.seq = c.seq - 1;
            }
        } else if settlement == Settlement::Cancelled {
            // Kept even when nothing is owed: it links the chain to the reservations before it.
            if s.cancelled.len() == MAX_CANCELLED {
                // Bounded memory: the oldest entry's rest is forgone (never over-generous).
                let oldest = (0..s.cancelled.len()).min_by_key(|&i| s.cancelled[i].seq);
                if let Some(i) = oldest {
                    s.cancelled.swap_remove(i);
                }
            }
            s.cancelled.push(Cancelled {
                seq: t.seq,
                owed,
                epoch: t.epoch,
                prev_floor: t.prev_floor,
            });
        }
    }

    fn paused_for(&self, t: &MemoryTicket) -> Option<Duration> {
        let now = self.now();
        let s = lock(&t.slot);
        (s.paused_until > now).then(|| Duration::from_nanos(s.paused_until - now))
    }

    fn pause(&self, key: &K, duration: Duration) {
        let slot = self.slot(key);
        let until = self
            .now()
            .saturating_add(duration.as_nanos().min(u64::MAX as u128) as u64);
        let mut s = lock(&slot);
        s.paused_until = s.paused_until.max(until);
    }

    fn clamp(&self, key: &K, remaining: Remaining) {
        let slot = self.slot(key);
        let now = self.now();
        let mut s = lock(&slot);
        for (i, rem) in remaining.per_bucket().into_iter().enumerate() {
            if let (Some(b), Some(rem)) = (s.buckets[i], rem) {
                let tat = now + b.refill_time(b.capacity.saturating_sub(rem));
                if tat > s.tat[i] {
                    s.tat[i] = tat;
                    s.epoch[i] += 1;
                }
            }
        }
    }

    fn set_limits(&self, key: &K, limits: KeyLimits) {
        let slot = self.slot(key);
        let now = self.now();
        let mut s = lock(&slot);
        let new = limits.buckets().map(|r| r.map(Bucket::new));
        for (i, nb) in new.iter().enumerate() {
            s.tat[i] = match (s.buckets[i], nb) {
                (Some(old), Some(nb)) => {
                    // Keep the level (debt included): same units missing, new refill speed.
                    let missing = old.capacity as f64 - old.level(s.tat[i], now);
                    let missing = missing.max(0.0) - (old.capacity as f64 - nb.capacity as f64);
                    now + (missing.max(0.0) * nb.nanos_per_unit).ceil() as u64
                }
                _ => now.max(s.tat[i]),
            };
            s.epoch[i] += 1;
        }
        s.buckets = new;
        s.limits = limits;
    }

    fn levels(&self, key: &K) -> Option<Levels> {
        let slot = self.existing(key)?;
        let now = self.now();
        let s = lock(&slot);
        Some(s.snapshot(now))
    }

    fn snapshot(&self) -> Vec<(K, Levels)> {
        let now = self.now();
        let keys = self
            .shared
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        keys.iter()
            .map(|(k, slot)| (k.clone(), lock(slot).snapshot(now)))
            .collect()
    }
}
