//! Exponential backoff with jitter: `base · 2^n`, capped at `max`, then jittered.

use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

/// How a backoff delay is randomised, so that clients that failed together do not retry
/// together.
///
/// With `d = min(max, base · 2^n)` for the `n`-th retry (`n` from 0):
///
/// | jitter | delay |
/// |---|---|
/// | [`Full`](Jitter::Full) (default) | uniform in `[0, d]` |
/// | [`Equal`](Jitter::Equal) | `d/2` + uniform in `[0, d/2]` |
/// | [`Decorrelated`](Jitter::Decorrelated) | uniform in `[base, 3 · previous delay]` (`3 · base` first), capped at `max` |
/// | [`Proportional`](Jitter::Proportional) | uniform in `[0.5 · d, 1.5 · d]` (the seed's; may exceed `max` by half) |
/// | [`None`](Jitter::None) | exactly `d` |
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Jitter {
    /// Uniform in `[0, d]` ("full jitter"): the best spread, the default.
    #[default]
    Full,
    /// Half fixed, half random: uniform in `[d/2, d]`.
    Equal,
    /// AWS's "decorrelated jitter": uniform in `[base, 3 · previous delay]`, capped at `max`.
    Decorrelated,
    /// The seed's formula: `d · (0.5 + random)`, uniform in `[0.5 · d, 1.5 · d]`.
    Proportional,
    /// No jitter: exactly `d`.
    None,
}

/// Exponential backoff: `base · 2^n` capped at `max`, then randomised by a [`Jitter`].
///
/// All arithmetic saturates: any retry number, however large, gives a delay within bounds.
///
/// ```
/// use std::time::Duration;
/// use portcullis_layers::retry::{Backoff, Jitter};
/// use rand::{SeedableRng, rngs::SmallRng};
///
/// let backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30), Jitter::None);
/// let mut rng = SmallRng::seed_from_u64(7);
/// assert_eq!(backoff.delay(3, Duration::ZERO, &mut rng), Duration::from_secs(8));
/// assert_eq!(backoff.delay(u32::MAX, Duration::ZERO, &mut rng), Duration::from_secs(30));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    jitter: Jitter,
}

impl Backoff {
    /// A backoff from `base` doubling up to `max`. [`StandardPolicy`](super::StandardPolicy)
    /// validates `0 < base ≤ max`; here a `base` above `max` simply yields `max`.
    pub const fn new(base: Duration, max: Duration, jitter: Jitter) -> Self {
        Backoff { base, max, jitter }
    }

    /// The first delay.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The cap on the exponential delay.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// The jitter mode.
    pub fn jitter(&self) -> Jitter {
        self.jitter
    }

    /// `min(max, base · 2^retry)`, without jitter.
    pub fn exponential(&self, retry: u32) -> Duration {
        let factor = 1u32.checked_shl(retry).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.max)
    }

    /// The delay before retry number `retry` (0 for the first retry). `previous` is the delay
    /// used before the previous retry (zero for the first); only [`Jitter::Decorrelated`]
    /// reads it.
    pub fn delay<R: Rng + ?Sized>(&self, retry: u32, previous: Duration, rng: &mut R) -> Duration {
        let d = nanos(self.exponential(retry));
        let pick = |rng: &mut R, lo: u64, hi: u64| Duration::from_nanos(rng.random_range(lo..=hi));
        match self.jitter {
            Jitter::None => Duration::from_nanos(d),
            Jitter::Full => pick(rng, 0, d),
            Jitter::Equal => pick(rng, d - d / 2, d),
            Jitter::Proportional => pick(rng, d / 2, d.saturating_add(d / 2)),
            Jitter::Decorrelated => {
                let max = nanos(self.max);
                let lo = nanos(self.base).min(max);
                // The first retry starts from `base`, as if the previous delay had been `base`.
                let hi = nanos(previous).max(lo).saturating_mul(3).min(max);
                pick(rng, lo, hi)
            }
        }
    }
}

/// A duration in nanoseconds, saturating at `u64::MAX` (about 584 years).
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
