//! The pool: each strategy's choice, open breakers and exhausted buckets passed over, a
//! failover to a sibling before any sleep, a `Retry-After` pause honoured, clones sharing
//! state, a dropped future releasing its deployment, and no deployment admitted beyond its
//! bucket. Paused time and seeded randomness throughout.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis_core::{
    ChatCost, ChatMessage, ChatRequest, CompletionResult, CostOf, ErrorKind, LlmError, Usage,
};
use portcullis_layers::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerHandle};
use portcullis_layers::pool::{Deployment, Pool, PoolConfig, Strategy};
use portcullis_layers::retry::StandardPolicy;
use portcullis_layers::token_bucket::{
    KeyLimits, MemoryStore, Rate, TokenBucketConfig, TokenBucketHandle,
};
use portcullis_layers::{CircuitBreaker, CircuitBreakerLayer, TokenBucket, TokenBucketLayer};
use proptest::prelude::*;
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{Layer, ServiceExt};

type Upstream = BoxCloneService<ChatRequest, CompletionResult, LlmError>;
type Chain = CircuitBreaker<TokenBucket<Upstream>>;
type Log = Arc<Mutex<Vec<(&'static str, Instant)>>>;

/// How a deployment answers now (changeable).
#[derive(Debug, Clone, Copy, PartialEq)]
enum Mode {
    Ok,
    Overloaded,
    RateLimited(Duration),
    Slow(Duration),
    Hang,
}

fn upstream(name: &'static str, mode: Arc<Mutex<Mode>>, log: Log) -> Upstream {
    BoxCloneService::new(tower::service_fn(move |req: ChatRequest| {
        log.lock().unwrap().push((name, Instant::now()));
        let mode = *mode.lock().unwrap();
        async move {
            let err = |kind, status| {
                LlmError::new(kind, "injected")
                    .with_provider(name)
                    .with_status(status)
            };
            match mode {
                Mode::Ok => {}
                Mode::Overloaded => return Err(err(ErrorKind::Overloaded, 529)),
                Mode::RateLimited(after) => {
                    return Err(err(ErrorKind::RateLimited, 429).with_retry_after(after));
                }
                Mode::Slow(d) => tokio::time::sleep(d).await,
                Mode::Hang => std::future::pending::<()>().await,
            }
            // The usage is what was reserved: nothing is refunded, so what a bucket admitted
            // is what it charged.
            let cost = ChatCost.cost(&req);
            Ok(CompletionResult::new(name, req.model.to_string(), "ok")
                .with_usage(Usage::new(cost.input, cost.output)))
        }
    }))
}

struct Dep {
    mode: Arc<Mutex<Mode>>,
    breaker: CircuitBreakerHandle<Arc<str>>,
    bucket: TokenBucketHandle<MemoryStore>,
}

/// A deployment as a pool takes it: breaker → bucket → upstream, gated by both, its headroom
/// read from its bucket.
fn deployment(
    name: &'static str,
    tpm: Option<u64>,
    log: &Log,
) -> (Deployment<Chain, ChatRequest>, Dep) {
    let mode = Arc::new(Mutex::new(Mode::Ok));
    let mut limits = TokenBucketConfig::new();
    if let Some(tpm) = tpm {
        limits = limits.limit(
            "gpt-4o",
            KeyLimits::unlimited().with_tokens(Rate::per_minute(tpm).unwrap()),
        );
    }
    let breaker = CircuitBreakerLayer::new(name, CircuitBreakerConfig::default()).unwrap();
    let bucket = TokenBucketLayer::new(name, limits).unwrap();
    let (bh, qh) = (breaker.handle(), bucket.handle());
    let chain = breaker.layer(bucket.layer(upstream(name, mode.clone(), log.clone())));
    let (b, q, h) = (bh.clone(), qh.clone(), qh.clone());
    let d = Deployment::new(name, chain)
        .gate(move |r: &ChatRequest| b.availability(&*r.model).max(q.availability(&*r.model)))
        .headroom(move |r: &ChatRequest| h.headroom(&*r.model, ChatCost.cost(r)));
    (
        d,
        Dep {
            mode,
            breaker: bh,
            bucket: qh,
        },
    )
}

struct Rig {
    pool: Pool<Chain, ChatRequest, StandardPolicy>,
    deps: Vec<Dep>,
    log: Log,
}

fn make(tpms: &[Option<u64>], config: PoolConfig) -> Rig {
    let log = Log::default();
    let names = ["a", "b", "c", "d"];
    let (ds, deps): (Vec<_>, Vec<_>) = tpms
        .iter()
        .zip(names)
        .map(|(t, n)| deployment(n, *t, &log))
        .unzip();
    let policy = Arc::new(StandardPolicy::builder().seed(3).build().unwrap());
    Rig {
        pool: Pool::with_retry(ds, config, policy).unwrap(),
        deps,
        log,
    }
}

impl Rig {
    async fn call(&self) -> Result<CompletionResult, LlmError> {
        self.pool.clone().oneshot(req()).await
    }

    fn names(&self) -> Vec<&'static str> {
        self.log.lock().unwrap().iter().map(|(n, _)| *n).collect()
    }

    fn count(&self, name: &str) -> usize {
        self.names().iter().filter(|n| **n == name).count()
    }
}

fn req() -> ChatRequest {
    ChatRequest::new("gpt-4o", vec![ChatMessage::user("hi")]).max_tokens(100)
}

fn config(strategy: Strategy) -> PoolConfig {
    PoolConfig {
        strategy,
        ..PoolConfig::default()
    }
}

#[tokio::test(start_paused = true)]
async fn most_headroom_spreads_load_in_proportion_to_the_limits() {
    // Limits 60k, 30k and 10k TPM, 110k tokens a minute offered: every bucket is drawn below
    // full, the headroom left after each call keeps the three equally full, so each takes
    // what it refills, in proportion to its limit. (Under a light load the largest absorbs
    // the calls: it has the most left after each one.)
    let rig = make(
        &[Some(60_000), Some(30_000), Some(10_000)],
        PoolConfig::default(),
    );
    for _ in 0..300 {
        let _ = rig.pool.clone().oneshot(req().max_tokens(1_090)).await;
        tokio::time::advance(Duration::from_millis(600)).await;
    }
    let (a, b, c) = (rig.count("a"), rig.count("b"), rig.count("c"));
    let all = (a + b + c) as f64;
    assert!(a > b && b > c && c > 0, "{a} {b} {c}");
    let share = a as f64 / all;
    assert!(
        (0.5..0.7).contains(&share),
        "a took {share} of the calls for 60 % of the capacity"
    );
}

#[tokio::test(start_paused = true)]
async fn round_robin_and_weighted_choose_by_turn_and_by_weight() {
    let rig = make(&[None, None, None], config(Strategy::RoundRobin));
    for _ in 0..6 {
        rig.call().await.unwrap();
    }
    assert_eq!(rig.names(), ["a", "b", "c", "a", "b", "c"]);

    let log = Log::default();
    let (a, _) = deployment("a", None, &log);
    let (b, _) = deployment("b", None, &log);
    let cfg = PoolConfig {
        strategy: Strategy::Weighted,
        seed: 11,
        ..PoolConfig::default()
    };
    let pool = Pool::new(vec![a.weight(1), b.weight(3)], cfg).unwrap();
    for _ in 0..400 {
        pool.clone().oneshot(req()).await.unwrap();
    }
    let b_calls = log
        .lock()
        .unwrap()
        .iter()
        .filter(|(n, _)| *n == "b")
        .count();
    assert!(
        (260..340).contains(&b_calls),
        "weight 3 of 4 took {b_calls} of 400"
    );
}

#[tokio::test(start_paused = true)]
async fn least_in_flight_and_lowest_latency_avoid_the_busy_and_the_slow() {
    let rig = make(&[None, None], config(Strategy::LeastInFlight));
    *rig.deps[0].mode.lock().unwrap() = Mode::Hang;
    let mut stuck = Box::pin(rig.pool.clone().oneshot(req()));
    assert!(futures_poll(&mut stuck).await.is_none());
    assert_eq!(rig.pool.handle().status(&req())[0].in_flight, 1);
    *rig.deps[0].mode.lock().unwrap() = Mode::Ok;
    for _ in 0..4 {
        rig.call().await.unwrap();
    }
    assert_eq!(
        rig.names(),
        ["a", "b", "b", "b", "b"],
        "a is busy with one call"
    );
    drop(stuck);

    let rig = make(&[None, None], config(Strategy::LowestLatency));
    *rig.deps[0].mode.lock().unwrap() = Mode::Slow(Duration::from_millis(800));
    *rig.deps[1].mode.lock().unwrap() = Mode::Slow(Duration::from_millis(50));
    rig.call().await.unwrap(); // a (first turn)
    rig.call().await.unwrap(); // b (a is now known slow)
    for _ in 0..5 {
        rig.call().await.unwrap();
    }
    assert_eq!(rig.count("a"), 1, "{:?}", rig.names());
    let status = rig.pool.handle().status(&req());
    assert!(status[0].latency > status[1].latency);
}

#[tokio::test(start_paused = true)]
async fn the_default_passes_over_a_much_slower_deployment_until_it_decays() {
    // Equal headroom: round-robin by ties, until `a` is known to take 3 s against 0.1 s.
    let rig = make(&[None, None, None], PoolConfig::default());
    *rig.deps[0].mode.lock().unwrap() = Mode::Slow(Duration::from_secs(3));
    for d in &rig.deps[1..] {
        *d.mode.lock().unwrap() = Mode::Slow(Duration::from_millis(100));
    }
    for _ in 0..3 {
        rig.call().await.unwrap();
    }
    assert_eq!(rig.count("a"), 1);
    for _ in 0..30 {
        rig.call().await.unwrap();
    }
    assert_eq!(
        rig.count("a"),
        1,
        "slow `a` is passed over: {:?}",
        rig.names()
    );
    // Unused, its estimate decays; after a minute it is tried again, and it recovered.
    *rig.deps[0].mode.lock().unwrap() = Mode::Ok;
    tokio::time::sleep(Duration::from_secs(60)).await;
    for _ in 0..6 {
        rig.call().await.unwrap();
    }
    assert!(rig.count("a") >= 2, "{:?}", rig.names());

    // A call still in flight counts before it answers: its age is a lower bound.
    let rig = make(&[None, None], PoolConfig::default());
    *rig.deps[0].mode.lock().unwrap() = Mode::Hang;
    let mut pending = Box::pin(rig.pool.clone().oneshot(req()));
    assert!(futures_poll(&mut pending).await.is_none());
    tokio::time::advance(Duration::from_secs(5)).await;
    let status = rig.pool.handle().status(&req());
    assert_eq!(status[0].in_flight, 1);
    assert!(status[0].latency >= Duration::from_secs(5), "{status:?}");
    drop(pending);
    assert_eq!(rig.pool.handle().status(&req())[0].in_flight, 0);

    // Off, the slow deployment keeps its turn.
    let off = PoolConfig {
        slow_factor: 0.0,
        ..PoolConfig::default()
    };
    let rig = make(&[None, None], off);
    *rig.deps[0].mode.lock().unwrap() = Mode::Slow(Duration::from_secs(3));
    for _ in 0..6 {
        rig.call().await.unwrap();
    }
    assert_eq!(rig.count("a"), 3);

    // A bad factor is refused.
    let bad = PoolConfig {
        slow_factor: f64::NAN,
        ..PoolConfig::default()
    };
    let (d, _) = deployment("x", None, &Log::default());
    assert_eq!(
        Pool::new(vec![d], bad).unwrap_err(),
        portcullis_layers::pool::PoolError::InvalidSlowFactor
    );
}

#[tokio::test(start_paused = true)]
async fn a_pool_is_an_entry_of_a_fallback_chain() {
    use portcullis_layers::fallback::{Entry, Fallback};
    // As an entry, a pool has no retry of its own (`Pool::new`): its failure goes to the
    // chain's next entry at once.
    let log = Log::default();
    let (a, da) = deployment("a", None, &log);
    let (b, db) = deployment("b", None, &log);
    let pool = Pool::new(vec![a, b], PoolConfig::default()).unwrap();
    let backup = upstream("backup", Arc::new(Mutex::new(Mode::Ok)), log.clone());
    let chain = Fallback::new(vec![
        Entry::new("pool", tower::util::Either::Left(pool)),
        Entry::new("backup", tower::util::Either::Right(backup)),
    ])
    .unwrap();
    assert_eq!(chain.clone().oneshot(req()).await.unwrap().provider, "a");
    for d in [&da, &db] {
        *d.mode.lock().unwrap() = Mode::Overloaded;
    }
    let started = Instant::now();
    assert_eq!(chain.oneshot(req()).await.unwrap().provider, "backup");
    // Both deployments were tried, then the chain's next entry, with no sleep.
    let names: Vec<_> = log.lock().unwrap().iter().map(|(n, _)| *n).collect();
    assert_eq!(&names[1..], ["b", "a", "backup"]);
    assert_eq!(started.elapsed(), Duration::ZERO);
}

#[tokio::test(start_paused = true)]
async fn two_choices_is_seeded_and_still_prefers_headroom() {
    let run = || async {
        let rig = make(
            &[Some(60_000), Some(60_000), Some(6_000)],
            PoolConfig {
                two_choices: true,
                seed: 5,
                ..PoolConfig::default()
            },
        );
        for _ in 0..60 {
            rig.call().await.unwrap();
            tokio::time::advance(Duration::from_millis(200)).await;
        }
        rig.names()
    };
    let first = run().await;
    assert_eq!(first, run().await, "the same seed, the same choices");
    let small = first.iter().filter(|n| **n == "c").count();
    assert!(small < 20, "the small deployment took {small} of 60");
}

#[tokio::test(start_paused = true)]
async fn open_breakers_and_paused_buckets_are_passed_over() {
    let rig = make(&[Some(60_000), Some(10_000)], PoolConfig::default());
    rig.deps[0].breaker.force_open("gpt-4o");
    for _ in 0..3 {
        rig.call().await.unwrap();
    }
    assert_eq!(
        rig.names(),
        ["b", "b", "b"],
        "a's breaker is open, though it has more headroom"
    );
    rig.deps[0].breaker.reset("gpt-4o");
    rig.deps[0].bucket.pause("gpt-4o", Duration::from_secs(5));
    rig.call().await.unwrap();
    assert_eq!(rig.count("a"), 0, "a's bucket is paused");
    tokio::time::advance(Duration::from_secs(6)).await;
    rig.call().await.unwrap();
    assert_eq!(rig.count("a"), 1);
}

#[tokio::test(start_paused = true)]
async fn a_failure_goes_to_a_sibling_before_any_sleep_and_a_429_pauses_its_deployment() {
    let rig = make(&[Some(60_000), Some(30_000)], PoolConfig::default());
    *rig.deps[0].mode.lock().unwrap() = Mode::Overloaded;
    let t0 = Instant::now();
    let res = rig.call().await.unwrap();
    assert_eq!(res.provider, "b");
    assert_eq!(
        Instant::now() - t0,
        Duration::ZERO,
        "no backoff before the sibling"
    );
    assert_eq!(rig.names(), ["a", "b"]);

    // A 429 with Retry-After 20 s: a's bucket pauses, the pool keeps off it until then.
    *rig.deps[0].mode.lock().unwrap() = Mode::RateLimited(Duration::from_secs(20));
    rig.log.lock().unwrap().clear();
    rig.deps[0].breaker.reset("gpt-4o");
    rig.call().await.unwrap();
    assert_eq!(rig.names(), ["a", "b"]);
    assert!(rig.deps[0].bucket.paused_for("gpt-4o").is_some());
    *rig.deps[0].mode.lock().unwrap() = Mode::Ok;
    for _ in 0..5 {
        rig.call().await.unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
    }
    assert_eq!(rig.count("a"), 1, "only the 429 reached a while paused");
    tokio::time::advance(Duration::from_secs(20)).await;
    rig.call().await.unwrap();
    assert_eq!(rig.count("a"), 2, "a is chosen again after its pause");

    // Every deployment failing: the retry policy sleeps, then tries again.
    *rig.deps[0].mode.lock().unwrap() = Mode::Overloaded;
    *rig.deps[1].mode.lock().unwrap() = Mode::Overloaded;
    let t0 = Instant::now();
    let e = rig.call().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Overloaded);
    assert!(
        Instant::now() > t0,
        "slept only once nobody could take the call"
    );
}

#[tokio::test(start_paused = true)]
async fn clones_share_state_and_a_dropped_call_releases_its_deployment() {
    let rig = make(&[Some(60_000), Some(60_000)], config(Strategy::RoundRobin));
    let copy = rig.pool.clone();
    copy.clone().oneshot(req()).await.unwrap();
    rig.call().await.unwrap();
    assert_eq!(rig.names(), ["a", "b"], "one turn shared by the clones");

    *rig.deps[0].mode.lock().unwrap() = Mode::Hang;
    *rig.deps[1].mode.lock().unwrap() = Mode::Hang;
    let before = rig.deps[0]
        .bucket
        .level("gpt-4o")
        .unwrap()
        .levels
        .tokens
        .unwrap();
    let mut fut = Box::pin(copy.clone().oneshot(req()));
    let handle = rig.pool.handle();
    assert!(futures_poll(&mut fut).await.is_none());
    let busy: usize = handle.status(&req()).iter().map(|s| s.in_flight).sum();
    assert_eq!(busy, 1);
    drop(fut);
    let status = handle.status(&req());
    assert!(status.iter().all(|s| s.in_flight == 0), "{status:?}");
    let after = rig.deps[0].bucket.level("gpt-4o").unwrap();
    assert_eq!(
        after.reservations, 0,
        "the bucket's reservation went with the future"
    );
    // The tokens of a call that reached the provider stay spent: it counted there.
    assert!(after.levels.tokens.unwrap() < before);
}

/// Polls a future once.
async fn futures_poll<F: std::future::Future + Unpin>(f: &mut F) -> Option<F::Output> {
    std::future::poll_fn(|cx| match std::pin::Pin::new(&mut *f).poll(cx) {
        std::task::Poll::Ready(v) => std::task::Poll::Ready(Some(v)),
        std::task::Poll::Pending => std::task::Poll::Ready(None),
    })
    .await
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// However calls arrive and whatever they cost, no deployment is admitted more than its
    /// bucket allows: within any span T from the start, at most capacity + rate · T.
    #[test]
    fn no_deployment_is_admitted_beyond_its_bucket(
        gaps in proptest::collection::vec(0u64..400, 20..120),
        sizes in proptest::collection::vec(1u32..2_000, 20..120),
        strategy in prop::sample::select(vec![Strategy::MostHeadroom, Strategy::RoundRobin, Strategy::LeastInFlight]),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().start_paused(true).build().unwrap();
        rt.block_on(async {
            let tpm = [20_000u64, 8_000];
            let rig = make(&[Some(tpm[0]), Some(tpm[1])], config(strategy));
            let start = Instant::now();
            let mut admitted: Vec<Vec<(Duration, u64)>> = vec![Vec::new(), Vec::new()];
            for (gap, size) in gaps.iter().zip(&sizes) {
                tokio::time::advance(Duration::from_millis(*gap)).await;
                let r = ChatRequest::new("gpt-4o", vec![ChatMessage::user("hi")]).max_tokens(*size);
                let cost = ChatCost.cost(&r).total();
                let before = rig.names().len();
                let _ = rig.pool.clone().oneshot(r).await;
                for name in &rig.names()[before..] {
                    let i = usize::from(*name == "b");
                    admitted[i].push((Instant::now() - start, cost));
                }
            }
            for (i, calls) in admitted.iter().enumerate() {
                let mut total = 0u64;
                for (at, cost) in calls {
                    total += cost;
                    let allowed = tpm[i] as f64 + tpm[i] as f64 / 60.0 * at.as_secs_f64();
                    prop_assert!(total as f64 <= allowed + 1.0, "deployment {i}: {total} by {at:?} > {allowed}");
                }
            }
            Ok(())
        })?;
    }
}
