//! RetryLayer: attempts, classification, backoff bounds, Retry-After, budget, deadline, the
//! tower contract (readiness before every attempt, cancellation), streams, configuration.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::StreamExt;
use portcullis_core::{
    BoxError, ChatMessage, ChatRequest, ChatStream, CircuitOpen, ErrorKind, LlmError,
    RetriesExhausted, RetryStop, StreamChunk, StreamMeta, Throttled,
};
use portcullis_layers::retry::{
    Attempt, Backoff, BudgetConfig, ConfigError, Decision, Jitter, Policy, ResponseFuture, Retry,
    RetryBudget, RetryConfig, RetryLayer, StandardPolicy,
};
use proptest::prelude::*;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::time::Instant;
use tokio_test::{assert_pending, task};
use tower::{Layer, Service, ServiceExt, service_fn};
use tower_test::mock;

const SEC: Duration = Duration::from_secs(1);

fn err(kind: ErrorKind) -> LlmError {
    LlmError::new(kind, "boom").with_provider("openai")
}

fn wire(status: u16, error_type: Option<&str>) -> LlmError {
    let kind = ErrorKind::from_wire(Some(status), error_type, None);
    let mut e = LlmError::new(kind, "boom").with_status(status);
    if let Some(t) = error_type {
        e = e.with_error_type(t);
    }
    e
}

/// Deterministic policy: no jitter, no budget, 1 s doubling.
fn plain(max_retries: u32) -> StandardPolicy {
    StandardPolicy::builder()
        .max_retries(max_retries)
        .jitter(Jitter::None)
        .no_budget()
        .seed(1)
        .build()
        .unwrap()
}

fn chat() -> ChatRequest {
    ChatRequest::new("gpt-4o-mini", vec![ChatMessage::user("hi")])
}

/// A service that fails every call with `make()`, counting calls.
#[derive(Clone)]
struct Failing<F> {
    calls: Arc<AtomicUsize>,
    make: F,
}

impl<F: Fn() -> LlmError + Clone, Req> Service<Req> for Failing<F> {
    type Response = String;
    type Error = LlmError;
    type Future = std::future::Ready<Result<String, LlmError>>;
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), LlmError>> {
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: Req) -> Self::Future {
        self.calls.fetch_add(1, SeqCst);
        std::future::ready(Err((self.make)()))
    }
}

fn failing<F: Fn() -> LlmError + Clone>(make: F) -> (Failing<F>, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    (
        Failing {
            calls: calls.clone(),
            make,
        },
        calls,
    )
}

// ---- attempts -----------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn makes_exactly_max_retries_plus_one_calls_with_doubling_delays() {
    let (svc, mut handle) = mock::pair::<String, String>();
    let svc = RetryLayer::new(plain(3)).layer(svc);
    let start = Instant::now();
    let call = tokio::spawn(svc.oneshot("hi".to_string()));
    let mut at = Vec::new();
    for _ in 0..4 {
        let (req, send) = handle.next_request().await.unwrap();
        assert_eq!(req, "hi");
        at.push(start.elapsed());
        send.send_error(err(ErrorKind::Server));
    }
    let e = call.await.unwrap().unwrap_err();
    // No fifth call: every clone of the mock is gone.
    assert!(handle.next_request().await.is_none());
    assert_eq!(at, [Duration::ZERO, SEC, 3 * SEC, 7 * SEC]);
    let e = e.downcast::<RetriesExhausted<BoxError>>().unwrap();
    assert_eq!((e.attempts, e.stop), (4, RetryStop::Exhausted));
    assert_eq!(
        e.last.downcast_ref::<LlmError>().unwrap().kind(),
        ErrorKind::Server
    );
}

#[tokio::test(start_paused = true)]
async fn success_after_failures_is_returned() {
    let (svc, mut handle) = mock::pair::<String, String>();
    let svc = Retry::new(plain(3), svc);
    let call = tokio::spawn(svc.oneshot("hi".to_string()));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error(err(ErrorKind::Overloaded));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response("hello".to_string());
    assert_eq!(call.await.unwrap().unwrap(), "hello");
}

#[tokio::test(start_paused = true)]
async fn llm_error_keeps_kind_and_records_attempts() {
    let (svc, calls) = failing(|| err(ErrorKind::Overloaded));
    let e = Retry::new(plain(2), svc).oneshot(chat()).await.unwrap_err();
    assert_eq!(calls.load(SeqCst), 3);
    assert_eq!(e.kind(), ErrorKind::Overloaded);
    assert_eq!(e.attempts(), Some(3));
    assert_eq!(e.retry_stop(), Some(RetryStop::Exhausted));
    assert!(e.to_string().contains("after 3 attempts"), "{e}");
}

#[tokio::test(start_paused = true)]
async fn zero_retries_returns_the_error_unchanged() {
    let (svc, calls) = failing(|| err(ErrorKind::Server));
    let e = Retry::new(plain(0), svc).oneshot(chat()).await.unwrap_err();
    assert_eq!(calls.load(SeqCst), 1);
    assert_eq!(e.attempts(), None);
}

// ---- classification -----------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn retries_exactly_the_retryable_rows_of_the_table() {
    type Row = (&'static str, fn() -> LlmError, bool);
    let rows: &[Row] = &[
        (
            "429 rate_limit_exceeded",
            || wire(429, Some("rate_limit_exceeded")),
            true,
        ),
        (
            "429 rate_limit_error",
            || wire(429, Some("rate_limit_error")),
            true,
        ),
        (
            "429 insufficient_quota",
            || wire(429, Some("insufficient_quota")),
            false,
        ),
        (
            "402 billing_error",
            || wire(402, Some("billing_error")),
            false,
        ),
        (
            "529 overloaded_error",
            || wire(529, Some("overloaded_error")),
            true,
        ),
        ("503", || wire(503, None), true),
        ("500", || wire(500, None), true),
        ("502", || wire(502, None), true),
        ("504", || wire(504, None), true),
        (
            "200 then api_error event",
            || err(ErrorKind::from_wire(None, Some("api_error"), None)),
            true,
        ),
        (
            "200 then overloaded event",
            || err(ErrorKind::from_wire(None, Some("overloaded_error"), None)),
            true,
        ),
        ("connect", || err(ErrorKind::Connect), true),
        ("timeout", || err(ErrorKind::Timeout), true),
        ("protocol", || err(ErrorKind::Protocol), true),
        (
            "stream interrupted",
            || err(ErrorKind::StreamInterrupted),
            false,
        ),
        (
            "400 context_length_exceeded",
            || wire(400, Some("context_length_exceeded")),
            false,
        ),
        ("400", || wire(400, Some("invalid_request_error")), false),
        ("401", || wire(401, Some("authentication_error")), false),
        ("403", || wire(403, None), false),
        ("404", || wire(404, Some("not_found_error")), false),
        ("413", || wire(413, None), false),
        ("422", || wire(422, None), false),
        (
            "400 + x-should-retry: true",
            || wire(400, None).with_should_retry(true),
            true,
        ),
        (
            "500 + x-should-retry: false",
            || wire(500, None).with_should_retry(false),
            false,
        ),
        (
            "stream interrupted + x-should-retry: true",
            || err(ErrorKind::StreamInterrupted).with_should_retry(true),
            false,
        ),
        (
            "circuit open",
            || CircuitOpen { retry_after: SEC }.into(),
            false,
        ),
        ("throttled", || Throttled { retry_after: SEC }.into(), false),
    ];
    for &(name, make, retried) in rows {
        let (svc, calls) = failing(make);
        let e = Retry::new(plain(1), svc).oneshot(chat()).await.unwrap_err();
        assert_eq!(calls.load(SeqCst), if retried { 2 } else { 1 }, "{name}");
        // Not retried: returned exactly as the service produced it.
        assert_eq!(e.attempts(), retried.then_some(2), "{name}");
        assert_eq!(e.kind(), make().kind(), "{name}");
    }
}

#[tokio::test(start_paused = true)]
async fn box_error_classifies_by_downcast() {
    let (svc, mut handle) = mock::pair::<String, String>();
    let call = tokio::spawn(Retry::new(plain(3), svc).oneshot("hi".into()));
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error(wire(429, Some("insufficient_quota")));
    let e = call.await.unwrap().unwrap_err();
    let e = e.downcast::<LlmError>().expect("returned unchanged");
    assert_eq!(e.kind(), ErrorKind::QuotaExhausted);
    assert!(handle.next_request().await.is_none());
}

// ---- backoff bounds -----------------------------------------------------------------------

fn jitter_mode() -> impl Strategy<Value = Jitter> {
    prop_oneof![
        Just(Jitter::Full),
        Just(Jitter::Equal),
        Just(Jitter::Decorrelated),
        Just(Jitter::Proportional),
        Just(Jitter::None),
    ]
}

/// `min(max, base · 2^n)`, computed independently of the crate.
fn expected_exp(base: u128, max: u128, n: u32) -> u128 {
    if n >= 100 {
        max
    } else {
        base.saturating_mul(1u128 << n).min(max)
    }
}

proptest! {
    #[test]
    fn every_delay_is_within_its_jitter_bounds(
        seed in any::<u64>(),
        n in prop_oneof![0u32..70, any::<u32>(), Just(u32::MAX)],
        base_ms in 1u64..5_000,
        extra_ms in 0u64..100_000,
        prev_ms in 0u64..200_000,
        jitter in jitter_mode(),
    ) {
        let (base, max) = (Duration::from_millis(base_ms), Duration::from_millis(base_ms + extra_ms));
        let prev = Duration::from_millis(prev_ms);
        let backoff = Backoff::new(base, max, jitter);
        let mut rng = SmallRng::seed_from_u64(seed);
        let got = backoff.delay(n, prev, &mut rng).as_nanos();
        let (b, m) = (base.as_nanos(), max.as_nanos());
        let d = expected_exp(b, m, n);
        let (lo, hi) = match jitter {
            Jitter::None => (d, d),
            Jitter::Full => (0, d),
            Jitter::Equal => (d / 2, d),
            Jitter::Proportional => (d / 2, d * 3 / 2),
            Jitter::Decorrelated => (b, (prev.as_nanos().max(b) * 3).min(m)),
        };
        prop_assert!(lo <= got && got <= hi, "{jitter:?} n={n}: {got} not in [{lo}, {hi}]");
        prop_assert!(got <= m * 3 / 2);
    }

    #[test]
    fn standard_policy_never_overflows_at_any_attempt(
        seed in any::<u64>(),
        number in prop_oneof![1u32..80, any::<u32>(), Just(u32::MAX)],
        jitter in jitter_mode(),
    ) {
        let policy = StandardPolicy::builder()
            .max_retries(u32::MAX)
            .jitter(jitter)
            .no_budget()
            .seed(seed)
            .build()
            .unwrap();
        let e = err(ErrorKind::Server);
        let attempt = Attempt::new(&(), number).with_last_delay(Duration::from_secs(20));
        let decision = Policy::<(), (), LlmError>::decide(&policy, &attempt, Err(&e));
        match decision {
            Decision::Retry(d) => prop_assert!(d <= Duration::from_secs(45), "{d:?}"),
            Decision::GiveUp(RetryStop::Exhausted) => prop_assert_eq!(number, u32::MAX),
            other => prop_assert!(false, "{other:?}"),
        }
    }
}

#[test]
fn seeded_policies_are_deterministic() {
    let delays = |seed| {
        let p = StandardPolicy::builder()
            .max_retries(10)
            .no_budget()
            .seed(seed)
            .build()
            .unwrap();
        let e = err(ErrorKind::Server);
        (1..=10)
            .map(|n| Policy::<(), (), LlmError>::decide(&p, &Attempt::new(&(), n), Err(&e)))
            .collect::<Vec<_>>()
    };
    assert_eq!(delays(9), delays(9));
    assert_ne!(delays(9), delays(10));
}

// ---- Retry-After and the deadline ---------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn retry_after_replaces_the_backoff_with_a_little_jitter() {
    let (svc, mut handle) = mock::pair::<String, String>();
    let call = tokio::spawn(Retry::new(plain(1), svc).oneshot("hi".into()));
    let start = Instant::now();
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error(wire(429, Some("rate_limit_exceeded")).with_retry_after(5 * SEC));
    let (_, send) = handle.next_request().await.unwrap();
    let waited = start.elapsed();
    assert!(
        waited >= 5 * SEC && waited <= 5 * SEC + 5 * SEC / 10,
        "{waited:?}"
    );
    send.send_response("ok".into());
    assert_eq!(call.await.unwrap().unwrap(), "ok");
}

#[tokio::test(start_paused = true)]
async fn retry_after_above_the_cap_returns_at_once() {
    let (svc, calls) = failing(|| wire(429, Some("rate_limit_error")).with_retry_after(61 * SEC));
    let start = Instant::now();
    let e = Retry::new(plain(3), svc).oneshot(chat()).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(calls.load(SeqCst), 1);
    assert_eq!(e.retry_stop(), Some(RetryStop::RetryAfterTooLong));
    assert_eq!(e.attempts(), Some(1));
    assert_eq!(e.kind(), ErrorKind::RateLimited);
}

#[tokio::test(start_paused = true)]
async fn retry_after_past_the_deadline_returns_at_once() {
    let (svc, calls) = failing(|| wire(429, Some("rate_limit_error")).with_retry_after(5 * SEC));
    let start = Instant::now();
    let req = chat().with_deadline(start + 3 * SEC);
    let e = Retry::new(plain(3), svc).oneshot(req).await.unwrap_err();
    assert_eq!(start.elapsed(), Duration::ZERO);
    assert_eq!(calls.load(SeqCst), 1);
    assert_eq!(e.retry_stop(), Some(RetryStop::Deadline));
}

#[tokio::test(start_paused = true)]
async fn no_backoff_sleep_outlives_the_deadline() {
    // Delays 1 s then 2 s: the second would end at 3 s, past the 2.5 s deadline.
    let (svc, calls) = failing(|| err(ErrorKind::Server));
    let start = Instant::now();
    let req = chat().with_deadline(start + 2500 * Duration::from_millis(1));
    let e = Retry::new(plain(3), svc).oneshot(req).await.unwrap_err();
    assert_eq!(start.elapsed(), SEC);
    assert_eq!(calls.load(SeqCst), 2);
    assert_eq!(e.retry_stop(), Some(RetryStop::Deadline));
    assert_eq!(e.attempts(), Some(2));
}

/// A policy that always asks to retry after 10 s: the service itself enforces the deadline.
struct Stubborn;
impl<Req, Res, E> Policy<Req, Res, E> for Stubborn {
    fn decide(&self, _: &Attempt<'_, Req>, _: Result<&Res, &E>) -> Decision {
        Decision::Retry(10 * SEC)
    }
}

#[tokio::test(start_paused = true)]
async fn the_service_enforces_the_deadline_whatever_the_policy() {
    let (svc, calls) = failing(|| err(ErrorKind::Server));
    let start = Instant::now();
    let req = chat().with_deadline(start + 25 * SEC);
    let e = Retry::new(Stubborn, svc).oneshot(req).await.unwrap_err();
    assert_eq!(calls.load(SeqCst), 3);
    assert_eq!(start.elapsed(), 20 * SEC);
    assert_eq!(e.retry_stop(), Some(RetryStop::Deadline));
}

/// Records what the policy is told about each attempt.
#[derive(Default)]
struct Recorder(Mutex<Vec<(u32, Duration, Duration)>>);
impl<Req, Res, E> Policy<Req, Res, E> for Recorder {
    fn decide(&self, a: &Attempt<'_, Req>, outcome: Result<&Res, &E>) -> Decision {
        self.0
            .lock()
            .unwrap()
            .push((a.number, a.elapsed, a.last_delay));
        match outcome {
            Ok(_) => Decision::Accept,
            Err(_) => Decision::Retry(a.last_delay + SEC),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn the_policy_sees_attempt_number_elapsed_time_and_last_delay() {
    let (svc, mut handle) = mock::pair::<String, String>();
    let layer = RetryLayer::new(Recorder::default());
    let call = tokio::spawn(layer.layer(svc).oneshot("hi".into()));
    for _ in 0..2 {
        let (_, send) = handle.next_request().await.unwrap();
        send.send_error("down");
    }
    let (_, send) = handle.next_request().await.unwrap();
    send.send_response("ok".into());
    call.await.unwrap().unwrap();
    let seen = layer.policy().0.lock().unwrap().clone();
    assert_eq!(
        seen,
        [
            (1, Duration::ZERO, Duration::ZERO),
            (2, SEC, SEC),
            (3, 3 * SEC, 2 * SEC)
        ]
    );
}

// ---- budget -------------------------------------------------------------------------------

#[tokio::test(start_paused = true)]
async fn a_failure_storm_stays_within_the_budget() {
    let policy = StandardPolicy::builder()
        .base_delay(Duration::from_millis(10))
        .max_delay(Duration::from_millis(10))
        .jitter(Jitter::None)
        .budget(BudgetConfig {
            retry_ratio: 0.2,
            min_per_sec: 1.0,
            window: Duration::from_millis(10000),
        })
        .seed(3)
        .build()
        .unwrap();
    let (svc, calls) = failing(|| err(ErrorKind::Overloaded));
    let mut svc = Retry::new(policy, svc);
    let start = Instant::now();
    let (requests, mut refused) = (1000u32, 0);
    for i in 0..requests {
        tokio::time::sleep_until(start + Duration::from_millis(100) * i).await;
        let e = ServiceExt::<ChatRequest>::ready(&mut svc)
            .await
            .unwrap()
            .call(chat())
            .await
            .unwrap_err();
        refused += u32::from(e.is_budget_exhausted());
    }
    let secs = start.elapsed().as_secs_f64();
    let retries = calls.load(SeqCst) as f64 - f64::from(requests);
    // Without a budget this storm makes 3000 retries.
    let bound = 0.2 * f64::from(requests) + 1.0 * (secs + 20.0);
    assert!(retries <= bound, "{retries} retries > {bound}");
    assert!(
        retries >= 0.2 * f64::from(requests),
        "{retries}: budget too strict"
    );
    assert!(refused > 500, "{refused}");
}

#[tokio::test(start_paused = true)]
async fn clones_share_the_budget() {
    let policy = StandardPolicy::builder()
        .max_retries(1)
        .jitter(Jitter::None)
        .budget(BudgetConfig {
            retry_ratio: 0.25,
            min_per_sec: 0.0,
            window: Duration::from_millis(10000),
        })
        .build()
        .unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let inner = service_fn(move |req: String| {
        counter.fetch_add(1, SeqCst);
        async move {
            if req == "ok" {
                Ok("fine".to_string())
            } else {
                Err(err(ErrorKind::Server))
            }
        }
    });
    let mut a = Retry::new(policy, inner);
    let mut b = a.clone();
    for _ in 0..4 {
        a.ready().await.unwrap().call("ok".into()).await.unwrap();
    }
    // Four requests through `a` paid for one retry through `b`.
    let e = b
        .ready()
        .await
        .unwrap()
        .call("fail".into())
        .await
        .unwrap_err();
    assert_eq!(e.retry_stop(), Some(RetryStop::Exhausted));
    assert_eq!(calls.load(SeqCst), 6);
    let e = b
        .ready()
        .await
        .unwrap()
        .call("fail".into())
        .await
        .unwrap_err();
    assert!(e.is_budget_exhausted());
    assert_eq!(e.attempts(), Some(1));
    assert_eq!(calls.load(SeqCst), 7);
    assert_eq!(a.policy().budget().unwrap().counts(), (6, 1));
}

#[tokio::test(start_paused = true)]
async fn the_budget_window_slides() {
    let budget = RetryBudget::new(&BudgetConfig {
        retry_ratio: 1.0,
        min_per_sec: 0.0,
        window: Duration::from_millis(10000),
    })
    .unwrap();
    budget.deposit();
    assert!(budget.try_withdraw());
    assert!(!budget.try_withdraw());
    tokio::time::advance(11 * SEC).await;
    assert_eq!(budget.counts(), (0, 0));
    assert!(!budget.try_withdraw());
    budget.deposit();
    assert!(budget.try_withdraw());
}

// ---- the tower contract -------------------------------------------------------------------

/// Panics when `call` is invoked without a preceding `Ready` from `poll_ready`. Every other
/// `poll_ready` returns `Pending` first (and wakes), so the retry future must really wait.
#[derive(Default)]
struct ReadyCheck {
    ready: bool,
    polls: Arc<AtomicUsize>,
    calls: Arc<AtomicUsize>,
}

impl Clone for ReadyCheck {
    fn clone(&self) -> Self {
        ReadyCheck {
            ready: false, // a clone's readiness is its own
            polls: self.polls.clone(),
            calls: self.calls.clone(),
        }
    }
}

impl Service<String> for ReadyCheck {
    type Response = String;
    type Error = LlmError;
    type Future = std::future::Ready<Result<String, LlmError>>;
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), LlmError>> {
        if self.polls.fetch_add(1, SeqCst) % 2 == 0 {
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.ready = true;
        Poll::Ready(Ok(()))
    }
    fn call(&mut self, _: String) -> Self::Future {
        assert!(self.ready, "call without a Ready poll_ready");
        self.ready = false;
        self.calls.fetch_add(1, SeqCst);
        std::future::ready(Err(err(ErrorKind::Server)))
    }
}

#[tokio::test(start_paused = true)]
async fn polls_ready_before_every_attempt() {
    let inner = ReadyCheck::default();
    let (polls, calls) = (inner.polls.clone(), inner.calls.clone());
    let e = Retry::new(plain(3), inner)
        .oneshot("hi".into())
        .await
        .unwrap_err();
    assert_eq!(e.attempts(), Some(4));
    assert_eq!(calls.load(SeqCst), 4);
    assert_eq!(
        polls.load(SeqCst),
        8,
        "one Pending and one Ready per attempt"
    );
}

#[tokio::test(start_paused = true)]
async fn dropping_the_future_mid_backoff_stops_everything() {
    let (svc, mut handle) = mock::pair::<String, String>();
    let mut svc = Retry::new(plain(3), svc);
    svc.ready().await.unwrap();
    let mut fut = task::spawn(svc.call("hi".into()));
    assert_pending!(fut.poll());
    let (_, send) = handle.next_request().await.unwrap();
    send.send_error(err(ErrorKind::Server));
    assert_pending!(fut.poll()); // now sleeping 1 s
    tokio::time::advance(SEC / 2).await;
    assert_pending!(fut.poll());
    drop(fut);
    tokio::time::advance(Duration::from_secs(3600)).await;
    let mut next = task::spawn(handle.next_request());
    assert_pending!(next.poll(), "no call after the drop");
    drop(next);
    drop(svc);
    // No clone of the inner service is left anywhere (no task, no timer).
    assert!(handle.next_request().await.is_none());
}

#[tokio::test(start_paused = true)]
async fn clones_the_request_at_most_once_per_attempt() {
    #[derive(Debug)]
    struct Counted(Arc<AtomicUsize>);
    impl Clone for Counted {
        fn clone(&self) -> Self {
            self.0.fetch_add(1, SeqCst);
            Counted(self.0.clone())
        }
    }
    impl portcullis_core::RequestInfo for Counted {}
    impl portcullis_core::Replay for Counted {
        fn replay(&self) -> Option<Self> {
            Some(self.clone())
        }
    }
    let clones = Arc::new(AtomicUsize::new(0));
    let (svc, calls) = failing(|| err(ErrorKind::Server));
    Retry::new(plain(3), svc)
        .oneshot(Counted(clones.clone()))
        .await
        .unwrap_err();
    assert_eq!(calls.load(SeqCst), 4);
    assert_eq!(clones.load(SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn a_request_that_cannot_be_replayed_is_sent_once() {
    #[derive(Debug)]
    struct Once;
    impl portcullis_core::RequestInfo for Once {}
    impl portcullis_core::Replay for Once {
        fn replay(&self) -> Option<Self> {
            None
        }
    }
    let (svc, calls) = failing(|| err(ErrorKind::Server));
    let e = Retry::new(plain(3), svc).oneshot(Once).await.unwrap_err();
    assert_eq!(calls.load(SeqCst), 1);
    assert_eq!(e.kind(), ErrorKind::Server);
}

// ---- streams ------------------------------------------------------------------------------

fn stream_failing_after_content() -> ChatStream {
    ChatStream::from_chunks(
        StreamMeta::new("anthropic", "claude"),
        vec![
            Ok(StreamChunk::delta("Hel")),
            Err(err(ErrorKind::Overloaded).with_kind(ErrorKind::StreamInterrupted)),
        ],
    )
}

#[tokio::test(start_paused = true)]
async fn nothing_is_retried_after_content_reached_the_caller() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let inner = service_fn(move |_: ChatRequest| {
        let n = counter.fetch_add(1, SeqCst);
        async move {
            if n == 0 {
                // Fails before its commit point: retried.
                Err(err(ErrorKind::Overloaded))
            } else {
                Ok(stream_failing_after_content())
            }
        }
    });
    let mut stream = Retry::new(plain(3), inner).oneshot(chat()).await.unwrap();
    assert_eq!(calls.load(SeqCst), 2);
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.delta, "Hel");
    let e = stream.next().await.unwrap().unwrap_err();
    assert_eq!(e.kind(), ErrorKind::StreamInterrupted);
    assert!(Pin::new(&mut stream).next().await.is_none());
    tokio::time::advance(Duration::from_secs(600)).await;
    assert_eq!(calls.load(SeqCst), 2, "no retry after content");
}

// ---- configuration ------------------------------------------------------------------------

#[test]
fn config_defaults_and_serde() {
    let cfg: RetryConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(cfg, RetryConfig::default());
    let p = cfg.build().unwrap();
    assert_eq!(p.max_retries(), 3);
    assert_eq!(p.backoff().base(), SEC);
    assert_eq!(p.backoff().max(), 30 * SEC);
    assert_eq!(p.backoff().jitter(), Jitter::Full);
    assert!(p.budget().is_some());
    let cfg: RetryConfig =
        serde_json::from_str(r#"{"jitter":"proportional","budget":null,"seed":5}"#).unwrap();
    let p = cfg.build().unwrap();
    assert_eq!(p.backoff().jitter(), Jitter::Proportional);
    assert!(p.budget().is_none());
    assert!(serde_json::from_str::<RetryConfig>(r#"{"max_retry":3}"#).is_err());
    assert!(serde_json::from_str::<RetryConfig>(r#"{"jitter":"lots"}"#).is_err());
}

#[test]
fn config_rejects_bad_values() {
    let bad = |f: fn(&mut RetryConfig)| {
        let mut cfg = RetryConfig::default();
        f(&mut cfg);
        cfg.build().unwrap_err()
    };
    let field = |name| move |e: ConfigError| e.component == "retry" && e.field == name;
    let dur = field;
    // Negative, NaN, infinite and over-a-year durations never get past serde.
    for json in [
        r#"{"base_delay_ms": -1}"#,
        r#"{"max_delay_ms": 1e300}"#,
        r#"{"retry_after_cap_ms": -0.5}"#,
        r#"{"budget": {"window_ms": -1}}"#,
    ] {
        let e = serde_json::from_str::<RetryConfig>(json).unwrap_err();
        assert!(e.to_string().contains("milliseconds"), "{json}: {e}");
    }
    assert!(dur("base_delay_ms")(bad(|c| c.base_delay = Duration::ZERO)));
    assert!(dur("max_delay_ms")(bad(|c| c.max_delay = Duration::MAX)));
    assert!(dur("retry_after_cap_ms")(bad(
        |c| c.retry_after_cap = Duration::ZERO
    )));
    assert!(dur("base_delay_ms")(bad(
        |c| c.base_delay = Duration::from_secs(40)
    )));
    let range = field;
    assert!(range("retry_after_jitter")(bad(
        |c| c.retry_after_jitter = 1.5
    )));
    assert!(range("retry_after_jitter")(bad(
        |c| c.retry_after_jitter = f64::NAN
    )));
    let budget = |b: BudgetConfig| RetryConfig {
        budget: Some(b),
        ..RetryConfig::default()
    };
    let ratio = |r| {
        budget(BudgetConfig {
            retry_ratio: r,
            ..BudgetConfig::default()
        })
    };
    assert!(range("budget.retry_ratio")(
        ratio(-0.1).build().unwrap_err()
    ));
    assert!(range("budget.retry_ratio")(
        ratio(1.01).build().unwrap_err()
    ));
    assert!(range("budget.retry_ratio")(
        ratio(f64::NAN).build().unwrap_err()
    ));
    assert!(ratio(0.0).build().is_ok() && ratio(1.0).build().is_ok());
    let floor = budget(BudgetConfig {
        min_per_sec: -1.0,
        ..BudgetConfig::default()
    });
    assert!(range("budget.min_per_sec")(floor.build().unwrap_err()));
    let window = budget(BudgetConfig {
        window: Duration::from_millis(0),
        ..BudgetConfig::default()
    });
    assert!(dur("budget.window_ms")(window.build().unwrap_err()));
    // The builder validates too.
    assert!(
        StandardPolicy::builder()
            .base_delay(Duration::ZERO)
            .build()
            .is_err()
    );
    assert!(
        StandardPolicy::builder()
            .max_delay(Duration::from_millis(5))
            .build()
            .is_err()
    );
    let msg = bad(|c| c.base_delay = Duration::ZERO).to_string();
    assert_eq!(msg, "retry: `base_delay_ms` must be > 0");
}

#[tokio::test(start_paused = true)]
async fn a_non_retryable_error_after_a_retry_says_how_many_attempts() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let inner = service_fn(move |_: ChatRequest| {
        let n = counter.fetch_add(1, SeqCst);
        async move {
            Err::<String, _>(match n {
                0 => err(ErrorKind::Overloaded),
                _ => wire(401, Some("authentication_error")),
            })
        }
    });
    let e = Retry::new(plain(3), inner)
        .oneshot(chat())
        .await
        .unwrap_err();
    assert_eq!(calls.load(SeqCst), 2);
    assert_eq!(e.kind(), ErrorKind::Authentication);
    assert_eq!(e.attempts(), Some(2));
    assert_eq!(e.retry_stop(), Some(RetryStop::NotRetryable));
}

#[test]
fn the_response_future_is_send() {
    fn assert_send<T: Send>() {}
    type Inner = mock::Mock<ChatRequest, ChatStream>;
    assert_send::<ResponseFuture<Inner, ChatRequest, StandardPolicy>>();
    assert_send::<Retry<StandardPolicy, Inner>>();
}

#[tokio::test(start_paused = true)]
async fn observed_gaps_between_attempts_respect_each_jitter_mode() {
    for (seed, jitter) in (0..8u64).flat_map(|s| {
        [
            Jitter::Full,
            Jitter::Equal,
            Jitter::Proportional,
            Jitter::Decorrelated,
            Jitter::None,
        ]
        .map(|j| (s, j))
    }) {
        let at = Arc::new(Mutex::new(Vec::new()));
        let log = at.clone();
        let inner = service_fn(move |_: ChatRequest| {
            log.lock().unwrap().push(Instant::now());
            async { Err::<String, _>(err(ErrorKind::Server)) }
        });
        let policy = StandardPolicy::builder()
            .max_retries(6)
            .max_delay(10 * SEC)
            .jitter(jitter)
            .no_budget()
            .seed(seed)
            .build()
            .unwrap();
        Retry::new(policy, inner).oneshot(chat()).await.unwrap_err();
        let at = at.lock().unwrap();
        assert_eq!(at.len(), 7);
        let mut prev = Duration::ZERO;
        for (n, pair) in at.windows(2).enumerate() {
            let gap = pair[1] - pair[0];
            let d = (SEC * (1 << n)).min(10 * SEC);
            let (lo, hi) = match jitter {
                Jitter::Full => (Duration::ZERO, d),
                Jitter::Equal => (d / 2, d),
                Jitter::Proportional => (d / 2, d * 3 / 2),
                Jitter::Decorrelated => (SEC, (prev.max(SEC) * 3).min(10 * SEC)),
                Jitter::None => (d, d),
            };
            assert!(
                lo <= gap && gap <= hi,
                "{jitter:?} seed {seed} retry {n}: {gap:?}"
            );
            prev = gap;
        }
    }
}

#[tokio::test(start_paused = true)]
async fn stopping_for_the_deadline_or_cap_spends_no_budget() {
    let policy = StandardPolicy::builder().seed(2).build().unwrap();
    let budget = policy.budget().unwrap().clone();
    let (svc, calls) = failing(|| wire(429, Some("rate_limit_error")).with_retry_after(5 * SEC));
    let mut svc = Retry::new(policy, svc);
    let req = chat().with_deadline(Instant::now() + 3 * SEC);
    let e = ServiceExt::<ChatRequest>::ready(&mut svc)
        .await
        .unwrap()
        .call(req)
        .await
        .unwrap_err();
    assert_eq!(e.retry_stop(), Some(RetryStop::Deadline));
    assert_eq!(calls.load(SeqCst), 1);
    assert_eq!(budget.counts(), (1, 0));
}

/// Issue 19, part 4: a request whose deadline has already passed is not sent at all.
#[tokio::test(start_paused = true)]
async fn a_passed_deadline_makes_no_attempt() {
    tokio::time::advance(Duration::from_secs(10)).await;
    let (svc, calls) = failing(|| err(ErrorKind::Server));
    let past = Instant::now() - Duration::from_secs(1);
    let e = Retry::new(plain(3), svc)
        .oneshot(chat().with_deadline(past))
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::DeadlineExceeded);
    assert_eq!(calls.load(SeqCst), 0);
}
