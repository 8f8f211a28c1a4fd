//! The Anthropic Messages wire format: the request body, the complete message, and the stream's
//! event parser.

use portcullis_core::{ChatRequest, FinishReason, LlmError, Role, StreamChunk, Usage};
use serde::{Deserialize, Serialize};

use crate::call::{EventParser, Parsed, Step, protocol};
use crate::error_body::WireError;
use crate::key::ApiKey;
use crate::sse::SseEvent;

#[derive(Serialize)]
struct Body<'a> {
    model: &'a str,
    max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    system: Option<String>,
    messages: Vec<Message<'a>>,
    temperature: f32,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    stream: bool,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

/// The JSON body of `POST /v1/messages`. System messages are joined (blank line between) into
/// the top-level `system`.
pub(crate) fn request_body(req: &ChatRequest, stream: bool) -> Result<Vec<u8>, LlmError> {
    let (system, rest): (Vec<_>, Vec<_>) =
        req.messages.iter().partition(|m| m.role == Role::System);
    let o = &req.options;
    let body = Body {
        model: &req.model,
        max_tokens: o.max_tokens,
        system: (!system.is_empty()).then(|| {
            system
                .iter()
                .map(|m| m.content.as_str())
                .collect::<Vec<_>>()
                .join("\n\n")
        }),
        messages: rest
            .iter()
            .map(|m| Message {
                role: m.role.as_str(),
                content: &m.content,
            })
            .collect(),
        temperature: o.temperature,
        stop_sequences: &o.stop_sequences,
        stream,
    };
    serde_json::to_vec(&body).map_err(|e| {
        LlmError::new(
            portcullis_core::ErrorKind::InvalidRequest,
            "the request could not be serialized",
        )
        .with_source(e)
    })
}

/// Maps `stop_reason`; `pause_turn` and unknown values are kept raw.
pub(crate) fn stop_reason(raw: &str) -> FinishReason {
    match raw {
        "end_turn" | "stop_sequence" => FinishReason::Stop,
        "max_tokens" => FinishReason::Length,
        "refusal" => FinishReason::Refusal,
        "tool_use" => FinishReason::ToolCalls,
        other => FinishReason::Other(other.to_owned()),
    }
}

#[derive(Deserialize)]
struct WireUsage {
    input_tokens: u64,
    output_tokens: u64,
}

#[derive(Deserialize)]
struct MessageBody {
    model: String,
    content: Vec<Block>,
    stop_reason: Option<String>,
    usage: WireUsage,
}

#[derive(Deserialize)]
struct Block {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
}

/// Parses a complete `message` body: the text blocks joined, other blocks (tool use) skipped.
pub(crate) fn parse_message(body: &[u8]) -> Result<Parsed, LlmError> {
    let m: MessageBody = serde_json::from_slice(body).map_err(protocol)?;
    let reason = m
        .stop_reason
        .ok_or_else(|| protocol("`stop_reason` is null"))?;
    let mut content = String::new();
    for b in m.content.iter().filter(|b| b.kind == "text") {
        content.push_str(
            b.text
                .as_deref()
                .ok_or_else(|| protocol("text block without `text`"))?,
        );
    }
    Ok(Parsed {
        content,
        usage: Usage::new(m.usage.input_tokens, m.usage.output_tokens),
        model: m.model,
        finish_reason: stop_reason(&reason),
    })
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
struct BlockDelta {
    delta: DeltaBody,
}

#[derive(Deserialize)]
struct DeltaBody {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
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
}

#[derive(Deserialize)]
struct ErrorEvent {
    error: WireError,
}

#[derive(Deserialize)]
struct TypeOnly {
    #[serde(rename = "type")]
    kind: String,
}

/// The stream state: `message_start` … `message_stop`.
#[derive(Debug, Default)]
pub(crate) struct MessageParser {
    model: String,
    started: bool,
    input_tokens: u64,
    output_tokens: u64,
    stop: Option<FinishReason>,
}

fn parse<'a, T: Deserialize<'a>>(data: &'a str) -> Result<T, LlmError> {
    serde_json::from_str(data).map_err(protocol)
}

impl EventParser for MessageParser {
    const TRUNCATED: &'static str = "the stream ended before message_stop";

    fn model(&self) -> &str {
        &self.model
    }

    fn on_event(&mut self, ev: SseEvent, key: Option<&ApiKey>) -> Result<Step, LlmError> {
        // Anthropic names every event; a nameless one is dispatched on its data's `type`.
        let name = if ev.event == "message" {
            parse::<TypeOnly>(&ev.data)?.kind
        } else {
            ev.event
        };
        let started = self.started;
        let need_start = || {
            if started {
                Ok(())
            } else {
                Err(protocol(format!("`{name}` before message_start")))
            }
        };
        match name.as_str() {
            "message_start" => {
                let m: MessageStart = parse(&ev.data)?;
                self.model = m.message.model;
                self.input_tokens = m.message.usage.input_tokens;
                self.output_tokens = m.message.usage.output_tokens;
                self.started = true;
                Ok(Step::Skip)
            }
            "content_block_delta" => {
                need_start()?;
                let d: BlockDelta = parse(&ev.data)?;
                match (d.delta.kind.as_str(), d.delta.text) {
                    ("text_delta", Some(t)) if !t.is_empty() => Ok(Step::Content(t)),
                    ("text_delta", None) => Err(protocol("text_delta without `text`")),
                    _ => Ok(Step::Skip),
                }
            }
            "message_delta" => {
                need_start()?;
                let d: MessageDelta = parse(&ev.data)?;
                if let Some(r) = d.delta.stop_reason {
                    self.stop = Some(stop_reason(&r));
                }
                if let Some(i) = d.usage.input_tokens {
                    self.input_tokens = i;
                }
                self.output_tokens = d.usage.output_tokens;
                Ok(Step::Skip)
            }
            "message_stop" => {
                need_start()?;
                let reason = self
                    .stop
                    .take()
                    .ok_or_else(|| protocol("message_stop without a stop_reason"))?;
                let usage = Usage::new(self.input_tokens, self.output_tokens);
                Ok(Step::End(StreamChunk::finish(reason, Some(usage))))
            }
            "error" => Err(parse::<ErrorEvent>(&ev.data)?.error.into_error(None, key)),
            // ping, content_block_start / _stop, and events added later.
            _ => Ok(Step::Skip),
        }
    }
}
