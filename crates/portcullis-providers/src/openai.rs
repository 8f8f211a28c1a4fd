//! OpenAI Chat Completions (`POST {base_url}/chat/completions`): the [`OpenAi`] wire, and the
//! provider over it, [`OpenAiProvider`] (a [`CompletionResult`]) and [`OpenAiStream`] (a
//! [`ChatStream`](portcullis_core::ChatStream)).

use portcullis_core::{
    ChatRequest, CompletionResult, FinishReason, LlmError, OPENAI, ResponseFormat, StreamChunk,
    Usage,
};
use serde::{Deserialize, Serialize};

use crate::sse::SseEvent;
use crate::wire::{ErrorBody, EventParser, Message, Step, Wire, from_json, json_body, malformed};
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

impl Builder<OpenAi> {
    /// Sends the legacy `max_tokens` instead of `max_completion_tokens` (see
    /// [`OpenAi::legacy_max_tokens`]).
    pub fn legacy_max_tokens(mut self, legacy: bool) -> Self {
        self.wire.legacy_max_tokens = legacy;
        self
    }
}

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    messages: Vec<Message<'a>>,
    temperature: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    response_format: Option<Format>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_options: Option<StreamOptions>,
}

#[derive(Serialize)]
struct Format {
    #[serde(rename = "type")]
    kind: &'static str,
}

#[derive(Serialize)]
struct StreamOptions {
    include_usage: bool,
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
}

impl From<WireUsage> for Usage {
    fn from(u: WireUsage) -> Usage {
        Usage {
            input_tokens: u.prompt_tokens,
            output_tokens: u.completion_tokens,
            total_tokens: u.total_tokens,
            ..Usage::default()
        }
    }
}

#[derive(Deserialize)]
struct Completion {
    model: String,
    choices: Vec<Choice>,
    usage: WireUsage,
}

#[derive(Deserialize)]
struct Choice {
    message: ResponseMessage,
    finish_reason: String,
}

#[derive(Deserialize)]
struct ResponseMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
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

    /// The JSON body of `POST /chat/completions`.
    fn request_body(&self, req: &ChatRequest, stream: bool) -> Result<Vec<u8>, LlmError> {
        let o = &req.options;
        let max = Some(o.max_tokens);
        let body = Body {
            model: &req.model,
            messages: req.messages.iter().map(Message::from).collect(),
            temperature: o.temperature,
            max_completion_tokens: max.filter(|_| !self.legacy_max_tokens),
            max_tokens: max.filter(|_| self.legacy_max_tokens),
            stop: &o.stop_sequences,
            response_format: match o.response_format {
                ResponseFormat::Text => None,
                ResponseFormat::JsonObject => Some(Format {
                    kind: "json_object",
                }),
                _ => None,
            },
            stream,
            stream_options: stream.then_some(StreamOptions {
                include_usage: true,
            }),
        };
        json_body(&body)
    }

    /// Parses a complete `chat.completion` body. A refusal becomes [`FinishReason::Refusal`] with
    /// the refusal text as content.
    fn parse_response(&self, body: &[u8]) -> Result<CompletionResult, LlmError> {
        let c: Completion = from_json(body)?;
        let choice = c
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| malformed("no choices"))?;
        let (content, finish_reason) = match choice.message.refusal.filter(|r| !r.is_empty()) {
            Some(refusal) => (refusal, FinishReason::Refusal),
            None => (
                choice.message.content.unwrap_or_default(),
                finish_reason(&choice.finish_reason),
            ),
        };
        Ok(CompletionResult::new(OPENAI, c.model, content)
            .with_usage(c.usage.into())
            .with_finish_reason(finish_reason))
    }

    fn event_parser(&self) -> ChunkParser {
        ChunkParser::default()
    }
}

#[derive(Deserialize)]
struct Chunk {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    choices: Option<Vec<ChunkChoice>>,
    #[serde(default)]
    usage: Option<WireUsage>,
    #[serde(default)]
    error: Option<ErrorBody>,
}

#[derive(Deserialize)]
struct ChunkChoice {
    delta: Delta,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    refusal: Option<String>,
}

/// The [`OpenAi`] stream's state: `chat.completion.chunk`s until `data: [DONE]`.
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
        let chunk: Chunk = from_json(ev.data.as_bytes())?;
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
            self.model = model;
        }
        if let Some(u) = chunk.usage {
            self.usage = Some(u.into());
        }
        let Some(choice) = choices.into_iter().next() else {
            return Ok(Step::Skip);
        };
        if let Some(r) = choice.finish_reason {
            self.finish = Some(finish_reason(&r));
        }
        let mut text = choice.delta.content.unwrap_or_default();
        if let Some(refusal) = choice.delta.refusal.filter(|r| !r.is_empty()) {
            self.refused = true;
            text.push_str(&refusal);
        }
        Ok(if text.is_empty() {
            Step::Skip
        } else {
            Step::Content(StreamChunk::delta(text))
        })
    }
}
