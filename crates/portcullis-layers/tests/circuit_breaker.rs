//! CircuitBreakerLayer: every transition at its boundary, windows, probes, the generation
//! guard, classification, streams, concurrency, keys, clones, the handle and the config.

use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use portcullis_core::{
    BoxError, ChatMessage, ChatRequest, ChatStream, CircuitOpen, CompletionResult, ErrorKind,
    LlmError, Refusal, StreamChunk, StreamMeta, Throttled,
};
use portcullis_layers::SingleKey;
use portcullis_layers::circuit_breaker::{
    CircuitBreaker, CircuitBreakerConfig, CircuitBreakerHandle, CircuitBreakerLayer, CircuitState,
    ConfigError, OpenBackoff, SlowCallPolicy, Transition, TransitionReason, TripPolicy, Window,
};
use tokio::sync::broadcast::error::TryRecvError;
use tokio::time::{Instant, advance};
use tokio_test::{assert_pending, assert_ready, assert_ready_ok, task};
use tower::{Service, ServiceExt};
use tower_test::mock;

const MS: Duration = Duration::from_millis(1);
const SEC: Duration = Duration::from_secs(1);

fn overloaded() -> LlmError {
    LlmError::new(ErrorKind::Overloaded, "overloaded").with_status(503)
}

type Svc<R> = CircuitBreaker<mock::Mock<&'static str, R>, SingleKey, ()>;

/// A breaker over a tower-test mock, with one key.
struct Harness<R = String> {
    svc: mock::Spawn<Svc<R>>,
    mock: mock::Handle<&'static str, R>,
    cb: CircuitBreakerHandle<()>,
    events: tokio::sync::broadcast::Receiver<Transition<()>>,
}

impl<R: portcullis_core::OnFinish + Send + 'static> Harness<R> {
    fn new(config: CircuitBreakerConfig) -> Self {
        let layer = CircuitBreakerLayer::new("test", config)
            .unwrap()
            .single_key();
        let cb = layer.handle();
        let events = cb.subscribe();
        let (svc, mock) = mock::spawn_layer(layer);
        Harness {
            svc,
            mock,
            cb,
            events,
        }
    }

    /// `poll_ready` (never an error) then `call`.
    fn call(&mut self) -> task::Spawn<<Svc<R> as Service<&'static str>>::Future> {
        assert_ready_ok!(self.svc.poll_ready());
        task::spawn(self.svc.call("req"))
    }

    /// One call answered with `answer`; a refused call never reaches the mock.
    async fn run(&mut self, answer: Result<R, BoxError>) -> Result<R, BoxError> {
        let mut fut = self.call();
        if let Poll::Ready(res) = fut.poll() {
            assert!(
                self.mock.poll_request().is_pending(),
                "a refusal reached upstream"
            );
            return res;
        }
        let (_, send) = self.mock.next_request().await.unwrap();
        match answer {
            Ok(r) => send.send_response(r),
            Err(e) => send.send_error(e),
        }
        fut.await
    }

    fn state(&self) -> CircuitState {
        self.cb.state(&())
    }

    fn metrics(&self) -> portcullis_layers::circuit_breaker::CircuitMetrics {
        self.cb.metrics(&()).unwrap()
    }

    /// The transitions sent since the last call, as (from, to, reason).
    fn transitions(&mut self) -> Vec<(CircuitState, CircuitState, TransitionReason)> {
        let mut out = Vec::new();
        loop {
            match self.events.try_recv() {
                Ok(t) => out.push((t.from, t.to, t.reason)),
                Err(TryRecvError::Empty) => return out,
                Err(e) => panic!("{e}"),
            }
        }
    }
}

impl Harness<String> {
    async fn ok(&mut self) -> Result<String, BoxError> {
        self.run(Ok("ok".into())).await
    }
    async fn fail(&mut self) -> Result<String, BoxError> {
        self.run(Err(overloaded().into())).await
    }
}

fn refusal(res: Result<impl std::fmt::Debug, BoxError>) -> Duration {
    let err = res.unwrap_err();
    match err.downcast_ref::<Refusal>() {
        Some(Refusal::CircuitOpen(open)) => open.retry_after,
        _ => panic!("expected CircuitOpen, got {err}"),
    }
}

fn upstream_error(res: Result<impl std::fmt::Debug, BoxError>) {
    let err = res.unwrap_err();
    assert!(err.downcast_ref::<Refusal>().is_none(), "refused: {err}");
}

use CircuitState::{Closed, HalfOpen, Open};

/// Opens a default (consecutive 5) breaker.
async fn trip(h: &mut Harness) {
    for _ in 0..5 {
        upstream_error(h.fail().await);
    }
    assert_eq!(h.state(), Open);
}

#[tokio::test(start_paused = true)]
async fn consecutive_failures_trip_at_threshold_and_success_resets() {
    let mut h = Harness::new(CircuitBreakerConfig::default());
    for _ in 0..4 {
        upstream_error(h.fail().await);
    }
    h.ok().await.unwrap();
    for _ in 0..4 {
        upstream_error(h.fail().await);
    }
    assert_eq!(h.state(), Closed);
    assert_eq!(h.metrics().consecutive_failures, 4);
    upstream_error(h.fail().await);
    assert_eq!(h.state(), Open);
    assert_eq!(
        h.transitions(),
        vec![(
            Closed,
            Open,
            TransitionReason::ConsecutiveFailures { count: 5 }
        )]
    );
    // Refused without reaching upstream, with the time left.
    assert_eq!(refusal(h.ok().await), 60 * SEC);
    advance(10 * SEC).await;
    assert_eq!(refusal(h.ok().await), 50 * SEC);
    let m = h.metrics();
    assert_eq!(
        (m.calls, m.successes, m.failures, m.rejected),
        (10, 1, 9, 2)
    );
    assert!((m.failure_rate() - 0.9).abs() < 1e-9);
}

#[tokio::test(start_paused = true)]
async fn recovery_timeout_boundary_then_probes_close() {
    let mut h = Harness::new(CircuitBreakerConfig::default());
    trip(&mut h).await;
    advance(60 * SEC - MS).await;
    assert_eq!(h.state(), Open);
    assert_eq!(refusal(h.ok().await), MS);
    advance(MS).await;
    assert_eq!(h.state(), HalfOpen);
    h.ok().await.unwrap();
    h.ok().await.unwrap();
    assert_eq!(h.state(), HalfOpen);
    h.ok().await.unwrap();
    assert_eq!(h.state(), Closed);
    let reasons: Vec<_> = h.transitions();
    assert_eq!(
        reasons,
        vec![
            (
                Closed,
                Open,
                TransitionReason::ConsecutiveFailures { count: 5 }
            ),
            (Open, HalfOpen, TransitionReason::RecoveryTimeout),
            (
                HalfOpen,
                Closed,
                TransitionReason::ProbesSucceeded { count: 3 }
            ),
        ]
    );
    // Closed again: the count starts over.
    for _ in 0..4 {
        upstream_error(h.fail().await);
    }
    assert_eq!(h.state(), Closed);
}

#[tokio::test(start_paused = true)]
async fn any_probe_failure_reopens_for_a_full_timeout() {
    let mut h = Harness::new(CircuitBreakerConfig::default());
    trip(&mut h).await;
    advance(60 * SEC).await;
    h.ok().await.unwrap();
    upstream_error(h.fail().await);
    assert_eq!(h.state(), Open);
    assert_eq!(refusal(h.ok().await), 60 * SEC);
    let t = h.transitions();
    assert_eq!(t.last().unwrap().2, TransitionReason::ProbeFailed);
    assert_eq!(t.len(), 3);
}

#[tokio::test(start_paused = true)]
async fn open_duration_grows_on_consecutive_trips_up_to_the_cap() {
    let mut h = Harness::new(CircuitBreakerConfig {
        open_backoff: Some(OpenBackoff {
            multiplier: 2.0,
            max: 150 * SEC,
        }),
        half_open_probes: 1,
        ..Default::default()
    });
    trip(&mut h).await;
    assert_eq!(refusal(h.ok().await), 60 * SEC);
    advance(60 * SEC).await;
    upstream_error(h.fail().await); // probe fails: second trip, 120 s
    assert_eq!(refusal(h.ok().await), 120 * SEC);
    advance(120 * SEC - MS).await;
    assert_eq!(h.state(), Open);
    advance(MS).await;
    upstream_error(h.fail().await); // third trip: 240 s capped at 150 s
    assert_eq!(refusal(h.ok().await), 150 * SEC);
    advance(150 * SEC).await;
    h.ok().await.unwrap(); // closes: the backoff starts over
    assert_eq!(h.state(), Closed);
    trip(&mut h).await;
    assert_eq!(refusal(h.ok().await), 60 * SEC);
}

#[tokio::test(start_paused = true)]
async fn half_open_admits_at_most_n_probes_at_once() {
    let mut h = Harness::new(CircuitBreakerConfig::default());
    trip(&mut h).await;
    advance(60 * SEC).await;
    let mut probes: Vec<_> = (0..3).map(|_| h.call()).collect();
    for p in &mut probes {
        assert_pending!(p.poll());
    }
    // The fourth concurrent probe is refused.
    let mut fourth = h.call();
    let retry_after = refusal(assert_ready!(fourth.poll()));
    assert_eq!(retry_after, 30 * SEC); // until the oldest permit expires
    assert_eq!(h.state(), HalfOpen);

    // Dropping a probe releases its permit, and counts for nothing.
    drop(probes.pop());
    let mut next = h.call();
    assert_pending!(next.poll());
    let mut fifth = h.call();
    refusal(assert_ready!(fifth.poll()));
    assert_eq!(h.metrics().ignored, 1);

    // Answer the three in flight: the breaker closes.
    for _ in 0..4 {
        let (_, send) = h.mock.next_request().await.unwrap();
        send.send_response("ok".to_string());
    }
    for p in probes {
        p.await.unwrap();
    }
    next.await.unwrap();
    assert_eq!(h.state(), Closed);
}

#[tokio::test(start_paused = true)]
async fn a_hung_probe_cannot_wedge_the_breaker() {
    let mut h = Harness::new(CircuitBreakerConfig::default());
    trip(&mut h).await;
    advance(60 * SEC).await;
    let mut hung: Vec<_> = (0..3).map(|_| h.call()).collect();
    let mut sends = Vec::new();
    for p in &mut hung {
        assert_pending!(p.poll());
        sends.push(h.mock.next_request().await.unwrap().1);
    }
    advance(30 * SEC - MS).await;
    refusal(assert_ready!(h.call().poll()));
    advance(MS).await;
    // Every permit expired: new probes get through and decide.
    for _ in 0..3 {
        h.ok().await.unwrap();
    }
    assert_eq!(h.state(), Closed);
    // The hung probes finally fail: too late to count.
    for s in sends {
        s.send_error(overloaded());
    }
    for p in hung {
        upstream_error(p.await);
    }
    assert_eq!(h.state(), Closed);
    let m = h.metrics();
    assert_eq!((m.ignored, m.consecutive_failures), (3, 0));
}

#[tokio::test(start_paused = true)]
async fn expired_probe_outcome_is_ignored_within_half_open() {
    let mut h = Harness::new(CircuitBreakerConfig {
        half_open_probes: 1,
        ..Default::default()
    });
    trip(&mut h).await;
    advance(60 * SEC).await;
    let mut hung = h.call();
    assert_pending!(hung.poll());
    let (_, send_hung) = h.mock.next_request().await.unwrap();
    advance(30 * SEC).await;
    // A new probe takes the expired permit; the old one's failure changes nothing.
    let mut fresh = h.call();
    assert_pending!(fresh.poll());
    let (_, send_fresh) = h.mock.next_request().await.unwrap();
    send_hung.send_error(overloaded());
    upstream_error(hung.await);
    assert_eq!(h.state(), HalfOpen);
    send_fresh.send_response("ok".into());
    fresh.await.unwrap();
    assert_eq!(h.state(), Closed);
}

#[tokio::test(start_paused = true)]
async fn generation_guard_ignores_calls_admitted_under_an_earlier_state() {
    let mut h = Harness::new(CircuitBreakerConfig::default());
    // A slow call admitted while CLOSED...
    let mut slow_fail = h.call();
    assert_pending!(slow_fail.poll());
    let (_, send_fail) = h.mock.next_request().await.unwrap();
    let mut slow_ok = h.call();
    assert_pending!(slow_ok.poll());
    let (_, send_ok) = h.mock.next_request().await.unwrap();
    trip(&mut h).await;
    advance(60 * SEC).await;
    assert_eq!(h.state(), HalfOpen);
    // ...ends during HALF_OPEN: neither its failure nor its success is a probe outcome.
    send_fail.send_error(overloaded());
    upstream_error(slow_fail.await);
    assert_eq!(h.state(), HalfOpen);
    send_ok.send_response("ok".into());
    slow_ok.await.unwrap();
    assert_eq!(h.state(), HalfOpen);
    let m = h.metrics();
    assert_eq!((m.successes, m.failures, m.ignored), (0, 5, 2));
    h.ok().await.unwrap();
    h.ok().await.unwrap();
    assert_eq!(h.state(), HalfOpen);
    h.ok().await.unwrap();
    assert_eq!(h.state(), Closed);
}

#[tokio::test(start_paused = true)]
async fn only_breaker_failures_count() {
    let mut h = Harness::new(CircuitBreakerConfig::default());
    for _ in 0..4 {
        upstream_error(h.fail().await);
    }
    let ignored: Vec<BoxError> = vec![
        LlmError::new(ErrorKind::InvalidRequest, "bad")
            .with_status(400)
            .into(),
        LlmError::new(ErrorKind::Authentication, "key")
            .with_status(401)
            .into(),
        LlmError::new(ErrorKind::RateLimited, "slow down")
            .with_status(429)
            .into(),
        LlmError::new(ErrorKind::QuotaExhausted, "pay")
            .with_status(429)
            .into(),
        Box::new(Throttled { retry_after: SEC }),
        Box::new(CircuitOpen { retry_after: SEC }),
        Box::new(Refusal::from(CircuitOpen { retry_after: SEC })),
        LlmError::from(CircuitOpen { retry_after: SEC }).into(),
    ];
    let n = ignored.len() as u64;
    for e in ignored {
        // Each reaches upstream (`run` checks it) and comes back as it was.
        let back = h.run(Err(e)).await.unwrap_err();
        assert!(back.to_string() != "", "{back}");
    }
    // Cancelled calls count for nothing either.
    for _ in 0..3 {
        let mut fut = h.call();
        assert_pending!(fut.poll());
        drop(fut);
        h.mock.next_request().await.unwrap();
    }
    assert_eq!(h.state(), Closed);
    let m = h.metrics();
    assert_eq!(
        (m.failures, m.ignored, m.consecutive_failures),
        (4, n + 3, 4)
    );
    // Ignored outcomes did not reset the run either: one more failure opens.
    upstream_error(h.fail().await);
    assert_eq!(h.state(), Open);
}

#[tokio::test(start_paused = true)]
async fn failure_rate_over_a_count_window_with_min_calls() {
    let mut h = Harness::new(CircuitBreakerConfig {
        trip: TripPolicy::failure_rate(0.5, Window::Count(4), 4),
        ..Default::default()
    });
    // 100 % failures, but under min_calls.
    for _ in 0..3 {
        upstream_error(h.fail().await);
    }
    assert_eq!(h.state(), Closed);
    h.ok().await.unwrap(); // [F F F S]: 75 % over 4 → open
    assert_eq!(h.state(), Open);
    assert!(matches!(
        h.transitions()[0].2,
        TransitionReason::FailureRate { calls: 4, .. }
    ));

    // Old outcomes leave the window.
    h.cb.reset(&());
    for _ in 0..4 {
        h.ok().await.unwrap();
    }
    upstream_error(h.fail().await); // [S S S F] 25 %
    assert_eq!(h.state(), Closed);
    h.ok().await.unwrap(); // [S S F S]
    upstream_error(h.fail().await); // [S F S F] 50 % → open
    assert_eq!(h.state(), Open);
}

#[tokio::test(start_paused = true)]
async fn failure_rate_over_a_time_window_ages_failures_out() {
    let config = CircuitBreakerConfig {
        trip: TripPolicy::failure_rate(0.5, Window::Time(10 * SEC), 2),
        ..Default::default()
    };
    // Within the window: F then S is 50 % over 2 calls.
    let mut h = Harness::new(config.clone());
    upstream_error(h.fail().await);
    advance(10 * SEC - MS).await;
    h.ok().await.unwrap();
    assert_eq!(h.state(), Open);

    // A failure that aged out no longer counts.
    let mut h = Harness::new(config);
    upstream_error(h.fail().await);
    advance(10 * SEC).await;
    h.ok().await.unwrap();
    assert_eq!(h.state(), Closed);
    h.ok().await.unwrap();
    upstream_error(h.fail().await); // [S S F]: 33 %
    assert_eq!(h.state(), Closed);
    upstream_error(h.fail().await); // 50 %
    assert_eq!(h.state(), Open);
}

#[tokio::test(start_paused = true)]
async fn slow_calls_trip_the_breaker() {
    let mut h: Harness = Harness::new(CircuitBreakerConfig {
        trip: TripPolicy::consecutive(100),
        slow_calls: Some(SlowCallPolicy {
            threshold: SEC,
            rate: 0.5,
            window: Window::Count(4),
            min_calls: 4,
        }),
        ..Default::default()
    });
    for took in [SEC - MS, SEC - MS, SEC, 2 * SEC] {
        assert_eq!(h.state(), Closed); // under min_calls until the fourth
        let mut fut = h.call();
        assert_pending!(fut.poll());
        let (_, send) = h.mock.next_request().await.unwrap();
        advance(took).await;
        send.send_response("ok".into());
        fut.await.unwrap();
    }
    assert_eq!(h.metrics().slow_calls, 2);
    // 2 slow of 4: open, although every call succeeded.
    assert_eq!(h.state(), Open);
    assert_eq!(
        h.transitions()[0].2,
        TransitionReason::SlowCallRate {
            rate: 0.5,
            calls: 4
        }
    );
}

fn stream(items: Vec<Result<StreamChunk, LlmError>>) -> ChatStream {
    ChatStream::from_chunks(StreamMeta::new("test", "m"), items)
}

async fn drain(mut s: ChatStream) {
    use futures_util::StreamExt;
    while s.next().await.is_some() {}
}

#[tokio::test(start_paused = true)]
async fn a_stream_failing_after_commit_counts_when_it_ends() {
    let mut h: Harness<ChatStream> = Harness::new(CircuitBreakerConfig {
        trip: TripPolicy::consecutive(1),
        ..Default::default()
    });
    // A stream that completes is a success; one dropped unfinished is ignored.
    let s = h.run(Ok(stream(vec![Ok(StreamChunk::delta("a"))]))).await;
    drain(s.unwrap()).await;
    let s = h.run(Ok(stream(vec![Ok(StreamChunk::delta("a"))]))).await;
    drop(s.unwrap());
    let m = h.metrics();
    assert_eq!((m.successes, m.ignored), (1, 1));

    let interrupted = LlmError::new(ErrorKind::StreamInterrupted, "reset mid-stream");
    let s = h
        .run(Ok(stream(vec![
            Ok(StreamChunk::delta("a")),
            Err(interrupted),
        ])))
        .await
        .unwrap();
    // Committed: nothing counted yet.
    assert_eq!(h.state(), Closed);
    drain(s).await;
    assert_eq!(h.state(), Open);
    assert_eq!(h.metrics().failures, 1);
}

#[tokio::test(start_paused = true)]
async fn a_dropped_stream_probe_releases_its_permit() {
    let mut h: Harness<ChatStream> = Harness::new(CircuitBreakerConfig {
        trip: TripPolicy::consecutive(1),
        half_open_probes: 1,
        ..Default::default()
    });
    upstream_error(h.run(Err(overloaded().into())).await);
    advance(60 * SEC).await;
    let s = h
        .run(Ok(stream(vec![Ok(StreamChunk::delta("a"))])))
        .await
        .unwrap();
    // The probe holds its permit while the stream is alive.
    refusal(h.run(Err(overloaded().into())).await);
    drop(s);
    let s = h
        .run(Ok(stream(vec![Ok(StreamChunk::delta("a"))])))
        .await
        .unwrap();
    drain(s).await;
    assert_eq!(h.state(), Closed);
}

#[tokio::test(start_paused = true)]
async fn in_flight_counts_every_permit_until_its_outcome_or_drop() {
    let mut h: Harness<ChatStream> = Harness::new(CircuitBreakerConfig::default());
    // A call waiting upstream holds a permit; dropped, it gives it back.
    let pending = h.call();
    assert_eq!(h.metrics().in_flight, 1);
    drop(pending);
    assert_eq!(h.metrics().in_flight, 0);
    let _abandoned = h.mock.next_request().await.unwrap();
    // A stream holds its permit until it ends.
    let s = h
        .run(Ok(stream(vec![Ok(StreamChunk::delta("a"))])))
        .await
        .unwrap();
    assert_eq!(h.metrics().in_flight, 1);
    drain(s).await;
    assert_eq!(h.metrics().in_flight, 0);
    // A reset clears the counters, not the calls still out.
    let pending = h.call();
    h.cb.reset(&());
    assert_eq!(h.metrics().in_flight, 1);
    drop(pending);
    assert_eq!(h.metrics().in_flight, 0);
    let _abandoned = h.mock.next_request().await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn poll_ready_only_delegates() {
    let mut h = Harness::new(CircuitBreakerConfig::default());
    trip(&mut h).await;
    // Open, yet ready: the refusal happens in `call`.
    assert_ready_ok!(h.svc.poll_ready());
    refusal(assert_ready!(task::spawn(h.svc.call("req")).poll()));
    // The inner service's readiness stays reserved for the next call.
    h.mock.allow(0);
    assert_ready_ok!(h.svc.poll_ready());
    refusal(assert_ready!(task::spawn(h.svc.call("req")).poll()));
    // A not-ready inner service is all that makes the breaker wait.
    advance(60 * SEC).await;
    let mut fut = task::spawn(h.svc.call("req")); // a probe consumes the reservation
    assert_pending!(fut.poll());
    assert_pending!(h.svc.poll_ready());
    h.mock.allow(1);
    assert_ready_ok!(h.svc.poll_ready());
}

/// The inner service is reachable, and the future has a name outside the crate.
#[tokio::test(start_paused = true)]
async fn the_inner_service_and_the_future_can_be_named() {
    use portcullis_layers::circuit_breaker::ResponseFuture;
    use tower::Layer;

    let mut svc = CircuitBreakerLayer::new("test", CircuitBreakerConfig::default())
        .unwrap()
        .single_key()
        .layer(7u32);
    *svc.get_mut() += 1;
    assert_eq!(*svc.get_ref(), 8);
    assert_eq!(svc.into_inner(), 8);

    let mut h = Harness::new(CircuitBreakerConfig::default());
    assert_ready_ok!(h.svc.poll_ready());
    let fut: ResponseFuture<mock::future::ResponseFuture<String>, BoxError> = h.svc.call("req");
    let (_, send) = h.mock.next_request().await.unwrap();
    send.send_response("ok".into());
    assert_eq!(fut.await.unwrap(), "ok");
}

#[tokio::test(start_paused = true)]
async fn force_open_force_closed_and_reset() {
    let mut h = Harness::new(CircuitBreakerConfig::default());
    h.cb.force_open(());
    assert_eq!(refusal(h.ok().await), 60 * SEC);
    advance(3600 * SEC).await;
    assert_eq!(h.state(), Open); // no timeout while forced
    h.cb.force_closed(&());
    h.ok().await.unwrap();
    h.cb.force_closed(&()); // already closed: no event
    assert_eq!(
        h.transitions(),
        vec![
            (Closed, Open, TransitionReason::ForcedOpen),
            (Open, Closed, TransitionReason::ForcedClosed),
        ]
    );

    trip(&mut h).await;
    h.cb.reset(&());
    assert_eq!(h.state(), Closed);
    let m = h.metrics();
    assert_eq!((m.calls, m.failures, m.rejected), (0, 0, 0));
    assert_eq!(h.transitions().last().unwrap().2, TransitionReason::Reset);
    // A handle steers keys it has not seen yet.
    let layer = CircuitBreakerLayer::new("p", CircuitBreakerConfig::default()).unwrap();
    layer.handle().force_open("gpt-x");
    assert_eq!(layer.handle().state("gpt-x"), Open);
    assert_eq!(layer.handle().state("never-seen"), Closed);
    assert!(layer.handle().metrics("never-seen").is_none());
}

fn chat(model: &str) -> ChatRequest {
    ChatRequest::new(model, vec![ChatMessage::user("hi")])
}

/// A service by model: `bad-*` models fail.
fn by_model_service(
    layer: &CircuitBreakerLayer,
) -> impl Service<ChatRequest, Response = CompletionResult, Error = LlmError> + Clone {
    tower::ServiceBuilder::new()
        .layer(layer.clone())
        .service_fn(|req: ChatRequest| async move {
            if req.model.starts_with("bad") {
                Err(overloaded())
            } else {
                Ok(CompletionResult::new("p", &*req.model, "hi"))
            }
        })
}

#[tokio::test(start_paused = true)]
async fn keys_are_isolated_and_clones_share_state() {
    let layer = CircuitBreakerLayer::new("openai", CircuitBreakerConfig::default()).unwrap();
    let handle = layer.handle();
    let mut a = by_model_service(&layer);
    let mut b = a.clone();
    for i in 0..5 {
        let svc = if i % 2 == 0 { &mut a } else { &mut b };
        let err = svc
            .ready()
            .await
            .unwrap()
            .call(chat("bad-1"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Overloaded);
    }
    // Five failures across two clones opened the one shared breaker.
    assert_eq!(handle.state("bad-1"), Open);
    let err = b
        .ready()
        .await
        .unwrap()
        .call(chat("bad-1"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::CircuitOpen);
    assert_eq!(err.retry_after(), Some(60 * SEC));
    // Another model is untouched, and so is another service built from the same layer.
    a.ready().await.unwrap().call(chat("good")).await.unwrap();
    let err = a
        .ready()
        .await
        .unwrap()
        .call(chat("bad-2"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Overloaded);
    assert_eq!(handle.state("good"), Closed);
    assert_eq!(handle.state("bad-2"), Closed);
    let mut c = by_model_service(&layer);
    let err = c
        .ready()
        .await
        .unwrap()
        .call(chat("bad-1"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::CircuitOpen);
    let mut keys = handle.keys();
    keys.sort();
    assert_eq!(
        keys,
        vec![Arc::from("bad-1"), "bad-2".into(), "good".into()]
    );

    let event = handle.subscribe();
    drop(event);
    assert_eq!(handle.name(), "openai");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_tasks_failing_at_once_open_exactly_once() {
    const N: usize = 200;
    let layer = CircuitBreakerLayer::new("p", CircuitBreakerConfig::default())
        .unwrap()
        .single_key();
    let handle = layer.handle();
    let mut events = handle.subscribe();
    let barrier = Arc::new(tokio::sync::Barrier::new(N));
    let mut svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service_fn(move |_: u32| {
            let barrier = barrier.clone();
            async move {
                barrier.wait().await;
                Err::<u32, LlmError>(overloaded())
            }
        });
    // All admitted while CLOSED, then all fail at the same moment on four threads.
    let mut tasks = Vec::new();
    for i in 0..N {
        let fut = svc.ready().await.unwrap().call(i as u32);
        tasks.push(tokio::spawn(fut));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap_err().kind(), ErrorKind::Overloaded);
    }
    let m = handle.metrics(&()).unwrap();
    assert_eq!(
        (m.calls, m.failures, m.ignored, m.successes),
        (N as u64, 5, N as u64 - 5, 0)
    );
    let opened = events.try_recv().unwrap();
    assert_eq!((opened.from, opened.to), (Closed, Open));
    assert!(matches!(events.try_recv(), Err(TryRecvError::Empty)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn many_tasks_hammering_one_breaker_keep_exact_counts() {
    const TASKS: u64 = 8;
    const CALLS: u64 = 250;
    let layer = CircuitBreakerLayer::new("p", CircuitBreakerConfig::default())
        .unwrap()
        .single_key();
    let handle = layer.handle();
    let mut events = handle.subscribe();
    let svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service_fn(|i: u64| async move {
            tokio::task::yield_now().await;
            if i % 2 == 0 {
                Ok(i)
            } else {
                // Never a breaker failure: the breaker stays closed throughout.
                Err(LlmError::new(ErrorKind::InvalidRequest, "bad").with_status(400))
            }
        });
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let mut svc = svc.clone();
            tokio::spawn(async move {
                for i in 0..CALLS {
                    let _ = svc.ready().await.unwrap().call(i).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let m = handle.metrics(&()).unwrap();
    let total = TASKS * CALLS;
    assert_eq!(
        (m.calls, m.successes, m.ignored, m.failures, m.rejected),
        (total, total / 2, total / 2, 0, 0)
    );
    assert_eq!(m.state, Closed);
    assert!(matches!(events.try_recv(), Err(TryRecvError::Empty)));
}

#[tokio::test(start_paused = true)]
async fn transition_events_carry_key_name_and_time() {
    let layer = CircuitBreakerLayer::new("anthropic", CircuitBreakerConfig::default()).unwrap();
    let handle = layer.handle();
    let mut events = handle.subscribe();
    let mut svc = by_model_service(&layer);
    let start = Instant::now();
    advance(SEC).await;
    for _ in 0..5 {
        let _ = svc.ready().await.unwrap().call(chat("bad-opus")).await;
    }
    let t = events.recv().await.unwrap();
    assert_eq!(&*t.name, "anthropic");
    assert_eq!(&*t.key, "bad-opus");
    assert_eq!(t.at, start + SEC);
    assert_eq!(
        t.to_string(),
        "circuit anthropic:\"bad-opus\" closed -> open (5 consecutive failures)"
    );
}

#[test]
fn config_is_validated() {
    let bad = |f: fn(&mut CircuitBreakerConfig)| {
        let mut c = CircuitBreakerConfig::default();
        f(&mut c);
        let err = c.validate().unwrap_err();
        assert_eq!(
            CircuitBreakerLayer::new("p", c).unwrap_err().to_string(),
            err.to_string(),
            "the layer validates too"
        );
        err
    };
    let field = |e: ConfigError| {
        assert_eq!(e.component, "circuit breaker");
        e.field.into_owned()
    };
    assert_eq!(
        bad(|c| c.trip = TripPolicy::consecutive(0)).to_string(),
        "circuit breaker: `trip.consecutive_failures.threshold` must be > 0"
    );
    let rate = "trip.failure_rate.threshold";
    assert_eq!(
        field(bad(
            |c| c.trip = TripPolicy::failure_rate(1.5, Window::Count(10), 5)
        )),
        rate
    );
    assert_eq!(
        field(bad(
            |c| c.trip = TripPolicy::failure_rate(f64::NAN, Window::Count(10), 5)
        )),
        rate
    );
    let window = "trip.failure_rate.window";
    assert_eq!(
        field(bad(
            |c| c.trip = TripPolicy::failure_rate(0.5, Window::Count(0), 0)
        )),
        window
    );
    let e = bad(|c| c.trip = TripPolicy::failure_rate(0.5, Window::Count(10), 11));
    assert!(
        e.problem.contains("min_calls") && e.problem.contains("11"),
        "{e}"
    );
    assert_eq!(field(e), window);
    assert_eq!(
        field(bad(|c| c.trip = TripPolicy::failure_rate(
            0.5,
            Window::Time(Duration::ZERO),
            1
        ))),
        window
    );
    assert_eq!(
        field(bad(|c| c.recovery_timeout = Duration::from_secs(u64::MAX))),
        "recovery_timeout_ms"
    );
    assert_eq!(
        field(bad(
            |c| c.trip = TripPolicy::failure_rate(0.5, Window::Count(u32::MAX), 1)
        )),
        window
    );
    assert_eq!(
        field(bad(|c| c.half_open_probes = u32::MAX)),
        "half_open_probes"
    );
    assert_eq!(field(bad(|c| c.half_open_probes = 0)), "half_open_probes");
    assert_eq!(
        field(bad(|c| c.max_probe_wait = Duration::ZERO)),
        "max_probe_wait_ms"
    );
    assert_eq!(
        field(bad(|c| c.slow_calls = Some(SlowCallPolicy {
            threshold: SEC,
            rate: 0.0,
            window: Window::Count(5),
            min_calls: 1
        }))),
        "slow_calls.rate"
    );
    assert_eq!(
        field(bad(|c| c.open_backoff = Some(OpenBackoff {
            multiplier: 0.5,
            max: 600 * SEC
        }))),
        "open_backoff.multiplier"
    );
    assert_eq!(
        field(bad(|c| c.open_backoff = Some(OpenBackoff {
            multiplier: 2.0,
            max: SEC
        }))),
        "open_backoff.max_ms"
    );
    assert!(CircuitBreakerConfig::default().validate().is_ok());
}

#[test]
fn config_deserializes_with_defaults_and_rejects_unknown_fields() {
    let c: CircuitBreakerConfig = serde_json::from_str("{}").unwrap();
    assert_eq!(c, CircuitBreakerConfig::default());
    let c: CircuitBreakerConfig = serde_json::from_str(
        r#"{"trip": {"failure_rate": {"threshold": 0.25, "window": {"time_ms": 30000}, "min_calls": 20}},
            "slow_calls": {"threshold_ms": 5000, "rate": 0.8, "window": {"count": 50}, "min_calls": 10},
            "open_backoff": {"multiplier": 1.5, "max_ms": 600000},
            "half_open_probes": 2, "max_probe_wait_ms": 10000}"#,
    )
    .unwrap();
    assert_eq!(
        c.trip,
        TripPolicy::failure_rate(0.25, Window::Time(30 * SEC), 20)
    );
    assert_eq!(c.slow_calls.as_ref().unwrap().threshold, 5 * SEC);
    assert_eq!(c.open_backoff.as_ref().unwrap().max, 600 * SEC);
    assert!(c.validate().is_ok());
    let back: CircuitBreakerConfig =
        serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
    assert!(serde_json::from_str::<CircuitBreakerConfig>(r#"{"recovery": 5}"#).is_err());
    assert!(
        serde_json::from_str::<CircuitBreakerConfig>(r#"{"trip": {"consecutive_failures": {}}}"#)
            .is_err()
    );
}

#[derive(Debug, PartialEq)]
enum JobError {
    Busy,
    Rejected,
    Open(Duration),
}

impl portcullis_core::Classify for JobError {
    fn classify(&self) -> portcullis_core::Classification {
        use portcullis_core::Classification;
        match self {
            JobError::Busy => Classification::TRANSIENT,
            JobError::Rejected => Classification::PERMANENT,
            JobError::Open(_) => Classification::REFUSED_LOCALLY,
        }
    }
}

impl From<portcullis_core::Refusal> for JobError {
    fn from(r: portcullis_core::Refusal) -> Self {
        JobError::Open(r.retry_after().unwrap_or_default())
    }
}

#[tokio::test(start_paused = true)]
async fn works_for_any_service_with_a_custom_key_and_error() {
    // Key by tenant: the request's high byte.
    let layer = CircuitBreakerLayer::new("jobs", CircuitBreakerConfig::default())
        .unwrap()
        .key_by(|job: &u32| job >> 24);
    let handle = layer.handle();
    let mut svc = tower::ServiceBuilder::new()
        .layer(layer)
        .service_fn(|job: u32| async move {
            match job & 0xff {
                0 => Ok(job),
                1 => Err(JobError::Rejected),
                _ => Err(JobError::Busy),
            }
        });
    let tenant_a = 0x0100_0000;
    let tenant_b = 0x0200_0000;
    for _ in 0..10 {
        let r = svc.ready().await.unwrap().call(tenant_a | 1).await;
        assert_eq!(r, Err(JobError::Rejected));
    }
    assert_eq!(handle.state(&1), Closed);
    for _ in 0..5 {
        let r = svc.ready().await.unwrap().call(tenant_a | 2).await;
        assert_eq!(r, Err(JobError::Busy));
    }
    let r = svc.ready().await.unwrap().call(tenant_a).await;
    assert_eq!(r, Err(JobError::Open(60 * SEC)));
    assert_eq!(
        svc.ready().await.unwrap().call(tenant_b).await,
        Ok(tenant_b)
    );
    assert_eq!((handle.state(&1), handle.state(&2)), (Open, Closed));
}

#[derive(Debug, Clone)]
enum Op {
    Call,
    Succeed(usize),
    Fail(usize),
    Refuse(usize),
    Drop(usize),
    Advance(u64),
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        3 => Just(Op::Call),
        2 => any::<usize>().prop_map(Op::Succeed),
        2 => any::<usize>().prop_map(Op::Fail),
        1 => any::<usize>().prop_map(Op::Refuse),
        1 => any::<usize>().prop_map(Op::Drop),
        2 => (0u64..400).prop_map(Op::Advance),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(200))]

    /// Under any interleaving of calls, outcomes, cancellations and time: events chain, every
    /// admitted call is accounted for exactly once, and HALF_OPEN never has more than N probes
    /// in flight.
    #[test]
    fn invariants_hold_under_any_interleaving(ops in proptest::collection::vec(op(), 1..80)) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async move {
            const PROBES: usize = 2;
            let mut h: Harness = Harness::new(CircuitBreakerConfig {
                trip: TripPolicy::consecutive(2),
                recovery_timeout: Duration::from_millis(500),
                half_open_probes: PROBES as u32,
                max_probe_wait: Duration::from_secs(3600),
                ..Default::default()
            });
            // In flight: the future, its responder, and the generation (event count) and state
            // it was admitted under.
            let mut flight = Vec::new();
            let mut chain: Vec<(CircuitState, CircuitState, TransitionReason)> = Vec::new();
            let mut rejected = 0;
            for op in ops {
                let pick = |i: usize, n: usize| (n > 0).then(|| i % n);
                match op {
                    Op::Call => {
                        let state = h.state();
                        chain.extend(h.transitions());
                        let mut fut = h.call();
                        if let Poll::Ready(res) = fut.poll() {
                            refusal(res);
                            rejected += 1;
                        } else {
                            let (_, send) = h.mock.next_request().await.unwrap();
                            flight.push((fut, send, chain.len(), state));
                        }
                    }
                    Op::Succeed(i) | Op::Fail(i) | Op::Refuse(i) => {
                        if let Some(i) = pick(i, flight.len()) {
                            let (fut, send, _, _) = flight.swap_remove(i);
                            match op {
                                Op::Succeed(_) => send.send_response("ok".into()),
                                Op::Fail(_) => send.send_error(overloaded()),
                                _ => send.send_error(
                                    LlmError::new(ErrorKind::InvalidRequest, "no").with_status(400),
                                ),
                            }
                            let _ = fut.await;
                        }
                    }
                    Op::Drop(i) => {
                        if let Some(i) = pick(i, flight.len()) {
                            drop(flight.swap_remove(i));
                        }
                    }
                    Op::Advance(ms) => advance(Duration::from_millis(ms)).await,
                }
                let Some(m) = h.cb.metrics(&()) else {
                    assert!(flight.is_empty() && rejected == 0);
                    continue;
                };
                chain.extend(h.transitions());
                // Each event leaves the state the previous one entered.
                let mut at = Closed;
                for (from, to, _) in &chain {
                    assert_eq!(*from, at);
                    at = *to;
                }
                assert_eq!(at, m.state);
                assert_eq!(m.calls, m.successes + m.failures + m.ignored + flight.len() as u64);
                assert_eq!(m.rejected, rejected);
                if m.state == HalfOpen {
                    let probes = flight
                        .iter()
                        .filter(|(_, _, generation, s)| *generation == chain.len() && *s == HalfOpen)
                        .count();
                    assert!(probes <= PROBES, "{probes} probes in flight");
                }
            }
        });
    }
}
