//! The three stacks every drill compares, with the same scaled settings.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use portcullis::layers::RetryLayer;
use portcullis::layers::circuit_breaker::CircuitBreakerConfig;
use portcullis::layers::retry::{Attempt, BudgetConfig, Decision, Policy, RetryConfig};
use portcullis::layers::token_bucket::{BucketStore, TokenBucketConfig};
use portcullis::providers::{AnthropicProvider, ApiKey, OpenAiProvider};
use portcullis::stack::{Provider, ProviderStream};
use portcullis::{
    ChatRequest, CompletionResult, LlmError, ProviderStack, RetryStop, Stack, StackError,
};
use serde::Serialize;
use tower::Layer;
use tower::util::BoxCloneSyncService;

use super::scaled;
use super::seed::{SeedClient, SeedConfig, SeedLimits};
use super::workload::StackService;

/// The stacks the `outage`, `rate-limit` and `storm` drills compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StackKind {
    /// The provider alone.
    Bare,
    /// The port of the seed's classes ([`SeedClient`]).
    Seed,
    /// The [`Stack`].
    Portcullis,
}

impl StackKind {
    /// Every stack, in the order they run.
    pub const ALL: [StackKind; 3] = [StackKind::Bare, StackKind::Seed, StackKind::Portcullis];
}

impl fmt::Display for StackKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StackKind::Bare => "bare",
            StackKind::Seed => "seed",
            StackKind::Portcullis => "portcullis",
        })
    }
}

/// Real-world defaults shared by the seed and Portcullis, before scaling.
pub const MAX_RETRIES: u32 = 3;
/// Backoff base.
pub const BASE_DELAY: Duration = Duration::from_secs(1);
/// Backoff cap.
pub const MAX_DELAY: Duration = Duration::from_secs(30);
/// Attempt timeout.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// Consecutive failures that open a breaker.
pub const FAILURE_THRESHOLD: u32 = 5;
/// Breaker recovery timeout.
pub const RECOVERY: Duration = Duration::from_secs(60);
/// Half-open probes.
pub const HALF_OPEN: u32 = 3;
/// The overall deadline of the Portcullis stack.
pub const DEADLINE: Duration = Duration::from_secs(150);

fn key() -> ApiKey {
    match ApiKey::new("sk-portcullis-drill") {
        Ok(k) => k,
        Err(e) => unreachable!("a fixed non-empty key is valid: {e}"),
    }
}

/// An OpenAI provider for a simulator.
pub fn openai(base_url: &str) -> Result<OpenAiProvider, LlmError> {
    OpenAiProvider::builder()
        .base_url(base_url)
        .api_key(key())
        .build()
}

/// An Anthropic provider for a simulator.
pub fn anthropic(base_url: &str) -> Result<AnthropicProvider, LlmError> {
    AnthropicProvider::builder()
        .base_url(base_url)
        .api_key(key())
        .build()
}

/// `bare`: the provider alone.
pub fn bare(p: OpenAiProvider) -> StackService {
    BoxCloneSyncService::new(p)
}

/// The official SDKs' retry: 2 retries of 408 / 409 / 429 / 5xx, honouring `retry-after` (up
/// to 60 s), else 0.5 s doubling with up to 25 % jitter down.
#[derive(Debug, Clone, Copy)]
pub struct SdkPolicy;

impl Policy<ChatRequest, CompletionResult, LlmError> for SdkPolicy {
    fn decide(
        &self,
        a: &Attempt<'_, ChatRequest>,
        outcome: Result<&CompletionResult, &LlmError>,
    ) -> Decision {
        let Err(e) = outcome else {
            return Decision::Accept;
        };
        let retryable = match e.status() {
            Some(s) => matches!(s, 408 | 409 | 429) || s >= 500,
            None => matches!(
                e.kind(),
                portcullis::ErrorKind::Connect | portcullis::ErrorKind::Timeout
            ),
        };
        if !retryable {
            return Decision::Accept;
        }
        if a.retries() >= 2 {
            return Decision::GiveUp(RetryStop::Exhausted);
        }
        let delay = match e.retry_after() {
            Some(d) if d <= Duration::from_secs(60) => d,
            _ => {
                let base = 0.5 * 2f64.powi(a.retries() as i32);
                let jitter = 1.0 - 0.25 * ((a.number as f64 * 0.618).fract());
                Duration::from_secs_f64(base.min(8.0) * jitter)
            }
        };
        Decision::Retry(delay)
    }
}

/// `bare` with the SDKs' retry (the rate-limit drill's baseline).
pub fn bare_with_sdk_retry(p: OpenAiProvider) -> StackService {
    BoxCloneSyncService::new(RetryLayer::new(SdkPolicy).layer(p))
}

/// The seed's settings, scaled.
pub fn seed_config(limits: Option<SeedLimits>) -> SeedConfig {
    SeedConfig {
        max_retries: MAX_RETRIES,
        base_delay: scaled(BASE_DELAY),
        max_delay: scaled(MAX_DELAY),
        attempt_timeout: scaled(ATTEMPT_TIMEOUT),
        failure_threshold: FAILURE_THRESHOLD,
        recovery_timeout: scaled(RECOVERY),
        half_open_requests: HALF_OPEN,
        limits,
    }
}

/// `seed` over the given providers: `(name, service, model remap)`.
pub fn seed(
    providers: Vec<(String, StackService, Option<Arc<str>>)>,
    limits: Option<SeedLimits>,
    rng: u64,
) -> SeedClient {
    SeedClient::new(seed_config(limits), providers, rng)
}

/// Portcullis' retry settings, scaled.
pub fn retry_config(rng: u64) -> RetryConfig {
    RetryConfig {
        max_retries: MAX_RETRIES,
        base_delay: scaled(BASE_DELAY),
        max_delay: scaled(MAX_DELAY),
        retry_after_cap: scaled(Duration::from_secs(60)),
        budget: Some(BudgetConfig {
            window: scaled(Duration::from_secs(10)),
            min_per_sec: 1.0 / super::SCALE,
            ..BudgetConfig::default()
        }),
        seed: Some(rng),
        ..RetryConfig::default()
    }
}

/// Portcullis' breaker settings, scaled.
pub fn breaker_config() -> CircuitBreakerConfig {
    CircuitBreakerConfig {
        recovery_timeout: scaled(RECOVERY),
        half_open_probes: HALF_OPEN,
        max_probe_wait: scaled(ATTEMPT_TIMEOUT),
        ..CircuitBreakerConfig::default()
    }
}

/// One provider of the Portcullis stack, with the scaled settings.
pub fn provider_stack(
    p: ProviderStack,
    limits: Option<TokenBucketConfig>,
    rng: u64,
) -> ProviderStack {
    let p = p
        .retry(retry_config(rng))
        .breaker(breaker_config())
        .attempt_timeout(scaled(ATTEMPT_TIMEOUT))
        .stream_idle_timeout(scaled(ATTEMPT_TIMEOUT));
    // The simulator's minute lasts `scaled(60 s)`: the limits its headers state are per that.
    let limits = limits.unwrap_or_default();
    p.limits(limits.learn_window(scaled(Duration::from_secs(60))))
}

/// The Portcullis stack over the given providers (their buckets in memory, or in a shared
/// store such as Redis).
pub fn portcullis<St>(
    providers: Vec<ProviderStack<Provider, ProviderStream, St>>,
) -> Result<Stack<Provider, ProviderStream, St>, StackError>
where
    St: BucketStore<Key = Arc<str>> + Clone + Send + Sync + 'static,
{
    let mut b = Stack::builder().deadline(scaled(DEADLINE));
    for p in providers {
        b = b.provider(p);
    }
    b.build()
}
