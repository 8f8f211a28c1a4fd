//! Pools through the whole `Stack`, against simulators (one per deployment, each with its own
//! state): load spread by headroom, a failing deployment's calls taken by its sibling at once,
//! the group after a pool taken when the whole pool is down, and the configuration's rules.

mod common;

use common::key;

use std::time::Duration;

use portcullis::layers::pool::{PoolConfig, Strategy};
use portcullis::layers::retry::RetryConfig;
use portcullis::layers::token_bucket::{KeyLimits, TokenBucketConfig};
use portcullis::providers::{AnthropicProvider, OpenAiProvider};
use portcullis::{
    ChatMessage, ChatRequest, FailoverPolicy, ProviderStack, Stack, StackConfig, StackError,
};
use portcullis_sim::{FaultRule, SimHandle, Simulator};
use tower::ServiceExt;

fn retry() -> RetryConfig {
    common::fast_retry(2)
}

fn long_retry() -> RetryConfig {
    RetryConfig {
        base_delay: Duration::from_secs(30),
        max_delay: Duration::from_secs(30),
        ..retry()
    }
}

fn deployment(name: &'static str, sim: &SimHandle, tpm: u64) -> ProviderStack {
    let p = OpenAiProvider::builder()
        .base_url(sim.openai_base_url())
        .api_key(key())
        .build()
        .unwrap();
    let limits = KeyLimits::rpm_tpm(10_000, tpm).unwrap();
    ProviderStack::openai(p)
        .name(name)
        .retry(retry())
        .limits(TokenBucketConfig::new().default_limits(limits))
}

fn req() -> ChatRequest {
    ChatRequest::new("gpt-4o-mini", vec![ChatMessage::user("Hello there")]).max_tokens(50)
}

async fn sims(n: usize) -> Vec<SimHandle> {
    let mut v = Vec::new();
    for _ in 0..n {
        v.push(Simulator::builder().start().await.unwrap());
    }
    v
}

/// A stack whose one entry is the pool "gpt" of `deployments`.
fn pooled(config: PoolConfig, deployments: Vec<ProviderStack>) -> Stack {
    Stack::builder()
        .pool("gpt", config, deployments)
        .build()
        .unwrap()
}

fn served(stack: &Stack, pool: &str) -> Vec<u64> {
    let status = stack.pool(pool).unwrap().status(&req());
    status.iter().map(|d| d.finished).collect()
}

#[tokio::test]
async fn most_headroom_spreads_calls_in_proportion_to_the_limits() {
    let s = sims(2).await;
    let stack = pooled(
        PoolConfig::default(),
        vec![
            deployment("big", &s[0], 300_000),
            deployment("small", &s[1], 100_000),
        ],
    );
    for _ in 0..80 {
        stack.completions().oneshot(req()).await.unwrap();
    }
    let n = served(&stack, "gpt");
    assert_eq!(n.iter().sum::<u64>(), 80);
    // 3:1 limits: the big deployment takes about three quarters.
    assert!((55..=65).contains(&n[0]), "served {n:?}");
    assert_eq!(s[0].stats().requests, n[0]);
    assert_eq!(s[1].stats().requests, n[1]);
}

#[tokio::test]
async fn a_failing_deployment_fails_over_to_its_sibling_before_any_backoff() {
    let s = sims(2).await;
    s[0].set_faults(vec![FaultRule::status(503)]).unwrap();
    let config = PoolConfig {
        strategy: Strategy::RoundRobin,
        ..PoolConfig::default()
    };
    let slow_retry = long_retry();
    let stack = pooled(
        config,
        vec![
            deployment("down", &s[0], 1_000_000).retry(slow_retry.clone()),
            deployment("up", &s[1], 1_000_000).retry(slow_retry),
        ],
    );
    let started = std::time::Instant::now();
    for _ in 0..10 {
        stack.completions().oneshot(req()).await.unwrap();
    }
    // A 30 s backoff was never slept: every failure went to the sibling at once.
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(served(&stack, "gpt")[1], 10);
    assert!(s[0].stats().requests >= 1);
}

#[tokio::test]
async fn the_group_after_a_pool_takes_calls_when_the_whole_pool_is_down() {
    let s = sims(3).await;
    s[0].set_faults(vec![FaultRule::status(503)]).unwrap();
    s[1].set_faults(vec![FaultRule::status(503)]).unwrap();
    let anthropic = AnthropicProvider::builder()
        .base_url(s[2].anthropic_base_url())
        .api_key(key())
        .build()
        .unwrap();
    let stack = Stack::builder()
        .pool(
            "gpt",
            PoolConfig::default(),
            // A long backoff: a failed deployment's retry is never due before the next
            // group is tried (with a short one, a slow machine may retry `a` first, which the
            // failover rule allows: it can take the call by then).
            vec![
                deployment("a", &s[0], 1_000_000).retry(long_retry()),
                deployment("b", &s[1], 1_000_000).retry(long_retry()),
            ],
        )
        .provider(
            ProviderStack::anthropic(anthropic)
                .model("claude-haiku-4-5")
                .retry(retry()),
        )
        .build()
        .unwrap();
    let res = stack.completions().oneshot(req()).await.unwrap();
    assert_eq!(res.provider, "anthropic");
    // Both deployments were tried first, once each.
    assert_eq!(s[0].stats().requests, 1);
    assert_eq!(s[1].stats().requests, 1);
    assert_eq!(stack.handles().len(), 3);
    let status = stack.pool("gpt").unwrap().status(&req());
    assert_eq!(status.iter().map(|d| d.in_flight).sum::<usize>(), 0);
}

#[tokio::test]
async fn streams_go_through_the_pool_too() {
    let s = sims(2).await;
    s[0].set_faults(vec![FaultRule::status(503)]).unwrap();
    let two = vec![
        deployment("a", &s[0], 1_000_000),
        deployment("b", &s[1], 1_000_000),
    ];
    let stack = pooled(PoolConfig::default(), two);
    for _ in 0..4 {
        let stream = stack.streams().oneshot(req()).await.unwrap();
        let res = stream.collect().await.unwrap();
        assert!(!res.content.is_empty());
    }
    assert_eq!(s[1].stats().requests, 4);
}

#[test]
fn configuration_groups_consecutive_providers_into_pools() {
    let json = |providers: &str, pools: &str| {
        format!(r#"{{"providers": [{providers}], "pools": {{{pools}}}}}"#)
    };
    let p = |name: &str, pool: &str| {
        format!(
            r#"{{"name": "{name}", "api": "openai", "api_key_env": "PORTCULLIS_TEST_NO_SUCH_KEY_{name}", "pool": "{pool}"}}"#
        )
    };
    let c: StackConfig = serde_json::from_str(&json(
        &format!("{}, {}", p("a", "gpt"), p("b", "gpt")),
        r#""gpt": {"strategy": "weighted", "seed": 3}"#,
    ))
    .unwrap();
    assert_eq!(c.pools["gpt"].strategy, Strategy::Weighted);
    assert_eq!(c.providers[1].pool.as_deref(), Some("gpt"));
    assert_eq!(c.providers[1].weight, 1);

    // Members of one pool must be consecutive.
    let plain = r#"{"name": "x", "api": "anthropic"}"#;
    let c: StackConfig = serde_json::from_str(&json(
        &format!("{}, {plain}, {}", p("a", "gpt"), p("b", "gpt")),
        "",
    ))
    .unwrap();
    // (The keys are read first: set none, so the error is the grouping's, found before.)
    let err = Stack::from_config(&c).unwrap_err();
    assert!(
        matches!(&err, StackError::Config(Some(n), _) if n == "gpt")
            || matches!(&err, StackError::Provider(..)),
        "{err}"
    );

    // Settings for a pool no provider is in.
    let c: StackConfig = serde_json::from_str(&json(plain, r#""nope": {}"#)).unwrap();
    assert!(Stack::from_config(&c).is_err());

    // Unknown fields are refused.
    assert!(
        serde_json::from_str::<StackConfig>(&json(plain, r#""gpt": {"stratgy": "x"}"#)).is_err()
    );
}

#[tokio::test]
async fn a_pool_refuses_the_retry_each_policy_and_an_empty_pool() {
    let s = sims(1).await;
    let err = Stack::builder()
        .failover(FailoverPolicy::RetryEachThenFallback)
        .pool(
            "gpt",
            PoolConfig::default(),
            vec![deployment("a", &s[0], 1_000)],
        )
        .build()
        .unwrap_err();
    assert!(
        matches!(err, StackError::PoolNeedsFailoverFirst(ref n) if n == "gpt"),
        "{err}"
    );
    let err = Stack::builder()
        .provider(deployment("a", &s[0], 1_000))
        .pool("gpt", PoolConfig::default(), vec![])
        .build()
        .unwrap_err();
    assert!(matches!(err, StackError::Pool(..)), "{err}");
}
