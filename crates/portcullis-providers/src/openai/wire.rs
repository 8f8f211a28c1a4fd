//! The OpenAI Chat Completions wire format: the request body, the complete response, and the
//! stream's event parser.

use portcullis_core::{ChatRequest, FinishReason, LlmError, ResponseFormat, StreamChunk, Usage};
use serde::{Deserialize, Serialize};

use crate::call::{EventParser, Parsed, Step, protocol};
use crate::error_body::WireError;
use crate::key::ApiKey;
use crate::sse::SseEvent;

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
struct Message<'a> {
    role: &'static str,
    content: &'a str,
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

/// The JSON body of `POST /chat/completions`.
pub(crate) fn request_body(
    req: &ChatRequest,
    legacy_max_tokens: bool,
    stream: bool,
) -> Result<Vec<u8>, LlmError> {
    let o = &req.options;
    let max = Some(o.max_tokens);
    let body = Body {
        model: &req.model,
        messages: req
            .messages
            .iter()
            .map(|m| Message {
                role: m.role.as_str(),
                content: &m.content,
            })
            .collect(),
        temperature: o.temperature,
        max_completion_tokens: max.filter(|_| !legacy_max_tokens),
        max_tokens: max.filter(|_| legacy_max_tokens),
        stop: &o.stop_sequences,
        response_format: match o.response_format {
            ResponseFormat::Text => None,
            ResponseFormat::JsonObject => Some(Format {
                kind: "json_object",
            }),
        },
        stream,
        stream_options: stream.then_some(StreamOptions {
            include_usage: true,
        }),
    };
    serde_json::to_vec(&body).map_err(|e| {
        LlmError::new(
            portcullis_core::ErrorKind::InvalidRequest,
            "the request could not be serialized",
        )
        .with_source(e)
    })
}

/// Maps `finish_reason`; unknown values are kept raw.
pub(crate) fn finish_reason(raw: &str) -> FinishReason {
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

/// Parses a complete `chat.completion` body. A refusal becomes [`FinishReason::Refusal`] with
/// the refusal text as content.
pub(crate) fn parse_completion(body: &[u8]) -> Result<Parsed, LlmError> {
    let c: Completion = serde_json::from_slice(body).map_err(protocol)?;
    let choice = c
        .choices
        .into_iter()
        .next()
        .ok_or_else(|| protocol("no choices"))?;
    let (content, finish_reason) = match choice.message.refusal.filter(|r| !r.is_empty()) {
        Some(refusal) => (refusal, FinishReason::Refusal),
        None => (
            choice.message.content.unwrap_or_default(),
            finish_reason(&choice.finish_reason),
        ),
    };
    Ok(Parsed {
        content,
        usage: c.usage.into(),
        model: c.model,
        finish_reason,
    })
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
    error: Option<WireError>,
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

/// The stream state: `chat.completion.chunk`s until `data: [DONE]`.
#[derive(Debug, Default)]
pub(crate) struct ChunkParser {
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

    fn on_event(&mut self, ev: SseEvent, key: Option<&ApiKey>) -> Result<Step, LlmError> {
        if ev.data == "[DONE]" {
            let reason = match self.finish.take() {
                _ if self.refused => FinishReason::Refusal,
                Some(r) => r,
                None => return Err(protocol("the stream ended without a finish_reason")),
            };
            return Ok(Step::End(StreamChunk::finish(reason, self.usage)));
        }
        let chunk: Chunk = serde_json::from_str(&ev.data).map_err(protocol)?;
        if let Some(err) = chunk.error {
            return Err(err.into_error(None, key));
        }
        let choices = chunk
            .choices
            .ok_or_else(|| protocol("missing field `choices`"))?;
        let model = chunk
            .model
            .ok_or_else(|| protocol("missing field `model`"))?;
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
            Step::Content(text)
        })
    }
}
