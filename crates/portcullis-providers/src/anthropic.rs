//! Anthropic Messages (`POST {base_url}/v1/messages`): the [`Anthropic`] wire, and the provider
//! over it, [`AnthropicProvider`] (a [`CompletionResult`]) and [`AnthropicStream`] (a
//! [`ChatStream`](portcullis_core::ChatStream)).

use http::{HeaderMap, HeaderValue};
use portcullis_core::{
    ANTHROPIC, ChatRequest, CompletionResult, FinishReason, LlmError, Role, StreamChunk, Usage,
};
use serde::{Deserialize, Serialize};

use crate::key::ApiKey;
use crate::sse::SseEvent;
use crate::wire::{ErrorBody, EventParser, Message, Step, Wire, from_json, json_body, malformed};
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

/// The Anthropic Messages wire: `x-api-key`, `anthropic-version`, `request-id`. System
/// messages go to the top-level `system` field; `response_format` has no Anthropic equivalent
/// and is not sent. A stream's final chunk carries the usage (cumulative, from
/// `message_delta`).
#[derive(Debug, Clone)]
pub struct Anthropic {
    version: HeaderValue,
}

impl Default for Anthropic {
    fn default() -> Self {
        Anthropic {
            version: HeaderValue::from_static(ANTHROPIC_VERSION),
        }
    }
}

impl Anthropic {
    /// Sends this `anthropic-version` instead of [`ANTHROPIC_VERSION`].
    pub fn version(mut self, version: HeaderValue) -> Self {
        self.version = version;
        self
    }
}

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

/// Maps `stop_reason`; `pause_turn` and unknown values are kept raw.
fn stop_reason(raw: &str) -> FinishReason {
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

    /// The JSON body of `POST /v1/messages`. System messages are joined (blank line between) into
    /// the top-level `system`.
    fn request_body(&self, req: &ChatRequest, stream: bool) -> Result<Vec<u8>, LlmError> {
        let (system, rest): (Vec<_>, Vec<_>) =
            req.messages.iter().partition(|m| m.role == Role::System);
        let o = &req.options;
        let body = Body {
            model: &req.model,
            max_tokens: o.max_tokens,
            system: (!system.is_empty()).then(|| {
                system
                    .iter()
                    .map(|m| m.text())
                    .collect::<Vec<_>>()
                    .join(
                        "

",
                    )
            }),
            messages: rest.into_iter().map(Message::from).collect(),
            temperature: o.temperature,
            stop_sequences: &o.stop_sequences,
            stream,
        };
        json_body(&body)
    }

    /// Parses a complete `message` body: the text blocks joined, other blocks (tool use) skipped.
    fn parse_response(&self, body: &[u8]) -> Result<CompletionResult, LlmError> {
        let m: MessageBody = from_json(body)?;
        let reason = m
            .stop_reason
            .ok_or_else(|| malformed("`stop_reason` is null"))?;
        let mut content = String::new();
        for b in m.content.iter().filter(|b| b.kind == "text") {
            content.push_str(
                b.text
                    .as_deref()
                    .ok_or_else(|| malformed("text block without `text`"))?,
            );
        }
        Ok(CompletionResult::new(ANTHROPIC, m.model, content)
            .with_usage(Usage::new(m.usage.input_tokens, m.usage.output_tokens))
            .with_finish_reason(stop_reason(&reason)))
    }

    fn event_parser(&self) -> MessageParser {
        MessageParser::default()
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
    error: ErrorBody,
}

#[derive(Deserialize)]
struct TypeOnly {
    #[serde(rename = "type")]
    kind: String,
}

/// The [`Anthropic`] stream's state: `message_start` … `message_stop`.
#[derive(Debug, Default)]
pub struct MessageParser {
    model: String,
    started: bool,
    input_tokens: u64,
    output_tokens: u64,
    stop: Option<FinishReason>,
}

fn parse<'a, T: Deserialize<'a>>(data: &'a str) -> Result<T, LlmError> {
    from_json(data.as_bytes())
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
            ev.event
        };
        let started = self.started;
        let need_start = || {
            if started {
                Ok(())
            } else {
                Err(malformed(format!("`{name}` before message_start")))
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
                    ("text_delta", Some(t)) if !t.is_empty() => Ok(Step::Content(StreamChunk::delta(t))),
                    ("text_delta", None) => Err(malformed("text_delta without `text`")),
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
                    .ok_or_else(|| malformed("message_stop without a stop_reason"))?;
                let usage = Usage::new(self.input_tokens, self.output_tokens);
                Ok(Step::End(StreamChunk::finish(reason, Some(usage))))
            }
            "error" => Ok(Step::Error(parse::<ErrorEvent>(&ev.data)?.error)),
            // ping, content_block_start / _stop, and events added later.
            _ => Ok(Step::Skip),
        }
    }
}
