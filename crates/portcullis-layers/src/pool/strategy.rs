//! How a pool ranks its deployments for one request.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::service::Info;

/// How a [`Pool`](super::Pool) orders its deployments for a request, best first. Whatever
/// the strategy, a deployment whose breaker is open or whose bucket cannot take the call now
/// is passed over (its gate), and a failure that allows a failover goes to the next in this
/// order at once.
///
/// In serde form: `"most_headroom"`, `"round_robin"`, `"weighted"`, `"least_in_flight"`,
/// `"lowest_latency"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Strategy {
    /// The deployment with the largest share of its tightest bucket left after this request
    /// ([`TokenBucketHandle::headroom`](crate::token_bucket::TokenBucketHandle::headroom)):
    /// load spreads in proportion to the limits. A deployment with no known limit counts as
    /// full. Ties go round-robin.
    #[default]
    MostHeadroom,
    /// Each deployment in turn.
    RoundRobin,
    /// At random, in proportion to each deployment's weight (seeded).
    Weighted,
    /// The deployment with the fewest calls in flight; ties round-robin.
    LeastInFlight,
    /// The lowest peak-EWMA latency times (calls in flight + 1), as `tower::load::PeakEwma`
    /// ranks.
    LowestLatency,
}

/// A pool's routing configuration.
///
/// ```
/// use portcullis_layers::pool::{PoolConfig, Strategy};
/// let c: PoolConfig = serde_json::from_str(r#"{"strategy": "least_in_flight", "two_choices": true, "seed": 7}"#).unwrap();
/// assert_eq!(c.strategy, Strategy::LeastInFlight);
/// assert_eq!(PoolConfig::default().strategy, Strategy::MostHeadroom);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// The ranking.
    pub strategy: Strategy,
    /// Power of two choices: compare two deployments drawn at random instead of all of them
    /// (for the headroom, in-flight and latency strategies), which keeps many instances that
    /// share one view from all piling onto the same best deployment.
    pub two_choices: bool,
    /// The seed of the pool's random draws (weighted, two choices), for reproducible tests.
    pub seed: u64,
    /// A deployment whose latency estimate is above this many times the fastest one's (and
    /// at least [`slow_margin`](Self::slow_margin) more) goes after every other, whatever the
    /// strategy: it still takes calls the others cannot take now, but no longer its share.
    /// `0` turns it off. Default 3.
    pub slow_factor: f64,
    /// How much slower than the fastest deployment one must be, as well as `slow_factor`
    /// times, to be passed over (`slow_margin_ms` in files; default 1 s): LLM latencies vary
    /// with the length of the answer, so a small difference means nothing.
    #[serde(rename = "slow_margin_ms", with = "portcullis_core::config::millis")]
    pub slow_margin: Duration,
    /// How fast a latency estimate forgets (`latency_decay_ms` in files; default 10 s, as
    /// `tower::load::PeakEwma`): between calls it decays toward zero with this time constant,
    /// so a deployment passed over for being slow is tried again after a while.
    #[serde(rename = "latency_decay_ms", with = "portcullis_core::config::millis")]
    pub latency_decay: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            strategy: Strategy::MostHeadroom,
            two_choices: false,
            seed: 0x5eed,
            slow_factor: 3.0,
            slow_margin: Duration::from_secs(1),
            latency_decay: super::load::DEFAULT_DECAY,
        }
    }
}

/// The ranking state shared by a pool's clones.
pub(super) struct Ranker<Req> {
    pub(super) deployments: Arc<[Info<Req>]>,
    config: PoolConfig,
    turn: AtomicUsize,
    rng: Mutex<SmallRng>,
}

impl<Req> Ranker<Req> {
    pub(super) fn new(deployments: Arc<[Info<Req>]>, config: PoolConfig) -> Self {
        Ranker {
            deployments,
            config,
            turn: AtomicUsize::new(0),
            rng: Mutex::new(SmallRng::seed_from_u64(config.seed)),
        }
    }

    /// Orders `order` (the indices `0..n`) best first for `req`.
    pub(super) fn rank(&self, req: &Req, order: &mut [usize]) {
        let n = order.len();
        if n < 2 {
            return;
        }
        // Rotating first makes every tie round-robin.
        order.rotate_left(self.turn.fetch_add(1, Ordering::Relaxed) % n);
        let d = &self.deployments;
        let score = |i: usize| -> f64 {
            match self.config.strategy {
                Strategy::MostHeadroom => d[i].headroom(req).unwrap_or(1.0),
                Strategy::LeastInFlight => -(d[i].load.in_flight() as f64),
                Strategy::LowestLatency => -d[i].load.cost(),
                Strategy::Weighted => f64::from(d[i].weight),
                Strategy::RoundRobin => 0.0,
            }
        };
        match self.config.strategy {
            Strategy::RoundRobin => {}
            Strategy::Weighted => {
                let total: u64 = d.iter().map(|x| u64::from(x.weight)).sum();
                let mut pick = self.rng().random_range(0..total.max(1));
                let first = (0..n)
                    .find(|&i| match pick.checked_sub(u64::from(d[i].weight)) {
                        Some(rest) => {
                            pick = rest;
                            false
                        }
                        None => true,
                    })
                    .unwrap_or(0);
                order.sort_by(|&a, &b| score(b).total_cmp(&score(a)));
                let at = order.iter().position(|&i| i == first).unwrap_or(0);
                order[..=at].rotate_right(1);
            }
            _ if self.config.two_choices => {
                let (a, b) = {
                    let mut rng = self.rng();
                    let a = rng.random_range(0..n);
                    let b = (a + 1 + rng.random_range(0..n - 1)) % n;
                    (a, b)
                };
                let scores: Vec<f64> = (0..n).map(score).collect();
                let first = if scores[a] >= scores[b] { a } else { b };
                order.sort_by(|&x, &y| scores[y].total_cmp(&scores[x]));
                let at = order.iter().position(|&i| i == first).unwrap_or(0);
                order[..=at].rotate_right(1);
            }
            _ => {
                let scores: Vec<f64> = (0..n).map(score).collect();
                order.sort_by(|&x, &y| scores[y].total_cmp(&scores[x]));
            }
        }
        self.last_if_slow(order);
    }

    /// Moves the deployments much slower than the fastest after all the others (stable).
    fn last_if_slow(&self, order: &mut [usize]) {
        let factor = self.config.slow_factor;
        if factor <= 0.0 {
            return;
        }
        let latency: Vec<f64> = self
            .deployments
            .iter()
            .map(|d| d.load.latency().as_secs_f64())
            .collect();
        let fastest = latency
            .iter()
            .copied()
            .filter(|l| *l > 0.0)
            .fold(f64::INFINITY, f64::min);
        let margin = self.config.slow_margin.as_secs_f64();
        let slow = |i: usize| latency[i] > fastest * factor && latency[i] - fastest >= margin;
        if order.iter().any(|&i| slow(i)) {
            order.sort_by_key(|&i| slow(i));
        }
    }

    fn rng(&self) -> std::sync::MutexGuard<'_, SmallRng> {
        self.rng.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
