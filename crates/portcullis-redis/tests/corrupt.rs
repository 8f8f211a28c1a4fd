//! Bad data in Redis: values read back are validated and healed, a corrupt reservation is
//! dropped, and a key of the wrong type is replaced without taking the store off Redis.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use portcullis_core::TokenCost;
use portcullis_layers::token_bucket::{BucketStore, Settlement};
use portcullis_redis::{FailurePolicy, RedisStore};
use redis::AsyncCommands;

fn one() -> TokenCost {
    TokenCost {
        input: 0,
        output: 10,
    }
}

async fn conn(server: &TestRedis) -> redis::aio::MultiplexedConnection {
    redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// 100 requests a second (capacity 100), 10 000 tokens.
fn store(server: &TestRedis) -> RedisStore {
    redis_store(server, config(limits((100, 100.0), (10_000, 10_000.0))))
}

/// Every field the scripts keep, and values no script writes.
const FIELDS: [&str; 13] = [
    "t1", "t2", "t3", "t4", "floor", "b1", "b2", "b3", "b4", "bfloor", "paused", "seq", "last",
];
const BAD: [&str; 7] = ["-1e400", "1e400", "nan", "-nan", "garbage", "-9e18", "9e18"];

redis_tests! {
Need::Server;

#[tokio::test]
async fn bad_values_never_panic_and_are_healed(server) {
    let store = store(&server);
    let k: Arc<str> = Arc::from("m");
    let name = store.redis_key(&k);
    let mut c = conn(&server).await;
    for field in FIELDS {
        for bad in BAD {
            let a = store.reserve(&k, one(), Duration::from_secs(1)).await.unwrap();
            store.settle(a.ticket, Settlement::Cancelled);
            store.flush().await;
            let _: () = c.hset(&name, field, bad).await.unwrap();
            // A reservation and a read of the levels: no panic, a sane wait, sane levels.
            let a = store
                .reserve(&k, one(), Duration::from_secs(1))
                .await
                .unwrap_or_else(|e| panic!("{field}={bad}: {e:?}"));
            assert!(a.wait <= Duration::from_secs(1), "{field}={bad}: {:?}", a.wait);
            assert!(a.ticket.is_shared(), "{field}={bad}: served by Redis");
            store.settle(a.ticket, Settlement::Cancelled);
            store.flush().await;
            let levels = store.fetch_levels(&k).await.unwrap();
            let requests = levels.requests().unwrap();
            assert!((-100.0..=100.0).contains(&requests), "{field}={bad}: {requests}");
            assert!(
                levels.paused_for.is_none_or(|p| p <= Duration::from_secs(1)),
                "{field}={bad}: {:?}",
                levels.paused_for
            );
            assert!(levels.queued_for <= Duration::from_secs(1), "{field}={bad}");
            // The key was written back healed.
            let now: Option<String> = c.hget(&name, field).await.unwrap();
            let v: f64 = now.as_deref().unwrap_or("0").parse().unwrap();
            assert!(v.is_finite() && v.abs() < 1e16, "{field} left at {now:?}");
        }
    }
    assert!(!store.is_degraded());
}

#[tokio::test]
async fn a_corrupt_reservation_is_dropped(server) {
    let store = store(&server);
    let k: Arc<str> = Arc::from("m");
    let name = store.redis_key(&k);
    let a = store.reserve(&k, one(), Duration::from_secs(1)).await.unwrap();
    let mut c = conn(&server).await;
    let _: () = c.hset(&name, "L1", "not,a,link").await.unwrap();
    let _: () = c.hset(&name, "L2", "1e400").await.unwrap();
    store.settle(a.ticket, Settlement::Cancelled);
    store.flush().await;
    let b = store.reserve(&k, one(), Duration::from_secs(1)).await.unwrap();
    assert!(b.ticket.is_shared());
    store.settle(b.ticket, Settlement::Cancelled);
    store.flush().await;
    let l1: Option<String> = c.hget(&name, "L1").await.unwrap();
    let l2: Option<String> = c.hget(&name, "L2").await.unwrap();
    assert_eq!((l1, l2), (None, None));
    assert!(!store.is_degraded());
}

#[tokio::test]
async fn a_key_of_the_wrong_type_is_replaced_and_the_store_stays_on_redis(server) {
    let k: Arc<str> = Arc::from("m");
    let other: Arc<str> = Arc::from("other");
    for (policy, overwrite) in [
        (FailurePolicy::FailClosed, "string"),
        (FailurePolicy::FailClosed, "list"),
        (FailurePolicy::FailOpen, "set"),
    ] {
        let store = RedisStore::new(
            "t",
            config(limits((100, 100.0), (10_000, 10_000.0))),
            redis_config(&server)
                .prefix(server.prefix(overwrite))
                .failure_policy(policy),
        )
        .unwrap();
        let name = store.redis_key(&k);
        let mut c = conn(&server).await;
        let _: () = c.del(&name).await.unwrap();
        match overwrite {
            "string" => c.set::<_, _, ()>(&name, "x").await.unwrap(),
            "list" => c.rpush::<_, _, ()>(&name, "x").await.unwrap(),
            _ => c.sadd::<_, _, ()>(&name, "x").await.unwrap(),
        }
        for key in [&k, &other, &k] {
            let a = store
                .reserve(key, one(), Duration::from_secs(1))
                .await
                .unwrap_or_else(|e| panic!("{overwrite}: {e:?}"));
            assert!(a.ticket.is_shared(), "{overwrite}: {key} served by Redis");
            store.settle(a.ticket, Settlement::Cancelled);
        }
        assert!(!store.is_degraded(), "{overwrite}");
        let kind: String = redis::cmd("TYPE").arg(&name).query_async(&mut c).await.unwrap();
        assert_eq!(kind, "hash", "{overwrite}: replaced");
    }
}
}
