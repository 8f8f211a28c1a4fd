use std::borrow::Borrow;
use std::hash::Hash;
use std::sync::Arc;
use std::time::Duration;

use super::KeyDisplay;
use super::config::{ConfigError, KeyLimits};
use super::per_bucket::PerBucket;
use super::store::{BucketStore, KeyLabel, Levels};
use portcullis_core::TokenCost;

/// A handle on a token bucket's shared state, from [`TokenBucketLayer::handle`]: levels per
/// key, pauses, and limits changed at run time (queued waiters keep their slots).
///
/// Like the circuit breaker's handle, it looks keys up by any form they borrow as (`"gpt-4o-mini"`
/// for the default `Arc<str>` keys) and takes anything that converts into a key where it may
/// create one.
///
/// [`TokenBucketLayer::handle`]: super::TokenBucketLayer::handle
#[derive(Debug, Clone)]
pub struct TokenBucketHandle<St> {
    store: St,
    name: Arc<str>,
    max_wait: Duration,
}

impl<St> TokenBucketHandle<St> {
    pub(crate) fn new(store: St, name: Arc<str>, max_wait: Duration) -> Self {
        TokenBucketHandle {
            store,
            name,
            max_wait,
        }
    }

    /// The store.
    pub fn store(&self) -> &St {
        &self.store
    }

    /// The layer's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl<St: BucketStore> TokenBucketHandle<St> {
    /// The levels of `key`, or `None` for a key with no buckets of its own (never seen, or, in
    /// the in-memory store, dropped while idle or beyond the cap).
    pub fn level<Q>(&self, key: &Q) -> Option<Levels>
    where
        St::Key: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.store.levels(key)
    }

    /// How long until `key` could take a call: zero if it can now, else the pause a provider's
    /// 429 put on it (a paused key is not waited on when another entry can take the call), or
    /// its queue when that is longer than the layer's `max_wait`. Nothing is reserved: this is
    /// the bucket's answer to a fallback's "can this entry take the call now?"
    /// ([`fallback::choose`](crate::fallback::choose)). A key never seen can.
    ///
    /// ```
    /// use std::time::Duration;
    /// use portcullis_layers::token_bucket::{TokenBucketConfig, TokenBucketLayer};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let handle = TokenBucketLayer::new("openai", TokenBucketConfig::new()).unwrap().handle();
    /// assert_eq!(handle.availability("gpt-4o-mini"), Duration::ZERO);
    /// handle.pause("gpt-4o-mini", Duration::from_secs(20)); // as a 429 with retry-after: 20 would
    /// assert_eq!(handle.availability("gpt-4o-mini"), Duration::from_secs(20));
    /// # }
    /// ```
    pub fn availability<Q>(&self, key: &Q) -> Duration
    where
        St::Key: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        match self.store.levels(key) {
            None => Duration::ZERO,
            Some(l) => match l.paused_for {
                Some(pause) => pause,
                None if l.queued_for > self.max_wait => l.queued_for,
                None => Duration::ZERO,
            },
        }
    }

    /// The levels of every key with buckets of its own (not the in-memory store's overflow
    /// bucket), labelled `name:label`, sorted by label.
    pub fn levels(&self) -> Vec<(String, Levels)> {
        let mut all: Vec<(String, Levels)> = self
            .store
            .snapshot()
            .into_iter()
            .map(|(k, l)| (KeyDisplay(&self.name, &k.label()).to_string(), l))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// How many keys the store keeps buckets for now ([`BucketStore::key_count`]). For the
    /// in-memory store: at most [`keys.max_keys`](super::TokenBucketConfig::keys) keys created
    /// by requests, plus those named in `limits` or given limits here; keys beyond the cap
    /// share one overflow bucket, not counted; a key unused for `keys.idle_timeout` whose
    /// buckets are full, unpaused and unreserved is dropped. For monitoring: it takes the
    /// store's map lock.
    pub fn key_count(&self) -> usize {
        self.store.key_count()
    }

    /// Changes the limits of `key` at run time. Its levels carry over (a bucket that shrinks
    /// below its level is capped); reservations already made keep their slots. With the
    /// in-memory store, the key then keeps its own buckets: never evicted, never the overflow
    /// bucket.
    pub fn set_limits(
        &self,
        key: impl Into<St::Key>,
        limits: KeyLimits,
    ) -> Result<(), ConfigError> {
        limits.validate()?;
        self.store.set_limits(&key.into(), limits);
        Ok(())
    }

    /// The share of `key`'s tightest bucket left after a call costing `cost` (1 request and its
    /// tokens): `1.0` for full buckets, `0.0` or less when the call would have to wait. `None`
    /// when `key` has no configured or learned limit (nothing to compare). A
    /// [`Pool`](crate::pool::Pool) routes to the deployment with the most headroom.
    ///
    /// ```
    /// use portcullis_core::TokenCost;
    /// use portcullis_layers::token_bucket::{KeyLimits, Rate, TokenBucketConfig, TokenBucketLayer};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() {
    /// let limits = KeyLimits::unlimited().with_tokens(Rate::per_minute(10_000).unwrap());
    /// let handle = TokenBucketLayer::new("azure-east", TokenBucketConfig::new()).unwrap().handle();
    /// handle.set_limits("gpt-4o", limits).unwrap();
    /// let h = handle.headroom("gpt-4o", TokenCost { input: 1_000, output: 1_000 }).unwrap();
    /// assert!((h - 0.8).abs() < 1e-9);
    /// assert_eq!(handle.headroom("unknown", TokenCost::default()), None);
    /// # }
    /// ```
    pub fn headroom<Q>(&self, key: &Q, cost: TokenCost) -> Option<f64>
    where
        St::Key: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let l = self.store.levels(key)?;
        let costs = PerBucket {
            requests: 1.0,
            tokens: (cost.input + cost.output) as f64,
            input: cost.input as f64,
            output: cost.output as f64,
        };
        let rates = [
            (l.limits.requests, l.levels.requests, costs.requests),
            (l.limits.tokens, l.levels.tokens, costs.tokens),
            (l.limits.input_tokens, l.levels.input, costs.input),
            (l.limits.output_tokens, l.levels.output, costs.output),
        ];
        rates
            .into_iter()
            .filter_map(|(rate, level, cost)| {
                let capacity = rate?.capacity() as f64;
                Some((level? - cost) / capacity)
            })
            .min_by(f64::total_cmp)
    }

    /// Pauses new admissions of `key`, as a provider's 429 would.
    pub fn pause(&self, key: impl Into<St::Key>, duration: Duration) {
        self.store.pause(&key.into(), duration);
    }

    /// How long admissions of `key` stay paused (after a provider's 429, or
    /// [`pause`](Self::pause)); `None` when it is not paused or never seen.
    pub fn paused_for<Q>(&self, key: &Q) -> Option<Duration>
    where
        St::Key: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.store.levels(key).and_then(|l| l.paused_for)
    }

    /// Ends a pause of `key` at once: the next request is admitted as its buckets allow.
    /// Reservations made during the pause keep their (later) slots.
    pub fn clear_pause(&self, key: impl Into<St::Key>) {
        self.store.clear_pause(&key.into());
    }
}
