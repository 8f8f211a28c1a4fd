//! [`TelemetryLayer`].

use tower_layer::Layer;

use super::Telemetry;

/// Records each call through the wrapped service: a `gen_ai.chat` span with the GenAI
/// attributes, and (with the `metrics` feature) `gen_ai.client.operation.duration`,
/// `gen_ai.client.token.usage`, the time to a stream's first chunk and stream interruptions.
/// The `Stack` puts it outermost; over a single provider service it works the same.
///
/// ```
/// use portcullis_core::{ChatMessage, ChatRequest, CompletionResult, LlmError};
/// use portcullis_layers::telemetry::TelemetryLayer;
/// use tower::{Layer, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let provider = service_fn(|req: ChatRequest| async move {
///     Ok::<_, LlmError>(CompletionResult::new("openai", req.model.to_string(), "hi"))
/// });
/// let svc = TelemetryLayer::new().layer(provider);
/// let res = svc.oneshot(ChatRequest::new("gpt-4o", vec![ChatMessage::user("hello")])).await;
/// assert_eq!(res.unwrap().content, "hi");
/// # }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct TelemetryLayer {
    _priv: (),
}

impl TelemetryLayer {
    /// The layer.
    pub fn new() -> Self {
        TelemetryLayer::default()
    }
}

impl<S> Layer<S> for TelemetryLayer {
    type Service = Telemetry<S>;

    fn layer(&self, inner: S) -> Telemetry<S> {
        Telemetry::new(inner)
    }
}
