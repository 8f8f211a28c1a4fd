use std::sync::Arc;
use std::task::{Context, Poll};

use portcullis_core::{ChatCost, Classify, CostOf, OnFinish, Refusal, RequestInfo};
use tokio::time::Instant;
use tower_service::Service;

use super::future::ResponseFuture;
use super::layer::Settings;
use super::memory::MemoryStore;
use super::store::BucketStore;
use crate::key::{ByModel, KeyFn};

/// The token bucket service, from [`TokenBucketLayer`](super::TokenBucketLayer). Clones share
/// the buckets.
pub struct TokenBucket<S, KF = ByModel, C = ChatCost, St = MemoryStore> {
    inner: S,
    settings: Arc<Settings<KF, C>>,
    store: St,
}

impl<S, KF, C, St> TokenBucket<S, KF, C, St> {
    pub(crate) fn new(inner: S, settings: Arc<Settings<KF, C>>, store: St) -> Self {
        TokenBucket {
            inner,
            settings,
            store,
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

impl<S: Clone, KF, C, St: Clone> Clone for TokenBucket<S, KF, C, St> {
    fn clone(&self) -> Self {
        TokenBucket {
            inner: self.inner.clone(),
            settings: self.settings.clone(),
            store: self.store.clone(),
        }
    }
}

impl<S: std::fmt::Debug, KF, C, St: std::fmt::Debug> std::fmt::Debug for TokenBucket<S, KF, C, St> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenBucket")
            .field("inner", &self.inner)
            .field("name", &self.settings.name)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

impl<S, Req, KF, C, St> Service<Req> for TokenBucket<S, KF, C, St>
where
    S: Service<Req> + Clone,
    S::Response: OnFinish,
    S::Error: Classify + From<Refusal>,
    Req: RequestInfo,
    KF: KeyFn<Req>,
    C: CostOf<Req>,
    St: BucketStore<Key = KF::Key>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S, Req, St>;

    /// Always ready: the request waits for its slot in the response future, which then drives
    /// the inner service's own readiness (on a clone) before calling it.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let key = self.settings.key_fn.key(&req);
        let cost = self.settings.cost.cost(&req);
        let rule = self.settings.cost.usage_rule(&req);
        // The clock is only read for a deadline: without one, the wait allowed is the layer's.
        let deadline = req.deadline();
        let max_wait = match deadline {
            Some(d) => self
                .settings
                .max_wait
                .min(d.saturating_duration_since(Instant::now())),
            None => self.settings.max_wait,
        };
        tracing::trace!(
            model = crate::key::model_of(&req),
            tokens = cost.total(),
            "token bucket: reserving"
        );
        // A deadline already passed never leaves: nothing is reserved, nothing is called.
        let reserve = (!crate::expired(deadline)).then(|| self.store.reserve(&key, cost, max_wait));
        ResponseFuture::new(
            reserve,
            self.inner.clone(),
            req,
            self.store.clone(),
            key,
            (self.settings.name.clone(), self.settings.meters.clone()),
            cost,
            rule,
            self.settings.max_wait,
            self.settings.max_pause,
            deadline,
        )
    }
}
