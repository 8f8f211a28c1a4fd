use std::task::{Context, Poll};
use std::time::Duration;

use portcullis_core::{ChatStream, Refusal, RequestInfo};
use tokio::time::Instant;
use tower_service::Service;

use super::future::{DeadlineFuture, IdleFuture, TimeoutFuture};

/// A service whose attempts are bounded by a timeout. Built by
/// [`TimeoutLayer`](super::TimeoutLayer).
#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    timeout: Duration,
}

impl<S> Timeout<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, timeout: Duration) -> Self {
        Timeout { inner, timeout }
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

impl<S, Req> Service<Req> for Timeout<S>
where
    S: Service<Req>,
    S::Error: From<Refusal>,
    Req: RequestInfo,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = TimeoutFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let timeout = req.attempt_timeout().unwrap_or(self.timeout);
        let deadline = req.deadline();
        // A deadline already passed never leaves: no attempt is made.
        let inner = (!crate::expired(deadline)).then(|| self.inner.call(req));
        TimeoutFuture::new(inner, timeout, deadline)
    }
}

/// A service whose calls must be over by a deadline. Built by
/// [`DeadlineLayer`](super::DeadlineLayer).
#[derive(Debug, Clone)]
pub struct Deadline<S> {
    inner: S,
    budget: Duration,
}

impl<S> Deadline<S> {
    /// Wraps `inner`.
    pub fn new(inner: S, budget: Duration) -> Self {
        Deadline { inner, budget }
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

impl<S, Req> Service<Req> for Deadline<S>
where
    S: Service<Req>,
    S::Error: From<Refusal>,
    Req: RequestInfo,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = DeadlineFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        let now = Instant::now();
        let ours = crate::after(now, self.budget);
        req.set_deadline(ours);
        // An earlier deadline the caller set wins; a request that cannot carry one keeps ours.
        let at = req.deadline().map_or(ours, |d| d.min(ours));
        // A deadline already passed never leaves: the inner service is not called.
        let inner = (at > now).then(|| self.inner.call(req));
        DeadlineFuture::new(inner, at)
    }
}

/// A streaming service whose streams fail after an idle gap. Built by
/// [`StreamIdleLayer`](super::StreamIdleLayer).
#[derive(Debug, Clone)]
pub struct StreamIdle<S> {
    pub(super) inner: S,
    pub(super) idle: Duration,
    pub(super) total: Option<Duration>,
}

impl<S> StreamIdle<S> {
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

impl<S, Req> Service<Req> for StreamIdle<S>
where
    S: Service<Req, Response = ChatStream>,
{
    type Response = ChatStream;
    type Error = S::Error;
    type Future = IdleFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        IdleFuture {
            inner: self.inner.call(req),
            idle: self.idle,
            total: self.total,
        }
    }
}
