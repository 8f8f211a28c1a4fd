//! Prompt caching: which prefixes of earlier prompts the server still holds, per server.
//!
//! A request names its cacheable prefixes as [`CachePoint`]s (a hash of the prefix and its
//! tokens), in prefix order. Anthropic's are its `cache_control` breakpoints; OpenAI's are the
//! prefixes of 1024 tokens and every 128 more (automatic caching). [`PromptCache::apply`]
//! finds the longest prefix still held (a read, which refreshes its lifetime), and stores the
//! rest. The cache holds at most [`CAPACITY`] prefixes: expired ones go first, then the least
//! recently used. Time is `tokio::time`, so paused-time tests drive expiry.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::generate::fingerprint;

/// The most prefixes one server holds.
pub(crate) const CAPACITY: usize = 4096;

/// A cacheable prefix of a prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct CachePoint {
    /// A hash of everything up to here.
    pub hash: u64,
    /// The prompt tokens up to here.
    pub tokens: u64,
    /// How long it lives after its last use.
    pub ttl: Duration,
}

/// What caching did for one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct CacheUse {
    /// Tokens read from the cache.
    pub read: u64,
    /// Tokens written with a 5-minute lifetime (Anthropic reports these).
    pub created_5m: u64,
    /// Tokens written with a 1-hour lifetime.
    pub created_1h: u64,
}

impl CacheUse {
    /// All tokens written.
    pub(crate) fn created(&self) -> u64 {
        self.created_5m + self.created_1h
    }
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    expires: Instant,
    ttl: Duration,
    last_used: u64,
}

/// The prefixes held, by hash.
#[derive(Debug, Default)]
pub(crate) struct PromptCache {
    entries: HashMap<u64, Entry>,
    clock: u64,
}

impl PromptCache {
    /// Forgets everything.
    pub(crate) fn clear(&mut self) {
        self.entries.clear();
    }

    /// Looks up and stores the points of one request. `scope` keeps caches apart (API, key and
    /// model). The longest point held is read; every point is then held (again) for its
    /// lifetime, and the tokens past the read up to the last point count as written.
    pub(crate) fn apply(
        &mut self,
        scope: &[&[u8]],
        points: &[CachePoint],
        now: Instant,
    ) -> CacheUse {
        let scope = fingerprint(0, scope);
        let key = |p: &CachePoint| fingerprint(scope, &[&p.hash.to_be_bytes()]);
        let read = points
            .iter()
            .filter(|p| self.entries.get(&key(p)).is_some_and(|e| e.expires > now))
            .map(|p| p.tokens)
            .max()
            .unwrap_or(0);
        let mut used = CacheUse {
            read,
            ..CacheUse::default()
        };
        if let Some(last) = points.last().filter(|p| p.tokens > read) {
            let written = last.tokens - read;
            if last.ttl > Duration::from_secs(300) {
                used.created_1h = written;
            } else {
                used.created_5m = written;
            }
        }
        for p in points {
            self.clock += 1;
            let k = key(p);
            if !self.entries.contains_key(&k) && self.entries.len() >= CAPACITY {
                self.evict(now);
            }
            let ttl = self.entries.get(&k).map_or(p.ttl, |e| e.ttl.max(p.ttl));
            self.entries.insert(
                k,
                Entry {
                    expires: now + ttl,
                    ttl,
                    last_used: self.clock,
                },
            );
        }
        used
    }

    /// Makes room for one: drops the expired, else the least recently used.
    fn evict(&mut self, now: Instant) {
        self.entries.retain(|_, e| e.expires > now);
        if self.entries.len() >= CAPACITY {
            if let Some(oldest) = self
                .entries
                .iter()
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| *k)
            {
                self.entries.remove(&oldest);
            }
        }
    }

    /// How many prefixes are held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// A running hash of a prompt prefix and its tokens, to mark [`CachePoint`]s along the way.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Prefix {
    hash: u64,
    /// The tokens so far.
    pub tokens: u64,
}

impl Prefix {
    /// An empty prefix.
    pub(crate) fn new() -> Self {
        Prefix { hash: 0, tokens: 0 }
    }

    /// Adds a piece and its tokens.
    pub(crate) fn push(&mut self, piece: &[u8], tokens: u64) {
        self.hash = fingerprint(self.hash, &[piece]);
        self.tokens += tokens;
    }

    /// A point here, living `ttl`.
    pub(crate) fn point(&self, ttl: Duration) -> CachePoint {
        CachePoint {
            hash: self.hash,
            tokens: self.tokens,
            ttl,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIVE_MIN: Duration = Duration::from_secs(300);

    fn point(hash: u64, tokens: u64) -> CachePoint {
        CachePoint {
            hash,
            tokens,
            ttl: FIVE_MIN,
        }
    }

    #[test]
    fn read_after_write_until_expiry() {
        let mut c = PromptCache::default();
        let now = Instant::now();
        let scope: &[&[u8]] = &[b"k"];
        let first = c.apply(scope, &[point(1, 100), point(2, 300)], now);
        assert_eq!((first.read, first.created_5m), (0, 300));
        let again = c.apply(scope, &[point(1, 100), point(2, 300), point(3, 500)], now);
        assert_eq!((again.read, again.created_5m), (300, 200));
        // Another scope shares nothing.
        assert_eq!(c.apply(&[b"other"], &[point(1, 100)], now).read, 0);
        // Reads refresh the lifetime; past it, nothing is read.
        let later = now + FIVE_MIN - Duration::from_secs(1);
        assert_eq!(c.apply(scope, &[point(1, 100)], later).read, 100);
        let gone = later + FIVE_MIN + Duration::from_secs(1);
        assert_eq!(c.apply(scope, &[point(2, 300)], gone).read, 0);
    }

    #[test]
    fn bounded() {
        let mut c = PromptCache::default();
        let now = Instant::now();
        for i in 0..(CAPACITY as u64 + 10) {
            c.apply(&[b"k"], &[point(i, 10)], now);
        }
        assert_eq!(c.len(), CAPACITY);
        // The oldest went first.
        assert_eq!(c.apply(&[b"k"], &[point(0, 10)], now).read, 0);
        assert_eq!(
            c.apply(&[b"k"], &[point(CAPACITY as u64 + 9, 10)], now)
                .read,
            10
        );
    }
}
