//! The same invariants, run against the in-memory store and against the Redis store.
//!
//! Redis keeps time with its own clock (`TIME`), which tokio cannot pause: these tests run in
//! real time, with fast rates (≤ 0.5 s per test) or rates so slow that levels do not move.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use portcullis_core::TokenCost;
use portcullis_layers::token_bucket::{Denied, Rate, Remaining, Settlement, TokenBucketLayer};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

/// Runs each generic test against both stores.
macro_rules! both_stores {
    ($($name:ident),* $(,)?) => {
        const REDIS_TESTS: usize = [$(stringify!($name)),*].len();
        $(
        mod $name {
            use super::*;
            #[tokio::test]
            async fn memory() {
                super::$name(memory_store).await;
            }
            #[tokio::test]
            async fn redis() {
                let Some(server) = acquire(Need::Server, super::REDIS_TESTS) else {
                    return;
                };
                super::$name(|cfg| redis_store(&server, cfg)).await;
            }
        }
        )*
    };
}

both_stores!(
    window_invariant_under_load,
    refusals_consume_nothing,
    refunds_and_reconciliation,
    pause_delays_admission_of_its_key_only,
    a_cleared_pause_admits_at_once,
    clamp_lowers_never_raises,
    set_limits_keeps_levels,
    a_cancellation_moves_the_waiters_behind_it,
    a_queue_cancelled_in_any_order_leaves_nothing,
);

const SLOW: f64 = 1e-3;

fn key(k: &str) -> Arc<str> {
    Arc::from(k)
}

/// One request of `tokens` output tokens.
fn cost(tokens: u64) -> TokenCost {
    TokenCost {
        input: 0,
        output: tokens,
    }
}

fn close(a: Option<f64>, b: f64) -> bool {
    a.is_some_and(|a| (a - b).abs() < 0.05)
}

/// Concurrent callers, some cancelled while waiting: the admitted cost in any window `T` is at
/// most `capacity + rate·T`, in both buckets, and every caller not cancelled is served.
async fn window_invariant_under_load<St: Probe>(make: impl Fn(TokenBucketConfigArg) -> St) {
    let (req, tok) = (Rate::new(3, 60.0).unwrap(), Rate::new(60, 1500.0).unwrap());
    let cfg = config(
        portcullis_layers::token_bucket::KeyLimits::unlimited()
            .with_requests(req)
            .with_tokens(tok),
    );
    let store = make(cfg.clone());
    let log = Log::default();
    let svc = TokenBucketLayer::from_store("t", store, cfg.max_wait)
        .with_cost(MaxTokens)
        .layer(provider(log.clone()));
    let mut rng = SmallRng::seed_from_u64(7);
    let mut tasks = Vec::new();
    let mut expected = 0;
    for _ in 0..24 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..8))).await;
        let fut = svc.clone().oneshot(req_of(rng.random_range(1..=50)));
        if rng.random_bool(0.2) {
            let after = Duration::from_millis(rng.random_range(0..150));
            tasks.push(tokio::spawn(async move {
                let _ = tokio::time::timeout(after, fut).await;
            }));
        } else {
            expected += 1;
            tasks.push(tokio::spawn(async move {
                fut.await.unwrap();
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let admitted = log.lock().unwrap().clone();
    assert!(
        admitted.len() >= expected,
        "every caller not cancelled is served"
    );
    let slack = SLACK;
    let requests: Vec<_> = admitted.iter().map(|(t, _)| (*t, 1)).collect();
    check_window(&requests, req, slack, "requests").unwrap();
    check_window(&admitted, tok, slack, "tokens").unwrap();
}

type TokenBucketConfigArg = portcullis_layers::token_bucket::TokenBucketConfig;

fn req_of(tokens: u32) -> portcullis_core::ChatRequest {
    req("m", tokens)
}

/// A cost above a capacity, or a wait beyond the allowed one, is refused at once and consumes
/// nothing.
async fn refusals_consume_nothing<St: Probe>(make: impl Fn(TokenBucketConfigArg) -> St) {
    let store = make(config(limits((10, SLOW), (100, SLOW))));
    let k = key("m");
    let a = store.reserve(&k, cost(100), Duration::ZERO).await.unwrap();
    assert_eq!(a.wait, Duration::ZERO);
    let before = store.now_levels("m").await;
    assert!(close(before.tokens(), 0.0), "{before:?}");
    match store.reserve(&k, cost(101), Duration::ZERO).await {
        Err(Denied::OverCapacity { cost, capacity }) => assert_eq!((cost, capacity), (101, 100)),
        other => panic!("expected OverCapacity, got {other:?}"),
    }
    match store.reserve(&k, cost(50), Duration::from_secs(1)).await {
        // 50 tokens at 0.001/s: 50 000 s away.
        Err(Denied::Throttled { retry_after }) => {
            let s = retry_after.as_secs_f64();
            assert!((49_999.0..=50_000.1).contains(&s), "{retry_after:?}");
        }
        other => panic!("expected Throttled, got {other:?}"),
    }
    let after = store.now_levels("m").await;
    assert!(close(after.tokens(), before.tokens().unwrap()), "{after:?}");
    assert!(
        close(after.requests(), before.requests().unwrap()),
        "{after:?}"
    );
}

/// Real usage below the estimate is refunded, above it charged; the latest reservation,
/// cancelled, is undone exactly.
async fn refunds_and_reconciliation<St: Probe>(make: impl Fn(TokenBucketConfigArg) -> St) {
    let store = make(config(limits((100, SLOW), (1000, SLOW))));
    let k = key("m");
    let a = store.reserve(&k, cost(500), Duration::ZERO).await.unwrap();
    store.settle(a.ticket, Settlement::Used(cost(100)));
    let l = store.now_levels("m").await;
    assert!(close(l.tokens(), 900.0), "{l:?}");
    let b = store.reserve(&k, cost(100), Duration::ZERO).await.unwrap();
    store.settle(b.ticket, Settlement::Used(cost(300)));
    let l = store.now_levels("m").await;
    assert!(close(l.tokens(), 600.0), "{l:?}");
    assert!(close(l.requests(), 98.0), "{l:?}");
    let c = store.reserve(&k, cost(50), Duration::ZERO).await.unwrap();
    store.settle(c.ticket, Settlement::Cancelled);
    let l = store.now_levels("m").await;
    assert!(close(l.tokens(), 600.0), "{l:?}");
    assert!(close(l.requests(), 98.0), "{l:?}");
}

/// A pause (after a 429) delays the next admissions of its key, not of the others.
async fn pause_delays_admission_of_its_key_only<St: Probe>(
    make: impl Fn(TokenBucketConfigArg) -> St,
) {
    let store = make(config(limits((100, 100.0), (1000, 1000.0))));
    let (k, other) = (key("m"), key("other"));
    // The key must be known for a pause to be shared: reserve once.
    let a = store.reserve(&k, cost(1), Duration::ZERO).await.unwrap();
    store.settle(a.ticket, Settlement::Used(cost(1)));
    store.pause(&k, Duration::from_millis(300));
    store.sync().await;
    let start = Instant::now();
    let a = store
        .reserve(&k, cost(1), Duration::from_secs(1))
        .await
        .unwrap();
    let waited = a.wait + start.elapsed();
    assert!(
        (Duration::from_millis(200)..=Duration::from_millis(320)).contains(&waited),
        "{waited:?}"
    );
    let held = store.wait(&a.ticket, std::task::Waker::noop());
    assert!(
        held > Duration::from_millis(150),
        "held until the pause ends: {held:?}"
    );
    let b = store
        .reserve(&other, cost(1), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(b.wait, Duration::ZERO);
    // A pause longer than the allowed wait is a refusal.
    store.pause(&k, Duration::from_secs(30));
    store.sync().await;
    match store.reserve(&k, cost(1), Duration::from_secs(1)).await {
        Err(Denied::Throttled { retry_after }) => {
            assert!(retry_after > Duration::from_secs(29), "{retry_after:?}")
        }
        other => panic!("expected Throttled, got {other:?}"),
    }
}

/// Clearing a pause (issue 19, part 2) admits the next request at once.
async fn a_cleared_pause_admits_at_once<St: Probe>(make: impl Fn(TokenBucketConfigArg) -> St) {
    let store = make(config(limits((100, 100.0), (1000, 1000.0))));
    let k = key("m");
    let a = store.reserve(&k, cost(1), Duration::ZERO).await.unwrap();
    store.settle(a.ticket, Settlement::Used(cost(1)));
    store.pause(&k, Duration::from_secs(30));
    store.sync().await;
    assert!(store.levels(&*k).and_then(|l| l.paused_for).is_some());
    store.clear_pause(&k);
    store.sync().await;
    assert_eq!(store.levels(&*k).and_then(|l| l.paused_for), None);
    let b = store.reserve(&k, cost(1), Duration::ZERO).await.unwrap();
    assert_eq!(b.wait, Duration::ZERO);
}

/// `remaining` headers lower the levels, never raise them.
async fn clamp_lowers_never_raises<St: Probe>(make: impl Fn(TokenBucketConfigArg) -> St) {
    let store = make(config(limits((100, SLOW), (1000, SLOW))));
    let k = key("m");
    let a = store.reserve(&k, cost(100), Duration::ZERO).await.unwrap();
    drop(a);
    store.clamp(
        &k,
        Remaining {
            tokens: Some(10),
            ..Remaining::default()
        },
    );
    let l = store.now_levels("m").await;
    assert!(close(l.tokens(), 10.0), "{l:?}");
    assert!(close(l.requests(), 99.0), "other buckets untouched: {l:?}");
    store.clamp(
        &k,
        Remaining {
            tokens: Some(900),
            requests: Some(100),
            ..Remaining::default()
        },
    );
    let l = store.now_levels("m").await;
    assert!(close(l.tokens(), 10.0), "{l:?}");
    assert!(close(l.requests(), 99.0), "{l:?}");
}

/// Limits change at run time; each level carries over, capped by the new capacity.
async fn set_limits_keeps_levels<St: Probe>(make: impl Fn(TokenBucketConfigArg) -> St) {
    let store = make(config(limits((100, SLOW), (1000, SLOW))));
    let k = key("m");
    store.reserve(&k, cost(400), Duration::ZERO).await.unwrap();
    store.set_limits(&k, limits((100, SLOW), (2000, SLOW)));
    let l = store.now_levels("m").await;
    assert!(close(l.tokens(), 600.0), "{l:?}");
    assert_eq!(l.limits.tokens, Some(Rate::new(2000, SLOW).unwrap()));
    store.set_limits(&k, limits((100, SLOW), (500, SLOW)));
    let l = store.now_levels("m").await;
    assert!(close(l.tokens(), 500.0), "{l:?}");
    let a = store.reserve(&k, cost(500), Duration::ZERO).await.unwrap();
    assert_eq!(a.wait, Duration::ZERO);
    assert!(matches!(
        store.reserve(&k, cost(501), Duration::ZERO).await,
        Err(Denied::OverCapacity { capacity: 500, .. })
    ));
}

/// Counts its wake-ups.
#[derive(Default)]
struct Wakes(std::sync::atomic::AtomicUsize);

impl std::task::Wake for Wakes {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A waiter cancelled in the middle of the queue: the waiters behind it move up into its slot,
/// and are woken to sleep until the new one.
async fn a_cancellation_moves_the_waiters_behind_it<St: Probe>(
    make: impl Fn(TokenBucketConfigArg) -> St,
) {
    // One request every 500 ms.
    let store = make(config(limits((1, 2.0), (1000, 1000.0))));
    let k = key("m");
    let long = Duration::from_secs(10);
    let mut q = Vec::new();
    for _ in 0..4 {
        q.push(store.reserve(&k, cost(1), long).await.unwrap());
    }
    let start = Instant::now();
    let wakes = Arc::new(Wakes::default());
    let waker = std::task::Waker::from(wakes.clone());
    let ms = |d: Duration| d.as_millis();
    assert!(ms(store.wait(&q[3].ticket, &waker)) > 1400);
    let b = q.remove(1);
    store.settle(b.ticket, Settlement::Cancelled);
    store.sync().await;
    let elapsed = ms(start.elapsed());
    let (c, d) = (
        store.wait(&q[1].ticket, &waker),
        store.wait(&q[2].ticket, &waker),
    );
    assert!(
        (400u128.saturating_sub(elapsed)..=500).contains(&ms(c)),
        "{c:?}"
    );
    assert!(
        (900u128.saturating_sub(elapsed)..=1000).contains(&ms(d)),
        "{d:?}"
    );
    assert_eq!(
        wakes.0.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "d was woken"
    );
    let l = store.now_levels("m").await;
    assert!(
        l.requests().is_some_and(|r| (-2.1..=-1.9).contains(&r)),
        "{l:?}"
    );
}

/// Two hundred waiters cancelled in a random order: the key is as it was before them, and the
/// next reservation waits one slot, not two hundred.
async fn a_queue_cancelled_in_any_order_leaves_nothing<St: Probe>(
    make: impl Fn(TokenBucketConfigArg) -> St,
) {
    use rand::seq::SliceRandom;
    // One request every 100 s: the levels do not move while the test runs.
    let store = make(config(limits((1, 0.01), (100_000, SLOW))));
    let k = key("m");
    let forever = Duration::from_secs(1 << 30);
    let start = Instant::now();
    let first = store.reserve(&k, cost(7), forever).await.unwrap();
    let before = store.now_levels("m").await;
    let mut queued = Vec::new();
    for i in 0..200 {
        queued.push(store.reserve(&k, cost(1 + i % 50), forever).await.unwrap());
    }
    let l = store.now_levels("m").await;
    assert!(close(l.requests(), -200.0), "{l:?}");
    queued.shuffle(&mut SmallRng::seed_from_u64(19));
    for a in queued {
        store.settle(a.ticket, Settlement::Cancelled);
    }
    let after = store.now_levels("m").await;
    assert!(
        close(after.requests(), before.requests().unwrap()),
        "{after:?}"
    );
    assert!(close(after.tokens(), before.tokens().unwrap()), "{after:?}");
    let next = store.reserve(&k, cost(1), forever).await.unwrap();
    // One slot after `first`, whatever real time the 400 round trips took on a loaded machine.
    let slot = next.wait + start.elapsed();
    assert!(
        (99.0..=100.5).contains(&slot.as_secs_f64()),
        "{:?} + {:?}",
        next.wait,
        start.elapsed()
    );
    drop(first);
}
