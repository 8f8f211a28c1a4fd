//! # Unit-testing a layer with mocks and paused time
//!
//! How to test code built on the layers without a network and without waiting: a
//! `tower_test::mock` service stands in for the provider (the test decides, request by request,
//! what it answers), `tokio_test` polls futures by hand, and paused `tokio::time` jumps over
//! backoffs and recovery timeouts in no time (every layer takes its time from `tokio::time`).
//!
//! - [`breaker_opens_after_five_failures_then_half_opens`]: the circuit breaker opens after 5
//!   failures, refuses without calling the provider, half-opens after the 60 s recovery timeout,
//!   reopens on a failed probe and closes after 3 successful ones.
//! - [`retry_backs_off_then_honours_retry_after`]: the retry layer's attempts, step by step:
//!   100 ms and 200 ms of backoff, then a `retry-after: 2` honoured to the millisecond.
//! - [`retry_counts_attempts_until_exhausted`]: a provider that always fails gets exactly
//!   1 + `max_retries` attempts, and the error says so.
//!
//! ```text
//! cargo run --example mock_testing            # runs the checks, prints "ok" for each
//! cargo test --example mock_testing           # the same checks as #[tokio::test]s
//! ```
//!
//! No simulator and no key: everything is in memory.

use std::time::Duration;

use portcullis::layers::circuit_breaker::{CircuitBreakerConfig, CircuitState};
use portcullis::layers::retry::{Jitter, RetryLayer, StandardPolicy};
use portcullis::layers::{CircuitBreakerLayer, Retry};
use portcullis::{
    BoxError, ChatMessage, ChatRequest, CompletionResult, ErrorKind, LlmError, Refusal,
    RetriesExhausted, RetryStop,
};
use tokio::time::{Instant, advance};
use tokio_test::{assert_pending, assert_ready, assert_ready_ok, task};
use tower::{Layer, ServiceExt};
use tower_test::mock;

const MODEL: &str = "gpt-4o-mini";

fn req() -> ChatRequest {
    ChatRequest::new(MODEL, vec![ChatMessage::user("hi")])
}

fn ok() -> CompletionResult {
    CompletionResult::new("mock", MODEL, "hello")
}

fn overloaded() -> LlmError {
    LlmError::new(ErrorKind::Overloaded, "503 from the mock").with_status(503)
}

/// The kind of a mock's error: a `BoxError` holding the mock's `LlmError`, or a layer's
/// [`Refusal`].
fn kind(e: &BoxError) -> Option<ErrorKind> {
    match e.downcast_ref::<LlmError>() {
        Some(e) => Some(e.kind()),
        None => e.downcast_ref::<Refusal>().map(Refusal::kind),
    }
}

/// The breaker, over a mock provider, through its whole cycle. Run with paused time.
pub async fn breaker_opens_after_five_failures_then_half_opens() {
    let layer = CircuitBreakerLayer::new("mock", CircuitBreakerConfig::default()).unwrap();
    let breaker = layer.handle();
    // `svc` polls like a task (poll_ready by hand); `upstream` answers each request.
    let (mut svc, mut upstream) = mock::spawn_layer::<ChatRequest, CompletionResult, _>(layer);

    // Five failures in a row: each reaches the provider, and comes back unchanged.
    for _ in 0..5 {
        assert_ready_ok!(svc.poll_ready());
        let call = svc.call(req());
        let (_, respond) = upstream.next_request().await.unwrap();
        respond.send_error(overloaded());
        assert_eq!(kind(&call.await.unwrap_err()), Some(ErrorKind::Overloaded));
    }
    assert_eq!(breaker.state(MODEL), CircuitState::Open);

    // Open: refused at once, and the provider never sees the request.
    assert_ready_ok!(svc.poll_ready());
    let refused = svc.call(req()).await.unwrap_err();
    assert_eq!(kind(&refused), Some(ErrorKind::CircuitOpen));
    assert!(
        upstream.poll_request().is_pending(),
        "nothing reached the mock"
    );

    // The recovery timeout (60 s by default), to the millisecond.
    advance(Duration::from_secs(60) - Duration::from_millis(1)).await;
    assert_eq!(breaker.state(MODEL), CircuitState::Open);
    advance(Duration::from_millis(1)).await;
    assert_eq!(breaker.state(MODEL), CircuitState::HalfOpen);

    // A failed probe reopens it for another 60 s.
    assert_ready_ok!(svc.poll_ready());
    let probe = svc.call(req());
    upstream
        .next_request()
        .await
        .unwrap()
        .1
        .send_error(overloaded());
    probe.await.unwrap_err();
    assert_eq!(breaker.state(MODEL), CircuitState::Open);
    advance(Duration::from_secs(60)).await;
    assert_eq!(breaker.state(MODEL), CircuitState::HalfOpen);

    // Three probes at once (the default), all successful: closed again. A fourth concurrent
    // call is refused while they are in flight.
    let mut probes = Vec::new();
    for _ in 0..3 {
        assert_ready_ok!(svc.poll_ready());
        probes.push(svc.call(req()));
    }
    assert_ready_ok!(svc.poll_ready());
    let fourth = svc.call(req()).await.unwrap_err();
    assert_eq!(kind(&fourth), Some(ErrorKind::CircuitOpen));
    for _ in 0..3 {
        upstream.next_request().await.unwrap().1.send_response(ok());
    }
    for p in probes {
        p.await.unwrap();
    }
    assert_eq!(breaker.state(MODEL), CircuitState::Closed);
    let m = breaker.metrics(MODEL).unwrap();
    assert_eq!((m.failures, m.rejected, m.successes), (6, 2, 3));
}

/// A retry layer with exact delays (no jitter, no budget) over a mock.
fn retrying(
    max_retries: u32,
) -> (
    Retry<StandardPolicy, mock::Mock<ChatRequest, CompletionResult>>,
    mock::Handle<ChatRequest, CompletionResult>,
) {
    let policy = StandardPolicy::builder()
        .max_retries(max_retries)
        .base_delay(Duration::from_millis(100))
        .max_delay(Duration::from_secs(1))
        .jitter(Jitter::None)
        .retry_after_jitter(0.0)
        .no_budget()
        .build()
        .unwrap();
    let (svc, upstream) = mock::pair();
    (RetryLayer::new(policy).layer(svc), upstream)
}

/// The retry layer's attempts, one by one, with the clock moved by hand. Run with paused time.
pub async fn retry_backs_off_then_honours_retry_after() {
    let (svc, mut upstream) = retrying(3);
    // `task::spawn` polls the call by hand; nothing runs unless the test polls it.
    let mut call = task::spawn(svc.oneshot(req()));

    // Attempt 1 fails with a 503.
    assert_pending!(call.poll());
    upstream
        .next_request()
        .await
        .unwrap()
        .1
        .send_error(overloaded());

    // Backoff 1: exactly 100 ms (base · 2⁰) before attempt 2.
    assert_pending!(call.poll());
    advance(Duration::from_millis(99)).await;
    assert_pending!(call.poll());
    assert!(upstream.poll_request().is_pending(), "still backing off");
    advance(Duration::from_millis(1)).await;
    assert_pending!(call.poll());
    upstream
        .next_request()
        .await
        .unwrap()
        .1
        .send_error(overloaded());

    // Backoff 2: 200 ms (base · 2¹) before attempt 3, which gets a 429 with retry-after: 2.
    assert_pending!(call.poll());
    advance(Duration::from_millis(200)).await;
    assert_pending!(call.poll());
    let rate_limited = LlmError::new(ErrorKind::RateLimited, "slow down")
        .with_status(429)
        .with_retry_after(Duration::from_secs(2));
    upstream
        .next_request()
        .await
        .unwrap()
        .1
        .send_error(rate_limited);

    // The server's retry-after replaces the backoff: attempt 4 comes 2 s later, and succeeds.
    assert_pending!(call.poll());
    advance(Duration::from_millis(1999)).await;
    assert_pending!(call.poll());
    assert!(
        upstream.poll_request().is_pending(),
        "honouring retry-after"
    );
    advance(Duration::from_millis(1)).await;
    assert_pending!(call.poll());
    upstream.next_request().await.unwrap().1.send_response(ok());
    let res = assert_ready!(call.poll()).unwrap();
    assert_eq!(res.content, "hello");
}

/// A provider that always fails gets `1 + max_retries` attempts. Run with paused time: the
/// runtime jumps over each backoff by itself while every task waits.
pub async fn retry_counts_attempts_until_exhausted() {
    let (svc, mut upstream) = retrying(3);
    let start = Instant::now();
    let call = tokio::spawn(svc.oneshot(req()));
    let mut attempts = Vec::new();
    while let Some((_, respond)) = upstream.next_request().await {
        attempts.push(start.elapsed());
        respond.send_error(overloaded());
        if attempts.len() == 4 {
            break;
        }
    }
    let err = call.await.unwrap().unwrap_err();
    // 0, then 100, 200 and 400 ms of backoff.
    let ms = |n| Duration::from_millis(n);
    assert_eq!(attempts, [ms(0), ms(100), ms(300), ms(700)]);
    let gave_up = err
        .downcast_ref::<RetriesExhausted<BoxError>>()
        .expect("the retry layer says why it stopped");
    assert_eq!(gave_up.attempts, 4);
    assert_eq!(gave_up.stop, RetryStop::Exhausted);
    // The call is over and its service dropped: the mock's channel closes with no fifth request.
    assert!(upstream.next_request().await.is_none(), "no fifth attempt");
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() {
    breaker_opens_after_five_failures_then_half_opens().await;
    println!("breaker_opens_after_five_failures_then_half_opens ... ok");
    retry_backs_off_then_honours_retry_after().await;
    println!("retry_backs_off_then_honours_retry_after ... ok");
    retry_counts_attempts_until_exhausted().await;
    println!("retry_counts_attempts_until_exhausted ... ok");
}

#[cfg(test)]
mod tests {
    #[tokio::test(start_paused = true)]
    async fn breaker_opens_after_five_failures_then_half_opens() {
        super::breaker_opens_after_five_failures_then_half_opens().await;
    }

    #[tokio::test(start_paused = true)]
    async fn retry_backs_off_then_honours_retry_after() {
        super::retry_backs_off_then_honours_retry_after().await;
    }

    #[tokio::test(start_paused = true)]
    async fn retry_counts_attempts_until_exhausted() {
        super::retry_counts_attempts_until_exhausted().await;
    }
}
