//! Anthropic's simulated API, `POST /v1/messages` and `/v1/messages/count_tokens`: parsing,
//! the answer (streamed or not), errors, ids and headers.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Response};
use portcullis_core::{AnthropicEstimator, Encoding, OpenAiTokenizer, TokenEstimator};
use rand::rngs::SmallRng;
use serde_json::{Value, json};

use crate::api::{self, BadInt, Ctx, Endpoint, Op, Parsed, SimApi, text_of};
use crate::generate::{Ending, Generated};
use crate::limits::{LimitView, Refusal};
use crate::scenario::{Family, FaultKind, FaultRule, Limits};
use crate::wire::{self, BASE58, Mangle, SimBody, WireError, random_str, rfc3339};

/// Anthropic's Messages API.
#[derive(Debug)]
pub(crate) struct Anthropic;

const ENDPOINTS: &[Endpoint] = &[
    Endpoint {
        path: "/v1/messages",
        name: "messages",
        op: Op::Answer,
    },
    Endpoint {
        path: "/v1/messages/count_tokens",
        name: "count_tokens",
        op: Op::CountTokens(count_tokens),
    },
];

const MODELS: &[&str] = &["claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1"];

impl SimApi for Anthropic {
    fn family(&self) -> Family {
        Family::Anthropic
    }

    fn endpoints(&self) -> &'static [Endpoint] {
        ENDPOINTS
    }

    fn models(&self) -> Value {
        let data: Vec<Value> = MODELS
            .iter()
            .map(|m| {
                json!({"type": "model", "id": m, "display_name": m,
                       "created_at": "2025-09-29T00:00:00Z"})
            })
            .collect();
        json!({
            "first_id": data.first().map(|d| d["id"].clone()),
            "last_id": data.last().map(|d| d["id"].clone()),
            "has_more": false,
            "data": data,
        })
    }

    /// `req_011C` + 20 base58 characters.
    fn request_id(&self, rng: &mut SmallRng) -> String {
        format!("req_011C{}", random_str(rng, BASE58, 20))
    }

    /// `msg_01` + 22 base58 characters.
    fn answer_id(&self, rng: &mut SmallRng) -> String {
        format!("msg_01{}", random_str(rng, BASE58, 22))
    }

    /// `x-api-key`, or else `Authorization: Bearer`.
    fn api_key<'h>(&self, h: &'h HeaderMap) -> Option<&'h str> {
        wire::header(h, "x-api-key")
            .filter(|k| !k.is_empty())
            .or(wire::bearer(h))
    }

    /// `count_tokens` takes no `max_tokens`.
    fn parse(&self, v: &Value, op: Op) -> Result<Parsed, WireError<'static>> {
        parse(v, matches!(op, Op::Answer))
    }

    fn encoding(&self, _: &str) -> Encoding {
        Encoding::O200k
    }

    /// A request, input tokens to input TPM, `max_tokens` to output TPM.
    fn costs(&self, p: &Parsed) -> Vec<u64> {
        vec![1, p.input_tokens, p.max_tokens.unwrap_or(0)]
    }

    fn capacities(&self, limits: &Limits) -> Vec<u64> {
        let l = &limits.anthropic;
        vec![l.rpm, l.input_tpm, l.output_tpm]
    }

    /// The unused part of `max_tokens`, to output TPM.
    fn refund(&self, p: &Parsed, g: &Generated) -> Option<(usize, u64)> {
        Some((2, p.max_tokens.unwrap_or(0).saturating_sub(g.tokens)))
    }

    fn render(&self, ctx: &Ctx, p: &Parsed, g: &Generated, mangle: Mangle) -> Response<SimBody> {
        render(ctx, p, g, mangle)
    }

    /// `{"type":"error","error":{"type","message"},"request_id"}`.
    fn error_body(&self, request_id: &str, err: &WireError<'_>) -> Value {
        json!({
            "type": "error",
            "error": {"type": error_type(err), "message": err.message},
            "request_id": request_id,
        })
    }

    fn missing_key(&self) -> WireError<'static> {
        WireError::new(401, "x-api-key header is required")
    }

    fn too_large(&self, _: usize) -> WireError<'static> {
        WireError::new(413, "Request exceeds the maximum allowed number of bytes.")
    }

    fn invalid_json(&self) -> WireError<'static> {
        bad(
            "There was an error parsing the body of your request. Please make sure it is valid JSON.",
        )
    }

    fn fault_error(&self, rule: &FaultRule) -> WireError<'static> {
        match rule.kind {
            FaultKind::RateLimit => WireError::new(
                429,
                "This request would exceed your organization's rate limit. Please try again \
                 later. (simulated)",
            ),
            FaultKind::InsufficientQuota | FaultKind::Billing => WireError::new(
                402,
                "Your credit balance is too low to access the Anthropic API. Please go to Plans \
                 & Billing to upgrade or purchase credits.",
            ),
            FaultKind::Overloaded => WireError::new(529, status_message(529)),
            _ => {
                let status = rule.status.unwrap_or(500);
                WireError::new(status, status_message(status))
            }
        }
    }

    fn rate_limited(&self, _: &str, refusal: Refusal, view: LimitView) -> WireError<'static> {
        let what = ["requests", "input tokens", "output tokens"][refusal.which.min(2)];
        WireError::new(
            429,
            format!(
                "This request would exceed the rate limit for your organization of {} {what} \
                 per minute. For details, refer to: https://docs.claude.com/en/api/rate-limits. \
                 You can see the response headers for current usage. Please reduce the prompt \
                 length or the maximum tokens requested, or try again later.",
                view.limit
            ),
        )
    }

    /// `request-id`.
    fn set_request_id(&self, h: &mut HeaderMap, id: &str) {
        wire::set(h, "request-id", id);
    }

    /// `retry-after` only.
    fn retry_after(&self, h: &mut HeaderMap, wait: Duration) {
        wire::retry_after(h, wait);
    }

    /// `anthropic-ratelimit-{requests,input-tokens,output-tokens,tokens}-{limit,remaining,reset}`,
    /// resets as RFC 3339 times; `tokens` combines input and output.
    fn limit_headers(&self, h: &mut HeaderMap, v: &[LimitView]) {
        let now = SystemTime::now();
        let combined = LimitView {
            limit: v[1].limit + v[2].limit,
            remaining: v[1].remaining + v[2].remaining,
            reset: v[1].reset.max(v[2].reset),
        };
        let limits = [
            ("requests", v[0]),
            ("input-tokens", v[1]),
            ("output-tokens", v[2]),
            ("tokens", combined),
        ];
        let name = |limit: &str, field: &str| format!("anthropic-ratelimit-{limit}-{field}");
        let at = |reset: Duration| rfc3339(now + reset + Duration::from_millis(999));
        wire::limit_headers(h, &limits, name, at);
    }

    /// None beyond the common ones.
    fn answer_headers(&self, _: &mut HeaderMap) {}
}

/// The body of a `count_tokens` answer, which agrees with `/v1/messages`.
fn count_tokens(p: &Parsed) -> Value {
    json!({ "input_tokens": p.input_tokens })
}

/// The error type its status implies, unless the error names one.
fn error_type<'a>(err: &WireError<'a>) -> &'a str {
    err.kind.unwrap_or(match err.status {
        401 => "authentication_error",
        402 => "billing_error",
        403 => "permission_error",
        404 => "not_found_error",
        413 => "request_too_large",
        429 => "rate_limit_error",
        504 => "timeout_error",
        529 => "overloaded_error",
        s if s >= 500 => "api_error",
        _ => "invalid_request_error",
    })
}

/// The canned message for an error status.
fn status_message(status: u16) -> &'static str {
    match status {
        529 => "Overloaded",
        s if s >= 500 => "Internal server error",
        _ => "Simulated error.",
    }
}

fn bad(msg: impl Into<String>) -> WireError<'static> {
    WireError::new(400, msg)
}

/// An optional positive integer field, refused in Anthropic's words.
fn positive_int(v: &Value, field: &str) -> Result<Option<u64>, WireError<'static>> {
    api::positive_int(v, field).map_err(|e| match e {
        BadInt::BelowOne(_) => bad(format!(
            "{field}: Input should be greater than or equal to 1"
        )),
        BadInt::NotInt => bad(format!("{field}: Input should be a valid integer")),
    })
}

/// Reads a Messages (or count_tokens, without `max_tokens`) request.
///
/// Input tokens are the "true" count: o200k text tokens plus
/// [`AnthropicEstimator::BASE_OVERHEAD`]. The client's estimator scales text up by 1.1, so its
/// estimate errs high, as against the real API.
fn parse(v: &Value, needs_max_tokens: bool) -> Result<Parsed, WireError<'static>> {
    if !v.is_object() {
        return Err(bad("Input should be a valid dictionary"));
    }
    let model = match v.get("model").and_then(Value::as_str) {
        Some(m) if !m.is_empty() => m.to_owned(),
        _ => return Err(bad("model: Field required")),
    };
    let max_tokens = positive_int(v, "max_tokens")?;
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
fn render(ctx: &Ctx, p: &Parsed, g: &Generated, mangle: Mangle) -> Response<SimBody> {
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
        return mangle.json_ok(&body);
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
