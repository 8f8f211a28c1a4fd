//! Failing over first (issue 21): for each failure class, the fallback is called at once, no
//! call sleeps while an entry can take it, sleeps follow the backoff and the deadline when every
//! entry fails, the budget bounds the attempts across entries, streams fail over only before
//! their first chunk; and the tower contract of the fallback service. All on paused time with
//! seeded RNGs: no test sleeps for real.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use portcullis_core::{
    ChatMessage, ChatRequest, ChatStream, CompletionResult, ErrorKind, LlmError, RequestInfo,
    RetryStop, StreamChunk, StreamMeta,
};
use portcullis_layers::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerHandle};
use portcullis_layers::fallback::{Entry, FailoverPolicy, Fallback};
use portcullis_layers::retry::{BudgetConfig, Jitter, RetryBudget, StandardPolicy};
use portcullis_layers::token_bucket::{
    KeyLimits, MemoryStore, Rate, TokenBucketConfig, TokenBucketHandle,
};
use portcullis_layers::{
    CircuitBreaker, CircuitBreakerLayer, Timeout, TimeoutLayer, TokenBucket, TokenBucketLayer,
};
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{Layer, ServiceExt};

const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
const MS_10: Duration = Duration::from_millis(10);

/// How a provider answers.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    Healthy,
    Status503,
    Status529,
    RateLimited(Duration),
    Hang,
    Connect,
}

impl Fault {
    /// Every failure class the fallback must move on from at once.
    const CLASSES: [Fault; 7] = [
        Fault::Status503,
        Fault::Status529,
        Fault::RateLimited(Duration::from_secs(1)),
        Fault::RateLimited(Duration::from_secs(20)),
        Fault::RateLimited(Duration::from_secs(120)),
        Fault::Hang,
        Fault::Connect,
    ];

    fn error(self, name: &'static str) -> Option<LlmError> {
        let e = |kind, status: u16| {
            Some(
                LlmError::new(kind, "injected")
                    .with_provider(name)
                    .with_status(status),
            )
        };
        match self {
            Fault::Healthy | Fault::Hang => None,
            Fault::Status503 => e(ErrorKind::Overloaded, 503),
            Fault::Status529 => e(ErrorKind::Overloaded, 529),
            Fault::RateLimited(after) => {
                e(ErrorKind::RateLimited, 429).map(|e| e.with_retry_after(after))
            }
            Fault::Connect => {
                Some(LlmError::new(ErrorKind::Connect, "refused").with_provider(name))
            }
        }
    }

    /// How long an attempt takes to fail.
    fn takes(self) -> Duration {
        match self {
            Fault::Hang => ATTEMPT_TIMEOUT,
            _ => Duration::ZERO,
        }
    }
}

type Log = Arc<Mutex<Vec<(&'static str, Instant)>>>;
type Upstream = BoxCloneService<ChatRequest, CompletionResult, LlmError>;

/// A provider that logs when it is called and answers by its (changeable) fault.
fn upstream(name: &'static str, fault: Arc<Mutex<Fault>>, log: Log) -> Upstream {
    BoxCloneService::new(tower::service_fn(move |req: ChatRequest| {
        log.lock().unwrap().push((name, Instant::now()));
        let fault = *fault.lock().unwrap();
        async move {
            if fault == Fault::Hang {
                std::future::pending::<()>().await;
            }
            match fault.error(name) {
                Some(e) => Err(e),
                None => Ok(CompletionResult::new(name, req.model.to_string(), "ok")),
            }
        }
    }))
}

type Chain = CircuitBreaker<TokenBucket<Timeout<Upstream>>>;

/// One provider as the Stack builds it: breaker → bucket → attempt timeout, gated by its
/// breaker and bucket, retried by a seeded standard policy.
struct Provider {
    entry: Entry<Chain, ChatRequest, StandardPolicy>,
    breaker: CircuitBreakerHandle<Arc<str>>,
    bucket: TokenBucketHandle<MemoryStore>,
}

fn provider(
    name: &'static str,
    svc: Upstream,
    limits: TokenBucketConfig,
    policy: StandardPolicy,
) -> Provider {
    let breaker = CircuitBreakerLayer::new(name, CircuitBreakerConfig::default()).unwrap();
    let bucket = TokenBucketLayer::new(name, limits).unwrap();
    let (bh, qh) = (breaker.handle(), bucket.handle());
    let chain = breaker.layer(bucket.layer(TimeoutLayer::new(ATTEMPT_TIMEOUT).layer(svc)));
    let (b, q) = (bh.clone(), qh.clone());
    let entry = Entry::new(name, chain)
        .gate(move |r: &ChatRequest| b.availability(&*r.model).max(q.availability(&*r.model)))
        .retry(policy);
    Provider {
        entry,
        breaker: bh,
        bucket: qh,
    }
}

fn policy(seed: u64) -> StandardPolicy {
    StandardPolicy::builder().seed(seed).build().unwrap()
}

struct Rig {
    svc: Fallback<Chain, ChatRequest, StandardPolicy>,
    log: Log,
    primary: Arc<Mutex<Fault>>,
    breaker: CircuitBreakerHandle<Arc<str>>,
    bucket: TokenBucketHandle<MemoryStore>,
}

/// The primary `a` failing by `fault`, the fallback `b` healthy, the library's defaults.
fn rig(fault: Fault, order: FailoverPolicy) -> Rig {
    let log = Log::default();
    let primary = Arc::new(Mutex::new(fault));
    let a = provider(
        "a",
        upstream("a", primary.clone(), log.clone()),
        TokenBucketConfig::new(),
        policy(1),
    );
    let b = provider(
        "b",
        upstream("b", Arc::new(Mutex::new(Fault::Healthy)), log.clone()),
        TokenBucketConfig::new(),
        policy(2),
    );
    Rig {
        svc: Fallback::new(vec![a.entry, b.entry])
            .unwrap()
            .failover(order),
        log,
        primary,
        breaker: a.breaker,
        bucket: a.bucket,
    }
}

impl Rig {
    fn calls(&self, name: &str) -> Vec<Instant> {
        let log = self.log.lock().unwrap();
        log.iter()
            .filter(|(n, _)| *n == name)
            .map(|(_, t)| *t)
            .collect()
    }
}

fn req() -> ChatRequest {
    ChatRequest::new("gpt-4o-mini", vec![ChatMessage::user("hi")])
}

#[tokio::test(start_paused = true)]
async fn each_class_reaches_the_fallback_within_10_ms_of_the_primarys_failure() {
    for fault in Fault::CLASSES {
        let rig = rig(fault, FailoverPolicy::FailoverFirst);
        let start = Instant::now();
        let res = rig.svc.clone().oneshot(req()).await.unwrap();
        assert_eq!(res.provider, "b", "{fault:?}");
        let (a, b) = (rig.calls("a"), rig.calls("b"));
        assert_eq!(a.len(), 1, "{fault:?}: the primary once");
        let failed = a[0] + fault.takes();
        assert!(b[0] >= failed && b[0] - failed <= MS_10, "{fault:?}");
        assert!(start.elapsed() <= fault.takes() + MS_10, "{fault:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn no_call_sleeps_while_an_entry_can_take_it() {
    for fault in Fault::CLASSES {
        let rig = rig(fault, FailoverPolicy::FailoverFirst);
        // A call every 500 ms for two minutes, one at a time.
        for i in 0..240 {
            let start = Instant::now();
            let res = rig.svc.clone().oneshot(req()).await.unwrap();
            assert_eq!(res.provider, "b", "{fault:?} call {i}");
            // At most the primary's failed attempt: never a backoff.
            assert!(
                start.elapsed() <= fault.takes() + MS_10,
                "{fault:?} call {i}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        let a = rig.calls("a");
        match fault {
            // Not a breaker failure: the bucket's pause (Retry-After, cut to max_pause = 30 s)
            // keeps the primary off until then.
            Fault::RateLimited(after) => {
                let pause = after.min(Duration::from_secs(30));
                for w in a.windows(2) {
                    assert!(w[1] - w[0] >= pause, "{fault:?}: {:?}", w[1] - w[0]);
                }
            }
            // Five failures open the breaker for 60 s; then one probe (calls come one at a
            // time) per recovery.
            _ => assert!(a.len() <= 5 + 3, "{fault:?}: {} primary calls", a.len()),
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_429_primary_is_passed_over_until_its_retry_after_then_preferred_again() {
    let rig = rig(
        Fault::RateLimited(Duration::from_secs(20)),
        FailoverPolicy::FailoverFirst,
    );
    let svc = rig.svc.clone();
    assert_eq!(svc.clone().oneshot(req()).await.unwrap().provider, "b");
    assert_eq!(
        rig.bucket.paused_for("gpt-4o-mini"),
        Some(Duration::from_secs(20))
    );
    // The primary recovers; it is still paused, so calls go to the fallback without trying it.
    *rig.primary.lock().unwrap() = Fault::Healthy;
    tokio::time::sleep(Duration::from_secs(19)).await;
    assert_eq!(svc.clone().oneshot(req()).await.unwrap().provider, "b");
    assert_eq!(rig.calls("a").len(), 1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(svc.clone().oneshot(req()).await.unwrap().provider, "a");
    assert_eq!(rig.breaker.state("gpt-4o-mini").as_str(), "closed");
}

/// Two entries failing 503 on everything, with the seed's backoff without jitter (1 s, 2 s,
/// 4 s) and no budget.
fn both_failing(order: FailoverPolicy) -> (Fallback<Upstream, ChatRequest, StandardPolicy>, Log) {
    let log = Log::default();
    let policy = || {
        StandardPolicy::builder()
            .jitter(Jitter::None)
            .no_budget()
            .build()
            .unwrap()
    };
    let entry = |name| {
        let svc = upstream(name, Arc::new(Mutex::new(Fault::Status503)), log.clone());
        Entry::new(name, svc).retry(policy())
    };
    let svc = Fallback::new(vec![entry("a"), entry("b")])
        .unwrap()
        .failover(order);
    (svc, log)
}

fn schedule(log: &Log, start: Instant) -> Vec<(&'static str, u64)> {
    let log = log.lock().unwrap();
    log.iter()
        .map(|(n, t)| (*n, (*t - start).as_millis() as u64))
        .collect()
}

#[tokio::test(start_paused = true)]
async fn with_every_entry_failing_the_sleeps_follow_the_backoff() {
    let (svc, log) = both_failing(FailoverPolicy::FailoverFirst);
    let start = Instant::now();
    let err = svc.oneshot(req()).await.unwrap_err();
    assert_eq!(
        schedule(&log, start),
        [
            ("a", 0),
            ("b", 0),
            ("a", 1000),
            ("b", 1000),
            ("a", 3000),
            ("b", 3000),
            ("a", 7000),
            ("b", 7000)
        ],
        "a failure goes to the other entry at once; both down, the call backs off, then tries them in order"
    );
    assert_eq!(err.kind(), ErrorKind::Overloaded);
    assert_eq!(err.attempts(), Some(8));
    assert_eq!(err.retry_stop(), Some(RetryStop::Exhausted));
}

#[tokio::test(start_paused = true)]
async fn with_every_entry_failing_no_sleep_outlives_the_deadline() {
    let (svc, log) = both_failing(FailoverPolicy::FailoverFirst);
    let start = Instant::now();
    let mut r = req();
    r.set_deadline(start + Duration::from_secs(5));
    let err = svc.oneshot(r).await.unwrap_err();
    // After 3 s the next backoff (4 s) would pass the deadline: the call ends there.
    assert_eq!(
        schedule(&log, start),
        [
            ("a", 0),
            ("b", 0),
            ("a", 1000),
            ("b", 1000),
            ("a", 3000),
            ("b", 3000)
        ]
    );
    assert_eq!(start.elapsed(), Duration::from_secs(3));
    assert_eq!(err.retry_stop(), Some(RetryStop::Deadline));

    // A deadline already passed never leaves.
    let (svc, log) = both_failing(FailoverPolicy::FailoverFirst);
    let mut r = req();
    r.set_deadline(Instant::now());
    let err = svc.oneshot(r).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DeadlineExceeded);
    assert!(log.lock().unwrap().is_empty());
}

#[tokio::test(start_paused = true)]
async fn retry_each_then_fallback_keeps_the_old_order() {
    let (svc, log) = both_failing(FailoverPolicy::RetryEachThenFallback);
    let start = Instant::now();
    svc.oneshot(req()).await.unwrap_err();
    assert_eq!(
        schedule(&log, start),
        [
            ("a", 0),
            ("a", 1000),
            ("a", 3000),
            ("a", 7000),
            ("b", 7000),
            ("b", 8000),
            ("b", 10000),
            ("b", 14000)
        ]
    );
    // A dead primary, a healthy fallback: the first call waits out the primary's backoff.
    let rig = rig(Fault::Status503, FailoverPolicy::RetryEachThenFallback);
    let start = Instant::now();
    assert_eq!(rig.svc.clone().oneshot(req()).await.unwrap().provider, "b");
    assert!(start.elapsed() > Duration::ZERO);
    assert_eq!(rig.calls("a").len(), 4);
}

#[tokio::test(start_paused = true)]
async fn the_budget_bounds_the_attempts_across_entries() {
    let log = Log::default();
    // One retry in the window, for every entry together.
    let budget = Arc::new(
        RetryBudget::new(&BudgetConfig {
            retry_ratio: 0.0,
            min_per_sec: 0.1,
            window: Duration::from_secs(10),
        })
        .unwrap(),
    );
    let entry = |name| {
        let svc = upstream(name, Arc::new(Mutex::new(Fault::Status503)), log.clone());
        let policy = StandardPolicy::builder()
            .max_retries(10)
            .shared_budget(budget.clone())
            .seed(3)
            .build()
            .unwrap();
        Entry::new(name, svc).retry(policy)
    };
    let svc = Fallback::new(vec![entry("a"), entry("b"), entry("c")]).unwrap();
    let err = svc.clone().oneshot(req()).await.unwrap_err();
    // A first try of each entry, and the one retry the budget holds.
    assert_eq!(log.lock().unwrap().len(), 3 + 1);
    assert_eq!(err.attempts(), Some(4));
    assert_eq!(err.retry_stop(), Some(RetryStop::BudgetExhausted));
    // The next call gets no retry at all.
    svc.oneshot(req()).await.unwrap_err();
    assert_eq!(log.lock().unwrap().len(), 4 + 3);
}

type StreamSvc = BoxCloneService<ChatRequest, ChatStream, LlmError>;

/// A streaming provider: fails before its first chunk, or sends one chunk and then fails.
fn stream_provider(name: &'static str, before_first_chunk: bool, log: Log) -> StreamSvc {
    BoxCloneService::new(tower::service_fn(move |_r: ChatRequest| {
        log.lock().unwrap().push((name, Instant::now()));
        async move {
            if before_first_chunk {
                return Err(
                    LlmError::new(ErrorKind::Overloaded, "before the first chunk")
                        .with_provider(name)
                        .with_status(529),
                );
            }
            Ok(ChatStream::from_chunks(
                StreamMeta::new(name, "m"),
                vec![
                    Ok(StreamChunk::delta("hello")),
                    Err(LlmError::new(ErrorKind::Overloaded, "after content").with_provider(name)),
                ],
            ))
        }
    }))
}

#[tokio::test(start_paused = true)]
async fn a_stream_fails_over_before_its_first_chunk_and_never_after() {
    let log = Log::default();
    let entry = |name, before, seed| {
        Entry::new(name, stream_provider(name, before, log.clone())).retry(policy(seed))
    };
    let svc = Fallback::new(vec![entry("a", true, 1), entry("b", false, 2)]).unwrap();
    let start = Instant::now();
    let stream = svc.oneshot(req()).await.unwrap();
    assert_eq!(stream.meta().provider, "b");
    assert_eq!(
        start.elapsed(),
        Duration::ZERO,
        "at once, before the first chunk"
    );
    // After the commit point the error is the caller's: no failover, no retry.
    let err = stream.collect().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Overloaded);
    assert_eq!(schedule(&log, start), [("a", 0), ("b", 0)]);
}

// ---- the tower contract -------------------------------------------------------------------

/// Polls a future once, with a waker that does nothing.
fn poll_once<F: Future + ?Sized>(f: Pin<&mut F>) -> std::task::Poll<F::Output> {
    f.poll(&mut std::task::Context::from_waker(std::task::Waker::noop()))
}

type Mocked = tower_test::mock::Mock<ChatRequest, CompletionResult>;

fn boxed_503() -> LlmError {
    LlmError::new(ErrorKind::Overloaded, "down").with_status(503)
}

#[tokio::test(start_paused = true)]
async fn poll_ready_comes_before_every_attempt_retries_included() {
    // tower-test's mocks panic when called without a successful poll_ready.
    let (a, mut ha) = tower_test::mock::pair::<ChatRequest, CompletionResult>();
    let (b, mut hb) = tower_test::mock::pair::<ChatRequest, CompletionResult>();
    let entry = |name, svc: Mocked| Entry::new(name, svc).retry(policy(9));
    let svc = Fallback::new(vec![entry("a", a), entry("b", b)]).unwrap();
    // The fallback is not ready yet: its failover waits for it, and calls it only once ready.
    hb.allow(0);
    let call = tokio::spawn(svc.oneshot(req()));
    let (_, reply) = ha.next_request().await.unwrap();
    reply.send_error(boxed_503());
    tokio::task::yield_now().await;
    assert!(hb.poll_request().is_pending(), "called before it was ready");
    hb.allow(1);
    let (_, reply) = hb.next_request().await.unwrap();
    reply.send_error(boxed_503());
    // Both failed: after a backoff, the primary again, on a clone driven ready again.
    let (_, reply) = ha.next_request().await.unwrap();
    reply.send_response(CompletionResult::new("a", "m", "ok"));
    let res = call.await.unwrap().unwrap();
    assert_eq!(res.provider, "a");
}

#[tokio::test(start_paused = true)]
async fn clones_share_the_breakers_the_gates_read() {
    let rig = rig(Fault::Status503, FailoverPolicy::FailoverFirst);
    let (one, two) = (rig.svc.clone(), rig.svc.clone());
    for _ in 0..5 {
        one.clone().oneshot(req()).await.unwrap();
    }
    assert_eq!(rig.breaker.state("gpt-4o-mini").as_str(), "open");
    // The other clone sees the open breaker: it goes straight to the fallback.
    for _ in 0..10 {
        assert_eq!(two.clone().oneshot(req()).await.unwrap().provider, "b");
    }
    assert_eq!(rig.calls("a").len(), 5);
}

#[tokio::test(start_paused = true)]
async fn dropping_the_future_releases_permits_and_reservations() {
    let log = Log::default();
    let hang = Arc::new(Mutex::new(Fault::Hang));
    let a = provider(
        "a",
        upstream("a", hang.clone(), log.clone()),
        TokenBucketConfig::new(),
        policy(1),
    );
    // The fallback admits one request a minute, and waits up to two minutes for its slot.
    let one_a_minute = KeyLimits::unlimited().with_requests(Rate::new(1, 1.0 / 60.0).unwrap());
    let limits = TokenBucketConfig::new()
        .default_limits(one_a_minute)
        .max_wait(Duration::from_secs(120));
    let b = provider(
        "b",
        upstream("b", Arc::new(Mutex::new(Fault::Healthy)), log.clone()),
        limits,
        policy(2),
    );
    let (a_breaker, b_bucket) = (a.breaker.clone(), b.bucket.clone());
    let svc = Fallback::new(vec![a.entry, b.entry]).unwrap();
    let in_flight = || a_breaker.metrics("gpt-4o-mini").map_or(0, |m| m.in_flight);

    // Mid-call on the primary: its breaker permit is held, then released by the drop.
    let mut call: Pin<Box<dyn Future<Output = _>>> = Box::pin(svc.clone().oneshot(req()));
    assert!(poll_once(call.as_mut()).is_pending());
    assert_eq!(in_flight(), 1);
    drop(call);
    assert_eq!(in_flight(), 0);

    // Queued in the fallback's bucket after the primary failed: the reservation is refunded.
    *hang.lock().unwrap() = Fault::Status503;
    svc.clone().oneshot(req()).await.unwrap(); // takes the fallback's one slot
    let reservations = || b_bucket.level("gpt-4o-mini").unwrap().reservations;
    let mut call: Pin<Box<dyn Future<Output = _>>> = Box::pin(svc.clone().oneshot(req()));
    assert!(poll_once(call.as_mut()).is_pending());
    assert_eq!(reservations(), 1);
    drop(call);
    assert_eq!(reservations(), 0);
    assert_eq!(in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_response_that_stands_for_a_failure_fails_over_as_its_error_would() {
    type HttpSvc =
        BoxCloneService<http::Request<()>, http::Response<()>, portcullis_core::BoxError>;
    let log = Log::default();
    let answering = |name: &'static str, status: u16| {
        let log = log.clone();
        HttpSvc::new(tower::service_fn(move |_r: http::Request<()>| {
            log.lock().unwrap().push((name, Instant::now()));
            let res = http::Response::builder().status(status).body(()).unwrap();
            async move { Ok(res) }
        }))
    };
    let no_jitter = || {
        StandardPolicy::builder()
            .jitter(Jitter::None)
            .no_budget()
            .build()
            .unwrap()
    };
    let get = || http::Request::get("/v1/x").body(()).unwrap();
    // An `Ok` 503 from the primary goes to the fallback at once.
    let svc = Fallback::new(vec![
        Entry::new("a", answering("a", 503)).retry(no_jitter()),
        Entry::new("b", answering("b", 200)).retry(no_jitter()),
    ])
    .unwrap();
    let start = Instant::now();
    assert_eq!(svc.oneshot(get()).await.unwrap().status(), 200);
    assert_eq!(schedule(&log, start), [("a", 0), ("b", 0)]);
    // Every entry answering 503: the backoff as for errors, then the last response as it is.
    log.lock().unwrap().clear();
    let svc = Fallback::new(vec![
        Entry::new("a", answering("a", 503)).retry(no_jitter()),
        Entry::new("b", answering("b", 503)).retry(no_jitter()),
    ])
    .unwrap();
    let start = Instant::now();
    assert_eq!(svc.oneshot(get()).await.unwrap().status(), 503);
    let times: Vec<u64> = schedule(&log, start).into_iter().map(|(_, t)| t).collect();
    assert_eq!(times, [0, 0, 1000, 1000, 3000, 3000, 7000, 7000]);
}
