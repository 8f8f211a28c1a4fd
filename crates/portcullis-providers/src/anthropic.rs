//! Anthropic Messages (`POST {base_url}/v1/messages`): the [`Anthropic`] wire, and the provider
//! over it, [`AnthropicProvider`] (a [`CompletionResult`]) and [`AnthropicStream`] (a
//! [`ChatStream`](portcullis_core::ChatStream)).

use http::{HeaderMap, HeaderValue};
use std::borrow::Cow;

use portcullis_core::{
    ANTHROPIC, CacheControl, ChatMessage, ChatRequest, CompletionResult, FinishReason, LlmError,
    MediaSource, Part, Reasoning, ResponseFormat, Role, StreamChunk, ThinkingDelta, Tool, ToolCall,
    ToolCallDelta, ToolChoice, Usage,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::key::ApiKey;
use crate::sse::SseEvent;
use crate::wire::{
    ErrorBody, EventParser, Step, Wire, body_with_extra, check_size, from_json, malformed,
    tool_defs, unsupported,
};
use crate::{Builder, Provider, StreamingProvider};

/// The default base URL (as in the official SDKs, without `/v1`).
pub const DEFAULT_BASE_URL: &str = "https://api.anthropic.com";

/// The `anthropic-version` header sent with every request, unless the wire says another.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// Anthropic Messages as a [`Provider`]: see there, and [`Anthropic`] for the wire.
pub type AnthropicProvider = Provider<Anthropic>;
/// The streaming face of an [`AnthropicProvider`], from [`Provider::streaming`].
pub type AnthropicStream = StreamingProvider<Anthropic>;
/// Builds an [`AnthropicProvider`]: base URL [`DEFAULT_BASE_URL`], key from `ANTHROPIC_API_KEY`.
pub type AnthropicBuilder = Builder<Anthropic>;

/// The largest inline image Anthropic takes (5 MB), refused before sending.
pub const MAX_IMAGE_BYTES: usize = 5 * 1024 * 1024;
/// The largest inline PDF Anthropic takes (32 MB, its request limit), refused before sending.
pub const MAX_DOCUMENT_BYTES: usize = 32 * 1024 * 1024;

/// How [`ResponseFormat::JsonSchema`] is asked of Anthropic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum StructuredOutput {
    /// Anthropic's own structured outputs, `output_config.format` (`json_schema`): the answer is
    /// a text block that matches the schema. The default: it is the API's mechanism, it keeps
    /// the caller's tools and thinking usable, and it is exact.
    #[default]
    Native,
    /// For models without structured outputs: a forced tool named after the schema, whose
    /// `input_schema` is the schema. The tool's input comes back as the answer's text (JSON),
    /// with [`FinishReason::Stop`]. It cannot be combined with the caller's tools or with
    /// thinking (Anthropic refuses a forced tool with thinking on): those requests are refused
    /// before sending.
    ForcedTool,
}

/// The Anthropic Messages wire: `x-api-key`, `anthropic-version`, `request-id`.
///
/// - System messages go to the top-level `system` (a string, or text blocks when one carries a
///   cache breakpoint).
/// - Tool results ([`Role::Tool`] messages) become `tool_result` blocks in a user turn;
///   consecutive ones (OpenAI sends one message per result) share one turn, before any user
///   text that follows.
/// - Reasoning turns on extended thinking (`budget_tokens` from
///   [`Reasoning::budget_or_default`](portcullis_core::Reasoning::budget_or_default), at least
///   1 024); `max_tokens` grows by the budget, as Anthropic counts thinking
///   inside it, and `temperature` is not sent (thinking requires the default).
/// - [`ResponseFormat::JsonSchema`] goes as [`StructuredOutput`] says;
///   [`ResponseFormat::JsonObject`] (Anthropic has no schemaless JSON mode) as a forced tool
///   whose schema is any object.
/// - Unsigned thinking (from another provider) is dropped: Anthropic verifies signatures.
///
/// A stream's final chunk carries the usage (cumulative, from `message_delta`).
#[derive(Debug, Clone)]
pub struct Anthropic {
    version: HeaderValue,
    structured: StructuredOutput,
}

impl Default for Anthropic {
    fn default() -> Self {
        Anthropic {
            version: HeaderValue::from_static(ANTHROPIC_VERSION),
            structured: StructuredOutput::default(),
        }
    }
}

impl Anthropic {
    /// Sends this `anthropic-version` instead of [`ANTHROPIC_VERSION`].
    pub fn version(mut self, version: HeaderValue) -> Self {
        self.version = version;
        self
    }

    /// How structured output is asked for (default [`StructuredOutput::Native`]).
    pub fn structured_output(mut self, how: StructuredOutput) -> Self {
        self.structured = how;
        self
    }

    /// The name of the forced tool that carries structured output, when this request uses one.
    fn emulated_tool(&self, req: &ChatRequest) -> Option<Cow<'static, str>> {
        match &req.options.response_format {
            ResponseFormat::JsonObject => Some(Cow::Borrowed("json_object")),
            ResponseFormat::JsonSchema { name, .. }
                if self.structured == StructuredOutput::ForcedTool =>
            {
                Some(Cow::Owned(tool_id(name)))
            }
            _ => None,
        }
    }
}

impl Builder<Anthropic> {
    /// How structured output is asked for (see [`Anthropic::structured_output`]).
    pub fn structured_output(mut self, how: StructuredOutput) -> Self {
        self.wire.structured = how;
        self
    }
}

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<Content<'a>>,
    messages: Vec<Msg<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    thinking: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_config: Option<Value>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
}

#[derive(Serialize)]
struct Msg<'a> {
    role: &'static str,
    content: Content<'a>,
}

/// A string for plain text (the cheap path), blocks otherwise.
#[derive(Serialize)]
#[serde(untagged)]
enum Content<'a> {
    Text(Cow<'a, str>),
    Blocks(Vec<Value>),
}

impl Content<'_> {
    fn into_blocks(self) -> Vec<Value> {
        match self {
            Content::Text(t) => vec![json!({"type": "text", "text": t})],
            Content::Blocks(b) => b,
        }
    }
}

/// A tool id as Anthropic takes it (`^[a-zA-Z0-9_-]+$`): other characters become `_`, the same
/// way in a `tool_use` and in the `tool_result` that answers it.
fn tool_id(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn cache(block: &mut Value, cache: Option<&CacheControl>) {
    if let Some(c) = cache {
        let mut v = json!({"type": "ephemeral"});
        if let Some(ttl) = &c.ttl {
            v["ttl"] = json!(ttl);
        }
        block["cache_control"] = v;
    }
}

fn source(provider_what: &str, src: &MediaSource, limit: usize) -> Result<Value, LlmError> {
    check_size(ANTHROPIC, provider_what, src, limit)?;
    Ok(match (src.inline(), src) {
        (Some((media_type, data)), _) => {
            json!({"type": "base64", "media_type": media_type, "data": data})
        }
        (None, MediaSource::Url { url }) => json!({"type": "url", "url": url}),
        _ => {
            return Err(unsupported(
                ANTHROPIC,
                format_args!("this {provider_what} source"),
            ));
        }
    })
}

/// One neutral part as an Anthropic content block; `None` when a documented rule drops it.
fn block(part: &Part) -> Result<Option<Value>, LlmError> {
    let mut b = match part {
        Part::Text { text, .. } => json!({"type": "text", "text": text}),
        Part::Image { source: src, .. } => {
            if let Some((media_type, _)) = src.inline()
                && !matches!(
                    media_type,
                    "image/jpeg" | "image/png" | "image/gif" | "image/webp"
                )
            {
                return Err(unsupported(
                    ANTHROPIC,
                    format_args!("an image of type {media_type}"),
                ));
            }
            json!({"type": "image", "source": source("image", src, MAX_IMAGE_BYTES)?})
        }
        Part::Document {
            source: src, title, ..
        } => {
            if let Some((media_type, _)) = src.inline()
                && media_type != "application/pdf"
            {
                return Err(unsupported(
                    ANTHROPIC,
                    format_args!("a {media_type} document"),
                ));
            }
            let mut d =
                json!({"type": "document", "source": source("document", src, MAX_DOCUMENT_BYTES)?});
            if let Some(t) = title {
                d["title"] = json!(t);
            }
            d
        }
        Part::ToolCall(c) => {
            let input = c.arguments_json().map_err(|e| {
                unsupported(
                    ANTHROPIC,
                    format_args!("a tool call whose arguments are not JSON ({e})"),
                )
            })?;
            if !input.is_object() {
                return Err(unsupported(
                    ANTHROPIC,
                    "a tool call whose arguments are not a JSON object",
                ));
            }
            if c.id.is_empty() {
                return Err(unsupported(ANTHROPIC, "a tool call without an id"));
            }
            json!({"type": "tool_use", "id": tool_id(&c.id), "name": c.name, "input": input})
        }
        Part::ToolResult {
            call_id,
            content,
            is_error,
            ..
        } => {
            let content = match content.as_slice() {
                [
                    Part::Text {
                        text,
                        cache_control: None,
                    },
                ] => json!(text),
                parts => {
                    let mut blocks = Vec::with_capacity(parts.len());
                    for p in parts {
                        if matches!(p, Part::Text { .. } | Part::Image { .. }) {
                            blocks.extend(block(p)?);
                        } else {
                            return Err(unsupported(
                                ANTHROPIC,
                                "a tool result part other than text or an image",
                            ));
                        }
                    }
                    Value::Array(blocks)
                }
            };
            let mut r =
                json!({"type": "tool_result", "tool_use_id": tool_id(call_id), "content": content});
            if *is_error {
                r["is_error"] = json!(true);
            }
            r
        }
        Part::Thinking {
            thinking,
            signature: Some(sig),
        } => {
            json!({"type": "thinking", "thinking": thinking, "signature": sig})
        }
        // Anthropic verifies signatures: reasoning from another provider cannot go back.
        Part::Thinking {
            signature: None, ..
        } => return Ok(None),
        Part::RedactedThinking { data } => json!({"type": "redacted_thinking", "data": data}),
        Part::Raw { provider, value } if provider == ANTHROPIC => value.clone(),
        Part::Raw { provider, .. } => {
            return Err(unsupported(
                ANTHROPIC,
                format_args!("a raw block from {provider}"),
            ));
        }
        _ => return Err(unsupported(ANTHROPIC, "an unknown part")),
    };
    cache(&mut b, part.cache_control());
    Ok(Some(b))
}

/// A neutral message's content: a string for one uncached text part, blocks otherwise.
fn content(m: &ChatMessage) -> Result<Content<'_>, LlmError> {
    if let [
        Part::Text {
            cache_control: None,
            ..
        },
    ] = m.content.as_slice()
    {
        return Ok(Content::Text(m.text()));
    }
    let mut blocks = Vec::with_capacity(m.content.len());
    for part in &m.content {
        blocks.extend(block(part)?);
    }
    Ok(Content::Blocks(blocks))
}

/// The `system` field: the system messages' text joined by a blank line, or text blocks when
/// one carries a cache breakpoint.
fn system(messages: &[&ChatMessage]) -> Result<Option<Content<'static>>, LlmError> {
    if messages.is_empty() {
        return Ok(None);
    }
    let mut blocks = Vec::new();
    let mut cached = false;
    for m in messages {
        for part in &m.content {
            let Part::Text { .. } = part else {
                return Err(unsupported(
                    ANTHROPIC,
                    format_args!("{} in a system message", "a non-text part"),
                ));
            };
            cached |= part.cache_control().is_some();
            blocks.extend(block(part)?);
        }
    }
    if cached {
        return Ok(Some(Content::Blocks(blocks)));
    }
    let text: Vec<Cow<'_, str>> = messages.iter().map(|m| m.text()).collect();
    Ok(Some(Content::Text(Cow::Owned(text.join("\n\n")))))
}

fn tool_def(t: &Tool) -> Value {
    let mut v = json!({"name": t.name, "input_schema": t.parameters});
    if let Some(d) = &t.description {
        v["description"] = json!(d);
    }
    if t.strict {
        v["strict"] = json!(true);
    }
    cache(&mut v, t.cache_control.as_ref());
    v
}

/// Maps `stop_reason`. `model_context_window_exceeded` is [`FinishReason::Length`] (the answer
/// was cut short); `pause_turn` (a server tool paused a long turn: send the answer back to go
/// on) and unknown values are kept raw.
fn stop_reason(raw: &str) -> FinishReason {
    match raw {
        "end_turn" | "stop_sequence" => FinishReason::Stop,
        "max_tokens" | "model_context_window_exceeded" => FinishReason::Length,
        "refusal" => FinishReason::Refusal,
        "tool_use" => FinishReason::ToolCalls,
        other => FinishReason::Other(other.to_owned()),
    }
}

#[derive(Debug, Deserialize, Default, Clone, Copy)]
struct WireUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

impl WireUsage {
    /// Anthropic's `input_tokens` leaves out the cache reads and writes; [`Usage`] counts
    /// every input token, and says how many were cached.
    fn usage(self) -> Usage {
        let read = self.cache_read_input_tokens.unwrap_or(0);
        let created = self.cache_creation_input_tokens.unwrap_or(0);
        let input = self
            .input_tokens
            .saturating_add(read)
            .saturating_add(created);
        Usage::new(input, self.output_tokens).with_cache(read, created)
    }
}

#[derive(Deserialize)]
struct MessageBody {
    model: String,
    content: Vec<Value>,
    stop_reason: Option<String>,
    usage: WireUsage,
}

impl Wire for Anthropic {
    type Parser = MessageParser;

    fn name(&self) -> &'static str {
        ANTHROPIC
    }

    fn default_base_url(&self) -> &str {
        DEFAULT_BASE_URL
    }

    fn api_key_env(&self) -> &str {
        "ANTHROPIC_API_KEY"
    }

    fn path(&self) -> &str {
        "/v1/messages"
    }

    fn request_id_header(&self) -> &'static str {
        "request-id"
    }

    fn headers(&self, key: Option<&ApiKey>, headers: &mut HeaderMap) {
        if let Some(key) = key {
            headers.insert("x-api-key", key.header(""));
        }
        headers.insert("anthropic-version", self.version.clone());
    }

    /// The JSON body of `POST /v1/messages` (see [`Anthropic`] for the mapping rules). Extra
    /// fields for `"anthropic"` are merged last.
    fn request_body(&self, req: &ChatRequest, stream: bool) -> Result<Vec<u8>, LlmError> {
        let o = &req.options;
        let (system_msgs, rest): (Vec<_>, Vec<_>) =
            req.messages.iter().partition(|m| m.role == Role::System);
        let mut messages: Vec<Msg<'_>> = Vec::with_capacity(rest.len());
        for m in rest {
            let role = if m.role == Role::Assistant {
                "assistant"
            } else {
                "user"
            };
            let c = content(m)?;
            if matches!(&c, Content::Blocks(b) if b.is_empty()) {
                continue;
            }
            match messages.last_mut() {
                // Consecutive turns of one role share a turn (tool results first, as sent).
                Some(last) if last.role == role => {
                    let mut blocks =
                        std::mem::replace(&mut last.content, Content::Blocks(Vec::new()))
                            .into_blocks();
                    blocks.extend(c.into_blocks());
                    last.content = Content::Blocks(blocks);
                }
                _ => messages.push(Msg { role, content: c }),
            }
        }
        let thinking_budget = o.reasoning.as_ref().map(Reasoning::budget_or_default);
        let mut tools = tool_defs(req, tool_def)?;
        let mut choice = o.tool_choice.as_ref().map(|c| match c {
            ToolChoice::None => json!({"type": "none"}),
            ToolChoice::Required => json!({"type": "any"}),
            ToolChoice::Tool(name) => json!({"type": "tool", "name": name}),
            _ => json!({"type": "auto"}),
        });
        if o.parallel_tool_calls == Some(false) && !tools.is_empty() {
            choice.get_or_insert_with(|| json!({"type": "auto"}))["disable_parallel_tool_use"] =
                json!(true);
        }
        if thinking_budget.is_some()
            && matches!(
                o.tool_choice,
                Some(ToolChoice::Required | ToolChoice::Tool(_))
            )
        {
            return Err(unsupported(
                ANTHROPIC,
                "a forced tool choice with thinking on",
            ));
        }
        let mut output_config = None;
        if let Some(name) = self.emulated_tool(req) {
            if !tools.is_empty() {
                return Err(unsupported(
                    ANTHROPIC,
                    "structured output by a forced tool together with tools (use StructuredOutput::Native)",
                ));
            }
            if thinking_budget.is_some() {
                return Err(unsupported(
                    ANTHROPIC,
                    "structured output by a forced tool with thinking on",
                ));
            }
            let schema = match &o.response_format {
                ResponseFormat::JsonSchema { schema, .. } => (**schema).clone(),
                _ => json!({"type": "object"}),
            };
            tools.push(json!({"name": name, "description": "Answer with the JSON object this schema describes.", "input_schema": schema}));
            choice = Some(json!({"type": "tool", "name": name}));
        } else if let ResponseFormat::JsonSchema { schema, .. } = &o.response_format {
            output_config = Some(json!({"format": {"type": "json_schema", "schema": &**schema}}));
        }
        let body = Body {
            model: &req.model,
            max_tokens: o.output_limit(),
            system: system(&system_msgs)?,
            messages,
            temperature: thinking_budget.is_none().then_some(o.temperature),
            stop_sequences: &o.stop_sequences,
            tools,
            tool_choice: choice,
            thinking: thinking_budget.map(|b| json!({"type": "enabled", "budget_tokens": b})),
            output_config,
            stream,
        };
        body_with_extra(req, ANTHROPIC, &body)
    }

    /// Parses a complete `message` body: text blocks joined into the content, `tool_use`
    /// blocks into tool calls (their input as a JSON string), thinking and redacted thinking
    /// into reasoning, and any other block kept whole as [`Part::Raw`].
    fn parse_response(&self, req: &ChatRequest, body: &[u8]) -> Result<CompletionResult, LlmError> {
        let m: MessageBody = from_json(body)?;
        let reason = m
            .stop_reason
            .ok_or_else(|| malformed("`stop_reason` is null"))?;
        let emulated = self.emulated_tool(req);
        let mut r = CompletionResult::new(ANTHROPIC, m.model, String::new())
            .with_usage(m.usage.usage())
            .with_finish_reason(stop_reason(&reason));
        for b in m.content {
            let field = |k: &str| b.get(k).and_then(Value::as_str).map(str::to_owned);
            match b.get("type").and_then(Value::as_str) {
                Some("text") => r.content.push_str(
                    b.get("text")
                        .and_then(Value::as_str)
                        .ok_or_else(|| malformed("text block without `text`"))?,
                ),
                Some("tool_use") => {
                    let (Some(id), Some(name)) = (field("id"), field("name")) else {
                        return Err(malformed("tool_use block without `id` or `name`"));
                    };
                    let input = b
                        .get("input")
                        .map(Value::to_string)
                        .unwrap_or_else(|| "{}".to_owned());
                    if emulated.as_deref() == Some(name.as_str()) {
                        r.content.push_str(&input);
                        r.finish_reason = FinishReason::Stop;
                    } else {
                        r.tool_calls.push(ToolCall::new(id, name, input));
                    }
                }
                Some("thinking") => r.reasoning.push(Part::Thinking {
                    thinking: field("thinking")
                        .ok_or_else(|| malformed("thinking block without `thinking`"))?,
                    signature: field("signature"),
                }),
                Some("redacted_thinking") => r.reasoning.push(Part::RedactedThinking {
                    data: field("data")
                        .ok_or_else(|| malformed("redacted_thinking block without `data`"))?,
                }),
                _ => r.other.push(Part::Raw {
                    provider: Cow::Borrowed(ANTHROPIC),
                    value: b,
                }),
            }
        }
        Ok(r)
    }

    fn event_parser(&self, req: &ChatRequest) -> MessageParser {
        MessageParser {
            emulated: self.emulated_tool(req),
            ..MessageParser::default()
        }
    }
}

#[derive(Deserialize)]
struct MessageStart {
    message: StartMessage,
}

#[derive(Deserialize)]
struct StartMessage {
    model: String,
    usage: WireUsage,
}

#[derive(Deserialize)]
struct BlockStart {
    index: usize,
    content_block: Value,
}

#[derive(Deserialize)]
struct BlockDelta {
    index: usize,
    delta: DeltaBody,
}

#[derive(Deserialize)]
struct DeltaBody {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    partial_json: Option<String>,
    #[serde(default)]
    thinking: Option<String>,
    #[serde(default)]
    signature: Option<String>,
}

#[derive(Deserialize)]
struct BlockStop {
    index: usize,
}

#[derive(Deserialize)]
struct MessageDelta {
    delta: StopDelta,
    usage: DeltaUsage,
}

#[derive(Deserialize)]
struct StopDelta {
    #[serde(default)]
    stop_reason: Option<String>,
}

#[derive(Deserialize)]
struct DeltaUsage {
    #[serde(default)]
    input_tokens: Option<u64>,
    output_tokens: u64,
    #[serde(default)]
    cache_creation_input_tokens: Option<u64>,
    #[serde(default)]
    cache_read_input_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct ErrorEvent {
    error: ErrorBody,
}

#[derive(Deserialize)]
struct TypeOnly {
    #[serde(rename = "type")]
    kind: String,
}

/// What a content block of the stream is, by its index.
#[derive(Debug)]
enum Open {
    Text,
    /// The `n`th tool call of the answer, and whether any of its input came.
    Tool(usize, bool),
    /// The forced tool of emulated structured output: its input is the answer's text.
    Json,
    /// The `n`th reasoning block.
    Thinking(usize),
    /// A block this library does not model: kept whole, its `input_json_delta`s gathered.
    Other(Value, String),
    Closed,
}

/// The [`Anthropic`] stream's state: `message_start` … `message_stop`.
#[derive(Debug, Default)]
pub struct MessageParser {
    model: String,
    started: bool,
    usage: WireUsage,
    stop: Option<FinishReason>,
    emulated: Option<Cow<'static, str>>,
    blocks: Vec<Open>,
    tools: usize,
    thoughts: usize,
}

fn parse<'a, T: Deserialize<'a>>(data: &'a str) -> Result<T, LlmError> {
    from_json(data.as_bytes())
}

impl MessageParser {
    fn open(&mut self, index: usize, block: Value) -> Result<Step, LlmError> {
        if index > self.blocks.len() + 64 {
            return Err(malformed(format!(
                "content block index {index} out of order"
            )));
        }
        if self.blocks.len() <= index {
            self.blocks.resize_with(index + 1, || Open::Closed);
        }
        let field = |k: &str| block.get(k).and_then(Value::as_str).map(str::to_owned);
        let (open, step) = match block.get("type").and_then(Value::as_str) {
            Some("text") => {
                let text = field("text").unwrap_or_default();
                (Open::Text, step(StreamChunk::delta(text)))
            }
            Some("tool_use") => {
                let (Some(id), Some(name)) = (field("id"), field("name")) else {
                    return Err(malformed("tool_use block without `id` or `name`"));
                };
                if self.emulated.as_deref() == Some(name.as_str()) {
                    (Open::Json, Step::Skip)
                } else {
                    let n = self.tools;
                    self.tools += 1;
                    let d = ToolCallDelta::new(n, Some(id), Some(name), String::new());
                    (
                        Open::Tool(n, false),
                        Step::Content(StreamChunk::tool_call(d)),
                    )
                }
            }
            Some("thinking") => {
                let n = self.thoughts;
                self.thoughts += 1;
                let text = field("thinking").unwrap_or_default();
                let step = if text.is_empty() {
                    Step::Skip
                } else {
                    Step::Content(StreamChunk::thinking(ThinkingDelta::Text {
                        index: n,
                        text,
                    }))
                };
                (Open::Thinking(n), step)
            }
            Some("redacted_thinking") => {
                let n = self.thoughts;
                self.thoughts += 1;
                let data =
                    field("data").ok_or_else(|| malformed("redacted_thinking without `data`"))?;
                (
                    Open::Closed,
                    Step::Content(StreamChunk::thinking(ThinkingDelta::Redacted {
                        index: n,
                        data,
                    })),
                )
            }
            _ => (Open::Other(block, String::new()), Step::Skip),
        };
        self.blocks[index] = open;
        Ok(step)
    }

    fn delta(&mut self, d: BlockDelta) -> Result<Step, LlmError> {
        if d.delta.kind == "text_delta" {
            // Text is text, whether or not its block start was seen.
            let text = d
                .delta
                .text
                .ok_or_else(|| malformed("text_delta without `text`"))?;
            return Ok(step(StreamChunk::delta(text)));
        }
        let Some(open) = self.blocks.get_mut(d.index) else {
            return Err(malformed(format!(
                "delta for content block {} before its start",
                d.index
            )));
        };
        let b = d.delta;
        let missing = |what: &str| malformed(format!("{} without `{what}`", b.kind));
        Ok(match (b.kind.as_str(), open) {
            ("input_json_delta", open) => {
                let json = b
                    .partial_json
                    .clone()
                    .ok_or_else(|| missing("partial_json"))?;
                match open {
                    Open::Tool(n, seen) => {
                        *seen |= !json.is_empty();
                        step(StreamChunk::tool_call(ToolCallDelta::new(
                            *n, None, None, json,
                        )))
                    }
                    Open::Json => step(StreamChunk::delta(json)),
                    Open::Other(_, gathered) => {
                        gathered.push_str(&json);
                        Step::Skip
                    }
                    _ => return Err(malformed("input_json_delta outside a tool_use block")),
                }
            }
            ("thinking_delta", Open::Thinking(n)) => {
                let text = b.thinking.clone().ok_or_else(|| missing("thinking"))?;
                step(StreamChunk::thinking(ThinkingDelta::Text {
                    index: *n,
                    text,
                }))
            }
            ("signature_delta", Open::Thinking(n)) => {
                let signature = b.signature.clone().ok_or_else(|| missing("signature"))?;
                Step::Content(StreamChunk::thinking(ThinkingDelta::Signature {
                    index: *n,
                    signature,
                }))
            }
            ("thinking_delta" | "signature_delta", _) => {
                return Err(malformed(format!("{} outside a thinking block", b.kind)));
            }
            // citations_delta, and deltas added later.
            _ => Step::Skip,
        })
    }

    fn close(&mut self, index: usize) -> Step {
        match self
            .blocks
            .get_mut(index)
            .map(|b| std::mem::replace(b, Open::Closed))
        {
            // A tool without input (only `partial_json: ""`) has the empty object, as in a
            // complete answer.
            Some(Open::Tool(n, false)) => {
                let d = ToolCallDelta::new(n, None, None, "{}".to_owned());
                Step::Content(StreamChunk::tool_call(d))
            }
            Some(Open::Other(mut value, gathered)) => {
                if let Ok(input) = serde_json::from_str::<Value>(&gathered)
                    && let Some(map) = value.as_object_mut()
                {
                    map.insert("input".to_owned(), input);
                }
                let mut chunk = StreamChunk::default();
                chunk.other.push(Part::Raw {
                    provider: Cow::Borrowed(ANTHROPIC),
                    value,
                });
                Step::Content(chunk)
            }
            _ => Step::Skip,
        }
    }
}

/// A content step, or a skip for an empty chunk.
fn step(chunk: StreamChunk) -> Step {
    if chunk.has_content() {
        Step::Content(chunk)
    } else {
        Step::Skip
    }
}

impl EventParser for MessageParser {
    const TRUNCATED: &'static str = "the stream ended before message_stop";

    fn model(&self) -> &str {
        &self.model
    }

    fn on_event(&mut self, ev: SseEvent) -> Result<Step, LlmError> {
        // Anthropic names every event; a nameless one is dispatched on its data's `type`.
        let name = if ev.event == "message" {
            parse::<TypeOnly>(&ev.data)?.kind
        } else {
            ev.event.into_owned()
        };
        if !self.started && !matches!(name.as_str(), "message_start" | "error" | "ping") {
            return Err(malformed(format!("`{name}` before message_start")));
        }
        match name.as_str() {
            "message_start" => {
                let m: MessageStart = parse(&ev.data)?;
                self.model = m.message.model;
                self.usage = m.message.usage;
                self.started = true;
                Ok(Step::Skip)
            }
            "content_block_start" => {
                let b: BlockStart = parse(&ev.data)?;
                self.open(b.index, b.content_block)
            }
            "content_block_delta" => self.delta(parse(&ev.data)?),
            "content_block_stop" => Ok(self.close(parse::<BlockStop>(&ev.data)?.index)),
            "message_delta" => {
                let d: MessageDelta = parse(&ev.data)?;
                if let Some(r) = d.delta.stop_reason {
                    self.stop = Some(match stop_reason(&r) {
                        FinishReason::ToolCalls if self.emulated.is_some() && self.tools == 0 => {
                            FinishReason::Stop
                        }
                        other => other,
                    });
                }
                let u = &mut self.usage;
                u.input_tokens = d.usage.input_tokens.unwrap_or(u.input_tokens);
                u.output_tokens = d.usage.output_tokens;
                u.cache_creation_input_tokens = d
                    .usage
                    .cache_creation_input_tokens
                    .or(u.cache_creation_input_tokens);
                u.cache_read_input_tokens = d
                    .usage
                    .cache_read_input_tokens
                    .or(u.cache_read_input_tokens);
                Ok(Step::Skip)
            }
            "message_stop" => {
                let reason = self
                    .stop
                    .take()
                    .ok_or_else(|| malformed("message_stop without a stop_reason"))?;
                Ok(Step::End(StreamChunk::finish(
                    reason,
                    Some(self.usage.usage()),
                )))
            }
            "error" => Ok(Step::Error(parse::<ErrorEvent>(&ev.data)?.error)),
            // ping, and events added later.
            _ => Ok(Step::Skip),
        }
    }
}
