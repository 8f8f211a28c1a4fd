//! Rate-limit enforcement: continuously refilling token buckets per API key and model, as the
//! real APIs do it.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::api::SimApi;
use crate::scenario::{Family, Limits};

/// One bucket: `capacity` per window, refilled continuously.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    capacity: f64,
    level: f64,
    last: Instant,
}

impl Bucket {
    fn refill(&mut self, now: Instant, window: Duration) {
        let rate = self.capacity / window.as_secs_f64();
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.level = (self.level + dt * rate).min(self.capacity);
        self.last = now;
    }

    /// Time until `cost` fits (zero if it does now).
    fn wait_for(&self, cost: f64, window: Duration) -> Duration {
        let rate = self.capacity / window.as_secs_f64();
        Duration::from_secs_f64(((cost - self.level) / rate).max(0.0))
    }

    fn view(&self, window: Duration) -> LimitView {
        LimitView {
            limit: self.capacity as u64,
            remaining: self.level.max(0.0).floor() as u64,
            reset: self.wait_for(self.capacity, window),
        }
    }
}

/// What one limit looks like after a decision, for the headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LimitView {
    pub limit: u64,
    pub remaining: u64,
    /// Until the bucket is full again.
    pub reset: Duration,
}

/// The outcome of a check: the views of every bucket (OpenAI: requests, tokens; Anthropic:
/// requests, input tokens, output tokens) and, when refused, which one and how long to wait.
#[derive(Debug, Clone)]
pub(crate) struct Decision {
    pub views: Vec<LimitView>,
    pub refused: Option<Refusal>,
}

/// Why a check refused: which bucket, how long to wait, what was asked of it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Refusal {
    /// The index of the bucket that refused.
    pub which: usize,
    pub retry_after: Duration,
    pub requested: u64,
}

type Key = (Family, String, String);

/// Every bucket, keyed by family, API key and model.
#[derive(Debug)]
pub(crate) struct Limiter {
    limits: Limits,
    buckets: HashMap<Key, Vec<Bucket>>,
}

impl Limiter {
    pub(crate) fn new(limits: Limits) -> Self {
        Limiter {
            limits,
            buckets: HashMap::new(),
        }
    }

    /// New limits start fresh, full windows.
    pub(crate) fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
        self.buckets.clear();
    }

    pub(crate) fn reset(&mut self) {
        self.buckets.clear();
    }

    /// Charges `costs` (one per bucket of `api`) atomically, all or none.
    pub(crate) fn check(
        &mut self,
        api: &dyn SimApi,
        api_key: &str,
        model: &str,
        costs: &[u64],
        now: Instant,
    ) -> Decision {
        let window = self.limits.window();
        let caps = api.capacities(&self.limits, model);
        let buckets = self
            .buckets
            .entry((api.family(), api_key.to_owned(), model.to_owned()))
            .or_insert_with(|| {
                caps.iter()
                    .map(|&c| Bucket {
                        capacity: c as f64,
                        level: c as f64,
                        last: now,
                    })
                    .collect()
            });
        for b in buckets.iter_mut() {
            b.refill(now, window);
        }
        // The bucket that makes the caller wait longest decides the retry-after.
        let refused = buckets
            .iter()
            .zip(costs)
            .enumerate()
            .filter(|(_, (b, c))| b.level < **c as f64)
            .map(|(i, (b, c))| Refusal {
                which: i,
                // A cost above the capacity can never pass; report the time to a full bucket.
                retry_after: b.wait_for((*c as f64).min(b.capacity), window),
                requested: *c,
            })
            .max_by_key(|r| r.retry_after);
        if refused.is_none() {
            for (b, c) in buckets.iter_mut().zip(costs) {
                b.level -= *c as f64;
            }
        }
        Decision {
            views: buckets.iter().map(|b| b.view(window)).collect(),
            refused,
        }
    }

    /// Gives back `amount` to one bucket (Anthropic settles output tokens at the end).
    pub(crate) fn refund(
        &mut self,
        api: &dyn SimApi,
        api_key: &str,
        model: &str,
        which: usize,
        amount: u64,
    ) {
        let key = (api.family(), api_key.to_owned(), model.to_owned());
        if let Some(b) = self.buckets.get_mut(&key).and_then(|v| v.get_mut(which)) {
            b.level = (b.level + amount as f64).min(b.capacity);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::openai::OpenAi;

    #[test]
    fn refuses_exactly_past_the_limit_and_refills_continuously() {
        let mut l = Limiter::new(Limits {
            time_scale: 60.0, // a "minute" of 1 s
            ..Limits::default()
        });
        l.set_limits(Limits {
            time_scale: 60.0,
            openai: crate::scenario::OpenAiLimits { rpm: 3, tpm: 1000 },
            ..Limits::default()
        });
        let t0 = Instant::now();
        for i in 0..3 {
            let d = l.check(&OpenAi, "k", "m", &[1, 10], t0);
            assert!(d.refused.is_none(), "request {i}");
            assert_eq!(d.views[0].remaining, 2 - i);
        }
        let d = l.check(&OpenAi, "k", "m", &[1, 10], t0);
        let r = d.refused.expect("4th refused");
        assert_eq!(r.which, 0);
        assert_eq!(r.retry_after, Duration::from_secs_f64(1.0 / 3.0));
        // Another key or model has its own buckets.
        assert!(l.check(&OpenAi, "k2", "m", &[1, 10], t0).refused.is_none());
        // A third of a window later, one request fits again.
        let t1 = t0 + Duration::from_millis(334);
        assert!(l.check(&OpenAi, "k", "m", &[1, 10], t1).refused.is_none());
        assert!(l.check(&OpenAi, "k", "m", &[1, 10], t1).refused.is_some());
    }
}
