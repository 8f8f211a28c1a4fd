//! `drill pool`: three deployments of one model, each a simulator with its own limits; the
//! offered load is 2.5× the smallest deployment's TPM. Mid-run one deployment turns slow (a
//! latency fault), later another goes down (503) for a phase. Four stacks on the same seeded
//! scenario:
//!
//! - `single`: the Portcullis stack over one deployment;
//! - `round-robin`: each call to the next deployment in turn, with the SDKs' retry (2 retries
//!   on the same deployment, honouring `retry-after`);
//! - `litellm-like`: LiteLLM's router with usage-based routing, ported ([`litellm`]);
//! - `portcullis`: a [`Stack`](portcullis::Stack) whose one entry is a pool of the three
//!   (`StackBuilder::pool`, default strategy: the most headroom, slow deployments last).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use portcullis::layers::pool::PoolConfig;
use portcullis::layers::token_bucket::{BucketStore, KeyLimits, Rate, TokenBucketConfig};
use portcullis::providers::{OpenAiProvider, OpenAiStream};
use portcullis::sim::{FaultRule, Limits, OpenAiLimits, SimHandle, Simulator};
use portcullis::{ChatRequest, CompletionResult, LlmError, ProviderStack, Stack};
use serde::Serialize;
use tower::util::BoxCloneSyncService;
use tower::{Layer, Service};

use super::litellm::{self, Router};
use super::stacks::{self, SdkPolicy};
use super::workload::{self, Outcome, StackService};
use super::{Latency, Report, TIME_SCALE, Which, latency, scaled};

/// How long the drill offers load.
pub const DURATION: Duration = Duration::from_secs(16);
/// The deployments: name and tokens per (scaled) minute. `c` has twice the others' limits.
pub const DEPLOYMENTS: [(&str, u64); 3] = [("a", 3_000), ("b", 3_000), ("c", 6_000)];
/// Requests per (scaled) minute of every deployment (not the binding limit).
pub const RPM: u64 = 1_000;
/// Offered load: 2.5× deployment `a`'s TPM (about 30 tokens a request).
pub const RATE: f64 = 83.0;
/// When `b` is slow, and by how much (each answer takes this much longer).
pub const SLOW: (Duration, Duration, Duration) = (
    Duration::from_secs(2),
    Duration::from_secs(6),
    Duration::from_millis(1_000),
);
/// When `c` is down (503 to everything).
pub const OUTAGE: (Duration, Duration) = (Duration::from_secs(9), Duration::from_secs(13));
/// How long every answer takes (2 s of real time, a short LLM answer).
pub const BASE_LATENCY: Duration = Duration::from_millis(100);
const MODEL: &str = "gpt-4o-mini";
const MAX_TOKENS: u32 = 8;
/// The client keeps this share of each deployment's limits (as in `drill rate-limit`).
const SAFETY: f64 = 0.97;
/// Goodput during the outage counts the calls that finished in it, from this long after it
/// started (the queues take a moment to fill) to its end.
const SETTLE: Duration = Duration::from_millis(500);

/// Which stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolStack {
    /// One deployment.
    Single,
    /// Turns, no awareness.
    RoundRobin,
    /// LiteLLM's usage-based routing.
    LitellmLike,
    /// The pool.
    Portcullis,
}

impl PoolStack {
    /// Every stack, in the order they run.
    pub const ALL: [PoolStack; 4] = [
        PoolStack::Single,
        PoolStack::RoundRobin,
        PoolStack::LitellmLike,
        PoolStack::Portcullis,
    ];

    fn name(self) -> &'static str {
        match self {
            PoolStack::Single => "single",
            PoolStack::RoundRobin => "round-robin",
            PoolStack::LitellmLike => "litellm-like",
            PoolStack::Portcullis => "portcullis",
        }
    }
}

/// The drill's settings.
#[derive(Debug, Serialize)]
pub struct Scenario {
    description: &'static str,
    deployments_tpm: Vec<(&'static str, u64)>,
    rate_per_sec: f64,
    offered_over_smallest_tpm: f64,
    slow_b_ms: (u64, u64),
    slow_added_latency_ms: u64,
    base_latency_ms: u64,
    outage_c_ms: (u64, u64),
    duration_ms: u64,
    time_scale: f64,
}

/// One stack's run.
#[derive(Debug, Serialize)]
pub struct Row {
    name: &'static str,
    requests: usize,
    succeeded: usize,
    success_rate: f64,
    /// Success rate of the calls sent during the outage.
    success_rate_outage: f64,
    upstream_429s: u64,
    /// Tokens served during the outage over the healthy deployments' limits (`a` + `b`).
    goodput_outage: f64,
    latency_ms: Latency,
    /// Share of the served calls per deployment.
    share: Shares,
    /// Whether it met every target (those are set for `portcullis`).
    targets_met: bool,
}

/// Share of served calls per deployment.
#[derive(Debug, Serialize)]
pub struct Shares {
    a: f64,
    b: f64,
    c: f64,
}

/// One stack's outcomes, for the chart.
pub struct Run {
    /// The stack.
    pub name: &'static str,
    /// Every request.
    pub outcomes: Vec<Outcome>,
}

/// Runs the drill: the report and each stack's outcomes.
pub async fn run(
    seed: u64,
) -> Result<(Report<Scenario, Row>, Vec<Run>), Box<dyn std::error::Error>> {
    let mut rows = Vec::new();
    let mut runs = Vec::new();
    for kind in PoolStack::ALL {
        super::progress(&format!(
            "drill pool: running {} ({} s)…",
            kind.name(),
            DURATION.as_secs()
        ));
        let (row, outcomes) = one(kind, seed).await?;
        rows.push(row);
        runs.push(Run {
            name: kind.name(),
            outcomes,
        });
    }
    Ok((report(seed, rows), runs))
}

fn report(seed: u64, stacks: Vec<Row>) -> Report<Scenario, Row> {
    let ms = |d: Duration| d.as_millis() as u64;
    let scenario = Scenario {
        description: "three deployments (TPM 1:1:2, answers in 100 ms); load 2.5x the smallest's TPM; b +1 s, then c down",
        deployments_tpm: DEPLOYMENTS.to_vec(),
        rate_per_sec: RATE,
        offered_over_smallest_tpm: 2.5,
        slow_b_ms: (ms(SLOW.0), ms(SLOW.1)),
        slow_added_latency_ms: ms(SLOW.2),
        base_latency_ms: ms(BASE_LATENCY),
        outage_c_ms: (ms(OUTAGE.0), ms(OUTAGE.1)),
        duration_ms: ms(DURATION),
        time_scale: TIME_SCALE,
    };
    Report {
        drill: Which::Pool,
        seed,
        scenario,
        stacks,
    }
}

/// The upstream 429s of a run's simulators, which it then stops.
async fn stop(sims: Vec<SimHandle>) -> u64 {
    let upstream_429s = sims.iter().map(|s| s.stats().status(429)).sum();
    for s in sims {
        s.shutdown().await;
    }
    upstream_429s
}

/// `drill pool --instances N --redis`: N pools in one process, each offering 1/N of the load,
/// their deployments' buckets in memory per instance (`local`: each instance believes it has
/// the whole limits) or shared in Redis (`redis`).
pub async fn run_fleet(
    seed: u64,
    instances: usize,
    redis: &super::fleet::RedisSource,
) -> Result<(Report<Scenario, Row>, Vec<Run>), Box<dyn std::error::Error>> {
    use portcullis::layers::token_bucket::MemoryStore;
    use portcullis_redis::{RedisConfig, RedisStore};
    let mut rows = Vec::new();
    let mut runs = Vec::new();
    for shared in [false, true] {
        let name = if shared { "redis" } else { "local" };
        super::progress(&format!(
            "drill pool: running {instances} pools, buckets {name} ({} s)…",
            DURATION.as_secs()
        ));
        let sims = start_sims(seed).await?;
        let prefix = format!("portcullis-drill-pool:{}:{seed}:", std::process::id());
        let config = RedisConfig::new(redis.url())
            .prefix(prefix)
            .fail_open_share(1.0 / instances as f64);
        let mut tasks = Vec::new();
        for n in 0..instances {
            let s = seed + n as u64;
            let svc: StackService = if shared {
                let config = config.clone();
                let store = move |name: &str, l| -> Result<_, portcullis::BoxError> {
                    Ok(RedisStore::new(name.to_owned(), l, config.clone())?)
                };
                let stack = Stack::builder()
                    .deadline(scaled(stacks::DEADLINE))
                    .pool(MODEL, pool_config(s), deployments(&sims, s, store)?)
                    .build()?;
                BoxCloneSyncService::new(stack.completions())
            } else {
                let store = |name: &str, l| -> Result<_, portcullis::BoxError> {
                    Ok(MemoryStore::new(name.to_owned(), l)?)
                };
                let stack = Stack::builder()
                    .deadline(scaled(stacks::DEADLINE))
                    .pool(MODEL, pool_config(s), deployments(&sims, s, store)?)
                    .build()?;
                BoxCloneSyncService::new(stack.completions())
            };
            let base = n as u64 * 1_000_000;
            let rate = RATE / instances as f64;
            tasks.push(tokio::spawn(workload::run(svc, rate, DURATION, move |i| {
                workload::request(base + i, seed, MODEL, MAX_TOKENS)
            })));
        }
        let join = async {
            let mut outcomes = Vec::new();
            for t in tasks {
                outcomes.extend(t.await?);
            }
            Ok::<_, tokio::task::JoinError>(outcomes)
        };
        let (outcomes, faults) = tokio::join!(join, schedule_faults(&sims));
        faults?;
        let mut outcomes = outcomes?;
        outcomes.sort_by_key(|o| o.sent);
        let upstream_429s = stop(sims).await;
        rows.push(measure(name, &outcomes, upstream_429s, shared));
        runs.push(Run { name, outcomes });
    }
    Ok((report(seed, rows), runs))
}

/// The three simulators, each with its deployment's limits.
pub async fn start_sims(seed: u64) -> Result<Vec<SimHandle>, Box<dyn std::error::Error>> {
    let mut sims = Vec::new();
    for (i, (_, tpm)) in DEPLOYMENTS.iter().enumerate() {
        let limits = Limits {
            time_scale: 1.0 / super::SCALE,
            openai: OpenAiLimits {
                rpm: RPM,
                tpm: *tpm,
            },
            ..Limits::default()
        };
        let sim = Simulator::builder()
            .seed(seed + i as u64)
            .limits(limits)
            .fault(base())
            .start()
            .await?;
        sims.push(sim);
    }
    Ok(sims)
}

fn base() -> FaultRule {
    FaultRule::latency(BASE_LATENCY.as_millis() as u64)
}

/// Turns `b` slow and `c` down on the drill's schedule, from now (run it beside the load).
pub async fn schedule_faults(sims: &[SimHandle]) -> Result<(), Box<dyn std::error::Error>> {
    let (b, c) = (&sims[1], &sims[2]);
    let start = tokio::time::Instant::now();
    let at = |d: Duration| tokio::time::sleep_until(start + d);
    at(SLOW.0).await;
    b.set_faults(vec![FaultRule::latency(
        (BASE_LATENCY + SLOW.2).as_millis() as u64,
    )])?;
    at(SLOW.1).await;
    b.set_faults(vec![base()])?;
    at(OUTAGE.0).await;
    c.set_faults(vec![FaultRule::status(503)])?;
    at(OUTAGE.1).await;
    c.set_faults(vec![base()])?;
    Ok(())
}

/// A deployment's client limits: [`SAFETY`] of its simulator's, and a scaled 30 s wait.
pub fn client_limits(tpm: u64) -> Result<TokenBucketConfig, Box<dyn std::error::Error>> {
    let minute = scaled(Duration::from_secs(60)).as_secs_f64();
    let rate = |per_minute: u64| {
        let cap = (per_minute as f64 * SAFETY).floor() as u64;
        Rate::new(cap, per_minute as f64 / minute * SAFETY)
    };
    let limits = KeyLimits::default()
        .with_requests(rate(RPM)?)
        .with_tokens(rate(tpm)?);
    Ok(TokenBucketConfig::new()
        .limit(MODEL, limits)
        .max_wait(scaled(portcullis::layers::token_bucket::DEFAULT_MAX_WAIT)))
}

/// The pool's routing, with the library's durations scaled like every other drill setting.
pub fn pool_config(seed: u64) -> PoolConfig {
    let d = PoolConfig::default();
    PoolConfig {
        seed,
        slow_margin: scaled(d.slow_margin),
        latency_decay: scaled(d.latency_decay),
        ..d
    }
}

/// One deployment of the Portcullis pool.
pub type Deployment<St> = ProviderStack<Labeled, OpenAiStream, St>;

/// The Portcullis deployments over `sims`, their buckets in the stores `store` makes.
pub fn deployments<St>(
    sims: &[SimHandle],
    seed: u64,
    store: impl Fn(&str, TokenBucketConfig) -> Result<St, portcullis::BoxError>
    + Clone
    + Send
    + Sync
    + 'static,
) -> Result<Vec<Deployment<St>>, Box<dyn std::error::Error>>
where
    St: BucketStore<Key = Arc<str>> + Clone + Send + Sync + 'static,
{
    let mut out = Vec::new();
    for (sim, (name, tpm)) in sims.iter().zip(DEPLOYMENTS) {
        let p = stacks::openai(&sim.openai_base_url())?;
        let stream = p.streaming();
        let ps = ProviderStack::new(name, Labeled::new(p, name), stream)
            .retry(stacks::retry_config(seed))
            .breaker(stacks::breaker_config())
            .attempt_timeout(scaled(stacks::ATTEMPT_TIMEOUT))
            .stream_idle_timeout(scaled(stacks::ATTEMPT_TIMEOUT))
            .limits(client_limits(tpm)?.learn_window(scaled(Duration::from_secs(60))))
            .store(store.clone());
        out.push(ps);
    }
    Ok(out)
}

async fn one(
    kind: PoolStack,
    seed: u64,
) -> Result<(Row, Vec<Outcome>), Box<dyn std::error::Error>> {
    let sims = start_sims(seed).await?;
    let labeled = |i: usize| -> Result<Labeled, LlmError> {
        let p = stacks::openai(&sims[i].openai_base_url())?;
        Ok(Labeled::new(p, DEPLOYMENTS[i].0))
    };
    let memory = |name: &str, l: TokenBucketConfig| {
        Ok(portcullis::layers::token_bucket::MemoryStore::new(
            name.to_owned(),
            l,
        )?)
    };
    let svc: StackService = match kind {
        PoolStack::Single => {
            let mut d = deployments(&sims[..1], seed, memory)?;
            let stack = Stack::builder()
                .deadline(scaled(stacks::DEADLINE))
                .provider(d.remove(0))
                .build()?;
            BoxCloneSyncService::new(stack.completions())
        }
        PoolStack::RoundRobin => {
            let each = (0..3)
                .map(|i| {
                    let retried = portcullis::layers::RetryLayer::new(SdkPolicy).layer(labeled(i)?);
                    Ok(BoxCloneSyncService::new(retried))
                })
                .collect::<Result<Vec<StackService>, LlmError>>()?;
            BoxCloneSyncService::new(RoundRobin {
                each: each.into(),
                turn: Arc::default(),
            })
        }
        PoolStack::LitellmLike => {
            let each = (0..3)
                .map(|i| {
                    Ok(litellm::Deployment {
                        service: BoxCloneSyncService::new(labeled(i)?),
                        tpm: DEPLOYMENTS[i].1,
                        rpm: RPM,
                    })
                })
                .collect::<Result<Vec<_>, LlmError>>()?;
            BoxCloneSyncService::new(Router::new(each))
        }
        PoolStack::Portcullis => {
            let stack = Stack::builder()
                .deadline(scaled(stacks::DEADLINE))
                .pool(MODEL, pool_config(seed), deployments(&sims, seed, memory)?)
                .build()?;
            BoxCloneSyncService::new(stack.completions())
        }
    };
    let load = workload::run(svc, RATE, DURATION, |i| {
        workload::request(i, seed, MODEL, MAX_TOKENS)
    });
    let (outcomes, faults) = tokio::join!(load, schedule_faults(&sims));
    faults?;
    let upstream_429s = stop(sims).await;
    let row = measure(
        kind.name(),
        &outcomes,
        upstream_429s,
        kind == PoolStack::Portcullis,
    );
    Ok((row, outcomes))
}

/// The metrics of a run. `targeted`: check the targets (the pool's).
pub fn measure(
    name: &'static str,
    outcomes: &[Outcome],
    upstream_429s: u64,
    targeted: bool,
) -> Row {
    let succeeded = outcomes.iter().filter(|o| o.result.is_ok()).count();
    let during: Vec<&Outcome> = outcomes
        .iter()
        .filter(|o| o.sent >= OUTAGE.0 && o.sent < OUTAGE.1)
        .collect();
    let ratio = |n: usize, of: usize| {
        if of == 0 {
            0.0
        } else {
            ((n as f64 / of as f64) * 10_000.0).round() / 10_000.0
        }
    };
    let (from, to) = (OUTAGE.0 + SETTLE, OUTAGE.1);
    let tokens = workload::tokens_done(outcomes, from, to);
    let minute = scaled(Duration::from_secs(60)).as_secs_f64();
    let healthy_per_sec = (DEPLOYMENTS[0].1 + DEPLOYMENTS[1].1) as f64 / minute;
    let goodput = tokens as f64 / (to - from).as_secs_f64() / healthy_per_sec;
    let served = |d: &str| {
        let n = outcomes
            .iter()
            .filter(|o| o.result.as_ref().is_ok_and(|s| s.provider == d))
            .count();
        ratio(n, succeeded)
    };
    let lat = latency(outcomes, true);
    let success_rate = ratio(succeeded, outcomes.len());
    let success_rate_outage = ratio(
        during.iter().filter(|o| o.result.is_ok()).count(),
        during.len(),
    );
    let goodput_outage = (goodput * 1000.0).round() / 1000.0;
    let targets_met = targeted
        && upstream_429s == 0
        && goodput_outage >= 0.95
        && success_rate_outage >= 0.999
        && lat.p99 < SLOW.2.as_secs_f64() * 1000.0;
    Row {
        name,
        requests: outcomes.len(),
        succeeded,
        success_rate,
        success_rate_outage,
        upstream_429s,
        goodput_outage,
        latency_ms: lat,
        share: Shares {
            a: served("a"),
            b: served("b"),
            c: served("c"),
        },
        targets_met,
    }
}

/// Why a row missed its targets, for the exit status.
pub fn missed(row: &Row) -> bool {
    row.name == "portcullis" && !row.targets_met
}

/// An OpenAI provider whose answers name the deployment that served them (`provider`), so
/// that the drill can count each deployment's share.
#[derive(Clone, Debug)]
pub struct Labeled {
    inner: OpenAiProvider,
    name: &'static str,
}

impl Labeled {
    /// `inner`, answering as `name`.
    pub fn new(inner: OpenAiProvider, name: &'static str) -> Self {
        Labeled { inner, name }
    }
}

type Answer = Pin<Box<dyn Future<Output = Result<CompletionResult, LlmError>> + Send>>;

impl Service<ChatRequest> for Labeled {
    type Response = CompletionResult;
    type Error = LlmError;
    type Future = Answer;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), LlmError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: ChatRequest) -> Answer {
        let (call, name) = (self.inner.call(req), self.name);
        Box::pin(async move {
            let mut res = call.await?;
            res.provider = name.into();
            Ok(res)
        })
    }
}

/// `round-robin`: each call to the next deployment, whatever their state.
#[derive(Clone)]
struct RoundRobin {
    each: Arc<[StackService]>,
    turn: Arc<AtomicUsize>,
}

impl Service<ChatRequest> for RoundRobin {
    type Response = CompletionResult;
    type Error = LlmError;
    type Future = Answer;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), LlmError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ChatRequest) -> Answer {
        use tower::ServiceExt;
        let i = self.turn.fetch_add(1, Ordering::Relaxed) % self.each.len();
        Box::pin(self.each[i].clone().oneshot(req))
    }
}
