//! The layers at the HTTP level (`portcullis::http`), without any client library: raw
//! `http::Request<Bytes>` → `http::Response<B>` over mock upstreams on paused time, and over the
//! transport against the simulator.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use portcullis::http::{HttpConfig, HttpLayer, Transport, TransportConfig};
use portcullis::layers::token_bucket::{KeyLimits, TokenBucketConfig};
use portcullis::{BoxError, ErrorKind, Finish, LlmError, OnFinish};
use portcullis_sim::Simulator;
use tower::{Layer, Service, ServiceExt, service_fn};

const CHAT: &str = "http://upstream/v1/chat/completions";

fn chat(body: &str) -> Request<Bytes> {
    Request::post(CHAT)
        .body(Bytes::from(body.to_owned()))
        .unwrap()
}

fn hello(model: &str, max_tokens: u32) -> Request<Bytes> {
    chat(&format!(
        r#"{{"model":"{model}","max_tokens":{max_tokens},"messages":[{{"role":"user","content":"Hello there"}}]}}"#
    ))
}

type Seen = Arc<Mutex<Vec<Request<Bytes>>>>;
type Upstream = tower::util::BoxCloneSyncService<Request<Bytes>, Response<Full<Bytes>>, BoxError>;

/// An upstream answering `status` with `body` (the requests it saw are kept).
fn answering(
    status: u16,
    headers: &'static [(&'static str, &'static str)],
    body: Bytes,
) -> (Upstream, Seen) {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let svc = service_fn(move |req: Request<Bytes>| {
        log.lock().unwrap().push(req);
        let mut res = Response::builder().status(status);
        for (k, v) in headers {
            res = res.header(*k, *v);
        }
        let res = res.body(Full::new(body.clone())).unwrap();
        async move { Ok::<_, BoxError>(res) }
    });
    (Upstream::new(svc), seen)
}

fn layer() -> HttpLayer {
    let mut config = HttpConfig::default();
    config.retry.seed = Some(7);
    HttpLayer::new("openai", config).unwrap()
}

const USAGE_JSON: &str =
    r#"{"id":"c","usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}"#;

#[tokio::test(start_paused = true)]
async fn a_body_that_is_not_json_passes_with_the_default_key_and_cost() {
    let (upstream, seen) = answering(400, &[], Bytes::from_static(b"{\"error\":{}}"));
    let layer = layer();
    let limiter = layer.limiter();
    let svc = layer.layer(upstream);
    for body in ["{not json", "", "[]", r#"{"model":42}"#] {
        let res = svc.clone().oneshot(chat(body)).await.unwrap();
        assert_eq!(res.status(), 400, "{body:?}: passed, answered, not retried");
    }
    assert_eq!(seen.lock().unwrap().len(), 4, "each sent once, untouched");
    assert_eq!(seen.lock().unwrap()[0].body(), &Bytes::from("{not json"));
    // The default key is the path.
    assert!(limiter.level("/v1/chat/completions").is_some());
}

#[tokio::test(start_paused = true)]
async fn a_body_without_a_model_is_keyed_by_its_path() {
    let (upstream, _) = answering(503, &[], Bytes::new());
    let layer = layer();
    let breakers = layer.breaker();
    let path = "/openai/deployments/gpt4o/chat/completions";
    let req = Request::post(format!("http://azure{path}?api-version=2024-10-21"))
        .body(Bytes::from(
            r#"{"messages":[{"role":"user","content":"Hi"}]}"#,
        ))
        .unwrap();
    let res = layer.layer(upstream).oneshot(req).await.unwrap();
    assert_eq!(res.status(), 503, "retried, then returned as it is");
    let m = breakers.metrics(path).expect("a breaker for the path");
    assert_eq!(
        m.failures, 4,
        "the first attempt and 3 retries, all breaker failures"
    );
}

#[tokio::test(start_paused = true)]
async fn an_oversized_error_body_is_classified_by_its_status_and_passed_on_whole() {
    // 1 MiB that starts like a quota error: only the first 64 KiB are read, so the code is not
    // seen; the 429 is a rate limit by its status, retried after its retry-after.
    let mut big =
        br#"{"error":{"type":"insufficient_quota","code":"insufficient_quota","message":""#
            .to_vec();
    big.resize(1 << 20, b'x');
    big.extend_from_slice(b"\"}}");
    let (upstream, seen) = answering(429, &[("retry-after", "1")], Bytes::from(big.clone()));
    let res = layer()
        .layer(upstream)
        .oneshot(hello("gpt-4o-mini", 10))
        .await
        .unwrap();
    assert_eq!(
        seen.lock().unwrap().len(),
        4,
        "classified as a rate limit by its status"
    );
    let body = res
        .into_inner()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body.len(), big.len(), "every byte passed on");

    // Under the limit, the body's code decides: quota is never retried.
    let small = Bytes::from_static(
        br#"{"error":{"type":"insufficient_quota","code":"insufficient_quota","message":"no"}}"#,
    );
    let (upstream, seen) = answering(429, &[("retry-after", "1")], small.clone());
    let res = layer()
        .layer(upstream)
        .oneshot(hello("gpt-4o-mini", 10))
        .await
        .unwrap();
    assert_eq!(
        seen.lock().unwrap().len(),
        1,
        "insufficient_quota: one upstream request"
    );
    let err = res.to_error().unwrap();
    assert_eq!(err.kind(), ErrorKind::QuotaExhausted);
    assert_eq!(err.code(), Some("insufficient_quota"));
    let body = res
        .into_inner()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body, small);
}

#[tokio::test(start_paused = true)]
async fn a_429_retry_after_drives_the_retry_and_pauses_the_key() {
    let (upstream, seen) = answering(
        429,
        &[("retry-after-ms", "2500"), ("retry-after", "9")],
        Bytes::from_static(
            br#"{"error":{"type":"requests","code":"rate_limit_exceeded","message":"slow down"}}"#,
        ),
    );
    let layer = layer();
    let limiter = layer.limiter();
    let svc = layer.layer(upstream);
    let t0 = tokio::time::Instant::now();
    let res = svc.clone().oneshot(hello("gpt-4o-mini", 10)).await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 4);
    // retry-after-ms wins: three waits of 2.5 s (+ up to 10 % jitter).
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(7500) && took < Duration::from_secs(9),
        "{took:?}"
    );
    let err = res.to_error().unwrap();
    assert_eq!(
        (err.kind(), err.retry_after()),
        (ErrorKind::RateLimited, Some(Duration::from_millis(2500)))
    );
    assert!(
        limiter.paused_for("gpt-4o-mini").is_some(),
        "the key is paused"
    );
}

type Frames =
    std::pin::Pin<Box<dyn futures_core::Stream<Item = Result<Frame<Bytes>, BoxError>> + Send>>;

/// A streamed body whose frames are `events`, then (if `hang`) nothing ever again.
fn sse(
    events: Vec<&'static str>,
    hang: bool,
) -> impl Service<
    Request<Bytes>,
    Response = Response<StreamBody<Frames>>,
    Error = BoxError,
    Future = impl Send,
> + Clone {
    use futures_util::StreamExt;
    service_fn(move |_req: Request<Bytes>| {
        let frames = stream::iter(
            events
                .iter()
                .map(|e| Ok(Frame::data(Bytes::from_static(e.as_bytes()))))
                .collect::<Vec<_>>(),
        );
        let frames: Frames = match hang {
            true => Box::pin(frames.chain(stream::pending())),
            false => Box::pin(frames),
        };
        let res = Response::builder()
            .header("content-type", "text/event-stream")
            .body(StreamBody::new(frames))
            .unwrap();
        async move { Ok::<_, BoxError>(res) }
    })
}

const CHUNK: &str = "data: {\"choices\":[{\"delta\":{\"content\":\"Hi\"}}]}\n\n";
const USAGE: &str = "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":9,\"completion_tokens\":2,\"total_tokens\":11}}\n\n";
const DONE: &str = "data: [DONE]\n\n";

fn limits() -> TokenBucketConfig {
    TokenBucketConfig::new().limit("gpt-4o-mini", KeyLimits::rpm_tpm(600, 10_000).unwrap())
}

#[tokio::test(start_paused = true)]
async fn a_stream_reconciles_the_bucket_with_its_usage_at_its_last_event() {
    let config = HttpConfig {
        limits: limits(),
        ..HttpConfig::default()
    };
    let layer = HttpLayer::new("openai", config).unwrap();
    let limiter = layer.limiter();
    // The stream never closes: its last event ends it for the layers.
    let svc = layer.layer(sse(vec![CHUNK, USAGE, DONE], true));
    let mut res = svc.oneshot(hello("gpt-4o-mini", 500)).await.unwrap();
    let finished = Arc::new(Mutex::new(Vec::new()));
    let log = finished.clone();
    res.on_finish(move |f| log.lock().unwrap().push(f.clone()));
    let tokens = || limiter.level("gpt-4o-mini").unwrap().tokens().unwrap();
    assert!(
        tokens() < 10_000.0 - 500.0,
        "the estimate is reserved: {}",
        tokens()
    );
    let mut body = res.into_inner().into_body();
    for _ in 0..3 {
        body.frame().await.unwrap().unwrap();
    }
    assert!(
        (tokens() - (10_000.0 - 11.0)).abs() < 1.0,
        "reconciled to the usage: {}",
        tokens()
    );
    assert_eq!(limiter.level("gpt-4o-mini").unwrap().reservations, 0);
    drop(body);
    let seen = finished.lock().unwrap();
    assert_eq!(seen.len(), 1, "the hook ran once");
    assert!(matches!(seen[0], Finish::Completed { usage: Some(u) } if u.total_tokens == 11));
}

#[tokio::test(start_paused = true)]
async fn a_stream_dropped_mid_way_releases_what_it_holds_once() {
    let config = HttpConfig {
        limits: limits(),
        ..HttpConfig::default()
    };
    let layer = HttpLayer::new("openai", config).unwrap();
    let (limiter, breakers) = (layer.limiter(), layer.breaker());
    let svc = layer.layer(sse(vec![CHUNK], true));
    let mut res = svc.oneshot(hello("gpt-4o-mini", 500)).await.unwrap();
    let finished = Arc::new(Mutex::new(Vec::new()));
    let log = finished.clone();
    res.on_finish(move |f| log.lock().unwrap().push(f.clone()));
    assert_eq!(breakers.metrics("gpt-4o-mini").unwrap().in_flight, 1);
    assert_eq!(limiter.level("gpt-4o-mini").unwrap().reservations, 1);
    let mut body = res.into_inner().into_body();
    body.frame().await.unwrap().unwrap();
    drop(body);
    let seen = finished.lock().unwrap();
    assert_eq!(seen.len(), 1, "the hook ran once");
    assert!(matches!(seen[0], Finish::Cancelled { .. }), "{:?}", seen[0]);
    let m = breakers.metrics("gpt-4o-mini").unwrap();
    assert_eq!(
        (m.in_flight, m.failures, m.successes),
        (0, 0, 0),
        "the permit came back, uncounted"
    );
    assert_eq!(limiter.level("gpt-4o-mini").unwrap().reservations, 0);
}

#[tokio::test(start_paused = true)]
async fn an_idle_stream_ends_with_a_timeout_and_an_error_event_counts_as_its_failure() {
    let config = HttpConfig {
        stream_idle_timeout: Duration::from_secs(5),
        ..HttpConfig::default()
    };
    let layer = HttpLayer::new("openai", config.clone()).unwrap();
    let breakers = layer.breaker();
    let res = layer
        .layer(sse(vec![CHUNK], true))
        .oneshot(hello("m", 5))
        .await
        .unwrap();
    let mut body = res.into_inner().into_body();
    body.frame().await.unwrap().unwrap();
    let t0 = tokio::time::Instant::now();
    let err = body.frame().await.unwrap().unwrap_err();
    assert_eq!(t0.elapsed(), Duration::from_secs(5));
    assert_eq!(
        err.downcast_ref::<LlmError>().unwrap().kind(),
        ErrorKind::Timeout
    );
    assert_eq!(
        breakers.metrics("m").unwrap().failures,
        1,
        "a timeout is a breaker failure"
    );

    let layer = HttpLayer::new("openai", config).unwrap();
    let breakers = layer.breaker();
    let overloaded = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"busy\"}}\n\n";
    let res = layer
        .layer(sse(vec![overloaded], false))
        .oneshot(hello("m", 5))
        .await
        .unwrap();
    let mut body = res.into_inner().into_body();
    body.frame().await.unwrap().unwrap();
    assert_eq!(
        breakers.metrics("m").unwrap().failures,
        1,
        "the event names an overload"
    );
}

/// A stream whose chunks come every 3 s never trips a 5 s idle limit, however long it runs;
/// once it goes quiet, the limit counts from its last chunk.
#[tokio::test(start_paused = true)]
async fn a_busy_stream_is_never_idle_and_the_limit_counts_from_the_last_chunk() {
    use futures_util::StreamExt;
    let config = HttpConfig {
        stream_idle_timeout: Duration::from_secs(5),
        ..HttpConfig::default()
    };
    let upstream = service_fn(|_req: Request<Bytes>| async {
        let frames = stream::iter(0..6)
            .then(|_| async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                Ok::<_, BoxError>(Frame::data(Bytes::from_static(CHUNK.as_bytes())))
            })
            .chain(stream::pending());
        let frames: Frames = Box::pin(frames);
        let res = Response::builder()
            .header("content-type", "text/event-stream")
            .body(StreamBody::new(frames))
            .unwrap();
        Ok::<_, BoxError>(res)
    });
    let layer = HttpLayer::new("openai", config).unwrap();
    let res = layer.layer(upstream).oneshot(hello("m", 5)).await.unwrap();
    let mut body = res.into_inner().into_body();
    let t0 = tokio::time::Instant::now();
    for _ in 0..6 {
        body.frame().await.unwrap().unwrap();
    }
    assert_eq!(
        t0.elapsed(),
        Duration::from_secs(18),
        "18 s of chunks, no timeout"
    );
    let err = body.frame().await.unwrap().unwrap_err();
    assert_eq!(
        t0.elapsed(),
        Duration::from_secs(23),
        "5 s after the last chunk"
    );
    assert_eq!(
        err.downcast_ref::<LlmError>().unwrap().kind(),
        ErrorKind::Timeout
    );
}

#[tokio::test(start_paused = true)]
async fn a_json_body_reconciles_at_its_end() {
    let config = HttpConfig {
        limits: limits(),
        ..HttpConfig::default()
    };
    let layer = HttpLayer::new("openai", config).unwrap();
    let limiter = layer.limiter();
    let (upstream, _) = answering(200, &[], Bytes::from_static(USAGE_JSON.as_bytes()));
    let res = layer
        .layer(upstream)
        .oneshot(hello("gpt-4o-mini", 500))
        .await
        .unwrap();
    let body = res
        .into_inner()
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(body, USAGE_JSON.as_bytes());
    let tokens = limiter.level("gpt-4o-mini").unwrap().tokens().unwrap();
    assert!((tokens - (10_000.0 - 12.0)).abs() < 1.0, "{tokens}");
}

/// Over the transport against the simulator (real sockets): the limits are learned from the
/// simulator's headers, and the usage reconciles the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_transport_the_limits_are_learned() {
    let sim = Simulator::builder().seed(1).start().await.unwrap();
    let layer = HttpLayer::new("openai", HttpConfig::default()).unwrap();
    let limiter = layer.limiter();
    let svc = layer.layer(Transport::new(TransportConfig::default()).unwrap());
    let calls = Arc::new(AtomicU32::new(0));
    for stream in [false, true] {
        let body = format!(
            r#"{{"model":"gpt-4o-mini","max_tokens":20,"stream":{stream},"stream_options":{{"include_usage":true}},"messages":[{{"role":"user","content":"Hello there"}}]}}"#
        );
        let req = Request::post(format!("{}/chat/completions", sim.openai_base_url()))
            .header("authorization", "Bearer sk-test")
            .header("content-type", "application/json")
            .body(Bytes::from(body))
            .unwrap();
        let res = svc.clone().oneshot(req).await.unwrap();
        assert_eq!(res.status(), 200);
        res.into_inner().into_body().collect().await.unwrap();
        calls.fetch_add(1, Ordering::SeqCst);
    }
    let levels = limiter.level("gpt-4o-mini").unwrap();
    assert_eq!(
        levels.limits.requests.unwrap().capacity(),
        10_000,
        "learned from the headers"
    );
    assert_eq!(levels.reservations, 0);
    assert_eq!(sim.stats().requests, 2);
    sim.shutdown().await;
}
