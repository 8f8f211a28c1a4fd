//! Observing and steering the breakers: [`CircuitBreakerHandle`].

use std::borrow::Borrow;
use std::fmt;
use std::hash::Hash;
use std::sync::Arc;

use tokio::sync::broadcast;
use tokio::time::Instant;

use super::events::{CircuitMetrics, CircuitState, Transition};
use super::state::{KeyState, Shared};
use crate::keyed::Room;

/// Reads and steers the breakers of a layer and every service built from it.
///
/// Get one from [`CircuitBreakerLayer::handle`](super::CircuitBreakerLayer::handle) or
/// [`CircuitBreaker::handle`](super::CircuitBreaker::handle). Clones share everything.
pub struct CircuitBreakerHandle<K> {
    pub(crate) shared: Arc<Shared<K>>,
}

impl<K> Clone for CircuitBreakerHandle<K> {
    fn clone(&self) -> Self {
        CircuitBreakerHandle {
            shared: self.shared.clone(),
        }
    }
}

impl<K: fmt::Debug> fmt::Debug for CircuitBreakerHandle<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreakerHandle")
            .field("name", &self.shared.common.name)
            .finish_non_exhaustive()
    }
}

impl<K> CircuitBreakerHandle<K>
where
    K: Clone + Eq + Hash + fmt::Debug + Send + Sync + 'static,
{
    /// The breaker's name.
    pub fn name(&self) -> &str {
        &self.shared.common.name
    }

    /// The state of `key`'s breaker: CLOSED for a key with no breaker of its own (never seen,
    /// evicted while CLOSED, or beyond the cap, whose calls go through the overflow breaker).
    /// Like a call, it moves an OPEN breaker whose recovery timeout elapsed to HALF_OPEN.
    pub fn state<Q>(&self, key: &Q) -> CircuitState
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.on(key, KeyState::state)
            .unwrap_or(CircuitState::Closed)
    }

    /// How long until `key`'s breaker would admit a call: zero if it would now (CLOSED, a key
    /// never seen, or a free HALF_OPEN probe slot), else the time left OPEN or until the oldest
    /// probe's permit expires. Nothing is taken or counted: this is the breaker's answer to a
    /// fallback's "can this entry take the call now?" ([`fallback::choose`]). While CLOSED it
    /// costs one atomic load.
    ///
    /// ```
    /// use std::time::Duration;
    /// use portcullis_layers::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let handle = CircuitBreakerLayer::new("openai", CircuitBreakerConfig::default()).unwrap().handle();
    /// assert_eq!(handle.availability("gpt-4o-mini"), Duration::ZERO);
    /// handle.force_open("gpt-4o-mini");
    /// assert!(handle.availability("gpt-4o-mini") > Duration::ZERO);
    /// # }
    /// ```
    ///
    /// [`fallback::choose`]: crate::fallback::choose
    pub fn availability<Q>(&self, key: &Q) -> std::time::Duration
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.on(key, KeyState::availability).unwrap_or_default()
    }

    /// A snapshot of `key`'s breaker, or `None` for a key with no breaker of its own.
    pub fn metrics<Q>(&self, key: &Q) -> Option<CircuitMetrics>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.on(key, KeyState::metrics)
    }

    /// Every key that has its own breaker now (see [`key_count`](Self::key_count)).
    pub fn keys(&self) -> Vec<K> {
        self.shared.keys()
    }

    /// How many keys have their own breaker now: at most
    /// [`keys.max_keys`](super::CircuitBreakerConfig::keys) created by requests, plus those
    /// named through [`force_open`](Self::force_open). Keys beyond the cap share one overflow
    /// breaker, not counted here; a key unused for `keys.idle_timeout` whose breaker is CLOSED
    /// with no failure pending and no call in flight is dropped (and comes back fresh, its
    /// counters at zero). Reading it takes the map's read lock: it is for monitoring, not for
    /// every call.
    pub fn key_count(&self) -> usize {
        self.shared.keys.len()
    }

    /// Opens `key`'s breaker until [`force_closed`](Self::force_closed) or
    /// [`reset`](Self::reset): no recovery timeout applies. The key gets its own breaker even
    /// beyond the cap: one the operator names is never the overflow breaker.
    pub fn force_open(&self, key: impl Into<K>) {
        self.shared
            .get_or_insert(&key.into(), Room::Exempt)
            .force_open(Instant::now());
    }

    /// Closes `key`'s breaker, clearing its windows (a no-op when already closed).
    pub fn force_closed<Q>(&self, key: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.on(key, KeyState::force_closed);
    }

    /// Closes `key`'s breaker and zeroes its counters and windows. Calls in flight no longer
    /// count.
    pub fn reset<Q>(&self, key: &Q)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.on(key, KeyState::reset);
    }

    /// Runs `f` on `key`'s breaker, now, if the key was seen.
    fn on<Q, R>(&self, key: &Q, f: impl FnOnce(&KeyState<K>, Instant) -> R) -> Option<R>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.shared.get(key).map(|k| f(&k, Instant::now()))
    }

    /// Receives every transition from now on, of every key. A receiver that falls more than
    /// [`EVENT_CAPACITY`](super::EVENT_CAPACITY) events behind gets
    /// `RecvError::Lagged` and skips the oldest.
    pub fn subscribe(&self) -> broadcast::Receiver<Transition<K>> {
        self.shared.common.events.subscribe()
    }
}
