//! The state behind the buckets: the [`BucketStore`] trait and its vocabulary.
//!
//! The arithmetic every store follows is in the [`gcra`](super::gcra) module docs; the
//! in-memory store is [`MemoryStore`](super::MemoryStore).
//!
//! # Writing a shared store
//!
//! [`BucketStore::reserve`] is the only asynchronous method: one call is one admission, and a
//! shared store implements it as one atomic round trip (a Redis Lua script that runs the
//! algorithm on every bucket of the key, with the server's clock). It returns the *wait*, not
//! an instant, so the store's clock and the caller's need not agree. The other methods are
//! synchronous and infallible: they run in `Drop` and in response hooks, so a remote store
//! sends them in the background.

use std::borrow::{Borrow, Cow};
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::task::Waker;
use std::time::Duration;

use portcullis_core::{RateLimitHints, TokenCost};

use super::config::KeyLimits;
use super::per_bucket::{PerBucket, Remaining};

/// How a key reads in configuration and logs. The layer displays a key as `name:label`.
pub trait KeyLabel {
    /// The label (`gpt-4o-mini` for the default model key).
    fn label(&self) -> Cow<'_, str>;
}

impl KeyLabel for Arc<str> {
    fn label(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }
}

impl KeyLabel for String {
    fn label(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }
}

impl KeyLabel for &'static str {
    fn label(&self) -> Cow<'_, str> {
        Cow::Borrowed(self)
    }
}

impl KeyLabel for () {
    fn label(&self) -> Cow<'_, str> {
        Cow::Borrowed("")
    }
}

macro_rules! int_label {
    ($($t:ty),*) => {$(
        impl KeyLabel for $t {
            fn label(&self) -> Cow<'_, str> {
                Cow::Owned(self.to_string())
            }
        }
    )*};
}
int_label!(u16, u32, u64, usize, i32, i64);

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
    /// It was used, and this is the real token cost: refund the difference, or charge the
    /// overrun.
    Used(TokenCost),
}

/// A snapshot of one key.
#[derive(Debug, Clone, Copy, PartialEq)]
#[non_exhaustive]
pub struct Levels {
    /// Its limits.
    pub limits: KeyLimits,
    /// Units left in each bucket now (`None` for a bucket not configured). Negative while
    /// reservations are queued.
    pub levels: PerBucket<Option<f64>>,
    /// How long admissions stay paused after a provider's 429.
    pub paused_for: Option<Duration>,
    /// How long a request arriving now would wait for a slot costing nothing (the queue).
    pub queued_for: Duration,
    /// Reservations not yet settled: queued, or admitted and not yet reconciled (a stream's
    /// until it ends). Zero once every call has finished or been dropped. The in-memory
    /// store counts them all; a store that cannot tell reports 0.
    pub reservations: usize,
}

impl Levels {
    /// A snapshot, for stores outside this crate.
    pub fn new(
        limits: KeyLimits,
        levels: PerBucket<Option<f64>>,
        paused_for: Option<Duration>,
        queued_for: Duration,
    ) -> Self {
        Levels {
            limits,
            levels,
            paused_for,
            queued_for,
            reservations: 0,
        }
    }

    /// The same snapshot, with `n` reservations not yet settled.
    pub fn with_reservations(mut self, n: usize) -> Self {
        self.reservations = n;
        self
    }

    /// Requests left now.
    pub fn requests(&self) -> Option<f64> {
        self.levels.requests
    }
    /// Tokens left now.
    pub fn tokens(&self) -> Option<f64> {
        self.levels.tokens
    }
}

/// The state behind a token bucket layer. See the [`gcra`](super::gcra) module docs for the
/// algorithm a store must follow and for what refunds guarantee.
pub trait BucketStore: Clone + Send + Sync + 'static {
    /// The key a request's buckets are found under.
    type Key: Clone + Eq + Hash + KeyLabel + Send + Sync + 'static;
    /// What a reservation keeps until it is settled.
    type Ticket: Send + 'static;
    /// The future of a reservation: immediate for the in-memory store, one round trip for a
    /// shared one. Dropped after it reserved but before it handed the ticket over, it cancels
    /// the reservation: a caller that gives up at any point gets its reservation back.
    type Reserve: Future<Output = Result<Admission<Self::Ticket>, Denied>> + Send + 'static;

    /// Reserves `cost` (and one request) in every bucket of `key`, atomically (all or none),
    /// unless the wait would exceed `max_wait` or the cost a capacity (then nothing is
    /// consumed).
    fn reserve(&self, key: &Self::Key, cost: TokenCost, max_wait: Duration) -> Self::Reserve;

    /// Ends a reservation: a refund, or a reconciliation with the real cost. Dropping a ticket
    /// without settling it keeps the charge as reserved.
    fn settle(&self, ticket: Self::Ticket, settlement: Settlement);

    /// How long the reservation still has to wait now: until its slot, or until its key's
    /// pause ends (after a provider's 429), whichever is later; zero once it may go. A slot only
    /// moves earlier (when a reservation ahead of it is refunded); a store that moves it wakes
    /// `waker`, so the waiter sleeps until the new slot.
    fn wait(&self, ticket: &Self::Ticket, waker: &Waker) -> Duration;

    /// Pauses new admissions of `key` for `duration` (after a provider's 429).
    fn pause(&self, key: &Self::Key, duration: Duration);

    /// Ends a pause of `key` (set by [`pause`](Self::pause)). Reservations already scheduled
    /// keep their slots.
    fn clear_pause(&self, key: &Self::Key);

    /// Lowers the levels of `key` to what the server says remains.
    fn clamp(&self, key: &Self::Key, remaining: Remaining);

    /// Changes the limits of `key`, keeping its levels and its queued reservations.
    fn set_limits(&self, key: &Self::Key, limits: KeyLimits);

    /// The provider stated limits for `key` in its response headers (`stated`): the layer
    /// calls this on every response whose headers it parsed, before it clamps by what remains.
    ///
    /// The stores of this workspace follow their configuration,
    /// [`TokenBucketConfig::with_learned`](super::TokenBucketConfig::with_learned): the key's
    /// configured limits lowered by the stated ones (so a provider that raises its limit
    /// raises the key back, up to the configured one), changed only when that differs. This
    /// default, for a store that does not know its configuration, reads the stated limits per
    /// minute and can only lower: the key's current limits (none for a key it has not seen)
    /// lowered by them.
    fn learn_limits(&self, key: &Self::Key, stated: &RateLimitHints) {
        let Some(learned) = KeyLimits::stated_in(stated, Duration::from_secs(60)) else {
            return;
        };
        let current = self.levels(key).map(|l| l.limits).unwrap_or_default();
        let lowered = current.lower(learned);
        if lowered != current {
            self.set_limits(key, lowered);
        }
    }

    /// A snapshot of `key`, if the store knows it. Looks a key up by any form it borrows as
    /// (`&str` for `Arc<str>`).
    fn levels<Q>(&self, key: &Q) -> Option<Levels>
    where
        Self::Key: Borrow<Q>,
        Q: Hash + Eq + ?Sized;

    /// A snapshot of every key the store knows.
    fn snapshot(&self) -> Vec<(Self::Key, Levels)>;

    /// How many keys the store keeps state for now. This default counts a
    /// [`snapshot`](Self::snapshot); [`MemoryStore`](super::MemoryStore) counts its map (bounded
    /// by [`TokenBucketConfig::keys`](super::TokenBucketConfig::keys)).
    fn key_count(&self) -> usize {
        self.snapshot().len()
    }
}
