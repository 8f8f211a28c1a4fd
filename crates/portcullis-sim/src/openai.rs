//! OpenAI's simulated API, `POST /v1/chat/completions`: parsing, the answer (streamed or not),
//! errors, ids and headers.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Response};
use portcullis_core::{ChatMessage, Encoding, OpenAiTokenizer, Role, TokenEstimator};
use rand::rngs::SmallRng;
use serde_json::{Value, json};

use crate::api::{self, BadInt, Ctx, Endpoint, Op, Parsed, SimApi, text_of};
use crate::generate::{Ending, Generated};
use crate::limits::{LimitView, Refusal};
use crate::scenario::{Family, FaultKind, FaultRule, Limits};
use crate::wire::{self, ALNUM, Mangle, SimBody, WireError, go_duration, random_str};

/// OpenAI's Chat Completions API.
#[derive(Debug)]
pub(crate) struct OpenAi;

const ENDPOINTS: &[Endpoint] = &[Endpoint {
    path: "/v1/chat/completions",
    name: "chat_completions",
    op: Op::Answer,
}];

const MODELS: &[&str] = &["gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "gpt-5-nano"];

impl SimApi for OpenAi {
    fn family(&self) -> Family {
        Family::Openai
    }

    fn endpoints(&self) -> &'static [Endpoint] {
        ENDPOINTS
    }

    fn models(&self) -> Value {
        let data: Vec<Value> = MODELS
            .iter()
            .map(|m| json!({"id": m, "object": "model", "created": 1_715_367_049, "owned_by": "system"}))
            .collect();
        json!({"object": "list", "data": data})
    }

    /// `req_` + 32 hex digits.
    fn request_id(&self, rng: &mut SmallRng) -> String {
        format!("req_{}", random_str(rng, b"0123456789abcdef", 32))
    }

    /// `chatcmpl-` + 29 alphanumerics.
    fn answer_id(&self, rng: &mut SmallRng) -> String {
        format!("chatcmpl-{}", random_str(rng, ALNUM, 29))
    }

    /// `Authorization: Bearer` only.
    fn api_key<'h>(&self, h: &'h HeaderMap) -> Option<&'h str> {
        wire::bearer(h)
    }

    fn parse(&self, v: &Value, _: Op) -> Result<Parsed, WireError<'static>> {
        parse(v)
    }

    fn encoding(&self, model: &str) -> Encoding {
        Encoding::for_model(model)
    }

    /// A request, and prompt + `max_tokens` to TPM.
    fn costs(&self, p: &Parsed) -> Vec<u64> {
        vec![1, p.input_tokens + p.max_tokens.unwrap_or(0)]
    }

    fn capacities(&self, limits: &Limits) -> Vec<u64> {
        vec![limits.openai.rpm, limits.openai.tpm]
    }

    /// None: OpenAI keeps what it charged.
    fn refund(&self, _: &Parsed, _: &Generated) -> Option<(usize, u64)> {
        None
    }

    fn render(&self, ctx: &Ctx, p: &Parsed, g: &Generated, mangle: Mangle) -> Response<SimBody> {
        render(ctx, p, g, mangle)
    }

    /// `{"error":{"message","type","param","code"}}`.
    fn error_body(&self, _: &str, err: &WireError<'_>) -> Value {
        json!({"error": {
            "message": err.message,
            "type": err.kind.unwrap_or(if err.status >= 500 {
                "server_error"
            } else {
                "invalid_request_error"
            }),
            "param": err.param,
            "code": err.code,
        }})
    }

    fn missing_key(&self) -> WireError<'static> {
        WireError::new(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization \
             header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password \
             field (with blank username) if you're accessing the API from your browser and are \
             prompted for a username. You can obtain an API key from \
             https://platform.openai.com/account/api-keys.",
        )
    }

    fn too_large(&self, max: usize) -> WireError<'static> {
        WireError::new(
            413,
            format!("Request too large: the body exceeds the maximum of {max} bytes."),
        )
    }

    fn invalid_json(&self) -> WireError<'static> {
        WireError::new(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you \
             aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, \
             but what was sent was not valid JSON. If you have trouble figuring out how to fix \
             this, please contact us through our help center at help.openai.com.)",
        )
    }

    fn fault_error(&self, rule: &FaultRule) -> WireError<'static> {
        match rule.kind {
            FaultKind::RateLimit => WireError::new(
                429,
                format!(
                    "Rate limit reached in organization org-sim on requests per min (RPM). \
                     Please try again in {}s. (simulated)",
                    rule.retry_after()
                ),
            )
            .kind("requests")
            .code("rate_limit_exceeded"),
            FaultKind::InsufficientQuota => WireError::new(
                429,
                "You exceeded your current quota, please check your plan and billing details. \
                 For more information on this error, read the docs: \
                 https://platform.openai.com/docs/guides/error-codes/api-errors.",
            )
            .kind("insufficient_quota")
            .code("insufficient_quota"),
            FaultKind::Billing => WireError::new(
                402,
                "Your account is not active, please check your billing details on our website.",
            )
            .code("billing_not_active"),
            FaultKind::Overloaded => WireError::new(
                503,
                "The engine is currently overloaded, please try again later.",
            ),
            _ => {
                let status = rule.status.unwrap_or(500);
                WireError::new(status, status_message(status))
            }
        }
    }

    fn rate_limited(&self, model: &str, refusal: Refusal, view: LimitView) -> WireError<'static> {
        let (kind, what) = if refusal.which == 0 {
            ("requests", "requests per min (RPM)")
        } else {
            ("tokens", "tokens per min (TPM)")
        };
        WireError::new(
            429,
            format!(
                "Rate limit reached for {model} in organization org-sim on {what}: Limit {}, \
                 Used {}, Requested {}. Please try again in {}. Visit \
                 https://platform.openai.com/account/rate-limits to learn more.",
                view.limit,
                view.limit - view.remaining,
                refusal.requested,
                go_duration(view.reset.min(Duration::from_secs(3600)))
            ),
        )
        .kind(kind)
        .code("rate_limit_exceeded")
    }

    /// `x-request-id`.
    fn set_request_id(&self, h: &mut HeaderMap, id: &str) {
        wire::set(h, "x-request-id", id);
    }

    /// `retry-after` and `retry-after-ms`.
    fn retry_after(&self, h: &mut HeaderMap, wait: Duration) {
        let ms = wire::retry_after(h, wait);
        wire::set(h, "retry-after-ms", ms.to_string());
    }

    /// `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, resets as Go durations.
    fn limit_headers(&self, h: &mut HeaderMap, v: &[LimitView]) {
        let limits = [("requests", v[0]), ("tokens", v[1])];
        let name = |limit: &str, field: &str| format!("x-ratelimit-{field}-{limit}");
        wire::limit_headers(h, &limits, name, go_duration);
    }

    fn answer_headers(&self, h: &mut HeaderMap) {
        wire::set(h, "openai-version", "2020-10-01");
        wire::set(h, "openai-processing-ms", "1");
    }
}

/// The canned message for an error status.
fn status_message(status: u16) -> &'static str {
    match status {
        500 => "The server had an error while processing your request. Sorry about that!",
        502 => "Bad gateway.",
        503 => "The server is overloaded or not ready yet.",
        504 => "Gateway timeout.",
        s if s >= 500 => "The server had an error while processing your request.",
        _ => "Simulated error.",
    }
}

/// An optional positive integer field, refused in OpenAI's words.
fn positive_int(v: &Value, field: &'static str) -> Result<Option<u64>, WireError<'static>> {
    api::positive_int(v, field).map_err(|bad| match bad {
        BadInt::BelowOne(n) => WireError::new(
            400,
            format!(
                "Invalid '{field}': integer below minimum value. Expected a value >= 1, but got \
                 {n} instead."
            ),
        )
        .param(field)
        .code("integer_below_min_value"),
        BadInt::NotInt => WireError::new(
            400,
            format!("Invalid type for '{field}': expected an integer."),
        )
        .param(field)
        .code("invalid_type"),
    })
}

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
fn parse(v: &Value) -> Result<Parsed, WireError<'static>> {
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
    let max_tokens = match positive_int(v, "max_completion_tokens")? {
        Some(n) => Some(n),
        None => positive_int(v, "max_tokens")?,
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
fn render(ctx: &Ctx, p: &Parsed, g: &Generated, mangle: Mangle) -> Response<SimBody> {
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
        return mangle.json_ok(&body);
    }

    let frame = |choices: Value| {
        json!({
            "id": ctx.id,
            "object": "chat.completion.chunk",
            "created": ctx.created,
            "model": p.model,
            "service_tier": "default",
            "system_fingerprint": FINGERPRINT,
            "choices": choices
        })
    };
    let chunk = |delta: Value, finish: Option<&str>| {
        let choice = json!({"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish});
        let mut c = frame(json!([choice]));
        if p.include_usage {
            c["usage"] = Value::Null;
        }
        wire::sse_event(None, &c.to_string())
    };
    let error = || {
        let e = json!({"error": {
            "message": status_message(500),
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
        let mut u = frame(json!([]));
        u["usage"] = usage(p, g);
        events.push(wire::sse_event(None, &u.to_string()));
    }
    events.push(Bytes::from_static(b"data: [DONE]\n\n"));
    wire::sse_response(events, ctx.chunk_delay)
}
