//! Anthropic Messages (`POST {base_url}/v1/messages`) as tower services:
//! [`AnthropicProvider`] answers a [`CompletionResult`], [`AnthropicStream`] a [`ChatStream`].

mod wire;

use std::sync::Arc;

use http::HeaderValue;
use portcullis_core::{ANTHROPIC, ChatRequest, ChatStream, CompletionResult, LlmError};

use crate::builder::BuilderCommon;
use crate::builder::common_builder_methods;
use crate::call::Endpoint;
use crate::call::{self, ResponseFuture};

/// The default base URL (as in the official SDKs, without `/v1`).
pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";

/// The `anthropic-version` header sent with every request.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

#[derive(Debug)]
struct Shared {
    endpoint: Arc<Endpoint>,
}

/// Anthropic Messages as a `Service<ChatRequest, Response = CompletionResult>`.
///
/// Clones share the connection pool. `poll_ready` is always ready (there is no buffer), and the
/// provider never retries by itself. Errors are typed [`LlmError`]s: the status and the body's
/// `error.type` / `error.code` through [`ErrorKind::from_wire`](portcullis_core::ErrorKind::from_wire),
/// the rate-limit headers, and `request-id`. System messages go to the top-level `system`
/// field; `response_format` has no Anthropic equivalent and is not sent.
///
/// ```no_run
/// use portcullis_core::{ChatMessage, ChatRequest};
/// use portcullis_providers::AnthropicProvider;
///
/// # async fn run() -> Result<(), portcullis_core::LlmError> {
/// let claude = AnthropicProvider::from_env()?; // reads ANTHROPIC_API_KEY
/// let req = ChatRequest::new("claude-haiku-4-5", vec![ChatMessage::user("Hello")]);
/// let done = claude.complete(req.clone()).await?;
/// println!("{} ({} tokens)", done.content, done.usage.total_tokens);
///
/// let mut stream = claude.stream(req).await?; // resolves at the first content chunk
/// # let _ = &mut stream;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct AnthropicProvider {
    shared: Arc<Shared>,
}

/// The streaming face of an [`AnthropicProvider`]: a `Service<ChatRequest, Response = ChatStream>`
/// whose future resolves at the first content chunk, or with the error that came before it.
/// Get one with [`AnthropicProvider::streaming`].
#[derive(Debug, Clone)]
pub struct AnthropicStream {
    shared: Arc<Shared>,
}

/// Builds an [`AnthropicProvider`]. Defaults: base URL [`DEFAULT_BASE_URL`], key from
/// `ANTHROPIC_API_KEY`, the default [`TransportConfig`](crate::TransportConfig).
#[derive(Debug, Clone)]
pub struct AnthropicBuilder {
    common: BuilderCommon,
}

impl AnthropicBuilder {
    common_builder_methods!("ANTHROPIC_API_KEY");

    /// Builds the provider. Fails with a
    /// [`Configuration`](portcullis_core::ErrorKind::Configuration) error when the key is missing
    /// or invalid, the URL is invalid, a key would go over plain http to a non-loopback host,
    /// or a transport setting is invalid.
    pub fn build(self) -> Result<AnthropicProvider, LlmError> {
        let endpoint = self.common.endpoint(
            "ANTHROPIC_API_KEY",
            "/v1/messages",
            ANTHROPIC,
            "request-id",
            |key, headers| {
                if let Some(key) = key {
                    headers.insert("x-api-key", key.header(""));
                }
                headers.insert(
                    "anthropic-version",
                    HeaderValue::from_static(ANTHROPIC_VERSION),
                );
            },
        )?;
        Ok(AnthropicProvider {
            shared: Arc::new(Shared {
                endpoint: Arc::new(endpoint),
            }),
        })
    }
}

impl AnthropicProvider {
    /// A builder with the defaults.
    pub fn builder() -> AnthropicBuilder {
        AnthropicBuilder {
            common: BuilderCommon::new(DEFAULT_BASE_URL),
        }
    }

    /// The default provider: `api.anthropic.com`, key from `ANTHROPIC_API_KEY`.
    pub fn from_env() -> Result<Self, LlmError> {
        Self::builder().build()
    }

    /// The streaming service sharing this provider's settings and connection pool.
    pub fn streaming(&self) -> AnthropicStream {
        AnthropicStream {
            shared: self.shared.clone(),
        }
    }

    /// One complete call (what `Service::call` does).
    pub fn complete(&self, req: ChatRequest) -> ResponseFuture<CompletionResult> {
        self.shared.complete(req)
    }

    /// One streaming call (what [`AnthropicStream`]'s `Service::call` does). The final chunk
    /// carries the usage (cumulative, from `message_delta`).
    pub fn stream(&self, req: ChatRequest) -> ResponseFuture<ChatStream> {
        self.shared.stream(req)
    }
}

impl Shared {
    fn complete(&self, req: ChatRequest) -> ResponseFuture<CompletionResult> {
        let s = self;
        let body = wire::request_body(&req, false);
        ResponseFuture::new(call::complete(
            s.endpoint.clone(),
            req.model,
            body,
            wire::parse_message,
        ))
    }

    fn stream(&self, req: ChatRequest) -> ResponseFuture<ChatStream> {
        let s = self;
        let body = wire::request_body(&req, true);
        ResponseFuture::new(call::stream(
            s.endpoint.clone(),
            req.model,
            body,
            wire::MessageParser::default(),
        ))
    }
}

crate::builder::provider_services!(AnthropicProvider, AnthropicStream);
