//! The request side of the vocabulary: [`ChatRequest`], [`ChatMessage`], [`CompletionOptions`].

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// Who wrote a [`ChatMessage`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions for the model. Anthropic takes these as the top-level `system` field.
    System,
    /// The end user.
    User,
    /// The model (for example, an earlier turn, or a prefill).
    Assistant,
}

impl Role {
    /// The wire name: `system`, `user` or `assistant`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// One message of a conversation.
///
/// `#[non_exhaustive]` leaves room for tool calls and multi-part content; build one with
/// [`ChatMessage::new`], [`ChatMessage::system`], [`ChatMessage::user`] or
/// [`ChatMessage::assistant`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ChatMessage {
    /// Who wrote it.
    pub role: Role,
    /// Its text.
    pub content: String,
}

impl ChatMessage {
    /// A message with the given role and text.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        ChatMessage {
            role,
            content: content.into(),
        }
    }
    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }
    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }
    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }
}

/// The shape the model must answer in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResponseFormat {
    /// Free text (the default).
    #[default]
    Text,
    /// A JSON object (OpenAI `response_format: {"type":"json_object"}`).
    JsonObject,
}

/// Sampling and length options. Defaults follow the seed: temperature 0, 1000 max tokens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct CompletionOptions {
    /// Sampling temperature (default 0).
    pub temperature: f32,
    /// The most tokens the model may write (default 1000). Token buckets pre-charge it.
    pub max_tokens: u32,
    /// Text or JSON object.
    pub response_format: ResponseFormat,
    /// Sequences that end generation. Behind an `Arc` so that cloning a request is cheap.
    pub stop_sequences: Arc<[String]>,
    /// A per-attempt timeout for this request, overriding the timeout layer's own.
    #[serde(with = "crate::config::opt_millis")]
    pub timeout: Option<Duration>,
}

impl Default for CompletionOptions {
    fn default() -> Self {
        CompletionOptions {
            temperature: 0.0,
            max_tokens: 1000,
            response_format: ResponseFormat::Text,
            stop_sequences: Arc::from(Vec::new()),
            timeout: None,
        }
    }
}

/// A chat completion request, provider-neutral.
///
/// Cloning is cheap: the model name, the messages and the stop sequences sit behind `Arc`s, so
/// retry and fallback clone a request without copying the conversation.
///
/// ```
/// use portcullis_core::{ChatMessage, ChatRequest};
///
/// let req = ChatRequest::new("gpt-4o-mini", vec![ChatMessage::user("Hello")])
///     .max_tokens(64)
///     .temperature(0.2);
/// let copy = req.clone(); // no message is copied
/// assert!(std::sync::Arc::ptr_eq(&req.messages, &copy.messages));
/// assert_eq!(copy.options.max_tokens, 64);
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ChatRequest {
    /// The model to ask for. A fallback entry may remap it.
    pub model: Arc<str>,
    /// The conversation.
    pub messages: Arc<[ChatMessage]>,
    /// Sampling and length options.
    pub options: CompletionOptions,
    /// When the whole call (all retries and waits included) must be over. Set by the deadline
    /// layer, or by the caller; every layer that sleeps respects it.
    pub deadline: Option<Instant>,
    /// Room for extensions (tools, provider-specific fields, tracing context).
    pub extensions: http::Extensions,
}

impl ChatRequest {
    /// A request for `model` with the given messages and default options.
    pub fn new(model: impl AsRef<str>, messages: impl Into<Arc<[ChatMessage]>>) -> Self {
        ChatRequest {
            model: Arc::from(model.as_ref()),
            messages: messages.into(),
            options: CompletionOptions::default(),
            deadline: None,
            extensions: http::Extensions::new(),
        }
    }

    /// Sets `max_tokens`.
    pub fn max_tokens(mut self, n: u32) -> Self {
        self.options.max_tokens = n;
        self
    }

    /// Sets the temperature.
    pub fn temperature(mut self, t: f32) -> Self {
        self.options.temperature = t;
        self
    }

    /// Sets the stop sequences.
    pub fn stop_sequences<I, S>(mut self, stops: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.options.stop_sequences = stops.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the response format.
    pub fn response_format(mut self, f: ResponseFormat) -> Self {
        self.options.response_format = f;
        self
    }

    /// Sets the per-attempt timeout.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.options.timeout = Some(t);
        self
    }

    /// Sets the overall deadline.
    pub fn with_deadline(mut self, at: Instant) -> Self {
        self.deadline = Some(at);
        self
    }

    /// Replaces the options.
    pub fn with_options(mut self, options: CompletionOptions) -> Self {
        self.options = options;
        self
    }

    /// Replaces the model, keeping everything else (a fallback entry's remap).
    pub fn with_model(mut self, model: Arc<str>) -> Self {
        self.model = model;
        self
    }
}
