//! [`CircuitBreaker`], the service.

use std::fmt;
use std::hash::Hash;
use std::sync::Arc;
use std::task::{Context, Poll};

use portcullis_core::{CircuitOpen, Classify, OnFinish, Refusal};
use tower_service::Service;

use super::future::{Guard, ResponseFuture};
use super::handle::CircuitBreakerHandle;
use super::state::{Breaker, Shared};
use crate::key::{ByModel, KeyFn};
use crate::keyed::Room;

/// A service guarded by one circuit breaker per key. Built by
/// [`CircuitBreakerLayer`](super::CircuitBreakerLayer); clones share every breaker.
///
/// `poll_ready` only asks the inner service: the breaker never makes it fail or wait, because
/// the key (and so the breaker) is only known from the request. An OPEN breaker refuses inside
/// `call`, with a future that resolves at once to `CircuitOpen`, without calling the inner
/// service. As with any tower service, readiness the inner service reserved for that call
/// (a concurrency permit, a buffer slot) stays reserved for the next `call`, or is released
/// when the service is dropped.
pub struct CircuitBreaker<S, F = ByModel, K = Arc<str>> {
    inner: S,
    key_fn: Arc<F>,
    shared: Arc<Shared<K>>,
    /// The breaker of the last call's key: calls for the same key (the common case: one model
    /// per service) skip hashing the key and the map's lock. Holding it keeps the key from
    /// being evicted, so it never goes stale. Never the overflow breaker, which stands for
    /// many keys.
    last: Option<Breaker<K>>,
}

impl<S, F, K> CircuitBreaker<S, F, K> {
    pub(crate) fn from_parts(inner: S, key_fn: Arc<F>, shared: Arc<Shared<K>>) -> Self {
        CircuitBreaker {
            inner,
            key_fn,
            shared,
            last: None,
        }
    }

    /// Reads and steers the breakers shared by this service and its clones.
    pub fn handle(&self) -> CircuitBreakerHandle<K> {
        CircuitBreakerHandle {
            shared: self.shared.clone(),
        }
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

impl<S: Clone, F, K> Clone for CircuitBreaker<S, F, K> {
    fn clone(&self) -> Self {
        CircuitBreaker {
            inner: self.inner.clone(),
            key_fn: self.key_fn.clone(),
            shared: self.shared.clone(),
            last: self.last.clone(),
        }
    }
}

impl<S: fmt::Debug, F, K> fmt::Debug for CircuitBreaker<S, F, K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("name", &self.shared.common.name)
            .field("inner", &self.inner)
            .finish_non_exhaustive()
    }
}

impl<S, F, K, Req> Service<Req> for CircuitBreaker<S, F, K>
where
    S: Service<Req>,
    S::Response: OnFinish,
    S::Error: Classify + From<Refusal>,
    F: KeyFn<Req, Key = K>,
    K: Clone + Eq + Hash + fmt::Debug + Send + Sync + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S::Future, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let state = match &self.last {
            Some(last) if self.key_fn.is_key(&req, last.key()) => {
                self.shared.keys.touch(last);
                last.clone()
            }
            _ => {
                let state = self
                    .shared
                    .get_or_insert(&self.key_fn.key(&req), Room::Capped);
                self.last = (!state.is_overflow()).then(|| state.clone());
                state
            }
        };
        // The state at admission, on the attempt's span (a no-op without a subscriber).
        let span = tracing::Span::current();
        match state.admit() {
            Ok(permit) => {
                let at = if permit.probe.is_some() {
                    "half_open"
                } else {
                    "closed"
                };
                span.record("portcullis.breaker.state", at);
                ResponseFuture::called(self.inner.call(req), Guard::new(state, permit))
            }
            Err(retry_after) => {
                span.record("portcullis.breaker.state", "open");
                ResponseFuture::rejected(crate::refuse(CircuitOpen { retry_after }))
            }
        }
    }
}
