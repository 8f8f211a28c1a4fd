//! Fallback across providers: an ordered chain of services, primary first, that spends a
//! call's attempts across its entries.
//!
//! # The failover rule
//!
//! A call goes to the first entry that can take it now, the primary when it is healthy. When an
//! attempt fails in a way that allows a fallback
//! ([`Classification::failover`](portcullis_core::Classification::failover)), the same request
//! (remapped for the entry, e.g. to its own model name) goes **at once, without sleeping** to
//! the next entry that can take it now. A backoff sleep, or a wait for a `Retry-After`, happens
//! only when no entry can take the call now; after it, the entries are tried in order again, so
//! the primary is preferred as soon as it is healthy. This is
//! [`FailoverPolicy::FailoverFirst`], the default; [`FailoverPolicy::RetryEachThenFallback`]
//! keeps the older order (each entry retried by its policy, then the next).
//!
//! "Can take it now" is one decision, [`choose`]: the first entry, in order, whose wait is zero,
//! else the one whose wait is shortest. An entry's wait is the later of
//! - its own backoff in this call (from its retry policy, [`Entry::retry`]), and
//! - its [`Gate`] ([`Entry::gate`]): its breaker admits a call now, and its bucket is neither
//!   paused by a provider's 429 (a primary that answered 429 with `Retry-After` is passed over
//!   until then, instead of being slept on) nor queued beyond its `max_wait`.
//!
//! When the entry that can take the call soonest is only held by its gate, it is called: its
//! own layers then refuse at once (an open breaker) or wait as configured (a paused bucket,
//! within its `max_wait`). The chain itself sleeps only on a backoff.
//!
//! The same decision will route between the deployments of one model (a pool), ordered by
//! headroom instead of priority: [`choose`] is that one rule.
//!
//! # What moves a call on
//!
//! - It fails over on the classes the shared table marks: overloaded, server, connect, timeout,
//!   protocol, rate limited, quota exhausted, circuit open, throttled; and on an `Ok` response
//!   that [classifies](portcullis_core::OnFinish::failure) as one of them (an HTTP 503).
//! - It never fails over on an invalid request or an authentication error: another provider
//!   would refuse it too, or the caller must fix something (the failed entry may still be
//!   retried, if its policy says so).
//! - A context-length error goes only to an entry declared [`larger_context`](Entry::larger_context).
//! - Streams fail over only before the commit point: a streaming provider's future resolves at
//!   the first content chunk, and an error after it is a stream item, not a call failure.
//!
//! # Retries, budget, deadline
//!
//! An entry with a retry policy ([`Entry::retry`], e.g. a
//! [`StandardPolicy`](crate::retry::StandardPolicy)) is tried again by it: its `max_retries`,
//! its backoff, its `Retry-After` cap. A first try of each entry is a failover, not a retry;
//! every later try of an entry is a retry, decided by the policy when the entry fails (so it
//! draws from the policy's budget then). Policies built with one
//! [`shared_budget`](crate::retry::StandardPolicyBuilder::shared_budget) count the retries of
//! every entry in one budget. No sleep outlives the request's deadline, and a request whose
//! deadline has passed is not sent at all ([`DeadlineExceeded`](portcullis_core::DeadlineExceeded)).
//! When nothing is left to try, the last outcome is returned (an error says how many attempts
//! the call made, if a policy gave up).
//!
//! # Readiness
//!
//! Each entry gets its own `poll_ready` before each of its attempts: the primary's first through
//! this service's `poll_ready`, every other attempt by driving a clone of the entry's service to
//! readiness inside the response future.
//!
//! ```
//! use tower::{ServiceExt, service_fn};
//! use portcullis_core::{ChatMessage, ChatRequest, CompletionResult, ErrorKind, LlmError};
//! use portcullis_layers::fallback::{Entry, Fallback};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let openai = service_fn(|_req: ChatRequest| async {
//!     Err::<CompletionResult, _>(LlmError::new(ErrorKind::Overloaded, "down").with_provider("openai"))
//! });
//! let anthropic = service_fn(|req: ChatRequest| async move {
//!     Ok::<_, LlmError>(CompletionResult::new("anthropic", req.model.to_string(), "hi"))
//! });
//! // Both entries must have one service type: box them (or use an enum of your providers).
//! let svc = Fallback::new(vec![
//!     Entry::new("openai", tower::util::BoxCloneService::new(openai)),
//!     Entry::new("anthropic", tower::util::BoxCloneService::new(anthropic)).model("claude-haiku-4-5"),
//! ]).unwrap();
//! let req = ChatRequest::new("gpt-4o-mini", vec![ChatMessage::user("hello")]);
//! let res = svc.oneshot(req).await.unwrap();
//! assert_eq!(res.provider, "anthropic");
//! assert_eq!(res.model, "claude-haiku-4-5");
//! # }
//! ```
//!
//! With retries, a breaker and gates, the primary's failure reaches the fallback at once, and
//! the primary is skipped while its breaker is open:
//!
//! ```
//! use std::time::Duration;
//! use tower::{Service, ServiceBuilder, ServiceExt, service_fn};
//! use portcullis_core::{ChatMessage, ChatRequest, CompletionResult, ErrorKind, LlmError};
//! use portcullis_layers::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer};
//! use portcullis_layers::fallback::{Entry, Fallback};
//! use portcullis_layers::retry::StandardPolicy;
//!
//! # #[tokio::main(flavor = "current_thread", start_paused = true)]
//! # async fn main() {
//! let breaker = CircuitBreakerLayer::new("openai", CircuitBreakerConfig::default()).unwrap();
//! let gate = breaker.handle();
//! let openai = ServiceBuilder::new().layer(breaker).service_fn(|_req: ChatRequest| async {
//!     Err::<CompletionResult, _>(LlmError::new(ErrorKind::Overloaded, "down").with_status(503))
//! });
//! let anthropic = service_fn(|req: ChatRequest| async move {
//!     Ok::<_, LlmError>(CompletionResult::new("anthropic", req.model.to_string(), "hi"))
//! });
//! let mut svc = Fallback::new(vec![
//!     Entry::new("openai", tower::util::BoxCloneService::new(openai))
//!         .gate(move |req: &ChatRequest| gate.availability(&*req.model))
//!         .retry(StandardPolicy::builder().seed(1).build().unwrap()),
//!     Entry::new("anthropic", tower::util::BoxCloneService::new(anthropic))
//!         .retry(StandardPolicy::builder().seed(2).build().unwrap()),
//! ]).unwrap();
//! let start = tokio::time::Instant::now();
//! for _ in 0..8 {
//!     let req = ChatRequest::new("gpt-4o-mini", vec![ChatMessage::user("hello")]);
//!     let res = svc.ready().await.unwrap().call(req).await.unwrap();
//!     assert_eq!(res.provider, "anthropic");
//! }
//! assert_eq!(start.elapsed(), Duration::ZERO); // no call slept on the primary's backoff
//! # }
//! ```

mod choose;
mod future;
mod layer;
mod service;

pub use choose::{Choice, FailoverPolicy, Gate, choose};
pub use future::FallbackFuture;
pub use layer::FallbackLayer;
pub use service::{Entry, Fallback, FallbackError, Rank};
