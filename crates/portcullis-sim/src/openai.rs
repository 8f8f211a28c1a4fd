//! `POST /v1/chat/completions`: parsing and the answer, streamed or not.

use bytes::Bytes;
use http::{Response, StatusCode};
use portcullis_core::{ChatMessage, OpenAiTokenizer, Role, TokenEstimator};
use serde_json::{Value, json};

use crate::api::{Ctx, Mangle, Parsed, positive_int, text_of};
use crate::generate::{Ending, Generated};
use crate::scenario::Family;
use crate::wire::{self, SimBody, WireError};

fn missing(field: &'static str) -> WireError<'static> {
    WireError::new(400, format!("Missing required parameter: '{field}'."))
        .param(field)
        .code("missing_required_parameter")
}

fn invalid(field: &'static str, msg: &str) -> WireError<'static> {
    WireError::new(400, format!("Invalid '{field}': {msg}"))
        .param(field)
        .code("invalid_value")
}

/// Reads a Chat Completions request; prompt tokens are counted exactly as the client's
/// `OpenAiTokenizer::count_messages` counts them.
pub(crate) fn parse(v: &Value) -> Result<Parsed, WireError<'static>> {
    if !v.is_object() {
        return Err(WireError::new(
            400,
            "Invalid request body: expected a JSON object.",
        ));
    }
    let model = match v.get("model").and_then(Value::as_str) {
        Some(m) if !m.is_empty() => m.to_owned(),
        _ => return Err(WireError::new(400, "you must provide a model parameter")),
    };
    let messages = match v.get("messages") {
        None | Some(Value::Null) => return Err(missing("messages")),
        Some(Value::Array(a)) if a.is_empty() => {
            return Err(invalid(
                "messages",
                "empty array. Expected an array with minimum length 1, but got an empty array instead.",
            ));
        }
        Some(Value::Array(a)) => a,
        Some(_) => return Err(invalid("messages", "expected an array.")),
    };
    let tokenizer = OpenAiTokenizer::for_model(&model).exact();
    let mut known = Vec::new();
    let mut other_tokens = 0;
    for m in messages {
        let role = m.get("role").and_then(Value::as_str);
        let content = m.get("content").map_or(Some(String::new()), text_of);
        let (Some(role), Some(content)) = (role, content) else {
            return Err(invalid(
                "messages",
                "each message needs a string 'role' and a string or array 'content'.",
            ));
        };
        match role {
            "system" => known.push(ChatMessage::new(Role::System, content)),
            "user" => known.push(ChatMessage::new(Role::User, content)),
            "assistant" => known.push(ChatMessage::new(Role::Assistant, content)),
            // developer / tool: the same format overhead as the client's count.
            r => other_tokens += 3 + tokenizer.count_text(r) + tokenizer.count_text(&content),
        }
    }
    let input_tokens = tokenizer.count_messages(&known) + other_tokens;
    let max_tokens = match positive_int(v, "max_completion_tokens", Family::Openai)? {
        Some(n) => Some(n),
        None => positive_int(v, "max_tokens", Family::Openai)?,
    };
    let stops = match v.get("stop") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) if a.len() <= 4 && a.iter().all(Value::is_string) => a
            .iter()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect(),
        Some(_) => {
            return Err(invalid(
                "stop",
                "expected a string or an array of up to 4 strings.",
            ));
        }
    };
    let stream = match v.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("stream", "expected a boolean.")),
    };
    let include_usage = v
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok(Parsed {
        model,
        stream,
        include_usage,
        max_tokens,
        stops,
        input_tokens,
        content_key: Value::Array(messages.clone()).to_string(),
    })
}

fn finish_reason(g: &Generated) -> &'static str {
    match g.ending {
        Ending::Length => "length",
        _ => "stop",
    }
}

fn usage(p: &Parsed, g: &Generated) -> Value {
    json!({
        "prompt_tokens": p.input_tokens,
        "completion_tokens": g.tokens,
        "total_tokens": p.input_tokens + g.tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0
        }
    })
}

const FINGERPRINT: &str = "fp_5im0000000";

/// The answer, shaped as OpenAI's (see the recordings in the fixtures).
pub(crate) fn render(ctx: &Ctx, p: &Parsed, g: &Generated, mangle: Mangle) -> Response<SimBody> {
    if !p.stream {
        let body = json!({
            "id": ctx.id,
            "object": "chat.completion",
            "created": ctx.created,
            "model": p.model,
            "choices": [{
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": g.text,
                    "refusal": null,
                    "annotations": []
                },
                "logprobs": null,
                "finish_reason": finish_reason(g)
            }],
            "usage": usage(p, g),
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT
        });
        if mangle == Mangle::MalformedJson {
            let s = body.to_string();
            let mut r = wire::json_response(StatusCode::OK, &Value::Null);
            *r.body_mut() = SimBody::full(wire::cut_half(&s).to_owned());
            return r;
        }
        return wire::json_response(StatusCode::OK, &body);
    }

    let chunk = |delta: Value, finish: Option<&str>| {
        let mut c = json!({
            "id": ctx.id,
            "object": "chat.completion.chunk",
            "created": ctx.created,
            "model": p.model,
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}]
        });
        if p.include_usage {
            c["usage"] = Value::Null;
        }
        wire::sse_event(None, &c.to_string())
    };
    let error = || {
        let e = json!({"error": {
            "message": wire::status_message(Family::Openai, 500),
            "type": "server_error",
            "param": null,
            "code": null
        }});
        wire::sse_event(None, &e.to_string())
    };

    let pieces = g.pieces();
    let mut events: Vec<Bytes> = vec![chunk(
        json!({"role": "assistant", "content": "", "refusal": null}),
        None,
    )];
    let content = pieces.iter().map(|t| chunk(json!({ "content": t }), None));
    if Mangle::apply(mangle, &mut events, content.collect(), error) {
        return wire::sse_response(events, ctx.chunk_delay);
    }
    events.push(chunk(json!({}), Some(finish_reason(g))));
    if p.include_usage {
        let u = json!({
            "id": ctx.id,
            "object": "chat.completion.chunk",
            "created": ctx.created,
            "model": p.model,
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
            "choices": [],
            "usage": usage(p, g)
        });
        events.push(wire::sse_event(None, &u.to_string()));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    wire::sse_response(events, ctx.chunk_delay)
}
