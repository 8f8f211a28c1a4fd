//! [`MemoryStore`]: the default store, every key's buckets in this process's memory.

use std::borrow::Borrow;
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use portcullis_core::{RateLimitHints, TokenCost};
use tokio::time::Instant;

use super::config::{ConfigError, KeyLimits, TokenBucketConfig};
use super::gcra::{End, KeyState, Nanos, nanos};
use super::per_bucket::{PerBucket, Remaining};
use super::store::{Admission, BucketStore, Denied, KeyLabel, Levels, Settlement};
use crate::keyed::{Entry, KeyMap, Kind, Neutral, Room};

/// One key's buckets.
#[derive(Debug)]
struct Buckets {
    state: Mutex<KeyState>,
    /// The store's time origin.
    origin: Instant,
    /// Given limits through [`BucketStore::set_limits`] (a handle): kept, never evicted.
    pinned: AtomicBool,
}

impl Neutral for Buckets {
    /// Full, with nothing queued and no pause, and no limits set by hand.
    fn is_neutral(&self, now: Instant) -> bool {
        !self.pinned.load(Ordering::Relaxed)
            && self
                .state
                .try_lock()
                .is_ok_and(|s| s.is_full(nanos(now.saturating_duration_since(self.origin))))
    }
}

type Slot = Arc<Entry<Buckets>>;

fn lock(slot: &Slot) -> MutexGuard<'_, KeyState> {
    // A panic while holding the lock cannot leave the plain numbers half-written in a way that
    // matters more than losing the limiter: keep going.
    slot.state.lock().unwrap_or_else(PoisonError::into_inner)
}

struct MemShared<K> {
    name: Arc<str>,
    config: TokenBucketConfig,
    keys: KeyMap<K, Buckets>,
    origin: Instant,
}

/// The default store: every key's buckets in this process's memory.
///
/// One `std::sync::Mutex` per key, held for a few arithmetic operations (the
/// [`gcra`](super::gcra) module); a read lock on the key map to find it. A reservation for a key
/// already seen allocates nothing.
///
/// The keys are bounded by [`TokenBucketConfig::keys`] (see [`KeyBounds`]):
///
/// - a key unused for `keys.idle_timeout` whose buckets are full, with no reservation live and
///   no pause, is dropped; it comes back full, with its configured limits (limits it learned
///   from its provider's headers are learned again from the next response). A key in debt,
///   paused or with a reservation is never dropped, so dropping cannot reset a limit. A key
///   given limits through [`set_limits`](BucketStore::set_limits) (the handle) is kept.
/// - at most `keys.max_keys` keys created by requests; beyond it, new keys share one
///   **overflow** bucket with the `default` limits (unlimited without a default): its levels,
///   its pauses and the limits learned for it, which only ever go down there. Keys named in
///   `limits`, and keys given limits by a handle, are not counted and never share it.
///
/// Cloning shares the state.
///
/// [`KeyBounds`]: crate::keyed::KeyBounds
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

impl<K> MemoryStore<K> {
    fn with_origin(name: Arc<str>, config: TokenBucketConfig, origin: Instant) -> Self {
        let keys = KeyMap::new(config.keys, super::config::COMPONENT, name.clone());
        MemoryStore {
            shared: Arc::new(MemShared {
                name,
                config,
                keys,
                origin,
            }),
        }
    }

    /// An empty store with the same name and configuration, for another key type.
    pub fn rekeyed<K2>(&self) -> MemoryStore<K2> {
        let s = &self.shared;
        MemoryStore::with_origin(s.name.clone(), s.config.clone(), s.origin)
    }

    /// How many keys have their own buckets now: at most
    /// [`keys.max_keys`](TokenBucketConfig::keys) created by requests, plus the keys named in
    /// the configuration's `limits` or given limits through a handle. Keys beyond the cap
    /// share the overflow bucket, not counted here. Takes the map's read lock.
    pub fn key_count(&self) -> usize {
        self.shared.keys.len()
    }
}

/// A reservation in a [`MemoryStore`]. Dropped without being settled, it keeps its charge.
#[derive(Debug)]
pub struct MemoryTicket {
    slot: Slot,
    seq: u64,
    estimate: PerBucket<u64>,
    open: bool,
}

impl MemoryTicket {
    fn end(&mut self, end: End) {
        if std::mem::take(&mut self.open) {
            let now = since(self.slot.origin);
            lock(&self.slot).end(self.seq, self.estimate, end, now);
        }
    }
}

impl Drop for MemoryTicket {
    fn drop(&mut self) {
        self.end(End::Kept);
    }
}

/// The reservation future of a [`MemoryStore`]: the reservation is made when the store is
/// called, and the future is ready at once. Dropped before it handed the reservation over (a
/// response future dropped before its first poll), it cancels it.
#[derive(Debug)]
pub struct MemoryReserve(Option<Result<Admission<MemoryTicket>, Denied>>);

impl Future for MemoryReserve {
    type Output = Result<Admission<MemoryTicket>, Denied>;
    fn poll(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Self::Output> {
        Poll::Ready(
            self.0
                .take()
                .expect("MemoryReserve polled after completion"),
        )
    }
}

impl Drop for MemoryReserve {
    fn drop(&mut self) {
        if let Some(Ok(mut a)) = self.0.take() {
            a.ticket.end(End::Cancelled);
        }
    }
}

/// The store's time: nanoseconds since `origin`.
fn since(origin: Instant) -> Nanos {
    nanos(Instant::now().saturating_duration_since(origin))
}

impl<K> MemoryStore<K>
where
    K: Clone + Eq + Hash + KeyLabel + Send + Sync + 'static,
{
    /// A store whose keys take their limits from `config` (validated here), displayed under
    /// `name` (the provider: `openai`).
    pub fn new(name: impl Into<Arc<str>>, config: TokenBucketConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(MemoryStore::with_origin(
            name.into(),
            config,
            Instant::now(),
        ))
    }

    /// The configuration the store was built with.
    pub fn config(&self) -> &TokenBucketConfig {
        &self.shared.config
    }

    fn now(&self) -> Nanos {
        since(self.shared.origin)
    }

    /// `key`'s buckets, marked used; new ones for a new key (counted against the cap unless
    /// `room` or the configuration exempts it), or the overflow bucket.
    fn slot_in(&self, key: &K, room: Room) -> Slot {
        let shared = &*self.shared;
        if let Some(slot) = shared.keys.get(key) {
            shared.keys.touch(&slot);
            return slot;
        }
        let label = key.label();
        let room = match room {
            Room::Capped if !shared.config.names(&shared.name, &label) => Room::Capped,
            _ => Room::Exempt,
        };
        shared.keys.entry(key, room, |kind| {
            let limits = match kind {
                Kind::Overflow => shared.config.default,
                Kind::Counted | Kind::Exempt => shared.config.resolve(&shared.name, &label),
            };
            let limits = limits.unwrap_or_else(|| {
                let key = super::KeyDisplay(&shared.name, &label);
                match shared.config.learn_limits {
                    true => tracing::debug!(
                        %key,
                        "token bucket: no limits configured for this key; not limited until its provider states them"
                    ),
                    false => tracing::warn!(
                        %key,
                        "token bucket: no limits configured for this key and no default; not limited"
                    ),
                }
                KeyLimits::unlimited()
            });
            Buckets {
                state: Mutex::new(KeyState::new(limits, self.now())),
                origin: shared.origin,
                pinned: AtomicBool::new(false),
            }
        })
    }

    fn slot(&self, key: &K) -> Slot {
        self.slot_in(key, Room::Capped)
    }

    /// Runs `f` on `key`'s state (created if new) at the store's time.
    fn with_key(&self, key: &K, f: impl FnOnce(&mut KeyState, Nanos)) {
        let slot = self.slot(key);
        let now = self.now();
        f(&mut lock(&slot), now);
    }

    fn reserve_now(
        &self,
        key: &K,
        cost: TokenCost,
        max_wait: Duration,
    ) -> Result<Admission<MemoryTicket>, Denied> {
        let slot = self.slot(key);
        let now = self.now();
        let estimate = PerBucket::from(cost);
        let (wait, seq) = lock(&slot).reserve(estimate, max_wait, now)?;
        // The slot's `Arc` moves into the ticket: no second reference count update.
        let ticket = MemoryTicket {
            slot,
            seq,
            estimate,
            open: true,
        };
        Ok(Admission { wait, ticket })
    }
}

impl<K> BucketStore for MemoryStore<K>
where
    K: Clone + Eq + Hash + KeyLabel + Send + Sync + 'static,
{
    type Key = K;
    type Ticket = MemoryTicket;
    type Reserve = MemoryReserve;

    fn reserve(&self, key: &K, cost: TokenCost, max_wait: Duration) -> MemoryReserve {
        MemoryReserve(Some(self.reserve_now(key, cost, max_wait)))
    }

    fn settle(&self, mut t: MemoryTicket, settlement: Settlement) {
        t.end(match settlement {
            Settlement::Cancelled => End::Cancelled,
            Settlement::Used(cost) => End::Used(PerBucket::from(cost)),
        });
    }

    fn wait(&self, t: &MemoryTicket, waker: &Waker) -> Duration {
        let now = self.now();
        lock(&t.slot).wait(t.seq, waker, now)
    }

    fn pause(&self, key: &K, duration: Duration) {
        self.with_key(key, |s, now| s.pause(now.saturating_add(nanos(duration))));
    }

    fn clear_pause(&self, key: &K) {
        self.with_key(key, |s, _| s.clear_pause());
    }

    fn clamp(&self, key: &K, remaining: Remaining) {
        self.with_key(key, |s, now| s.clamp(remaining, now));
    }

    /// Also keeps the key: one given limits by hand is never evicted, and has its own buckets
    /// even beyond the cap.
    fn set_limits(&self, key: &K, limits: KeyLimits) {
        let slot = self.slot_in(key, Room::Exempt);
        slot.pinned.store(true, Ordering::Relaxed);
        let now = self.now();
        lock(&slot).set_limits(limits, now);
    }

    /// The overflow bucket, shared by keys that may state different limits, only lowers its
    /// limits by those stated.
    fn learn_limits(&self, key: &K, stated: &RateLimitHints) {
        let shared = &self.shared;
        let Some(learned) = shared.config.learned(stated) else {
            return;
        };
        let slot = self.slot(key);
        let mut s = lock(&slot);
        // The same limits as last time (the common case): nothing to do, nothing to resolve.
        if s.learned == Some(learned) {
            return;
        }
        s.learned = Some(learned);
        let label = key.label();
        let combined = shared.config.with_learned(&shared.name, &label, learned);
        let limits = match slot.is_overflow() {
            true => s.limits().lower(combined),
            false => combined,
        };
        if s.limits() != limits {
            tracing::debug!(
                key = %super::KeyDisplay(&shared.name, &label),
                ?limits,
                "token bucket: limits learned from the provider's headers"
            );
            s.set_limits(limits, self.now());
        }
    }

    fn levels<Q>(&self, key: &Q) -> Option<Levels>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let slot = self.shared.keys.get(key)?;
        let now = self.now();
        let levels = lock(&slot).snapshot(now);
        Some(levels)
    }

    fn snapshot(&self) -> Vec<(K, Levels)> {
        let now = self.now();
        let mut all = Vec::new();
        self.shared.keys.for_each(|k, b| {
            let levels = b
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .snapshot(now);
            all.push((k.clone(), levels));
        });
        all
    }

    fn key_count(&self) -> usize {
        MemoryStore::key_count(self)
    }
}
