//! The retry layer's tracing events. In a test binary of its own: tracing caches callsite
//! interest process-wide, so a thread-local capture subscriber races with other tests' threads.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use portcullis_core::{ChatMessage, ChatRequest, ErrorKind, LlmError};
use portcullis_layers::retry::{Jitter, Retry, StandardPolicy};
use tower::ServiceExt;

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

fn failing(
    make: impl Fn() -> LlmError + Clone + Send + 'static,
) -> (
    impl tower::Service<ChatRequest, Response = (), Error = LlmError, Future = impl Send> + Clone,
    Arc<AtomicUsize>,
) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let svc = tower::service_fn(move |_r: ChatRequest| {
        c.fetch_add(1, Ordering::SeqCst);
        let e = make();
        async move { Err::<(), _>(e) }
    });
    (svc, calls)
}

fn err(kind: ErrorKind) -> LlmError {
    LlmError::new(kind, "boom").with_provider("openai")
}

// ---- observability ------------------------------------------------------------------------

type Events = Arc<Mutex<Vec<(tracing::Level, Vec<(String, String)>)>>>;

/// A minimal subscriber that records every event's level and fields.
struct Capture(Events);

struct Fields(Vec<(String, String)>);

impl tracing::field::Visit for Fields {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0.push((field.name().to_string(), value.to_string()));
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0
            .push((field.name().to_string(), format!("{value:?}")));
    }
}

impl tracing::Subscriber for Capture {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, event: &tracing::Event<'_>) {
        let mut fields = Fields(Vec::new());
        event.record(&mut fields);
        let level = *event.metadata().level();
        self.0.lock().unwrap().push((level, fields.0));
    }
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

#[tokio::test(start_paused = true)]
async fn logs_one_warn_event_per_retry() {
    let events = Events::default();
    let _guard = tracing::subscriber::set_default(Capture(events.clone()));
    let (svc, _) = failing(|| err(ErrorKind::Overloaded));
    Retry::new(plain(3), svc).oneshot(chat()).await.unwrap_err();
    let events = events.lock().unwrap().clone();
    let warns: Vec<_> = events
        .iter()
        .filter(|(level, _)| *level == tracing::Level::WARN)
        .map(|(_, f)| {
            f.iter()
                .cloned()
                .collect::<std::collections::HashMap<_, _>>()
        })
        .collect();
    assert_eq!(warns.len(), 3, "{events:?}");
    for (i, w) in warns.iter().enumerate() {
        assert_eq!(w["model"], "gpt-4o-mini");
        assert_eq!(w["provider"], "openai");
        assert_eq!(w["attempt"], (i + 1).to_string());
        assert_eq!(w["delay_ms"], (1000u64 << i).to_string());
        assert!(
            w["reason"].contains("overloaded") && w["reason"].contains("openai"),
            "{w:?}"
        );
    }
}
