//! Portcullis inside an existing [async-openai](https://docs.rs/async-openai) client (feature
//! `async-openai`, off by default).
//!
//! async-openai 0.43's `middleware` feature takes any tower service of its
//! [`HttpRequestFactory`] through `Client::with_http_service`. [`service`] is one: the whole
//! [HTTP-level stack](crate::http) (deadline, retry, a circuit breaker and a token bucket per
//! model, attempt timeouts, limits learned from the rate-limit headers, usage reconciled)
//! over Portcullis' own transport (hyper + rustls). Every async-openai request type passes
//! untouched (tools, images, structured output, streams): the body is sent as async-openai
//! wrote it.
//!
//! ```no_run
//! use async_openai::Client;
//! use async_openai::config::OpenAIConfig;
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let client = Client::with_config(OpenAIConfig::new())
//!     .with_http_service(portcullis::async_openai::service(Default::default())?);
//! // client.chat().create(request).await … as before.
//! # let _ = client; Ok(()) }
//! ```
//!
//! `AzureConfig` works the same way (a chat request without a model is keyed by its
//! deployment's path).
//!
//! **Drop async-openai's own `OpenAIRetryLayer`** (and any `tower` retry) from a service you
//! had built: this service retries already, and retries that stack multiply (4 × 4 attempts
//! on a dead upstream). `Client::with_http_service` replaces async-openai's default executor,
//! retry included, so the line above is all it takes.
//!
//! # What the caller sees
//!
//! | outcome | `Err` of the async-openai call |
//! |---|---|
//! | refused by a layer before any upstream request: circuit open, throttled (a wait for admission above 30 s), over the bucket's capacity, deadline passed, attempt timed out | `OpenAIError::Boxed` holding a [`Refusal`] (inside a [`RetriesExhausted`] when retries came first): [`refusal`] finds it, with its `retry_after` |
//! | a transient upstream failure the layers could not ride out (429 rate limit, 5xx, 529 overload: retries, retry budget or deadline spent, or a `retry-after` above the cap) | `OpenAIError::Boxed` holding an [`LlmError`]: kind, status, the error body's type, code and message, the upstream's `retry_after`; [`llm_error`] finds it |
//! | a connection failure | `OpenAIError::Boxed` holding an [`LlmError`] of kind `Connect` |
//! | a failure that is never retried (400, 401, 403, 404, 429 `insufficient_quota`, context length) | async-openai's own `OpenAIError::ApiError`, exactly as without Portcullis |
//!
//! [`retry_after`] reads the wait of any of them.
//!
//! # Defaults
//!
//! [`Config::default`]: the [`Stack`](crate::Stack)'s. An overall deadline of 150 s per call
//! (retries and waits included), 30 s per attempt (up to the response head; raise
//! [`HttpConfig::attempt_timeout`] for long non-streamed reasoning calls) and between two
//! chunks of a stream, 3 retries with full-jitter backoff (1 s → 30 s) and a retry budget,
//! `retry-after` honoured up to 60 s, a breaker per model (5 consecutive failures, 60 s, 3
//! probes), and a token bucket per model pacing at the limits the responses' headers state,
//! paused by a 429's `retry-after`, waiting at most 30 s for admission.
//!
//! # Other endpoints
//!
//! Requests to other endpoints (the Responses API, embeddings, files, images…) pass the
//! deadline, the retry, a breaker and a bucket keyed by their path, and the timeouts. Their
//! cost is one request and no tokens; the usage their response reports is charged after it
//! (see [`CallInfo`] for every rule). A request body async-openai streams (a multipart upload)
//! is read into memory first, up to [`Config::max_request_bytes`], so that it can be retried.
//!
//! # Cost
//!
//! async-openai boxes every call's future itself; this adapter adds one box per call to build
//! the request (async-openai's factory is an `async fn`). The layers below are named futures.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_openai::error::OpenAIError;
use async_openai::middleware::HttpRequestFactory;
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use portcullis_core::OnFinish as _;
use portcullis_layers::circuit_breaker::CircuitBreakerHandle;
use portcullis_layers::token_bucket::{MemoryStore, TokenBucketHandle};
use portcullis_providers::TransportConfig;
use reqwest::ResponseBuilderExt as _;
use tower::{Layer, Service, ServiceExt};

use crate::http::{CallInfo, HttpConfig, HttpLayer, HttpStack, Transport};
use crate::stack::StackError;
use crate::{BoxError, ErrorKind, LlmError, Refusal, RetriesExhausted};

/// The largest request body read into memory by default: 32 MiB.
pub const DEFAULT_MAX_REQUEST_BYTES: usize = 32 * 1024 * 1024;

/// The adapter's settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The provider's name in logs and handles (default `"openai"`).
    pub name: String,
    /// The layers: deadline, timeouts, retry, breaker, limits (default: [`HttpConfig`]'s).
    pub http: HttpConfig,
    /// The transport: connect timeout, response body cap, pool.
    pub transport: TransportConfig,
    /// The largest request body (default [`DEFAULT_MAX_REQUEST_BYTES`]); a larger one fails
    /// with a `RequestTooLarge` error before any upstream request.
    pub max_request_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            name: crate::OPENAI.to_owned(),
            http: HttpConfig::default(),
            transport: TransportConfig::default(),
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
        }
    }
}

/// Builds the service to give to async-openai's `Client::with_http_service` (see the
/// [module docs](self)). Invalid settings are a typed error.
pub fn service(config: Config) -> Result<AsyncOpenAi, StackError> {
    let transport = Transport::new(config.transport)
        .map_err(|e| StackError::Provider(config.name.clone(), e))?;
    let layer = HttpLayer::new(config.name, config.http)?;
    Ok(AsyncOpenAi {
        breaker: layer.breaker(),
        limiter: layer.limiter(),
        stack: layer.layer(transport),
        max_request_bytes: config.max_request_bytes,
    })
}

/// async-openai's HTTP executor with Portcullis inside: a `tower::Service` of
/// [`HttpRequestFactory`] answering `reqwest::Response`s, from [`service`]. Clones share every
/// breaker, bucket and budget.
#[derive(Clone)]
pub struct AsyncOpenAi {
    stack: HttpStack<Transport>,
    breaker: CircuitBreakerHandle<Arc<str>>,
    limiter: TokenBucketHandle<MemoryStore<Arc<str>>>,
    max_request_bytes: usize,
}

impl std::fmt::Debug for AsyncOpenAi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncOpenAi")
            .field("name", &self.breaker.name())
            .finish_non_exhaustive()
    }
}

impl AsyncOpenAi {
    /// The breakers, one per model (or path).
    pub fn breaker(&self) -> &CircuitBreakerHandle<Arc<str>> {
        &self.breaker
    }

    /// The token buckets, one per model (or path).
    pub fn limiter(&self) -> &TokenBucketHandle<MemoryStore<Arc<str>>> {
        &self.limiter
    }
}

/// The future of [`AsyncOpenAi`].
pub type ResponseFuture = Pin<Box<dyn Future<Output = Result<reqwest::Response, BoxError>> + Send>>;

impl Service<HttpRequestFactory> for AsyncOpenAi {
    type Response = reqwest::Response;
    type Error = BoxError;
    type Future = ResponseFuture;

    /// Always ready: each call drives a clone of the stack.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, factory: HttpRequestFactory) -> ResponseFuture {
        let stack = self.stack.clone();
        let max = self.max_request_bytes;
        Box::pin(async move {
            let req = factory.build().await?;
            let url = req.url().clone();
            let req = to_http(req, max).await?;
            let res = stack.oneshot(req).await?;
            // A transient failure the layers gave up on: the typed error, with its retry_after.
            if res.failure().is_some_and(|c| c.retry) {
                if let Some(err) = res.to_error() {
                    return Err(err.into());
                }
            }
            let (mut parts, body) = res.into_inner().into_parts();
            // `reqwest::Response::url` is the request's, as from reqwest's own client.
            if let Ok(with_url) = http::Response::builder().url(url).body(()) {
                parts.extensions.extend(with_url.into_parts().0.extensions);
            }
            let res = http::Response::from_parts(parts, reqwest::Body::wrap(body));
            Ok(reqwest::Response::from(res))
        })
    }
}

/// async-openai's request as a raw one: its body read into memory (bounded), to be sent again
/// on a retry.
async fn to_http(req: reqwest::Request, max: usize) -> Result<http::Request<Bytes>, BoxError> {
    let req = http::Request::<reqwest::Body>::try_from(req)?;
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, max).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            let msg = format!("the request body is larger than max_request_bytes ({max})");
            return Err(LlmError::new(ErrorKind::RequestTooLarge, msg).into());
        }
        Err(e) => return Err(e),
    };
    Ok(CallInfo::attach(http::Request::from_parts(parts, body)))
}

fn boxed(err: &OpenAIError) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
    match err {
        OpenAIError::Boxed(b) => Some(&**b),
        _ => None,
    }
}

/// Finds `T` in an async-openai error: boxed by this adapter, as it is or as the last error of
/// a [`RetriesExhausted`].
fn find<T: std::error::Error + 'static>(err: &OpenAIError) -> Option<&T> {
    let b = boxed(err)?;
    b.downcast_ref::<T>().or_else(|| {
        b.downcast_ref::<RetriesExhausted<BoxError>>()
            .and_then(|r| r.last.downcast_ref::<T>())
    })
}

/// The layers' refusal an async-openai error holds, if it is one: nothing reached the upstream
/// for that attempt.
///
/// ```
/// use std::time::Duration;
/// use async_openai::error::OpenAIError;
/// use portcullis::{CircuitOpen, Refusal};
///
/// let refused: Box<dyn std::error::Error + Send + Sync> =
///     Box::new(Refusal::from(CircuitOpen { retry_after: Duration::from_secs(42) }));
/// let err = OpenAIError::from(refused); // what the caller of async-openai gets
/// match portcullis::async_openai::refusal(&err) {
///     Some(Refusal::CircuitOpen(open)) => assert_eq!(open.retry_after, Duration::from_secs(42)),
///     other => panic!("{other:?}"),
/// }
/// assert_eq!(portcullis::async_openai::retry_after(&err), Some(Duration::from_secs(42)));
/// ```
pub fn refusal(err: &OpenAIError) -> Option<&Refusal> {
    find::<Refusal>(err)
}

/// The typed upstream (or connection) failure an async-openai error holds, if it is one.
pub fn llm_error(err: &OpenAIError) -> Option<&LlmError> {
    find::<LlmError>(err)
}

/// How long to wait before trying again, for a refusal or an upstream failure that says.
pub fn retry_after(err: &OpenAIError) -> Option<Duration> {
    refusal(err)
        .and_then(Refusal::retry_after)
        .or_else(|| llm_error(err).and_then(LlmError::retry_after))
}
