//! [`Retry`]: the service.

use std::fmt::Display;
use std::sync::Arc;
use std::task::{Context, Poll};

use portcullis_core::{Classify, Refusal, Replay, RequestInfo};
use tokio::time::Instant;
use tower_service::Service;

use super::future::ResponseFuture;
use super::policy::Policy;

/// Calls the inner service, then again after each failure its [`Policy`] decides to retry.
///
/// Each call keeps a clone of the inner service and of the request. Before **every** attempt
/// after the first, the future drives that service clone to readiness (`poll_ready`), then
/// calls it with a fresh clone of the request: at most one request clone per attempt. Between
/// attempts it sleeps on a `tokio` timer; dropping the future drops the timer and stops
/// everything, with no task left behind.
///
/// A streaming service's future resolves at its commit point (the first content chunk), so
/// only failures before any content reached the caller are retried; an error in the stream
/// after that belongs to the caller.
///
/// A request whose deadline has already passed when it is called is not sent at all: it fails
/// at once with [`DeadlineExceeded`](portcullis_core::DeadlineExceeded).
///
/// Errors: an error the policy [accepts](super::Decision::Accept) is returned unchanged; when
/// the policy [gives up](super::Decision::GiveUp), or the next delay would reach the request's
/// deadline, the last error is returned as `E::from(RetriesExhausted { attempts, stop, last })`
/// (core implements it for [`LlmError`](portcullis_core::LlmError), which keeps its kind and
/// records the attempts, and for [`BoxError`](portcullis_core::BoxError), which wraps). An
/// error from the inner service's `poll_ready` between attempts is returned as it is, as
/// tower's own `Retry` does.
///
/// Every retry logs one `tracing` warn event with the model, the attempt number, the delay and
/// the error (its provider from [`Classify::provider`](portcullis_core::Classify::provider)).
#[derive(Debug)]
pub struct Retry<P, S> {
    policy: Arc<P>,
    inner: S,
}

impl<P, S> Retry<P, S> {
    /// Wraps `inner`, deciding through `policy` (tower's argument order).
    pub fn new(policy: P, inner: S) -> Self {
        Self::from_arc(Arc::new(policy), inner)
    }

    /// Wraps `inner`, deciding through a shared `policy`.
    pub fn from_arc(policy: Arc<P>, inner: S) -> Self {
        Retry { policy, inner }
    }

    /// The policy.
    pub fn policy(&self) -> &Arc<P> {
        &self.policy
    }

    /// The inner service.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    /// The inner service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// Unwraps the inner service.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<P, S: Clone> Clone for Retry<P, S> {
    fn clone(&self) -> Self {
        Retry {
            inner: self.inner.clone(),
            policy: self.policy.clone(),
        }
    }
}

impl<P, S, Req> Service<Req> for Retry<P, S>
where
    S: Service<Req> + Clone,
    S::Error: From<Refusal> + Display + Classify,
    P: Policy<Req, S::Response, S::Error>,
    Req: Replay + RequestInfo,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S, Req, P>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        // A deadline already passed never leaves: no attempt, nothing deposited in the budget.
        if crate::expired(request.deadline()) {
            let service = self.inner.clone();
            return ResponseFuture::new(None, service, None, self.policy.clone(), Instant::now());
        }
        // The one clock read of a call that succeeds: the attempt's start, and the budget's
        // deposit time.
        let now = Instant::now();
        self.policy.on_request_at(&request, now);
        // Call the service that was driven ready; keep it for the retries, which drive it ready
        // again. `self` keeps a fresh clone, as tower's own `Retry` does.
        let fresh = self.inner.clone();
        let mut service = std::mem::replace(&mut self.inner, fresh);
        // A request that cannot be replayed is sent once, and its outcome returned as it is.
        let (first, kept) = match request.replay() {
            Some(copy) => (copy, Some(request)),
            None => (request, None),
        };
        let first = Some(service.call(first));
        ResponseFuture::new(first, service, kept, self.policy.clone(), now)
    }
}
