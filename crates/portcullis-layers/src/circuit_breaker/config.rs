//! The breaker's configuration: trip policies, recovery, half-open probes. Serde-deserializable
//! and validated by [`CircuitBreakerConfig::validate`].
//!
//! Durations are [`Duration`]s in Rust and milliseconds in files (`"recovery_timeout_ms":
//! 60000`), as everywhere in Portcullis ([`portcullis_core::config`]).

use std::time::Duration;

use portcullis_core::config::{self, millis};
pub use portcullis_core::config::{ConfigError, MAX_DURATION};
use serde::{Deserialize, Serialize};

use crate::keyed::KeyBounds;

/// The component name in this module's [`ConfigError`]s.
pub(crate) const COMPONENT: &str = "circuit breaker";

/// The largest count window, in calls (each key keeps one byte per call of its window).
pub const MAX_WINDOW_CALLS: u32 = 1_000_000;

/// The most half-open probes (each key keeps a slot per probe).
pub const MAX_HALF_OPEN_PROBES: u32 = 10_000;

/// How the breaker of one key is configured.
///
/// The defaults are the seed's: trip after 5 consecutive failures, stay open 60 s, close after
/// 3 successful half-open probes.
///
/// ```
/// use std::time::Duration;
/// use portcullis_layers::circuit_breaker::{CircuitBreakerConfig, TripPolicy, Window};
///
/// let config: CircuitBreakerConfig = serde_json::from_str(r#"{
///     "trip": {"failure_rate": {"threshold": 0.5, "window": {"count": 20}, "min_calls": 10}},
///     "recovery_timeout_ms": 30000
/// }"#).unwrap();
/// assert_eq!(config.recovery_timeout, Duration::from_secs(30));
/// assert_eq!(config.trip, TripPolicy::failure_rate(0.5, Window::Count(20), 10));
/// assert!(config.validate().is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// When a CLOSED breaker opens.
    pub trip: TripPolicy,
    /// Optionally, also open when too many calls are slow.
    pub slow_calls: Option<SlowCallPolicy>,
    /// How long the breaker stays OPEN before it lets probes through (seed: 60 s).
    #[serde(rename = "recovery_timeout_ms", with = "millis")]
    pub recovery_timeout: Duration,
    /// Optionally, lengthen the open duration on each consecutive trip.
    pub open_backoff: Option<OpenBackoff>,
    /// How many probes HALF_OPEN admits at once, and how many must succeed to close (seed: 3).
    pub half_open_probes: u32,
    /// How long a half-open probe may hold its permit. After that its permit is handed to the
    /// next call and its late outcome is ignored, so a hung probe cannot wedge the breaker.
    /// A streamed probe holds its permit until the stream ends: keep this above the longest
    /// expected stream. (Default 30 s.)
    #[serde(rename = "max_probe_wait_ms", with = "millis")]
    pub max_probe_wait: Duration,
    /// How many keys get their own breaker, and when an unused one is dropped (default 10 000
    /// keys, 10 minutes). Keys beyond the cap share one overflow breaker; a key is dropped only
    /// when CLOSED with no failure pending and no call in flight. See [`KeyBounds`].
    pub keys: KeyBounds,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        CircuitBreakerConfig {
            trip: TripPolicy::consecutive(5),
            slow_calls: None,
            recovery_timeout: Duration::from_secs(60),
            open_backoff: None,
            half_open_probes: 3,
            max_probe_wait: Duration::from_secs(30),
            keys: KeyBounds::default(),
        }
    }
}

/// When a CLOSED breaker opens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum TripPolicy {
    /// After `threshold` failures in a row (the seed's policy). A success resets the count.
    ConsecutiveFailures {
        /// Failures in a row that open the breaker.
        threshold: u32,
    },
    /// When the failure rate over a sliding window reaches `threshold`, once the window holds
    /// at least `min_calls` outcomes.
    FailureRate {
        /// Failure rate in `(0, 1]` that opens the breaker.
        threshold: f64,
        /// The sliding window.
        window: Window,
        /// Outcomes the window must hold before the rate is judged.
        min_calls: u32,
    },
}

impl TripPolicy {
    /// [`TripPolicy::ConsecutiveFailures`].
    pub fn consecutive(threshold: u32) -> Self {
        TripPolicy::ConsecutiveFailures { threshold }
    }

    /// [`TripPolicy::FailureRate`].
    pub fn failure_rate(threshold: f64, window: Window, min_calls: u32) -> Self {
        TripPolicy::FailureRate {
            threshold,
            window,
            min_calls,
        }
    }
}

/// A sliding window of outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Window {
    /// The last `n` outcomes.
    Count(u32),
    /// The outcomes of the last duration (`{"time_ms": …}` in files). Outcomes age out in
    /// steps of a tenth of the window.
    #[serde(rename = "time_ms")]
    Time(#[serde(with = "millis")] Duration),
}

/// Open the breaker when the share of slow calls reaches `rate`.
///
/// A call is slow when its outcome (success or failure) arrives `threshold` or more after its
/// admission; a stream's outcome arrives when it ends. A slow half-open probe counts as a
/// failed probe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SlowCallPolicy {
    /// Calls at least this long are slow (`threshold_ms` in files).
    #[serde(rename = "threshold_ms", with = "millis")]
    pub threshold: Duration,
    /// Slow-call rate in `(0, 1]` that opens the breaker.
    pub rate: f64,
    /// The sliding window.
    pub window: Window,
    /// Outcomes the window must hold before the rate is judged.
    pub min_calls: u32,
}

/// Each consecutive trip (a failed half-open probe reopens the breaker) multiplies the open
/// duration by `multiplier`, up to `max`. A breaker that closes again starts over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenBackoff {
    /// Factor applied per consecutive trip, at least 1.
    pub multiplier: f64,
    /// The longest open duration (`max_ms` in files).
    #[serde(rename = "max_ms", with = "millis")]
    pub max: Duration,
}

fn duration(field: &'static str, value: Duration) -> Result<(), ConfigError> {
    config::positive(COMPONENT, field, value).map(drop)
}

fn out_of_range(field: &'static str, value: f64, expected: &str) -> ConfigError {
    ConfigError::new(COMPONENT, field, format!("must be {expected}, got {value}"))
}

fn rate(field: &'static str, value: f64) -> Result<(), ConfigError> {
    // `!(x > 0)` also rejects NaN.
    if !(value > 0.0 && value <= 1.0) {
        return Err(out_of_range(field, value, "within (0, 1]"));
    }
    Ok(())
}

fn window(field: &'static str, window: Window, min_calls: u32) -> Result<(), ConfigError> {
    match window {
        Window::Count(0) => Err(ConfigError::new(COMPONENT, field, "must be > 0")),
        Window::Count(n) if n > MAX_WINDOW_CALLS => Err(out_of_range(
            field,
            f64::from(n),
            "at most MAX_WINDOW_CALLS calls",
        )),
        Window::Count(n) if min_calls > n => Err(ConfigError::new(
            COMPONENT,
            field,
            format!(
                "holds {n} calls, fewer than `min_calls` ({min_calls}): the rate could never be judged"
            ),
        )),
        Window::Count(_) => Ok(()),
        Window::Time(d) => duration(field, d),
    }
}

impl CircuitBreakerConfig {
    /// Checks every value; the layer's constructor calls it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        match &self.trip {
            TripPolicy::ConsecutiveFailures { threshold: 0 } => {
                return Err(ConfigError::new(
                    COMPONENT,
                    "trip.consecutive_failures.threshold",
                    "must be > 0",
                ));
            }
            TripPolicy::ConsecutiveFailures { .. } => {}
            TripPolicy::FailureRate {
                threshold,
                window: w,
                min_calls,
            } => {
                rate("trip.failure_rate.threshold", *threshold)?;
                window("trip.failure_rate.window", *w, *min_calls)?;
            }
        }
        if let Some(slow) = &self.slow_calls {
            duration("slow_calls.threshold_ms", slow.threshold)?;
            rate("slow_calls.rate", slow.rate)?;
            window("slow_calls.window", slow.window, slow.min_calls)?;
        }
        duration("recovery_timeout_ms", self.recovery_timeout)?;
        duration("max_probe_wait_ms", self.max_probe_wait)?;
        if self.half_open_probes == 0 || self.half_open_probes > MAX_HALF_OPEN_PROBES {
            return Err(out_of_range(
                "half_open_probes",
                f64::from(self.half_open_probes),
                "within [1, MAX_HALF_OPEN_PROBES]",
            ));
        }
        if let Some(b) = &self.open_backoff {
            if !(b.multiplier >= 1.0 && b.multiplier.is_finite()) {
                return Err(out_of_range(
                    "open_backoff.multiplier",
                    b.multiplier,
                    "a finite number ≥ 1",
                ));
            }
            duration("open_backoff.max_ms", b.max)?;
            if b.max < self.recovery_timeout {
                return Err(ConfigError::new(
                    COMPONENT,
                    "open_backoff.max_ms",
                    format!(
                        "({:?}) must not be below `recovery_timeout_ms` ({:?})",
                        b.max, self.recovery_timeout
                    ),
                ));
            }
        }
        self.keys.validate(COMPONENT)
    }

    /// How long the breaker stays open after its `trips`-th consecutive trip (1 for the first).
    pub(crate) fn open_duration(&self, trips: u32) -> Duration {
        let Some(b) = &self.open_backoff else {
            return self.recovery_timeout;
        };
        let exp = i32::try_from(trips.saturating_sub(1)).unwrap_or(i32::MAX);
        let secs = self.recovery_timeout.as_secs_f64() * b.multiplier.powi(exp);
        Duration::try_from_secs_f64(secs)
            .unwrap_or(b.max)
            .min(b.max)
    }
}
