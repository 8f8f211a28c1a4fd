//! Retry with jittered exponential backoff, `Retry-After`, a retry budget and deadlines.
//!
//! [`RetryLayer`] wraps a service in [`Retry`], which calls it again after each failure its
//! [`Policy`] decides to retry. The [`StandardPolicy`] follows the shared classification table
//! ([`Classify`](portcullis_core::Classify)):
//!
//! - only retryable errors are retried (rate limits, overload, 5xx, connect, timeouts,
//!   protocol errors); `insufficient_quota`, invalid requests, authentication and a stream
//!   interrupted after content are not, and `x-should-retry` overrides the row;
//! - `max_retries` (default 3), with backoff `base · 2^n` capped at `max` (1 s, 30 s) and a
//!   [`Jitter`] (full by default; equal, decorrelated, the seed's proportional, or none), from
//!   an RNG that can be seeded;
//! - a `Retry-After` hint replaces the backoff (plus up to 10 % jitter); one above the cap
//!   (60 s) returns the error at once, so that a fallback can act;
//! - a [`RetryBudget`] shared by all clones: retries ≤ 20 % of requests plus 1 per second;
//! - the request's deadline ([`RequestInfo::deadline`](portcullis_core::RequestInfo::deadline)):
//!   no sleep outlives it.
//!
//! When it stops retrying, the last error comes back as
//! `E::from(`[`RetriesExhausted`](portcullis_core::RetriesExhausted)`)`, saying how many
//! attempts were made and why it stopped ([`RetryStop`](portcullis_core::RetryStop)).
//!
//! Streams: a streaming service's future resolves at the first content chunk, so only
//! failures before any content reached the caller are retried. Nothing is retried after that.
//!
//! Configuration comes from a builder ([`StandardPolicy::builder`]) or a serde-deserializable,
//! validated [`RetryConfig`].

mod backoff;
mod budget;
mod config;
mod future;
mod layer;
mod policy;
mod service;

pub use backoff::{Backoff, Jitter};
pub use budget::RetryBudget;
pub use config::{BudgetConfig, ConfigError, RetryConfig};
pub use future::ResponseFuture;
pub use layer::RetryLayer;
pub use policy::{Attempt, Decision, NoRetry, Policy, StandardPolicy, StandardPolicyBuilder};
pub use service::Retry;
