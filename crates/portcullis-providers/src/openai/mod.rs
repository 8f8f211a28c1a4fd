//! OpenAI Chat Completions (`POST {base_url}/chat/completions`) as tower services:
//! [`OpenAiProvider`] answers a [`CompletionResult`], [`OpenAiStream`] a [`ChatStream`].

mod wire;

use std::sync::Arc;

use http::header::AUTHORIZATION;
use portcullis_core::{ChatRequest, ChatStream, CompletionResult, LlmError, OPENAI};

use crate::builder::BuilderCommon;
use crate::builder::common_builder_methods;
use crate::call::Endpoint;
use crate::call::{self, ResponseFuture};

/// The default base URL (as in the official SDKs, it includes `/v1`).
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

#[derive(Debug)]
struct Shared {
    endpoint: Arc<Endpoint>,
    legacy_max_tokens: bool,
}

/// OpenAI Chat Completions as a `Service<ChatRequest, Response = CompletionResult>`.
///
/// Clones share the connection pool. `poll_ready` is always ready (there is no buffer), and the
/// provider never retries by itself. Errors are typed [`LlmError`]s: the status and the body's
/// `error.type` / `error.code` through [`ErrorKind::from_wire`](portcullis_core::ErrorKind::from_wire),
/// the rate-limit headers, and `x-request-id`.
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
pub struct OpenAiProvider {
    shared: Arc<Shared>,
}

/// The streaming face of an [`OpenAiProvider`]: a `Service<ChatRequest, Response = ChatStream>`
/// whose future resolves at the first content chunk, or with the error that came before it.
/// Get one with [`OpenAiProvider::streaming`].
#[derive(Debug, Clone)]
pub struct OpenAiStream {
    shared: Arc<Shared>,
}

/// Builds an [`OpenAiProvider`]. Defaults: base URL [`DEFAULT_BASE_URL`], key from
/// `OPENAI_API_KEY`, `max_completion_tokens`, the default [`TransportConfig`](crate::TransportConfig).
#[derive(Debug, Clone)]
pub struct OpenAiBuilder {
    common: BuilderCommon,
    legacy_max_tokens: bool,
}

impl OpenAiBuilder {
    common_builder_methods!("OPENAI_API_KEY");

    /// Sends the legacy `max_tokens` instead of `max_completion_tokens`, for OpenAI-compatible
    /// servers that only know the old name.
    pub fn legacy_max_tokens(mut self, legacy: bool) -> Self {
        self.legacy_max_tokens = legacy;
        self
    }

    /// Builds the provider. Fails with a
    /// [`Configuration`](portcullis_core::ErrorKind::Configuration) error when the key is missing
    /// or invalid, the URL is invalid, a key would go over plain http to a non-loopback host,
    /// or a transport setting is invalid.
    pub fn build(self) -> Result<OpenAiProvider, LlmError> {
        let endpoint = self.common.endpoint(
            "OPENAI_API_KEY",
            "/chat/completions",
            OPENAI,
            "x-request-id",
            |key, headers| {
                if let Some(key) = key {
                    headers.insert(AUTHORIZATION, key.header("Bearer "));
                }
            },
        )?;
        Ok(OpenAiProvider {
            shared: Arc::new(Shared {
                endpoint: Arc::new(endpoint),
                legacy_max_tokens: self.legacy_max_tokens,
            }),
        })
    }
}

impl OpenAiProvider {
    /// A builder with the defaults.
    pub fn builder() -> OpenAiBuilder {
        OpenAiBuilder {
            common: BuilderCommon::new(DEFAULT_BASE_URL),
            legacy_max_tokens: false,
        }
    }

    /// The default provider: `api.openai.com`, key from `OPENAI_API_KEY`.
    pub fn from_env() -> Result<Self, LlmError> {
        Self::builder().build()
    }

    /// The streaming service sharing this provider's settings and connection pool.
    pub fn streaming(&self) -> OpenAiStream {
        OpenAiStream {
            shared: self.shared.clone(),
        }
    }

    /// One complete call (what `Service::call` does).
    pub fn complete(&self, req: ChatRequest) -> ResponseFuture<CompletionResult> {
        self.shared.complete(req)
    }

    /// One streaming call (what [`OpenAiStream`]'s `Service::call` does). It asks for
    /// `stream_options.include_usage`, so the final chunk carries the usage.
    pub fn stream(&self, req: ChatRequest) -> ResponseFuture<ChatStream> {
        self.shared.stream(req)
    }
}

impl Shared {
    fn complete(&self, req: ChatRequest) -> ResponseFuture<CompletionResult> {
        let s = self;
        let body = wire::request_body(&req, s.legacy_max_tokens, false);
        ResponseFuture::new(call::complete(
            s.endpoint.clone(),
            req.model,
            body,
            wire::parse_completion,
        ))
    }

    fn stream(&self, req: ChatRequest) -> ResponseFuture<ChatStream> {
        let s = self;
        let body = wire::request_body(&req, s.legacy_max_tokens, true);
        ResponseFuture::new(call::stream(
            s.endpoint.clone(),
            req.model,
            body,
            wire::ChunkParser::default(),
        ))
    }
}

crate::builder::provider_services!(OpenAiProvider, OpenAiStream);
