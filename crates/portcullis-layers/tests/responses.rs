//! An `Ok` response that stands for a failure (an HTTP 503, a 429 with `Retry-After`) is read by
//! every layer through the same table as the error it stands for (`OnFinish::failure`).
//! All in paused time.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use portcullis_core::{BoxError, ErrorKind, Finished, Refusal, TokenCost};
use portcullis_layers::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, TripPolicy};
use portcullis_layers::fallback::{Entry, Fallback};
use portcullis_layers::retry::{RetryLayer, StandardPolicy};
use portcullis_layers::token_bucket::{KeyLimits, Rate, TokenBucketConfig, TokenBucketLayer};
use tokio::time::Instant;
use tower::util::BoxCloneService;
use tower::{Layer, Service, ServiceExt, service_fn};

type Svc = BoxCloneService<Request<()>, Response<()>, BoxError>;

/// A service that answers `statuses` in turn (the last one for ever), with `headers`, counting
/// its calls.
fn answering(statuses: &[u16], headers: &[(&'static str, &'static str)]) -> (Svc, Arc<AtomicU32>) {
    let calls = Arc::new(AtomicU32::new(0));
    let (statuses, headers, seen) = (statuses.to_vec(), headers.to_vec(), calls.clone());
    let svc = service_fn(move |_: Request<()>| {
        let n = seen.fetch_add(1, Ordering::SeqCst) as usize;
        let status = statuses[n.min(statuses.len() - 1)];
        let mut res = Response::builder().status(status);
        for (k, v) in &headers {
            res = res.header(*k, *v);
        }
        async move { Ok::<_, BoxError>(res.body(()).unwrap()) }
    });
    (BoxCloneService::new(svc), calls)
}

fn get() -> Request<()> {
    Request::get("/").body(()).unwrap()
}

fn policy() -> StandardPolicy {
    StandardPolicy::builder().seed(7).build().unwrap()
}

/// A breaker that opens on the first failure.
fn hair_trigger() -> CircuitBreakerLayer<portcullis_layers::SingleKey, ()> {
    let config = CircuitBreakerConfig {
        trip: TripPolicy::consecutive(1),
        ..CircuitBreakerConfig::default()
    };
    CircuitBreakerLayer::new("http", config)
        .unwrap()
        .single_key()
}

#[tokio::test(start_paused = true)]
async fn the_breaker_counts_a_503_response_as_a_failure() {
    let layer = hair_trigger();
    let (inner, calls) = answering(&[503], &[]);
    let mut svc = layer.layer(inner);
    let res = svc.ready().await.unwrap().call(get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
    // Open after one failure: the next calls are refused without reaching the service.
    for _ in 0..2 {
        let err = svc.ready().await.unwrap().call(get()).await.unwrap_err();
        assert!(
            matches!(err.downcast_ref(), Some(Refusal::CircuitOpen(_))),
            "{err}"
        );
    }
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn the_breaker_ignores_a_4xx_response_and_counts_2xx_as_success() {
    let layer = hair_trigger();
    let (inner, calls) = answering(&[404, 400, 200, 201], &[]);
    let svc = layer.layer(inner);
    for _ in 0..4 {
        svc.clone().oneshot(get()).await.unwrap();
    }
    assert_eq!(calls.load(Ordering::SeqCst), 4);
}

#[tokio::test(start_paused = true)]
async fn the_retry_retries_a_503_response_and_returns_the_last_as_is() {
    let (inner, calls) = answering(&[503], &[]);
    let res = RetryLayer::new(policy()).layer(inner).oneshot(get()).await;
    assert_eq!(res.unwrap().status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        calls.load(Ordering::SeqCst),
        4,
        "the first attempt and 3 retries"
    );

    let (inner, calls) = answering(&[503, 502, 200], &[]);
    let res = RetryLayer::new(policy()).layer(inner).oneshot(get()).await;
    assert_eq!(res.unwrap().status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}

#[tokio::test(start_paused = true)]
async fn the_retry_waits_a_429_responses_retry_after_and_leaves_4xx_alone() {
    let (inner, calls) = answering(&[429, 200], &[("retry-after", "7")]);
    let t0 = Instant::now();
    let res = RetryLayer::new(policy()).layer(inner).oneshot(get()).await;
    assert_eq!(res.unwrap().status(), StatusCode::OK);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert!(t0.elapsed() >= Duration::from_secs(7), "{:?}", t0.elapsed());

    let (inner, calls) = answering(&[404], &[]);
    let res = RetryLayer::new(policy()).layer(inner).oneshot(get()).await;
    assert_eq!(res.unwrap().status(), StatusCode::NOT_FOUND);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn the_fallback_fails_over_on_a_503_response_but_not_on_a_400() {
    let (a, a_calls) = answering(&[503], &[]);
    let (b, b_calls) = answering(&[200], &[]);
    let chain = Fallback::new(vec![Entry::new("a", a), Entry::new("b", b)]).unwrap();
    let res = chain.clone().oneshot(get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    assert_eq!(
        (
            a_calls.load(Ordering::SeqCst),
            b_calls.load(Ordering::SeqCst)
        ),
        (1, 1)
    );

    let (a, _) = answering(&[400], &[]);
    let (b, b_calls) = answering(&[200], &[]);
    let chain = Fallback::new(vec![Entry::new("a", a), Entry::new("b", b)]).unwrap();
    let res = chain.oneshot(get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_REQUEST);
    assert_eq!(b_calls.load(Ordering::SeqCst), 0);

    // With nowhere left to go, the last entry's response comes back as it is.
    let (a, _) = answering(&[503], &[]);
    let (b, _) = answering(&[502], &[]);
    let chain = Fallback::new(vec![Entry::new("a", a), Entry::new("b", b)]).unwrap();
    let res = chain.oneshot(get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::BAD_GATEWAY);
}

#[tokio::test(start_paused = true)]
async fn a_429_response_with_retry_after_pauses_the_bucket() {
    let limits = KeyLimits::unlimited().with_requests(Rate::new(100, 100.0).unwrap());
    let config = TokenBucketConfig::new()
        .default_limits(limits)
        .max_wait(Duration::from_secs(60));
    let layer = TokenBucketLayer::new("http", config)
        .unwrap()
        .single_key()
        .with_cost(|_: &Request<()>| TokenCost::default());
    let handle = layer.handle();
    let (inner, calls) = answering(&[429, 200], &[("retry-after", "20")]);
    let svc = layer.layer(inner);
    let res = svc.clone().oneshot(get()).await.unwrap();
    assert_eq!(res.status(), StatusCode::TOO_MANY_REQUESTS);
    let paused = handle
        .paused_for(&())
        .expect("a 429 response pauses the key");
    assert!(paused > Duration::from_secs(19), "{paused:?}");

    // The next call waits out the pause before it is sent.
    let t0 = Instant::now();
    assert_eq!(svc.oneshot(get()).await.unwrap().status(), StatusCode::OK);
    assert!(
        t0.elapsed() >= Duration::from_secs(19),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

/// A response type the user does not own: its classification comes in with `Finished`, under
/// the layers, by the same table.
#[tokio::test(start_paused = true)]
async fn a_users_own_classification_drives_the_layers() {
    #[derive(Debug, Clone)]
    struct Reply {
        code: u16,
    }
    let calls = Arc::new(AtomicU32::new(0));
    let seen = calls.clone();
    let inner = service_fn(move |_: Request<()>| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            Ok::<_, BoxError>(Reply {
                code: if n < 2 { 500 } else { 200 },
            })
        }
    })
    .map_response(|r: Reply| {
        let class = (r.code >= 500).then(|| ErrorKind::Server.classification());
        Finished::classified(r, class)
    });
    let svc = RetryLayer::new(policy())
        .layer(inner)
        .map_response(Finished::into_inner);
    assert_eq!(svc.oneshot(get()).await.unwrap().code, 200);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
}
