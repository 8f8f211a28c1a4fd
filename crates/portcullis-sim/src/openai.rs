//! OpenAI's simulated API, `POST /v1/chat/completions`: parsing, the answer (streamed or not),
//! errors, ids and headers.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Response};
use portcullis_core::{ChatMessage, Encoding, OpenAiTokenizer, Role, TokenEstimator};
use rand::rngs::SmallRng;
use serde_json::{Value, json};

use crate::api::{self, BadInt, Ctx, Endpoint, Op, Parsed, SimApi, text_of};
use crate::cache::{CachePoint, Prefix};
use crate::generate::{Ending, Format, Generated, Plan, fragments};
use crate::limits::{LimitView, Refusal};
use crate::media::{self, IMAGE_TOKENS};
use crate::scenario::{Family, FaultKind, FaultRule, Limits};
use crate::tools::{self, Choice, ToolPlan, ToolSpec};
use crate::wire::{self, ALNUM, Mangle, SimBody, WireError, go_duration, random_str};

/// OpenAI's Chat Completions API.
#[derive(Debug)]
pub(crate) struct OpenAi;

const ENDPOINTS: &[Endpoint] = &[Endpoint {
    path: "/v1/chat/completions",
    name: "chat_completions",
    op: Op::Answer,
}];

const MODELS: &[&str] = &[
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1-mini",
    "gpt-5-nano",
    "o4-mini",
];

/// Whether a model reasons (o-series, gpt-5): it spends hidden reasoning tokens and takes
/// `reasoning_effort`.
fn reasoning_model(model: &str) -> bool {
    let m = model.strip_prefix("openai/").unwrap_or(model);
    ["o1", "o3", "o4", "gpt-5"].iter().any(|p| m.starts_with(p)) && !m.contains("chat")
}

/// The reasoning tokens an effort spends (`medium` is the default).
fn reasoning_tokens(effort: &str) -> Option<u64> {
    Some(match effort {
        "minimal" => 16,
        "low" => 64,
        "medium" => 192,
        "high" => 448,
        _ => return None,
    })
}

/// OpenAI caches prompts of at least this many tokens ...
const CACHE_MIN_TOKENS: u64 = 1024;
/// ... in steps of this many ...
const CACHE_STEP_TOKENS: u64 = 128;
/// ... for this long after their last use.
const CACHE_TTL: Duration = Duration::from_secs(300);

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

    /// `call_` + 24 alphanumerics.
    fn tool_call_id(&self, rng: &mut SmallRng) -> String {
        format!("call_{}", random_str(rng, ALNUM, 24))
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

    fn capacities(&self, limits: &Limits, model: &str) -> Vec<u64> {
        let l = limits.models.get(model).unwrap_or(&limits.openai);
        vec![l.rpm, l.tpm]
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

fn missing(field: impl Into<String> + Clone + std::fmt::Display) -> WireError<'static> {
    WireError::new(400, format!("Missing required parameter: '{field}'."))
        .param(field)
        .code("missing_required_parameter")
}

fn invalid(field: impl Into<String> + Clone + std::fmt::Display, msg: &str) -> WireError<'static> {
    WireError::new(400, format!("Invalid '{field}': {msg}"))
        .param(field)
        .code("invalid_value")
}

/// A boolean field, defaulting when absent.
fn boolean(v: &Value, field: &'static str, default: bool) -> Result<bool, WireError<'static>> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(WireError::new(
            400,
            format!("Invalid type for '{field}': expected a boolean."),
        )
        .param(field)
        .code("invalid_type")),
    }
}

/// `tools`: function tools with valid names and object parameter schemas.
fn parse_tools(v: &Value) -> Result<Vec<ToolSpec>, WireError<'static>> {
    let tools = match v.get("tools") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(invalid("tools", "expected an array.")),
    };
    let mut out = Vec::new();
    for (i, t) in tools.iter().enumerate() {
        let ty = t.get("type").and_then(Value::as_str).unwrap_or_default();
        if ty != "function" {
            return Err(WireError::new(
                400,
                format!("Invalid value: '{ty}'. Supported values are: 'function' and 'custom'."),
            )
            .param(format!("tools[{i}].type"))
            .code("invalid_value"));
        }
        let field = format!("tools[{i}].function.name");
        let name = match t.pointer("/function/name") {
            Some(Value::String(n)) => n.clone(),
            _ => return Err(missing(field)),
        };
        if name.len() > 64 {
            return Err(WireError::new(
                400,
                format!(
                    "Invalid '{field}': string too long. Expected a string with maximum length \
                     64, but got a string with length {} instead.",
                    name.len()
                ),
            )
            .param(field)
            .code("string_above_max_length"));
        }
        if !tools::valid_name(&name) {
            return Err(invalid(
                field,
                "string does not match pattern. Expected a string that matches the pattern \
                 '^[a-zA-Z0-9_-]+$'.",
            ));
        }
        let schema = match t.pointer("/function/parameters") {
            None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
            Some(p) => {
                if let Some(got) = not_object_schema(p) {
                    return Err(WireError::new(
                        400,
                        format!(
                            "Invalid schema for function '{name}': schema must be a JSON Schema \
                             of 'type: \"object\"', got 'type: \"{got}\"'."
                        ),
                    )
                    .param(format!("tools[{i}].function.parameters"))
                    .code("invalid_function_parameters"));
                }
                p.clone()
            }
        };
        out.push(ToolSpec { name, schema });
    }
    Ok(out)
}

/// The type a schema has when it is not an object schema (`None` when it is one).
fn not_object_schema(schema: &Value) -> Option<String> {
    match schema.get("type") {
        Some(Value::String(t)) if t == "object" => None,
        Some(Value::String(t)) => Some(t.clone()),
        Some(other) => Some(other.to_string()),
        None if schema.is_object() => Some("None".into()),
        None => Some(schema.to_string()),
    }
}

/// `tool_choice`: `none`, `auto`, `required` or a named function among `tools`.
fn parse_tool_choice(v: &Value, tools: &[ToolSpec]) -> Result<Choice, WireError<'static>> {
    let choice = match v.get("tool_choice") {
        None | Some(Value::Null) => return Ok(Choice::Auto),
        Some(c) => c,
    };
    if tools.is_empty() {
        return Err(WireError::new(
            400,
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' are \
             specified.",
        )
        .param("tool_choice"));
    }
    match choice {
        Value::String(s) => match s.as_str() {
            "auto" => Ok(Choice::Auto),
            "none" => Ok(Choice::None),
            "required" => Ok(Choice::Required),
            other => Err(WireError::new(
                400,
                format!(
                    "Invalid value: '{other}'. Supported values are: 'none', 'auto', and \
                     'required'."
                ),
            )
            .param("tool_choice")
            .code("invalid_value")),
        },
        _ => match choice.pointer("/function/name").and_then(Value::as_str) {
            Some(n) if tools.iter().any(|t| t.name == n) => Ok(Choice::Named(n.to_owned())),
            Some(n) => Err(WireError::new(
                400,
                format!("Invalid value for 'tool_choice': function '{n}' not found in 'tools'."),
            )
            .param("tool_choice")
            .code("invalid_value")),
            None => Err(missing("tool_choice.function.name")),
        },
    }
}

/// `response_format`: `text`, `json_object`, or `json_schema` with a name and an object schema.
fn parse_response_format(v: &Value) -> Result<Format, WireError<'static>> {
    let rf = match v.get("response_format") {
        None | Some(Value::Null) => return Ok(Format::Text),
        Some(rf) => rf,
    };
    match rf.get("type").and_then(Value::as_str) {
        Some("text") => Ok(Format::Text),
        Some("json_object") => Ok(Format::JsonObject),
        Some("json_schema") => {
            let Some(js) = rf.get("json_schema").filter(|j| j.is_object()) else {
                return Err(missing("response_format.json_schema"));
            };
            let name = match js.get("name") {
                Some(Value::String(n)) => n.clone(),
                _ => return Err(missing("response_format.json_schema.name")),
            };
            if !tools::valid_name(&name) {
                return Err(invalid(
                    "response_format.json_schema.name",
                    "string does not match pattern. Expected a string that matches the \
                     pattern '^[a-zA-Z0-9_-]+$'.",
                ));
            }
            let schema = js.get("schema").cloned().unwrap_or(json!({}));
            if let Some(got) = not_object_schema(&schema) {
                return Err(WireError::new(
                    400,
                    format!(
                        "Invalid schema for response_format '{name}': schema must be a JSON \
                         Schema of 'type: \"object\"', got 'type: \"{got}\"'."
                    ),
                )
                .param("response_format")
                .code("invalid_json_schema"));
            }
            Ok(Format::JsonSchema(schema))
        }
        other => Err(WireError::new(
            400,
            format!(
                "Invalid value: '{}'. Supported values are: 'text', 'json_object', and \
                 'json_schema'.",
                other.unwrap_or_default()
            ),
        )
        .param("response_format.type")
        .code("invalid_value")),
    }
}

/// Checks the parts of a content array; returns the prompt tokens its images cost.
fn check_parts(i: usize, content: &Value) -> Result<u64, WireError<'static>> {
    let Value::Array(parts) = content else {
        return Ok(0);
    };
    let mut tokens = 0;
    for (j, part) in parts.iter().enumerate() {
        if part.get("type").and_then(Value::as_str) != Some("image_url") {
            continue;
        }
        let field = format!("messages[{i}].content[{j}].image_url.url");
        let url = match part.pointer("/image_url/url") {
            Some(Value::String(u)) => u,
            _ => return Err(missing(field)),
        };
        tokens += IMAGE_TOKENS;
        let Some(data) = url.strip_prefix("data:") else {
            continue;
        };
        let expected = "Expected a base64-encoded data URL with an image MIME type (e.g. \
                        'data:image/png;base64,aW1nIGJ5dGVzIGhlcmU='), but got";
        let Some((mime, b64)) = data.split_once(";base64,") else {
            return Err(invalid(
                field,
                &format!("{expected} a value without ';base64,'."),
            ));
        };
        if !media::IMAGE_TYPES.contains(&mime) {
            return Err(invalid(
                field,
                &format!("{expected} unsupported MIME type '{mime}'."),
            ));
        }
        let Some(bytes) = media::b64_decode(b64) else {
            return Err(invalid(
                field,
                &format!("{expected} an invalid base64 value."),
            ));
        };
        if media::sniff(&bytes).is_none_or(|t| !t.starts_with("image/")) {
            return Err(WireError::new(
                400,
                "You uploaded an unsupported image. Please make sure your image has of one the \
                 following formats: ['png', 'jpeg', 'gif', 'webp'].",
            )
            .code("invalid_image_format"));
        }
    }
    Ok(tokens)
}

/// An assistant message's `tool_calls`: their ids, and the tokens of their names and arguments.
fn assistant_calls(
    i: usize,
    m: &Value,
    tokenizer: &OpenAiTokenizer,
) -> Result<(Vec<String>, u64), WireError<'static>> {
    let calls = match m.get("tool_calls") {
        None | Some(Value::Null) => return Ok((Vec::new(), 0)),
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(invalid(
                format!("messages[{i}].tool_calls"),
                "expected an array.",
            ));
        }
    };
    let (mut ids, mut tokens) = (Vec::new(), 0);
    for (j, c) in calls.iter().enumerate() {
        let Some(id) = c.get("id").and_then(Value::as_str) else {
            return Err(missing(format!("messages[{i}].tool_calls[{j}].id")));
        };
        let Some(name) = c.pointer("/function/name").and_then(Value::as_str) else {
            return Err(missing(format!(
                "messages[{i}].tool_calls[{j}].function.name"
            )));
        };
        let args = c
            .pointer("/function/arguments")
            .and_then(Value::as_str)
            .unwrap_or_default();
        tokens += tokenizer.count_text(name) + tokenizer.count_text(args);
        ids.push(id.to_owned());
    }
    Ok((ids, tokens))
}

/// The 400 of tool calls left unanswered before message `i`.
fn unanswered(i: usize, ids: &[String]) -> WireError<'static> {
    WireError::new(
        400,
        format!(
            "An assistant message with 'tool_calls' must be followed by tool messages responding \
             to each 'tool_call_id'. The following tool_call_ids did not have response messages: \
             {}",
            ids.join(", ")
        ),
    )
    .param(format!("messages.[{i}].role"))
}

/// Reads a Chat Completions request and checks it by the real API's rules; prompt tokens are
/// counted exactly as the client's `OpenAiTokenizer::count_messages` counts them (plus tool
/// definitions, tool calls and images).
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
    let tools = parse_tools(v)?;
    let choice = parse_tool_choice(v, &tools)?;
    let parallel = boolean(v, "parallel_tool_calls", true)?;
    let format = parse_response_format(v)?;
    let reasoning = match v.get("reasoning_effort") {
        None | Some(Value::Null) if reasoning_model(&model) => reasoning_tokens("medium"),
        None | Some(Value::Null) => None,
        Some(_) if !reasoning_model(&model) => {
            return Err(WireError::new(
                400,
                "Unsupported parameter: 'reasoning_effort' is not supported with this model.",
            )
            .param("reasoning_effort")
            .code("unsupported_parameter"));
        }
        Some(e) => match e.as_str().and_then(reasoning_tokens) {
            Some(n) => Some(n),
            None => {
                return Err(WireError::new(
                    400,
                    format!(
                        "Invalid value: {e}. Supported values are: 'minimal', 'low', 'medium', \
                         and 'high'."
                    ),
                )
                .param("reasoning_effort")
                .code("invalid_value"));
            }
        },
    };

    let mut known = Vec::new();
    let mut other_tokens = 0;
    // The ids of the last assistant message's tool calls, and those not answered yet.
    let mut pending: Option<(Vec<String>, Vec<String>)> = None;
    let mut last_user = String::new();
    let mut tool_results = Vec::new();
    let mut mentions_json = false;
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str);
        let content = m.get("content").map_or(Some(String::new()), text_of);
        let (Some(role), Some(content)) = (role, content) else {
            return Err(invalid(
                "messages",
                "each message needs a string 'role' and a string or array 'content'.",
            ));
        };
        mentions_json |= content.to_lowercase().contains("json");
        if role != "tool" {
            if let Some((_, open)) = pending.take().filter(|(_, open)| !open.is_empty()) {
                return Err(unanswered(i, &open));
            }
            tool_results.clear();
        }
        other_tokens += m.get("content").map_or(Ok(0), |c| check_parts(i, c))?;
        match role {
            "system" => known.push(ChatMessage::new(Role::System, content)),
            "user" => {
                last_user.clone_from(&content);
                known.push(ChatMessage::new(Role::User, content));
            }
            "assistant" => {
                let (ids, tokens) = assistant_calls(i, m, &tokenizer)?;
                other_tokens += tokens;
                if !ids.is_empty() {
                    pending = Some((ids.clone(), ids));
                }
                known.push(ChatMessage::new(Role::Assistant, content));
            }
            "tool" => {
                let Some((all, open)) = pending.as_mut() else {
                    return Err(WireError::new(
                        400,
                        "Invalid parameter: messages with role 'tool' must be a response to a \
                         preceeding message with 'tool_calls'.",
                    )
                    .param(format!("messages.[{i}].role")));
                };
                let Some(id) = m.get("tool_call_id").and_then(Value::as_str) else {
                    return Err(missing(format!("messages[{i}].tool_call_id")));
                };
                if !all.iter().any(|a| a == id) {
                    return Err(WireError::new(
                        400,
                        format!(
                            "Invalid parameter: 'tool_call_id' of '{id}' not found in \
                             'tool_calls' of previous message."
                        ),
                    )
                    .param(format!("messages.[{i}].tool_call_id")));
                }
                open.retain(|o| o != id);
                tool_results.push(content.clone());
                other_tokens += 3 + tokenizer.count_text(role) + tokenizer.count_text(&content);
            }
            // developer and others: the same format overhead as the client's count.
            r => other_tokens += 3 + tokenizer.count_text(r) + tokenizer.count_text(&content),
        }
    }
    if format == Format::JsonObject && !mentions_json {
        return Err(WireError::new(
            400,
            "'messages' must contain the word 'json' in some form, to use 'response_format' of \
             type 'json_object'.",
        )
        .param("messages"));
    }
    let tools_json = if tools.is_empty() {
        String::new()
    } else {
        v.get("tools").map(Value::to_string).unwrap_or_default()
    };
    let input_tokens =
        tokenizer.count_messages(&known) + other_tokens + tokenizer.count_text(&tools_json);
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
    let stream = boolean(v, "stream", false)?;
    let include_usage = v
        .pointer("/stream_options/include_usage")
        .and_then(Value::as_bool)
        .unwrap_or(false);

    let after_tool_result = !tool_results.is_empty();
    let calls = ToolPlan {
        tools,
        choice,
        parallel,
    }
    .decide(&last_user, after_tool_result);
    let plan = Plan {
        calls,
        format,
        thinking: false,
        reasoning_tokens: reasoning.unwrap_or(0),
        tool_result: after_tool_result.then(|| tool_results.join(" ")),
    };
    let cache_points = cache_points(&model, &tools_json, messages, input_tokens);
    Ok(Parsed {
        model,
        stream,
        include_usage,
        max_tokens,
        stops,
        input_tokens,
        content_key: Value::Array(messages.clone()).to_string(),
        plan,
        cache_points,
    })
}

/// OpenAI's automatic caching: a prompt of at least 1024 tokens is cached in prefixes of 1024
/// tokens and every 128 more (of the tools, then the messages, as sent), up to its prompt
/// tokens.
fn cache_points(model: &str, tools: &str, messages: &[Value], prompt: u64) -> Vec<CachePoint> {
    if prompt < CACHE_MIN_TOKENS {
        return Vec::new();
    }
    let mut text = tools.to_owned();
    for m in messages {
        text.push_str(&m.to_string());
    }
    let ids = Encoding::for_model(model).encode(&text);
    let mut prefix = Prefix::new();
    let mut points = Vec::new();
    for id in ids
        .iter()
        .take(usize::try_from(prompt).unwrap_or(usize::MAX))
    {
        prefix.push(&id.to_le_bytes(), 1);
        if prefix.tokens >= CACHE_MIN_TOKENS && prefix.tokens % CACHE_STEP_TOKENS == 0 {
            points.push(prefix.point(CACHE_TTL));
        }
    }
    points
}

fn finish_reason(g: &Generated) -> &'static str {
    match g.ending {
        Ending::Length => "length",
        Ending::ToolUse => "tool_calls",
        _ => "stop",
    }
}

fn usage(p: &Parsed, g: &Generated) -> Value {
    json!({
        "prompt_tokens": p.input_tokens,
        "completion_tokens": g.tokens,
        "total_tokens": p.input_tokens + g.tokens,
        "prompt_tokens_details": {"cached_tokens": g.cache.read, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": g.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0
        }
    })
}

const FINGERPRINT: &str = "fp_5im0000000";

/// The answer, shaped as OpenAI's (see the recordings in the fixtures).
fn render(ctx: &Ctx, p: &Parsed, g: &Generated, mangle: Mangle) -> Response<SimBody> {
    let tool_calls: Vec<Value> = g
        .calls
        .iter()
        .map(|c| {
            json!({"id": c.id, "type": "function",
                   "function": {"name": c.name, "arguments": c.arguments}})
        })
        .collect();
    if !p.stream {
        let mut message = json!({
            "role": "assistant",
            "content": g.text,
            "refusal": null,
            "annotations": []
        });
        if !tool_calls.is_empty() {
            message["content"] = Value::Null;
            message["tool_calls"] = Value::Array(tool_calls);
        }
        let body = json!({
            "id": ctx.id,
            "object": "chat.completion",
            "created": ctx.created,
            "model": p.model,
            "choices": [{
                "index": 0,
                "message": message,
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

    let (first, content): (Value, Vec<Bytes>) = if g.calls.is_empty() {
        let first = json!({"role": "assistant", "content": "", "refusal": null});
        let pieces = g.pieces();
        (
            first,
            pieces
                .iter()
                .map(|t| chunk(json!({ "content": t }), None))
                .collect(),
        )
    } else {
        // As recorded: the first delta of each call carries its index, id, type, name and
        // empty arguments; the arguments follow in fragments, by index.
        let first = json!({"role": "assistant", "content": null, "refusal": null});
        let mut content = Vec::new();
        for (index, c) in g.calls.iter().enumerate() {
            content.push(chunk(
                json!({"tool_calls": [{"index": index, "id": c.id, "type": "function",
                                       "function": {"name": c.name, "arguments": ""}}]}),
                None,
            ));
            for f in fragments(&c.arguments) {
                content.push(chunk(
                    json!({"tool_calls": [{"index": index, "function": {"arguments": f}}]}),
                    None,
                ));
            }
        }
        (first, content)
    };
    let mut events: Vec<Bytes> = vec![chunk(first, None)];
    if Mangle::apply(mangle, &mut events, content, error) {
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
