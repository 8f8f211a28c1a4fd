//! # portcullis-sim
//!
//! A simulated OpenAI + Anthropic API server, faithful enough that the official SDKs cannot tell
//! it from the real thing on the paths it serves, with rate limits and fault injection. Every
//! Portcullis test, example and drill runs against it: no API key and no network needed.
//!
//! - `POST /v1/chat/completions` (streaming or not, `stream_options.include_usage`),
//!   `POST /v1/messages` (streaming or not, the full SSE sequence with `ping`),
//!   `POST /v1/messages/count_tokens`, `GET /v1/models`.
//! - Auth: OpenAI `Authorization: Bearer`; Anthropic `x-api-key` or `Authorization: Bearer`.
//!   Any non-empty key is accepted; a missing one gets the provider's own 401.
//! - Ids (`chatcmpl-…`, `msg_01…`, `req_…`), `x-request-id` / `request-id`,
//!   `x-ratelimit-*` (Go-duration resets), `anthropic-ratelimit-*` (RFC 3339 resets), error
//!   bodies in each provider's shape.
//! - Deterministic text, seeded by the request and [`Scenario::seed`]; `max_tokens` gives
//!   `length` / `max_tokens`; stop sequences are honoured. OpenAI prompt tokens are counted by
//!   [`portcullis_core::TokenEstimator::count_messages`] of [`portcullis_core::OpenAiTokenizer`], exactly as the client counts them.
//!   Anthropic input tokens are o200k text tokens + 7 (at most what the client's
//!   [`portcullis_core::AnthropicEstimator`] estimates, as against the real API), and
//!   `count_tokens` agrees with `/v1/messages`.
//! - Rate limits per API key and model ([`Limits`]): continuously refilling buckets; OpenAI
//!   charges prompt + `max_tokens` to TPM, Anthropic input tokens to input TPM and `max_tokens` to
//!   output TPM (refunding the unused part at the end). A request over a limit gets a 429
//!   `rate_limit_exceeded` / `rate_limit_error` with `retry-after` (whole seconds, rounded up;
//!   OpenAI adds `retry-after-ms`) and the limit headers. `time_scale` compresses the minute.
//! - Azure OpenAI: `POST /openai/deployments/{deployment}/chat/completions?api-version=…`
//!   answers as the OpenAI route does, as the deployment (its `model`), with `api-key` auth (or
//!   a bearer token), `apim-request-id`, and the deployment's own limits, shared by every key
//!   ([`Limits::models`], [`Simulator::deployment`]). No `api-version` gets Azure's 404, and
//!   with [`Scenario::deployments`] declared, so does an unknown deployment
//!   (`DeploymentNotFound`).
//! - Faults ([`FaultRule`]), by probability or on a timeline of [`Phase`]s, per API, changeable
//!   at run time. They apply to `/v1/chat/completions` and `/v1/messages` only.
//! - [`Stats`] of everything received.
//! - Tools, images, structured output, thinking and prompt caching, as below.
//!
//! ## Tools, structured output, thinking, caching
//!
//! Requests are checked by the real APIs' rules, and a violation gets the real 400
//! `invalid_request_error` body: tool results must answer a tool call of the message just
//! before (Anthropic `tool_use` / `tool_result`, OpenAI `tool_calls` / `role:"tool"`), and every
//! call must be answered before the conversation goes on; tool names match
//! `^[a-zA-Z0-9_-]{1,64}$` and their schemas are object schemas; base64 images must be PNG,
//! JPEG, GIF or WebP and decode to the declared type (magic bytes), documents to a PDF;
//! `thinking.budget_tokens` is at least 1024 and below `max_tokens`; `response_format`
//! `json_schema` has an object schema; `reasoning_effort` only on reasoning models (o-series,
//! gpt-5); at most 4 `cache_control` breakpoints.
//!
//! Answers stay deterministic:
//! - **Tool calls**, by this rule: `none` forbids a call; a named tool is called; with `auto`,
//!   the tools whose name occurs in the last user message are called, in the order they occur
//!   (only the first when parallel calls are off: OpenAI `parallel_tool_calls: false`,
//!   Anthropic `disable_parallel_tool_use: true`), and none when the conversation ends with a
//!   tool result: the answer is then text that sums the result up, so agent loops end.
//!   `required` / `any` call at least the first tool offered. Arguments are generated from the
//!   tool's JSON Schema (required properties; enum → first value; string → a word; number → 1
//!   within its bounds; boolean → true; array → `minItems` items; `$ref`, `anyOf` followed), so
//!   they validate. Ids are `call_…` / `toolu_01…`, the same for the same request.
//! - **Structured output**: `json_schema` gives an example of the schema by the same rule,
//!   `json_object` a JSON object.
//! - **Thinking** (Anthropic): a `thinking` block with a `signature` (a keyed hash of its text)
//!   before the content; a thinking block sent back with a signature the simulator did not
//!   produce for that text is refused with the real 400 ("Invalid `signature` in `thinking`
//!   block"). OpenAI reasoning models spend hidden `reasoning_tokens` by `reasoning_effort`
//!   (minimal 16, low 64, medium 192 by default, high 448), which count in
//!   `completion_tokens` and `max_completion_tokens`.
//! - **Prompt caching**, per server, bounded (4096 prefixes, least recently used out first):
//!   Anthropic `cache_control` breakpoints of at least the model's minimum (1024 tokens; 4096
//!   for Haiku 4.5 / Opus 4.5; 2048 for older Haiku) are written (`cache_creation_input_tokens`,
//!   by 5m / 1h lifetime) and read back by a repeat within the lifetime
//!   (`cache_read_input_tokens`; `input_tokens` is the uncached rest). OpenAI caches prompts of
//!   1024 tokens or more automatically, and a repeated prefix is reported in
//!   `prompt_tokens_details.cached_tokens` in steps of 128 (still part of `prompt_tokens`).
//!   Lifetimes run on `tokio::time`; `POST /_sim/reset` empties the cache.
//! - Streams carry the recorded fragment shapes: OpenAI tool call deltas by `index` (id, type,
//!   name and empty arguments first, then argument fragments); Anthropic `content_block_start`
//!   (`tool_use` with input `{}`), `input_json_delta`, `thinking_delta`, `signature_delta`.
//!
//! Images cost a flat 85 prompt tokens (documents too); tool definitions, calls and results
//! count their JSON and text.
//!
//! All timing uses `tokio::time`, so tests with paused time drive limits, latency and timelines.
//!
//! ```
//! use portcullis_sim::{FaultKind, FaultRule, Simulator};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> Result<(), portcullis_sim::SimError> {
//! let sim = Simulator::builder()
//!     .seed(7)
//!     .fault(FaultRule::new(FaultKind::Overloaded).times(1))
//!     .start()
//!     .await?;
//! println!("OpenAI at {}, Anthropic at {}", sim.openai_base_url(), sim.anthropic_base_url());
//! assert_eq!(sim.stats().requests, 0);
//! sim.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! ## Control endpoints
//!
//! - `GET /_sim/stats`: the [`Stats`] as JSON;
//! - `POST /_sim/faults`: replace the faults with a [`FaultPlan`] (`{"faults": [...],
//!   "timeline": [...]}`), restarting the timeline;
//! - `POST /_sim/limits`: replace the [`Limits`] (fresh windows);
//! - `POST /_sim/reset`: zero the stats and the limit windows, restart the timeline.
//!
//! ## Scenario files
//!
//! A [`Scenario`] loads from TOML or JSON ([`Scenario::from_path`] picks by extension). Unknown
//! fields are rejected, and the error names the field (`faults[0].probability`). All fields are
//! optional:
//!
//! ```toml
//! seed = 42                 # seeds text, ids and the fault dice
//! max_body_bytes = 4194304  # larger bodies get a 413
//! chunk_delay_ms = 0        # pause between streamed events
//! answer_words = 0          # > 0: every text answer is this many words (one chunk each)
//!
//! deployments = ["gpt-4o-eu", "gpt-4o-us"]  # Azure deployments served (default: any name)
//!
//! [limits]
//! time_scale = 60.0         # a "minute" lasts 60 s / time_scale = 1 s
//! openai = { rpm = 500, tpm = 200000 }
//! anthropic = { rpm = 50, input_tpm = 30000, output_tpm = 8000 }
//! # Per model on /v1/chat/completions, per deployment on Azure's route.
//! models = { "gpt-4o-eu" = { rpm = 60, tpm = 30000 } }
//!
//! # Faults that always apply. kind is one of: rate_limit, insufficient_quota, billing,
//! # status (with status = 400..599), overloaded, latency (with latency_ms), hang, reset,
//! # error_before_content, error_after_content, truncated, malformed_json.
//! # family = "openai" | "anthropic" | "both" (default); probability 0..1 (default 1);
//! # times = N fires at most N times.
//! [[faults]]
//! kind = "latency"
//! latency_ms = 50
//! probability = 0.5
//!
//! [[faults]]
//! kind = "rate_limit"
//! retry_after_secs = 1
//! times = 2
//!
//! # The timeline: phases one after another; only the last may omit duration_secs.
//! [[timeline]]
//! name = "healthy"
//! duration_secs = 10
//!
//! [[timeline]]
//! name = "outage"
//! duration_secs = 20
//! faults = [{ kind = "status", status = 503, family = "openai" }]
//!
//! [[timeline]]
//! name = "recovered"
//! ```
//!
//! `crates/portcullis-sim/scenarios/outage.toml` is a complete example.
#![forbid(unsafe_code)]

mod anthropic;
mod api;
mod cache;
mod generate;
mod limits;
mod media;
mod openai;
mod scenario;
mod schema;
mod server;
mod state;
mod stats;
mod tools;
mod wire;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::task::JoinHandle;

pub use scenario::{
    AnthropicLimits, Family, FaultKind, FaultPlan, FaultRule, Limits, OpenAiLimits, Phase,
    Scenario, ScenarioError,
};
pub use stats::Stats;
pub use wire::{go_duration, rfc3339};

use state::{Shared, lock};

/// Why the simulator could not start.
#[derive(Debug)]
#[non_exhaustive]
pub enum SimError {
    /// The address could not be bound.
    Bind(std::io::Error),
    /// The scenario is invalid.
    Scenario(ScenarioError),
}

impl std::fmt::Display for SimError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SimError::Bind(e) => write!(f, "simulator could not bind: {e}"),
            SimError::Scenario(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for SimError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SimError::Bind(e) => Some(e),
            SimError::Scenario(e) => Some(e),
        }
    }
}

impl From<ScenarioError> for SimError {
    fn from(e: ScenarioError) -> Self {
        SimError::Scenario(e)
    }
}

/// Configures and starts a simulator. `Simulator::builder()` starts from the default
/// [`Scenario`] on `127.0.0.1:0`.
#[derive(Debug, Clone)]
pub struct Simulator {
    scenario: Scenario,
    addr: SocketAddr,
}

impl Simulator {
    /// The default scenario (generous limits, no faults) on a random loopback port.
    pub fn builder() -> Self {
        Simulator {
            scenario: Scenario::default(),
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }

    /// Replaces the whole scenario.
    pub fn scenario(mut self, scenario: Scenario) -> Self {
        self.scenario = scenario;
        self
    }

    /// Loads the scenario from a `.toml` or `.json` file.
    pub fn scenario_file(self, path: impl AsRef<Path>) -> Result<Self, ScenarioError> {
        Ok(self.scenario(Scenario::from_path(path)?))
    }

    /// The address to bind (default `127.0.0.1:0`).
    pub fn addr(mut self, addr: SocketAddr) -> Self {
        self.addr = addr;
        self
    }

    /// The seed of text, ids and fault dice.
    pub fn seed(mut self, seed: u64) -> Self {
        self.scenario.seed = seed;
        self
    }

    /// The rate limits.
    pub fn limits(mut self, limits: Limits) -> Self {
        self.scenario.limits = limits;
        self
    }

    /// Adds a fault that always applies.
    pub fn fault(mut self, rule: FaultRule) -> Self {
        self.scenario.faults.push(rule);
        self
    }

    /// The timeline of phases.
    pub fn timeline(mut self, phases: Vec<Phase>) -> Self {
        self.scenario.timeline = phases;
        self
    }

    /// Serves the Azure OpenAI deployment `name` with its own `limits` (see
    /// [`Scenario::deployments`]); once one is declared, undeclared names get a 404.
    ///
    /// ```
    /// use portcullis_sim::{OpenAiLimits, Simulator};
    ///
    /// let sim = Simulator::builder()
    ///     .deployment("gpt-4o-eu", OpenAiLimits { rpm: 60, tpm: 30_000 })
    ///     .deployment("gpt-4o-us", OpenAiLimits { rpm: 600, tpm: 300_000 });
    /// # let _ = sim;
    /// ```
    pub fn deployment(mut self, name: impl Into<String>, limits: OpenAiLimits) -> Self {
        let name = name.into();
        self.scenario.limits.models.insert(name.clone(), limits);
        if !self.scenario.deployments.contains(&name) {
            self.scenario.deployments.push(name);
        }
        self
    }

    /// The request body cap.
    pub fn max_body_bytes(mut self, n: usize) -> Self {
        self.scenario.max_body_bytes = n;
        self
    }

    /// The pause between streamed events.
    pub fn chunk_delay(mut self, d: std::time::Duration) -> Self {
        self.scenario.chunk_delay_ms = d.as_millis() as u64;
        self
    }

    /// Every text answer is exactly `words` words, one streamed chunk each (0: the default
    /// two to four sentences), before `max_tokens` cuts it: long streams for benchmarks.
    pub fn answer_words(mut self, words: u32) -> Self {
        self.scenario.answer_words = words;
        self
    }

    /// Validates the scenario, binds, and serves in a background task.
    pub async fn start(self) -> Result<SimHandle, SimError> {
        self.scenario.validate()?;
        let listener = tokio::net::TcpListener::bind(self.addr)
            .await
            .map_err(SimError::Bind)?;
        let addr = listener.local_addr().map_err(SimError::Bind)?;
        // Build the BPE tables now, off the runtime, rather than on the first request (about
        // a second in release builds, which would otherwise show as first-request latency).
        let warm = tokio::task::spawn_blocking(|| {
            portcullis_core::OpenAiTokenizer::new(portcullis_core::Encoding::O200k).warm_up();
        });
        let _ = warm.await;
        let shared = Arc::new(Shared::new(&self.scenario));
        let task = tokio::spawn(server::serve(listener, shared.clone()));
        Ok(SimHandle {
            addr,
            shared,
            task: Some(task),
        })
    }
}

/// A running simulator. Dropping it stops it (the port is freed at once; open connections
/// close gracefully in the background).
#[derive(Debug)]
pub struct SimHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: Option<JoinHandle<()>>,
}

impl SimHandle {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT/v1`, the OpenAI SDKs' `base_url`.
    pub fn openai_base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// `http://127.0.0.1:PORT`, the Anthropic SDKs' `base_url` (they add `/v1/messages`).
    pub fn anthropic_base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces the always-on faults, keeping the timeline (which restarts).
    pub fn set_faults(&self, faults: Vec<FaultRule>) -> Result<(), ScenarioError> {
        let timeline = lock(&self.shared.faults).plan().timeline.clone();
        self.set_plan(FaultPlan { faults, timeline })
    }

    /// Replaces the timeline and restarts it now, keeping the always-on faults.
    pub fn set_timeline(&self, timeline: Vec<Phase>) -> Result<(), ScenarioError> {
        let faults = lock(&self.shared.faults).plan().faults.clone();
        self.set_plan(FaultPlan { faults, timeline })
    }

    /// Replaces all faults and restarts the timeline now.
    pub fn set_plan(&self, plan: FaultPlan) -> Result<(), ScenarioError> {
        plan.validate()?;
        self.shared.set_plan(plan);
        Ok(())
    }

    /// Removes every fault.
    pub fn clear_faults(&self) {
        self.shared.set_plan(FaultPlan::default());
    }

    /// Replaces the rate limits; every window starts afresh.
    pub fn set_limits(&self, limits: Limits) -> Result<(), ScenarioError> {
        limits.validate()?;
        lock(&self.shared.limiter).set_limits(limits);
        Ok(())
    }

    /// A snapshot of the counts.
    pub fn stats(&self) -> Stats {
        lock(&self.shared.stats).clone()
    }

    /// Zeroes the counts.
    pub fn reset_stats(&self) {
        *lock(&self.shared.stats) = Stats::default();
    }

    /// Zeroes the counts and the limit windows, empties the prompt cache, and restarts the
    /// timeline and the `times` counters of the faults (what `POST /_sim/reset` does).
    pub fn reset(&self) {
        self.reset_stats();
        lock(&self.shared.limiter).reset();
        lock(&self.shared.cache).clear();
        self.shared.restart_plan();
    }

    /// Stops accepting, wakes hanging requests, and waits for open connections to close
    /// (at most 5 s).
    pub async fn shutdown(mut self) {
        self.shared.shutdown.send_replace(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }

    /// Serves in the foreground until Ctrl-C, then shuts down (for `portcullis sim`).
    pub async fn wait(self) {
        let _ = tokio::signal::ctrl_c().await;
        self.shutdown().await;
    }
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
    }
}
