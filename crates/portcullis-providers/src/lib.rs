//! # portcullis-providers
//!
//! LLM HTTP APIs as [`tower_service::Service`]s, over one pooled hyper + rustls [`Transport`].
//! One generic [`Provider`] does the HTTP, the errors and the streaming for every API; a
//! [`Wire`] says what one API looks like (path, headers, request body, response, stream events,
//! error body). OpenAI Chat Completions ([`OpenAi`]), Anthropic Messages ([`Anthropic`]) and
//! Azure OpenAI deployments ([`AzureOpenAi`]) are built in; an OpenAI-compatible server (vLLM,
//! Ollama, LM Studio) is the OpenAI wire at its base URL ([`OpenAiProvider::compatible`]);
//! another API is one more `Wire` (see [`wire`]).
//!
//! | service | request | response |
//! |---|---|---|
//! | [`Provider<W>`](Provider): [`OpenAiProvider`], [`AnthropicProvider`], [`AzureOpenAiProvider`] | [`ChatRequest`](portcullis_core::ChatRequest) | [`CompletionResult`](portcullis_core::CompletionResult) |
//! | [`StreamingProvider<W>`](StreamingProvider) (from `.streaming()`): [`OpenAiStream`], [`AnthropicStream`], [`AzureOpenAiStream`] | [`ChatRequest`](portcullis_core::ChatRequest) | [`ChatStream`](portcullis_core::ChatStream) |
//!
//! - **Typed errors.** Every failure is an [`LlmError`](portcullis_core::LlmError) whose kind
//!   comes from [`ErrorKind::from_wire`](portcullis_core::ErrorKind::from_wire) (status plus the
//!   body's `error.type` / `error.code`), with rate-limit hints, `retry-after` and request id.
//!   Malformed JSON, missing fields and truncated streams are
//!   [`Protocol`](portcullis_core::ErrorKind::Protocol) errors, never defaults.
//! - **Commit point.** A streaming call's future resolves at the first content chunk, or with the
//!   error that came before it, so retry and fallback cover pre-content failures unchanged. An
//!   error after that is yielded as [`StreamInterrupted`](portcullis_core::ErrorKind::StreamInterrupted).
//! - **No retries here.** Retries belong to the retry layer; stacked retries multiply.
//! - **Keys stay secret.** [`ApiKey`] prints `[redacted]`, is sent as a sensitive header, is
//!   scrubbed from provider error messages, and is never sent over plain `http://` to a host
//!   other than loopback.
//! - **Bounded.** The response body is capped (32 MiB by default), and so is each SSE
//!   line/event ([`sse`]).
//!
//! ```no_run
//! use futures_util::StreamExt;
//! use portcullis_core::{ChatMessage, ChatRequest};
//! use portcullis_providers::{AnthropicProvider, ApiKey};
//! use tower::ServiceExt;
//!
//! # async fn run() -> Result<(), portcullis_core::LlmError> {
//! let claude = AnthropicProvider::builder()
//!     .base_url("http://127.0.0.1:8080") // e.g. the simulator; loopback may use plain http
//!     .api_key(ApiKey::new("sk-test")?)
//!     .build()?;
//! let req = ChatRequest::new("claude-haiku-4-5", vec![
//!     ChatMessage::system("Be brief."),
//!     ChatMessage::user("Two names for a pet pelican"),
//! ]);
//! let answer = claude.clone().oneshot(req.clone()).await?;
//! println!("{} [{}]", answer.content, answer.finish_reason);
//!
//! let mut stream = claude.streaming().oneshot(req).await?;
//! while let Some(chunk) = stream.next().await {
//!     print!("{}", chunk?.delta);
//! }
//! # Ok(()) }
//! ```
#![forbid(unsafe_code)]

pub mod anthropic;
pub mod azure;
mod builder;
mod call;
mod error_body;
pub mod http;
mod key;
pub mod openai;
mod provider;
pub mod sse;
pub mod transport;
pub mod wire;

pub use anthropic::{
    Anthropic, AnthropicBuilder, AnthropicProvider, AnthropicStream, StructuredOutput,
};
pub use azure::{AzureOpenAi, AzureOpenAiProvider, AzureOpenAiStream};
pub use builder::Builder;
pub use call::ResponseFuture;
pub use error_body::ErrorBody;
pub use key::ApiKey;
pub use openai::{OpenAi, OpenAiBuilder, OpenAiProvider, OpenAiStream};
pub use provider::{Provider, StreamingProvider};
pub use sse::{SseDecoder, SseEvent, SseStream};
pub use transport::{SendFuture, Transport, TransportConfig};
pub use wire::Wire;
