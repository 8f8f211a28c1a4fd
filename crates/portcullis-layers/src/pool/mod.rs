//! A pool: N deployments of one model (several API keys or organisations, Azure deployments in
//! several regions, a self-hosted server beside the cloud) as one service, routed on what the
//! layers know exactly: each deployment's remaining requests and tokens (its bucket, corrected
//! by the provider's own rate-limit headers), its breaker, its calls in flight and its latency.
//!
//! # The choice
//!
//! For each request the pool ranks its deployments by its [`Strategy`] (by default
//! [`MostHeadroom`](Strategy::MostHeadroom): the largest share of the tightest bucket left after
//! this request, so that load spreads in proportion to the limits), then takes the best one
//! that can take the call **now**: never one whose breaker is open, never one whose bucket is
//! paused by a provider's 429 or queued beyond its `max_wait` (each deployment's
//! [gate](Deployment::gate)). This is [`fallback::choose`](crate::fallback::choose), the one
//! rule a [`Fallback`](crate::fallback::Fallback) uses too: a pool is a fallback chain whose
//! order is computed per request ([`Fallback::ranked`](crate::fallback::Fallback::ranked)).
//!
//! # Failure
//!
//! When the chosen deployment fails in a way that allows a failover (the classification
//! table), the same request goes at once to the next best deployment that can take it, before
//! any backoff sleep; a retry policy ([`Pool::with_retry`]) sleeps only when no deployment can
//! take the call now. A 429 whose `Retry-After` paused a deployment's bucket keeps it out of
//! the choice until then.
//!
//! # Composition
//!
//! A pool is a `Service` like any other: an entry of a [`Fallback`](crate::fallback::Fallback)
//! (priority groups of pools: two OpenAI keys first, then an Anthropic pool; build it with
//! [`Pool::new`], no retry of its own, so that its failure goes to the next entry at once), or
//! under a `RetryLayer` or a deadline. The `Stack` builds its pools differently, as groups of
//! one ranked chain ([`PoolRanking`], [`grouped`]), so that one retry budget and one failover
//! rule cover them all. Each deployment's service carries its own breaker and bucket,
//! so their state is per deployment, not per model name. Clones share everything.
//!
//! ```
//! use std::time::Duration;
//! use tower::{ServiceExt, service_fn};
//! use portcullis_core::{ChatMessage, ChatRequest, CompletionResult, ErrorKind, LlmError};
//! use portcullis_layers::pool::{Deployment, Pool, PoolConfig};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let east = service_fn(|_req: ChatRequest| async {
//!     Err::<CompletionResult, _>(LlmError::new(ErrorKind::Overloaded, "busy").with_provider("east"))
//! });
//! let west = service_fn(|req: ChatRequest| async move {
//!     Ok::<_, LlmError>(CompletionResult::new("west", req.model.to_string(), "hi"))
//! });
//! let pool = Pool::new(
//!     vec![
//!         Deployment::new("east", tower::util::BoxCloneService::new(east)).headroom(|_| Some(0.9)),
//!         Deployment::new("west", tower::util::BoxCloneService::new(west)).headroom(|_| Some(0.4)),
//!     ],
//!     PoolConfig::default(),
//! )
//! .unwrap();
//! let handle = pool.handle();
//! let req = ChatRequest::new("gpt-4o", vec![ChatMessage::user("hello")]);
//! // East has the most headroom, fails over at once to west.
//! let res = pool.oneshot(req.clone()).await.unwrap();
//! assert_eq!(res.provider, "west");
//! assert_eq!(handle.status(&req)[0].in_flight, 0);
//! # }
//! ```

mod load;
mod service;
mod strategy;

pub use load::{DEFAULT_DECAY, Load, Tracked, TrackedFuture};
pub use service::{
    Deployment, DeploymentStatus, Group, Pool, PoolEntries, PoolError, PoolHandle, PoolRanking,
    grouped,
};
pub use strategy::{PoolConfig, Strategy};
