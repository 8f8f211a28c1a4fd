//! [`Wire`]: what one LLM HTTP API looks like on the wire. [`Provider`](crate::Provider) and
//! [`StreamingProvider`](crate::StreamingProvider) do everything else the same way for every
//! API: the pooled HTTPS client, the status mapping (through
//! [`ErrorKind::from_wire`](portcullis_core::ErrorKind::from_wire)), the body cap, SSE
//! decoding, the commit point of a stream, key redaction, request ids and rate-limit headers.
//!
//! [`OpenAi`](crate::OpenAi), [`Anthropic`](crate::Anthropic) and
//! [`AzureOpenAi`](crate::AzureOpenAi) are the built-in wires; an OpenAI-compatible server
//! (vLLM, Ollama, LM Studio) is the OpenAI wire at another base URL
//! ([`OpenAiProvider::compatible`](crate::OpenAiProvider::compatible)). A new API (Gemini…) is
//! one more `Wire`:
//!
//! ```no_run
//! use portcullis_core::{ChatRequest, CompletionResult, FinishReason, LlmError, StreamChunk, Usage};
//! use portcullis_providers::sse::SseEvent;
//! use portcullis_providers::wire::{self, EventParser, Step, Wire};
//! use portcullis_providers::Provider;
//! use serde::Deserialize;
//!
//! /// A toy API: `POST /generate {"prompt", "stream"}` answers `{"text","in","out"}`; streamed,
//! /// `data: {"text"}` events and a last `data: {"done":true,"in","out"}`.
//! #[derive(Debug, Clone, Default)]
//! struct Toy;
//!
//! #[derive(Deserialize)]
//! struct Answer {
//!     #[serde(default)]
//!     text: String,
//!     #[serde(default)]
//!     done: bool,
//!     #[serde(default, rename = "in")]
//!     input: u64,
//!     #[serde(default, rename = "out")]
//!     output: u64,
//! }
//!
//! impl Wire for Toy {
//!     type Parser = ToyEvents;
//!
//!     fn name(&self) -> &'static str { "toy" }
//!     fn default_base_url(&self) -> &str { "https://toy.example" }
//!     fn api_key_env(&self) -> &str { "TOY_API_KEY" }
//!     fn path(&self) -> &str { "/generate" }
//!     // `headers` (Authorization: Bearer), `request_id_header` (x-request-id) and
//!     // `parse_error` ({"error":{"type","code","message"}}) keep their defaults.
//!
//!     fn request_body(&self, req: &ChatRequest, stream: bool) -> Result<Vec<u8>, LlmError> {
//!         let prompt: Vec<String> = req.messages.iter().map(|m| m.text().into_owned()).collect();
//!         wire::json_body(&serde_json::json!({ "prompt": prompt.join("\n"), "stream": stream }))
//!     }
//!
//!     fn parse_response(&self, _: &ChatRequest, body: &[u8]) -> Result<CompletionResult, LlmError> {
//!         let a: Answer = wire::from_json(body)?;
//!         Ok(CompletionResult::new(self.name(), "toy-1", a.text)
//!             .with_usage(Usage::new(a.input, a.output)))
//!     }
//!
//!     fn event_parser(&self, _: &ChatRequest) -> ToyEvents { ToyEvents }
//! }
//!
//! struct ToyEvents;
//!
//! impl EventParser for ToyEvents {
//!     const TRUNCATED: &'static str = "the stream ended before done";
//!
//!     fn on_event(&mut self, ev: SseEvent) -> Result<Step, LlmError> {
//!         let a: Answer = wire::from_json(ev.data.as_bytes())?;
//!         Ok(if a.done {
//!             let usage = Usage::new(a.input, a.output);
//!             Step::End(StreamChunk::finish(FinishReason::Stop, Some(usage)))
//!         } else if a.text.is_empty() {
//!             Step::Skip
//!         } else {
//!             Step::Content(StreamChunk::delta(a.text))
//!         })
//!     }
//!
//!     fn model(&self) -> &str { "toy-1" }
//! }
//!
//! # async fn run() -> Result<(), LlmError> {
//! let toy: Provider<Toy> = Provider::builder().build()?; // reads TOY_API_KEY
//! let answer = toy.complete(ChatRequest::new("toy-1", vec![])).await?;
//! # let _ = answer; Ok(()) }
//! ```

use std::fmt;

use http::HeaderMap;
use http::header::AUTHORIZATION;
use portcullis_core::{
    ChatRequest, CompletionResult, ErrorKind, LlmError, MediaSource, StreamChunk, Tool,
};
use serde::{Deserialize, Serialize};

pub use crate::error_body::ErrorBody;
use crate::key::ApiKey;
use crate::sse::SseEvent;

/// One LLM HTTP API's wire format: where a request goes and with which headers, its JSON body,
/// and how to read a complete answer, a stream's events and an error body.
///
/// The name, the defaults, the path and the headers are asked for once, when the provider is
/// built; the body, the parsers and the error reading, on every call.
/// Settings of one API (OpenAI's `max_tokens` spelling, Anthropic's version) live in the wire
/// value. See the [module docs](self) for a whole example.
///
/// An API that only differs from OpenAI's in its path and auth header reuses
/// [`OpenAi`](crate::OpenAi)'s body and parsers, as the built-in
/// [`AzureOpenAi`](crate::AzureOpenAi) does. (For a plain OpenAI-compatible server, vLLM,
/// Ollama or LM Studio, no new wire is needed: see
/// [`OpenAiProvider::compatible`](crate::OpenAiProvider::compatible).)
///
/// ```no_run
/// use http::HeaderMap;
/// use portcullis_core::{ChatRequest, CompletionResult, LlmError};
/// use portcullis_providers::{ApiKey, Builder, OpenAi, Wire};
///
/// /// A company gateway: `POST /llm/chat`, the key in `x-gateway-key`.
/// #[derive(Debug, Clone, Default)]
/// struct Gateway {
///     openai: OpenAi,
/// }
///
/// impl Wire for Gateway {
///     type Parser = <OpenAi as Wire>::Parser;
///     fn name(&self) -> &'static str { "gateway" }
///     fn default_base_url(&self) -> &str { "https://llm.internal.example" }
///     fn api_key_env(&self) -> &str { "GATEWAY_KEY" }
///     fn path(&self) -> &str { "/llm/chat" }
///     fn headers(&self, key: Option<&ApiKey>, headers: &mut HeaderMap) {
///         if let Some(key) = key {
///             headers.insert("x-gateway-key", key.header(""));
///         }
///     }
///     fn request_body(&self, req: &ChatRequest, stream: bool) -> Result<Vec<u8>, LlmError> {
///         self.openai.request_body(req, stream)
///     }
///     fn parse_response(&self, req: &ChatRequest, body: &[u8]) -> Result<CompletionResult, LlmError> {
///         self.openai.parse_response(req, body)
///     }
///     fn event_parser(&self, req: &ChatRequest) -> Self::Parser {
///         self.openai.event_parser(req)
///     }
/// }
///
/// # fn run() -> Result<(), LlmError> {
/// let gateway = Builder::new(Gateway::default()).build()?; // reads GATEWAY_KEY
/// # let _ = gateway; Ok(()) }
/// ```
pub trait Wire: Clone + Send + Sync + 'static {
    /// The state machine that reads one streamed answer.
    type Parser: EventParser;

    /// The provider's name in errors, results and stream metadata (e.g. `"openai"`).
    fn name(&self) -> &'static str;

    /// The base URL the builder starts from (e.g. `https://api.openai.com/v1`).
    fn default_base_url(&self) -> &str;

    /// The environment variable the builder reads the key from by default.
    fn api_key_env(&self) -> &str;

    /// The path joined to the base URL (e.g. `/chat/completions`); it may carry a query.
    fn path(&self) -> &str;

    /// The response header that holds the request id. Default: `x-request-id`.
    fn request_id_header(&self) -> &'static str {
        "x-request-id"
    }

    /// Adds the headers every request carries: the key's (when there is one; build the value
    /// with [`ApiKey::header`], which marks it sensitive) and any the API requires. Default:
    /// `Authorization: Bearer <key>`.
    fn headers(&self, key: Option<&ApiKey>, headers: &mut HeaderMap) {
        if let Some(key) = key {
            headers.insert(AUTHORIZATION, key.header("Bearer "));
        }
    }

    /// The JSON request body, asking for a stream when `stream` is true (see [`json_body`]).
    fn request_body(&self, req: &ChatRequest, stream: bool) -> Result<Vec<u8>, LlmError>;

    /// Reads a complete (2xx) answer to `req`: its content, tool calls, reasoning, usage, model
    /// and finish reason. The call then sets `provider`, `latency`, `request_id` and
    /// `rate_limits`. A body that is not the documented shape is a
    /// [`Protocol`](ErrorKind::Protocol) error (see [`malformed`]).
    fn parse_response(&self, req: &ChatRequest, body: &[u8]) -> Result<CompletionResult, LlmError>;

    /// A fresh parser for one streamed answer to `req`.
    fn event_parser(&self, req: &ChatRequest) -> Self::Parser;

    /// Reads the error object of a non-2xx answer; `None` when the body is not one, and the
    /// error is typed from the status alone. The result goes through
    /// [`ErrorKind::from_wire`](portcullis_core::ErrorKind::from_wire). Default:
    /// [`ErrorBody::from_envelope`], the `{"error":{"type","code","message"}}` shape that
    /// OpenAI, Anthropic and most compatible servers send.
    fn parse_error(&self, status: u16, body: &[u8]) -> Option<ErrorBody> {
        let _ = status;
        ErrorBody::from_envelope(body)
    }
}

/// What one server-sent event meant to an [`EventParser`].
#[derive(Debug)]
pub enum Step {
    /// Nothing for the caller (a ping, a block start, a role-only delta, usage kept for the end).
    Skip,
    /// New content for the caller: text, a tool-call fragment, a reasoning fragment (a chunk
    /// whose [`StreamChunk::has_content`] is true). The first one is the commit point: the
    /// streaming call resolves there.
    Content(StreamChunk),
    /// The end of the answer: the final chunk, with the finish reason and the usage.
    End(StreamChunk),
    /// An error event inside a 2xx stream. Before the commit point it fails the call; after
    /// it, it ends the stream as [`StreamInterrupted`](ErrorKind::StreamInterrupted).
    Error(ErrorBody),
}

/// The state machine of one streamed answer: it sees every SSE event in order, and says what
/// each one means.
pub trait EventParser: Send + Unpin + 'static {
    /// The message of the [`Protocol`](ErrorKind::Protocol) error for a body that ended
    /// before [`Step::End`].
    const TRUNCATED: &'static str;

    /// Reads one event. A malformed one is a [`Protocol`](ErrorKind::Protocol) error (see
    /// [`malformed`]), which ends the stream.
    fn on_event(&mut self, ev: SseEvent) -> Result<Step, LlmError>;

    /// The model the provider resolved, as far as the events said (empty until then).
    fn model(&self) -> &str;
}

/// A [`Protocol`](ErrorKind::Protocol) error: `malformed response: {what}`.
pub fn malformed(what: impl fmt::Display) -> LlmError {
    LlmError::new(ErrorKind::Protocol, format!("malformed response: {what}"))
}

/// Parses JSON, or fails with a [`malformed`] error.
pub fn from_json<'a, T: Deserialize<'a>>(data: &'a [u8]) -> Result<T, LlmError> {
    serde_json::from_slice(data).map_err(malformed)
}

/// A JSON string borrowed from the body when it has no escapes (no allocation), else owned:
/// for what a parser reads and drops, or keeps once.
#[derive(Debug)]
pub(crate) struct Text<'a>(pub(crate) std::borrow::Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Text<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use std::borrow::Cow;
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Cow<'de, str>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Cow::Borrowed(v))
            }
            fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v.to_owned()))
            }
            fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
                Ok(Cow::Owned(v))
            }
        }
        d.deserialize_str(V).map(Text)
    }
}

/// Serializes a request body, or fails with an
/// [`InvalidRequest`](ErrorKind::InvalidRequest) error.
pub fn json_body(body: &impl Serialize) -> Result<Vec<u8>, LlmError> {
    serde_json::to_vec(body).map_err(|e| {
        LlmError::new(
            ErrorKind::InvalidRequest,
            "the request could not be serialized",
        )
        .with_source(e)
    })
}

/// An [`Unsupported`](ErrorKind::Unsupported) error: the request carries something this API
/// cannot take (`{provider} cannot carry {what}`). It is returned before anything is sent, and
/// [`FallbackLayer`](https://docs.rs/portcullis-layers) moves on to its next entry.
pub fn unsupported(provider: &str, what: impl fmt::Display) -> LlmError {
    LlmError::new(
        ErrorKind::Unsupported,
        format!("{provider} cannot carry {what}"),
    )
}

/// Merges the caller's extra fields for `provider` ([`ChatRequest::extra`]) into a body: they
/// win over the fields the wire wrote. Only requests that carry extras pay for the round trip
/// through a [`serde_json::Value`].
pub(crate) fn body_with_extra(
    req: &ChatRequest,
    provider: &str,
    body: &impl Serialize,
) -> Result<Vec<u8>, LlmError> {
    let Some(extra) = req.options.extra_for(provider).filter(|e| !e.is_empty()) else {
        return json_body(body);
    };
    let mut value = serde_json::to_value(body).map_err(|e| {
        LlmError::new(
            ErrorKind::InvalidRequest,
            "the request could not be serialized",
        )
        .with_source(e)
    })?;
    if let Some(map) = value.as_object_mut() {
        for (k, v) in extra {
            map.insert(k.clone(), v.clone());
        }
    }
    json_body(&value)
}

/// The request's tool definitions in a wire's shape, each checked first ([`Tool::validate`]):
/// a bad one is an [`InvalidRequest`](ErrorKind::InvalidRequest) error (no provider would take
/// it), returned before sending.
pub(crate) fn tool_defs(
    req: &ChatRequest,
    def: impl Fn(&Tool) -> serde_json::Value,
) -> Result<Vec<serde_json::Value>, LlmError> {
    req.options
        .tools
        .iter()
        .map(|t| {
            t.validate().map_err(|e| {
                LlmError::new(ErrorKind::InvalidRequest, e.to_string()).with_source(e)
            })?;
            Ok(def(t))
        })
        .collect()
}

/// The bytes limit of one inline image or document, checked before sending.
pub(crate) fn check_size(
    provider: &str,
    what: &str,
    source: &MediaSource,
    limit: usize,
) -> Result<(), LlmError> {
    match source.decoded_len() {
        Some(n) if n > limit => Err(unsupported(
            provider,
            format_args!("{what} of {n} bytes (its limit is {limit})"),
        )),
        _ => Ok(()),
    }
}
