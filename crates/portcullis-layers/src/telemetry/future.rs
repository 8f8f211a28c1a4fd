//! [`TelemetryFuture`].

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use portcullis_core::{Finish, LlmError, OnFinish};

use super::service::{Call, Served, provider_name};

pin_project! {
    /// The response future of [`Telemetry`](super::Telemetry): polls the call inside its span
    /// and records the outcome when it resolves (for a stream, the usage when it ends).
    pub struct TelemetryFuture<F> {
        #[pin]
        inner: F,
        span: tracing::Span,
        call: Option<Call>,
    }
}

impl<F> TelemetryFuture<F> {
    pub(crate) fn new(inner: F, span: tracing::Span, call: Option<Call>) -> Self {
        TelemetryFuture { inner, span, call }
    }
}

impl<F> std::fmt::Debug for TelemetryFuture<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryFuture").finish_non_exhaustive()
    }
}

impl<F, T> Future for TelemetryFuture<F>
where
    F: Future<Output = Result<T, LlmError>>,
    T: Served + OnFinish,
{
    type Output = Result<T, LlmError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = {
            let _entered = this.span.enter();
            ready!(this.inner.poll(cx))
        };
        let Some(call) = this.call.take() else {
            return Poll::Ready(out);
        };
        let span = this.span.clone();
        match out {
            Ok(mut res) => {
                let provider = provider_name(res.provider());
                span.record("gen_ai.provider.name", provider);
                span.record("gen_ai.response.model", res.model());
                if res.is_streaming() {
                    let after = call.started.elapsed();
                    span.record(
                        "portcullis.time_to_first_chunk_ms",
                        after.as_millis() as u64,
                    );
                    super::first_chunk(&call, provider, after);
                }
                // Owned for the hook only when metrics are on (a stream's ends later).
                #[cfg(feature = "metrics")]
                let provider = call.meters.provider(provider);
                #[cfg(not(feature = "metrics"))]
                let provider = ();
                res.on_finish(move |finish: &Finish| {
                    let usage = finish
                        .usage()
                        .filter(|u| u.input_tokens + u.output_tokens > 0);
                    if let Some(u) = usage {
                        span.record("gen_ai.usage.input_tokens", u.input_tokens);
                        span.record("gen_ai.usage.output_tokens", u.output_tokens);
                    }
                    let error = match finish {
                        Finish::Failed { .. } => {
                            super::interrupted(&call, &provider);
                            span.record("error.type", "stream_interrupted");
                            Some("stream_interrupted")
                        }
                        _ => None,
                    };
                    let tokens = usage.map(|u| (u.input_tokens, u.output_tokens));
                    super::call(&call, &provider, tokens, error);
                });
                Poll::Ready(Ok(res))
            }
            Err(e) => {
                let kind = e.kind().as_str();
                span.record("error.type", kind);
                let provider = provider_name(e.provider().unwrap_or("none"));
                super::call(&call, provider, None, Some(kind));
                Poll::Ready(Err(e))
            }
        }
    }
}
