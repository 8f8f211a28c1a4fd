//! Bounded keyed state: the map of per-key states that the circuit breaker and the in-memory
//! token bucket keep, with a cap on its size and idle keys evicted.
//!
//! The key comes from the request (by default its model), and a client may choose it: a
//! gateway that forwards the model string would otherwise keep one state per string it was
//! ever sent, for ever. Two rules bound it, both set by [`KeyBounds`] and on by default:
//!
//! - **Idle keys are evicted.** A key not used for [`idle_timeout`](KeyBounds::idle_timeout)
//!   whose state is *neutral* (as a new key's would be: a breaker CLOSED with no failure in its
//!   windows, a bucket full with no pause) and that nothing else holds (no call in flight, no
//!   reservation, no service that used it last) is dropped; it comes back fresh when next
//!   used. A key that still holds something (an OPEN breaker, a bucket in debt, a call in
//!   flight) is never evicted, so eviction can never be used to reset a limit. What an evicted
//!   key forgets is what a neutral key only remembers for observation: its counters, and
//!   limits learned from a provider's headers (learned again from the next response).
//! - **At most [`max_keys`](KeyBounds::max_keys) keys** created by requests. Beyond it, every
//!   new key shares one **overflow** state per layer (one breaker, one bucket with the default
//!   limits), and a `warn` event says so at most once a minute. Sharing is the middle ground:
//!   refusing new keys would turn a full map into an outage for every new model, and leaving
//!   them unguarded would let anyone bypass the limits by inventing model names; a shared
//!   state keeps them guarded, at worst more strictly than they would be on their own. Keys
//!   the configuration or the operator names (the token bucket's `limits`, a handle's
//!   `set_limits` or `force_open`) are not counted and never overflow, so flooding the map
//!   cannot push a configured model into the overflow state.
//!
//! Sweeps are amortized: one pass over the map, under its write lock, at most once per eighth
//! of the idle timeout, and only when a key is being added (a map that does not grow needs no
//! sweep), including one that would overflow. A key in use costs no lock and no clock read to
//! keep alive: each use stores the map's current *epoch* (bumped by each sweep) in the key,
//! when it differs. So a sweep knows when a key was last used only to within the sweeps around
//! that use: an evicted key was always unused for at least the idle timeout, and under a steady
//! flow of new keys (what needs bounding) it goes within about 1.25 times the idle timeout;
//! after a spell without new keys, it may take one more idle timeout.

use std::borrow::Borrow;
use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash};
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering, fence};
use std::sync::{Arc, OnceLock, PoisonError, RwLock, RwLockWriteGuard};
use std::time::Duration;

use portcullis_core::config::{self, ConfigError, millis};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::key::FxBuildHasher;

/// The default [`KeyBounds::max_keys`]: 10 000 keys.
pub const DEFAULT_MAX_KEYS: usize = 10_000;

/// The default [`KeyBounds::idle_timeout`]: 10 minutes.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

/// How many keys a layer keeps, and for how long an unused one stays. See the
/// [module docs](self).
///
/// The defaults (10 000 keys, 10 minutes) are far above what a deployment that names its
/// models uses (a few dozen keys, a few KiB each), so they never touch it, while a flood of
/// invented names costs at most about 10 MiB per layer. Ten minutes outlasts the per-minute
/// windows providers state their limits in, so a model used every few minutes keeps its
/// counters and learned limits. A layer keyed by something with many legitimate values (a
/// tenant) should raise `max_keys`; to turn both bounds off, set `max_keys` to `usize::MAX`
/// and `idle_timeout` to [`MAX_DURATION`](portcullis_core::config::MAX_DURATION).
///
/// In files: `"keys": {"max_keys": 10000, "idle_timeout_ms": 600000}`.
///
/// ```
/// use std::time::Duration;
/// use portcullis_layers::keyed::KeyBounds;
/// let keys: KeyBounds = serde_json::from_str(r#"{"max_keys": 500}"#).unwrap();
/// assert_eq!(keys, KeyBounds::new(500, Duration::from_secs(600)));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeyBounds {
    /// The most keys requests may create (at least 1); keys beyond it share the overflow
    /// state. Keys named by the configuration or through a handle are not counted.
    pub max_keys: usize,
    /// How long a neutral key stays unused before it is evicted (above zero, at most a year).
    #[serde(rename = "idle_timeout_ms", with = "millis")]
    pub idle_timeout: Duration,
}

impl Default for KeyBounds {
    fn default() -> Self {
        KeyBounds::new(DEFAULT_MAX_KEYS, DEFAULT_IDLE_TIMEOUT)
    }
}

impl KeyBounds {
    /// At most `max_keys` keys, each evicted after `idle_timeout` unused and neutral.
    pub fn new(max_keys: usize, idle_timeout: Duration) -> Self {
        KeyBounds {
            max_keys,
            idle_timeout,
        }
    }

    /// Checks both values, for `component`'s `keys` field.
    pub(crate) fn validate(&self, component: &'static str) -> Result<(), ConfigError> {
        if self.max_keys == 0 {
            return Err(ConfigError::new(
                component,
                "keys.max_keys",
                "must be at least 1",
            ));
        }
        config::positive(component, "keys.idle_timeout_ms", self.idle_timeout).map(drop)
    }
}

/// A per-key state that can tell whether it may be dropped.
pub(crate) trait Neutral {
    /// Whether the state is as a new key's would be at `now`, so that dropping it and starting
    /// afresh loses no limit. Called only when nothing else holds the state.
    fn is_neutral(&self, now: Instant) -> bool;
}

/// How a key may be added.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Room {
    /// A key from a request: counted against the cap; beyond it, the overflow state.
    Capped,
    /// A key named by the configuration or the operator: never counted, never refused.
    Exempt,
}

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A key's own state, counted against the cap.
    Counted,
    /// A key's own state, not counted.
    Exempt,
    /// The state shared by the keys beyond the cap.
    Overflow,
}

/// One key's state in a [`KeyMap`], with the epoch of its last use.
#[derive(Debug)]
pub(crate) struct Entry<V> {
    value: V,
    seen: AtomicU64,
    kind: Kind,
}

impl<V> Entry<V> {
    /// Whether this is the overflow state.
    pub(crate) fn is_overflow(&self) -> bool {
        self.kind == Kind::Overflow
    }
}

impl<V> Deref for Entry<V> {
    type Target = V;
    fn deref(&self) -> &V {
        &self.value
    }
}

/// How often the overflow `warn` event may repeat.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// A map of per-key states bounded by [`KeyBounds`], shared by a layer's clones. Lookups take
/// its read lock; only adding a key (and the sweep it may run) takes the write lock. `S`
/// hashes the keys.
pub(crate) struct KeyMap<K, V, S = FxBuildHasher> {
    bounds: KeyBounds,
    /// What the map belongs to, for the overflow warning: the component and the layer's name.
    owner: (&'static str, Arc<str>),
    keys: RwLock<Keys<K, V, S>>,
    /// The current epoch; bumped by each sweep.
    epoch: AtomicU64,
    /// Entries of [`Kind::Counted`].
    counted: AtomicUsize,
    /// When the next sweep is due, and the next overflow warning may be sent (nanoseconds
    /// since `origin`).
    next_sweep: AtomicU64,
    next_warn: AtomicU64,
    /// Calls sent to the overflow state since the last warning.
    overflowed: AtomicU64,
    overflow: OnceLock<Arc<Entry<V>>>,
    origin: Instant,
}

struct Keys<K, V, S> {
    map: HashMap<K, Arc<Entry<V>>, S>,
    /// When each epoch from `first` on started (nanoseconds since `origin`). An entry last
    /// seen in an epoch before `first` was last used before `first` started, at least the idle
    /// timeout before the last sweep.
    starts: VecDeque<u64>,
    first: u64,
}

/// `d` in nanoseconds, saturating.
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl<K, V, S: Default> KeyMap<K, V, S> {
    /// An empty map (`bounds` already validated), owned by `component` `name`.
    pub(crate) fn new(bounds: KeyBounds, component: &'static str, name: Arc<str>) -> Self {
        KeyMap {
            bounds,
            owner: (component, name),
            keys: RwLock::new(Keys {
                map: HashMap::default(),
                starts: VecDeque::from([0]),
                first: 0,
            }),
            epoch: AtomicU64::new(0),
            counted: AtomicUsize::new(0),
            next_sweep: AtomicU64::new(0),
            next_warn: AtomicU64::new(0),
            overflowed: AtomicU64::new(0),
            overflow: OnceLock::new(),
            origin: Instant::now(),
        }
    }

    /// How many keys have their own state (the overflow state is not one of them).
    pub(crate) fn len(&self) -> usize {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .map
            .len()
    }
}

impl<K, V, S> KeyMap<K, V, S>
where
    K: Clone + Eq + Hash,
    V: Neutral,
    S: BuildHasher,
{
    fn now(&self) -> u64 {
        nanos(Instant::now().saturating_duration_since(self.origin))
    }

    /// The time between sweeps.
    fn tick(&self) -> u64 {
        nanos(self.bounds.idle_timeout / 8).max(1_000_000)
    }

    /// Marks `entry` used now: one load of the epoch, and a store only when it changed.
    #[inline]
    pub(crate) fn touch(&self, entry: &Entry<V>) {
        let epoch = self.epoch.load(Ordering::Relaxed);
        if entry.seen.load(Ordering::Relaxed) != epoch {
            entry.seen.store(epoch, Ordering::Relaxed);
        }
    }

    /// `key`'s state, if it has one, without marking it used (for observers).
    pub(crate) fn get<Q>(&self, key: &Q) -> Option<Arc<Entry<V>>>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        keys.map.get(key).cloned()
    }

    /// `key`'s state, marked used: the existing one, or a new one from `make` (the overflow
    /// state for a [`Room::Capped`] key when the map is full). `make` learns which kind it
    /// builds.
    pub(crate) fn entry(&self, key: &K, room: Room, make: impl FnOnce(Kind) -> V) -> Arc<Entry<V>> {
        if let Some(e) = self.get(key) {
            self.touch(&e);
            return e;
        }
        let now = self.now();
        let full =
            || room == Room::Capped && self.counted.load(Ordering::Relaxed) >= self.bounds.max_keys;
        if full() && now < self.next_sweep.load(Ordering::Relaxed) {
            return self.overflow(now, make);
        }
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = keys.map.get(key) {
            self.touch(e);
            return e.clone();
        }
        if now >= self.next_sweep.load(Ordering::Relaxed) {
            self.sweep(&mut keys, now);
        }
        if full() {
            drop(keys);
            return self.overflow(now, make);
        }
        let kind = match room {
            Room::Capped => Kind::Counted,
            Room::Exempt => Kind::Exempt,
        };
        let entry = Arc::new(Entry {
            value: make(kind),
            seen: AtomicU64::new(self.epoch.load(Ordering::Relaxed)),
            kind,
        });
        keys.map.insert(key.clone(), entry.clone());
        if kind == Kind::Counted {
            self.counted.fetch_add(1, Ordering::Relaxed);
        }
        entry
    }

    /// The overflow state (built by `make` the first time), with a warning at most once per
    /// [`WARN_EVERY`].
    fn overflow(&self, now: u64, make: impl FnOnce(Kind) -> V) -> Arc<Entry<V>> {
        let entry = self.overflow.get_or_init(|| {
            Arc::new(Entry {
                value: make(Kind::Overflow),
                seen: AtomicU64::new(0),
                kind: Kind::Overflow,
            })
        });
        self.overflowed.fetch_add(1, Ordering::Relaxed);
        let next = self.next_warn.load(Ordering::Relaxed);
        let later = now.saturating_add(nanos(WARN_EVERY));
        if now >= next
            && self
                .next_warn
                .compare_exchange(next, later, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                component = self.owner.0,
                name = %self.owner.1,
                max_keys = self.bounds.max_keys,
                calls = self.overflowed.swap(0, Ordering::Relaxed),
                "key limit reached: new keys share one overflow state (raise `keys.max_keys`, \
                 or name the keys in the configuration)"
            );
        }
        entry.clone()
    }

    /// Starts a new epoch and evicts every entry that is idle, held by nothing else and
    /// neutral. Runs under the write lock, at most once per [`tick`](Self::tick).
    fn sweep(&self, keys: &mut RwLockWriteGuard<'_, Keys<K, V, S>>, now: u64) {
        self.next_sweep
            .store(now.saturating_add(self.tick()), Ordering::Relaxed);
        self.epoch.fetch_add(1, Ordering::Relaxed);
        keys.starts.push_back(now);
        // Drop the epochs whose successor started at least the idle timeout ago: whatever was
        // last seen in them has been idle that long.
        if let Some(cutoff) = now.checked_sub(nanos(self.bounds.idle_timeout)) {
            while keys.starts.get(1).is_some_and(|&next| next <= cutoff) {
                keys.starts.pop_front();
                keys.first += 1;
            }
        }
        let first = keys.first;
        let at = self.origin + Duration::from_nanos(now);
        let mut evicted = 0;
        keys.map.retain(|_, e| {
            let idle = e.seen.load(Ordering::Relaxed) < first && Arc::strong_count(e) == 1;
            // Whatever the last holder did to it happened before it let go.
            let evict = idle && {
                fence(Ordering::Acquire);
                e.value.is_neutral(at)
            };
            evicted += usize::from(evict && e.kind == Kind::Counted);
            !evict
        });
        self.counted.fetch_sub(evicted, Ordering::Relaxed);
        let len = keys.map.len();
        if keys.map.capacity() > 4 * len.max(16) {
            keys.map.shrink_to(2 * len);
        }
    }

    /// Runs `f` on every key and its state, under the read lock.
    pub(crate) fn for_each(&self, mut f: impl FnMut(&K, &V)) {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        for (k, e) in &keys.map {
            f(k, e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicBool;

    struct State(AtomicBool);
    impl Neutral for State {
        fn is_neutral(&self, _: Instant) -> bool {
            self.0.load(Ordering::Relaxed)
        }
    }

    fn map(max: usize) -> KeyMap<u32, State> {
        let bounds = KeyBounds::new(max, Duration::from_secs(80));
        KeyMap::new(bounds, "test", "t".into())
    }

    fn add(m: &KeyMap<u32, State>, k: u32) -> Arc<Entry<State>> {
        m.entry(&k, Room::Capped, |_| State(AtomicBool::new(true)))
    }

    fn has(m: &KeyMap<u32, State>, k: u32) -> bool {
        m.get(&k).is_some()
    }

    /// Ten seconds later, with a new key (from 100 on): a sweep per tick.
    async fn tick(m: &KeyMap<u32, State>, n: &mut u32) {
        tokio::time::advance(Duration::from_secs(10)).await;
        *n += 1;
        add(m, 100 + *n);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_neutral_unheld_entries_go_and_the_rest_stay() {
        let m = map(100);
        let n = &mut 0;
        let held = add(&m, 1);
        add(&m, 2).0.store(false, Ordering::Relaxed); // not neutral
        add(&m, 3);
        add(&m, 4);
        for _ in 0..7 {
            tick(&m, n).await;
        }
        // 79 s: 4 is used again.
        tokio::time::advance(Duration::from_secs(9)).await;
        add(&m, 4);
        tokio::time::advance(Duration::from_secs(1)).await;
        add(&m, 100);
        // 80 s: nothing has been idle 80 s yet.
        assert!((1..=4).all(|k| has(&m, k)));
        tick(&m, n).await;
        // 90 s: 3 was idle since 0 s, neutral and held by nothing; 1 is held, 2 not neutral.
        assert!(!has(&m, 3));
        assert!(has(&m, 1) && has(&m, 2) && has(&m, 4));
        drop(held);
        tick(&m, n).await;
        assert!(!has(&m, 1), "once let go");
        for _ in 0..5 {
            tick(&m, n).await;
        }
        assert!(has(&m, 4), "150 s: 4 was used at 79 s");
        tick(&m, n).await;
        assert!(!has(&m, 4), "160 s: 4 is gone");
        assert!(has(&m, 2));
        let count = m.counted.load(Ordering::Relaxed);
        assert_eq!(count, m.len());
        assert!(
            count <= 10,
            "the keys added every 10 s go too: {count} left"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn beyond_the_cap_keys_share_the_overflow_entry_and_exempt_ones_do_not_count() {
        let m = map(2);
        assert!(!add(&m, 1).is_overflow());
        assert!(!add(&m, 2).is_overflow());
        let a = add(&m, 3);
        let b = add(&m, 4);
        assert!(a.is_overflow() && Arc::ptr_eq(&a, &b));
        let named = m.entry(&5, Room::Exempt, |_| State(AtomicBool::new(true)));
        assert!(!named.is_overflow());
        assert_eq!(m.len(), 3);
        // A sweep at 100 s knows 1 and 2 were last used before 100 s, not that they are
        // idle; the one at 180 s does, and makes room.
        tokio::time::advance(Duration::from_secs(100)).await;
        assert!(add(&m, 6).is_overflow());
        tokio::time::advance(Duration::from_secs(80)).await;
        assert!(!add(&m, 7).is_overflow());
        assert!(!has(&m, 1) && !has(&m, 2) && has(&m, 5));
    }

    #[test]
    fn bounds_are_validated() {
        assert!(KeyBounds::default().validate("x").is_ok());
        let e = KeyBounds::new(0, DEFAULT_IDLE_TIMEOUT)
            .validate("x")
            .unwrap_err();
        assert_eq!(e.field, "keys.max_keys");
        let e = KeyBounds::new(1, Duration::ZERO).validate("x").unwrap_err();
        assert_eq!(e.field, "keys.idle_timeout_ms");
        let year_and_a_day = config::MAX_DURATION + Duration::from_secs(86_400);
        assert!(KeyBounds::new(1, year_and_a_day).validate("x").is_err());
    }
}
