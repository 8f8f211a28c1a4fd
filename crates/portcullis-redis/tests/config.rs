//! Configuration: typed errors, never a panic or a silent default.

use std::time::Duration;

use portcullis_layers::token_bucket::{KeyLimits, Rate, TokenBucketConfig};
use portcullis_redis::{Error, FailurePolicy, RedisConfig, RedisStore};

#[test]
fn defaults_and_serde() {
    let cfg: RedisConfig = serde_json::from_str(r#"{"url": "redis://127.0.0.1:6379/"}"#).unwrap();
    assert_eq!(cfg, RedisConfig::new("redis://127.0.0.1:6379/"));
    assert_eq!(cfg.prefix, "portcullis:");
    assert_eq!(cfg.timeout, Duration::from_millis(50));
    assert_eq!(cfg.failure_policy, FailurePolicy::FailOpen);
    assert_eq!(cfg.fail_open_share, 1.0);
    cfg.validate().unwrap();
    let back: RedisConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(back, cfg);
    assert!(serde_json::from_str::<RedisConfig>(r#"{"url": "redis://x", "timeout": 5}"#).is_err());
    assert!(
        serde_json::from_str::<RedisConfig>(r#"{"url": "redis://x", "failure_policy": "maybe"}"#)
            .is_err()
    );
}

#[test]
fn bad_values_are_typed_errors() {
    let base = RedisConfig::new("redis://127.0.0.1:6379/");
    assert!(matches!(
        RedisConfig::new("http://nope").validate(),
        Err(Error::InvalidUrl(_))
    ));
    assert!(matches!(
        base.clone().timeout(Duration::ZERO).validate(),
        Err(Error::Config(e)) if e.field == "timeout_ms"
    ));
    assert!(matches!(
        base.clone()
            .retry_interval(Duration::from_secs(7200))
            .validate(),
        Err(Error::Config(e)) if e.field == "retry_interval_ms"
    ));
    for share in [0.0, -1.0, 1.5, f64::NAN] {
        assert!(matches!(
            base.clone().fail_open_share(share).validate(),
            Err(Error::Config(e)) if e.field == "fail_open_share"
        ));
    }
}

#[test]
fn building_outside_a_runtime_or_with_bad_limits_is_an_error() {
    let ok = TokenBucketConfig::new();
    let redis = RedisConfig::new("redis://127.0.0.1:6379/");
    assert!(matches!(
        RedisStore::<String>::new("t", ok, redis.clone()),
        Err(Error::NoRuntime)
    ));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _g = rt.enter();
    let bad = TokenBucketConfig::new().max_wait(Duration::from_secs(100_000));
    assert!(matches!(
        RedisStore::<String>::new("t", bad, redis.clone()),
        Err(Error::Config(_))
    ));
    let good = TokenBucketConfig::new()
        .default_limits(KeyLimits::unlimited().with_requests(Rate::new(1, 1.0).unwrap()));
    RedisStore::<String>::new("t", good, redis).unwrap();
}
