//! Timeout, deadline and stream-idle layers, with paused time.

use std::time::Duration;

use futures_util::StreamExt;
use portcullis_core::{
    ChatMessage, ChatRequest, ChatStream, ErrorKind, LlmError, RequestInfo, StreamChunk, StreamMeta,
};
use portcullis_layers::timeout::{DeadlineLayer, StreamIdleLayer, TimeoutLayer};
use tokio::time::Instant;
use tower::{ServiceBuilder, ServiceExt, service_fn};

fn req() -> ChatRequest {
    ChatRequest::new("m", vec![ChatMessage::user("hi")])
}

fn sleeper(
    d: Duration,
) -> impl tower::Service<ChatRequest, Response = &'static str, Error = LlmError, Future = impl Send>
+ Clone {
    service_fn(move |_r: ChatRequest| async move {
        tokio::time::sleep(d).await;
        Ok::<_, LlmError>("done")
    })
}

#[tokio::test(start_paused = true)]
async fn attempt_timeout_fires_exactly_at_its_boundary() {
    let start = Instant::now();
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_secs(10)))
        .service(sleeper(Duration::from_secs(11)));
    let err = svc.oneshot(req()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert_eq!(start.elapsed(), Duration::from_secs(10));

    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_secs(10)))
        .service(sleeper(Duration::from_millis(9_999)));
    assert_eq!(svc.oneshot(req()).await.unwrap(), "done");
}

#[tokio::test(start_paused = true)]
async fn a_request_can_ask_for_its_own_attempt_timeout() {
    let start = Instant::now();
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_secs(10)))
        .service(sleeper(Duration::from_secs(60)));
    let err = svc
        .oneshot(req().timeout(Duration::from_secs(2)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert_eq!(start.elapsed(), Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn the_deadline_bounds_an_attempt_and_is_visible_inside() {
    let start = Instant::now();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(None));
    let seen2 = seen.clone();
    let inner = service_fn(move |r: ChatRequest| {
        *seen2.lock().unwrap() = RequestInfo::deadline(&r);
        async {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<&'static str, LlmError>("done")
        }
    });
    let svc = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_secs(5)))
        .layer(TimeoutLayer::new(Duration::from_secs(30)))
        .service(inner);
    let err = svc.oneshot(req()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DeadlineExceeded);
    assert_eq!(start.elapsed(), Duration::from_secs(5));
    assert_eq!(*seen.lock().unwrap(), Some(start + Duration::from_secs(5)));
}

#[tokio::test(start_paused = true)]
async fn an_earlier_caller_deadline_wins() {
    let start = Instant::now();
    let svc = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::from_secs(30)))
        .service(sleeper(Duration::from_secs(60)));
    let err = svc
        .oneshot(req().with_deadline(start + Duration::from_secs(3)))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DeadlineExceeded);
    assert_eq!(start.elapsed(), Duration::from_secs(3));
}

#[tokio::test(start_paused = true)]
async fn idle_streams_fail_and_busy_ones_do_not() {
    let inner = service_fn(|_r: ChatRequest| async {
        let chunks = futures_util::stream::iter(0..3).then(|i| async move {
            // Gaps of 1 s, 2 s, 4 s between chunks.
            tokio::time::sleep(Duration::from_secs(1 << i)).await;
            Ok::<_, LlmError>(StreamChunk::delta(format!("c{i}")))
        });
        Ok::<_, LlmError>(ChatStream::new(StreamMeta::new("p", "m"), chunks))
    });
    let svc = ServiceBuilder::new()
        .layer(StreamIdleLayer::new(Duration::from_secs(3)))
        .service(inner);
    let mut stream = svc.oneshot(req()).await.unwrap();
    assert_eq!(stream.next().await.unwrap().unwrap().delta, "c0");
    assert_eq!(stream.next().await.unwrap().unwrap().delta, "c1");
    let err = stream.next().await.unwrap().unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert!(
        stream.next().await.is_none(),
        "the stream ends after the idle error"
    );
}

/// Issue 19, part 4: a request whose deadline has already passed is not called, even by a
/// service that would answer at once.
#[tokio::test(start_paused = true)]
async fn a_passed_deadline_is_never_called() {
    use tower::Layer;
    tokio::time::advance(Duration::from_secs(10)).await;
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let c = calls.clone();
    let inner = service_fn(move |_r: ChatRequest| {
        c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async { Ok::<&'static str, LlmError>("done") }
    });
    let past = Instant::now() - Duration::from_secs(1);
    let timeout = TimeoutLayer::new(Duration::from_secs(30)).layer(inner.clone());
    let err = timeout
        .oneshot(req().with_deadline(past))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DeadlineExceeded);
    let deadline = DeadlineLayer::new(Duration::from_secs(30)).layer(inner);
    let err = deadline
        .oneshot(req().with_deadline(past))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::DeadlineExceeded);
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
}

/// Issue 19, part 3: `Duration::MAX` as a layer's timeout, a deadline budget, or a request's
/// own attempt timeout means "no limit": the call completes, nothing panics.
#[tokio::test(start_paused = true)]
async fn duration_max_is_no_limit_not_a_panic() {
    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::MAX))
        .service(sleeper(Duration::from_secs(60)));
    assert_eq!(svc.oneshot(req()).await.unwrap(), "done");

    let svc = ServiceBuilder::new()
        .layer(DeadlineLayer::new(Duration::MAX))
        .service(sleeper(Duration::from_secs(60)));
    assert_eq!(svc.oneshot(req()).await.unwrap(), "done");

    let svc = ServiceBuilder::new()
        .layer(TimeoutLayer::new(Duration::from_secs(10)))
        .service(sleeper(Duration::from_secs(60)));
    assert_eq!(
        svc.oneshot(req().timeout(Duration::MAX)).await.unwrap(),
        "done"
    );
}

/// Issue 19, part 3: an idle limit of `Duration::MAX` is no limit, not a panic after the
/// first chunk.
#[tokio::test(start_paused = true)]
async fn an_idle_limit_of_duration_max_is_no_limit() {
    let inner = service_fn(|_r: ChatRequest| async {
        let chunks = futures_util::stream::iter(0..3).then(|i| async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok::<_, LlmError>(StreamChunk::delta(format!("c{i}")))
        });
        Ok::<_, LlmError>(ChatStream::new(StreamMeta::new("p", "m"), chunks))
    });
    let svc = ServiceBuilder::new()
        .layer(StreamIdleLayer::new(Duration::MAX))
        .service(inner);
    let stream = svc.oneshot(req()).await.unwrap();
    let chunks: Vec<_> = StreamExt::collect(stream).await;
    assert_eq!(chunks.len(), 3);
    assert!(chunks.iter().all(Result::is_ok));
}

/// Issue 19, part 6: a stream that trickles a chunk every 100 ms forever is never idle, so
/// only the optional total limit ends it: with a Timeout, at the limit, after the chunks that
/// came in time.
#[tokio::test(start_paused = true)]
async fn a_trickling_stream_is_bounded_by_the_total_limit() {
    let inner = service_fn(|_r: ChatRequest| async {
        let chunks = futures_util::stream::iter(0..).then(|i| async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, LlmError>(StreamChunk::delta(format!("c{i}")))
        });
        Ok::<_, LlmError>(ChatStream::new(StreamMeta::new("p", "m"), chunks))
    });
    let svc = ServiceBuilder::new()
        .layer(StreamIdleLayer::new(Duration::from_secs(30)).total(Duration::from_secs(1)))
        .service(inner);
    let start = Instant::now();
    let mut stream = svc.oneshot(req()).await.unwrap();
    let mut ok = 0;
    let err = loop {
        match stream.next().await {
            Some(Ok(_)) => ok += 1,
            Some(Err(e)) => break e,
            None => panic!("a trickling stream does not end by itself"),
        }
    };
    assert_eq!(err.kind(), ErrorKind::Timeout, "{err}");
    assert!(err.message().contains("total limit"), "{err}");
    assert_eq!(start.elapsed(), Duration::from_secs(1));
    assert!((9..=10).contains(&ok), "{ok} chunks before the limit");
    assert!(stream.next().await.is_none(), "nothing after the limit");
}

proptest::proptest! {
    /// Issue 19, part 3: no duration a caller controls makes Timeout + Deadline + Retry panic
    /// over a service that always answers.
    #[test]
    fn arbitrary_durations_never_panic(
        timeout_secs in proptest::prelude::any::<u64>(),
        timeout_nanos in 0u32..1_000_000_000,
        budget_secs in proptest::prelude::any::<u64>(),
        budget_nanos in 0u32..1_000_000_000,
        layer_secs in proptest::prelude::any::<u64>(),
        deadline_secs in proptest::prelude::any::<u64>(),
    ) {
        use portcullis_layers::retry::{Jitter, RetryLayer, StandardPolicy};

        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .start_paused(true)
            .build()
            .unwrap();
        rt.block_on(async {
            let policy = StandardPolicy::builder()
                .jitter(Jitter::None)
                .no_budget()
                .build()
                .unwrap();
            let svc = ServiceBuilder::new()
                .layer(DeadlineLayer::new(Duration::new(budget_secs, budget_nanos)))
                .layer(RetryLayer::new(policy))
                .layer(TimeoutLayer::new(Duration::from_secs(layer_secs)))
                .service(sleeper(Duration::from_millis(1)));
            let mut r = req().timeout(Duration::new(timeout_secs, timeout_nanos));
            if let Some(at) = Instant::now().checked_add(Duration::from_secs(deadline_secs)) {
                r = r.with_deadline(at);
            }
            // Zero durations time out; the point is that nothing panics.
            let _ = svc.oneshot(r).await;
        });
    }
}
