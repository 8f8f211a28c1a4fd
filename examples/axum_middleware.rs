//! # Portcullis' layers as axum middleware, around routes that are not LLM calls at all
//!
//! Retry, circuit breaker and a per-attempt timeout around the routes of an existing axum app.
//! The layers read the app's `http::Response`s by the same classification table as the
//! providers' errors: a handler's 503 is retried and counts as a breaker failure, a 404 is
//! neither, a 429 with `Retry-After` is retried after it.
//!
//! Axum needs three things of a tower stack, and [`resilient`] shows each:
//! - **an infallible service**: `HandleErrorLayer` on top turns the layers' refusals (circuit
//!   open, attempt timed out) into responses ([`refusal_response`]);
//! - **an error the layers can refuse with**: a route's error is `Infallible`, so
//!   `map_err(BoxError::from)` under the layers makes it a `BoxError`, which has
//!   `From<Refusal>` and `Classify`;
//! - **a request that can be sent twice**, for the retry: the body is read once, into a
//!   `Full<Bytes>` that clones (`AsyncFilterLayer`, with a size limit), and turned back into an
//!   axum `Body` under the layers.
//!
//! The breaker is keyed by the route's path, so one failing route does not shut the others.
//!
//! ```text
//! cargo run --example axum_middleware
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::error_handling::HandleErrorLayer;
use axum::http::{Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use http_body_util::Full;
use portcullis::layers::circuit_breaker::{CircuitBreakerConfig, CircuitBreakerLayer, TripPolicy};
use portcullis::layers::retry::{RetryLayer, StandardPolicy};
use portcullis::layers::timeout::TimeoutLayer;
use portcullis::{BoxError, Refusal, RetriesExhausted};
use tower::ServiceBuilder;
use tower::filter::AsyncFilterLayer;

/// The largest request body the middleware buffers (it must, to send a request twice).
pub const BODY_LIMIT: usize = 1 << 20;

/// The app's own state: whether `/flaky` is broken, and how often its handler ran.
#[derive(Debug, Default)]
pub struct Flaky {
    /// While set, `/flaky` answers 503.
    pub broken: AtomicBool,
    /// Calls that reached the `/flaky` handler.
    pub calls: AtomicU32,
}

/// An ordinary axum app: `/flaky` answers 503 while broken, `/hello` always answers.
pub fn app(flaky: Arc<Flaky>) -> Router {
    Router::new()
        .route(
            "/flaky",
            get(move || async move {
                flaky.calls.fetch_add(1, Ordering::SeqCst);
                match flaky.broken.load(Ordering::SeqCst) {
                    true => (StatusCode::SERVICE_UNAVAILABLE, "down for now").into_response(),
                    false => "fine".into_response(),
                }
            }),
        )
        .route("/hello", get(|| async { "hello" }))
}

/// The app with retry, a breaker per route and a per-attempt timeout around every route.
///
/// The errors are the layers' own: `consecutive(3)` and a 50 ms first backoff keep the demo
/// short; an app would start from `CircuitBreakerConfig::default()` and
/// `RetryLayer::standard()`.
pub fn resilient(app: Router) -> Result<Router, BoxError> {
    let retry = StandardPolicy::builder()
        .base_delay(Duration::from_millis(50))
        .build()?;
    let config = CircuitBreakerConfig {
        trip: TripPolicy::consecutive(3),
        ..CircuitBreakerConfig::default()
    };
    let breaker = CircuitBreakerLayer::new("routes", config)?
        .key_by(|req: &Request<Full<Bytes>>| req.uri().path().to_owned());
    let middleware = ServiceBuilder::new()
        // 1. Axum wants an infallible service: refusals become responses.
        .layer(HandleErrorLayer::new(|err: BoxError| async move {
            refusal_response(&err)
        }))
        // 2. A body that can be sent again.
        .layer(AsyncFilterLayer::new(|req: Request<Body>| async move {
            let (parts, body) = req.into_parts();
            let bytes = axum::body::to_bytes(body, BODY_LIMIT).await?;
            Ok::<_, BoxError>(Request::from_parts(parts, Full::new(bytes)))
        }))
        // 3. The layers: retry outermost, then the breaker, then each attempt's timeout.
        .layer(RetryLayer::new(retry))
        .layer(breaker)
        .layer(TimeoutLayer::new(Duration::from_secs(10)))
        // 4. Back to what a route takes, with an error the layers can refuse with.
        .map_request(|req: Request<Full<Bytes>>| req.map(Body::new))
        .map_err(BoxError::from);
    Ok(app.layer(middleware))
}

/// What a client sees when the layers refuse: 503 with `Retry-After` for an open circuit,
/// 504 for a timeout, 413 for a body over the limit, else 500.
pub fn refusal_response(err: &BoxError) -> Response {
    let refusal = err.downcast_ref::<Refusal>().or_else(|| {
        err.downcast_ref::<RetriesExhausted<BoxError>>()
            .and_then(|r| r.last.downcast_ref::<Refusal>())
    });
    match refusal {
        Some(Refusal::CircuitOpen(_) | Refusal::Throttled(_)) => {
            let secs = refusal
                .and_then(Refusal::retry_after)
                .map_or(1, |d| d.as_secs().max(1));
            let retry_after = [(header::RETRY_AFTER, secs.to_string())];
            (
                StatusCode::SERVICE_UNAVAILABLE,
                retry_after,
                err.to_string(),
            )
                .into_response()
        }
        Some(Refusal::AttemptTimedOut(_) | Refusal::DeadlineExceeded(_)) => {
            (StatusCode::GATEWAY_TIMEOUT, err.to_string()).into_response()
        }
        _ if err.is::<axum::Error>() => {
            (StatusCode::PAYLOAD_TOO_LARGE, err.to_string()).into_response()
        }
        _ => (StatusCode::INTERNAL_SERVER_ERROR, err.to_string()).into_response(),
    }
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    use tower::ServiceExt;

    let flaky = Arc::new(Flaky::default());
    let app = resilient(app(flaky.clone()))?;
    let get = |path: &'static str| {
        let app = app.clone();
        async move {
            let res = app.oneshot(Request::get(path).body(Body::empty())?).await?;
            Ok::<_, BoxError>(res.status())
        }
    };

    println!("/flaky healthy: {}", get("/flaky").await?);
    flaky.broken.store(true, Ordering::SeqCst);
    for i in 1..=3 {
        let before = flaky.calls.load(Ordering::SeqCst);
        let status = get("/flaky").await?;
        let reached = flaky.calls.load(Ordering::SeqCst) - before;
        println!("/flaky broken, call {i}: {status} (the handler ran {reached} times)");
    }
    println!("/hello meanwhile: {}", get("/hello").await?);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    async fn status(app: &Router, path: &str) -> StatusCode {
        let req = Request::get(path).body(Body::empty()).unwrap();
        app.clone().oneshot(req).await.unwrap().status()
    }

    /// A handler's 503 is an `Ok` response: the layers classify it by the table, so the retry
    /// retries it and the breaker trips on it; then the handler is no longer reached.
    #[tokio::test(start_paused = true)]
    async fn the_breaker_trips_on_the_handlers_5xx() {
        let flaky = Arc::new(Flaky::default());
        let app = resilient(app(flaky.clone())).unwrap();
        assert_eq!(status(&app, "/flaky").await, StatusCode::OK);
        flaky.broken.store(true, Ordering::SeqCst);
        let before = flaky.calls.load(Ordering::SeqCst);

        // Three 503s (the first attempt and two retries) open the breaker; the third retry is
        // refused by it, and the caller sees the refusal as a 503 with Retry-After.
        let res = app
            .clone()
            .oneshot(Request::get("/flaky").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(res.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(res.headers().contains_key(header::RETRY_AFTER));
        assert_eq!(flaky.calls.load(Ordering::SeqCst) - before, 3);

        // Open: the handler is not reached again.
        for _ in 0..3 {
            assert_eq!(
                status(&app, "/flaky").await,
                StatusCode::SERVICE_UNAVAILABLE
            );
        }
        assert_eq!(flaky.calls.load(Ordering::SeqCst) - before, 3);

        // Keyed by path: the other route still answers.
        assert_eq!(status(&app, "/hello").await, StatusCode::OK);
    }

    /// A 404 is not a failure of the route: no retry, no breaker failure.
    #[tokio::test(start_paused = true)]
    async fn a_4xx_is_neither_retried_nor_counted() {
        let app = resilient(app(Arc::new(Flaky::default()))).unwrap();
        for _ in 0..5 {
            assert_eq!(status(&app, "/missing").await, StatusCode::NOT_FOUND);
        }
    }

    /// A body over the limit is refused before the layers, with a 413.
    #[tokio::test]
    async fn an_oversized_body_is_refused() {
        let app = resilient(app(Arc::new(Flaky::default()))).unwrap();
        let req = Request::get("/hello")
            .body(Body::from(vec![b'x'; BODY_LIMIT + 1]))
            .unwrap();
        let res = app.oneshot(req).await.unwrap();
        assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
}
