use std::sync::Arc;

use super::KeyDisplay;
use super::config::KeyLimits;
use super::store::{BucketStore, KeyLabel, Levels};

/// A handle on a token bucket's shared state, from [`TokenBucketLayer::handle`]: levels per
/// key, pauses, and limits changed at run time (queued waiters keep their slots).
///
/// [`TokenBucketLayer::handle`]: super::TokenBucketLayer::handle
#[derive(Debug, Clone)]
pub struct TokenBucketHandle<St> {
    store: St,
    name: Arc<str>,
}

impl<St> TokenBucketHandle<St> {
    pub(crate) fn new(store: St, name: Arc<str>) -> Self {
        TokenBucketHandle { store, name }
    }

    /// The store.
    pub fn store(&self) -> &St {
        &self.store
    }

    /// The levels of one key, if it was seen.
    pub fn level<K>(&self, key: &K) -> Option<Levels>
    where
        St: BucketStore<K>,
    {
        self.store.levels(key)
    }

    /// The levels of every key seen, labelled `name:label`, sorted by label.
    pub fn levels<K>(&self) -> Vec<(String, Levels)>
    where
        St: BucketStore<K>,
        K: KeyLabel,
    {
        let mut all: Vec<(String, Levels)> = self
            .store
            .snapshot()
            .into_iter()
            .map(|(k, l)| (KeyDisplay(&self.name, &k.label()).to_string(), l))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// Changes the limits of a key at run time. Its levels carry over (a bucket that shrinks
    /// below its level is capped); reservations already made keep their slots.
    pub fn set_limits<K>(&self, key: &K, limits: KeyLimits) -> Result<(), super::ConfigError>
    where
        St: BucketStore<K>,
    {
        limits.validate()?;
        self.store.set_limits(key, limits);
        Ok(())
    }

    /// Pauses new admissions of a key, as a provider's 429 would.
    pub fn pause<K>(&self, key: &K, duration: std::time::Duration)
    where
        St: BucketStore<K>,
    {
        self.store.pause(key, duration);
    }
}
