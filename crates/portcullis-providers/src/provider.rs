//! [`Provider`] and [`StreamingProvider`]: one LLM HTTP API, described by its [`Wire`], as tower
//! services.

use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use portcullis_core::{ChatRequest, ChatStream, CompletionResult, LlmError};
use tower_service::Service;

use crate::builder::Builder;
use crate::call::{self, Endpoint, ResponseFuture};
use crate::transport::Transport;
use crate::wire::Wire;

/// An LLM HTTP API as a `Service<ChatRequest, Response = CompletionResult>`; its
/// [`Wire`] says what the API looks like.
///
/// Clones share the connection pool. `poll_ready` is always ready (the pooled client queues
/// internally, and there is no buffer), and the provider never retries by itself. Errors are
/// typed [`LlmError`]s: the status and the wire's reading of the error body through
/// [`ErrorKind::from_wire`](portcullis_core::ErrorKind::from_wire), the rate-limit headers, and
/// the wire's request-id header.
///
/// ```no_run
/// use portcullis_core::{ChatMessage, ChatRequest};
/// use portcullis_providers::OpenAiProvider;
///
/// # async fn run() -> Result<(), portcullis_core::LlmError> {
/// let openai = OpenAiProvider::from_env()?; // reads OPENAI_API_KEY
/// let req = ChatRequest::new("gpt-4o-mini", vec![ChatMessage::user("Hello")]);
/// let done = openai.complete(req.clone()).await?;
/// println!("{} ({} tokens)", done.content, done.usage.total_tokens);
///
/// let mut stream = openai.stream(req).await?; // resolves at the first content chunk
/// # let _ = &mut stream;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct Provider<W> {
    ep: Arc<Endpoint<W>>,
}

/// The streaming face of a [`Provider`]: a `Service<ChatRequest, Response = ChatStream>` whose
/// future resolves at the first content chunk, or with the error that came before it. Get one
/// with [`Provider::streaming`].
#[derive(Debug, Clone)]
pub struct StreamingProvider<W> {
    ep: Arc<Endpoint<W>>,
}

impl<W: Wire + Default> Provider<W> {
    /// A builder for the default wire (e.g. `OpenAiProvider::builder()`).
    pub fn builder() -> Builder<W> {
        Builder::new(W::default())
    }

    /// The provider with the defaults: the wire's base URL, the key from its environment
    /// variable (e.g. `api.openai.com` and `OPENAI_API_KEY`).
    pub fn from_env() -> Result<Self, LlmError> {
        Self::builder().build()
    }
}

impl<W: Wire> Provider<W> {
    pub(crate) fn from_endpoint(ep: Arc<Endpoint<W>>) -> Self {
        Provider { ep }
    }

    /// The streaming service sharing this provider's settings and connection pool.
    pub fn streaming(&self) -> StreamingProvider<W> {
        StreamingProvider {
            ep: self.ep.clone(),
        }
    }

    /// One complete call (what `Service::call` does).
    pub fn complete(&self, req: ChatRequest) -> ResponseFuture<CompletionResult> {
        let body = self.ep.wire.request_body(&req, false);
        ResponseFuture::new(call::complete(self.ep.clone(), req, body))
    }

    /// One streaming call (what [`StreamingProvider`]'s `Service::call` does). The final chunk
    /// carries the finish reason and the usage.
    pub fn stream(&self, req: ChatRequest) -> ResponseFuture<ChatStream> {
        stream(&self.ep, req)
    }

    /// The wire.
    pub fn wire(&self) -> &W {
        &self.ep.wire
    }

    /// The transport; pass it to another builder's [`transport`](Builder::transport) to share
    /// the connection pool.
    pub fn transport(&self) -> &Transport {
        &self.ep.transport
    }

    /// The full URL requests go to (base URL and the wire's path).
    pub fn url(&self) -> &Uri {
        &self.ep.url
    }
}

impl<W: Wire> StreamingProvider<W> {
    /// The complete-call provider with the same settings and connection pool.
    pub fn provider(&self) -> Provider<W> {
        Provider::from_endpoint(self.ep.clone())
    }
}

impl<W: Wire> Service<ChatRequest> for Provider<W> {
    type Response = CompletionResult;
    type Error = LlmError;
    type Future = ResponseFuture<CompletionResult>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), LlmError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ChatRequest) -> Self::Future {
        self.complete(req)
    }
}

impl<W: Wire> Service<ChatRequest> for StreamingProvider<W> {
    type Response = ChatStream;
    type Error = LlmError;
    type Future = ResponseFuture<ChatStream>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), LlmError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ChatRequest) -> Self::Future {
        stream(&self.ep, req)
    }
}

fn stream<W: Wire>(ep: &Arc<Endpoint<W>>, req: ChatRequest) -> ResponseFuture<ChatStream> {
    let body = ep.wire.request_body(&req, true);
    ResponseFuture::new(call::stream(ep.clone(), req, body))
}
