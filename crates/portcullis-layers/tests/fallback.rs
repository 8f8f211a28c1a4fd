//! FallbackLayer: which classes fail over, remaps, larger-context routing, readiness, streams.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use portcullis_core::{
    ChatMessage, ChatRequest, ChatStream, CircuitOpen, CompletionResult, ErrorKind, LlmError,
    StreamChunk, StreamMeta, Throttled,
};
use portcullis_layers::fallback::{Entry, Fallback, FallbackLayer};
use tower::ServiceExt;
use tower::util::BoxCloneService;
use tower_service::Service;

/// A service that answers with a fixed outcome, counts its calls, and panics when called
/// without a successful `poll_ready` first (clones start unready).
#[derive(Clone)]
struct Checked {
    name: &'static str,
    fail: Option<ErrorKind>,
    calls: Arc<AtomicUsize>,
    seen_model: Arc<std::sync::Mutex<Option<String>>>,
    ready: bool,
}

impl Checked {
    fn new(name: &'static str, fail: Option<ErrorKind>) -> Self {
        Checked {
            name,
            fail,
            calls: Arc::default(),
            seen_model: Arc::default(),
            ready: false,
        }
    }
    fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl Service<ChatRequest> for Checked {
    type Response = CompletionResult;
    type Error = LlmError;
    type Future = std::future::Ready<Result<CompletionResult, LlmError>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), LlmError>> {
        self.ready = true;
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ChatRequest) -> Self::Future {
        assert!(self.ready, "{} called without poll_ready", self.name);
        self.ready = false;
        self.calls.fetch_add(1, Ordering::SeqCst);
        *self.seen_model.lock().unwrap() = Some(req.model.to_string());
        std::future::ready(match self.fail {
            Some(kind) => Err(LlmError::new(kind, "injected").with_provider(self.name)),
            None => Ok(CompletionResult::new(
                self.name,
                req.model.to_string(),
                "ok",
            )),
        })
    }
}

fn req() -> ChatRequest {
    ChatRequest::new("gpt-4o-mini", vec![ChatMessage::user("hi")])
}

fn chain(entries: Vec<(Checked, bool)>) -> Fallback<Checked, ChatRequest> {
    Fallback::new(
        entries
            .into_iter()
            .map(|(s, larger)| Entry::new(s.name, s).larger_context(larger))
            .collect(),
    )
    .unwrap()
}

#[tokio::test]
async fn fails_over_on_transient_and_local_refusals() {
    for kind in [
        ErrorKind::Overloaded,
        ErrorKind::Server,
        ErrorKind::Connect,
        ErrorKind::Timeout,
        ErrorKind::Protocol,
        ErrorKind::RateLimited,
        ErrorKind::QuotaExhausted,
        ErrorKind::CircuitOpen,
        ErrorKind::Throttled,
    ] {
        let a = Checked::new("openai", Some(kind));
        let b = Checked::new("anthropic", None);
        let svc = chain(vec![(a.clone(), false), (b.clone(), false)]);
        let res = svc
            .oneshot(req())
            .await
            .unwrap_or_else(|e| panic!("{kind:?}: {e}"));
        assert_eq!(res.provider, "anthropic", "{kind:?}");
        assert_eq!((a.calls(), b.calls()), (1, 1), "{kind:?}");
    }
}

#[tokio::test]
async fn never_fails_over_on_caller_errors() {
    for kind in [
        ErrorKind::InvalidRequest,
        ErrorKind::Authentication,
        ErrorKind::PermissionDenied,
        ErrorKind::NotFound,
        ErrorKind::StreamInterrupted,
        ErrorKind::DeadlineExceeded,
    ] {
        let a = Checked::new("openai", Some(kind));
        let b = Checked::new("anthropic", None);
        let svc = chain(vec![(a.clone(), false), (b.clone(), false)]);
        let err = svc.oneshot(req()).await.unwrap_err();
        assert_eq!(err.kind(), kind);
        assert_eq!(b.calls(), 0, "{kind:?} must not fail over");
    }
}

#[tokio::test]
async fn context_length_goes_only_to_larger_context_entries() {
    let a = Checked::new("small", Some(ErrorKind::ContextLengthExceeded));
    let b = Checked::new("same-size", None);
    let c = Checked::new("large", None);
    let svc = chain(vec![
        (a.clone(), false),
        (b.clone(), false),
        (c.clone(), true),
    ]);
    let res = svc.oneshot(req()).await.unwrap();
    assert_eq!(res.provider, "large");
    assert_eq!((a.calls(), b.calls(), c.calls()), (1, 0, 1));

    // No larger entry: the error comes back.
    let a = Checked::new("small", Some(ErrorKind::ContextLengthExceeded));
    let b = Checked::new("same-size", None);
    let svc = chain(vec![(a, false), (b.clone(), false)]);
    let err = svc.oneshot(req()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ContextLengthExceeded);
    assert_eq!(b.calls(), 0);
}

#[tokio::test]
async fn all_failing_returns_the_last_error() {
    let a = Checked::new("a", Some(ErrorKind::Overloaded));
    let b = Checked::new("b", Some(ErrorKind::Server));
    let c = Checked::new("c", Some(ErrorKind::Timeout));
    let svc = chain(vec![
        (a.clone(), false),
        (b.clone(), false),
        (c.clone(), false),
    ]);
    let err = svc.oneshot(req()).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Timeout);
    assert_eq!(err.provider(), Some("c"));
    assert_eq!((a.calls(), b.calls(), c.calls()), (1, 1, 1));
}

#[tokio::test]
async fn entries_remap_the_request() {
    let a = Checked::new("openai", Some(ErrorKind::Overloaded));
    let b = Checked::new("anthropic", None);
    let svc = Fallback::new(vec![
        Entry::new("openai", a.clone()),
        Entry::new("anthropic", b.clone()).model("claude-haiku-4-5"),
    ])
    .unwrap();
    let res = svc.oneshot(req()).await.unwrap();
    assert_eq!(res.model, "claude-haiku-4-5");
    assert_eq!(a.seen_model.lock().unwrap().as_deref(), Some("gpt-4o-mini"));
    assert_eq!(
        b.seen_model.lock().unwrap().as_deref(),
        Some("claude-haiku-4-5")
    );
}

#[tokio::test]
async fn layer_puts_the_wrapped_service_first() {
    let a = Checked::new("openai", Some(ErrorKind::Overloaded));
    let b = Checked::new("anthropic", None);
    let layer = FallbackLayer::new("openai", vec![Entry::new("anthropic", b.clone())]);
    let svc = tower::ServiceBuilder::new().layer(layer).service(a.clone());
    assert_eq!(svc.entries().len(), 2);
    let res = svc.oneshot(req()).await.unwrap();
    assert_eq!(res.provider, "anthropic");
    assert_eq!(a.calls(), 1);
}

#[test]
fn empty_chain_is_an_error() {
    let r = Fallback::<Checked, ChatRequest>::new(vec![]);
    assert!(r.is_err());
}

#[tokio::test]
async fn marker_errors_through_box_error_fail_over() {
    type Svc = BoxCloneService<ChatRequest, &'static str, portcullis_core::BoxError>;
    let open: Svc = BoxCloneService::new(tower::service_fn(|_r: ChatRequest| async {
        Err::<&'static str, portcullis_core::BoxError>(Box::new(CircuitOpen {
            retry_after: std::time::Duration::from_secs(1),
        }))
    }));
    let throttled: Svc = BoxCloneService::new(tower::service_fn(|_r: ChatRequest| async {
        Err::<&'static str, portcullis_core::BoxError>(Box::new(Throttled {
            retry_after: std::time::Duration::from_secs(9),
        }))
    }));
    let ok: Svc = BoxCloneService::new(tower::service_fn(|_r: ChatRequest| async {
        Ok::<_, portcullis_core::BoxError>("served")
    }));
    let svc = Fallback::new(vec![
        Entry::new("a", open),
        Entry::new("b", throttled),
        Entry::new("c", ok),
    ])
    .unwrap();
    assert_eq!(svc.oneshot(req()).await.unwrap(), "served");
}

fn stream_service(
    name: &'static str,
    before_commit: Option<ErrorKind>,
    calls: Arc<AtomicUsize>,
) -> BoxCloneService<ChatRequest, ChatStream, LlmError> {
    BoxCloneService::new(tower::service_fn(move |_r: ChatRequest| {
        calls.fetch_add(1, Ordering::SeqCst);
        async move {
            if let Some(kind) = before_commit {
                return Err(LlmError::new(kind, "before first chunk").with_provider(name));
            }
            Ok(ChatStream::from_chunks(
                StreamMeta::new(name, "m"),
                vec![
                    Ok(StreamChunk::delta("hello")),
                    Err(LlmError::new(ErrorKind::StreamInterrupted, "cut").with_provider(name)),
                ],
            ))
        }
    }))
}

#[tokio::test]
async fn streams_fail_over_only_before_the_commit_point() {
    let (ca, cb) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    // Before commit: the primary's future fails, the secondary serves.
    let svc = Fallback::new(vec![
        Entry::new(
            "a",
            stream_service("a", Some(ErrorKind::Overloaded), ca.clone()),
        ),
        Entry::new("b", stream_service("b", None, cb.clone())),
    ])
    .unwrap();
    let stream = svc.oneshot(req()).await.unwrap();
    assert_eq!(stream.meta().provider, "b");
    assert_eq!(
        (ca.load(Ordering::SeqCst), cb.load(Ordering::SeqCst)),
        (1, 1)
    );

    // After commit: the error is a stream item; nothing fails over.
    let (ca, cb) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let svc = Fallback::new(vec![
        Entry::new("a", stream_service("a", None, ca.clone())),
        Entry::new("b", stream_service("b", None, cb.clone())),
    ])
    .unwrap();
    let stream = svc.oneshot(req()).await.unwrap();
    let err = stream.collect().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::StreamInterrupted);
    assert_eq!(
        (ca.load(Ordering::SeqCst), cb.load(Ordering::SeqCst)),
        (1, 0)
    );
}
