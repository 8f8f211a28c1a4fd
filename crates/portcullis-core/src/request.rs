//! The request side of the vocabulary: [`ChatRequest`], [`ChatMessage`], [`CompletionOptions`].

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::content::{Part, Reasoning, Tool, ToolCall, ToolChoice};

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
    /// Tool results answering an assistant's tool calls ([`Part::ToolResult`]s). OpenAI sends
    /// one `role: "tool"` message per result; Anthropic a user turn of `tool_result` blocks.
    Tool,
}

impl Role {
    /// The wire name: `system`, `user`, `assistant` or `tool`.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// One message of a conversation: a role and a list of [`Part`]s.
///
/// A plain-text message is one text part; serialized, its `content` is then a plain string.
///
/// ```
/// use portcullis_core::{ChatMessage, Part, ToolCall};
///
/// let ask = ChatMessage::user("What is the weather in Paris?");
/// assert_eq!(ask.text(), "What is the weather in Paris?");
/// let call = ChatMessage::assistant_parts(vec![Part::ToolCall(ToolCall::new(
///     "call_1", "get_weather", r#"{"city":"Paris"}"#,
/// ))]);
/// let answer = ChatMessage::tool_result("call_1", "18 °C, sunny");
/// assert_eq!(call.tool_calls().next().unwrap().name, "get_weather");
/// assert_eq!(serde_json::to_value(&ask).unwrap()["content"], "What is the weather in Paris?");
/// # let _ = answer;
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ChatMessage {
    /// Who wrote it.
    pub role: Role,
    /// Its parts, in order.
    #[serde(with = "content_serde")]
    pub content: Vec<Part>,
}

impl ChatMessage {
    /// A message with the given role and text.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        ChatMessage {
            role,
            content: vec![Part::text(content)],
        }
    }
    /// A message with the given role and parts.
    pub fn with_parts(role: Role, content: Vec<Part>) -> Self {
        ChatMessage { role, content }
    }
    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }
    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }
    /// A user message of several parts (text and images, for example).
    pub fn user_parts(content: Vec<Part>) -> Self {
        Self::with_parts(Role::User, content)
    }
    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }
    /// An assistant message of several parts (thinking, text, tool calls).
    pub fn assistant_parts(content: Vec<Part>) -> Self {
        Self::with_parts(Role::Assistant, content)
    }
    /// A tool message answering the call `call_id` with text.
    pub fn tool_result(call_id: impl Into<String>, text: impl Into<String>) -> Self {
        Self::with_parts(Role::Tool, vec![Part::tool_result(call_id, text)])
    }

    /// A [`Role::Tool`] message saying that the call `call_id` failed, and how.
    pub fn tool_error(call_id: impl Into<String>, text: impl Into<String>) -> Self {
        Self::with_parts(Role::Tool, vec![Part::tool_error(call_id, text)])
    }

    /// The text parts joined (no separator). Borrowed when there is one text part.
    pub fn text(&self) -> Cow<'_, str> {
        let mut texts = self.content.iter().filter_map(Part::as_text);
        match (texts.next(), texts.next()) {
            (None, _) => Cow::Borrowed(""),
            (Some(one), None) => Cow::Borrowed(one),
            (Some(a), Some(b)) => {
                let mut s = String::from(a);
                s.push_str(b);
                texts.for_each(|t| s.push_str(t));
                Cow::Owned(s)
            }
        }
    }

    /// The tool calls of an assistant message.
    pub fn tool_calls(&self) -> impl Iterator<Item = &ToolCall> {
        self.content.iter().filter_map(|p| match p {
            Part::ToolCall(c) => Some(c),
            _ => None,
        })
    }

    /// Every piece of text a tokenizer would see in this message: text, tool-call names and
    /// arguments, tool-result text, thinking.
    pub fn texts(&self) -> impl Iterator<Item = &str> + Clone {
        fn of(p: &Part) -> [&str; 2] {
            match p {
                Part::Text { text, .. } => [text, ""],
                Part::ToolCall(c) => [&c.name, &c.arguments],
                Part::Thinking { thinking, .. } => [thinking, ""],
                _ => ["", ""],
            }
        }
        self.content.iter().flat_map(|p| {
            let nested: &[Part] = match p {
                Part::ToolResult { content, .. } => content,
                _ => &[],
            };
            of(p)
                .into_iter()
                .chain(nested.iter().flat_map(of))
                .filter(|t| !t.is_empty())
        })
    }
}

/// `content` as a plain string when the message is one uncached text part, as a list of parts
/// otherwise; either shape reads back.
mod content_serde {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::Part;

    pub(super) fn serialize<S: Serializer>(parts: &[Part], s: S) -> Result<S::Ok, S::Error> {
        match parts {
            [
                Part::Text {
                    text,
                    cache_control: None,
                },
            ] => s.serialize_str(text),
            _ => parts.serialize(s),
        }
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Text(String),
        Parts(Vec<Part>),
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Part>, D::Error> {
        Ok(match Either::deserialize(d)? {
            Either::Text(t) => vec![Part::text(t)],
            Either::Parts(p) => p,
        })
    }
}

/// The shape the model must answer in.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ResponseFormat {
    /// Free text (the default).
    #[default]
    Text,
    /// A JSON object (OpenAI `response_format: {"type":"json_object"}`).
    JsonObject,
    /// JSON that validates against a schema (OpenAI `json_schema`; on Anthropic a forced tool
    /// whose input is the schema, see the README).
    JsonSchema {
        /// The schema's name (`^[a-zA-Z0-9_-]{1,64}$`).
        name: Arc<str>,
        /// The JSON Schema. Shared: cloning a request copies none of it.
        schema: Arc<serde_json::Value>,
        /// Ask for exact adherence (OpenAI `strict`).
        #[serde(default)]
        strict: bool,
    },
}

impl ResponseFormat {
    /// JSON following `schema`, strictly.
    pub fn json_schema(name: impl AsRef<str>, schema: serde_json::Value) -> Self {
        ResponseFormat::JsonSchema {
            name: Arc::from(name.as_ref()),
            schema: Arc::new(schema),
            strict: true,
        }
    }
}

/// Sampling and length options. Defaults follow the seed: temperature 0, 1000 max tokens.
///
/// Everything that can be large sits behind an `Arc`, so cloning options copies no tool, schema
/// or stop sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct CompletionOptions {
    /// Sampling temperature (default 0). Not sent with reasoning on Anthropic, which refuses it.
    pub temperature: f32,
    /// The most tokens the model may write (default 1000), thinking included. Token buckets
    /// pre-charge it.
    pub max_tokens: u32,
    /// Text, JSON object, or JSON following a schema.
    pub response_format: ResponseFormat,
    /// Sequences that end generation. Behind an `Arc` so that cloning a request is cheap.
    pub stop_sequences: Arc<[String]>,
    /// A per-attempt timeout for this request, overriding the timeout layer's own.
    #[serde(with = "crate::config::opt_millis")]
    pub timeout: Option<Duration>,
    /// The tools the model may call.
    pub tools: Arc<[Tool]>,
    /// Which tool it must call (`None`: the provider's default, `auto` when tools are offered).
    pub tool_choice: Option<ToolChoice>,
    /// Whether it may call several tools in one turn (`None`: the provider's default, yes).
    pub parallel_tool_calls: Option<bool>,
    /// Reasoning effort or thinking budget.
    pub reasoning: Option<Reasoning>,
    /// Extra top-level JSON fields per provider name (`"openai"`, `"anthropic"`, or your own
    /// wire's), merged into that provider's request body last, over the fields Portcullis
    /// writes: the escape hatch for anything not modelled here.
    pub extra: Arc<BTreeMap<String, serde_json::Map<String, serde_json::Value>>>,
}

impl Default for CompletionOptions {
    fn default() -> Self {
        CompletionOptions {
            temperature: 0.0,
            max_tokens: 1000,
            response_format: ResponseFormat::Text,
            stop_sequences: Arc::from(Vec::new()),
            timeout: None,
            tools: Arc::from(Vec::new()),
            tool_choice: None,
            parallel_tool_calls: None,
            reasoning: None,
            extra: Arc::default(),
        }
    }
}

impl CompletionOptions {
    /// The most output tokens the call may produce: `max_tokens` for the visible answer, plus
    /// the thinking budget when reasoning is on ([`Reasoning::budget_or_default`]). Both wires
    /// send this as the provider's output limit (OpenAI counts reasoning inside
    /// `max_completion_tokens`, Anthropic thinking inside `max_tokens`), and the token bucket
    /// reserves it.
    pub fn output_limit(&self) -> u32 {
        let budget = self
            .reasoning
            .as_ref()
            .map_or(0, Reasoning::budget_or_default);
        self.max_tokens.saturating_add(budget)
    }

    /// The extra fields for `provider` (see [`CompletionOptions::extra`]).
    pub fn extra_for(&self, provider: &str) -> Option<&serde_json::Map<String, serde_json::Value>> {
        self.extra.get(provider)
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
    /// Sampling, length, tools and format options, shared: cloning a request (every retry and
    /// fallback does) copies a pointer, and the request stays small enough to move inline. The
    /// builder methods below change a request's own copy ([`Arc::make_mut`]); to change a field
    /// by hand, `Arc::make_mut(&mut req.options).max_tokens = 10`.
    pub options: Arc<CompletionOptions>,
    /// When the whole call (all retries and waits included) must be over. Set by the deadline
    /// layer, or by the caller; every layer that sleeps respects it.
    pub deadline: Option<Instant>,
    /// Room for extensions (tools, provider-specific fields, tracing context).
    pub extensions: http::Extensions,
}

/// The default options, one shared copy per process: a new request allocates no options.
fn default_options() -> Arc<CompletionOptions> {
    static DEFAULT: std::sync::LazyLock<Arc<CompletionOptions>> =
        std::sync::LazyLock::new(|| Arc::new(CompletionOptions::default()));
    DEFAULT.clone()
}

impl ChatRequest {
    /// A request for `model` with the given messages and default options.
    pub fn new(model: impl AsRef<str>, messages: impl Into<Arc<[ChatMessage]>>) -> Self {
        ChatRequest {
            model: Arc::from(model.as_ref()),
            messages: messages.into(),
            options: default_options(),
            deadline: None,
            extensions: http::Extensions::new(),
        }
    }

    /// Sets `max_tokens`.
    pub fn max_tokens(mut self, n: u32) -> Self {
        self.opts().max_tokens = n;
        self
    }

    /// Sets the temperature.
    pub fn temperature(mut self, t: f32) -> Self {
        self.opts().temperature = t;
        self
    }

    /// Sets the stop sequences.
    pub fn stop_sequences<I, S>(mut self, stops: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.opts().stop_sequences = stops.into_iter().map(Into::into).collect();
        self
    }

    /// Sets the response format.
    pub fn response_format(mut self, f: ResponseFormat) -> Self {
        self.opts().response_format = f;
        self
    }

    /// Sets the tools the model may call.
    pub fn tools(mut self, tools: impl Into<Arc<[Tool]>>) -> Self {
        self.opts().tools = tools.into();
        self
    }

    /// Sets which tool the model must call.
    pub fn tool_choice(mut self, choice: ToolChoice) -> Self {
        self.opts().tool_choice = Some(choice);
        self
    }

    /// Allows or forbids several tool calls in one turn.
    pub fn parallel_tool_calls(mut self, allow: bool) -> Self {
        self.opts().parallel_tool_calls = Some(allow);
        self
    }

    /// Sets the reasoning effort or thinking budget.
    pub fn reasoning(mut self, reasoning: Reasoning) -> Self {
        self.opts().reasoning = Some(reasoning);
        self
    }

    /// Adds an extra top-level JSON field to `provider`'s request body.
    pub fn extra(
        mut self,
        provider: impl Into<String>,
        field: impl Into<String>,
        value: serde_json::Value,
    ) -> Self {
        Arc::make_mut(&mut self.opts().extra)
            .entry(provider.into())
            .or_default()
            .insert(field.into(), value);
        self
    }

    /// Sets the per-attempt timeout.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.opts().timeout = Some(t);
        self
    }

    /// Sets the overall deadline.
    pub fn with_deadline(mut self, at: Instant) -> Self {
        self.deadline = Some(at);
        self
    }

    /// Replaces the options.
    pub fn with_options(mut self, options: impl Into<Arc<CompletionOptions>>) -> Self {
        self.options = options.into();
        self
    }

    /// This request's own options, copied first if another request shares them.
    fn opts(&mut self) -> &mut CompletionOptions {
        Arc::make_mut(&mut self.options)
    }

    /// Replaces the model, keeping everything else (a fallback entry's remap).
    pub fn with_model(mut self, model: Arc<str>) -> Self {
        self.model = model;
        self
    }
}
