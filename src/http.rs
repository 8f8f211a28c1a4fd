//! The layers at the HTTP level: retry, circuit breaker, token bucket and timeouts over raw
//! `http::Request<Bytes>` → `http::Response<B>` calls of the OpenAI Chat Completions and
//! Anthropic Messages wire formats, with no [`ChatRequest`](crate::ChatRequest) in between.
//!
//! [`HttpLayer`] wraps any such service (a hyper client, the [`Transport`], a client library's
//! own, an axum app) in, outermost first:
//!
//! 1. [`CallInfo::attach`]: the key (the body's model) and the token cost (prompt estimate +
//!    `max_tokens` / `max_completion_tokens`) read from the JSON body, once;
//! 2. the overall **deadline** ([`HttpConfig::deadline`]);
//! 3. **retry** ([`HttpConfig::retry`]): a 429's `retry-after-ms` / `retry-after` sets the wait;
//! 4. the **circuit breaker**, one per key ([`HttpConfig::breaker`]);
//! 5. the **token bucket**, one per key ([`HttpConfig::limits`]): the limits configured, else
//!    those the responses' rate-limit headers state; a 429 pauses the key;
//! 6. the **attempt timeout** ([`HttpConfig::attempt_timeout`]);
//! 7. the [`Meter`]: each response classified by the one table from its status, headers and
//!    bounded error body (`insufficient_quota` is never retried, a 503 is a breaker failure);
//!    its body wrapped so that the usage it reports reconciles the bucket at its end (a
//!    stream's last event), and an SSE body idle for [`HttpConfig::stream_idle_timeout`] ends;
//! 8. your service.
//!
//! The same order as [`Stack`](crate::Stack)'s, for the same reasons. The stack answers a
//! [`Metered`] response: [`Metered::into_inner`] gives the `http::Response` back (every byte
//! as the upstream sent it), [`Metered::to_error`] its failure as an [`LlmError`](crate::LlmError).
//! When the retry gives up on a failure response (retries, budget or deadline spent), that last
//! response is returned as it is, so a gateway can forward it. The layers' own refusals are
//! `BoxError`s holding a [`Refusal`](crate::Refusal) (possibly inside a
//! [`RetriesExhausted`](crate::RetriesExhausted)).
//!
//! ```
//! use bytes::Bytes;
//! use portcullis::http::{HttpConfig, HttpLayer};
//! use tower::{Layer, ServiceExt, service_fn};
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() -> Result<(), portcullis::BoxError> {
//! // An upstream that is overloaded once, then answers.
//! let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
//! let seen = calls.clone();
//! let upstream = service_fn(move |_req: http::Request<Bytes>| {
//!     let status = match seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
//!         0 => 503,
//!         _ => 200,
//!     };
//!     let body = http_body_util::Full::new(Bytes::from(r#"{"usage":{"prompt_tokens":9,"completion_tokens":3}}"#));
//!     async move { Ok::<_, std::convert::Infallible>(http::Response::builder().status(status).body(body).unwrap()) }
//! });
//! let layer = HttpLayer::new("openai", HttpConfig::default())?;
//! let breakers = layer.breaker();
//! let svc = layer.layer(upstream);
//!
//! let body = r#"{"model":"gpt-4o-mini","max_tokens":50,"messages":[{"role":"user","content":"Hi"}]}"#;
//! let req = http::Request::post("https://api.openai.com/v1/chat/completions").body(Bytes::from(body))?;
//! let res = svc.oneshot(req).await?;
//! assert_eq!(res.status(), 200); // the 503 was retried
//! assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 2);
//! assert_eq!(breakers.metrics("gpt-4o-mini").unwrap().failures, 1); // keyed by the model
//! # Ok(()) }
//! ```

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use portcullis_core::config;
use portcullis_layers::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerHandle};
use portcullis_layers::retry::{RetryConfig, StandardPolicy};
use portcullis_layers::timeout::{Deadline, DeadlineLayer, Timeout, TimeoutLayer};
use portcullis_layers::token_bucket::{MemoryStore, TokenBucketConfig, TokenBucketHandle};
use portcullis_layers::{
    CircuitBreaker, CircuitBreakerLayer, KeyFn, Retry, RetryLayer, TokenBucket, TokenBucketLayer,
};
use tower::Layer;
use tower::util::MapRequest;

#[doc(inline)]
pub use portcullis_providers::http::*;
#[doc(inline)]
pub use portcullis_providers::{Transport, TransportConfig};

use crate::stack::{DEFAULT_ATTEMPT_TIMEOUT, DEFAULT_DEADLINE, StackError};

/// The key of a raw request's breaker and bucket: its [`CallInfo::key`] (the model, or the path
/// of a request without one); the path for a request without a `CallInfo` attached.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByCall;

impl<B> KeyFn<Request<B>> for ByCall {
    type Key = Arc<str>;

    fn key(&self, req: &Request<B>) -> Arc<str> {
        match CallInfo::of(req) {
            Some(info) => info.key_arc().clone(),
            None => Arc::from(req.uri().path()),
        }
    }

    fn is_key(&self, req: &Request<B>, key: &Arc<str>) -> bool {
        match CallInfo::of(req) {
            Some(info) => Arc::ptr_eq(info.key_arc(), key) || info.key() == &**key,
            None => req.uri().path() == &**key,
        }
    }
}

/// The whole HTTP-level stack over `S` (see the [module docs](self)).
pub type HttpStack<S> = MapRequest<
    Deadline<
        Retry<
            StandardPolicy,
            CircuitBreaker<
                TokenBucket<Timeout<Meter<S>>, ByCall, CallCost, MemoryStore<Arc<str>>>,
                ByCall,
                Arc<str>,
            >,
        >,
    >,
    fn(Request<Bytes>) -> Request<Bytes>,
>;

/// The settings of an [`HttpLayer`]. The defaults are the [`Stack`](crate::Stack)'s.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// The overall deadline of a call, its retries and waits included (default 150 s,
    /// [`DEFAULT_DEADLINE`]).
    pub deadline: Duration,
    /// The timeout of one attempt, up to the response head (and, for an error, its body):
    /// default 30 s ([`DEFAULT_ATTEMPT_TIMEOUT`]). Raise it for long non-streamed calls
    /// (reasoning models).
    pub attempt_timeout: Duration,
    /// An SSE body that sends nothing for this long ends with a timeout (default 30 s).
    pub stream_idle_timeout: Duration,
    /// The retry (default: 3 retries, 1 s → 30 s full-jitter backoff, `retry-after` honoured up
    /// to 60 s, a retry budget).
    pub retry: RetryConfig,
    /// The breaker (default: 5 consecutive failures, 60 s recovery, 3 probes).
    pub breaker: CircuitBreakerConfig,
    /// The limits (default: none configured; each key paces by the limits its responses'
    /// headers state; a wait for admission beyond 30 s is refused with `Throttled`).
    pub limits: TokenBucketConfig,
    /// The most bytes of an error body read to classify it (default 64 KiB).
    pub max_error_body: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            deadline: DEFAULT_DEADLINE,
            attempt_timeout: DEFAULT_ATTEMPT_TIMEOUT,
            stream_idle_timeout: DEFAULT_ATTEMPT_TIMEOUT,
            retry: RetryConfig::default(),
            breaker: CircuitBreakerConfig::default(),
            limits: TokenBucketConfig::default(),
            max_error_body: DEFAULT_MAX_ERROR_BODY,
        }
    }
}

/// The HTTP-level stack as one tower layer (see the [module docs](self), whose example runs
/// it over a mock upstream). Every service it builds, and every clone of those, shares its
/// breakers, buckets and retry budget.
#[derive(Clone)]
pub struct HttpLayer {
    deadline: DeadlineLayer,
    retry: RetryLayer<StandardPolicy>,
    breaker: CircuitBreakerLayer<ByCall, Arc<str>>,
    bucket: TokenBucketLayer<ByCall, CallCost, MemoryStore<Arc<str>>>,
    timeout: TimeoutLayer,
    meter: MeterLayer,
}

impl std::fmt::Debug for HttpLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpLayer")
            .field("name", &self.breaker.name())
            .finish_non_exhaustive()
    }
}

impl HttpLayer {
    /// The layers for the provider `name` (logs and handles show keys as `name:model`), with
    /// validated settings. Builds the tokenizer's tables now, not in the first call.
    pub fn new(name: impl Into<Arc<str>>, config: HttpConfig) -> Result<Self, StackError> {
        let name: Arc<str> = name.into();
        let err = |e| StackError::Config(Some(name.to_string()), e);
        config::positive("http", "deadline_ms", config.deadline).map_err(err)?;
        config::positive("http", "attempt_timeout_ms", config.attempt_timeout).map_err(err)?;
        config::positive("http", "stream_idle_timeout_ms", config.stream_idle_timeout)
            .map_err(err)?;
        if config.attempt_timeout > config.deadline {
            return Err(StackError::AttemptTimeoutExceedsDeadline {
                provider: name.to_string(),
                attempt_timeout: config.attempt_timeout,
                deadline: config.deadline,
            });
        }
        let policy = config.retry.build().map_err(err)?;
        let breaker = CircuitBreakerLayer::new(name.clone(), config.breaker)
            .map_err(err)?
            .key_fn(ByCall);
        config.limits.validate().map_err(err)?;
        let bucket = TokenBucketLayer::new(name.clone(), config.limits)
            .map_err(err)?
            .key_fn(ByCall)
            .with_cost(CallCost);
        portcullis_core::ChatCost::warm_up();
        Ok(HttpLayer {
            deadline: DeadlineLayer::new(config.deadline),
            retry: RetryLayer::new(policy),
            breaker,
            bucket,
            timeout: TimeoutLayer::new(config.attempt_timeout),
            meter: MeterLayer::new()
                .max_error_body(config.max_error_body)
                .stream_idle(config.stream_idle_timeout),
        })
    }

    /// The breakers (one per key).
    pub fn breaker(&self) -> CircuitBreakerHandle<Arc<str>> {
        self.breaker.handle()
    }

    /// The token buckets (one per key).
    pub fn limiter(&self) -> TokenBucketHandle<MemoryStore<Arc<str>>> {
        self.bucket.handle()
    }
}

impl<S> Layer<S> for HttpLayer {
    type Service = HttpStack<S>;

    fn layer(&self, inner: S) -> HttpStack<S> {
        let metered = self.meter.layer(inner);
        let timed = self.timeout.layer(metered);
        let paced = self.bucket.layer(timed);
        let guarded = self.breaker.layer(paced);
        let retried = self.retry.layer(guarded);
        let attach: fn(Request<Bytes>) -> Request<Bytes> = CallInfo::attach;
        MapRequest::new(self.deadline.layer(retried), attach)
    }
}
