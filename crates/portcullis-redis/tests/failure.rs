//! Redis down, slow, and back: fail open with one warning, or fail closed with a typed error,
//! always within the timeout; reconnection when Redis returns.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use portcullis_core::ErrorKind;
use portcullis_core::TokenCost;
use portcullis_layers::token_bucket::{BucketStore, Denied, Settlement, TokenBucketLayer};
use portcullis_redis::{FailurePolicy, LocalRedis, RedisStore};
use tokio::time::Instant;
use tower::{Layer, ServiceExt};

const TIMEOUT: Duration = Duration::from_millis(50);
/// The timeout, plus what a loaded machine may add around it.
const BOUND: Duration = Duration::from_millis(250);

/// Captured log lines.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        let me = self.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || me.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .finish();
        tracing::subscriber::set_default(sub)
    }
    fn count(&self, needle: &str) -> usize {
        String::from_utf8_lossy(&self.0.lock().unwrap())
            .matches(needle)
            .count()
    }
}

fn store(server: &TestRedis, policy: FailurePolicy) -> RedisStore {
    RedisStore::new(
        "t",
        config(limits((1000, 1000.0), (100_000, 100_000.0))),
        redis_config(server)
            .timeout(TIMEOUT)
            .retry_interval(Duration::from_millis(100))
            .failure_policy(policy),
    )
    .unwrap()
}

fn one() -> TokenCost {
    TokenCost {
        input: 0,
        output: 10,
    }
}

/// Reserves until the store is back on Redis (it takes two good round trips in a row), or
/// panics after 3 s.
async fn until_shared(store: &RedisStore) {
    let k: Arc<str> = Arc::from("m");
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if let Ok(a) = store.reserve(&k, one(), Duration::ZERO).await {
            if a.ticket.is_shared() && !store.is_degraded() {
                return;
            }
        }
        assert!(Instant::now() < deadline, "no reconnection within 3 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

redis_tests! {
Need::Binary;

#[tokio::test]
async fn fail_open_serves_locally_warns_once_and_reconnects(server) {
    let logs = Logs::default();
    let _guard = logs.install();
        let port = server.local().port();
    let store = store(&server, FailurePolicy::FailOpen);
    store.ping().await.unwrap();
    let k: Arc<str> = Arc::from("m");
    let a = store.reserve(&k, one(), Duration::ZERO).await.unwrap();
    assert!(a.ticket.is_shared());

    server.kill();
    for _ in 0..20 {
        let start = Instant::now();
        let a = store.reserve(&k, one(), Duration::ZERO).await.unwrap();
        assert!(start.elapsed() < BOUND, "took {:?}", start.elapsed());
        assert!(!a.ticket.is_shared(), "served by the local fallback");
        store.settle(
            a.ticket,
            portcullis_layers::token_bucket::Settlement::Cancelled,
        );
    }
    assert!(store.is_degraded());
    // The layer keeps serving too.
    let svc = TokenBucketLayer::from_store("t", store.clone(), Duration::from_secs(1))
        .with_cost(MaxTokens)
        .layer(provider(Log::default()));
    svc.oneshot(req("m", 10)).await.unwrap();
    assert_eq!(logs.count("failing open"), 1, "one warning per outage");

    let _server = LocalRedis::start_on(port).unwrap();
    until_shared(&store).await;
    assert_eq!(logs.count("answers again"), 1);
}

#[tokio::test]
async fn fail_closed_refuses_within_the_timeout_and_reconnects(server) {
    let logs = Logs::default();
    let _guard = logs.install();
        let port = server.local().port();
    let store = store(&server, FailurePolicy::FailClosed);
    store.ping().await.unwrap();
    let k: Arc<str> = Arc::from("m");
    store.reserve(&k, one(), Duration::ZERO).await.unwrap();

    server.kill();
    for _ in 0..5 {
        let start = Instant::now();
        match store.reserve(&k, one(), Duration::ZERO).await {
            Err(Denied::Throttled { retry_after }) => {
                assert!(retry_after <= Duration::from_millis(100), "{retry_after:?}")
            }
            other => panic!("expected Throttled, got {other:?}"),
        }
        assert!(start.elapsed() < BOUND, "took {:?}", start.elapsed());
    }
    // Through the layer: a typed error, not a hang.
    let svc = TokenBucketLayer::from_store("t", store.clone(), Duration::from_secs(1))
        .with_cost(MaxTokens)
        .layer(provider(Log::default()));
    let start = Instant::now();
    let err = svc.oneshot(req("m", 10)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Throttled);
    assert!(err.retry_after().is_some());
    assert!(start.elapsed() < BOUND, "took {:?}", start.elapsed());
    assert_eq!(logs.count("failing closed"), 1, "one warning per outage");

    let _server = LocalRedis::start_on(port).unwrap();
    until_shared(&store).await;
}

/// A Redis that stops answering (SIGSTOP) costs at most the timeout per round trip.
#[tokio::test]
async fn a_hung_redis_costs_at_most_the_timeout(server) {
        let store = store(&server, FailurePolicy::FailClosed);
    let k: Arc<str> = Arc::from("m");
    store.reserve(&k, one(), Duration::ZERO).await.unwrap();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill")
            .args([sig, &server.local().pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig}");
    };
    signal("-STOP");
    let start = Instant::now();
    let r = store.reserve(&k, one(), Duration::ZERO).await;
    let took = start.elapsed();
    assert!(matches!(r, Err(Denied::Throttled { .. })), "{r:?}");
    assert!(took >= TIMEOUT && took < BOUND, "took {took:?}");
    // Background updates are bounded too: flush returns.
    store.pause(&k, Duration::from_millis(1));
    tokio::time::timeout(BOUND, store.flush()).await.unwrap();
    signal("-CONT");
    until_shared(&store).await;
}

/// A reservation whose reply came too late (the script ran after the client gave up) is
/// refunded on the next contact: a request that was never sent is never charged.
#[tokio::test]
async fn an_abandoned_reservation_is_refunded_on_the_next_contact(server) {
    let pid = server.local().pid().to_string();
    let store = RedisStore::new(
        "t",
        config(limits((100, 0.001), (10_000, 0.1))),
        redis_config(&server)
            .timeout(Duration::from_millis(50))
            .retry_interval(Duration::from_millis(50))
            .failure_policy(FailurePolicy::FailClosed),
    )
    .unwrap();
    let k: Arc<str> = Arc::from("m");
    let a = store.reserve(&k, one(), Duration::ZERO).await.unwrap();
    store.settle(a.ticket, Settlement::Cancelled);
    store.flush().await;
    let full = store.fetch_levels(&k).await.unwrap().requests().unwrap();

    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill").args([sig, &pid]).status().unwrap();
        assert!(ok.success(), "kill {sig}");
    };
    // Redis stops answering: the reservation's reply is abandoned after the timeout, but the
    // script is queued and runs when Redis resumes.
    signal("-STOP");
    let r = store.reserve(&k, one(), Duration::ZERO).await;
    assert!(matches!(r, Err(Denied::Throttled { .. })), "{r:?}");
    signal("-CONT");
    // Back on Redis (two good round trips), then the deferred settlement goes out.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Ok(a) = store.reserve(&k, one(), Duration::ZERO).await {
            let shared = a.ticket.is_shared();
            store.settle(a.ticket, Settlement::Cancelled);
            if shared && !store.is_degraded() {
                break;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "no reconnection");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    store.flush().await;
    let after = store.fetch_levels(&k).await.unwrap().requests().unwrap();
    assert!(
        (after - full).abs() < 0.5,
        "the abandoned reservation still holds a request: {full} before, {after} after"
    );
}

/// Redis down at startup: the store builds (it connects lazily), `ping` says so, and the
/// fallback keeps its share of each limit.
#[tokio::test]
async fn unreachable_at_startup(server) {
    let port = {
        let port = server.local().port();
        server.kill();
        port
    };
    let store: RedisStore = RedisStore::new(
        "t",
        config(limits((8, 0.001), (100, 100.0))),
        portcullis_redis::RedisConfig::new(format!("redis://127.0.0.1:{port}/"))
            .timeout(TIMEOUT)
            .retry_interval(Duration::from_millis(100))
            .fail_open_share(0.25),
    )
    .unwrap();
    assert!(store.ping().await.is_err());
    let k: Arc<str> = Arc::from("m");
    for _ in 0..2 {
        let a = store.reserve(&k, one(), Duration::ZERO).await.unwrap();
        assert!(!a.ticket.is_shared(), "fail-open is the default");
    }
    assert!(
        matches!(
            store.reserve(&k, one(), Duration::ZERO).await,
            Err(Denied::Throttled { .. })
        ),
        "a quarter of 8 requests"
    );
    let levels = store.levels(&k).unwrap();
    assert_eq!(levels.limits.requests.unwrap().capacity(), 2);
    let _server = LocalRedis::start_on(port).unwrap();
    until_shared(&store).await;
}
}
