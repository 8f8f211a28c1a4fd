use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use portcullis_core::{ChatRequest, Classify, OnFinish, Refusal, Replay, RequestInfo};
use tokio::time::Instant;
use tower_service::Service;

use super::choose::{FailoverPolicy, Gate, choose};
use super::future::{FallbackFuture, in_order};
use crate::retry::{NoRetry, Policy};

type Remap<Req> = Arc<dyn Fn(Req) -> Req + Send + Sync>;

/// Orders a chain's entries for one request, best first: it gets the request and the indices
/// `0..n` to permute. A [`Pool`](crate::pool::Pool) ranks its deployments this way.
pub type Rank<Req> = Arc<dyn Fn(&Req, &mut [usize]) + Send + Sync>;

/// One entry of a fallback chain: a service, its name, an optional request remap, whether it
/// has a larger context window than the entries before it, and optionally a [`Gate`] (can it
/// take a call now?) and a retry policy `P` of its own.
pub struct Entry<S, Req, P = NoRetry> {
    pub(super) name: Cow<'static, str>,
    pub(super) service: S,
    pub(super) remap: Option<Remap<Req>>,
    pub(super) larger_context: bool,
    pub(super) gate: Option<Gate<Req>>,
    pub(super) policy: Option<Arc<P>>,
}

impl<S: Clone, Req, P> Clone for Entry<S, Req, P> {
    fn clone(&self) -> Self {
        Entry {
            name: self.name.clone(),
            service: self.service.clone(),
            remap: self.remap.clone(),
            larger_context: self.larger_context,
            gate: self.gate.clone(),
            policy: self.policy.clone(),
        }
    }
}

impl<S, Req, P> fmt::Debug for Entry<S, Req, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Entry")
            .field("name", &self.name)
            .field("remap", &self.remap.is_some())
            .field("larger_context", &self.larger_context)
            .field("gate", &self.gate.is_some())
            .field("retry", &self.policy.is_some())
            .finish()
    }
}

impl<S, Req> Entry<S, Req> {
    /// An entry named `name` (a provider, used in logs) that calls `service`, with no gate (it
    /// can always take a call, as far as the chain knows) and no retries of its own.
    pub fn new(name: impl Into<Cow<'static, str>>, service: S) -> Self {
        Entry {
            name: name.into(),
            service,
            remap: None,
            larger_context: false,
            gate: None,
            policy: None,
        }
    }
}

impl<S, Req, P> Entry<S, Req, P> {
    /// Rewrites the request before this entry sees it.
    pub fn remap<F>(mut self, f: F) -> Self
    where
        F: Fn(Req) -> Req + Send + Sync + 'static,
    {
        self.remap = Some(Arc::new(f));
        self
    }

    /// Declares this entry as having a larger context window: context-length errors of earlier
    /// entries fail over to it (and only to such entries).
    pub fn larger_context(mut self, yes: bool) -> Self {
        self.larger_context = yes;
        self
    }

    /// Tells the chain how long until this entry could take a request (zero: now), from its
    /// breaker's and bucket's handles; see [`Gate`]. Under
    /// [`FailoverPolicy::FailoverFirst`] an entry that cannot take a call now is passed over
    /// while another can.
    pub fn gate<F>(mut self, gate: F) -> Self
    where
        F: Fn(&Req) -> Duration + Send + Sync + 'static,
    {
        self.gate = Some(Arc::new(gate));
        self
    }

    /// Retries this entry's failures by `policy` (e.g. a
    /// [`StandardPolicy`](crate::retry::StandardPolicy)): its backoff, its `Retry-After`
    /// handling, its budget, its `max_retries`. Without one, an entry is tried once per call.
    pub fn retry<P2>(self, policy: P2) -> Entry<S, Req, P2> {
        self.retry_shared(Arc::new(policy))
    }

    /// [`retry`](Self::retry) with a policy shared elsewhere (by this entry's streaming twin,
    /// say).
    pub fn retry_shared<P2>(self, policy: Arc<P2>) -> Entry<S, Req, P2> {
        Entry {
            name: self.name,
            service: self.service,
            remap: self.remap,
            larger_context: self.larger_context,
            gate: self.gate,
            policy: Some(policy),
        }
    }

    /// The entry's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The entry's retry policy, if it has one.
    pub fn policy(&self) -> Option<&Arc<P>> {
        self.policy.as_ref()
    }

    /// The entry's service.
    pub fn get_ref(&self) -> &S {
        &self.service
    }

    /// The entry's service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.service
    }

    /// Unwraps the entry's service.
    pub fn into_inner(self) -> S {
        self.service
    }

    /// How long until this entry could take `req`, by its gate (zero without one).
    pub(super) fn wait(&self, req: &Req) -> Duration {
        self.gate.as_ref().map_or(Duration::ZERO, |g| g(req))
    }

    /// `req` as this entry sends it.
    pub(super) fn remapped(&self, req: Req) -> Req {
        match &self.remap {
            Some(remap) => remap(req),
            None => req,
        }
    }
}

impl<S, P> Entry<S, ChatRequest, P> {
    /// Sends this entry's requests to `model` instead of the caller's (no allocation per call:
    /// the name is shared).
    pub fn model(self, model: &str) -> Self {
        let model: Arc<str> = Arc::from(model);
        self.remap(move |req: ChatRequest| req.with_model(model.clone()))
    }
}

/// A fallback chain could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FallbackError {
    /// The chain has no entry.
    Empty,
}

impl fmt::Display for FallbackError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FallbackError::Empty => f.write_str("a fallback chain needs at least one entry"),
        }
    }
}

impl std::error::Error for FallbackError {}

/// An ordered chain of services, primary first. See the [module docs](super).
pub struct Fallback<S, Req, P = NoRetry> {
    pub(super) primary: S,
    pub(super) chain: Arc<[Entry<S, Req, P>]>,
    pub(super) order: FailoverPolicy,
    pub(super) rank: Option<Rank<Req>>,
}

impl<S: Clone, Req, P> Clone for Fallback<S, Req, P> {
    fn clone(&self) -> Self {
        Fallback {
            primary: self.primary.clone(),
            chain: self.chain.clone(),
            order: self.order,
            rank: self.rank.clone(),
        }
    }
}

impl<S, Req, P> fmt::Debug for Fallback<S, Req, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fallback")
            .field("chain", &self.chain)
            .field("order", &self.order)
            .field("ranked", &self.rank.is_some())
            .finish()
    }
}

impl<S: Clone, Req, P> Fallback<S, Req, P> {
    /// A chain of entries, primary first, failing over first
    /// ([`FailoverPolicy::FailoverFirst`]).
    pub fn new(entries: Vec<Entry<S, Req, P>>) -> Result<Self, FallbackError> {
        let primary = entries.first().ok_or(FallbackError::Empty)?.service.clone();
        Ok(Fallback {
            primary,
            chain: entries.into(),
            order: FailoverPolicy::default(),
            rank: None,
        })
    }

    /// Orders the entries per request by `rank` (best first) instead of the chain's order, and
    /// fails over first ([`FailoverPolicy::FailoverFirst`]) in that order. This is how a
    /// [`Pool`](crate::pool::Pool) spreads load; an ordered chain has no ranking.
    pub fn ranked(mut self, rank: Rank<Req>) -> Self {
        self.rank = Some(rank);
        self.order = FailoverPolicy::FailoverFirst;
        self
    }

    /// Sets the order in which attempts are spent after a failure.
    pub fn failover(mut self, order: FailoverPolicy) -> Self {
        self.order = order;
        self
    }

    /// The order in which attempts are spent after a failure.
    pub fn failover_policy(&self) -> FailoverPolicy {
        self.order
    }

    /// The entries, primary first (shared by every clone).
    pub fn entries(&self) -> &[Entry<S, Req, P>] {
        &self.chain
    }

    /// The primary's service: the clone this `Fallback` drives readiness on.
    pub fn get_ref(&self) -> &S {
        &self.primary
    }

    /// The primary's service, mutably.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.primary
    }

    /// Unwraps the primary's service.
    pub fn into_inner(self) -> S {
        self.primary
    }
}

impl<S, Req, P> Service<Req> for Fallback<S, Req, P>
where
    S: Service<Req> + Clone,
    S::Response: OnFinish,
    S::Error: Classify + From<Refusal> + fmt::Display,
    Req: Replay + RequestInfo,
    P: Policy<Req, S::Response, S::Error>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = FallbackFuture<S, Req, P>;

    /// Drives the primary ready. Any other entry is driven ready (on a clone) inside the
    /// response future, before each of its attempts.
    ///
    /// A ranked chain (a pool) is always ready: which entry a call goes to is only known at
    /// the call, and that entry is driven ready (on a clone) inside the response future.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        if self.rank.is_some() {
            return Poll::Ready(Ok(()));
        }
        self.primary.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let chain = self.chain.clone();
        let now = Instant::now();
        // A deadline already passed never leaves: no attempt, nothing deposited.
        if crate::expired(req.deadline()) {
            return FallbackFuture::expired(chain, self.order, now);
        }
        // A ranking orders the entries for this request (a pool); a chain keeps its order.
        let ranked: Option<Box<[usize]>> = self.rank.as_ref().map(|rank| {
            let mut order: Box<[usize]> = (0..chain.len()).collect();
            rank(&req, &mut order);
            order
        });
        let best = ranked.as_deref().map_or(0, |r| r[0]);
        // Failing over first, the first attempt goes to the first entry that can take the call
        // now (the primary, or the best ranked, unless its gate says otherwise).
        let first = match self.order {
            FailoverPolicy::FailoverFirst => {
                choose(in_order(chain.len(), ranked.as_deref()).map(|i| (i, chain[i].wait(&req))))
                    .map_or(best, |c| c.index)
            }
            FailoverPolicy::RetryEachThenFallback => best,
        };
        let entry = &chain[first];
        if let Some(p) = &entry.policy {
            p.on_request_at(&req, now);
        }
        // Keep the caller's request only while another attempt may need it. (A request that
        // cannot be replayed is sent once.)
        let (copy, kept) = match chain.len() > 1 || entry.policy.is_some() {
            true => match req.replay() {
                Some(copy) => (copy, Some(req)),
                None => (req, None),
            },
            false => (req, None),
        };
        let copy = entry.remapped(copy);
        if first == 0 && ranked.is_none() {
            let span = super::future::attempt_span(&entry.name, 1);
            let fut = {
                let _attempt = span.enter();
                self.primary.call(copy)
            };
            FallbackFuture::called(fut, span, chain, self.order, kept, now)
        } else {
            // A ranked call drives its own clone ready: the primary readied by `poll_ready`
            // may not be the one chosen.
            let svc = entry.service.clone();
            FallbackFuture::readying(svc, first, copy, chain, self.order, kept, now).ranked(ranked)
        }
    }
}
