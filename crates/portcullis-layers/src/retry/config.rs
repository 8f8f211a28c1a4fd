//! The serde-deserializable, validated configuration of the standard policy.

use std::time::Duration;

use portcullis_core::config::millis;
use serde::{Deserialize, Serialize};

use super::backoff::Jitter;

pub use portcullis_core::ConfigError;

/// The component name in this module's [`ConfigError`]s.
pub(crate) const COMPONENT: &str = "retry";

/// The standard retry policy's configuration, as read from a file. Durations are
/// [`Duration`]s in Rust and milliseconds in files (`*_ms`, fractions allowed), as in every
/// Portcullis configuration ([`portcullis_core::config`]). Every field has the default shown;
/// unknown fields are rejected. These defaults are the only place the retry defaults are
/// written: [`StandardPolicy::builder`](super::StandardPolicy::builder) starts from them.
///
/// | field | default | meaning |
/// |---|---|---|
/// | `max_retries` | 3 | retries after the first attempt (the seed's) |
/// | `base_delay_ms` | 1000 | first backoff delay, `> 0` |
/// | `max_delay_ms` | 30000 | cap of the exponential delay, `≥ base_delay_ms` |
/// | `jitter` | `"full"` | `full`, `equal`, `decorrelated`, `proportional` or `none` |
/// | `retry_after_cap_ms` | 60000 | a longer `Retry-After` returns the error at once, `> 0` |
/// | `retry_after_jitter` | 0.1 | up to this fraction of `Retry-After` is added, in `[0, 1]` |
/// | `budget` | see [`BudgetConfig`] | the retry budget; `null` disables it |
/// | `seed` | none | seeds the jitter RNG (tests, reproducible drills) |
///
/// ```
/// use portcullis_layers::retry::RetryConfig;
///
/// let cfg: RetryConfig = serde_json::from_str(
///     r#"{ "max_retries": 5, "base_delay_ms": 500, "jitter": "equal", "seed": 42 }"#,
/// ).unwrap();
/// let policy = cfg.build().unwrap();
/// assert_eq!(policy.max_retries(), 5);
///
/// // Negative durations never get past serde; zero ones are refused by `build`.
/// assert!(serde_json::from_str::<RetryConfig>(r#"{ "base_delay_ms": -1 }"#).is_err());
/// let zero: RetryConfig = serde_json::from_str(r#"{ "base_delay_ms": 0 }"#).unwrap();
/// assert_eq!(zero.build().unwrap_err().to_string(), "retry: `base_delay_ms` must be > 0");
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// The first backoff delay (`base_delay_ms` in files).
    #[serde(rename = "base_delay_ms", with = "millis")]
    pub base_delay: Duration,
    /// The cap of the exponential delay (`max_delay_ms` in files).
    #[serde(rename = "max_delay_ms", with = "millis")]
    pub max_delay: Duration,
    /// How delays are randomised.
    pub jitter: Jitter,
    /// The longest `Retry-After` honoured (`retry_after_cap_ms` in files); a longer one returns
    /// the error at once.
    #[serde(rename = "retry_after_cap_ms", with = "millis")]
    pub retry_after_cap: Duration,
    /// Up to this fraction of a `Retry-After` is added at random, so clients do not wake
    /// together.
    pub retry_after_jitter: f64,
    /// The retry budget shared by all clones; `None` disables it.
    pub budget: Option<BudgetConfig>,
    /// Seeds the jitter RNG, for reproducible tests.
    pub seed: Option<u64>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_retries: 3,
            base_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(30),
            jitter: Jitter::Full,
            retry_after_cap: Duration::from_secs(60),
            retry_after_jitter: 0.1,
            budget: Some(BudgetConfig::default()),
            seed: None,
        }
    }
}

/// The retry budget: over a sliding `window`, retries may be at most
/// `retry_ratio × requests + min_per_sec × window`.
///
/// Defaults: `retry_ratio` 0.2 (a dead provider costs at most 1.2 calls per request, not 4),
/// `min_per_sec` 1.0 (a floor so that a quiet service can still retry: 10 retries per 10 s
/// window), `window` 10 s (as tower's `TpsBudget`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BudgetConfig {
    /// Retries allowed per request, in `[0, 1]`.
    pub retry_ratio: f64,
    /// Retries allowed per second whatever the traffic, `≥ 0`.
    pub min_per_sec: f64,
    /// The sliding window over which requests and retries are counted, `> 0` (`window_ms` in
    /// files).
    #[serde(rename = "window_ms", with = "millis")]
    pub window: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            retry_ratio: 0.2,
            min_per_sec: 1.0,
            window: Duration::from_secs(10),
        }
    }
}

/// A positive duration of at most a year.
pub(crate) fn positive(field: &'static str, d: Duration) -> Result<Duration, ConfigError> {
    portcullis_core::config::positive(COMPONENT, field, d)
}

/// A finite number in `[lo, hi]`.
pub(crate) fn in_range(field: &'static str, v: f64, lo: f64, hi: f64) -> Result<f64, ConfigError> {
    portcullis_core::config::in_range(COMPONENT, field, v, lo, hi)
}
