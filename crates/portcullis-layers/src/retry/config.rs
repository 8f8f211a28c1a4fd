//! The serde-deserializable, validated configuration of the standard policy.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::backoff::Jitter;

/// A configuration value was rejected. Returned by [`RetryConfig::build`],
/// [`StandardPolicyBuilder::build`](super::StandardPolicyBuilder::build) and
/// [`RetryBudget::new`](super::RetryBudget::new); bad values never panic and never fall back
/// to a default silently.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum ConfigError {
    /// A duration (milliseconds) is NaN, infinite, negative, too large, or zero where it must be
    /// positive.
    InvalidDuration {
        /// The field, e.g. `base_delay_ms`.
        field: &'static str,
        /// The value given, in milliseconds.
        value: f64,
    },
    /// A number is NaN, infinite, or outside its allowed range.
    OutOfRange {
        /// The field, e.g. `budget.retry_ratio`.
        field: &'static str,
        /// The value given.
        value: f64,
        /// The allowed range, for the message.
        expected: &'static str,
    },
    /// `base_delay` is above `max_delay`.
    BaseAboveMax {
        /// The base delay.
        base: Duration,
        /// The cap.
        max: Duration,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::InvalidDuration { field, value } => write!(
                f,
                "retry config: `{field}` must be a positive, finite number of milliseconds, got {value}"
            ),
            ConfigError::OutOfRange {
                field,
                value,
                expected,
            } => write!(f, "retry config: `{field}` must be {expected}, got {value}"),
            ConfigError::BaseAboveMax { base, max } => write!(
                f,
                "retry config: `base_delay` ({base:?}) is above `max_delay` ({max:?})"
            ),
        }
    }
}

impl std::error::Error for ConfigError {}

/// The standard retry policy's configuration, as read from a file. Durations are in
/// milliseconds, as in every Portcullis configuration (fractions allowed). Every field has the
/// default shown; unknown fields are rejected.
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
/// let bad: RetryConfig = serde_json::from_str(r#"{ "base_delay_ms": -1 }"#).unwrap();
/// assert!(bad.build().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryConfig {
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// The first backoff delay, in milliseconds.
    pub base_delay_ms: f64,
    /// The cap of the exponential delay, in milliseconds.
    pub max_delay_ms: f64,
    /// How delays are randomised.
    pub jitter: Jitter,
    /// The longest `Retry-After` honoured, in milliseconds; a longer one returns the error at
    /// once.
    pub retry_after_cap_ms: f64,
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
            base_delay_ms: 1_000.0,
            max_delay_ms: 30_000.0,
            jitter: Jitter::Full,
            retry_after_cap_ms: 60_000.0,
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
    /// The sliding window over which requests and retries are counted, in milliseconds, `> 0`.
    pub window_ms: f64,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        BudgetConfig {
            retry_ratio: 0.2,
            min_per_sec: 1.0,
            window_ms: 10_000.0,
        }
    }
}

/// Milliseconds as a positive, finite duration.
pub(crate) fn positive_millis(field: &'static str, value: f64) -> Result<Duration, ConfigError> {
    match Duration::try_from_secs_f64(value / 1000.0) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(ConfigError::InvalidDuration { field, value }),
    }
}

/// A positive duration (for the builder, which takes `Duration`s).
pub(crate) fn positive(field: &'static str, d: Duration) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        Err(ConfigError::InvalidDuration { field, value: 0.0 })
    } else {
        Ok(d)
    }
}

/// A finite number in `[lo, hi]`.
pub(crate) fn in_range(
    field: &'static str,
    value: f64,
    lo: f64,
    hi: f64,
    expected: &'static str,
) -> Result<f64, ConfigError> {
    if value.is_finite() && (lo..=hi).contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError::OutOfRange {
            field,
            value,
            expected,
        })
    }
}
