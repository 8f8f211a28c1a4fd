//! `POST /v1/messages` and `/v1/messages/count_tokens`: parsing and the answer.

use bytes::Bytes;
use http::{Response, StatusCode};
use portcullis_core::{AnthropicEstimator, Encoding, OpenAiTokenizer, TokenEstimator};
use serde_json::{Value, json};

use crate::api::{Ctx, Mangle, Parsed, positive_int, text_of};
use crate::generate::{Ending, Generated};
use crate::scenario::Family;
use crate::wire::{self, SimBody, WireError};

fn bad(msg: impl Into<String>) -> WireError<'static> {
    WireError::new(400, msg)
}

/// Reads a Messages (or count_tokens, without `max_tokens`) request.
///
/// Input tokens are the "true" count: o200k text tokens plus
/// [`AnthropicEstimator::BASE_OVERHEAD`]. The client's estimator scales text up by 1.1, so its
/// estimate errs high, as against the real API.
pub(crate) fn parse(v: &Value, needs_max_tokens: bool) -> Result<Parsed, WireError<'static>> {
    if !v.is_object() {
        return Err(bad("Input should be a valid dictionary"));
    }
    let model = match v.get("model").and_then(Value::as_str) {
        Some(m) if !m.is_empty() => m.to_owned(),
        _ => return Err(bad("model: Field required")),
    };
    let max_tokens = positive_int(v, "max_tokens", Family::Anthropic)?;
    if needs_max_tokens && max_tokens.is_none() {
        return Err(bad("max_tokens: Field required"));
    }
    let messages = match v.get("messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => return Err(bad("messages: at least one message is required")),
        Some(_) => return Err(bad("messages: Input should be a valid list")),
        None => return Err(bad("messages: Field required")),
    };
    let counter = OpenAiTokenizer::new(Encoding::O200k).exact();
    let system = match v.get("system") {
        None => String::new(),
        Some(s) => text_of(s).ok_or_else(|| bad("system: Input should be a valid string"))?,
    };
    let mut input_tokens = AnthropicEstimator::BASE_OVERHEAD + counter.count_text(&system);
    for (i, m) in messages.iter().enumerate() {
        match m.get("role").and_then(Value::as_str) {
            Some("user" | "assistant") => {}
            _ => {
                return Err(bad(format!(
                    "messages.{i}.role: Input should be 'user' or 'assistant'"
                )));
            }
        }
        let content = m
            .get("content")
            .and_then(text_of)
            .ok_or_else(|| bad(format!("messages.{i}.content: Field required")))?;
        input_tokens += counter.count_text(&content);
    }
    let stops = match v.get("stop_sequences") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) if a.iter().all(Value::is_string) => a
            .iter()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect(),
        Some(_) => {
            return Err(bad(
                "stop_sequences: Input should be a valid list of strings",
            ));
        }
    };
    let stream = match v.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(bad("stream: Input should be a valid boolean")),
    };
    Ok(Parsed {
        model,
        stream,
        include_usage: true,
        max_tokens,
        stops,
        input_tokens,
        content_key: json!([system, messages]).to_string(),
    })
}

fn stop(g: &Generated) -> (&'static str, Value) {
    match &g.ending {
        Ending::Natural => ("end_turn", Value::Null),
        Ending::Length => ("max_tokens", Value::Null),
        Ending::Stop(s) => ("stop_sequence", Value::String(s.clone())),
    }
}

/// The answer, shaped as Anthropic's (see the recordings in the fixtures).
pub(crate) fn render(ctx: &Ctx, p: &Parsed, g: &Generated, mangle: Mangle) -> Response<SimBody> {
    let (stop_reason, stop_sequence) = stop(g);
    let usage = |output: u64| {
        json!({
            "input_tokens": p.input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "cache_creation": {"ephemeral_5m_input_tokens": 0, "ephemeral_1h_input_tokens": 0},
            "output_tokens": output,
            "service_tier": "standard"
        })
    };
    if !p.stream {
        let body = json!({
            "id": ctx.id,
            "type": "message",
            "role": "assistant",
            "model": p.model,
            "content": [{"type": "text", "text": g.text}],
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": usage(g.tokens)
        });
        if mangle == Mangle::MalformedJson {
            let s = body.to_string();
            let mut r = wire::json_response(StatusCode::OK, &Value::Null);
            *r.body_mut() = SimBody::full(wire::cut_half(&s).to_owned());
            return r;
        }
        return wire::json_response(StatusCode::OK, &body);
    }

    let ev = |name: &str, data: Value| wire::sse_event(Some(name), &data.to_string());
    let mut events: Vec<Bytes> = vec![
        ev(
            "message_start",
            json!({"type": "message_start", "message": {
                "id": ctx.id,
                "type": "message",
                "role": "assistant",
                "model": p.model,
                "content": [],
                "stop_reason": null,
                "stop_sequence": null,
                "usage": usage(1)
            }}),
        ),
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0,
                   "content_block": {"type": "text", "text": ""}}),
        ),
        wire::sse_event(Some("ping"), r#"{"type": "ping"}"#),
    ];
    let pieces = g.pieces();
    let content = pieces.iter().map(|t| {
        ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0,
                   "delta": {"type": "text_delta", "text": t}}),
        )
    });
    let error = || {
        ev(
            "error",
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        )
    };
    if Mangle::apply(mangle, &mut events, content.collect(), error) {
        return wire::sse_response(events, ctx.chunk_delay);
    }
    events.push(ev(
        "content_block_stop",
        json!({"type": "content_block_stop", "index": 0}),
    ));
    let mut final_usage = usage(g.tokens);
    if let Some(u) = final_usage.as_object_mut() {
        u.remove("cache_creation");
        u.remove("service_tier");
    }
    events.push(ev(
        "message_delta",
        json!({"type": "message_delta",
               "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
               "usage": final_usage}),
    ));
    events.push(ev("message_stop", json!({"type": "message_stop"})));
    wire::sse_response(events, ctx.chunk_delay)
}
