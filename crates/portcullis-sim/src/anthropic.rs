//! Anthropic's simulated API, `POST /v1/messages` and `/v1/messages/count_tokens`: parsing,
//! the answer (streamed or not), errors, ids and headers.

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, Response};
use portcullis_core::{AnthropicEstimator, Encoding, OpenAiTokenizer, TokenEstimator};
use rand::rngs::SmallRng;
use serde_json::{Value, json};

use crate::api::{self, BadInt, Ctx, Endpoint, Op, Parsed, SimApi, text_of};
use crate::cache::{CachePoint, Prefix};
use crate::generate::{Ending, Format, Generated, Plan, fragments, pieces};
use crate::limits::{LimitView, Refusal};
use crate::media::{self, IMAGE_TOKENS};
use crate::scenario::{Family, FaultKind, FaultRule, Limits};
use crate::tools::{self, Choice, ToolPlan, ToolSpec};
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

    /// `toolu_01` + 22 base58 characters.
    fn tool_call_id(&self, rng: &mut SmallRng) -> String {
        format!("toolu_01{}", random_str(rng, BASE58, 22))
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

    fn capacities(&self, limits: &Limits, _: &str) -> Vec<u64> {
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

/// The shortest prefix a model caches, in tokens (Anthropic's "minimum cacheable prompt
/// length"; shorter breakpoints are silently not cached).
fn min_cacheable(model: &str) -> u64 {
    if model.contains("haiku-4-5") || model.contains("opus-4-5") {
        4096
    } else if model.contains("haiku") {
        2048
    } else {
        1024
    }
}

/// At most this many `cache_control` breakpoints per request.
const MAX_BREAKPOINTS: usize = 4;

/// The `cache_control` breakpoints met so far.
#[derive(Debug, Default)]
struct Breakpoints {
    points: Vec<CachePoint>,
    count: usize,
}

impl Breakpoints {
    /// Marks a point after `block` if it carries `cache_control` (`path` names the block).
    fn mark(
        &mut self,
        path: &str,
        block: &Value,
        prefix: &Prefix,
    ) -> Result<(), WireError<'static>> {
        let Some(cc) = block.get("cache_control").filter(|c| !c.is_null()) else {
            return Ok(());
        };
        if cc.get("type").and_then(Value::as_str) != Some("ephemeral") {
            return Err(bad(format!(
                "{path}.cache_control.type: Input should be 'ephemeral'"
            )));
        }
        let ttl = match cc.get("ttl").and_then(Value::as_str) {
            None | Some("5m") => Duration::from_secs(300),
            Some("1h") => Duration::from_secs(3600),
            Some(_) => {
                return Err(bad(format!(
                    "{path}.cache_control.ephemeral.ttl: Input should be '5m' or '1h'"
                )));
            }
        };
        self.count += 1;
        self.points.push(prefix.point(ttl));
        Ok(())
    }
}

/// `tools`: custom tools with valid, unique names and object input schemas. Server tools (a
/// `type` other than `custom`) are accepted and never called.
fn parse_tools(v: &Value) -> Result<Vec<ToolSpec>, WireError<'static>> {
    let tools = match v.get("tools") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad("tools: Input should be a valid list")),
    };
    let mut out: Vec<ToolSpec> = Vec::new();
    for (i, t) in tools.iter().enumerate() {
        match t.get("type").and_then(Value::as_str) {
            None | Some("custom") => {}
            Some(_) => continue,
        }
        let name = match t.get("name") {
            Some(Value::String(n)) => n.clone(),
            _ => return Err(bad(format!("tools.{i}.custom.name: Field required"))),
        };
        if !tools::valid_name(&name) {
            return Err(bad(format!(
                "tools.{i}.custom.name: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
            )));
        }
        let schema = match t.get("input_schema") {
            Some(s) if s.is_object() => s.clone(),
            Some(_) => {
                return Err(bad(format!(
                    "tools.{i}.custom.input_schema: Input should be a valid dictionary"
                )));
            }
            None => {
                return Err(bad(format!(
                    "tools.{i}.custom.input_schema: Field required"
                )));
            }
        };
        if schema.get("type").and_then(Value::as_str) != Some("object") {
            return Err(bad(format!(
                "tools.{i}.custom.input_schema.type: Input should be 'object'"
            )));
        }
        if out.iter().any(|o| o.name == name) {
            return Err(bad("tools: Tool names must be unique."));
        }
        out.push(ToolSpec { name, schema });
    }
    Ok(out)
}

/// `tool_choice`: `auto`, `any`, `tool` (named) or `none`, and whether parallel calls are on.
fn parse_tool_choice(v: &Value, tools: &[ToolSpec]) -> Result<(Choice, bool), WireError<'static>> {
    let tc = match v.get("tool_choice") {
        None | Some(Value::Null) => return Ok((Choice::Auto, true)),
        Some(tc) => tc,
    };
    if v.get("tools").is_none_or(Value::is_null) {
        return Err(bad(
            "tool_choice may only be specified while providing tools.",
        ));
    }
    let parallel = match tc.get("disable_parallel_tool_use") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => !b,
        Some(_) => {
            return Err(bad(
                "tool_choice.disable_parallel_tool_use: Input should be a valid boolean",
            ));
        }
    };
    let choice = match tc.get("type").and_then(Value::as_str) {
        Some("auto") => Choice::Auto,
        Some("any") => Choice::Required,
        Some("none") => Choice::None,
        Some("tool") => match tc.get("name").and_then(Value::as_str) {
            Some(n) if tools.iter().any(|t| t.name == n) => Choice::Named(n.to_owned()),
            Some(n) => {
                return Err(bad(format!(
                    "tool_choice.tool.name: Tool '{n}' not found in provided tools"
                )));
            }
            None => return Err(bad("tool_choice.tool.name: Field required")),
        },
        other => {
            return Err(bad(format!(
                "tool_choice: Input tag '{}' found using 'type' does not match any of the \
                 expected tags: 'auto', 'any', 'tool', 'none'",
                other.unwrap_or_default()
            )));
        }
    };
    Ok((choice, parallel))
}

/// `output_config.format`: Anthropic's structured outputs, `{"type": "json_schema", "schema"}`
/// with an object schema; the answer is a text block that matches it.
fn parse_output_format(v: &Value) -> Result<Format, WireError<'static>> {
    let Some(format) = v.get("output_config").and_then(|c| c.get("format")) else {
        return Ok(Format::Text);
    };
    if format.get("type").and_then(Value::as_str) != Some("json_schema") {
        return Err(bad(
            "output_config.format.type: Input should be 'json_schema'",
        ));
    }
    match format.get("schema") {
        Some(schema) if schema.get("type").and_then(Value::as_str) == Some("object") => {
            Ok(Format::JsonSchema(schema.clone()))
        }
        Some(_) => Err(bad(
            "output_config.format.schema: the schema must be an object schema",
        )),
        None => Err(bad("output_config.format.schema: Field required")),
    }
}

/// `thinking`: whether it is on. `enabled` needs `budget_tokens` ≥ 1024 and below `max_tokens`.
fn parse_thinking(v: &Value, max_tokens: Option<u64>) -> Result<bool, WireError<'static>> {
    let t = match v.get("thinking") {
        None | Some(Value::Null) => return Ok(false),
        Some(t) => t,
    };
    match t.get("type").and_then(Value::as_str) {
        Some("disabled") => Ok(false),
        Some("adaptive") => Ok(true),
        Some("enabled") => {
            let budget = match t.get("budget_tokens") {
                None | Some(Value::Null) => {
                    return Err(bad("thinking.enabled.budget_tokens: Field required"));
                }
                Some(b) => b.as_u64().ok_or_else(|| {
                    bad("thinking.enabled.budget_tokens: Input should be a valid integer")
                })?,
            };
            if budget < 1024 {
                return Err(bad(
                    "thinking.enabled.budget_tokens: Input should be greater than or equal to 1024",
                ));
            }
            if max_tokens.is_some_and(|m| m <= budget) {
                return Err(bad(
                    "`max_tokens` must be greater than `thinking.budget_tokens`. Please consult \
                     our documentation at https://docs.claude.com/en/docs/build-with-claude/\
                     extended-thinking#max-tokens-and-context-window-size",
                ));
            }
            Ok(true)
        }
        other => Err(bad(format!(
            "thinking: Input tag '{}' found using 'type' does not match any of the expected \
             tags: 'adaptive', 'disabled', 'enabled'",
            other.unwrap_or_default()
        ))),
    }
}

/// Checks an image or document block (`path` names it); returns its prompt tokens.
fn check_media(path: &str, block: &Value) -> Result<u64, WireError<'static>> {
    let kind = block
        .get("type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let source = block.get("source").unwrap_or(&Value::Null);
    if source.get("type").and_then(Value::as_str) != Some("base64") {
        return Ok(IMAGE_TOKENS);
    }
    let declared = source
        .get("media_type")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let at = format!("{path}.{kind}.source.base64");
    let data = source.get("data").and_then(Value::as_str);
    if kind == "image" {
        if !media::IMAGE_TYPES.contains(&declared) {
            return Err(bad(format!(
                "{at}.media_type: Input should be 'image/jpeg', 'image/png', 'image/gif' or \
                 'image/webp'"
            )));
        }
        let Some(bytes) = data.and_then(media::b64_decode) else {
            return Err(bad(format!(
                "{at}.data: The image data is not valid base64."
            )));
        };
        match media::sniff(&bytes) {
            Some(actual) if actual == declared => {}
            Some(actual) if actual.starts_with("image/") => {
                return Err(bad(format!(
                    "{at}: The image was specified using the {declared} media type, but the \
                     image appears to be a {actual} image"
                )));
            }
            _ => return Err(bad(format!("{at}: Could not process image"))),
        }
    } else if declared != "application/pdf" {
        return Err(bad(format!(
            "{at}.media_type: Input should be 'application/pdf'"
        )));
    } else if data
        .and_then(media::b64_decode)
        .and_then(|b| media::sniff(&b))
        != Some("application/pdf")
    {
        return Err(bad(format!("{at}.data: The PDF specified was not valid.")));
    }
    Ok(IMAGE_TOKENS)
}

/// The text of a `tool_result`'s content (a string or text blocks).
fn result_text(block: &Value) -> String {
    block.get("content").and_then(text_of).unwrap_or_default()
}

/// Reads a Messages (or count_tokens, without `max_tokens`) request and checks it by the real
/// API's rules.
///
/// Input tokens are the "true" count: o200k text tokens plus
/// [`AnthropicEstimator::BASE_OVERHEAD`], plus tool definitions, tool calls and results, and
/// media. The client's estimator scales text up by 1.1, so its estimate errs high, as against
/// the real API.
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
    let tools = parse_tools(v)?;
    let (choice, parallel) = parse_tool_choice(v, &tools)?;
    let thinking = parse_thinking(v, max_tokens)?;
    if thinking && matches!(choice, Choice::Required | Choice::Named(_)) {
        return Err(bad(
            "Thinking may not be enabled when tool_choice forces tool use.",
        ));
    }

    // Tools, then system, then messages: the order of the cache prefix.
    let mut prefix = Prefix::new();
    prefix.push(model.as_bytes(), AnthropicEstimator::BASE_OVERHEAD);
    let mut marks = Breakpoints::default();
    let mut input_tokens = AnthropicEstimator::BASE_OVERHEAD;
    for (i, t) in v
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let json = t.to_string();
        let tokens = counter.count_text(&json);
        input_tokens += tokens;
        prefix.push(json.as_bytes(), tokens);
        marks.mark(&format!("tools.{i}"), t, &prefix)?;
    }
    let system = match v.get("system") {
        None => String::new(),
        Some(s) => text_of(s).ok_or_else(|| bad("system: Input should be a valid string"))?,
    };
    input_tokens += counter.count_text(&system);
    match v.get("system") {
        Some(Value::Array(blocks)) => {
            for (j, b) in blocks.iter().enumerate() {
                let text = b.get("text").and_then(Value::as_str).unwrap_or_default();
                prefix.push(b.to_string().as_bytes(), counter.count_text(text));
                marks.mark(&format!("system.{j}"), b, &prefix)?;
            }
        }
        _ => prefix.push(system.as_bytes(), counter.count_text(&system)),
    }

    // The tool_use ids of the previous message, if it was the assistant's, and its index.
    let mut prev_uses: Option<(usize, Vec<String>)> = None;
    let mut last_user = String::new();
    let mut tool_results: Vec<String> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let role = match m.get("role").and_then(Value::as_str) {
            Some(r @ ("user" | "assistant")) => r,
            _ => {
                return Err(bad(format!(
                    "messages.{i}.role: Input should be 'user' or 'assistant'"
                )));
            }
        };
        let content = m
            .get("content")
            .and_then(text_of)
            .ok_or_else(|| bad(format!("messages.{i}.content: Field required")))?;
        input_tokens += counter.count_text(&content);
        prefix.push(role.as_bytes(), 0);
        let blocks = match m.get("content") {
            Some(Value::Array(b)) => b.as_slice(),
            _ => {
                prefix.push(content.as_bytes(), counter.count_text(&content));
                &[]
            }
        };
        let expected = prev_uses.take();
        let mut answered = Vec::new();
        let mut uses = Vec::new();
        tool_results.clear();
        for (j, b) in blocks.iter().enumerate() {
            let path = format!("messages.{i}.content.{j}");
            let extra = match b.get("type").and_then(Value::as_str).unwrap_or_default() {
                "text" => 0,
                "image" | "document" => check_media(&path, b)?,
                "tool_use" => {
                    let id = b.get("id").and_then(Value::as_str).unwrap_or_default();
                    uses.push(id.to_owned());
                    let name = b.get("name").and_then(Value::as_str).unwrap_or_default();
                    let input = b.get("input").map(Value::to_string).unwrap_or_default();
                    counter.count_text(name) + counter.count_text(&input)
                }
                "tool_result" => {
                    let id = b
                        .get("tool_use_id")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    if !expected
                        .as_ref()
                        .is_some_and(|(_, ids)| ids.iter().any(|u| u == id))
                    {
                        return Err(bad(format!(
                            "{path}: unexpected `tool_use_id` found in `tool_result` blocks: \
                             {id}. Each `tool_result` block must have a corresponding \
                             `tool_use` block in the previous message."
                        )));
                    }
                    answered.push(id.to_owned());
                    if let Some(Value::Array(inner)) = b.get("content") {
                        for (k, ib) in inner.iter().enumerate() {
                            if matches!(
                                ib.get("type").and_then(Value::as_str),
                                Some("image" | "document")
                            ) {
                                check_media(&format!("{path}.tool_result.content.{k}"), ib)?;
                            }
                        }
                    }
                    let text = result_text(b);
                    let tokens = counter.count_text(&text);
                    tool_results.push(text);
                    tokens
                }
                "thinking" => {
                    let text = b
                        .get("thinking")
                        .and_then(Value::as_str)
                        .unwrap_or_default();
                    let Some(sig) = b.get("signature").and_then(Value::as_str) else {
                        return Err(bad(format!("{path}.thinking.signature: Field required")));
                    };
                    if !tools::verify(text, sig) {
                        return Err(bad(format!(
                            "{path}: Invalid `signature` in `thinking` block"
                        )));
                    }
                    0
                }
                _ => 0,
            };
            input_tokens += extra;
            let text = b.get("text").and_then(Value::as_str).unwrap_or_default();
            prefix.push(b.to_string().as_bytes(), extra + counter.count_text(text));
            marks.mark(&path, b, &prefix)?;
        }
        if let Some((at, ids)) = expected {
            let missing: Vec<&str> = ids
                .iter()
                .filter(|u| !answered.contains(u))
                .map(String::as_str)
                .collect();
            if !missing.is_empty() {
                return Err(bad(format!(
                    "messages.{at}: `tool_use` ids were found without `tool_result` blocks \
                     immediately after: {}. Each `tool_use` block must have a corresponding \
                     `tool_result` block in the next message.",
                    missing.join(", ")
                )));
            }
        }
        if role == "assistant" && !uses.is_empty() {
            prev_uses = Some((i, uses));
        }
        if role == "user" {
            last_user = content;
        }
    }
    if marks.count > MAX_BREAKPOINTS {
        return Err(bad(format!(
            "A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. Found {}.",
            marks.count
        )));
    }
    let min = min_cacheable(&model);
    let cache_points = marks
        .points
        .into_iter()
        .filter(|p| p.tokens >= min)
        .map(|p| CachePoint {
            tokens: p.tokens.min(input_tokens),
            ..p
        })
        .collect();

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
    let format = parse_output_format(v)?;
    let after_tool_result = !tool_results.is_empty();
    let calls = ToolPlan {
        tools,
        choice,
        parallel,
    }
    .decide(&last_user, after_tool_result);
    Ok(Parsed {
        model,
        stream,
        include_usage: true,
        max_tokens,
        stops,
        input_tokens,
        content_key: json!([system, messages]).to_string(),
        plan: Plan {
            calls,
            thinking,
            tool_result: after_tool_result.then(|| tool_results.join(" ")),
            format,
            ..Plan::default()
        },
        cache_points,
    })
}

fn stop(g: &Generated) -> (&'static str, Value) {
    match &g.ending {
        Ending::Natural => ("end_turn", Value::Null),
        Ending::Length => ("max_tokens", Value::Null),
        Ending::Stop(s) => ("stop_sequence", Value::String(s.clone())),
        Ending::ToolUse => ("tool_use", Value::Null),
    }
}

/// A content block of the answer.
enum Block<'a> {
    Thinking(&'a str, &'a str),
    Text(&'a str),
    ToolUse(&'a crate::generate::ToolCall),
}

/// The content blocks of an answer: thinking, then text (unless it only calls tools), then
/// tool calls.
fn blocks(g: &Generated) -> Vec<Block<'_>> {
    let mut out = Vec::new();
    if let Some(t) = &g.thinking {
        out.push(Block::Thinking(&t.text, &t.signature));
    }
    if g.calls.is_empty() {
        out.push(Block::Text(&g.text));
    }
    out.extend(g.calls.iter().map(Block::ToolUse));
    out
}

/// The parsed input of a tool call.
fn input(c: &crate::generate::ToolCall) -> Value {
    serde_json::from_str(&c.arguments).unwrap_or_else(|_| json!({}))
}

/// The answer, shaped as Anthropic's (see the recordings in the fixtures).
fn render(ctx: &Ctx, p: &Parsed, g: &Generated, mangle: Mangle) -> Response<SimBody> {
    let (stop_reason, stop_sequence) = stop(g);
    let cache = g.cache;
    let usage = |output: u64| {
        json!({
            "input_tokens": p.input_tokens.saturating_sub(cache.read + cache.created()),
            "cache_creation_input_tokens": cache.created(),
            "cache_read_input_tokens": cache.read,
            "cache_creation": {
                "ephemeral_5m_input_tokens": cache.created_5m,
                "ephemeral_1h_input_tokens": cache.created_1h
            },
            "output_tokens": output,
            "service_tier": "standard"
        })
    };
    let blocks = blocks(g);
    if !p.stream {
        let content: Vec<Value> = blocks
            .iter()
            .map(|b| match b {
                Block::Thinking(t, s) => json!({"type": "thinking", "thinking": t, "signature": s}),
                Block::Text(t) => json!({"type": "text", "text": t}),
                Block::ToolUse(c) => {
                    json!({"type": "tool_use", "id": c.id, "name": c.name, "input": input(c)})
                }
            })
            .collect();
        let body = json!({
            "id": ctx.id,
            "type": "message",
            "role": "assistant",
            "model": p.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": usage(g.tokens)
        });
        return mangle.json_ok(&body);
    }

    let ev = |name: &str, data: Value| wire::sse_event(Some(name), &data.to_string());
    let delta = |index: usize, delta: Value| {
        ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index, "delta": delta}),
        )
    };
    let start = |index: usize, b: &Block<'_>| {
        let block = match b {
            Block::Thinking(..) => json!({"type": "thinking", "thinking": "", "signature": ""}),
            Block::Text(_) => json!({"type": "text", "text": ""}),
            Block::ToolUse(c) => {
                json!({"type": "tool_use", "id": c.id, "name": c.name, "input": {}})
            }
        };
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": block}),
        )
    };
    let stop_block = |index: usize| {
        ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        )
    };
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
        start(0, &blocks[0]),
        wire::sse_event(Some("ping"), r#"{"type": "ping"}"#),
    ];
    // Everything between the first block's start and the last block's stop.
    let mut content = Vec::new();
    for (index, b) in blocks.iter().enumerate() {
        if index > 0 {
            content.push(stop_block(index - 1));
            content.push(start(index, b));
        }
        match b {
            Block::Thinking(t, s) => {
                for piece in pieces(t) {
                    content.push(delta(
                        index,
                        json!({"type": "thinking_delta", "thinking": piece}),
                    ));
                }
                content.push(delta(
                    index,
                    json!({"type": "signature_delta", "signature": s}),
                ));
            }
            Block::Text(t) => {
                for piece in pieces(t) {
                    content.push(delta(index, json!({"type": "text_delta", "text": piece})));
                }
            }
            Block::ToolUse(c) => {
                content.push(delta(
                    index,
                    json!({"type": "input_json_delta", "partial_json": ""}),
                ));
                for f in fragments(&c.arguments) {
                    content.push(delta(
                        index,
                        json!({"type": "input_json_delta", "partial_json": f}),
                    ));
                }
            }
        }
    }
    let error = || {
        ev(
            "error",
            json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
        )
    };
    if Mangle::apply(mangle, &mut events, content, error) {
        return wire::sse_response(events, ctx.chunk_delay);
    }
    events.push(stop_block(blocks.len() - 1));
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
