//! The plug-in contract, as a user outside the LLM world meets it: retry, circuit breaker and
//! token bucket composed by hand with `ServiceBuilder` over a plain HTTP-shaped service
//! (`Request<String>` → `Response<Bytes>`) with its own error type. The user's code is the
//! block between the `// --- user code` markers: one error type with `Classify` and one
//! `From<Refusal>`, and the stack.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use portcullis::layers::circuit_breaker::{CircuitBreakerConfig, TripPolicy};
use portcullis::layers::retry::{RetryLayer, StandardPolicy};
use portcullis::layers::token_bucket::{KeyLimits, Rate, TokenBucketConfig};
use portcullis::layers::{CircuitBreakerLayer, TokenBucketLayer};
use portcullis::{Classification, Classify, Refusal, TokenCost};
use tower::util::BoxCloneService;
use tower::{BoxError, Service, ServiceBuilder, ServiceExt};

// --- user code ------------------------------------------------------------------------------
#[derive(Debug)]
enum ApiError {
    Status(u16),
    Refused(Refusal),
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self:?}")
    }
}

impl Classify for ApiError {
    fn classify(&self) -> Classification {
        match self {
            ApiError::Status(s) if *s >= 500 => Classification::TRANSIENT,
            ApiError::Status(_) => Classification::PERMANENT,
            ApiError::Refused(r) => r.classify(),
        }
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        ApiError::Refused(r)
    }
}

type Svc = BoxCloneService<Request<String>, Response<Bytes>, ApiError>;

fn stack(upstream: Svc) -> Result<Svc, BoxError> {
    let limits = KeyLimits::unlimited().with_requests(Rate::new(5, 1.0)?);
    let bucket = TokenBucketLayer::new("api", TokenBucketConfig::new().default_limits(limits))?;
    let trip = TripPolicy::consecutive(3);
    let breaker = CircuitBreakerConfig {
        trip,
        ..Default::default()
    };
    let retry = StandardPolicy::builder()
        .max_retries(2)
        .base_delay(MS_10)
        .build()?;
    Ok(Svc::new(
        ServiceBuilder::new()
            .layer(RetryLayer::new(retry))
            .layer(CircuitBreakerLayer::new("api", breaker)?.single_key())
            .layer(
                bucket
                    .single_key()
                    .with_cost(|_: &Request<String>| TokenCost::default()),
            )
            .service(upstream),
    ))
}
// --- end of user code ------------------------------------------------------------------------

const MS_10: Duration = Duration::from_millis(10);

/// An upstream that answers `status` errors for the first `failures` calls, then 200.
fn upstream(failures: usize, status: u16) -> (Svc, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let svc = tower::service_fn(move |req: Request<String>| {
        let n = counter.fetch_add(1, SeqCst);
        async move {
            match n < failures {
                true => Err(ApiError::Status(status)),
                false => Ok(Response::new(Bytes::from(req.into_body()))),
            }
        }
    });
    (Svc::new(svc), calls)
}

fn req(body: &str) -> Request<String> {
    Request::post("/jobs").body(body.to_owned()).unwrap()
}

#[tokio::test(start_paused = true)]
async fn retries_a_transient_error_with_the_users_own_types() {
    let (up, calls) = upstream(2, 503);
    let answer = stack(up).unwrap().oneshot(req("hello")).await.unwrap();
    assert_eq!(answer.body(), &Bytes::from("hello"));
    assert_eq!(calls.load(SeqCst), 3, "two retries, then the answer");
}

#[tokio::test(start_paused = true)]
async fn a_permanent_error_is_returned_at_once() {
    let (up, calls) = upstream(usize::MAX, 404);
    let e = stack(up).unwrap().oneshot(req("x")).await.unwrap_err();
    assert!(matches!(e, ApiError::Status(404)));
    assert_eq!(calls.load(SeqCst), 1);
}

#[tokio::test(start_paused = true)]
async fn the_breaker_opens_and_refuses_through_the_users_error() {
    let (up, calls) = upstream(usize::MAX, 500);
    let mut svc = stack(up).unwrap();
    // One call: 3 attempts, 3 consecutive failures: the breaker opens.
    let e = svc.ready().await.unwrap().call(req("a")).await.unwrap_err();
    assert!(matches!(e, ApiError::Status(500)), "{e}");
    let e = svc.ready().await.unwrap().call(req("b")).await.unwrap_err();
    assert!(
        matches!(e, ApiError::Refused(Refusal::CircuitOpen(_))),
        "{e}"
    );
    assert_eq!(
        calls.load(SeqCst),
        3,
        "the open breaker sent nothing upstream"
    );
}

#[tokio::test(start_paused = true)]
async fn the_bucket_paces_plain_requests() {
    let (up, calls) = upstream(0, 200);
    let svc = stack(up).unwrap();
    let start = tokio::time::Instant::now();
    for i in 0..7 {
        svc.clone().oneshot(req(&i.to_string())).await.unwrap();
    }
    assert_eq!(calls.load(SeqCst), 7);
    // A burst of 5, then one a second.
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(1990) && waited < Duration::from_millis(2100),
        "{waited:?}"
    );
}
