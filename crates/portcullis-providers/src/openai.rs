//! OpenAI Chat Completions (`POST {base_url}/chat/completions`): the [`OpenAi`] wire, and the
//! provider over it, [`OpenAiProvider`] (a [`CompletionResult`]) and [`OpenAiStream`] (a
//! [`ChatStream`](portcullis_core::ChatStream)).

use std::borrow::Cow;

use portcullis_core::{
    ChatMessage, ChatRequest, CompletionResult, FinishReason, LlmError, MediaSource, OPENAI, Part,
    ResponseFormat, Role, StreamChunk, Tool, ToolCall, ToolCallDelta, ToolChoice, Usage,
};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::sse::SseEvent;
use crate::wire::{
    ErrorBody, EventParser, Step, Text, Wire, body_with_extra, check_size, from_json, malformed,
    tool_defs, unsupported,
};
use crate::{Builder, Provider, StreamingProvider};

/// The default base URL (as in the official SDKs, it includes `/v1`).
pub const DEFAULT_BASE_URL: &str = "https://api.openai.com/v1";

/// OpenAI Chat Completions as a [`Provider`]: see there, and [`OpenAi`] for the wire.
pub type OpenAiProvider = Provider<OpenAi>;
/// The streaming face of an [`OpenAiProvider`], from [`Provider::streaming`].
pub type OpenAiStream = StreamingProvider<OpenAi>;
/// Builds an [`OpenAiProvider`]: base URL [`DEFAULT_BASE_URL`], key from `OPENAI_API_KEY`.
pub type OpenAiBuilder = Builder<OpenAi>;

/// The OpenAI Chat Completions wire: `Authorization: Bearer`, `x-request-id`, `finish_reason`
/// mapped to [`FinishReason`] (a refusal becomes [`FinishReason::Refusal`]), and a streaming
/// request asks for `stream_options.include_usage` so that the final chunk carries the usage.
#[derive(Debug, Clone, Default)]
pub struct OpenAi {
    legacy_max_tokens: bool,
}

impl OpenAi {
    /// Sends the legacy `max_tokens` instead of `max_completion_tokens`, for OpenAI-compatible
    /// servers that only know the old name.
    pub fn legacy_max_tokens(mut self, legacy: bool) -> Self {
        self.legacy_max_tokens = legacy;
        self
    }
}

impl Provider<OpenAi> {
    /// A builder for an OpenAI-compatible server (vLLM, Ollama, LM Studio, llama.cpp…) at
    /// `base_url` (the URL that `/chat/completions` is joined to, usually ending in `/v1`):
    /// no key (add one with [`Builder::api_key`]) and the legacy `max_tokens`, which every such
    /// server knows. The answers are read by the same OpenAI parser, which takes what these
    /// servers leave out or add: no `usage` (then zero, and a token bucket settles at its
    /// estimate), no `id` / `created` / `system_fingerprint`, usage only in a last chunk or in
    /// none, unknown fields.
    ///
    /// ```
    /// use portcullis_providers::OpenAiProvider;
    ///
    /// # fn main() -> Result<(), portcullis_core::LlmError> {
    /// let ollama = OpenAiProvider::compatible("http://localhost:11434/v1").build()?;
    /// assert_eq!(ollama.url().to_string(), "http://localhost:11434/v1/chat/completions");
    /// # Ok(()) }
    /// ```
    pub fn compatible(base_url: impl Into<String>) -> OpenAiBuilder {
        Builder::new(OpenAi::default().legacy_max_tokens(true))
            .base_url(base_url)
            .without_api_key()
    }
}

impl Builder<OpenAi> {
    /// Sends the legacy `max_tokens` instead of `max_completion_tokens` (see
    /// [`OpenAi::legacy_max_tokens`]).
    pub fn legacy_max_tokens(mut self, legacy: bool) -> Self {
        self.wire.legacy_max_tokens = legacy;
        self
    }
}

/// The largest inline image OpenAI takes (its documented 20 MB per image), refused before
/// sending.
pub const MAX_IMAGE_BYTES: usize = 20 * 1024 * 1024;

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    messages: Vec<Msg<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_choice: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parallel_tool_calls: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reasoning_effort: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<Value>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

/// One message of `messages`. `content` is a string for plain text (the cheap path), a list
/// of parts otherwise, and `null` on an assistant message that only calls tools.
#[derive(Serialize)]
struct Msg<'a> {
    role: &'static str,
    content: Option<Content<'a>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Content<'a> {
    Text(Cow<'a, str>),
    Parts(Vec<Value>),
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
}

/// The `data:` URL of an inline source, or the URL itself.
fn url_of(source: &MediaSource) -> Cow<'_, str> {
    match source {
        MediaSource::Url { url } => Cow::Borrowed(url),
        MediaSource::Base64 { media_type, data } => {
            Cow::Owned(format!("data:{media_type};base64,{data}"))
        }
        _ => Cow::Borrowed(""),
    }
}

/// Maps the content parts of a user or system message (text, images, PDFs) to OpenAI parts.
fn user_parts(parts: &[&Part]) -> Result<Vec<Value>, LlmError> {
    let mut out = Vec::with_capacity(parts.len());
    for part in parts {
        out.push(match part {
            Part::Text { text, .. } => json!({"type": "text", "text": text}),
            Part::Image { source, detail, .. } => {
                check_size(OPENAI, "an image", source, MAX_IMAGE_BYTES)?;
                let mut image = json!({"url": url_of(source)});
                if let Some(d) = detail {
                    image["detail"] = json!(d);
                }
                json!({"type": "image_url", "image_url": image})
            }
            Part::Document { source, title, .. } => {
                let Some((media_type, _)) = source.inline() else {
                    return Err(unsupported(OPENAI, "a document by URL (send its bytes)"));
                };
                if media_type != "application/pdf" {
                    return Err(unsupported(OPENAI, format_args!("a {media_type} document")));
                }
                let name = title.as_deref().unwrap_or("document.pdf");
                json!({"type": "file", "file": {"filename": name, "file_data": url_of(source)}})
            }
            Part::Raw { provider, value } if provider == OPENAI => value.clone(),
            other => {
                return Err(unsupported(
                    OPENAI,
                    format_args!("{} in this message", kind(other)),
                ));
            }
        });
    }
    Ok(out)
}

/// A part's name in errors.
fn kind(part: &Part) -> &'static str {
    match part {
        Part::Text { .. } => "text",
        Part::Image { .. } => "an image",
        Part::Document { .. } => "a document",
        Part::ToolCall(_) => "a tool call",
        Part::ToolResult { .. } => "a tool result",
        Part::Thinking { .. } | Part::RedactedThinking { .. } => "thinking",
        Part::Raw { .. } => "a raw block from another provider",
        _ => "an unknown part",
    }
}

/// The text of a tool result: OpenAI's tool messages take text only. An error result is sent
/// as its text prefixed with `Error: ` (OpenAI has no error flag).
fn tool_result_text<'a>(content: &'a [Part], is_error: bool) -> Result<Cow<'a, str>, LlmError> {
    let mut text = Cow::Borrowed("");
    for part in content {
        match part {
            Part::Text { text: t, .. } if text.is_empty() => text = Cow::Borrowed(t),
            Part::Text { text: t, .. } => text.to_mut().push_str(t),
            other => {
                return Err(unsupported(
                    OPENAI,
                    format_args!("{} in a tool result", kind(other)),
                ));
            }
        }
    }
    if is_error {
        text = Cow::Owned(format!("Error: {text}"));
    }
    Ok(text)
}

/// Maps one neutral message to one or more OpenAI messages: each tool result is a `tool`
/// message of its own; thinking is dropped (OpenAI keeps its reasoning on its side and takes
/// none back; Anthropic's signed thinking means nothing to it).
fn push_messages<'a>(m: &'a ChatMessage, out: &mut Vec<Msg<'a>>) -> Result<(), LlmError> {
    let plain = matches!(m.content.as_slice(), [Part::Text { .. }]);
    if plain || m.content.is_empty() {
        out.push(Msg {
            role: m.role.as_str(),
            content: Some(Content::Text(m.text())),
            tool_calls: Vec::new(),
            tool_call_id: None,
        });
        return Ok(());
    }
    let mut rest: Vec<&Part> = Vec::new();
    let mut calls = Vec::new();
    for part in &m.content {
        match part {
            Part::ToolResult {
                call_id,
                content,
                is_error,
                ..
            } => out.push(Msg {
                role: "tool",
                content: Some(Content::Text(tool_result_text(content, *is_error)?)),
                tool_calls: Vec::new(),
                tool_call_id: Some(call_id),
            }),
            Part::ToolCall(c) if m.role == Role::Assistant => calls.push(json!({
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments},
            })),
            // A call of a type this library does not model (`custom`) goes back as it came.
            Part::Raw { provider, value } if m.role == Role::Assistant && provider == OPENAI => {
                calls.push(value.clone());
            }
            Part::Thinking { .. } | Part::RedactedThinking { .. } => {}
            other => rest.push(other),
        }
    }
    match m.role {
        Role::Assistant => {
            let mut text = String::new();
            for part in rest {
                match part {
                    Part::Text { text: t, .. } => text.push_str(t),
                    other => {
                        return Err(unsupported(
                            OPENAI,
                            format_args!("{} in an assistant message", kind(other)),
                        ));
                    }
                }
            }
            if text.is_empty() && calls.is_empty() {
                return Ok(());
            }
            out.push(Msg {
                role: "assistant",
                content: (!text.is_empty()).then_some(Content::Text(Cow::Owned(text))),
                tool_calls: calls,
                tool_call_id: None,
            });
        }
        Role::System => {
            if rest.iter().any(|p| !matches!(p, Part::Text { .. })) {
                return Err(unsupported(OPENAI, "non-text parts in a system message"));
            }
            out.push(Msg {
                role: "system",
                content: Some(Content::Text(m.text())),
                tool_calls: Vec::new(),
                tool_call_id: None,
            });
        }
        _ if rest.is_empty() => {}
        _ => out.push(Msg {
            role: "user",
            content: Some(Content::Parts(user_parts(&rest)?)),
            tool_calls: Vec::new(),
            tool_call_id: None,
        }),
    }
    Ok(())
}

fn tool_def(t: &Tool) -> Value {
    let mut f = json!({"name": t.name, "parameters": t.parameters});
    if let Some(d) = &t.description {
        f["description"] = json!(d);
    }
    if t.strict {
        f["strict"] = json!(true);
    }
    json!({"type": "function", "function": f})
}

fn tool_choice(c: &ToolChoice) -> Value {
    match c {
        ToolChoice::None => json!("none"),
        ToolChoice::Required => json!("required"),
        ToolChoice::Tool(name) => json!({"type": "function", "function": {"name": name}}),
        _ => json!("auto"),
    }
}

fn response_format(f: &ResponseFormat) -> Option<Value> {
    match f {
        ResponseFormat::JsonObject => Some(json!({"type": "json_object"})),
        ResponseFormat::JsonSchema {
            name,
            schema,
            strict,
        } => Some(json!({"type": "json_schema", "json_schema": {
            "name": &**name, "schema": &**schema, "strict": strict,
        }})),
        _ => None,
    }
}

/// Maps `finish_reason`; unknown values are kept raw.
fn finish_reason(raw: &str) -> FinishReason {
    match raw {
        "stop" => FinishReason::Stop,
        "length" => FinishReason::Length,
        "content_filter" => FinishReason::ContentFilter,
        "tool_calls" | "function_call" => FinishReason::ToolCalls,
        other => FinishReason::Other(other.to_owned()),
    }
}

#[derive(Deserialize)]
struct WireUsage {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
    #[serde(default)]
    prompt_tokens_details: Option<PromptDetails>,
    #[serde(default)]
    completion_tokens_details: Option<CompletionDetails>,
}

#[derive(Deserialize)]
struct PromptDetails {
    #[serde(default)]
    cached_tokens: Option<u64>,
}

#[derive(Deserialize)]
struct CompletionDetails {
    #[serde(default)]
    reasoning_tokens: Option<u64>,
}

impl From<WireUsage> for Usage {
    /// `prompt_tokens` includes the cached tokens and `completion_tokens` the reasoning tokens,
    /// as [`Usage`] counts them.
    fn from(u: WireUsage) -> Usage {
        let cached = u.prompt_tokens_details.and_then(|d| d.cached_tokens);
        let reasoning = u.completion_tokens_details.and_then(|d| d.reasoning_tokens);
        Usage {
            input_tokens: u.prompt_tokens,
            output_tokens: u.completion_tokens,
            total_tokens: u.total_tokens,
            ..Usage::default()
        }
        .with_cache(cached.unwrap_or(0), 0)
        .with_reasoning(reasoning.unwrap_or(0))
    }
}

#[derive(Deserialize)]
struct Completion<'a> {
    model: String,
    #[serde(borrow)]
    choices: Vec<Choice<'a>>,
    /// Absent from some compatible servers' answers: then zero, which a token bucket reads as
    /// "not reported" and settles at its estimate.
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(default)]
    index: u32,
    message: ResponseMessage,
    /// Borrowed from the body: read, never kept.
    #[serde(default, borrow)]
    finish_reason: Option<Text<'a>>,
}

#[derive(Deserialize)]
struct ResponseMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    /// `null` from some compatible servers, as `[]` or absent from others.
    #[serde(default)]
    tool_calls: Option<Vec<Value>>,
}

#[derive(Deserialize)]
struct WireCall {
    id: String,
    function: WireFunction,
}

#[derive(Deserialize)]
struct WireFunction {
    name: String,
    #[serde(default)]
    arguments: String,
}

/// A `function` tool call becomes a [`ToolCall`] (its arguments kept as the raw string the model
/// wrote); any other type (`custom`, added later) is kept whole as [`Part::Raw`].
fn read_calls(calls: Vec<Value>, r: &mut CompletionResult) -> Result<(), LlmError> {
    for call in calls {
        if call
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("function")
            == "function"
        {
            let c: WireCall = serde_json::from_value(call).map_err(malformed)?;
            r.tool_calls
                .push(ToolCall::new(c.id, c.function.name, c.function.arguments));
        } else {
            r.other.push(Part::Raw {
                provider: Cow::Borrowed(OPENAI),
                value: call,
            });
        }
    }
    Ok(())
}

impl Wire for OpenAi {
    type Parser = ChunkParser;

    fn name(&self) -> &'static str {
        OPENAI
    }

    fn default_base_url(&self) -> &str {
        DEFAULT_BASE_URL
    }

    fn api_key_env(&self) -> &str {
        "OPENAI_API_KEY"
    }

    fn path(&self) -> &str {
        "/chat/completions"
    }

    /// The JSON body of `POST /chat/completions`. With reasoning on, `temperature` is not sent
    /// (reasoning models refuse it) and `max_completion_tokens` grows by the thinking budget:
    /// OpenAI counts reasoning inside it, while [`CompletionOptions::max_tokens`] bounds the
    /// visible answer. Extra fields for `"openai"` are merged last.
    ///
    /// [`CompletionOptions::max_tokens`]: portcullis_core::CompletionOptions::max_tokens
    fn request_body(&self, req: &ChatRequest, stream: bool) -> Result<Vec<u8>, LlmError> {
        let o = &req.options;
        let reasoning = o.reasoning.as_ref();
        let max = Some(
            o.max_tokens
                .saturating_add(reasoning.map_or(0, |r| r.budget_or_default())),
        );
        let mut messages = Vec::with_capacity(req.messages.len());
        for m in req.messages.iter() {
            push_messages(m, &mut messages)?;
        }
        let has_tools = !o.tools.is_empty();
        let body = Body {
            model: &req.model,
            messages,
            temperature: reasoning.is_none().then_some(o.temperature),
            max_completion_tokens: max.filter(|_| !self.legacy_max_tokens),
            max_tokens: max.filter(|_| self.legacy_max_tokens),
            stop: &o.stop_sequences,
            tools: tool_defs(req, tool_def)?,
            tool_choice: o.tool_choice.as_ref().map(tool_choice),
            parallel_tool_calls: o.parallel_tool_calls.filter(|_| has_tools),
            reasoning_effort: reasoning.map(|r| r.effort_or_default().as_str()),
            response_format: response_format(&o.response_format),
            stream,
            stream_options: stream.then_some(StreamOptions {
                include_usage: true,
            }),
        };
        body_with_extra(req, OPENAI, &body)
    }

    /// Parses a complete `chat.completion` body: choice 0's text, tool calls and usage. A
    /// refusal becomes [`FinishReason::Refusal`] with the refusal text as content.
    fn parse_response(&self, _: &ChatRequest, body: &[u8]) -> Result<CompletionResult, LlmError> {
        let c: Completion<'_> = from_json(body)?;
        let choice = c
            .choices
            .into_iter()
            .find(|ch| ch.index == 0)
            .ok_or_else(|| malformed("no choice 0"))?;
        let raw_reason = choice
            .finish_reason
            .ok_or_else(|| malformed("`finish_reason` is null"))?;
        let (content, finish_reason) = match choice.message.refusal.filter(|r| !r.is_empty()) {
            Some(refusal) => (refusal, FinishReason::Refusal),
            None => (
                choice.message.content.unwrap_or_default(),
                finish_reason(&raw_reason.0),
            ),
        };
        let mut r = CompletionResult::new(OPENAI, c.model, content)
            .with_usage(c.usage.map(Into::into).unwrap_or_default())
            .with_finish_reason(finish_reason);
        read_calls(choice.message.tool_calls.unwrap_or_default(), &mut r)?;
        Ok(r)
    }

    fn event_parser(&self, _: &ChatRequest) -> ChunkParser {
        ChunkParser::default()
    }
}

#[derive(Deserialize)]
struct Chunk<'a> {
    /// Borrowed from the event: kept once, from the first chunk.
    #[serde(default, borrow)]
    model: Option<Text<'a>>,
    #[serde(default, borrow)]
    choices: Option<Vec<ChunkChoice<'a>>>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<ErrorBody>,
}

#[derive(Deserialize)]
struct ChunkChoice<'a> {
    #[serde(default)]
    index: u32,
    /// Absent (or null) in Azure OpenAI's content-filter annotation chunks (the asynchronous
    /// filter: `content_filter_results` / `content_filter_offsets` and no delta; see
    /// openai-python#1677, microsoft/autogen#6465): nothing to yield then.
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default, borrow)]
    finish_reason: Option<Text<'a>>,
}

#[derive(Deserialize, Default)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<CallDelta>>,
}

#[derive(Deserialize)]
struct CallDelta {
    index: usize,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<FunctionDelta>,
}

#[derive(Deserialize)]
struct FunctionDelta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

/// The [`OpenAi`] stream's state: `chat.completion.chunk`s until `data: [DONE]`. Only choice 0
/// is read: with `n > 1`, the other choices' chunks are skipped.
#[derive(Debug, Default)]
pub struct ChunkParser {
    model: String,
    finish: Option<FinishReason>,
    refused: bool,
    usage: Option<Usage>,
}

impl EventParser for ChunkParser {
    const TRUNCATED: &'static str = "the stream ended before data: [DONE]";

    fn model(&self) -> &str {
        &self.model
    }

    fn on_event(&mut self, ev: SseEvent) -> Result<Step, LlmError> {
        if ev.data == "[DONE]" {
            let reason = match self.finish.take() {
                _ if self.refused => FinishReason::Refusal,
                Some(r) => r,
                None => return Err(malformed("the stream ended without a finish_reason")),
            };
            return Ok(Step::End(StreamChunk::finish(reason, self.usage)));
        }
        let chunk: Chunk<'_> = from_json(ev.data.as_bytes())?;
        if let Some(err) = chunk.error {
            return Ok(Step::Error(err));
        }
        let choices = chunk
            .choices
            .ok_or_else(|| malformed("missing field `choices`"))?;
        let model = chunk
            .model
            .ok_or_else(|| malformed("missing field `model`"))?;
        if self.model.is_empty() {
            self.model = model.0.into_owned();
        }
        if let Some(u) = chunk.usage {
            self.usage = Some(u.into());
        }
        let Some(choice) = choices.into_iter().find(|c| c.index == 0) else {
            return Ok(Step::Skip);
        };
        if let Some(r) = choice.finish_reason {
            self.finish = Some(finish_reason(&r.0));
        }
        let delta = choice.delta.unwrap_or_default();
        let mut out = StreamChunk::delta(delta.content.unwrap_or_default());
        if let Some(refusal) = delta.refusal.filter(|r| !r.is_empty()) {
            self.refused = true;
            out.delta.push_str(&refusal);
        }
        for call in delta.tool_calls.into_iter().flatten() {
            let (name, arguments) = match call.function {
                Some(f) => (f.name, f.arguments.unwrap_or_default()),
                None => (None, String::new()),
            };
            if call.id.is_some() || name.is_some() || !arguments.is_empty() {
                out.tool_calls
                    .push(ToolCallDelta::new(call.index, call.id, name, arguments));
            }
        }
        Ok(if out.has_content() {
            Step::Content(out)
        } else {
            Step::Skip
        })
    }
}
