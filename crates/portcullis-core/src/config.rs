//! One configuration convention for every Portcullis component (retry, breaker, bucket, Redis,
//! the `Stack`):
//!
//! - a duration is a [`Duration`] in Rust and a number of **milliseconds** in a file (a field
//!   named `*_ms`, integer or fractional), through [`millis`] and [`opt_millis`], the one serde
//!   helper pair: nothing is truncated, and a negative, NaN, infinite or too large value is a
//!   deserialization error;
//! - a duration is at most [`MAX_DURATION`] (a year): longer is a configuration error, never an
//!   `Instant` overflow at run time;
//! - every bad value is one [`ConfigError`], which names the component, the field and what is
//!   wrong. Nothing panics and nothing falls back to a default silently.
//!
//! ```
//! use std::time::Duration;
//! use portcullis_core::config::{self, ConfigError};
//!
//! #[derive(serde::Deserialize)]
//! struct MyConfig {
//!     #[serde(with = "config::millis", rename = "wait_ms")]
//!     wait: Duration,
//! }
//!
//! let c: MyConfig = serde_json::from_str(r#"{ "wait_ms": 1500.5 }"#).unwrap();
//! assert_eq!(c.wait, Duration::from_micros(1_500_500));
//! assert!(serde_json::from_str::<MyConfig>(r#"{ "wait_ms": -1 }"#).is_err());
//!
//! let err = config::positive("my layer", "wait_ms", Duration::ZERO).unwrap_err();
//! assert_eq!(err.to_string(), "my layer: `wait_ms` must be > 0");
//! ```

use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

/// The longest duration any setting takes: a year. Longer is a [`ConfigError`], so that no
/// configured duration can overflow `Instant` arithmetic at run time.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// A configuration value was rejected: which component, which field, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The component: `retry`, `circuit breaker`, `token bucket`, `redis`, `stack`, …
    pub component: &'static str,
    /// The field, as named in a configuration file (e.g. `base_delay_ms`, `limits.gpt-4o.tpm`).
    pub field: Cow<'static, str>,
    /// What is wrong with it, e.g. `must be > 0`.
    pub problem: Cow<'static, str>,
}

impl ConfigError {
    /// A rejected value.
    pub fn new(
        component: &'static str,
        field: impl Into<Cow<'static, str>>,
        problem: impl Into<Cow<'static, str>>,
    ) -> Self {
        ConfigError {
            component,
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// The same error, for a field nested under `prefix` (e.g. a key's limits).
    pub fn within(mut self, prefix: &str) -> Self {
        self.field = Cow::Owned(format!("{prefix}.{}", self.field));
        self
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: `{}` {}", self.component, self.field, self.problem)
    }
}

impl std::error::Error for ConfigError {}

/// `d`, if it is above zero and at most [`MAX_DURATION`].
pub fn positive(
    component: &'static str,
    field: &'static str,
    d: Duration,
) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        return Err(ConfigError::new(component, field, "must be > 0"));
    }
    at_most_max(component, field, d)
}

/// `d`, if it is at most [`MAX_DURATION`].
pub fn at_most_max(
    component: &'static str,
    field: &'static str,
    d: Duration,
) -> Result<Duration, ConfigError> {
    if d > MAX_DURATION {
        return Err(ConfigError::new(
            component,
            field,
            format!("must be at most a year ({MAX_DURATION:?}), got {d:?}"),
        ));
    }
    Ok(d)
}

/// `v`, if it is finite and within `[lo, hi]`.
pub fn in_range(
    component: &'static str,
    field: &'static str,
    v: f64,
    lo: f64,
    hi: f64,
) -> Result<f64, ConfigError> {
    if v.is_finite() && v >= lo && v <= hi {
        Ok(v)
    } else {
        Err(ConfigError::new(
            component,
            field,
            format!("must be within [{lo}, {hi}], got {v}"),
        ))
    }
}

/// A number of milliseconds (integer or fractional) as a [`Duration`], or why not.
pub fn duration_from_millis(ms: f64) -> Result<Duration, String> {
    if !ms.is_finite() || ms < 0.0 {
        return Err(format!(
            "a duration must be a finite, non-negative number of milliseconds, got {ms}"
        ));
    }
    if ms > MAX_DURATION.as_secs_f64() * 1000.0 {
        return Err(format!(
            "a duration must be at most a year ({} milliseconds), got {ms:e}",
            MAX_DURATION.as_millis()
        ));
    }
    Ok(Duration::from_nanos((ms * 1e6).round() as u64))
}

/// A [`Duration`] as milliseconds: whole milliseconds as an integer, else a fraction.
fn to_millis(d: &Duration) -> serde_json::Number {
    if d.subsec_nanos() % 1_000_000 == 0 {
        serde_json::Number::from(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    } else {
        serde_json::Number::from_f64(d.as_secs_f64() * 1000.0).unwrap_or_else(|| 0u64.into())
    }
}

/// Serde for a [`Duration`] written as milliseconds (`#[serde(with = "config::millis")]`).
pub mod millis {
    use super::*;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// Writes whole milliseconds as an integer, else a fraction.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        to_millis(d).serialize(s)
    }

    /// Reads an integer or fractional number of milliseconds; rejects negative, NaN, infinite
    /// and above-[`MAX_DURATION`] values.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let ms = f64::deserialize(d)?;
        duration_from_millis(ms).map_err(serde::de::Error::custom)
    }
}

/// Serde for an `Option<Duration>` written as milliseconds or `null`
/// (`#[serde(with = "config::opt_millis")]`).
pub mod opt_millis {
    use super::*;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    /// Writes `null` or the milliseconds.
    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        d.as_ref().map(to_millis).serialize(s)
    }

    /// Reads `null` or milliseconds, as [`millis`](super::millis) does.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<f64>::deserialize(d)? {
            None => Ok(None),
            Some(ms) => duration_from_millis(ms)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct C {
        #[serde(with = "millis")]
        a: Duration,
        #[serde(with = "opt_millis", default)]
        b: Option<Duration>,
    }

    #[test]
    fn round_trips_without_truncating() {
        for (a, b) in [
            (Duration::from_millis(1500), None),
            (Duration::from_micros(2_500), Some(Duration::from_millis(7))),
            (MAX_DURATION, Some(Duration::ZERO)),
        ] {
            let c = C { a, b };
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(serde_json::from_str::<C>(&json).unwrap(), c, "{json}");
        }
        assert_eq!(
            serde_json::to_string(&C {
                a: Duration::from_millis(3),
                b: None
            })
            .unwrap(),
            r#"{"a":3,"b":null}"#
        );
    }

    #[test]
    fn bad_values_are_errors() {
        for bad in [
            r#"{"a": -1}"#,
            r#"{"a": 1e300}"#,
            r#"{"a": "x"}"#,
            r#"{"a": 1, "b": -5}"#,
        ] {
            assert!(serde_json::from_str::<C>(bad).is_err(), "{bad}");
        }
        assert!(positive("x", "f", Duration::MAX).is_err());
        assert!(in_range("x", "f", f64::NAN, 0.0, 1.0).is_err());
    }
}
