//! [`MemoryStore`]: the default store, every key's buckets in this process's memory.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt::Debug;
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use portcullis_core::{RateLimitHints, TokenCost};
use tokio::time::Instant;

use super::config::{ConfigError, KeyLimits, TokenBucketConfig};
use super::gcra::{End, KeyState, Nanos, nanos};
use super::per_bucket::{PerBucket, Remaining};
use super::store::{Admission, BucketStore, Denied, KeyLabel, Levels, Settlement};
use crate::key::FxBuildHasher;

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
/// One `std::sync::Mutex` per key, held for a few arithmetic operations (the
/// [`gcra`](super::gcra) module); a read lock on the key map to find it. A reservation for a key
/// already seen allocates nothing. Keys are kept for the life of the store (one per model: a
/// handful).
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

impl<K> MemoryStore<K> {
    fn with_origin(name: Arc<str>, config: TokenBucketConfig, origin: Instant) -> Self {
        MemoryStore {
            shared: Arc::new(MemShared {
                name,
                config,
                keys: RwLock::new(HashMap::default()),
                origin,
            }),
        }
    }

    /// An empty store with the same name and configuration, for another key type.
    pub fn rekeyed<K2>(&self) -> MemoryStore<K2> {
        let s = &self.shared;
        MemoryStore::with_origin(s.name.clone(), s.config.clone(), s.origin)
    }
}

/// A reservation in a [`MemoryStore`]. Dropped without being settled, it keeps its charge.
#[derive(Debug)]
pub struct MemoryTicket {
    slot: Slot,
    seq: u64,
    estimate: PerBucket<u64>,
    origin: Instant,
    open: bool,
}

impl MemoryTicket {
    fn end(&mut self, end: End) {
        if std::mem::take(&mut self.open) {
            let now = since(self.origin);
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

    fn existing<Q>(&self, key: &Q) -> Option<Slot>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shared
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    fn slot(&self, key: &K) -> Slot {
        if let Some(s) = self.existing(key) {
            return s;
        }
        let label = key.label();
        let limits = self
            .shared
            .config
            .resolve(&self.shared.name, &label)
            .unwrap_or_else(|| {
                let key = super::KeyDisplay(&self.shared.name, &label);
                match self.shared.config.learn_limits {
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
        let now = self.now();
        self.shared
            .keys
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.clone())
            .or_insert_with(|| Arc::new(Mutex::new(KeyState::new(limits, now))))
            .clone()
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
            origin: self.shared.origin,
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

    fn set_limits(&self, key: &K, limits: KeyLimits) {
        self.with_key(key, |s, now| s.set_limits(limits, now));
    }

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
        let limits = shared.config.with_learned(&shared.name, &label, learned);
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
        let slot = self.existing(key)?;
        let now = self.now();
        let levels = lock(&slot).snapshot(now);
        Some(levels)
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
