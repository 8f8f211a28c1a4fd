//! [`Telemetry`] and what it reads of a response ([`Served`]).

use std::task::{Context, Poll};

use portcullis_core::{ChatRequest, ChatStream, CompletionResult, LlmError, OnFinish};
use tokio::time::Instant;
use tower_service::Service;

use super::TelemetryFuture;

/// What telemetry reads of a response: who served it and with which model.
///
/// The built-in responses implement it; a response type of your own does in two lines:
///
/// ```
/// use portcullis_layers::telemetry::Served;
///
/// struct MyAnswer { backend: String, model: String }
///
/// impl Served for MyAnswer {
///     fn provider(&self) -> &str { &self.backend }
///     fn model(&self) -> &str { &self.model }
/// }
/// ```
pub trait Served {
    /// The provider that answered (`openai`, `anthropic`, `azure-openai`, …).
    fn provider(&self) -> &str;
    /// The model that answered.
    fn model(&self) -> &str;
}

impl Served for CompletionResult {
    fn provider(&self) -> &str {
        &self.provider
    }
    fn model(&self) -> &str {
        &self.model
    }
}

impl Served for ChatStream {
    fn provider(&self) -> &str {
        &self.meta().provider
    }
    fn model(&self) -> &str {
        &self.meta().model
    }
}

/// The GenAI semantic conventions' name of a provider: `azure-openai` is `azure.ai.openai`;
/// the others keep their names.
pub(crate) fn provider_name(provider: &str) -> &str {
    match provider {
        "azure-openai" => "azure.ai.openai",
        other => other,
    }
}

/// One call, as its metrics are labelled (no allocation: the model is the request's `Arc`).
#[derive(Debug, Clone)]
pub(crate) struct Call {
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) model: std::sync::Arc<str>,
    pub(crate) started: Instant,
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    pub(crate) meters: super::CallMeters,
}

/// The service of a [`TelemetryLayer`](super::TelemetryLayer).
#[derive(Debug, Clone)]
pub struct Telemetry<S> {
    inner: S,
    meters: super::CallMeters,
}

impl<S> Telemetry<S> {
    /// Records calls through `inner`.
    pub fn new(inner: S) -> Self {
        Telemetry {
            inner,
            meters: Default::default(),
        }
    }
}

impl<S> Service<ChatRequest> for Telemetry<S>
where
    S: Service<ChatRequest, Error = LlmError>,
    S::Response: Served + OnFinish,
{
    type Response = S::Response;
    type Error = LlmError;
    type Future = TelemetryFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), LlmError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: ChatRequest) -> Self::Future {
        let span = tracing::info_span!(
            "gen_ai.chat",
            otel.name = %format_args!("chat {}", req.model),
            gen_ai.operation.name = "chat",
            gen_ai.request.model = %req.model,
            gen_ai.request.max_tokens = req.options.max_tokens,
            gen_ai.provider.name = tracing::field::Empty,
            gen_ai.response.model = tracing::field::Empty,
            gen_ai.response.finish_reasons = tracing::field::Empty,
            gen_ai.usage.input_tokens = tracing::field::Empty,
            gen_ai.usage.output_tokens = tracing::field::Empty,
            error.type = tracing::field::Empty,
            portcullis.time_to_first_chunk_ms = tracing::field::Empty,
        );
        // Nothing to record (no metrics compiled in, no subscriber for the span): a plain
        // pass-through, with no clock read.
        let call = (super::ENABLED || !span.is_disabled()).then(|| Call {
            model: req.model.clone(),
            started: Instant::now(),
            meters: self.meters.clone(),
        });
        let inner = {
            let _entered = span.enter();
            self.inner.call(req)
        };
        TelemetryFuture::new(inner, span, call)
    }
}
