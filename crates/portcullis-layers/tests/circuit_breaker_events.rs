//! The breaker's tracing events. In a test binary of its own: tracing caches callsite interest
//! process-wide, so a thread-local capture subscriber races with other tests' threads.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use portcullis_core::{ErrorKind, LlmError};
use portcullis_layers::CircuitBreakerLayer;
use portcullis_layers::circuit_breaker::CircuitBreakerConfig;
use tokio::time::advance;
use tower::{Layer, ServiceExt};

/// Records the level of every event the crate logs.
#[derive(Clone, Default)]
struct Levels(Arc<std::sync::Mutex<Vec<tracing::Level>>>);

impl tracing::Subscriber for Levels {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        if event.metadata().target().starts_with("portcullis_layers") {
            self.0.lock().unwrap().push(*event.metadata().level());
        }
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test(start_paused = true)]
async fn each_transition_is_logged_once_warn_when_opening() {
    let levels = Levels::default();
    let _guard = tracing::subscriber::set_default(levels.clone());
    let failing = Arc::new(AtomicBool::new(true));
    let f = failing.clone();
    let inner = tower::service_fn(move |_r: &'static str| {
        let fail = f.load(Ordering::SeqCst);
        async move {
            if fail {
                Err(LlmError::new(ErrorKind::Overloaded, "busy"))
            } else {
                Ok(String::new())
            }
        }
    });
    let layer = CircuitBreakerLayer::new("t", CircuitBreakerConfig::default())
        .unwrap()
        .single_key();
    let svc = layer.layer(inner);
    for _ in 0..5 {
        svc.clone().oneshot("x").await.unwrap_err(); // the 5th opens
    }
    advance(Duration::from_secs(60)).await;
    svc.clone().oneshot("x").await.unwrap_err(); // half-open, then open again
    advance(Duration::from_secs(60)).await;
    failing.store(false, Ordering::SeqCst);
    for _ in 0..3 {
        svc.clone().oneshot("x").await.unwrap(); // half-open, then closed after 3
    }
    use tracing::Level;
    assert_eq!(
        *levels.0.lock().unwrap(),
        vec![
            Level::WARN,
            Level::INFO,
            Level::WARN,
            Level::INFO,
            Level::INFO
        ]
    );
}
