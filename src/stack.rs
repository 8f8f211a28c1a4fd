//! The recommended composition: the seed's `ResilientLLMClient`, done as tower layers.
//!
//! Outermost first:
//!
//! 0. **telemetry** ([`TelemetryLayer`](portcullis_layers::telemetry::TelemetryLayer)): a `gen_ai.chat` span per call and, with the `metrics` feature, the GenAI client metrics;
//! 1. **deadline** ([`DeadlineLayer`]): stamps the overall deadline on the request;
//! 2. **fallback** ([`Fallback`]): the providers in order, primary first, each with its retry
//!    policy (from [`ProviderStack::retry`]) and a gate read from its breaker and bucket;
//! 3. per provider:
//!    1. **circuit breaker** ([`CircuitBreakerLayer`]),
//!    2. **token bucket** ([`TokenBucketLayer`]): the configured limits, else those the
//!       provider's responses state (learned from its rate-limit headers),
//!    3. **attempt timeout** ([`TimeoutLayer`]) (and, for streams, an idle limit),
//!    4. the provider.
//!
//! Why this order:
//!
//! - every attempt is a breaker sample, and an open breaker keeps the call off its provider (it
//!   is passed over, and the call goes to the next provider);
//! - the limiter charges every attempt, because providers charge every attempt;
//! - an open breaker burns no quota: a refused call never reaches the bucket;
//! - an attempt timeout counts as a breaker failure.
//!
//! # Failing over first
//!
//! The retries live in the fallback, not inside each provider, so that a healthy fallback never
//! waits on the primary's backoff ([`FailoverPolicy::FailoverFirst`], the default): when an
//! attempt fails in a way that allows a fallback, the next provider that can take the call now
//! (its breaker admits it, its bucket is not paused by a 429 nor queued past its `max_wait`)
//! is tried at once. A backoff sleep, or a wait for a `Retry-After`, happens only when no
//! provider can take the call now; then the providers are tried in order again. A primary that
//! answered 429 with `Retry-After` is passed over until then (its bucket's pause, cut to
//! `max_pause`). The deadline bounds the whole call; in this mode the providers' retry
//! policies draw from one retry budget, the primary's (a provider whose retry settings have
//! `budget: None` has none).
//!
//! [`FailoverPolicy::RetryEachThenFallback`] ([`StackBuilder::failover`], `"failover"` in
//! [`StackConfig`]) keeps the older order, LiteLLM's: each provider is retried by its own
//! policy, with its own budget, before the next one is tried. With the seed's retry (3 retries,
//! 1 s doubling backoff), a dead primary then delays its first calls' failover by seconds: see
//! the README's `drill failover` table.
//!
//! # The seed's order
//!
//! The seed wrapped rate limit → breaker → retry (outermost first). It stays expressible by
//! hand with the same layers:
//!
//! ```
//! # use std::time::Duration;
//! # use portcullis::layers::{CircuitBreakerLayer, RetryLayer, TimeoutLayer, TokenBucketLayer};
//! # use portcullis::layers::{circuit_breaker::CircuitBreakerConfig, token_bucket::{KeyLimits, TokenBucketConfig}};
//! # use portcullis::{ChatRequest, CompletionResult, LlmError};
//! # fn provider() -> impl tower::Service<ChatRequest, Response = CompletionResult, Error = LlmError, Future = impl Send> + Clone + Send {
//! #     tower::service_fn(|r: ChatRequest| async move { Ok::<_, LlmError>(CompletionResult::new("openai", r.model.to_string(), "hi")) })
//! # }
//! let limits = TokenBucketConfig::new().limit("gpt-4o-mini", KeyLimits::rpm_tpm(500, 200_000).unwrap());
//! let seed_order = tower::ServiceBuilder::new()
//!     .layer(TokenBucketLayer::new("openai", limits).unwrap())
//!     .layer(CircuitBreakerLayer::new("openai", CircuitBreakerConfig::default()).unwrap())
//!     .layer(RetryLayer::standard())
//!     .layer(TimeoutLayer::new(Duration::from_secs(30)))
//!     .service(provider());
//! # let _ = seed_order;
//! ```
//!
//! The trade-off: there, a whole retried call is one breaker sample (so a dead upstream takes
//! `threshold × (max_retries + 1)` calls to trip), the limiter charges a call once however many
//! attempts it makes (so retries can exceed the provider's limits), and an open breaker is only
//! discovered after waiting for a token.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use portcullis_core::config::{self, millis};
use portcullis_core::{
    BoxError, ChatCost, ChatRequest, ChatStream, CompletionResult, ConfigError, CostOf, LlmError,
};
use portcullis_layers::circuit_breaker::{
    self, CircuitBreakerConfig, CircuitBreakerHandle, Window,
};
use portcullis_layers::fallback::FailoverPolicy;
use portcullis_layers::pool::{
    Deployment, Group, PoolConfig, PoolError, PoolHandle, PoolRanking, Tracked, grouped,
};
use portcullis_layers::retry::{RetryBudget, RetryConfig, StandardPolicy};
use portcullis_layers::telemetry::Telemetry;
use portcullis_layers::timeout::{
    Deadline, DeadlineLayer, StreamIdle, StreamIdleLayer, Timeout, TimeoutLayer,
};
use portcullis_layers::token_bucket::{
    BucketStore, MemoryStore, TokenBucketConfig, TokenBucketHandle,
};
use portcullis_layers::{
    ByModel, CircuitBreaker, CircuitBreakerLayer, Entry, Fallback, TokenBucket, TokenBucketLayer,
};
use portcullis_providers::{
    AnthropicProvider, AnthropicStream, ApiKey, AzureOpenAi, AzureOpenAiProvider,
    AzureOpenAiStream, OpenAiProvider, OpenAiStream,
};
use serde::{Deserialize, Serialize};
use tower::util::Either;
use tower::{Layer, Service};

/// The default overall deadline: enough for the seed's four 30 s attempts and their backoff.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(150);
/// The default attempt timeout (the seed's).
pub const DEFAULT_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// One of the built-in providers, as a complete-call service: OpenAI on the left, Anthropic
/// or Azure OpenAI on the right.
pub type Provider = Either<OpenAiProvider, Either<AnthropicProvider, AzureOpenAiProvider>>;

/// One of the built-in providers, as a streaming service.
pub type ProviderStream = Either<OpenAiStream, Either<AnthropicStream, AzureOpenAiStream>>;

/// The per-provider chain: breaker → (bucket, its state in `St`) → attempt timeout → `S`. Its
/// retries are the fallback's ([`Entry::retry`]).
pub type ProviderChain<S, St = MemoryStore> =
    CircuitBreaker<Either<TokenBucket<Timeout<S>, ByModel, ChatCost, St>, Timeout<S>>>;

/// The completion service a [`Stack`] yields. Each provider's chain is [`Tracked`] (calls in
/// flight and latency) when it is a deployment of a [pool](StackBuilder::pool), and passed
/// through untouched otherwise.
pub type Completions<S = Provider, St = MemoryStore> =
    Telemetry<Deadline<Fallback<Tracked<ProviderChain<S, St>>, ChatRequest, StandardPolicy>>>;

/// The streaming service a [`Stack`] yields.
pub type Streams<S = ProviderStream, St = MemoryStore> = Telemetry<
    Deadline<Fallback<Tracked<ProviderChain<StreamIdle<S>, St>>, ChatRequest, StandardPolicy>>,
>;

/// Builds a provider's bucket store from the provider's name and its limits (the default:
/// [`MemoryStore::new`]; see [`ProviderStack::store`]).
pub type StoreFactory<St> =
    Arc<dyn Fn(&str, TokenBucketConfig) -> Result<St, BoxError> + Send + Sync>;

/// Why a [`Stack`] could not be built.
#[derive(Debug)]
#[non_exhaustive]
pub enum StackError {
    /// No provider was given.
    NoProviders,
    /// Two providers share a name.
    DuplicateName(String),
    /// An attempt timeout is longer than the overall deadline: the last attempt could never
    /// time out on its own.
    AttemptTimeoutExceedsDeadline {
        /// The provider.
        provider: String,
        /// Its attempt timeout.
        attempt_timeout: Duration,
        /// The overall deadline.
        deadline: Duration,
    },
    /// A time-based breaker window shorter than twice the attempt timeout: a slow failure
    /// would age out before the next one arrives, so the breaker could never see a rate.
    BreakerWindowTooShort {
        /// The provider.
        provider: String,
        /// The window.
        window: Duration,
        /// The attempt timeout.
        attempt_timeout: Duration,
    },
    /// A setting is invalid: the stack's own (provider `None`), or a provider's retry, breaker,
    /// limit or timeout setting.
    Config(Option<String>, ConfigError),
    /// A provider could not be built (a missing key, a bad URL).
    Provider(String, LlmError),
    /// A provider's bucket store could not be built (e.g. an invalid Redis configuration).
    Store(String, BoxError),
    /// A pool is invalid (no deployment, a zero weight, or in a configuration: members that
    /// are not consecutive, or settings for a pool no provider is in).
    Pool(String, PoolError),
    /// Pools rank their deployments per request and fail over to a sibling before any backoff,
    /// which [`FailoverPolicy::RetryEachThenFallback`] contradicts.
    PoolNeedsFailoverFirst(String),
}

impl fmt::Display for StackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StackError::NoProviders => f.write_str("a stack needs at least one provider"),
            StackError::DuplicateName(n) => write!(f, "two providers are named {n:?}"),
            StackError::AttemptTimeoutExceedsDeadline {
                provider,
                attempt_timeout,
                deadline,
            } => write!(
                f,
                "provider {provider:?}: attempt timeout {attempt_timeout:?} is longer than the deadline {deadline:?}"
            ),
            StackError::BreakerWindowTooShort {
                provider,
                window,
                attempt_timeout,
            } => write!(
                f,
                "provider {provider:?}: breaker window {window:?} is shorter than twice the attempt timeout {attempt_timeout:?}"
            ),
            StackError::Config(None, e) => write!(f, "{e}"),
            StackError::Config(Some(p), e) => write!(f, "provider {p:?}: {e}"),
            StackError::Provider(p, e) => write!(f, "provider {p:?}: {e}"),
            StackError::Store(p, e) => write!(f, "provider {p:?}: bucket store: {e}"),
            StackError::Pool(p, e) => write!(f, "pool {p:?}: {e}"),
            StackError::PoolNeedsFailoverFirst(p) => write!(
                f,
                "pool {p:?}: pools need the failover-first policy, not retry-each-then-fallback"
            ),
        }
    }
}

impl std::error::Error for StackError {}

/// One provider of a stack, with its resilience settings. `St` is where its token buckets
/// keep their state: in memory by default, or a shared store such as Redis
/// ([`ProviderStack::store`]).
#[derive(Clone)]
pub struct ProviderStack<S = Provider, Q = ProviderStream, St = MemoryStore> {
    name: Cow<'static, str>,
    complete: S,
    stream: Q,
    model: Option<String>,
    larger_context: bool,
    retry: RetryConfig,
    breaker: CircuitBreakerConfig,
    limits: Option<TokenBucketConfig>,
    store: StoreFactory<St>,
    attempt_timeout: Duration,
    stream_idle: Duration,
    stream_total: Option<Duration>,
    weight: u32,
}

impl<S: fmt::Debug, Q: fmt::Debug, St> fmt::Debug for ProviderStack<S, Q, St> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProviderStack")
            .field("name", &self.name)
            .field("complete", &self.complete)
            .field("stream", &self.stream)
            .field("model", &self.model)
            .field("limits", &self.limits)
            .field("attempt_timeout", &self.attempt_timeout)
            .field("stream_idle", &self.stream_idle)
            .finish_non_exhaustive()
    }
}

impl ProviderStack<Provider, ProviderStream> {
    /// An OpenAI provider named `"openai"`.
    pub fn openai(provider: OpenAiProvider) -> Self {
        let stream = Either::Left(provider.streaming());
        ProviderStack::new(portcullis_core::OPENAI, Either::Left(provider), stream)
    }

    /// An Anthropic provider named `"anthropic"`.
    pub fn anthropic(provider: AnthropicProvider) -> Self {
        let stream = Either::Right(Either::Left(provider.streaming()));
        let complete = Either::Right(Either::Left(provider));
        ProviderStack::new(portcullis_core::ANTHROPIC, complete, stream)
    }

    /// An Azure OpenAI deployment named `"azure-openai"` (name each deployment of a pool with
    /// [`name`](Self::name)).
    pub fn azure(provider: AzureOpenAiProvider) -> Self {
        let stream = Either::Right(Either::Right(provider.streaming()));
        let complete = Either::Right(Either::Right(provider));
        ProviderStack::new("azure-openai", complete, stream)
    }
}

impl<S, Q> ProviderStack<S, Q> {
    /// A provider named `name`, with its complete-call and streaming services, and the default
    /// settings: the seed's retry (3 retries, 1 s → 30 s backoff) with full jitter and a retry
    /// budget, the seed's breaker (5 consecutive failures, 60 s, 3 probes), no configured
    /// limits (a token bucket per model paces at the limits the provider's responses state), a
    /// 30 s attempt timeout, and a 30 s idle limit for streams.
    ///
    /// With a fallback behind it, a failure of this provider goes to the fallback at once
    /// ([`FailoverPolicy::FailoverFirst`]); its retries (and their backoff) are spent only when
    /// no provider can take the call now.
    pub fn new(name: impl Into<Cow<'static, str>>, complete: S, stream: Q) -> Self {
        ProviderStack {
            name: name.into(),
            complete,
            stream,
            model: None,
            larger_context: false,
            retry: RetryConfig::default(),
            breaker: CircuitBreakerConfig::default(),
            limits: None,
            store: Arc::new(|name, config| Ok(MemoryStore::new(name.to_owned(), config)?)),
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
            stream_idle: DEFAULT_ATTEMPT_TIMEOUT,
            stream_total: None,
            weight: 1,
        }
    }
}

impl<S, Q, St> ProviderStack<S, Q, St> {
    /// Keeps this provider's token buckets in another store: `make` builds it, when the stack
    /// is built, from the provider's name and its [`limits`](Self::limits). With a shared
    /// store, every instance of a service draws from the same buckets:
    ///
    /// ```ignore
    /// let redis = RedisConfig::new("redis://10.0.0.5:6379/");
    /// let openai = ProviderStack::openai(provider)
    ///     .limits(limits)
    ///     .store(move |name, limits| Ok(RedisStore::new(name, limits, redis.clone())?));
    /// ```
    pub fn store<St2, F>(self, make: F) -> ProviderStack<S, Q, St2>
    where
        F: Fn(&str, TokenBucketConfig) -> Result<St2, BoxError> + Send + Sync + 'static,
    {
        ProviderStack {
            name: self.name,
            complete: self.complete,
            stream: self.stream,
            model: self.model,
            larger_context: self.larger_context,
            retry: self.retry,
            breaker: self.breaker,
            limits: self.limits,
            store: Arc::new(make),
            attempt_timeout: self.attempt_timeout,
            stream_idle: self.stream_idle,
            stream_total: self.stream_total,
            weight: self.weight,
        }
    }

    /// Renames the provider (for logs, breaker keys and handles).
    pub fn name(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.name = name.into();
        self
    }

    /// Sends this provider's requests to `model` instead of the caller's.
    pub fn model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// Declares a larger context window: context-length errors of earlier providers go here.
    pub fn larger_context(mut self, yes: bool) -> Self {
        self.larger_context = yes;
        self
    }

    /// Sets the retry settings: how often and after what backoff this provider is tried again
    /// within one call.
    pub fn retry(mut self, config: RetryConfig) -> Self {
        self.retry = config;
        self
    }

    /// Sets the breaker settings.
    pub fn breaker(mut self, config: CircuitBreakerConfig) -> Self {
        self.breaker = config;
        self
    }

    /// Sets RPM / TPM limits (a token bucket per model). Limits the provider states in its
    /// headers still lower them ([`TokenBucketConfig::learn_limits`] turns that off).
    pub fn limits(mut self, config: TokenBucketConfig) -> Self {
        self.limits = Some(config);
        self
    }

    /// Sets the attempt timeout (also the time-to-first-chunk limit of streams).
    pub fn attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = timeout;
        self
    }

    /// Bounds a committed stream's whole duration, from its first chunk (off by default): a
    /// stream still running after `total` ends with a `Timeout` error, however steadily its
    /// chunks arrive. Pings and comments are not chunks, so the idle limit already ends a
    /// stream that only pings; this bounds one that trickles content forever.
    pub fn stream_total_timeout(mut self, total: Duration) -> Self {
        self.stream_total = Some(total);
        self
    }

    /// Sets the idle limit between chunks of a stream.
    pub fn stream_idle_timeout(mut self, idle: Duration) -> Self {
        self.stream_idle = idle;
        self
    }

    /// Its weight as a deployment of a pool with the
    /// [`Weighted`](portcullis_layers::pool::Strategy::Weighted) strategy (default 1).
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    fn validate(&self, deadline: Duration) -> Result<(), StackError> {
        let provider = self.name.to_string();
        let config = |e| StackError::Config(Some(provider.clone()), e);
        config::positive("stack", "attempt_timeout_ms", self.attempt_timeout).map_err(config)?;
        config::positive("stack", "stream_idle_timeout_ms", self.stream_idle).map_err(config)?;
        if self.attempt_timeout > deadline {
            return Err(StackError::AttemptTimeoutExceedsDeadline {
                provider,
                attempt_timeout: self.attempt_timeout,
                deadline,
            });
        }
        let windows = [
            match &self.breaker.trip {
                circuit_breaker::TripPolicy::FailureRate {
                    window: Window::Time(w),
                    ..
                } => Some(*w),
                _ => None,
            },
            match &self.breaker.slow_calls {
                Some(s) => match s.window {
                    Window::Time(w) => Some(w),
                    Window::Count(_) => None,
                },
                None => None,
            },
        ];
        for window in windows.into_iter().flatten() {
            if window < self.attempt_timeout * 2 {
                return Err(StackError::BreakerWindowTooShort {
                    provider,
                    window,
                    attempt_timeout: self.attempt_timeout,
                });
            }
        }
        Ok(())
    }
}

/// Builds a [`Stack`].
#[derive(Debug, Clone)]
pub struct StackBuilder<S, Q, St = MemoryStore> {
    deadline: Duration,
    failover: FailoverPolicy,
    providers: Vec<ProviderStack<S, Q, St>>,
    /// Each pool: its name, its routing, and how many providers (from the end of `providers`
    /// when it was added) are its deployments.
    pools: Vec<(String, PoolConfig, std::ops::Range<usize>)>,
}

/// The handles of one provider's layers.
#[derive(Debug, Clone)]
pub struct ProviderHandles<St = MemoryStore> {
    /// The provider's name.
    pub name: String,
    /// The model this provider is asked for when it remaps requests (`None`: the caller's
    /// model). Breakers and buckets are keyed by the model the provider sees, so this is the
    /// key to query them with.
    pub model: Option<Arc<str>>,
    /// Its circuit breakers (one per model).
    pub breaker: CircuitBreakerHandle<Arc<str>>,
    /// Its token buckets (always present: with no configured limits they learn the
    /// provider's).
    pub limiter: Option<TokenBucketHandle<St>>,
}

impl<St: BucketStore<Key = Arc<str>>> ProviderHandles<St> {
    /// How long until this provider could take `req` (zero: now), the later of its breaker's
    /// and its bucket's answers, for the model it is asked for: the stack's fallback passes a
    /// provider over while this is not zero and another provider's is.
    pub fn availability(&self, req: &ChatRequest) -> Duration {
        let key: &str = self.model.as_deref().unwrap_or(&req.model);
        let bucket = self
            .limiter
            .as_ref()
            .map_or(Duration::ZERO, |l| l.availability(key));
        self.breaker.availability(key).max(bucket)
    }

    /// [`availability`](Self::availability) as a fallback entry's gate.
    fn gate(&self) -> impl Fn(&ChatRequest) -> Duration + Clone + Send + Sync + 'static
    where
        St: Clone + Send + Sync,
    {
        let handles = self.clone();
        move |req: &ChatRequest| handles.availability(req)
    }
}

/// The recommended stack over one or more providers. See the [module docs](self).
///
/// ```
/// use portcullis::{ChatMessage, ChatRequest, ErrorKind, Stack, ProviderStack};
/// use portcullis::providers::{ApiKey, OpenAiProvider, AnthropicProvider};
/// use portcullis_sim::{FaultKind, FaultRule, Family, Simulator};
/// use tower::ServiceExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// // The primary is down (503 on every OpenAI call); Anthropic answers.
/// let sim = Simulator::builder()
///     .fault(FaultRule::status(503).family(Family::Openai))
///     .start().await?;
/// let key = || ApiKey::new("sk-test").unwrap();
/// let openai = OpenAiProvider::builder().base_url(sim.openai_base_url()).api_key(key()).build()?;
/// let anthropic = AnthropicProvider::builder().base_url(sim.anthropic_base_url()).api_key(key()).build()?;
/// let stack = Stack::builder()
///     .provider(ProviderStack::openai(openai))
///     .provider(ProviderStack::anthropic(anthropic).model("claude-haiku-4-5"))
///     .build()?;
/// let req = ChatRequest::new("gpt-4o-mini", vec![ChatMessage::user("Hello")]).max_tokens(20);
/// let res = stack.completions().oneshot(req).await?;
/// assert_eq!(res.provider, "anthropic");
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Stack<S = Provider, Q = ProviderStream, St = MemoryStore> {
    completions: Completions<S, St>,
    streams: Streams<Q, St>,
    handles: Vec<ProviderHandles<St>>,
    pools: Vec<(String, PoolHandle<ChatRequest>)>,
}

impl Stack {
    /// A builder with the default deadline and no provider.
    pub fn builder<S, Q, St>() -> StackBuilder<S, Q, St> {
        StackBuilder {
            deadline: DEFAULT_DEADLINE,
            failover: FailoverPolicy::default(),
            providers: Vec::new(),
            pools: Vec::new(),
        }
    }

    /// Builds a stack of the built-in providers from a configuration.
    pub fn from_config(config: &StackConfig) -> Result<Stack, StackError> {
        let mut builder = Stack::builder()
            .deadline(config.deadline)
            .failover(config.failover);
        let mut groups: Vec<(Option<&str>, Vec<ProviderStack>)> = Vec::new();
        for p in &config.providers {
            let err = |e| StackError::Provider(p.name.clone(), e);
            let key = match &p.api_key_env {
                Some(var) => Some(ApiKey::from_env(var).map_err(err)?),
                None => None,
            };
            let mut ps = match p.api {
                Api::Openai => {
                    let mut b = OpenAiProvider::builder();
                    if let Some(url) = &p.base_url {
                        b = b.base_url(url.clone());
                    }
                    if let Some(k) = key {
                        b = b.api_key(k);
                    }
                    ProviderStack::openai(b.build().map_err(err)?)
                }
                Api::Anthropic => {
                    let mut b = AnthropicProvider::builder();
                    if let Some(url) = &p.base_url {
                        b = b.base_url(url.clone());
                    }
                    if let Some(k) = key {
                        b = b.api_key(k);
                    }
                    ProviderStack::anthropic(b.build().map_err(err)?)
                }
                Api::AzureOpenai => {
                    let wire = match &p.deployment {
                        Some(d) => AzureOpenAi::new(d),
                        None => AzureOpenAi::v1(),
                    };
                    let wire = match &p.api_version {
                        Some(v) => wire.api_version(v),
                        None => wire,
                    };
                    let Some(url) = &p.base_url else {
                        let e = ConfigError::new(
                            "provider",
                            "base_url",
                            "Azure OpenAI needs the resource's endpoint",
                        );
                        return Err(StackError::Config(Some(p.name.clone()), e));
                    };
                    let mut b = AzureOpenAiProvider::builder_for(wire).base_url(url.clone());
                    if let Some(k) = key {
                        b = b.api_key(k);
                    }
                    ProviderStack::azure(b.build().map_err(err)?)
                }
            };
            ps = ps
                .name(p.name.clone())
                .larger_context(p.larger_context)
                .retry(p.retry.clone())
                .breaker(p.breaker.clone())
                .attempt_timeout(p.attempt_timeout)
                .stream_idle_timeout(p.stream_idle_timeout);
            if let Some(m) = &p.model {
                ps = ps.model(m.clone());
            }
            if let Some(l) = &p.limits {
                ps = ps.limits(l.clone());
            }
            ps = ps.weight(p.weight);
            let pool = p.pool.as_deref();
            let continues = pool.is_some() && groups.last().is_some_and(|(g, _)| *g == pool);
            if continues {
                if let Some((_, members)) = groups.last_mut() {
                    members.push(ps);
                }
            } else if pool.is_some() && groups.iter().any(|(g, _)| *g == pool) {
                let name = pool.unwrap_or_default().to_owned();
                let problem = "a pool's providers must be consecutive";
                return Err(StackError::Config(
                    Some(name),
                    ConfigError::new("pool", "providers", problem),
                ));
            } else {
                groups.push((pool, vec![ps]));
            }
        }
        if let Some(name) = config
            .pools
            .keys()
            .find(|n| !groups.iter().any(|(g, _)| *g == Some(n.as_str())))
        {
            let e = ConfigError::new("pools", name.clone(), "no provider is in this pool");
            return Err(StackError::Config(None, e));
        }
        for (pool, members) in groups {
            builder = match pool {
                Some(name) => {
                    let routing = config.pools.get(name).copied().unwrap_or_default();
                    builder.pool(name, routing, members)
                }
                None => members.into_iter().fold(builder, |b, ps| b.provider(ps)),
            };
        }
        builder.build()
    }
}

impl<S, Q, St> StackBuilder<S, Q, St>
where
    St: BucketStore<Key = Arc<str>> + Clone + Send + Sync + 'static,
    S: Service<ChatRequest, Response = CompletionResult, Error = LlmError> + Clone + Send + 'static,
    S::Future: Send,
    Q: Service<ChatRequest, Response = ChatStream, Error = LlmError> + Clone + Send + 'static,
    Q::Future: Send,
{
    /// Sets the overall deadline of a call, retries and waits included (default 150 s).
    pub fn deadline(mut self, deadline: Duration) -> Self {
        self.deadline = deadline;
        self
    }

    /// Sets the order in which a call spends its attempts across the providers (default
    /// [`FailoverPolicy::FailoverFirst`]; see the [module docs](self)).
    pub fn failover(mut self, failover: FailoverPolicy) -> Self {
        self.failover = failover;
        self
    }

    /// Adds a provider; the first one added is the primary.
    pub fn provider(mut self, provider: ProviderStack<S, Q, St>) -> Self {
        self.providers.push(provider);
        self
    }

    /// Adds a pool named `name`: `deployments` of one model (several keys, regions or hosts),
    /// one priority group in the chain. Each deployment keeps its own breaker and bucket; each
    /// call goes to the best deployment that can take it now by `config`'s
    /// [`Strategy`](portcullis_layers::pool::Strategy) (by default the one with the most
    /// headroom left in its bucket), and a failure that allows a failover goes to the next
    /// best deployment at once, then to the groups after the pool. See
    /// [`pool`](portcullis_layers::pool).
    ///
    /// ```
    /// use portcullis::{ChatMessage, ChatRequest, ProviderStack, Stack};
    /// use portcullis::layers::pool::PoolConfig;
    /// use portcullis::providers::{ApiKey, OpenAiProvider};
    /// use portcullis_sim::{SimHandle, Simulator};
    /// use tower::ServiceExt;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let east = Simulator::builder().start().await?;
    /// let west = Simulator::builder().start().await?;
    /// let deployment = |name: &'static str, sim: &SimHandle| -> Result<_, Box<dyn std::error::Error>> {
    ///     let p = OpenAiProvider::builder()
    ///         .base_url(sim.openai_base_url())
    ///         .api_key(ApiKey::new("sk-test")?)
    ///         .build()?;
    ///     Ok(ProviderStack::openai(p).name(name))
    /// };
    /// let stack = Stack::builder()
    ///     .pool("gpt-4o-mini", PoolConfig::default(), vec![deployment("east", &east)?, deployment("west", &west)?])
    ///     .build()?;
    /// let req = ChatRequest::new("gpt-4o-mini", vec![ChatMessage::user("Hello")]).max_tokens(20);
    /// stack.completions().oneshot(req.clone()).await?;
    /// let status = stack.pool("gpt-4o-mini").unwrap().status(&req);
    /// assert_eq!(status.iter().map(|d| d.finished).sum::<u64>(), 1);
    /// # Ok(()) }
    /// ```
    pub fn pool(
        mut self,
        name: impl Into<String>,
        config: PoolConfig,
        deployments: Vec<ProviderStack<S, Q, St>>,
    ) -> Self {
        let start = self.providers.len();
        self.providers.extend(deployments);
        self.pools
            .push((name.into(), config, start..self.providers.len()));
        self
    }

    /// Validates the settings and composes the stack.
    pub fn build(self) -> Result<Stack<S, Q, St>, StackError> {
        if self.providers.is_empty() {
            return Err(StackError::NoProviders);
        }
        config::positive("stack", "deadline_ms", self.deadline)
            .map_err(|e| StackError::Config(None, e))?;
        if let Some((name, ..)) = self.pools.first() {
            if self.failover == FailoverPolicy::RetryEachThenFallback {
                return Err(StackError::PoolNeedsFailoverFirst(name.clone()));
            }
        }
        if let Some((name, ..)) = self.pools.iter().find(|(_, _, r)| r.is_empty()) {
            return Err(StackError::Pool(name.clone(), PoolError::Empty));
        }
        let mut handles = Vec::new();
        // Failing over first, one budget counts the retries of every provider: the primary's.
        let budget = match (self.failover, &self.providers[0].retry.budget) {
            (FailoverPolicy::FailoverFirst, Some(b)) => {
                Some(Arc::new(RetryBudget::new(b).map_err(|e| {
                    StackError::Config(Some(self.providers[0].name.to_string()), e)
                })?))
            }
            _ => None,
        };
        let mut built = Vec::with_capacity(self.providers.len());
        for p in self.providers {
            p.validate(self.deadline)?;
            let name = p.name.to_string();
            if handles.iter().any(|h: &ProviderHandles<St>| h.name == name) {
                return Err(StackError::DuplicateName(name));
            }
            let config = |e| StackError::Config(Some(name.clone()), e);
            let policy = match (&budget, &p.retry.budget) {
                (Some(shared), Some(_)) => p.retry.builder().shared_budget(shared.clone()),
                _ => p.retry.builder(),
            };
            let policy = Arc::new(policy.build().map_err(config)?);
            let breaker =
                CircuitBreakerLayer::new(name.clone(), p.breaker.clone()).map_err(config)?;
            // Every provider paces: by its configured limits, else by those its responses
            // state (learned; `TokenBucketConfig::learn_limits`).
            let l = p.limits.clone().unwrap_or_default();
            l.validate().map_err(config)?;
            let store =
                (p.store)(&name, l.clone()).map_err(|e| StackError::Store(name.clone(), e))?;
            let bucket = Some(
                TokenBucketLayer::from_store(name.clone(), store, l.max_wait)
                    .max_pause(l.max_pause),
            );
            let handle = ProviderHandles {
                name: name.clone(),
                model: p.model.as_deref().map(Arc::from),
                breaker: breaker.handle(),
                limiter: bucket.as_ref().map(|b| b.handle()),
            };
            let complete = TimeoutLayer::new(p.attempt_timeout).layer(p.complete);
            let idle = StreamIdleLayer::new(p.stream_idle);
            let idle = match p.stream_total {
                Some(total) => idle.total(total),
                None => idle,
            };
            let stream = TimeoutLayer::new(p.attempt_timeout).layer(idle.layer(p.stream));
            built.push(Built {
                name: p.name,
                complete: compose(&breaker, bucket.as_ref(), complete),
                stream: compose(&breaker, bucket.as_ref(), stream),
                handle: handle.clone(),
                model: p.model,
                larger_context: p.larger_context,
                weight: p.weight,
                policy,
            });
            handles.push(handle);
        }
        let mut complete_entries = Vec::with_capacity(built.len());
        let mut stream_entries = Vec::with_capacity(built.len());
        let (mut complete_groups, mut stream_groups) = (Vec::new(), Vec::new());
        let mut pools = Vec::new();
        let mut built = built.into_iter();
        let mut at = 0;
        let mut pool_specs = self.pools.into_iter().peekable();
        while at < handles.len() {
            let Some((name, config, range)) = pool_specs.next_if(|(_, _, r)| r.start == at) else {
                let b = built.next().ok_or(StackError::NoProviders)?;
                let (complete, stream) = b.untracked();
                complete_entries.push(complete);
                stream_entries.push(stream);
                complete_groups.push(Group::Entry);
                stream_groups.push(Group::Entry);
                at += 1;
                continue;
            };
            let members: Vec<Built<_, _, St>> = built.by_ref().take(range.len()).collect();
            let pool_err = |e| StackError::Pool(name.clone(), e);
            let (mut completes, mut streams) = (Vec::new(), Vec::new());
            for b in &members {
                completes.push(b.deployment(b.complete.clone()));
                streams.push(b.deployment(b.stream.clone()));
            }
            let (entries, ranking) = PoolRanking::entries(completes, config).map_err(pool_err)?;
            complete_entries.extend(
                entries
                    .into_iter()
                    .zip(&members)
                    .map(|(e, b)| b.configure(e)),
            );
            pools.push((name.clone(), ranking.handle()));
            complete_groups.push(Group::Pool(ranking));
            let (entries, ranking) = PoolRanking::entries(streams, config).map_err(pool_err)?;
            stream_entries.extend(
                entries
                    .into_iter()
                    .zip(&members)
                    .map(|(e, b)| b.configure(e)),
            );
            stream_groups.push(Group::Pool(ranking));
            at = range.end;
        }
        if handles.iter().any(|h| h.limiter.is_some()) {
            portcullis_core::ChatCost::warm_up();
        }
        let deadline = DeadlineLayer::new(self.deadline);
        let mut completions = Fallback::new(complete_entries)
            .map_err(|_| StackError::NoProviders)?
            .failover(self.failover);
        let mut streams = Fallback::new(stream_entries)
            .map_err(|_| StackError::NoProviders)?
            .failover(self.failover);
        if !pools.is_empty() {
            completions = completions.ranked(grouped(complete_groups));
            streams = streams.ranked(grouped(stream_groups));
        }
        Ok(Stack {
            completions: Telemetry::new(deadline.layer(completions)),
            streams: Telemetry::new(deadline.layer(streams)),
            handles,
            pools,
        })
    }
}

/// One provider's chains and settings, between validation and the fallback entries.
struct Built<S, Q, St> {
    name: Cow<'static, str>,
    complete: ProviderChain<S, St>,
    stream: ProviderChain<StreamIdle<Q>, St>,
    handle: ProviderHandles<St>,
    model: Option<String>,
    larger_context: bool,
    weight: u32,
    policy: Arc<StandardPolicy>,
}

impl<S, Q, St> Built<S, Q, St>
where
    St: BucketStore<Key = Arc<str>> + Clone + Send + Sync + 'static,
{
    /// Its fallback entries, measured by no pool.
    #[allow(clippy::type_complexity)]
    fn untracked(
        self,
    ) -> (
        Entry<Tracked<ProviderChain<S, St>>, ChatRequest, StandardPolicy>,
        Entry<Tracked<ProviderChain<StreamIdle<Q>, St>>, ChatRequest, StandardPolicy>,
    ) {
        let gate = self.handle.gate();
        let (larger, policy) = (self.larger_context, self.policy);
        let model = self.model.as_deref();
        let complete = Entry::new(self.name.clone(), Tracked::untracked(self.complete));
        let stream = Entry::new(self.name, Tracked::untracked(self.stream));
        (
            configure(complete.gate(gate.clone()), larger, model, policy.clone()),
            configure(stream.gate(gate), larger, model, policy),
        )
    }

    /// `service` as a deployment of a pool: gated and weighed by this provider's breaker and
    /// bucket.
    fn deployment<T>(&self, service: T) -> Deployment<T, ChatRequest> {
        let limiter = self.handle.limiter.clone();
        let model = self.handle.model.clone();
        Deployment::new(self.name.clone(), service)
            .weight(self.weight)
            .gate(self.handle.gate())
            .headroom(move |req: &ChatRequest| {
                let key: &str = model.as_deref().unwrap_or(&req.model);
                limiter.as_ref()?.headroom(key, ChatCost.cost(req))
            })
    }

    fn configure<T>(&self, entry: Entry<T, ChatRequest>) -> Entry<T, ChatRequest, StandardPolicy> {
        configure(
            entry,
            self.larger_context,
            self.model.as_deref(),
            self.policy.clone(),
        )
    }
}

/// One provider's fallback entry, for its complete-call or its streaming chain.
fn configure<T>(
    entry: Entry<T, ChatRequest>,
    larger_context: bool,
    model: Option<&str>,
    policy: Arc<StandardPolicy>,
) -> Entry<T, ChatRequest, StandardPolicy> {
    let entry = entry.larger_context(larger_context).retry_shared(policy);
    match model {
        Some(m) => entry.model(m),
        None => entry,
    }
}

/// Puts breaker → (bucket) over an attempt-timed service: one provider's chain.
pub fn compose<T, St: Clone>(
    breaker: &CircuitBreakerLayer,
    bucket: Option<&TokenBucketLayer<ByModel, ChatCost, St>>,
    timed: Timeout<T>,
) -> ProviderChain<T, St> {
    let inner = match bucket {
        Some(b) => Either::Left(b.layer(timed)),
        None => Either::Right(timed),
    };
    breaker.layer(inner)
}

impl<S: Clone, Q: Clone, St: Clone> Stack<S, Q, St> {
    /// The completion service: `Clone + Send`, a clone per task is cheap and shares all state.
    pub fn completions(&self) -> Completions<S, St> {
        self.completions.clone()
    }

    /// The streaming service: its future resolves at the first content chunk; failures before
    /// it are retried and failed over, failures after it end the stream.
    pub fn streams(&self) -> Streams<Q, St> {
        self.streams.clone()
    }

    /// The handles of each provider's breaker and limiter, primary first.
    pub fn handles(&self) -> &[ProviderHandles<St>] {
        &self.handles
    }

    /// The handles of the provider named `name` (a pool's deployments are providers too).
    pub fn provider(&self, name: &str) -> Option<&ProviderHandles<St>> {
        self.handles.iter().find(|h| h.name == name)
    }

    /// The pool named `name`: each deployment's availability, headroom, calls in flight,
    /// latency and calls finished ([`PoolHandle::status`]).
    pub fn pool(&self, name: &str) -> Option<&PoolHandle<ChatRequest>> {
        self.pools.iter().find(|(n, _)| n == name).map(|(_, h)| h)
    }
}

/// Which wire format a configured provider speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    /// OpenAI Chat Completions.
    Openai,
    /// Anthropic Messages.
    Anthropic,
    /// Azure OpenAI (`base_url` is the resource's endpoint; `deployment`, or the v1 API).
    AzureOpenai,
}

/// A [`Stack`] as configuration (serde: JSON, TOML, …). Validated by [`Stack::from_config`].
///
/// ```
/// let config: portcullis::StackConfig = serde_json::from_str(r#"{
///     "deadline_ms": 60000,
///     "providers": [
///         {"name": "openai", "api": "openai", "attempt_timeout_ms": 20000,
///          "limits": {"limits": {"gpt-4o-mini": {"requests": 500, "tokens": 200000}}}},
///         {"name": "anthropic", "api": "anthropic", "model": "claude-haiku-4-5"}
///     ]
/// }"#).unwrap();
/// assert_eq!(config.providers.len(), 2);
/// ```
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StackConfig {
    /// The overall deadline (`deadline_ms` in files; default 150 s).
    #[serde(rename = "deadline_ms", with = "millis", default = "default_deadline")]
    pub deadline: Duration,
    /// How a call spends its attempts across the providers: `"failover_first"` (the default)
    /// or `"retry_each_then_fallback"`.
    #[serde(default)]
    pub failover: FailoverPolicy,
    /// The providers, primary first. Consecutive providers with the same `pool` are the
    /// deployments of that pool, one priority group in the chain.
    pub providers: Vec<ProviderConfig>,
    /// Each pool's routing, by pool name (default for a pool not listed:
    /// [`PoolConfig::default`], the most headroom first).
    #[serde(default)]
    pub pools: std::collections::BTreeMap<String, PoolConfig>,
}

/// One provider of a [`StackConfig`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// Its name (logs, breaker keys, handles).
    pub name: String,
    /// Its wire format.
    pub api: Api,
    /// Its base URL (default: the provider's public API).
    #[serde(default)]
    pub base_url: Option<String>,
    /// The environment variable holding its key (default: `OPENAI_API_KEY` /
    /// `ANTHROPIC_API_KEY`).
    #[serde(default)]
    pub api_key_env: Option<String>,
    /// The model to ask this provider for, instead of the caller's.
    #[serde(default)]
    pub model: Option<String>,
    /// Azure OpenAI: the deployment (without one, the v1 API, where `model` names it).
    #[serde(default)]
    pub deployment: Option<String>,
    /// Azure OpenAI: the `api-version` (default `portcullis_providers::azure::DEFAULT_API_VERSION`).
    #[serde(default)]
    pub api_version: Option<String>,
    /// Whether it has a larger context window than the providers before it.
    #[serde(default)]
    pub larger_context: bool,
    /// The attempt timeout (`attempt_timeout_ms` in files; default 30 s).
    #[serde(
        rename = "attempt_timeout_ms",
        with = "millis",
        default = "default_attempt"
    )]
    pub attempt_timeout: Duration,
    /// The idle limit between stream chunks (`stream_idle_timeout_ms` in files; default 30 s).
    #[serde(
        rename = "stream_idle_timeout_ms",
        with = "millis",
        default = "default_attempt"
    )]
    pub stream_idle_timeout: Duration,
    /// Retry settings.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Breaker settings.
    #[serde(default)]
    pub breaker: CircuitBreakerConfig,
    /// RPM / TPM limits.
    #[serde(default)]
    pub limits: Option<TokenBucketConfig>,
    /// The pool this provider is a deployment of (see [`StackBuilder::pool`]).
    #[serde(default)]
    pub pool: Option<String>,
    /// Its weight in a pool with the `weighted` strategy (default 1).
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

fn default_deadline() -> Duration {
    DEFAULT_DEADLINE
}

fn default_attempt() -> Duration {
    DEFAULT_ATTEMPT_TIMEOUT
}
