//! Configuration of the token bucket: per-key [`KeyLimits`] made of [`Rate`]s, validated into a
//! typed [`ConfigError`].

use std::collections::BTreeMap;
use std::time::Duration;

pub use portcullis_core::ConfigError;
use portcullis_core::config::{MAX_DURATION, millis};
use portcullis_core::{LimitHint, RateLimitHints};
use serde::{Deserialize, Serialize};

use crate::keyed::KeyBounds;

/// The component name in this module's [`ConfigError`]s.
pub(crate) const COMPONENT: &str = "token bucket";

/// The default longest wait for admission: 30 s.
pub const DEFAULT_MAX_WAIT: Duration = Duration::from_secs(30);

/// The default longest pause a provider's 429 may put on a key: 30 s, as
/// [`DEFAULT_MAX_WAIT`].
pub const DEFAULT_MAX_PAUSE: Duration = DEFAULT_MAX_WAIT;

/// One bucket: how much it holds and how fast it refills.
///
/// In serde form it is either a number, meaning "per minute" (capacity = the number, refill =
/// number / 60 per second, as providers state RPM / TPM), or an object with `capacity` and
/// `refill_per_sec`, or an object with `per_minute`.
///
/// ```
/// use portcullis_layers::token_bucket::Rate;
/// let rpm: Rate = serde_json::from_str("500").unwrap();
/// assert_eq!(rpm, Rate::per_minute(500).unwrap());
/// let custom: Rate = serde_json::from_str(r#"{"capacity": 10, "refill_per_sec": 10}"#).unwrap();
/// assert_eq!(custom.capacity(), 10);
/// assert!(serde_json::from_str::<Rate>(r#"{"capacity": 0, "refill_per_sec": 1}"#).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawRate", into = "RawRate")]
pub struct Rate {
    capacity: u64,
    refill_per_sec: f64,
}

impl Rate {
    /// A bucket of `capacity` refilling at `refill_per_sec` units per second.
    ///
    /// Refused: a capacity of 0, a refill rate that is not a positive finite number, and a rate
    /// so slow that one unit takes more than a year ([`MAX_DURATION`]) or the whole capacity
    /// more than a century to refill: its arithmetic would overflow, and it could never be what
    /// a provider states.
    pub fn new(capacity: u64, refill_per_sec: f64) -> Result<Rate, ConfigError> {
        if capacity == 0 {
            return Err(ConfigError::new(
                COMPONENT,
                "capacity",
                "must be at least 1",
            ));
        }
        if !refill_per_sec.is_finite() || refill_per_sec <= 0.0 {
            return Err(ConfigError::new(
                COMPONENT,
                "refill_per_sec",
                format!("must be a positive, finite number, got {refill_per_sec}"),
            ));
        }
        // One unit's refill interval, and the time to refill the whole capacity, must fit the
        // nanosecond arithmetic with room to spare.
        if 1.0 / refill_per_sec > MAX_DURATION.as_secs_f64()
            || capacity as f64 / refill_per_sec > MAX_REFILL.as_secs_f64()
        {
            return Err(ConfigError::new(
                COMPONENT,
                "refill_per_sec",
                format!(
                    "{refill_per_sec} per second is too slow: one unit must refill within a year, \
                     and the capacity ({capacity}) within a century"
                ),
            ));
        }
        Ok(Rate {
            capacity,
            refill_per_sec,
        })
    }

    /// A provider-style "N per minute" limit: capacity N, refilling N / 60 per second.
    pub fn per_minute(n: u64) -> Result<Rate, ConfigError> {
        Rate::new(n, n as f64 / 60.0)
    }

    /// The capacity.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The refill rate, per second.
    pub fn refill_per_sec(&self) -> f64 {
        self.refill_per_sec
    }
}

#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum RawRate {
    PerMinute(u64),
    Object(RateObject),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RateObject {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    capacity: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    refill_per_sec: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    per_minute: Option<u64>,
}

impl TryFrom<RawRate> for Rate {
    type Error = ConfigError;
    fn try_from(raw: RawRate) -> Result<Rate, ConfigError> {
        match raw {
            RawRate::PerMinute(n) => Rate::per_minute(n),
            RawRate::Object(o) => match (o.capacity, o.refill_per_sec, o.per_minute) {
                (None, None, Some(n)) => Rate::per_minute(n),
                (Some(c), Some(r), None) => Rate::new(c, r),
                _ => Err(ConfigError::new(
                    COMPONENT,
                    "rate",
                    "needs either `capacity` and `refill_per_sec`, or `per_minute` alone",
                )),
            },
        }
    }
}

impl From<Rate> for RawRate {
    fn from(r: Rate) -> RawRate {
        RawRate::Object(RateObject {
            capacity: Some(r.capacity),
            refill_per_sec: Some(r.refill_per_sec),
            per_minute: None,
        })
    }
}

/// The limits of one key: up to four buckets, all reserved atomically (every configured bucket
/// or none). A bucket left out does not limit.
///
/// - `requests`: one unit per request (RPM).
/// - `tokens`: estimated prompt + `max_tokens` (TPM; OpenAI pre-charges `max_tokens`).
/// - `input_tokens` / `output_tokens`: Anthropic's split limits (ITPM / OTPM); the prompt
///   estimate is charged to the first and `max_tokens` to the second.
///
/// The seed's table, as examples:
///
/// ```
/// use portcullis_layers::token_bucket::{KeyLimits, Rate};
/// // openai:gpt-4o-mini, 500 RPM / 200 000 TPM
/// let mini: KeyLimits = serde_json::from_str(r#"{"requests": 500, "tokens": 200000}"#).unwrap();
/// assert_eq!(mini, KeyLimits::rpm_tpm(500, 200_000).unwrap());
/// // anthropic:claude-3-haiku, 1000 RPM / 100 000 TPM, or split input / output
/// let haiku = KeyLimits::rpm_tpm(1000, 100_000).unwrap();
/// let split: KeyLimits = serde_json::from_str(
///     r#"{"requests": 1000, "input_tokens": 100000, "output_tokens": 20000}"#).unwrap();
/// assert_eq!(split.output_tokens, Some(Rate::per_minute(20_000).unwrap()));
/// # let _ = haiku;
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct KeyLimits {
    /// Requests bucket (RPM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<Rate>,
    /// Total tokens bucket (TPM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens: Option<Rate>,
    /// Input tokens bucket (Anthropic ITPM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<Rate>,
    /// Output tokens bucket (Anthropic OTPM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<Rate>,
}

impl KeyLimits {
    /// No bucket: nothing is limited.
    pub fn unlimited() -> KeyLimits {
        KeyLimits::default()
    }

    /// Provider-style requests-per-minute and tokens-per-minute limits.
    pub fn rpm_tpm(rpm: u64, tpm: u64) -> Result<KeyLimits, ConfigError> {
        Ok(KeyLimits {
            requests: Some(Rate::per_minute(rpm)?),
            tokens: Some(Rate::per_minute(tpm)?),
            ..KeyLimits::default()
        })
    }

    /// Sets the requests bucket.
    pub fn with_requests(mut self, rate: Rate) -> Self {
        self.requests = Some(rate);
        self
    }

    /// Sets the total tokens bucket.
    pub fn with_tokens(mut self, rate: Rate) -> Self {
        self.tokens = Some(rate);
        self
    }

    /// Sets the input tokens bucket.
    pub fn with_input_tokens(mut self, rate: Rate) -> Self {
        self.input_tokens = Some(rate);
        self
    }

    /// Sets the output tokens bucket.
    pub fn with_output_tokens(mut self, rate: Rate) -> Self {
        self.output_tokens = Some(rate);
        self
    }

    /// The buckets in a fixed order: requests, tokens, input tokens, output tokens.
    pub fn buckets(&self) -> [Option<Rate>; 4] {
        [
            self.requests,
            self.tokens,
            self.input_tokens,
            self.output_tokens,
        ]
    }

    /// Each bucket the lower of the two (by refill speed, then capacity); a bucket only one
    /// side has is kept. The rule by which configured and learned limits combine.
    ///
    /// ```
    /// use portcullis_layers::token_bucket::KeyLimits;
    /// let configured = KeyLimits::rpm_tpm(500, 200_000).unwrap();
    /// let learned = KeyLimits::rpm_tpm(60, 1_000_000).unwrap();
    /// assert_eq!(configured.lower(learned), KeyLimits::rpm_tpm(60, 200_000).unwrap());
    /// ```
    pub fn lower(self, other: KeyLimits) -> KeyLimits {
        let pick = |a: Option<Rate>, b: Option<Rate>| match (a, b) {
            (Some(a), Some(b)) => {
                let key = |r: Rate| (r.refill_per_sec, r.capacity);
                Some(if key(b) < key(a) { b } else { a })
            }
            (a, b) => a.or(b),
        };
        KeyLimits {
            requests: pick(self.requests, other.requests),
            tokens: pick(self.tokens, other.tokens),
            input_tokens: pick(self.input_tokens, other.input_tokens),
            output_tokens: pick(self.output_tokens, other.output_tokens),
        }
    }

    /// The limits a provider states in its headers (`x-ratelimit-limit-requests` / `-tokens`,
    /// `anthropic-ratelimit-{requests,tokens,input-tokens,output-tokens}-limit`), each read as
    /// `limit` per `window` (a minute for both providers). `None` when no limit is stated (or
    /// none is usable: a limit of 0 says nothing about a rate).
    ///
    /// ```
    /// use std::time::Duration;
    /// use portcullis_core::RateLimitHints;
    /// use portcullis_layers::token_bucket::{KeyLimits, Rate};
    /// let mut hints = RateLimitHints::default();
    /// assert_eq!(KeyLimits::stated_in(&hints, Duration::from_secs(60)), None);
    /// hints.requests.limit = Some(500);
    /// let learned = KeyLimits::stated_in(&hints, Duration::from_secs(60)).unwrap();
    /// assert_eq!(learned.requests, Some(Rate::per_minute(500).unwrap()));
    /// ```
    pub fn stated_in(hints: &RateLimitHints, window: Duration) -> Option<KeyLimits> {
        let secs = window.as_secs_f64();
        let rate = |h: &LimitHint| h.limit.and_then(|n| Rate::new(n, n as f64 / secs).ok());
        let l = KeyLimits {
            requests: rate(&hints.requests),
            tokens: rate(&hints.tokens),
            input_tokens: rate(&hints.input_tokens),
            output_tokens: rate(&hints.output_tokens),
        };
        (l != KeyLimits::unlimited()).then_some(l)
    }

    /// Checks every bucket (a [`Rate`] built by hand with serde bypassed cannot be invalid, but
    /// one deserialized elsewhere is re-checked here).
    pub fn validate(&self) -> Result<(), ConfigError> {
        for rate in self.buckets().into_iter().flatten() {
            Rate::new(rate.capacity, rate.refill_per_sec)?;
        }
        Ok(())
    }
}

/// The whole configuration of a token bucket layer.
///
/// `limits` maps a key label to its limits. A request's key is looked up first as
/// `name:label` (e.g. `openai:gpt-4o-mini`, where `name` is the layer's name), then as the bare
/// label (`gpt-4o-mini`), then falls back to `default`. With no `default`, a key that matches
/// nothing is **not limited** (a `warn` event says so once per key).
///
/// ```
/// use std::time::Duration;
/// use portcullis_layers::token_bucket::TokenBucketConfig;
/// let cfg: TokenBucketConfig = serde_json::from_str(r#"{
///     "limits": {
///         "openai:gpt-4o-mini": {"requests": 500, "tokens": 200000},
///         "anthropic:claude-3-haiku": {"requests": 1000, "tokens": 100000}
///     },
///     "default": {"requests": 60},
///     "max_wait_ms": 10000
/// }"#).unwrap();
/// cfg.validate().unwrap();
/// assert_eq!(cfg.max_wait, Duration::from_secs(10));
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct TokenBucketConfig {
    /// Limits per key label (`provider:model` or `model`).
    #[serde(default)]
    pub limits: BTreeMap<String, KeyLimits>,
    /// Limits of keys not listed; `None` leaves them unlimited.
    #[serde(default)]
    pub default: Option<KeyLimits>,
    /// The longest a request may wait for admission before it is refused with `Throttled`.
    #[serde(rename = "max_wait_ms", with = "millis", default = "default_max_wait")]
    pub max_wait: Duration,
    /// The longest a provider's rate-limit hint (`Retry-After`, `retry-after-ms`, a reset
    /// header) may pause a key: a longer hint is cut to this, with a `warn` event. Without a
    /// cap, one 429 asking for a year would stop the key for a year. At most a day; default
    /// 30 s ([`DEFAULT_MAX_PAUSE`]).
    #[serde(
        rename = "max_pause_ms",
        with = "millis",
        default = "default_max_pause"
    )]
    pub max_pause: Duration,
    /// Learn each key's limits from the provider's own limit headers (on by default): a key
    /// with no configured limits paces at the limits its responses state, and follows them
    /// when they change; a configured limit and a learned one combine by
    /// [`KeyLimits::lower`], bucket by bucket. Until a response states a limit, an
    /// unconfigured key is not limited.
    #[serde(default = "default_learn")]
    pub learn_limits: bool,
    /// The window a provider's stated limits are per: a minute (the default) for OpenAI's and
    /// Anthropic's headers. A simulator whose minute runs faster says so here.
    #[serde(
        rename = "learn_window_ms",
        with = "millis",
        default = "default_learn_window"
    )]
    pub learn_window: Duration,
    /// How many keys the in-memory store keeps buckets for, and when an unused one is dropped
    /// (default 10 000 keys, 10 minutes): keys beyond the cap share one overflow bucket with
    /// the `default` limits; keys named in `limits` are never counted. See
    /// [`MemoryStore`](super::MemoryStore) and [`KeyBounds`].
    #[serde(default)]
    pub keys: KeyBounds,
}

fn default_learn() -> bool {
    true
}

fn default_learn_window() -> Duration {
    Duration::from_secs(60)
}

fn default_max_wait() -> Duration {
    DEFAULT_MAX_WAIT
}

fn default_max_pause() -> Duration {
    DEFAULT_MAX_PAUSE
}

impl Default for TokenBucketConfig {
    fn default() -> Self {
        TokenBucketConfig {
            limits: BTreeMap::new(),
            default: None,
            max_wait: DEFAULT_MAX_WAIT,
            max_pause: DEFAULT_MAX_PAUSE,
            learn_limits: true,
            learn_window: default_learn_window(),
            keys: KeyBounds::default(),
        }
    }
}

impl TokenBucketConfig {
    /// An empty configuration (every key unlimited until limits are set).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds the limits of one key label.
    pub fn limit(mut self, label: impl Into<String>, limits: KeyLimits) -> Self {
        self.limits.insert(label.into(), limits);
        self
    }

    /// Sets the limits of unlisted keys.
    pub fn default_limits(mut self, limits: KeyLimits) -> Self {
        self.default = Some(limits);
        self
    }

    /// Sets the longest admission wait.
    pub fn max_wait(mut self, max_wait: Duration) -> Self {
        self.max_wait = max_wait;
        self
    }

    /// Sets the longest pause a provider's 429 may put on a key.
    pub fn max_pause(mut self, max_pause: Duration) -> Self {
        self.max_pause = max_pause;
        self
    }

    /// Turns learning limits from the provider's headers on or off (on by default; see
    /// [`learn_limits`](Self::learn_limits)).
    pub fn learn_limits(mut self, learn: bool) -> Self {
        self.learn_limits = learn;
        self
    }

    /// Sets the window a provider's stated limits are per (default a minute).
    pub fn learn_window(mut self, window: Duration) -> Self {
        self.learn_window = window;
        self
    }

    /// Sets how many keys get their own buckets, and when an unused one is dropped.
    pub fn keys(mut self, keys: KeyBounds) -> Self {
        self.keys = keys;
        self
    }

    /// The limits a provider stated in `hints` ([`KeyLimits::stated_in`], per
    /// [`learn_window`](Self::learn_window)); `None` when learning is off or none is stated.
    pub fn learned(&self, hints: &RateLimitHints) -> Option<KeyLimits> {
        match self.learn_limits {
            true => KeyLimits::stated_in(hints, self.learn_window),
            false => None,
        }
    }

    /// The limits a key should have once its provider stated `learned`: the configured ones
    /// ([`resolve`](Self::resolve)) lowered by them ([`KeyLimits::lower`]).
    pub fn with_learned(&self, name: &str, label: &str, learned: KeyLimits) -> KeyLimits {
        self.resolve(name, label).unwrap_or_default().lower(learned)
    }

    /// Checks every value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (label, limits) in &self.limits {
            if label.is_empty() {
                return Err(ConfigError::new(
                    COMPONENT,
                    "limits",
                    "a key label must not be empty",
                ));
            }
            limits
                .validate()
                .map_err(|e| e.within(&format!("limits.{label}")))?;
        }
        if let Some(d) = &self.default {
            d.validate()?;
        }
        if self.max_wait > MAX_MAX_WAIT {
            return Err(ConfigError::new(
                COMPONENT,
                "max_wait_ms",
                format!("must be at most a day, got {:?}", self.max_wait),
            ));
        }
        if self.learn_window.is_zero() || self.learn_window > MAX_MAX_WAIT {
            return Err(ConfigError::new(
                COMPONENT,
                "learn_window_ms",
                format!(
                    "must be above zero and at most a day, got {:?}",
                    self.learn_window
                ),
            ));
        }
        if self.max_pause > MAX_MAX_WAIT {
            return Err(ConfigError::new(
                COMPONENT,
                "max_pause_ms",
                format!("must be at most a day, got {:?}", self.max_pause),
            ));
        }
        self.keys.validate(COMPONENT)
    }

    /// The limits for a key label under a layer name: `name:label`, then `label`, then
    /// `default` (`None`: not limited). Shared stores resolve their keys with it too.
    pub fn resolve(&self, name: &str, label: &str) -> Option<KeyLimits> {
        self.named(name, label).or(self.default)
    }

    /// The limits `limits` names for the key (as `name:label` or `label`), if it names it.
    fn named(&self, name: &str, label: &str) -> Option<KeyLimits> {
        if self.limits.is_empty() {
            return None;
        }
        if !name.is_empty() {
            let mut full = String::with_capacity(name.len() + 1 + label.len());
            full.push_str(name);
            full.push(':');
            full.push_str(label);
            if let Some(l) = self.limits.get(&full) {
                return Some(*l);
            }
        }
        self.limits.get(label).copied()
    }

    /// Whether `limits` names the key: such keys are not counted against
    /// [`keys.max_keys`](Self::keys).
    pub(crate) fn names(&self, name: &str, label: &str) -> bool {
        self.named(name, label).is_some()
    }
}

/// The longest time a bucket may take to refill its whole capacity: a century.
const MAX_REFILL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// The longest `max_wait` and `max_pause` accepted: one day.
const MAX_MAX_WAIT: Duration = Duration::from_secs(24 * 3600);
