//! [`Pool`] and its [`Deployment`]s.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use portcullis_core::{ChatRequest, Classify, OnFinish, Refusal, Replay, RequestInfo};
use tower_service::Service;

use super::load::{Load, Tracked};
use super::strategy::{PoolConfig, Ranker};
use crate::fallback::{Entry, Fallback, FallbackFuture, Gate};
use crate::retry::{NoRetry, Policy};

type Headroom<Req> = Arc<dyn Fn(&Req) -> Option<f64> + Send + Sync>;
type Remap<Req> = Arc<dyn Fn(Req) -> Req + Send + Sync>;

/// One deployment of a pool's model: a service (its own breaker and bucket inside, keyed for
/// this deployment), and what the pool reads of it.
pub struct Deployment<S, Req> {
    name: Cow<'static, str>,
    service: S,
    weight: u32,
    gate: Option<Gate<Req>>,
    headroom: Option<Headroom<Req>>,
    remap: Option<Remap<Req>>,
}

impl<S, Req> fmt::Debug for Deployment<S, Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Deployment")
            .field("name", &self.name)
            .field("weight", &self.weight)
            .field("gate", &self.gate.is_some())
            .field("headroom", &self.headroom.is_some())
            .finish_non_exhaustive()
    }
}

impl<S, Req> Deployment<S, Req> {
    /// A deployment named `name` (in logs, errors and the handle), weight 1, no gate, no
    /// headroom (counts as full).
    pub fn new(name: impl Into<Cow<'static, str>>, service: S) -> Self {
        Deployment {
            name: name.into(),
            service,
            weight: 1,
            gate: None,
            headroom: None,
            remap: None,
        }
    }

    /// Its weight for [`Strategy::Weighted`](super::Strategy::Weighted) (at least 1).
    pub fn weight(mut self, weight: u32) -> Self {
        self.weight = weight;
        self
    }

    /// How long until it could take a request (zero: now): its breaker's and bucket's
    /// availability, as a [fallback entry's gate](crate::fallback::Entry::gate). A deployment
    /// that cannot take the call now is passed over.
    pub fn gate<F>(mut self, gate: F) -> Self
    where
        F: Fn(&Req) -> Duration + Send + Sync + 'static,
    {
        self.gate = Some(Arc::new(gate));
        self
    }

    /// The share of its limits left after a request
    /// ([`TokenBucketHandle::headroom`](crate::token_bucket::TokenBucketHandle::headroom)), for
    /// [`Strategy::MostHeadroom`](super::Strategy::MostHeadroom).
    pub fn headroom<F>(mut self, headroom: F) -> Self
    where
        F: Fn(&Req) -> Option<f64> + Send + Sync + 'static,
    {
        self.headroom = Some(Arc::new(headroom));
        self
    }

    /// Rewrites the request for this deployment (e.g. its own model or deployment name).
    pub fn remap<F>(mut self, f: F) -> Self
    where
        F: Fn(Req) -> Req + Send + Sync + 'static,
    {
        self.remap = Some(Arc::new(f));
        self
    }
}

impl<S> Deployment<S, ChatRequest> {
    /// Sends requests to this deployment with `model` as their model.
    pub fn model(self, model: &str) -> Self {
        let model: Arc<str> = Arc::from(model);
        self.remap(move |req: ChatRequest| req.with_model(model.clone()))
    }
}

/// What the pool keeps of a deployment to rank it.
pub(super) struct Info<Req> {
    pub(super) name: Cow<'static, str>,
    pub(super) weight: u32,
    pub(super) gate: Option<Gate<Req>>,
    pub(super) headroom: Option<Headroom<Req>>,
    pub(super) load: Arc<Load>,
}

impl<Req> Info<Req> {
    pub(super) fn headroom(&self, req: &Req) -> Option<f64> {
        self.headroom.as_ref().and_then(|h| h(req))
    }
}

/// Why a pool could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolError {
    /// No deployment.
    Empty,
    /// A deployment with weight 0.
    ZeroWeight(String),
    /// Two deployments with one name.
    DuplicateName(String),
    /// A `slow_factor` that is negative or not a number.
    InvalidSlowFactor,
    /// A `latency_decay` of zero.
    ZeroLatencyDecay,
}

impl fmt::Display for PoolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolError::Empty => f.write_str("a pool needs at least one deployment"),
            PoolError::ZeroWeight(n) => write!(f, "deployment `{n}`: weight must be at least 1"),
            PoolError::DuplicateName(n) => write!(f, "two deployments are named `{n}`"),
            PoolError::ZeroLatencyDecay => f.write_str("latency_decay_ms must be > 0"),
            PoolError::InvalidSlowFactor => {
                f.write_str("slow_factor must be a finite number, 0 (off) or more")
            }
        }
    }
}

impl std::error::Error for PoolError {}

/// N deployments of one model, as one service: each request goes to the best deployment that
/// can take it now, by the pool's [`Strategy`](super::Strategy), and a failure that allows a
/// failover goes to the next best at once, before any backoff. See the
/// [module docs](super).
pub struct Pool<S, Req, P = NoRetry> {
    inner: Fallback<Tracked<S>, Req, P>,
    ranker: Arc<Ranker<Req>>,
}

impl<S: Clone, Req, P> Clone for Pool<S, Req, P> {
    fn clone(&self) -> Self {
        Pool {
            inner: self.inner.clone(),
            ranker: self.ranker.clone(),
        }
    }
}

impl<S, Req, P> fmt::Debug for Pool<S, Req, P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.ranker.deployments.iter().map(|d| &*d.name).collect();
        f.debug_struct("Pool").field("deployments", &names).finish()
    }
}

impl<S, Req> Pool<S, Req>
where
    S: Clone,
    Req: 'static,
{
    /// A pool over `deployments`, routed by `config`.
    pub fn new(
        deployments: Vec<Deployment<S, Req>>,
        config: PoolConfig,
    ) -> Result<Self, PoolError> {
        Self::build(deployments, config, |e| e)
    }
}

impl<S, Req, P> Pool<S, Req, P>
where
    S: Clone,
    Req: 'static,
{
    /// A pool whose deployments all follow one retry policy (one budget): a deployment that
    /// failed may be tried again after its backoff, but only when no other deployment can take
    /// the call now.
    pub fn with_retry(
        deployments: Vec<Deployment<S, Req>>,
        config: PoolConfig,
        policy: Arc<P>,
    ) -> Result<Self, PoolError> {
        Self::build(deployments, config, move |e| e.retry_shared(policy.clone()))
    }

    fn build(
        deployments: Vec<Deployment<S, Req>>,
        config: PoolConfig,
        retry: impl Fn(Entry<Tracked<S>, Req>) -> Entry<Tracked<S>, Req, P>,
    ) -> Result<Self, PoolError> {
        let (entries, ranking) = PoolRanking::entries(deployments, config)?;
        let entries = entries.into_iter().map(retry).collect();
        let ranker = ranking.ranker;
        let r = ranker.clone();
        let inner = Fallback::new(entries)
            .map_err(|_| PoolError::Empty)?
            .ranked(Arc::new(move |req: &Req, order: &mut [usize]| {
                r.rank(req, order)
            }));
        Ok(Pool { inner, ranker })
    }

    /// A handle on the deployments' state, shared with every clone.
    pub fn handle(&self) -> PoolHandle<Req> {
        PoolHandle {
            ranker: self.ranker.clone(),
        }
    }
}

impl<S, Req, P> Service<Req> for Pool<S, Req, P>
where
    S: Service<Req> + Clone,
    S::Response: OnFinish,
    S::Error: Classify + From<Refusal> + fmt::Display,
    Req: Replay + RequestInfo,
    P: Policy<Req, S::Response, S::Error>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = FallbackFuture<Tracked<S>, Req, P>;

    /// Always ready: the deployment is chosen at the call, and driven ready (on a clone) in
    /// the response future before each attempt.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Req) -> Self::Future {
        self.inner.call(req)
    }
}

/// A pool's deployments as fallback entries, each measured by [`Tracked`].
pub type PoolEntries<S, Req> = Vec<Entry<Tracked<S>, Req>>;

/// A pool's ranking on its own, for a pool that is a group of entries inside a larger
/// [`Fallback`] rather than a service of its own: the `Stack`'s priority groups of pools (two
/// OpenAI keys first, then Anthropic) are one fallback chain ranked by [`grouped`].
pub struct PoolRanking<Req> {
    ranker: Arc<Ranker<Req>>,
}

impl<Req> fmt::Debug for PoolRanking<Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.ranker.deployments.iter().map(|d| &*d.name).collect();
        f.debug_struct("PoolRanking")
            .field("deployments", &names)
            .finish()
    }
}

impl<Req: 'static> PoolRanking<Req> {
    /// The fallback entries of `deployments` (each service measured by [`Tracked`], with its
    /// gate and remap) and their ranking by `config`. The entries keep the deployments' order.
    pub fn entries<S>(
        deployments: Vec<Deployment<S, Req>>,
        config: PoolConfig,
    ) -> Result<(PoolEntries<S, Req>, Self), PoolError> {
        if deployments.is_empty() {
            return Err(PoolError::Empty);
        }
        if !config.slow_factor.is_finite() || config.slow_factor < 0.0 {
            return Err(PoolError::InvalidSlowFactor);
        }
        if config.latency_decay.is_zero() {
            return Err(PoolError::ZeroLatencyDecay);
        }
        let mut infos = Vec::with_capacity(deployments.len());
        let mut entries = Vec::with_capacity(deployments.len());
        for d in deployments {
            if d.weight == 0 {
                return Err(PoolError::ZeroWeight(d.name.into_owned()));
            }
            if infos.iter().any(|i: &Info<Req>| i.name == d.name) {
                return Err(PoolError::DuplicateName(d.name.into_owned()));
            }
            let load = Arc::new(Load::new(config.latency_decay));
            let mut entry = Entry::new(d.name.clone(), Tracked::new(d.service, load.clone()));
            if let Some(gate) = &d.gate {
                let gate = gate.clone();
                entry = entry.gate(move |r: &Req| gate(r));
            }
            if let Some(remap) = d.remap {
                entry = entry.remap(move |r| remap(r));
            }
            entries.push(entry);
            infos.push(Info {
                name: d.name,
                weight: d.weight,
                gate: d.gate,
                headroom: d.headroom,
                load,
            });
        }
        let ranker = Arc::new(Ranker::new(infos.into(), config));
        Ok((entries, PoolRanking { ranker }))
    }

    /// A handle on these deployments.
    pub fn handle(&self) -> PoolHandle<Req> {
        PoolHandle {
            ranker: self.ranker.clone(),
        }
    }

    /// How many deployments it ranks.
    pub fn len(&self) -> usize {
        self.ranker.deployments.len()
    }

    /// Whether it ranks none (never, once built).
    pub fn is_empty(&self) -> bool {
        self.ranker.deployments.is_empty()
    }
}

/// One group of a [`grouped`] chain: a plain entry, or a pool's consecutive entries.
#[derive(Debug)]
pub enum Group<Req> {
    /// One entry, in its place.
    Entry,
    /// A pool's entries ([`PoolRanking::entries`]), ranked per request among themselves.
    Pool(PoolRanking<Req>),
}

/// The [`Rank`](crate::fallback::Rank) of a fallback chain made of `groups` in priority order
/// (their entries consecutive, in that order): each pool's entries are ranked per request by
/// its strategy, and a later group is tried only after every entry of the groups before it.
///
/// ```
/// use portcullis_core::ChatRequest;
/// use portcullis_layers::pool::{grouped, Deployment, Group, PoolConfig, PoolRanking, Strategy};
///
/// let config = PoolConfig { strategy: Strategy::RoundRobin, ..PoolConfig::default() };
/// let deployments = vec![Deployment::new("key-a", ()), Deployment::new("key-b", ())];
/// let (_entries, ranking) = PoolRanking::<ChatRequest>::entries(deployments, config).unwrap();
/// // Entries 0 and 1 are the pool, entry 2 a plain fallback after it.
/// let rank = grouped(vec![Group::Pool(ranking), Group::Entry]);
/// let req = ChatRequest::new("gpt-4o", vec![]);
/// let mut firsts = Vec::new();
/// for _ in 0..4 {
///     let mut order = [0, 1, 2];
///     rank(&req, &mut order);
///     assert_eq!(order[2], 2); // the fallback stays last
///     firsts.push(order[0]);
/// }
/// assert_eq!(firsts, [0, 1, 0, 1]); // round-robin inside the pool
/// ```
pub fn grouped<Req: 'static>(groups: Vec<Group<Req>>) -> crate::fallback::Rank<Req> {
    let mut spans = Vec::new();
    let mut start = 0;
    for g in groups {
        match g {
            Group::Entry => start += 1,
            Group::Pool(p) => {
                let n = p.len();
                spans.push((start, p.ranker));
                start += n;
            }
        }
    }
    Arc::new(move |req: &Req, order: &mut [usize]| {
        for (start, ranker) in &spans {
            let Some(span) = order.get_mut(*start..*start + ranker.deployments.len()) else {
                continue;
            };
            span.iter_mut().for_each(|i| *i -= start);
            ranker.rank(req, span);
            span.iter_mut().for_each(|i| *i += start);
        }
    })
}

/// One deployment as a [`PoolHandle`] sees it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DeploymentStatus {
    /// Its name.
    pub name: String,
    /// How long until it could take the request (zero: now; an open breaker or a paused
    /// bucket says how long).
    pub available_in: Duration,
    /// The share of its tightest bucket left after the request (`None`: no known limit).
    pub headroom: Option<f64>,
    /// Calls in flight.
    pub in_flight: usize,
    /// Its peak-EWMA latency.
    pub latency: Duration,
    /// Calls it finished (answered or failed).
    pub finished: u64,
}

/// Reads a pool's deployments (shared with the pool and its clones).
pub struct PoolHandle<Req> {
    ranker: Arc<Ranker<Req>>,
}

impl<Req> Clone for PoolHandle<Req> {
    fn clone(&self) -> Self {
        PoolHandle {
            ranker: self.ranker.clone(),
        }
    }
}

impl<Req> fmt::Debug for PoolHandle<Req> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PoolHandle").finish_non_exhaustive()
    }
}

impl<Req> PoolHandle<Req> {
    /// Each deployment's state, headroom, calls in flight and latency, for a request like
    /// `req` (its cost decides the headroom; its model, which breaker and bucket keys are read).
    pub fn status(&self, req: &Req) -> Vec<DeploymentStatus> {
        self.ranker
            .deployments
            .iter()
            .map(|d| DeploymentStatus {
                name: d.name.to_string(),
                available_in: d.gate.as_ref().map_or(Duration::ZERO, |g| g(req)),
                headroom: d.headroom(req),
                in_flight: d.load.in_flight(),
                latency: d.load.latency(),
                finished: d.load.finished(),
            })
            .collect()
    }
}
