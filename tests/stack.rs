//! The whole Stack against the simulator: outage, rate limit, storm, streams around the commit
//! point, and cancellation. Real sockets on loopback, so real (compressed) time: each scenario
//! lasts a few seconds.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use portcullis::layers::circuit_breaker::{CircuitBreakerConfig, CircuitState};
use portcullis::layers::retry::{BudgetConfig, RetryConfig};
use portcullis::layers::token_bucket::{KeyLimits, Rate, TokenBucketConfig};
use portcullis::providers::{AnthropicProvider, ApiKey, OpenAiProvider};
use portcullis::{ChatMessage, ChatRequest, ErrorKind, ProviderStack, Stack};
use portcullis_sim::{
    Family, FaultKind, FaultRule, Limits, OpenAiLimits, Phase, SimHandle, Simulator,
};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt;

const MODEL: &str = "gpt-4o-mini";

fn key() -> ApiKey {
    ApiKey::new("sk-test").unwrap()
}

fn req(i: u64, max_tokens: u32) -> ChatRequest {
    ChatRequest::new(
        MODEL,
        vec![ChatMessage::user(format!(
            "request {i}: one fact about owls"
        ))],
    )
    .max_tokens(max_tokens)
}

fn openai(sim: &SimHandle) -> ProviderStack {
    let p = OpenAiProvider::builder()
        .base_url(sim.openai_base_url())
        .api_key(key())
        .build()
        .unwrap();
    ProviderStack::openai(p)
        .retry(retry())
        .breaker(breaker())
        .attempt_timeout(Duration::from_millis(400))
}

fn anthropic(sim: &SimHandle) -> ProviderStack {
    let p = AnthropicProvider::builder()
        .base_url(sim.anthropic_base_url())
        .api_key(key())
        .build()
        .unwrap();
    ProviderStack::anthropic(p)
        .model("claude-haiku-4-5")
        .retry(retry())
        .breaker(breaker())
        .attempt_timeout(Duration::from_millis(400))
}

/// The seed's retry, scaled by 1/50.
fn retry() -> RetryConfig {
    RetryConfig {
        base_delay: Duration::from_millis(20),
        max_delay: Duration::from_millis(600),
        retry_after_cap: Duration::from_millis(1200),
        budget: Some(BudgetConfig {
            window: Duration::from_millis(200),
            min_per_sec: 50.0,
            ..BudgetConfig::default()
        }),
        seed: Some(7),
        ..RetryConfig::default()
    }
}

/// The seed's breaker, scaled by 1/50: 5 failures, 1.2 s recovery, 3 probes.
fn breaker() -> CircuitBreakerConfig {
    CircuitBreakerConfig {
        recovery_timeout: Duration::from_millis(1200),
        max_probe_wait: Duration::from_millis(600),
        ..CircuitBreakerConfig::default()
    }
}

struct Outcome {
    sent: Duration,
    done: Duration,
    result: Result<(String, u64), ErrorKind>,
}

/// `rate` requests per second for `secs` through clones of `svc`.
async fn drive<S>(svc: S, rate: f64, secs: f64, max_tokens: u32) -> Vec<Outcome>
where
    S: tower::Service<
            ChatRequest,
            Response = portcullis::CompletionResult,
            Error = portcullis::LlmError,
        > + Clone
        + Send
        + 'static,
    S::Future: Send,
{
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let mut set = JoinSet::new();
    for i in 0..(rate * secs) as u64 {
        tick.tick().await;
        let svc = svc.clone();
        set.spawn(async move {
            let sent = start.elapsed();
            let r = svc.oneshot(req(i, max_tokens)).await;
            Outcome {
                sent,
                done: start.elapsed(),
                result: r
                    .map(|r| (r.provider.to_string(), r.usage.total_tokens))
                    .map_err(|e| e.kind()),
            }
        });
    }
    let mut out = Vec::new();
    while let Some(o) = set.join_next().await {
        out.push(o.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_is_absorbed_by_the_breaker_and_the_fallback() {
    let primary = Simulator::builder().seed(1).start().await.unwrap();
    let secondary = Simulator::builder().seed(1).start().await.unwrap();
    let stack = Stack::builder()
        .deadline(Duration::from_secs(3))
        .provider(openai(&primary))
        .provider(anthropic(&secondary))
        .build()
        .unwrap();
    let events = stack.provider("openai").unwrap().breaker.subscribe();
    // Handles say which model each provider is asked for: their breakers' key.
    assert_eq!(stack.provider("openai").unwrap().model, None);
    assert_eq!(
        stack.provider("anthropic").unwrap().model.as_deref(),
        Some("claude-haiku-4-5")
    );
    let (before, outage) = (Duration::from_millis(400), Duration::from_millis(1500));
    primary
        .set_timeline(vec![
            Phase::new(before.as_secs_f64(), vec![]),
            Phase::new(
                outage.as_secs_f64(),
                vec![FaultRule::status(503).family(Family::Openai)],
            ),
            Phase::forever(vec![]),
        ])
        .unwrap();
    let start = Instant::now();
    let during = async {
        tokio::time::sleep_until(start + before).await;
        let a = primary.stats().requests;
        tokio::time::sleep_until(start + before + outage).await;
        primary.stats().requests - a
    };
    let (outcomes, primary_calls_during_outage) =
        tokio::join!(drive(stack.completions(), 40.0, 3.2, 8), during);

    let failed = outcomes.iter().filter(|o| o.result.is_err()).count();
    assert_eq!(failed, 0, "every request is served by someone");
    // Trip threshold (5) plus the half-open probes (3).
    assert!(
        primary_calls_during_outage <= 8,
        "{primary_calls_during_outage} calls reached the dead primary"
    );
    let failover = outcomes
        .iter()
        .filter(|o| matches!(&o.result, Ok((p, _)) if p == "anthropic"))
        .map(|o| o.done.saturating_sub(before))
        .min()
        .expect("the secondary served");
    assert!(
        failover < Duration::from_secs(1),
        "failover took {failover:?}"
    );
    let recovered = outcomes
        .iter()
        .any(|o| o.sent >= before + outage && matches!(&o.result, Ok((p, _)) if p == "openai"));
    assert!(recovered, "the primary serves again once healthy");
    let mut rx = events;
    let mut opened = 0;
    while let Ok(t) = rx.try_recv() {
        if t.to == CircuitState::Open && t.from == CircuitState::Closed {
            opened += 1;
        }
    }
    assert_eq!(opened, 1, "one trip for one outage");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_is_not_amplified() {
    let sim = Simulator::builder()
        .fault(FaultRule::status(503))
        .start()
        .await
        .unwrap();
    let stack = Stack::builder()
        .deadline(Duration::from_secs(3))
        .provider(openai(&sim))
        .build()
        .unwrap();
    let outcomes = drive(stack.completions(), 50.0, 2.0, 8).await;
    let calls = sim.stats().requests as f64;
    let amplification = calls / outcomes.len() as f64;
    assert!(amplification <= 1.3, "amplification {amplification}");
    assert!(outcomes.iter().all(|o| matches!(
        o.result,
        Err(ErrorKind::Overloaded | ErrorKind::CircuitOpen)
    )));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bucket_keeps_the_stack_under_the_limits() {
    // A "minute" of 1 s: 1200 tokens per second, 300 requests per second.
    let limits = Limits {
        time_scale: 60.0,
        openai: OpenAiLimits {
            rpm: 300,
            tpm: 1200,
        },
        ..Limits::default()
    };
    let sim = Simulator::builder()
        .seed(3)
        .limits(limits)
        .start()
        .await
        .unwrap();
    let safety = 0.97;
    let bucket = TokenBucketConfig::new()
        .limit(
            MODEL,
            KeyLimits::default()
                .with_requests(Rate::new(291, 300.0 * safety).unwrap())
                .with_tokens(Rate::new(1164, 1200.0 * safety).unwrap()),
        )
        .max_wait(Duration::from_millis(800))
        // The simulator's "minute" lasts 1 s: the limits its headers state are per second.
        .learn_window(Duration::from_secs(1));
    let stack = Stack::builder()
        .deadline(Duration::from_secs(3))
        .provider(openai(&sim).limits(bucket))
        .build()
        .unwrap();
    // About 30 tokens a request: 80 requests per second offer twice the token limit.
    let outcomes = drive(stack.completions(), 80.0, 3.0, 8).await;
    assert_eq!(
        sim.stats().status(429),
        0,
        "no 429 ever reaches the caller's provider"
    );
    let (from, to) = (Duration::from_millis(1500), Duration::from_millis(3000));
    let tokens: u64 = outcomes
        .iter()
        .filter(|o| o.done >= from && o.done < to)
        .filter_map(|o| o.result.as_ref().ok().map(|r| r.1))
        .sum();
    let goodput = tokens as f64 / (to - from).as_secs_f64() / 1200.0;
    assert!(goodput >= 0.85, "goodput {goodput}");
    assert!(
        outcomes
            .iter()
            .any(|o| o.result == Err(ErrorKind::Throttled)),
        "the excess is refused locally"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_fail_over_before_the_commit_point_and_never_after() {
    let primary = Simulator::builder().seed(2).start().await.unwrap();
    let secondary = Simulator::builder().seed(2).start().await.unwrap();
    let stack = Stack::builder()
        .deadline(Duration::from_secs(3))
        .provider(openai(&primary))
        .provider(anthropic(&secondary))
        .build()
        .unwrap();

    // Before the first chunk: retried, then served by the secondary.
    primary
        .set_faults(vec![FaultRule::new(FaultKind::ErrorBeforeContent)])
        .unwrap();
    let stream = stack.streams().oneshot(req(1, 32)).await.unwrap();
    assert_eq!(stream.meta().provider, "anthropic");
    let text = stream.collect().await.unwrap();
    assert!(!text.content.is_empty());

    // After the first chunk: the caller sees the error, nothing is retried or failed over.
    primary
        .set_faults(vec![FaultRule::new(FaultKind::ErrorAfterContent)])
        .unwrap();
    primary.reset_stats();
    secondary.reset_stats();
    let mut stream = stack.streams().oneshot(req(2, 32)).await.unwrap();
    assert_eq!(stream.meta().provider, "openai");
    let mut err = None;
    while let Some(item) = stream.next().await {
        if let Err(e) = item {
            err = Some(e);
        }
    }
    assert_eq!(err.map(|e| e.kind()), Some(ErrorKind::StreamInterrupted));
    assert_eq!(primary.stats().requests, 1);
    assert_eq!(secondary.stats().requests, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_requests_hold_no_permit_and_no_reservation() {
    let sim = Simulator::builder().seed(4).start().await.unwrap();
    // A bucket of 3 requests that refills slowly: the 4th and later callers queue.
    let bucket = TokenBucketConfig::new()
        .limit(
            MODEL,
            KeyLimits::default().with_requests(Rate::new(3, 0.5).unwrap()),
        )
        .max_wait(Duration::from_secs(60));
    let stack = Stack::builder()
        .deadline(Duration::from_secs(30))
        .provider(
            openai(&sim)
                .limits(bucket)
                .attempt_timeout(Duration::from_secs(10)),
        )
        .build()
        .unwrap();
    let handles = stack.provider("openai").unwrap().clone();
    let limiter = handles.limiter.clone().unwrap();
    let level = || limiter.level(MODEL).unwrap().levels.requests.unwrap();

    // Three callers hang in the provider, five wait for the bucket; then all are dropped.
    sim.set_faults(vec![FaultRule::new(FaultKind::Hang)])
        .unwrap();
    let mut set = JoinSet::new();
    for i in 0..8 {
        let svc = stack.completions();
        set.spawn(async move { svc.oneshot(req(i, 8)).await });
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(level() < -4.0, "five reservations are queued: {}", level());
    set.abort_all();
    while set.join_next().await.is_some() {}
    // The queued reservations came back; the three that reached the provider stay charged.
    let after = level();
    assert!(
        (-0.5..0.5).contains(&after),
        "level after cancelling: {after}"
    );

    // Breaker: trip it, let it half-open, and drop three hanging probes.
    handles.breaker.force_open(Arc::<str>::from(MODEL));
    handles.breaker.reset(MODEL);
    assert_eq!(handles.breaker.state(MODEL), CircuitState::Closed);
    sim.set_faults(vec![FaultRule::status(503)]).unwrap();
    let no_limits = Stack::builder()
        .deadline(Duration::from_secs(30))
        .provider(openai(&sim).retry(RetryConfig {
            max_retries: 0,
            ..retry()
        }))
        .build()
        .unwrap();
    let breaker = no_limits.provider("openai").unwrap().breaker.clone();
    for i in 0..5 {
        let _ = no_limits.completions().oneshot(req(i, 8)).await;
    }
    assert_eq!(breaker.state(MODEL), CircuitState::Open);
    tokio::time::sleep(Duration::from_millis(1250)).await;
    sim.set_faults(vec![FaultRule::new(FaultKind::Hang)])
        .unwrap();
    let mut probes = JoinSet::new();
    for i in 0..3 {
        let svc = no_limits.completions();
        probes.spawn(async move { svc.oneshot(req(10 + i, 8)).await });
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(breaker.state(MODEL), CircuitState::HalfOpen);
    // A fourth concurrent call is refused: all probe permits are taken.
    let refused = no_limits
        .completions()
        .oneshot(req(20, 8))
        .await
        .unwrap_err();
    assert_eq!(refused.kind(), ErrorKind::CircuitOpen);
    probes.abort_all();
    while probes.join_next().await.is_some() {}
    // Their permits are back: a healthy probe is admitted and closes the breaker with two more.
    sim.clear_faults();
    for i in 0..3 {
        no_limits
            .completions()
            .oneshot(req(30 + i, 8))
            .await
            .unwrap();
    }
    assert_eq!(breaker.state(MODEL), CircuitState::Closed);
}

#[test]
fn stack_config_is_validated() {
    use portcullis::{StackConfig, StackError};
    let bad: StackConfig = serde_json::from_str(
        r#"{"deadline_ms": 1000, "providers": [{"name": "openai", "api": "openai", "attempt_timeout_ms": 5000, "api_key_env": "PORTCULLIS_TEST_UNSET_KEY"}]}"#,
    )
    .unwrap();
    // The key variable is unset: that error comes first.
    assert!(matches!(
        Stack::from_config(&bad),
        Err(StackError::Provider(..))
    ));

    // The failover order: failing over first unless the file says otherwise.
    use portcullis::FailoverPolicy;
    assert_eq!(bad.failover, FailoverPolicy::FailoverFirst);
    let old: StackConfig =
        serde_json::from_str(r#"{"failover": "retry_each_then_fallback", "providers": []}"#)
            .unwrap();
    assert_eq!(old.failover, FailoverPolicy::RetryEachThenFallback);
    assert!(
        serde_json::from_str::<StackConfig>(r#"{"failover": "sideways", "providers": []}"#)
            .is_err()
    );

    let err =
        serde_json::from_str::<StackConfig>(r#"{"providers": [], "dedline_ms": 5}"#).unwrap_err();
    assert!(err.to_string().contains("dedline_ms"), "{err}");
    assert!(matches!(
        Stack::from_config(&StackConfig {
            deadline: Duration::from_secs(1),
            failover: Default::default(),
            providers: vec![],
            pools: Default::default(),
        }),
        Err(StackError::NoProviders)
    ));
}

#[tokio::test]
async fn stack_rejects_inconsistent_timeouts() {
    use portcullis::StackError;
    use portcullis::layers::circuit_breaker::{TripPolicy, Window};
    let sim = Simulator::builder().start().await.unwrap();
    let e = Stack::builder()
        .deadline(Duration::from_secs(1))
        .provider(openai(&sim).attempt_timeout(Duration::from_secs(2)))
        .build()
        .unwrap_err();
    assert!(
        matches!(e, StackError::AttemptTimeoutExceedsDeadline { .. }),
        "{e}"
    );
    assert!(e.to_string().contains("longer than the deadline"));
    let windowed = CircuitBreakerConfig {
        trip: TripPolicy::failure_rate(0.5, Window::Time(Duration::from_secs(1)), 5),
        ..CircuitBreakerConfig::default()
    };
    let e = Stack::builder()
        .provider(
            openai(&sim)
                .attempt_timeout(Duration::from_secs(1))
                .breaker(windowed),
        )
        .build()
        .unwrap_err();
    assert!(matches!(e, StackError::BreakerWindowTooShort { .. }), "{e}");
    // Durations a caller or a file controls are checked when the stack is built, never
    // overflow an `Instant` at run time.
    for e in [
        Stack::builder()
            .deadline(Duration::MAX)
            .provider(openai(&sim))
            .build()
            .unwrap_err(),
        Stack::builder()
            .deadline(Duration::ZERO)
            .provider(openai(&sim))
            .build()
            .unwrap_err(),
    ] {
        assert!(
            matches!(&e, StackError::Config(None, c) if c.field == "deadline_ms"),
            "{e}"
        );
    }
}

/// Issue 21's scenario, on the library's defaults: one OpenAI entry with no limits configured,
/// a provider allowing 60 requests a minute, one warm-up call, then 100 concurrent calls. The
/// bucket learns the limit from the first response's headers and paces the rest: at most 2
/// upstream 429s (there were 70 with no bucket). A 2 s wait for admission is the only setting,
/// to keep the test short: the calls the bucket cannot admit in time are refused locally.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unconfigured_stack_paces_at_the_limits_its_provider_states() {
    let limits = Limits {
        openai: OpenAiLimits {
            rpm: 60,
            tpm: 1_000_000,
        },
        ..Limits::default()
    };
    let sim = Simulator::builder()
        .seed(6)
        .limits(limits)
        .start()
        .await
        .unwrap();
    let p = OpenAiProvider::builder()
        .base_url(sim.openai_base_url())
        .api_key(key())
        .build()
        .unwrap();
    // No limits: only a shorter wait for admission than the default 30 s.
    let bucket = TokenBucketConfig::new().max_wait(Duration::from_secs(2));
    let stack = Stack::builder()
        .provider(ProviderStack::openai(p).limits(bucket))
        .build()
        .unwrap();
    stack.completions().oneshot(req(0, 8)).await.unwrap();
    let limiter = stack.provider("openai").unwrap().limiter.clone().unwrap();
    let learned = limiter.level(MODEL).unwrap().limits;
    assert_eq!(learned.requests, Some(Rate::per_minute(60).unwrap()));

    let mut calls = JoinSet::new();
    for i in 1..=100 {
        let svc = stack.completions();
        calls.spawn(async move { svc.oneshot(req(i, 8)).await.map_err(|e| e.kind()) });
    }
    let outcomes = calls.join_all().await;
    let ok = outcomes.iter().filter(|o| o.is_ok()).count();
    let upstream_429s = sim.stats().status(429);
    eprintln!(
        "learned limits: {ok} of 100 admitted, {upstream_429s} upstream 429s, {} upstream requests",
        sim.stats().requests
    );
    assert!(upstream_429s <= 2, "{upstream_429s} upstream 429s");
    // The 59 left in the first minute, and one or two more as the bucket refills.
    assert!((59..=62).contains(&ok), "{ok} admitted");
    assert!(
        outcomes.iter().all(|o| matches!(
            o,
            Ok(_) | Err(ErrorKind::DeadlineExceeded | ErrorKind::Throttled)
        )),
        "{outcomes:?}"
    );
}

/// The library's defaults on paused time (the simulator's clock is tokio's): a dead primary's
/// first call is answered by the fallback at once, for 503, 529 and 429 with any Retry-After;
/// the old order stays available and waits out the primary's retries.
#[tokio::test(start_paused = true)]
async fn the_default_stack_fails_over_first() {
    use portcullis::FailoverPolicy;
    let faults = [
        FaultRule::status(503),
        FaultRule::new(FaultKind::Overloaded),
        FaultRule::new(FaultKind::RateLimit).retry_after_secs(1),
        FaultRule::new(FaultKind::RateLimit).retry_after_secs(20),
        FaultRule::new(FaultKind::RateLimit).retry_after_secs(120),
    ];
    for fault in faults {
        for order in [
            FailoverPolicy::FailoverFirst,
            FailoverPolicy::RetryEachThenFallback,
        ] {
            let sim = Simulator::builder()
                .fault(fault.clone().family(Family::Openai))
                .start()
                .await
                .unwrap();
            let openai = OpenAiProvider::builder()
                .base_url(sim.openai_base_url())
                .api_key(key())
                .build()
                .unwrap();
            let anthropic = AnthropicProvider::builder()
                .base_url(sim.anthropic_base_url())
                .api_key(key())
                .build()
                .unwrap();
            let stack = Stack::builder()
                .failover(order)
                .provider(ProviderStack::openai(openai))
                .provider(ProviderStack::anthropic(anthropic).model("claude-haiku-4-5"))
                .build()
                .unwrap();
            let start = Instant::now();
            let res = stack.completions().oneshot(req(0, 20)).await.unwrap();
            assert_eq!(res.provider, "anthropic");
            let took = start.elapsed();
            match order {
                FailoverPolicy::FailoverFirst => {
                    assert!(took <= Duration::from_millis(50), "{fault:?}: {took:?}")
                }
                // A Retry-After above the retry cap (60 s) is not waited on in either order.
                _ if fault.retry_after_secs == Some(120) => assert!(took.is_zero()),
                _ => assert!(took >= Duration::from_millis(500), "{fault:?}: {took:?}"),
            }
            sim.shutdown().await;
        }
    }
}
