//! Token bucket tests, all in paused time.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis_core::{
    ChatMessage, ChatRequest, ChatStream, CompletionResult, CostOf, ErrorKind, FinishReason,
    LlmError, RateLimitHints, RequestInfo, StreamChunk, StreamMeta, TokenCost, Usage,
};
use portcullis_layers::token_bucket::MemoryStore;
use portcullis_layers::token_bucket::{
    ConfigError, KeyLimits, Rate, TokenBucketConfig, TokenBucketHandle, TokenBucketLayer,
};
use tokio::time::Instant;
use tower::{Layer, Service, ServiceExt};

/// Cost = `max_tokens` output tokens, no prompt (keeps the numbers readable).
#[derive(Clone, Copy)]
struct MaxTokens;
impl CostOf<ChatRequest> for MaxTokens {
    fn cost(&self, r: &ChatRequest) -> TokenCost {
        TokenCost {
            input: 0,
            output: u64::from(r.options.max_tokens),
        }
    }
}

type Layer_ = TokenBucketLayer<portcullis_layers::ByModel, MaxTokens, MemoryStore>;

fn limits(req: (u64, f64), tok: (u64, f64)) -> KeyLimits {
    KeyLimits::unlimited()
        .with_requests(Rate::new(req.0, req.1).unwrap())
        .with_tokens(Rate::new(tok.0, tok.1).unwrap())
}

fn layer(l: KeyLimits, max_wait: Duration) -> Layer_ {
    let cfg = TokenBucketConfig::new()
        .default_limits(l)
        .max_wait(max_wait);
    TokenBucketLayer::new("t", cfg)
        .unwrap()
        .with_cost(MaxTokens)
}

fn req(model: &str, max_tokens: u32) -> ChatRequest {
    ChatRequest::new(model, vec![ChatMessage::user("x")]).max_tokens(max_tokens)
}

type Log = Arc<Mutex<Vec<(Instant, u32)>>>;

/// A provider that logs each call's instant and `max_tokens`, and reports usage = `usage` if
/// set (else exactly the estimate).
fn provider(
    log: Log,
    usage: Arc<AtomicU64>,
) -> impl Service<
    ChatRequest,
    Response = CompletionResult,
    Error = LlmError,
    Future = impl Send + 'static,
> + Clone
+ Send
+ 'static {
    tower::service_fn(move |r: ChatRequest| {
        log.lock()
            .unwrap()
            .push((Instant::now(), r.options.max_tokens));
        let u = match usage.load(Ordering::SeqCst) {
            0 => u64::from(r.options.max_tokens),
            n => n,
        };
        async move { Ok(CompletionResult::new("t", "m", "ok").with_usage(Usage::new(0, u))) }
    })
}

fn tokens(h: &TokenBucketHandle<MemoryStore>, m: &str) -> f64 {
    h.level(m).unwrap().tokens().unwrap()
}

fn requests(h: &TokenBucketHandle<MemoryStore>, m: &str) -> f64 {
    h.level(m).unwrap().requests().unwrap()
}

/// Each call's instant (since `t0`) and `max_tokens`.
fn calls_since(t0: Instant, log: &Log) -> Vec<(Duration, u32)> {
    log.lock()
        .unwrap()
        .iter()
        .map(|(t, n)| (*t - t0, *n))
        .collect()
}

fn since(t0: Instant, log: &Log) -> Vec<Duration> {
    log.lock().unwrap().iter().map(|(t, _)| *t - t0).collect()
}

/// The seed's bug: 100 concurrent callers against a bucket of 10 at 10/s all passed within
/// 0.1 s. Here they pass at exactly the rate.
#[tokio::test(start_paused = true)]
async fn hundred_callers_pass_at_the_rate() {
    let log = Log::default();
    let l = layer(
        limits((10, 10.0), (1_000_000, 1e6)),
        Duration::from_secs(60),
    );
    let svc = l.layer(provider(log.clone(), Arc::default()));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..100 {
        let svc = svc.clone();
        tasks.push(tokio::spawn(svc.oneshot(req("m", 1))));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let times = since(t0, &log);
    assert_eq!(times.len(), 100);
    let early = times
        .iter()
        .filter(|d| **d < Duration::from_millis(100))
        .count();
    assert_eq!(early, 10, "only the burst passes at once");
    let mut sorted = times.clone();
    sorted.sort();
    for (i, t) in sorted.iter().enumerate().skip(10) {
        let expected = Duration::from_millis(100 * (i as u64 - 9));
        assert!(
            *t >= expected && *t <= expected + Duration::from_millis(2),
            "caller {i} admitted at {t:?}, expected {expected:?}"
        );
    }
}

/// A large request that arrives first is served before the small ones behind it.
#[tokio::test(start_paused = true)]
async fn fifo_large_request_is_not_starved() {
    let log = Log::default();
    let l = layer(limits((1000, 1000.0), (100, 10.0)), Duration::from_secs(60));
    let svc = l.layer(provider(log.clone(), Arc::default()));
    svc.clone().oneshot(req("m", 100)).await.unwrap(); // drains the tokens
    let t0 = Instant::now();
    let big = tokio::spawn(svc.clone().oneshot(req("m", 100)));
    let mut smalls = Vec::new();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        smalls.push(tokio::spawn(svc.clone().oneshot(req("m", 1))));
    }
    big.await.unwrap().unwrap();
    for s in smalls {
        s.await.unwrap().unwrap();
    }
    let calls = log.lock().unwrap().clone();
    let big_at = calls.iter().filter(|(_, n)| *n == 100).nth(1).unwrap().0;
    assert_eq!(big_at - t0, Duration::from_secs(10));
    for (t, n) in &calls[1..] {
        if *n == 1 {
            assert!(*t >= big_at, "a small request passed the waiting large one");
        }
    }
}

/// Dropping the latest waiter gives its slot back: the next arrival takes it.
#[tokio::test(start_paused = true)]
async fn dropped_waiter_refunds_and_next_moves_up() {
    let log = Log::default();
    let l = layer(limits((1, 1.0), (1000, 1000.0)), Duration::from_secs(60));
    let h = l.handle();
    let mut svc = l.layer(provider(log.clone(), Arc::default()));
    let t0 = Instant::now();
    svc.ready().await.unwrap().call(req("m", 1)).await.unwrap(); // admitted at 0
    let mut b = tokio_test::task::spawn(svc.ready().await.unwrap().call(req("m", 1))); // slot 1 s
    assert!(b.poll().is_pending());
    let before = requests(&h, "m");
    let mut c = tokio_test::task::spawn(svc.ready().await.unwrap().call(req("m", 1))); // slot 2 s
    assert!(c.poll().is_pending());
    assert!(requests(&h, "m") < before);
    drop(c);
    assert_eq!(requests(&h, "m"), before, "the refund is exact");
    // A new caller gets the dropped one's slot (2 s), not 3 s.
    let d = tokio::spawn(svc.clone().oneshot(req("m", 1)));
    b.await.unwrap();
    d.await.unwrap().unwrap();
    let times = since(t0, &log);
    assert_eq!(
        times,
        vec![
            Duration::ZERO,
            Duration::from_secs(1),
            Duration::from_secs(2)
        ]
    );
}

/// A dropped waiter never reaches the inner service, and the waiter behind it moves up into its
/// slot (without over-admitting: the dropped one was never called).
#[tokio::test(start_paused = true)]
async fn dropped_middle_waiter_is_never_called() {
    let log = Log::default();
    let l = layer(limits((1, 1.0), (1000, 1000.0)), Duration::from_secs(60));
    let mut svc = l.layer(provider(log.clone(), Arc::default()));
    let t0 = Instant::now();
    svc.ready().await.unwrap().call(req("m", 1)).await.unwrap();
    let mut b = tokio_test::task::spawn(svc.ready().await.unwrap().call(req("m", 2)));
    assert!(b.poll().is_pending());
    let c = tokio::spawn(svc.clone().oneshot(req("m", 3)));
    tokio::task::yield_now().await;
    drop(b);
    c.await.unwrap().unwrap();
    let d = tokio::spawn(svc.clone().oneshot(req("m", 4)));
    d.await.unwrap().unwrap();
    let calls = calls_since(t0, &log);
    assert_eq!(
        calls,
        vec![
            (Duration::ZERO, 1),
            (Duration::from_secs(1), 3),
            (Duration::from_secs(2), 4)
        ]
    );
}

/// A response future dropped before its first poll gives its reservation back (the service
/// reserves when called): the next caller gets the dropped one's slot.
#[tokio::test(start_paused = true)]
async fn a_future_dropped_before_its_first_poll_gives_its_slot_back() {
    let log = Log::default();
    let l = layer(limits((1, 1.0), (1000, 1000.0)), Duration::from_secs(60));
    let h = l.handle();
    let mut svc = l.layer(provider(log.clone(), Arc::default()));
    let t0 = Instant::now();
    svc.ready().await.unwrap().call(req("m", 1)).await.unwrap();
    let before = (requests(&h, "m"), tokens(&h, "m"));
    drop(svc.ready().await.unwrap().call(req("m", 2)));
    assert_eq!((requests(&h, "m"), tokens(&h, "m")), before);
    svc.ready().await.unwrap().call(req("m", 3)).await.unwrap();
    let calls = calls_since(t0, &log);
    assert_eq!(
        calls,
        vec![(Duration::ZERO, 1), (Duration::from_secs(1), 3)]
    );
}

/// A thousand waiters on 1 request/s, dropped in a random order: the key is back where it was
/// (to the nanosecond), and the next caller waits one second, not a thousand.
#[tokio::test(start_paused = true)]
async fn levels_count_the_reservations_not_yet_settled() {
    let l = layer(limits((1, 1.0), (1000, 1000.0)), Duration::from_secs(60));
    let h = l.handle();
    let svc = l.layer(provider(Log::default(), Arc::new(AtomicU64::new(0))));
    // One admitted at once, two queued behind it.
    let mut calls: Vec<_> = (0..3)
        .map(|_| tokio_test::task::spawn(svc.clone().oneshot(req("m", 1))))
        .collect();
    for c in &mut calls {
        let _ = c.poll();
    }
    assert_eq!(
        h.level("m").unwrap().reservations,
        2,
        "the two still queued"
    );
    drop(calls);
    assert_eq!(h.level("m").unwrap().reservations, 0);
}

#[tokio::test(start_paused = true)]
async fn a_thousand_waiters_dropped_in_random_order_give_everything_back() {
    use rand::seq::SliceRandom;
    use rand::{SeedableRng, rngs::SmallRng};
    let log = Log::default();
    let l = layer(
        limits((1, 1.0), (100_000, 100_000.0)),
        Duration::from_secs(3600),
    );
    let h = l.handle();
    let mut svc = l.layer(provider(log.clone(), Arc::default()));
    let t0 = Instant::now();
    svc.ready().await.unwrap().call(req("m", 1)).await.unwrap();
    let before = h.level("m").unwrap();
    let mut queued: Vec<_> = (0..1000)
        .map(|i| tokio_test::task::spawn(svc.clone().oneshot(req("m", 1 + i % 50))))
        .collect();
    for q in &mut queued {
        assert!(q.poll().is_pending());
    }
    assert_eq!(requests(&h, "m"), -1000.0);
    for seed in [1, 2, 3] {
        queued.shuffle(&mut SmallRng::seed_from_u64(seed));
        // A third at a time, polling the ones left in between (they may move up).
        let rest = queued.split_off(queued.len() / 3);
        drop(std::mem::replace(&mut queued, rest));
        for q in &mut queued {
            assert!(q.poll().is_pending());
        }
    }
    drop(queued);
    assert_eq!(h.level("m").unwrap(), before);
    svc.ready().await.unwrap().call(req("m", 7)).await.unwrap();
    let calls = calls_since(t0, &log);
    assert_eq!(
        calls,
        vec![(Duration::ZERO, 1), (Duration::from_secs(1), 7)]
    );
}

/// A whole queue dropped in any order gives every reservation back.
#[tokio::test(start_paused = true)]
async fn a_queue_dropped_in_any_order_is_refunded_in_full() {
    for order in [
        [0, 1, 2, 3, 4],
        [4, 3, 2, 1, 0],
        [1, 3, 0, 4, 2],
        [2, 0, 4, 1, 3],
    ] {
        let l = layer(limits((3, 1.0), (1000, 1000.0)), Duration::from_secs(60));
        let h = l.handle();
        let mut svc = l.layer(provider(Log::default(), Arc::default()));
        for _ in 0..3 {
            svc.ready().await.unwrap().call(req("m", 1)).await.unwrap();
        }
        let mut queued: Vec<_> = (0..5)
            .map(|_| Some(tokio_test::task::spawn(svc.clone().oneshot(req("m", 1)))))
            .collect();
        for q in queued.iter_mut().flatten() {
            assert!(q.poll().is_pending());
        }
        assert_eq!(requests(&h, "m"), -5.0);
        for i in order {
            queued[i] = None;
        }
        assert_eq!(requests(&h, "m"), 0.0, "order {order:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn over_capacity_fails_fast_and_consumes_nothing() {
    let l = layer(limits((5, 1.0), (100, 1.0)), Duration::from_secs(60));
    let h = l.handle();
    let mut svc = l.layer(provider(Log::default(), Arc::default()));
    svc.ready().await.unwrap().call(req("m", 10)).await.unwrap();
    let (r0, t0) = (requests(&h, "m"), tokens(&h, "m"));
    let start = Instant::now();
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(req("m", 101))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Throttled);
    assert!(err.to_string().contains("101"), "{err}");
    assert_eq!(Instant::now(), start);
    assert_eq!((requests(&h, "m"), tokens(&h, "m")), (r0, t0));
}

#[tokio::test(start_paused = true)]
async fn long_wait_and_deadline_fail_fast_and_consume_nothing() {
    let l = layer(limits((100, 100.0), (100, 10.0)), Duration::from_secs(2));
    let h = l.handle();
    let mut svc = l.layer(provider(Log::default(), Arc::default()));
    svc.ready()
        .await
        .unwrap()
        .call(req("m", 100))
        .await
        .unwrap(); // empty: 10 s to refill
    let (r0, t0) = (requests(&h, "m"), tokens(&h, "m"));
    let start = Instant::now();
    // 5 s of waiting > max_wait 2 s.
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(req("m", 50))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Throttled);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(5)));
    assert_eq!(Instant::now(), start);
    // 1 s of waiting, within max_wait, but beyond the deadline.
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(req("m", 10).with_deadline(start + Duration::from_millis(500)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Throttled);
    assert_eq!(err.retry_after(), Some(Duration::from_secs(1)));
    assert_eq!(Instant::now(), start);
    assert_eq!((requests(&h, "m"), tokens(&h, "m")), (r0, t0));
    // Within both: admitted after the wait.
    svc.ready()
        .await
        .unwrap()
        .call(req("m", 10).with_deadline(start + Duration::from_secs(2)))
        .await
        .unwrap();
    assert_eq!(Instant::now() - start, Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn reconciliation_refunds_and_charges_overrun() {
    let usage = Arc::new(AtomicU64::new(0));
    let l = layer(limits((100, 1e-3), (1000, 1e-3)), Duration::from_secs(1));
    let h = l.handle();
    let mut svc = l.layer(provider(Log::default(), usage.clone()));
    usage.store(100, Ordering::SeqCst);
    svc.ready()
        .await
        .unwrap()
        .call(req("m", 500))
        .await
        .unwrap();
    assert!(
        (tokens(&h, "m") - 900.0).abs() < 0.01,
        "{}",
        tokens(&h, "m")
    );
    usage.store(300, Ordering::SeqCst);
    svc.ready()
        .await
        .unwrap()
        .call(req("m", 100))
        .await
        .unwrap();
    assert!(
        (tokens(&h, "m") - 600.0).abs() < 0.01,
        "{}",
        tokens(&h, "m")
    );
}

#[tokio::test(start_paused = true)]
async fn stream_reconciles_at_its_end() {
    use futures_util::StreamExt;
    let l = layer(limits((100, 1e-3), (1000, 1e-3)), Duration::from_secs(1));
    let h = l.handle();
    let inner = tower::service_fn(|_r: ChatRequest| async {
        Ok::<_, LlmError>(ChatStream::from_chunks(
            StreamMeta::new("t", "m"),
            vec![
                Ok(StreamChunk::delta("hi")),
                Ok(StreamChunk::finish(
                    FinishReason::Stop,
                    Some(Usage::new(0, 40)),
                )),
            ],
        ))
    });
    let mut svc = l.layer(inner);
    let mut stream = svc
        .ready()
        .await
        .unwrap()
        .call(req("m", 500))
        .await
        .unwrap();
    assert!(
        (tokens(&h, "m") - 500.0).abs() < 0.01,
        "estimate held while streaming"
    );
    while stream.next().await.is_some() {}
    assert!(
        (tokens(&h, "m") - 960.0).abs() < 0.01,
        "{}",
        tokens(&h, "m")
    );
}

#[tokio::test(start_paused = true)]
async fn rate_limited_error_pauses_the_key() {
    let l = layer(
        limits((100, 100.0), (1000, 1000.0)),
        Duration::from_secs(10),
    );
    let fail = Arc::new(AtomicU64::new(1));
    let log = Log::default();
    let (f, lg) = (fail.clone(), log.clone());
    let inner = tower::service_fn(move |r: ChatRequest| {
        lg.lock()
            .unwrap()
            .push((Instant::now(), r.options.max_tokens));
        let failing = f.swap(0, Ordering::SeqCst) == 1;
        async move {
            if failing {
                Err(LlmError::new(ErrorKind::RateLimited, "slow down")
                    .with_status(429)
                    .with_retry_after(Duration::from_secs(5)))
            } else {
                Ok(CompletionResult::new("t", "m", "ok"))
            }
        }
    });
    let mut svc = l.layer(inner);
    let t0 = Instant::now();
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(req("m", 1))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RateLimited);
    // The other model is not paused.
    svc.ready()
        .await
        .unwrap()
        .call(req("other", 1))
        .await
        .unwrap();
    assert_eq!(Instant::now(), t0);
    svc.ready().await.unwrap().call(req("m", 1)).await.unwrap();
    assert_eq!(Instant::now() - t0, Duration::from_secs(5));
}

#[tokio::test(start_paused = true)]
async fn pause_longer_than_max_wait_is_throttled() {
    let l = layer(limits((100, 100.0), (1000, 1000.0)), Duration::from_secs(1));
    let h = l.handle();
    let mut svc = l.layer(provider(Log::default(), Arc::default()));
    h.pause("m", Duration::from_secs(30));
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(req("m", 1))
        .await
        .unwrap_err();
    assert_eq!(err.retry_after(), Some(Duration::from_secs(30)));
}

#[tokio::test(start_paused = true)]
async fn remaining_headers_clamp_down_never_up() {
    let l = layer(limits((100, 1e-3), (1000, 1e-3)), Duration::from_secs(1));
    let h = l.handle();
    let remaining = Arc::new(AtomicU64::new(10));
    let r2 = remaining.clone();
    let inner = tower::service_fn(move |_r: ChatRequest| {
        let mut hints = RateLimitHints::default();
        hints.tokens.remaining = Some(r2.load(Ordering::SeqCst));
        let mut res = CompletionResult::new("t", "m", "ok").with_usage(Usage::new(0, 1));
        res.rate_limits = Some(Box::new(hints));
        async move { Ok::<_, LlmError>(res) }
    });
    let mut svc = l.layer(inner);
    svc.ready().await.unwrap().call(req("m", 1)).await.unwrap();
    assert!(tokens(&h, "m") <= 10.01, "{}", tokens(&h, "m"));
    remaining.store(900, Ordering::SeqCst);
    let before = tokens(&h, "m");
    svc.ready().await.unwrap().call(req("m", 0)).await.unwrap();
    assert!(tokens(&h, "m") <= before, "a header never raises the level");
}

/// A provider that states `rpm` (an `AtomicU64`, changeable) as its requests limit.
fn stating(
    rpm: Arc<AtomicU64>,
) -> impl Service<
    ChatRequest,
    Response = CompletionResult,
    Error = LlmError,
    Future = impl Send + 'static,
> + Clone {
    tower::service_fn(move |_r: ChatRequest| {
        let mut hints = RateLimitHints::default();
        hints.requests.limit = Some(rpm.load(Ordering::SeqCst));
        let mut res = CompletionResult::new("t", "m", "ok").with_usage(Usage::new(0, 1));
        res.rate_limits = Some(Box::new(hints));
        async move { Ok::<_, LlmError>(res) }
    })
}

#[tokio::test(start_paused = true)]
async fn an_unconfigured_key_learns_and_follows_its_providers_limits() {
    let l = TokenBucketLayer::new("t", TokenBucketConfig::new())
        .unwrap()
        .with_cost(MaxTokens);
    let h = l.handle();
    let rpm = Arc::new(AtomicU64::new(60));
    let mut svc = l.layer(stating(rpm.clone()));
    svc.ready().await.unwrap().call(req("m", 1)).await.unwrap();
    let learned = h.level("m").unwrap().limits;
    assert_eq!(learned.requests, Some(Rate::per_minute(60).unwrap()));
    assert_eq!(learned.tokens, None, "only what is stated");
    // The bucket starts full when learned (the headers' `remaining`, when stated, clamps it;
    // here none is): 60 more go at once, the next waits 1 s.
    for _ in 0..60 {
        svc.ready().await.unwrap().call(req("m", 1)).await.unwrap();
    }
    let t0 = Instant::now();
    svc.ready().await.unwrap().call(req("m", 1)).await.unwrap();
    assert!(
        t0.elapsed() >= Duration::from_millis(990),
        "{:?}",
        t0.elapsed()
    );
    // The provider raises its limit: the key follows.
    rpm.store(600, Ordering::SeqCst);
    svc.ready().await.unwrap().call(req("m", 1)).await.unwrap();
    let limits = h.level("m").unwrap().limits;
    assert_eq!(limits.requests, Some(Rate::per_minute(600).unwrap()));
}

#[tokio::test(start_paused = true)]
async fn configured_and_learned_limits_combine_by_the_lower() {
    let configured = KeyLimits::unlimited().with_requests(Rate::per_minute(100).unwrap());
    let cfg = TokenBucketConfig::new().default_limits(configured);
    let l = TokenBucketLayer::new("t", cfg)
        .unwrap()
        .with_cost(MaxTokens);
    let h = l.handle();
    let rpm = Arc::new(AtomicU64::new(60));
    let mut svc = l.layer(stating(rpm.clone()));
    svc.ready().await.unwrap().call(req("m", 1)).await.unwrap();
    assert_eq!(
        h.level("m").unwrap().limits.requests,
        Some(Rate::per_minute(60).unwrap())
    );
    // Stated above the configured limit: the configured one holds.
    rpm.store(1000, Ordering::SeqCst);
    svc.ready().await.unwrap().call(req("m", 1)).await.unwrap();
    assert_eq!(
        h.level("m").unwrap().limits.requests,
        Some(Rate::per_minute(100).unwrap())
    );

    // Learning off: the headers change nothing.
    let cfg = TokenBucketConfig::new().learn_limits(false);
    let l = TokenBucketLayer::new("t", cfg)
        .unwrap()
        .with_cost(MaxTokens);
    let h = l.handle();
    let mut svc = l.layer(stating(rpm));
    svc.ready().await.unwrap().call(req("m", 1)).await.unwrap();
    assert_eq!(h.level("m").unwrap().limits, KeyLimits::unlimited());
}

#[tokio::test(start_paused = true)]
async fn limits_change_at_run_time_keeping_waiters() {
    let log = Log::default();
    let l = layer(limits((1, 1.0), (1000, 1000.0)), Duration::from_secs(60));
    let h = l.handle();
    let mut svc = l.layer(provider(log.clone(), Arc::default()));
    let t0 = Instant::now();
    svc.ready().await.unwrap().call(req("m", 1)).await.unwrap();
    let b = tokio::spawn(svc.clone().oneshot(req("m", 2))); // slot 1 s
    tokio::task::yield_now().await;
    h.set_limits("m", limits((10, 10.0), (1000, 1000.0)))
        .unwrap();
    assert_eq!(
        h.level("m").unwrap().limits.requests,
        Some(Rate::new(10, 10.0).unwrap())
    );
    let c = tokio::spawn(svc.clone().oneshot(req("m", 3)));
    b.await.unwrap().unwrap();
    c.await.unwrap().unwrap();
    let calls = calls_since(t0, &log);
    // The waiter kept its slot; the next one no longer waits a second more.
    assert_eq!(
        calls,
        vec![
            (Duration::ZERO, 1),
            (Duration::from_secs(1), 2),
            (Duration::from_secs(1), 3)
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn clones_share_state_and_keys_are_isolated() {
    let log = Log::default();
    let l = layer(limits((1, 1.0), (1000, 1000.0)), Duration::from_secs(60));
    let h = l.handle();
    let mut a = l.layer(provider(log.clone(), Arc::default()));
    let mut b = a.clone();
    let mut c = l.layer(provider(log.clone(), Arc::default())); // same layer, another service
    let t0 = Instant::now();
    a.ready().await.unwrap().call(req("m", 1)).await.unwrap();
    c.ready()
        .await
        .unwrap()
        .call(req("other", 1))
        .await
        .unwrap();
    assert_eq!(
        Instant::now(),
        t0,
        "another key is not limited by the first"
    );
    b.ready().await.unwrap().call(req("m", 1)).await.unwrap();
    assert_eq!(
        Instant::now() - t0,
        Duration::from_secs(1),
        "a clone shares the bucket"
    );
    c.ready().await.unwrap().call(req("m", 1)).await.unwrap();
    assert_eq!(
        Instant::now() - t0,
        Duration::from_secs(2),
        "so does a sibling service"
    );
    let labels: Vec<String> = h.levels().into_iter().map(|(k, _)| k).collect();
    assert_eq!(labels, vec!["t:m".to_string(), "t:other".to_string()]);
}

#[tokio::test(start_paused = true)]
async fn polls_inner_ready_before_every_call() {
    use tower_test::mock;
    let l = layer(limits((1, 1.0), (1000, 1000.0)), Duration::from_secs(60));
    let (inner, mut handle) = mock::pair::<ChatRequest, CompletionResult>();
    handle.allow(0);
    let mut svc = l.layer(inner);
    let mut first = tokio_test::task::spawn(svc.ready().await.unwrap().call(req("m", 1)));
    assert!(first.poll().is_pending(), "inner not ready: the call waits");
    handle.allow(1);
    assert!(first.is_woken());
    assert!(first.poll().is_pending());
    let (_r, send) = handle.next_request().await.unwrap();
    send.send_response(CompletionResult::new("t", "m", "ok"));
    assert!(first.poll().is_ready());
    // The second waits for its slot, then for readiness; a mock panics if called unready.
    let mut second = tokio_test::task::spawn(svc.ready().await.unwrap().call(req("m", 1)));
    assert!(second.poll().is_pending());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(second.poll().is_pending());
    handle.allow(1);
    assert!(second.poll().is_pending());
    let (_r, send) = handle.next_request().await.unwrap();
    send.send_response(CompletionResult::new("t", "m", "ok"));
    assert!(second.poll().is_ready());
}

#[tokio::test(start_paused = true)]
async fn single_key_and_unlimited_keys() {
    // A layer keyed by nothing: every model shares one bucket.
    let cfg = TokenBucketConfig::new().default_limits(limits((1, 1.0), (1000, 1000.0)));
    let l = TokenBucketLayer::new("t", cfg)
        .unwrap()
        .single_key()
        .with_cost(MaxTokens);
    let mut svc = l.layer(provider(Log::default(), Arc::default()));
    let t0 = Instant::now();
    svc.ready().await.unwrap().call(req("a", 1)).await.unwrap();
    svc.ready().await.unwrap().call(req("b", 1)).await.unwrap();
    assert_eq!(Instant::now() - t0, Duration::from_secs(1));
    assert_eq!(l.handle().levels()[0].0, "t");
    // No default and no entry: not limited.
    let cfg = TokenBucketConfig::new().limit("t:m", limits((1, 1.0), (1000, 1000.0)));
    let l = TokenBucketLayer::new("t", cfg)
        .unwrap()
        .with_cost(MaxTokens);
    let mut svc = l.layer(provider(Log::default(), Arc::default()));
    for _ in 0..5 {
        svc.ready()
            .await
            .unwrap()
            .call(req("free", 1))
            .await
            .unwrap();
    }
    assert_eq!(Instant::now() - t0, Duration::from_secs(1));
    svc.ready().await.unwrap().call(req("m", 1)).await.unwrap();
    svc.ready().await.unwrap().call(req("m", 1)).await.unwrap();
    assert_eq!(Instant::now() - t0, Duration::from_secs(2));
}

#[test]
fn config_validation() {
    let bad = |json: &str| serde_json::from_str::<TokenBucketConfig>(json).is_err();
    assert!(bad(r#"{"default": {"requests": 0}}"#), "zero per minute");
    assert!(bad(
        r#"{"default": {"tokens": {"capacity": 10, "refill_per_sec": -1}}}"#
    ));
    assert!(
        bad(r#"{"default": {"tokens": {"capacity": 10}}}"#),
        "missing refill"
    );
    assert!(bad(
        r#"{"default": {"tokens": {"capacity": 10, "refill_per_sec": 1, "per_minute": 5}}}"#
    ));
    assert!(bad(r#"{"default": {"rpm": 10}}"#), "unknown field");
    assert!(bad(r#"{"max_wait": 10}"#), "unknown field");
    let field = |e: ConfigError| {
        assert_eq!(e.component, "token bucket");
        e.field.into_owned()
    };
    assert_eq!(field(Rate::new(0, 1.0).unwrap_err()), "capacity");
    for refill in [f64::NAN, 0.0, f64::INFINITY, -1.0] {
        assert_eq!(field(Rate::new(1, refill).unwrap_err()), "refill_per_sec");
    }
    // A rate so slow its refill would overflow the arithmetic is refused when it is built.
    assert_eq!(field(Rate::new(1, 1e-300).unwrap_err()), "refill_per_sec");
    assert!(bad(
        r#"{"default": {"tokens": {"capacity": 1, "refill_per_sec": 1e-300}}}"#
    ));
    let cfg = TokenBucketConfig::new().max_wait(Duration::from_secs(100_000));
    assert_eq!(
        field(TokenBucketLayer::new("t", cfg).unwrap_err()),
        "max_wait_ms"
    );
    let cfg = TokenBucketConfig::new().limit("", KeyLimits::unlimited());
    assert_eq!(field(cfg.validate().unwrap_err()), "limits");
    let ok: TokenBucketConfig = serde_json::from_str(
        r#"{"limits": {"openai:gpt-4o-mini": {"requests": 500, "tokens": 200000},
                       "anthropic:claude-3-haiku": {"requests": 1000, "input_tokens": 100000,
                                                    "output_tokens": {"per_minute": 20000}}}}"#,
    )
    .unwrap();
    ok.validate().unwrap();
    assert_eq!(ok.max_wait, Duration::from_secs(30));
    // Round trip.
    let back: TokenBucketConfig =
        serde_json::from_str(&serde_json::to_string(&ok).unwrap()).unwrap();
    assert_eq!(back, ok);
}

// ---- the invariant, as a property ------------------------------------------------------------

#[derive(Clone, Debug)]
struct Job {
    cost: u64,
    actual: u64,
}
impl RequestInfo for Job {}

#[derive(Clone, Copy)]
struct JobCost;
impl CostOf<Job> for JobCost {
    fn cost(&self, j: &Job) -> TokenCost {
        TokenCost {
            input: j.cost,
            output: 0,
        }
    }
}

#[derive(Clone, Debug)]
struct Arrival {
    gap_ms: u64,
    cost: u64,
    actual_pct: u64,
    cancel_after_ms: Option<u64>,
}

/// Admissions as (instant, effective tokens).
fn simulate(req: Rate, tok: Rate, arrivals: Vec<Arrival>) -> Vec<(Instant, u64)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async move {
        let cfg = TokenBucketConfig::new()
            .default_limits(KeyLimits::unlimited().with_requests(req).with_tokens(tok))
            .max_wait(Duration::from_secs(3600));
        let l = TokenBucketLayer::new("p", cfg)
            .unwrap()
            .single_key()
            .with_cost(JobCost);
        let log: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::default();
        let lg = log.clone();
        let svc = l.layer(tower::service_fn(move |j: Job| {
            let effective = if j.actual == 0 { j.cost } else { j.actual };
            lg.lock().unwrap().push((Instant::now(), effective));
            async move {
                Ok::<_, LlmError>(
                    CompletionResult::new("p", "m", "").with_usage(Usage::new(j.actual, 0)),
                )
            }
        }));
        let mut tasks = Vec::new();
        for a in arrivals {
            tokio::time::sleep(Duration::from_millis(a.gap_ms)).await;
            let job = Job {
                cost: a.cost,
                actual: a.cost * a.actual_pct / 100,
            };
            let fut = svc.clone().oneshot(job);
            tasks.push(tokio::spawn(async move {
                match a.cancel_after_ms {
                    Some(ms) => {
                        tokio::select! {
                            _ = fut => {}
                            _ = tokio::time::sleep(Duration::from_millis(ms)) => {}
                        }
                    }
                    None => {
                        fut.await.unwrap();
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut admitted = log.lock().unwrap();
        std::mem::take(&mut *admitted)
    })
}

fn check_window(admitted: &[(Instant, u64)], rate: Rate, what: &str) -> Result<(), String> {
    // Timers fire on millisecond ticks: an admission may be up to 1 ms after its slot.
    let slack = rate.refill_per_sec() * 0.001 + 1e-6;
    for i in 0..admitted.len() {
        let mut sum = 0u64;
        for j in i..admitted.len() {
            sum += admitted[j].1;
            let span = (admitted[j].0 - admitted[i].0).as_secs_f64();
            let bound = rate.capacity() as f64 + rate.refill_per_sec() * span + slack;
            if sum as f64 > bound {
                return Err(format!(
                    "{what}: {sum} admitted in {span}s > {bound} (from #{i} to #{j})"
                ));
            }
        }
    }
    Ok(())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
    #[test]
    fn admitted_cost_never_exceeds_capacity_plus_rate(
        req_cap in 1u64..5, req_rate in 1u64..20,
        tok_cap in 10u64..200, tok_rate in 5u64..100,
        arrivals in proptest::collection::vec(
            (0u64..300, 0u64..=100, 10u64..=100, proptest::option::weighted(0.2, 0u64..2000)),
            1..40),
    ) {
        let req = Rate::new(req_cap, req_rate as f64 / 2.0).unwrap();
        let tok = Rate::new(tok_cap, tok_rate as f64).unwrap();
        let arrivals: Vec<Arrival> = arrivals.into_iter().map(|(gap_ms, c, pct, cancel)| Arrival {
            gap_ms, cost: c * tok_cap / 100, actual_pct: pct, cancel_after_ms: cancel,
        }).collect();
        let mut admitted = simulate(req, tok, arrivals);
        admitted.sort_by_key(|a| a.0);
        let requests: Vec<(Instant, u64)> = admitted.iter().map(|(t, _)| (*t, 1)).collect();
        if let Err(e) = check_window(&requests, req, "requests") { return Err(proptest::test_runner::TestCaseError::fail(e)); }
        if let Err(e) = check_window(&admitted, tok, "tokens") { return Err(proptest::test_runner::TestCaseError::fail(e)); }
    }
}

/// A pause that starts while a waiter sleeps holds it until the pause ends.
#[tokio::test(start_paused = true)]
async fn pause_holds_sleeping_waiters() {
    let log = Log::default();
    let l = layer(limits((1, 1.0), (1000, 1000.0)), Duration::from_secs(60));
    let h = l.handle();
    let mut svc = l.layer(provider(log.clone(), Arc::default()));
    let t0 = Instant::now();
    svc.ready().await.unwrap().call(req("m", 1)).await.unwrap();
    let b = tokio::spawn(svc.clone().oneshot(req("m", 2))); // slot 1 s
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.pause("m", Duration::from_secs(3));
    b.await.unwrap().unwrap();
    assert_eq!(since(t0, &log)[1], Duration::from_millis(3500));
}

/// Once the inner service was called, dropping the response future keeps the charge: the
/// request reached the provider.
#[tokio::test(start_paused = true)]
async fn dropping_after_the_call_keeps_the_charge() {
    use tower_test::mock;
    let l = layer(limits((10, 1e-3), (1000, 1e-3)), Duration::from_secs(60));
    let h = l.handle();
    let (inner, mut handle) = mock::pair::<ChatRequest, CompletionResult>();
    let mut svc = l.layer(inner);
    let mut fut = tokio_test::task::spawn(svc.ready().await.unwrap().call(req("m", 100)));
    assert!(fut.poll().is_pending());
    let _in_flight = handle.next_request().await.unwrap();
    drop(fut);
    assert!(
        (tokens(&h, "m") - 900.0).abs() < 0.01,
        "{}",
        tokens(&h, "m")
    );
    assert!((requests(&h, "m") - 9.0).abs() < 0.01);
}

/// Issue 19, part 4: a request whose deadline has already passed fails at once, with no
/// upstream call and no charge, through the bucket alone and under the retry layer.
#[tokio::test(start_paused = true)]
async fn a_passed_deadline_is_refused_before_any_charge() {
    use portcullis_layers::retry::{Jitter, RetryLayer, StandardPolicy};

    tokio::time::advance(Duration::from_secs(10)).await;
    let l = layer(limits((10, 1.0), (1000, 10.0)), Duration::from_secs(5));
    let h = l.handle();
    let log = Log::default();
    let mut svc = l.layer(provider(log.clone(), Arc::default()));
    // The key exists, full.
    svc.ready().await.unwrap().call(req("m", 10)).await.unwrap();
    let (r0, t0) = (requests(&h, "m"), tokens(&h, "m"));
    let start = Instant::now();
    let past = start - Duration::from_secs(1);
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(req("m", 10).with_deadline(past))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DeadlineExceeded);
    assert_eq!(log.lock().unwrap().len(), 1, "no upstream call");
    assert_eq!((requests(&h, "m"), tokens(&h, "m")), (r0, t0), "no charge");
    assert_eq!(Instant::now(), start);

    let policy = StandardPolicy::builder()
        .jitter(Jitter::None)
        .no_budget()
        .build()
        .unwrap();
    let retried = RetryLayer::new(policy).layer(svc);
    let err = retried
        .oneshot(req("m", 10).with_deadline(past))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DeadlineExceeded);
    assert_eq!(log.lock().unwrap().len(), 1, "no upstream call");
    assert_eq!((requests(&h, "m"), tokens(&h, "m")), (r0, t0), "no charge");
    assert_eq!(Instant::now(), start);
}

/// A provider that fails its first call with a 429 asking for `retry_after`, then succeeds.
fn rate_limited_once(
    retry_after: Duration,
    log: Log,
) -> impl Service<
    ChatRequest,
    Response = CompletionResult,
    Error = LlmError,
    Future = impl Send + 'static,
> + Clone
+ Send
+ 'static {
    let fail = Arc::new(AtomicU64::new(1));
    tower::service_fn(move |r: ChatRequest| {
        log.lock()
            .unwrap()
            .push((Instant::now(), r.options.max_tokens));
        let failing = fail.swap(0, Ordering::SeqCst) == 1;
        async move {
            if failing {
                Err(LlmError::new(ErrorKind::RateLimited, "slow down")
                    .with_status(429)
                    .with_retry_after(retry_after))
            } else {
                Ok(CompletionResult::new("t", "m", "ok"))
            }
        }
    })
}

/// Issue 19, part 2: a 429 asking for 1e12 s pauses the key for `max_pause` (default 30 s),
/// not a year; the handle shows the pause.
#[tokio::test(start_paused = true)]
async fn a_huge_retry_after_pauses_for_at_most_max_pause() {
    let l = layer(
        limits((100, 100.0), (1000, 1000.0)),
        Duration::from_secs(60),
    );
    let h = l.handle();
    let mut svc = l.layer(rate_limited_once(
        Duration::from_secs(1_000_000_000_000),
        Log::default(),
    ));
    let t0 = Instant::now();
    let err = svc
        .ready()
        .await
        .unwrap()
        .call(req("m", 1))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::RateLimited);
    assert_eq!(h.paused_for("m"), Some(Duration::from_secs(30)));
    svc.ready().await.unwrap().call(req("m", 1)).await.unwrap();
    assert_eq!(Instant::now() - t0, Duration::from_secs(30));
    assert_eq!(h.paused_for("m"), None);
}

/// Issue 19, part 2: `max_pause` is configurable, and clearing a pause through the handle
/// admits the next call at once.
#[tokio::test(start_paused = true)]
async fn a_pause_can_be_read_and_cleared() {
    let cfg = TokenBucketConfig::new()
        .default_limits(limits((100, 100.0), (1000, 1000.0)))
        .max_wait(Duration::from_secs(60))
        .max_pause(Duration::from_secs(10));
    let l = TokenBucketLayer::new("t", cfg)
        .unwrap()
        .with_cost(MaxTokens);
    let h = l.handle();
    let log = Log::default();
    let mut svc = l.layer(rate_limited_once(
        Duration::from_secs(1_000_000_000_000),
        log.clone(),
    ));
    let t0 = Instant::now();
    svc.ready()
        .await
        .unwrap()
        .call(req("m", 1))
        .await
        .unwrap_err();
    assert_eq!(h.paused_for("m"), Some(Duration::from_secs(10)));
    tokio::time::advance(Duration::from_secs(3)).await;
    assert_eq!(h.paused_for("m"), Some(Duration::from_secs(7)));
    h.clear_pause("m");
    assert_eq!(h.paused_for("m"), None);
    svc.ready().await.unwrap().call(req("m", 1)).await.unwrap();
    assert_eq!(Instant::now() - t0, Duration::from_secs(3));
    assert_eq!(log.lock().unwrap().len(), 2);
}

#[test]
fn max_pause_is_read_in_millis_and_bounded() {
    let cfg: TokenBucketConfig = serde_json::from_str(r#"{"max_pause_ms": 5000}"#).unwrap();
    assert_eq!(cfg.max_pause, Duration::from_secs(5));
    let cfg: TokenBucketConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(cfg.max_pause, Duration::from_secs(30));
    let err = TokenBucketConfig::new()
        .max_pause(Duration::from_secs(2 * 24 * 3600))
        .validate()
        .unwrap_err();
    assert_eq!(err.field, "max_pause_ms");
}
