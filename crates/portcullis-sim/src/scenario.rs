//! The scenario: everything that configures a simulator, loadable from a TOML or JSON file.
//!
//! Every struct denies unknown fields, and [`Scenario::validate`] rejects bad values with the
//! path of the field at fault (`faults[0].probability`), so a typo never becomes a silent
//! default.

use std::path::Path;

use serde::{Deserialize, Serialize};

/// A whole simulator configuration. See the crate docs for the file format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    /// Seeds the generated text, the ids and the fault dice.
    pub seed: u64,
    /// Largest request body accepted, in bytes; larger bodies get a 413.
    pub max_body_bytes: usize,
    /// Pause between two streamed events, in milliseconds (0: none).
    pub chunk_delay_ms: u64,
    /// Every text answer is exactly this many words (one streamed chunk each), before
    /// `max_tokens` and stop sequences cut it; 0 (the default): two to four sentences. For
    /// benchmarks that want long streams.
    pub answer_words: u32,
    /// Rate limits enforced per API key and model.
    pub limits: Limits,
    /// Faults that apply all the time.
    pub faults: Vec<FaultRule>,
    /// Phases, one after another from the start (or from the last `set_timeline`).
    pub timeline: Vec<Phase>,
    /// The Azure OpenAI deployments served at `/openai/deployments/{name}/chat/completions`.
    /// Empty (the default): any name is served. Otherwise another name gets Azure's 404
    /// `DeploymentNotFound`. A deployment's limits are [`Limits::models`]`[name]`, else
    /// [`Limits::openai`].
    pub deployments: Vec<String>,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            seed: 0,
            max_body_bytes: 4 * 1024 * 1024,
            chunk_delay_ms: 0,
            answer_words: 0,
            limits: Limits::default(),
            faults: Vec::new(),
            timeline: Vec::new(),
            deployments: Vec::new(),
        }
    }
}

/// Rate limits. A limit is per API key and model, in a "minute" of `60 s / time_scale`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// How much faster than real time the limit windows run: 60 makes a "minute" last 1 s.
    pub time_scale: f64,
    /// Limits of `/v1/chat/completions`.
    pub openai: OpenAiLimits,
    /// Limits of `/v1/messages`.
    pub anthropic: AnthropicLimits,
    /// OpenAI limits of particular models instead of `openai`: an Azure deployment answers as
    /// its name, so this gives each deployment its own (`{"gpt-4o-eu": {"rpm": 60, "tpm":
    /// 30000}}`). A deployment's limits are shared by every key that calls it, as Azure's
    /// quota is per deployment; a model's on `/v1/chat/completions` are per key.
    pub models: std::collections::BTreeMap<String, OpenAiLimits>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            time_scale: 1.0,
            openai: OpenAiLimits::default(),
            anthropic: AnthropicLimits::default(),
            models: Default::default(),
        }
    }
}

/// OpenAI's limits: requests and tokens (prompt + `max_tokens`) per minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OpenAiLimits {
    /// Requests per minute.
    pub rpm: u64,
    /// Tokens per minute, pre-charged as prompt tokens + `max_tokens`.
    pub tpm: u64,
}

impl Default for OpenAiLimits {
    fn default() -> Self {
        OpenAiLimits {
            rpm: 10_000,
            tpm: 10_000_000,
        }
    }
}

/// Anthropic's limits: requests, input tokens and output tokens per minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnthropicLimits {
    /// Requests per minute.
    pub rpm: u64,
    /// Input tokens per minute.
    pub input_tpm: u64,
    /// Output tokens per minute, charged as `max_tokens` up front and settled to the real
    /// output at the end, as Anthropic does.
    pub output_tpm: u64,
}

impl Default for AnthropicLimits {
    fn default() -> Self {
        AnthropicLimits {
            rpm: 4_000,
            input_tpm: 2_000_000,
            output_tpm: 400_000,
        }
    }
}

/// Which API a fault applies to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// `/v1/chat/completions`.
    Openai,
    /// `/v1/messages`.
    Anthropic,
    /// Both (the default).
    #[default]
    Both,
}

impl Family {
    /// Whether a rule for `self` applies to a request of `api`.
    pub fn covers(self, api: Family) -> bool {
        self == Family::Both || self == api
    }
}

/// What a fault does to a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    /// 429 `rate_limit_exceeded` / `rate_limit_error`, with `retry-after` (`retry_after_secs`,
    /// default 1).
    RateLimit,
    /// OpenAI: 429 `insufficient_quota`. Anthropic: 402 `billing_error`.
    InsufficientQuota,
    /// 402 (OpenAI `billing_not_active`, Anthropic `billing_error`).
    Billing,
    /// An error status (`status`, 400..=599) in the provider's shape.
    Status,
    /// Anthropic: 529 `overloaded_error`. OpenAI: 503 "overloaded".
    Overloaded,
    /// Adds `latency_ms` before the answer; combines with any other fault.
    Latency,
    /// Never answers: the request hangs until the client gives up (or the simulator stops).
    Hang,
    /// Closes the connection without an answer.
    Reset,
    /// Streams only: an error event after the stream opened, before any content.
    ErrorBeforeContent,
    /// Streams only: an error event after some content.
    ErrorAfterContent,
    /// Streams only: the stream ends early, without `[DONE]` / `message_stop`.
    Truncated,
    /// A 200 whose JSON body (or one stream event) is cut short.
    MalformedJson,
}

impl FaultKind {
    /// Whether the fault only applies to streaming requests.
    pub fn stream_only(self) -> bool {
        matches!(
            self,
            FaultKind::ErrorBeforeContent | FaultKind::ErrorAfterContent | FaultKind::Truncated
        )
    }
}

/// One fault and when it fires.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultRule {
    /// What happens.
    pub kind: FaultKind,
    /// Which API it hits (default both).
    #[serde(default)]
    pub family: Family,
    /// Chance, from 0 to 1, that it fires on a matching request (default 1).
    #[serde(default = "one")]
    pub probability: f64,
    /// Fire at most this many times, then stop (default: no limit).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times: Option<u64>,
    /// The status of a `status` fault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The delay of a `latency` fault.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// The `retry-after` of a `rate_limit` fault (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_secs: Option<u64>,
}

fn one() -> f64 {
    1.0
}

impl FaultRule {
    /// A rule that always fires `kind` on both APIs.
    pub fn new(kind: FaultKind) -> Self {
        FaultRule {
            kind,
            family: Family::Both,
            probability: 1.0,
            times: None,
            status: None,
            latency_ms: None,
            retry_after_secs: None,
        }
    }
    /// An error status.
    pub fn status(status: u16) -> Self {
        FaultRule {
            status: Some(status),
            ..Self::new(FaultKind::Status)
        }
    }
    /// Added latency.
    pub fn latency(ms: u64) -> Self {
        FaultRule {
            latency_ms: Some(ms),
            ..Self::new(FaultKind::Latency)
        }
    }
    /// Only on this API.
    pub fn family(mut self, family: Family) -> Self {
        self.family = family;
        self
    }
    /// Fires with this probability.
    pub fn probability(mut self, p: f64) -> Self {
        self.probability = p;
        self
    }
    /// Fires at most `n` times.
    pub fn times(mut self, n: u64) -> Self {
        self.times = Some(n);
        self
    }
    /// The `retry-after` of a `rate_limit` fault.
    pub fn retry_after_secs(mut self, secs: u64) -> Self {
        self.retry_after_secs = Some(secs);
        self
    }
    /// The `retry-after` of a `rate_limit` fault in seconds: `retry_after_secs`, or 1.
    pub(crate) fn retry_after(&self) -> u64 {
        self.retry_after_secs.unwrap_or(1)
    }

    fn validate(&self, at: &str) -> Result<(), ScenarioError> {
        let bad = |field: &str, message: &str| {
            Err(ScenarioError::Invalid {
                field: format!("{at}.{field}"),
                message: message.to_owned(),
            })
        };
        if !(0.0..=1.0).contains(&self.probability) {
            return bad("probability", "must be between 0 and 1");
        }
        match (self.kind, self.status) {
            (FaultKind::Status, None) => return bad("status", "required by kind = \"status\""),
            (FaultKind::Status, Some(s)) if !(400..=599).contains(&s) => {
                return bad("status", "must be an error status, 400 to 599");
            }
            (FaultKind::Status, _) => {}
            (_, Some(_)) => return bad("status", "only allowed with kind = \"status\""),
            (_, None) => {}
        }
        match (self.kind, self.latency_ms) {
            (FaultKind::Latency, None) => {
                return bad("latency_ms", "required by kind = \"latency\"");
            }
            (FaultKind::Latency, _) => {}
            (_, Some(_)) => return bad("latency_ms", "only allowed with kind = \"latency\""),
            (_, None) => {}
        }
        if self.retry_after_secs.is_some() && self.kind != FaultKind::RateLimit {
            return bad(
                "retry_after_secs",
                "only allowed with kind = \"rate_limit\"",
            );
        }
        Ok(())
    }
}

/// One phase of a timeline: its faults, for `duration_secs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    /// A label, for logs and stats.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// How long it lasts, in seconds. Only the last phase may omit it (it then lasts forever);
    /// after a last phase with a duration, the timeline adds no more faults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_secs: Option<f64>,
    /// The faults of the phase (none: healthy).
    #[serde(default)]
    pub faults: Vec<FaultRule>,
}

impl Phase {
    /// A phase of `secs` seconds with these faults.
    pub fn new(secs: f64, faults: Vec<FaultRule>) -> Self {
        Phase {
            name: None,
            duration_secs: Some(secs),
            faults,
        }
    }
    /// A phase with no end.
    pub fn forever(faults: Vec<FaultRule>) -> Self {
        Phase {
            name: None,
            duration_secs: None,
            faults,
        }
    }
}

/// The faults part of a scenario: what `POST /_sim/faults` takes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FaultPlan {
    /// Faults that apply all the time.
    pub faults: Vec<FaultRule>,
    /// The timeline, restarted when the plan is set.
    pub timeline: Vec<Phase>,
}

impl FaultPlan {
    /// Checks every value; the error names the field.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        for (i, f) in self.faults.iter().enumerate() {
            f.validate(&format!("faults[{i}]"))?;
        }
        let last = self.timeline.len().saturating_sub(1);
        for (i, p) in self.timeline.iter().enumerate() {
            match p.duration_secs {
                None if i != last => {
                    return Err(ScenarioError::Invalid {
                        field: format!("timeline[{i}].duration_secs"),
                        message: "required on every phase but the last".into(),
                    });
                }
                Some(d) if !(d.is_finite() && d >= 0.0) => {
                    return Err(ScenarioError::Invalid {
                        field: format!("timeline[{i}].duration_secs"),
                        message: "must be a finite number of seconds, 0 or more".into(),
                    });
                }
                _ => {}
            }
            for (j, f) in p.faults.iter().enumerate() {
                f.validate(&format!("timeline[{i}].faults[{j}]"))?;
            }
        }
        Ok(())
    }
}

impl Limits {
    /// Checks every value; the error names the field.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        if !(self.time_scale.is_finite() && self.time_scale > 0.0) {
            return Err(ScenarioError::Invalid {
                field: "limits.time_scale".into(),
                message: "must be a finite number above 0".into(),
            });
        }
        let mut all = vec![
            ("openai.rpm".to_owned(), self.openai.rpm),
            ("openai.tpm".to_owned(), self.openai.tpm),
            ("anthropic.rpm".to_owned(), self.anthropic.rpm),
            ("anthropic.input_tpm".to_owned(), self.anthropic.input_tpm),
            ("anthropic.output_tpm".to_owned(), self.anthropic.output_tpm),
        ];
        for (model, l) in &self.models {
            all.push((format!("models.{model}.rpm"), l.rpm));
            all.push((format!("models.{model}.tpm"), l.tpm));
        }
        match all.iter().find(|(_, v)| *v == 0) {
            Some((name, _)) => Err(ScenarioError::Invalid {
                field: format!("limits.{name}"),
                message: "must be at least 1".into(),
            }),
            None => Ok(()),
        }
    }

    /// The length of a limit window ("minute").
    pub fn window(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(60.0 / self.time_scale)
    }
}

impl Scenario {
    /// Checks every value; the error names the field.
    pub fn validate(&self) -> Result<(), ScenarioError> {
        if self.max_body_bytes == 0 {
            return Err(ScenarioError::Invalid {
                field: "max_body_bytes".into(),
                message: "must be at least 1".into(),
            });
        }
        self.limits.validate()?;
        self.plan().validate()
    }

    /// Its faults and timeline.
    pub fn plan(&self) -> FaultPlan {
        FaultPlan {
            faults: self.faults.clone(),
            timeline: self.timeline.clone(),
        }
    }

    /// Parses and validates TOML.
    pub fn from_toml_str(text: &str) -> Result<Self, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Parse {
            message: e.to_string(),
        })?;
        s.validate()?;
        Ok(s)
    }

    /// Parses and validates JSON.
    pub fn from_json_str(text: &str) -> Result<Self, ScenarioError> {
        let s: Scenario = serde_json::from_str(text).map_err(|e| json_error(text, &e))?;
        s.validate()?;
        Ok(s)
    }

    /// Reads a `.toml` or `.json` file.
    pub fn from_path(path: impl AsRef<Path>) -> Result<Self, ScenarioError> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| ScenarioError::Io {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        match path.extension().and_then(|e| e.to_str()) {
            Some("toml") => Self::from_toml_str(&text),
            Some("json") => Self::from_json_str(&text),
            _ => Err(ScenarioError::Io {
                path: path.display().to_string(),
                message: "a scenario file must end in .toml or .json".into(),
            }),
        }
    }
}

/// serde_json names unknown and missing fields itself; for a bad value it gives only a line,
/// so the line's text is quoted, which shows the field.
pub(crate) fn json_error(text: &str, e: &serde_json::Error) -> ScenarioError {
    let line = text.lines().nth(e.line().saturating_sub(1)).unwrap_or("");
    let message = if line.trim().is_empty() || e.line() == 0 {
        e.to_string()
    } else {
        format!("{e}: `{}`", line.trim())
    };
    ScenarioError::Parse { message }
}

/// A scenario that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ScenarioError {
    /// The file could not be read, or has an unknown extension.
    Io {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// Not valid TOML / JSON for a scenario (unknown or missing field, wrong type). The
    /// message names the field.
    Parse {
        /// The parser's message.
        message: String,
    },
    /// A value out of range.
    Invalid {
        /// The path of the field, e.g. `faults[0].probability`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

impl std::fmt::Display for ScenarioError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ScenarioError::Io { path, message } => write!(f, "scenario {path}: {message}"),
            ScenarioError::Parse { message } => write!(f, "bad scenario: {message}"),
            ScenarioError::Invalid { field, message } => {
                write!(f, "bad scenario: `{field}` {message}")
            }
        }
    }
}

impl std::error::Error for ScenarioError {}
