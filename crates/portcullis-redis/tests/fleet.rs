//! Several stacks (separate stores, separate connections) sharing one Redis; keys in Redis;
//! what refunds do across instances.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use portcullis_core::TokenCost;
use portcullis_layers::token_bucket::{BucketStore, Rate, Settlement, TokenBucketLayer};
use portcullis_redis::RedisStore;
use redis::AsyncCommands;
use tower::{Layer, ServiceExt};

/// Runs `stacks` token bucket services, each over its own store from `make`, with `callers`
/// concurrent callers each; returns every admission.
async fn run_fleet<St: Probe>(
    stacks: usize,
    callers: usize,
    make: impl Fn() -> St,
) -> Vec<(tokio::time::Instant, u64)> {
    let log = Log::default();
    let mut tasks = Vec::new();
    for _ in 0..stacks {
        let svc = TokenBucketLayer::from_store("t", make(), Duration::from_secs(10))
            .with_cost(MaxTokens)
            .layer(provider(log.clone()));
        for i in 0..callers {
            let fut = svc.clone().oneshot(req("m", 10 + (i as u32 % 4) * 10));
            tasks.push(tokio::spawn(fut));
        }
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let admitted = log.lock().unwrap().clone();
    assert_eq!(admitted.len(), stacks * callers);
    admitted
}

redis_tests! {
Need::Server;

/// Three stacks sharing one Redis stay under one limit together; three with their own
/// in-memory buckets (the control) exceed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stacks_sharing_redis_never_over_admit(server) {
        let (req, tok) = (Rate::new(4, 80.0).unwrap(), Rate::new(100, 2000.0).unwrap());
    let cfg = config(
        portcullis_layers::token_bucket::KeyLimits::unlimited()
            .with_requests(req)
            .with_tokens(tok),
    );
    let slack = SLACK;

    let shared = run_fleet(3, 10, || redis_store(&server, cfg.clone())).await;
    let requests: Vec<_> = shared.iter().map(|(t, _)| (*t, 1)).collect();
    check_window(&requests, req, slack, "requests").unwrap();
    check_window(&shared, tok, slack, "tokens").unwrap();

    let local = run_fleet(3, 10, || memory_store(cfg.clone())).await;
    let requests: Vec<_> = local.iter().map(|(t, _)| (*t, 1)).collect();
    assert!(
        check_window(&requests, req, slack, "requests").is_err(),
        "the control must over-admit, or this test proves nothing"
    );
}

/// Keys are named `{prefix}{name}:{label}` and expire once full again plus the idle TTL.
#[tokio::test]
async fn keys_are_prefixed_and_expire_when_idle(server) {
        let cfg = config(limits((10, 1000.0), (100, 1000.0)));
    let store: RedisStore = RedisStore::new(
        "openai",
        cfg,
        redis_config(&server)
            .prefix(server.prefix("app1:"))
            .idle_ttl(Duration::from_millis(100)),
    )
    .unwrap();
    let k: Arc<str> = Arc::from("gpt-4o-mini");
    let name = server.prefix("app1:openai:gpt-4o-mini");
    assert_eq!(store.redis_key(&k), name);
    let cost = TokenCost {
        input: 0,
        output: 50,
    };
    store.reserve(&k, cost, Duration::ZERO).await.unwrap();
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let ttl: i64 = conn.pttl(&name).await.unwrap();
    // 50 tokens at 1000/s: full again in 50 ms, plus 100 ms.
    assert!((100..=150).contains(&ttl), "pttl {ttl}");
    // Real time: Redis expires keys on its own clock.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let exists: bool = conn.exists(&name).await.unwrap();
    assert!(!exists, "an idle key expires");
    // A fresh key after expiry starts full.
    let a = store.reserve(&k, cost, Duration::ZERO).await.unwrap();
    assert_eq!(a.wait, Duration::ZERO);
}

/// Two stores with different prefixes do not share buckets.
#[tokio::test]
async fn prefixes_isolate(server) {
        let cfg = config(limits((1, 0.001), (100, 1000.0)));
    let a: RedisStore =
        RedisStore::new("t", cfg.clone(), redis_config(&server).prefix(server.prefix("a:"))).unwrap();
    let b: RedisStore = RedisStore::new("t", cfg, redis_config(&server).prefix(server.prefix("b:"))).unwrap();
    let k: Arc<str> = Arc::from("m");
    let one = TokenCost::default();
    a.reserve(&k, one, Duration::ZERO).await.unwrap();
    b.reserve(&k, one, Duration::ZERO).await.unwrap();
    assert!(a.reserve(&k, one, Duration::ZERO).await.is_err());
}

/// A refund moves only the waiters of the instance that sends it (the others cannot be told,
/// so they keep their slots: never admitted earlier than the chain says); the key's chain and
/// that instance's waiters are exact.
#[tokio::test]
async fn a_refund_moves_only_its_own_instances_waiters(server) {
    // One request every 500 ms.
    let cfg = config(limits((1, 2.0), (1000, 1000.0)));
    let a = redis_store(&server, cfg.clone());
    let b = redis_store(&server, cfg);
    let k: Arc<str> = Arc::from("m");
    let (long, one) = (Duration::from_secs(10), TokenCost::default());
    let a0 = a.reserve(&k, one, long).await.unwrap();
    let b1 = b.reserve(&k, one, long).await.unwrap();
    let a2 = a.reserve(&k, one, long).await.unwrap();
    let a3 = a.reserve(&k, one, long).await.unwrap();
    assert_eq!(a0.wait, Duration::ZERO);
    let start = tokio::time::Instant::now();
    let ms = |d: Duration| d.as_millis();
    let noop = std::task::Waker::noop();
    b.settle(b1.ticket, Settlement::Cancelled);
    b.flush().await;
    let elapsed = ms(start.elapsed());
    let (w2, w3) = (a.wait(&a2.ticket, noop), a.wait(&a3.ticket, noop));
    assert!((900u128.saturating_sub(elapsed)..=1000).contains(&ms(w2)), "a2 kept its slot: {w2:?}");
    assert!((1400u128.saturating_sub(elapsed)..=1500).contains(&ms(w3)), "a3 kept its slot: {w3:?}");
    a.settle(a2.ticket, Settlement::Cancelled);
    a.flush().await;
    let elapsed = ms(start.elapsed());
    let w3 = a.wait(&a3.ticket, noop);
    assert!((400u128.saturating_sub(elapsed)..=500).contains(&ms(w3)), "a3 took b1's slot: {w3:?}");
    let l = a.fetch_levels(&k).await.unwrap();
    assert!(l.requests().is_some_and(|r| (-1.1..=-0.9).contains(&r)), "{l:?}");
}

/// A caller that gives up during the round trip of its reservation has it forgotten: the key
/// is as before, though the script ran after the caller was gone.
#[tokio::test]
async fn a_reservation_given_up_during_its_round_trip_is_forgotten(server) {
    let store = redis_store(&server, config(limits((10, 0.001), (1000, 0.001))));
    let k: Arc<str> = Arc::from("m");
    let cost = TokenCost { input: 0, output: 100 };
    store.reserve(&k, cost, Duration::ZERO).await.unwrap();
    let before = store.fetch_levels(&k).await.unwrap();
    // Another client keeps the server busy for 300 ms: the reservation below is sent, and
    // waits there, while its caller gives up.
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let busy = tokio::spawn(async move {
        let spin = "local t = redis.call('TIME') local e = t[1] * 1e6 + t[2] + 3e5 \
                    repeat t = redis.call('TIME') until t[1] * 1e6 + t[2] > e return 1";
        redis::cmd("EVAL").arg(spin).arg(0).query_async::<i64>(&mut conn).await
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (s, key) = (store.clone(), k.clone());
    let caller = tokio::spawn(async move { s.reserve(&key, cost, Duration::ZERO).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    caller.abort();
    assert!(caller.await.unwrap_err().is_cancelled());
    busy.await.unwrap().unwrap();
    store.flush().await;
    let after = store.fetch_levels(&k).await.unwrap();
    assert!((after.tokens().unwrap() - before.tokens().unwrap()).abs() < 0.01, "{after:?}");
    assert!((after.requests().unwrap() - before.requests().unwrap()).abs() < 0.01, "{after:?}");
}
}
