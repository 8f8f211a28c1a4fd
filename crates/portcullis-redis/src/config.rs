//! The store's configuration: where Redis is, how keys are named, and what to do when it fails.

use std::time::Duration;

use portcullis_core::ConfigError;
use portcullis_core::config::millis;
use serde::{Deserialize, Serialize};

use crate::Error;

/// What a [`RedisStore`](crate::RedisStore) does while Redis is unreachable, slow, or failing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Admit through a local in-memory bucket with the same limits, or with
    /// [`RedisConfig::fail_open_share`] of them. Keeps serving; with the full limits, the fleet
    /// may exceed the shared limit by up to its number of instances while Redis is away. A
    /// `warn` event marks each outage's start, an `info` event its end.
    #[default]
    FailOpen,
    /// Refuse admissions with [`Denied::Throttled`], which the token bucket returns as a
    /// `portcullis_core::Throttled` error (`ErrorKind::Throttled`); its
    /// `retry_after` is the time until Redis is tried again. Never exceeds the shared limit;
    /// serves nothing while Redis is away. A `warn` event marks each outage's start.
    ///
    /// [`Denied::Throttled`]: portcullis_layers::token_bucket::Denied::Throttled
    FailClosed,
}

/// How a [`RedisStore`](crate::RedisStore) reaches Redis. Deserializable; checked by
/// [`validate`](Self::validate) (which the store's constructor calls).
///
/// ```
/// use std::time::Duration;
/// use portcullis_redis::{FailurePolicy, RedisConfig};
/// let cfg: RedisConfig = serde_json::from_str(r#"{
///     "url": "redis://10.0.0.5:6379/0",
///     "prefix": "myapp:rl:",
///     "timeout_ms": 25,
///     "failure_policy": "fail_closed"
/// }"#).unwrap();
/// cfg.validate().unwrap();
/// assert_eq!(cfg.timeout, Duration::from_millis(25));
/// assert_eq!(cfg.failure_policy, FailurePolicy::FailClosed);
/// assert!(serde_json::from_str::<RedisConfig>(r#"{"url": "redis://x", "timeout_ms": 0}"#)
///     .unwrap().validate().is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port[/db]` (or `unix:///path`).
    pub url: String,
    /// Prepended to every key (default `portcullis:`). A bucket's key is
    /// `{prefix}{name}:{label}`, e.g. `portcullis:openai:gpt-4o-mini`.
    #[serde(default = "default_prefix")]
    pub prefix: String,
    /// The longest one round trip may take before Redis counts as unavailable (default 50 ms).
    #[serde(rename = "timeout_ms", with = "millis", default = "default_timeout")]
    pub timeout: Duration,
    /// What to do while Redis is unavailable (default fail-open).
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    /// After a failure, how long admissions skip Redis before one of them tries it again
    /// (default 1 s). Background updates (refunds, pauses) are dropped meanwhile.
    #[serde(
        rename = "retry_interval_ms",
        with = "millis",
        default = "default_retry"
    )]
    pub retry_interval: Duration,
    /// How long a key outlives the moment its buckets are full again (default 60 s): the
    /// window in which late refunds still apply.
    #[serde(rename = "idle_ttl_ms", with = "millis", default = "default_idle_ttl")]
    pub idle_ttl: Duration,
    /// Under [`FailurePolicy::FailOpen`], the share of each limit the local fallback keeps
    /// (default 1: the full limit). `1/N` for a fleet of N instances keeps the fleet under the
    /// provider's limit during an outage too.
    #[serde(default = "default_share")]
    pub fail_open_share: f64,
}

fn default_share() -> f64 {
    1.0
}

fn default_prefix() -> String {
    "portcullis:".into()
}
fn default_timeout() -> Duration {
    Duration::from_millis(50)
}
fn default_retry() -> Duration {
    Duration::from_secs(1)
}
fn default_idle_ttl() -> Duration {
    Duration::from_secs(60)
}

/// The longest accepted timeout, retry interval, and idle TTL: one hour.
const MAX_DURATION: Duration = Duration::from_secs(3600);

impl RedisConfig {
    /// The defaults, for the server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            prefix: default_prefix(),
            timeout: default_timeout(),
            failure_policy: FailurePolicy::default(),
            retry_interval: default_retry(),
            idle_ttl: default_idle_ttl(),
            fail_open_share: default_share(),
        }
    }

    /// Sets the key prefix.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// Sets the round-trip timeout.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sets the failure policy.
    pub fn failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.failure_policy = policy;
        self
    }

    /// Sets how long admissions skip Redis after a failure.
    pub fn retry_interval(mut self, interval: Duration) -> Self {
        self.retry_interval = interval;
        self
    }

    /// Sets how long idle keys are kept.
    pub fn idle_ttl(mut self, ttl: Duration) -> Self {
        self.idle_ttl = ttl;
        self
    }

    /// Sets the share of each limit the fail-open fallback keeps.
    pub fn fail_open_share(mut self, share: f64) -> Self {
        self.fail_open_share = share;
        self
    }

    /// Checks every value: the URL parses, durations are positive and at most an hour, the
    /// fail-open share is in (0, 1].
    pub fn validate(&self) -> Result<(), Error> {
        if !(self.fail_open_share > 0.0 && self.fail_open_share <= 1.0) {
            return Err(Error::Config(ConfigError::new(
                "redis",
                "fail_open_share",
                format!("must be within (0, 1], got {}", self.fail_open_share),
            )));
        }
        redis::Client::open(self.url.as_str()).map_err(|e| Error::InvalidUrl(e.to_string()))?;
        for (field, d, min) in [
            ("timeout_ms", self.timeout, Duration::from_millis(1)),
            (
                "retry_interval_ms",
                self.retry_interval,
                Duration::from_millis(1),
            ),
            ("idle_ttl_ms", self.idle_ttl, Duration::ZERO),
        ] {
            if d < min || d > MAX_DURATION {
                return Err(Error::Config(ConfigError::new(
                    "redis",
                    field,
                    format!("must be within [{min:?}, one hour], got {d:?}"),
                )));
            }
        }
        Ok(())
    }
}
