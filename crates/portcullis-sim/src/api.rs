//! The request flow both APIs share: auth, body cap, parsing, faults, limits, the answer.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use serde_json::Value;

use crate::generate::{Generated, fingerprint, generate};
use crate::limits::{Decision, LimitView};
use crate::scenario::{Family, FaultKind, FaultRule};
use crate::state::{Shared, lock};
use crate::stats::Stats;
use crate::wire::{self, SimBody, WireError};
use crate::{anthropic, openai};

/// An API endpoint the simulator serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    ChatCompletions,
    Messages,
    CountTokens,
}

impl Endpoint {
    pub(crate) fn family(self) -> Family {
        match self {
            Endpoint::ChatCompletions => Family::Openai,
            _ => Family::Anthropic,
        }
    }
    pub(crate) fn name(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Messages => "messages",
            Endpoint::CountTokens => "count_tokens",
        }
    }
}

/// A request body, parsed and counted.
#[derive(Debug, Clone)]
pub(crate) struct Parsed {
    pub model: String,
    pub stream: bool,
    /// OpenAI `stream_options.include_usage`.
    pub include_usage: bool,
    pub max_tokens: Option<u64>,
    pub stops: Vec<String>,
    /// Prompt / input tokens.
    pub input_tokens: u64,
    /// The messages (and system prompt) as sent, which seed the answer.
    pub content_key: String,
}

/// How a fault bends a successful answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mangle {
    None,
    ErrorBeforeContent,
    ErrorAfterContent,
    Truncated,
    MalformedJson,
}

impl Mangle {
    /// Appends the content events to `events` (which hold the stream's preamble), bent by the
    /// fault. Returns `true` when the stream must end right there (an error event, or a cut).
    pub(crate) fn apply(
        self,
        events: &mut Vec<bytes::Bytes>,
        mut content: Vec<bytes::Bytes>,
        error: impl FnOnce() -> bytes::Bytes,
    ) -> bool {
        match self {
            Mangle::ErrorBeforeContent => {
                events.push(error());
                true
            }
            Mangle::ErrorAfterContent => {
                events.extend(content.into_iter().take(2));
                events.push(error());
                true
            }
            Mangle::Truncated => {
                let half = content.len().div_ceil(2);
                events.extend(content.into_iter().take(half));
                true
            }
            Mangle::MalformedJson => {
                if let Some(second) = content.get_mut(1).or(events.get_mut(0)) {
                    let s = String::from_utf8_lossy(second);
                    *second = bytes::Bytes::from(format!("{}\n\n", crate::wire::cut_half(&s)));
                }
                events.extend(content);
                false
            }
            Mangle::None => {
                events.extend(content);
                false
            }
        }
    }
}

/// What a response needs besides the request and the generated text.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    pub request_id: String,
    /// `chatcmpl-…` / `msg_01…`.
    pub id: String,
    pub created: u64,
    pub chunk_delay: Duration,
}

/// The answer to one request: a response, or `None` to drop the connection; and the outcome
/// to count.
pub(crate) struct Answer {
    pub response: Option<Response<SimBody>>,
    pub outcome: String,
}

impl Answer {
    fn send(response: Response<SimBody>, outcome: impl Into<String>) -> Self {
        Answer {
            response: Some(response),
            outcome: outcome.into(),
        }
    }
}

/// The API key of a request: OpenAI takes `Authorization: Bearer`, Anthropic `x-api-key` too.
fn api_key(family: Family, headers: &HeaderMap) -> Option<String> {
    let bearer = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let x_api_key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .map(str::trim);
    let key = match family {
        Family::Anthropic => x_api_key.filter(|k| !k.is_empty()).or(bearer),
        _ => bearer,
    };
    key.filter(|k| !k.is_empty()).map(str::to_owned)
}

/// Serves one API request.
pub(crate) async fn handle<B>(
    shared: &Shared,
    endpoint: Endpoint,
    headers: HeaderMap,
    body: B,
) -> Answer
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let family = endpoint.family();
    let settings = shared.settings();
    let (request_id, id) = {
        let mut rng = lock(&shared.rng);
        let rid = wire::request_id(family, &mut *rng);
        let id = match family {
            Family::Anthropic => wire::message_id(&mut *rng),
            _ => wire::chatcmpl_id(&mut *rng),
        };
        (rid, id)
    };
    let fail = |err: WireError<'_>, outcome: &str| {
        let mut r = wire::error_body(family, &request_id, &err);
        set_request_id(family, r.headers_mut(), &request_id);
        Answer::send(r, outcome)
    };

    let Some(key) = api_key(family, &headers) else {
        let msg = match family {
            Family::Anthropic => "x-api-key header is required",
            _ => {
                "You didn't provide an API key. You need to provide your API key in an \
                 Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or \
                 as the password field (with blank username) if you're accessing the API from \
                 your browser and are prompted for a username. You can obtain an API key from \
                 https://platform.openai.com/account/api-keys."
            }
        };
        return fail(WireError::new(401, msg), "unauthorized");
    };

    let bytes = match Limited::new(body, settings.max_body_bytes).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            let msg = match family {
                Family::Anthropic => "Request exceeds the maximum allowed number of bytes.".into(),
                _ => format!(
                    "Request too large: the body exceeds the maximum of {} bytes.",
                    settings.max_body_bytes
                ),
            };
            return fail(WireError::new(413, msg), "too_large");
        }
        Err(_) => {
            return Answer {
                response: None,
                outcome: "aborted".into(),
            };
        }
    };
    let parsed = serde_json::from_slice::<Value>(&bytes)
        .map_err(|_| invalid_json(family))
        .and_then(|v| match endpoint {
            Endpoint::ChatCompletions => openai::parse(&v),
            Endpoint::Messages => anthropic::parse(&v, true),
            Endpoint::CountTokens => anthropic::parse(&v, false),
        });
    let parsed = match parsed {
        Ok(p) => p,
        Err(e) => return fail(e, "bad_request"),
    };
    shared.stats(|s| Stats::bump(&mut s.by_model, &parsed.model));

    if endpoint == Endpoint::CountTokens {
        let body = serde_json::json!({ "input_tokens": parsed.input_tokens });
        let mut r = wire::json_response(http::StatusCode::OK, &body);
        set_request_id(family, r.headers_mut(), &request_id);
        return Answer::send(r, "ok");
    }

    let chosen = shared.decide(family, parsed.stream);
    if !chosen.latency.is_zero() {
        tokio::time::sleep(chosen.latency).await;
    }
    let mut mangle = Mangle::None;
    let mut outcome = "ok".to_owned();
    if let Some(rule) = &chosen.fault {
        outcome = fault_outcome(rule);
        match rule.kind {
            FaultKind::Hang => {
                shared.stats(|s| Stats::bump(&mut s.by_outcome, &outcome));
                let mut rx = shared.shutdown.subscribe();
                let _ = rx.wait_for(|stop| *stop).await;
                return Answer {
                    response: None,
                    outcome: String::new(),
                };
            }
            FaultKind::Reset => {
                return Answer {
                    response: None,
                    outcome,
                };
            }
            FaultKind::ErrorBeforeContent => mangle = Mangle::ErrorBeforeContent,
            FaultKind::ErrorAfterContent => mangle = Mangle::ErrorAfterContent,
            FaultKind::Truncated => mangle = Mangle::Truncated,
            FaultKind::MalformedJson => mangle = Mangle::MalformedJson,
            FaultKind::Latency => {}
            _ => {
                let (err, retry_after) = fault_error(family, rule);
                let mut a = fail(err, &outcome);
                if let (Some(r), Some(secs)) = (a.response.as_mut(), retry_after) {
                    retry_after_headers(family, r.headers_mut(), Duration::from_secs(secs));
                }
                return a;
            }
        }
    }

    let costs: Vec<u64> = match family {
        Family::Anthropic => vec![1, parsed.input_tokens, parsed.max_tokens.unwrap_or(0)],
        _ => vec![1, parsed.input_tokens + parsed.max_tokens.unwrap_or(0)],
    };
    let decision = lock(&shared.limiter).check(
        family,
        &key,
        &parsed.model,
        &costs,
        tokio::time::Instant::now(),
    );
    if let Some(refusal) = decision.refused {
        let view = decision.views[refusal.which];
        let err = rate_limit_error(
            family,
            &parsed.model,
            refusal.which,
            view,
            refusal.requested,
        );
        let mut a = fail(err, "rate_limited");
        if let Some(r) = a.response.as_mut() {
            retry_after_headers(family, r.headers_mut(), refusal.retry_after);
            limit_headers(family, r.headers_mut(), &decision);
        }
        return a;
    }

    let model = parsed.model.as_str();
    let encoding = match family {
        Family::Anthropic => portcullis_core::Encoding::O200k,
        _ => portcullis_core::Encoding::for_model(model),
    };
    let seed = fingerprint(
        settings.seed,
        &[model.as_bytes(), parsed.content_key.as_bytes()],
    );
    let generated: Generated = generate(seed, encoding, parsed.max_tokens, &parsed.stops);
    if family == Family::Anthropic {
        let unused = parsed
            .max_tokens
            .unwrap_or(0)
            .saturating_sub(generated.tokens);
        lock(&shared.limiter).refund(family, &key, model, 2, unused);
    }
    let ctx = Ctx {
        request_id,
        id,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs(),
        chunk_delay: settings.chunk_delay,
    };
    let mut r = match family {
        Family::Anthropic => anthropic::render(&ctx, &parsed, &generated, mangle),
        _ => openai::render(&ctx, &parsed, &generated, mangle),
    };
    set_request_id(family, r.headers_mut(), &ctx.request_id);
    limit_headers(family, r.headers_mut(), &decision);
    if family == Family::Openai {
        let h = r.headers_mut();
        wire::set(h, "openai-version", "2020-10-01");
        wire::set(h, "openai-processing-ms", "1");
    }
    Answer::send(r, outcome)
}

/// The outcome name of a fault: `fault_<kind>`, with the status for `status`.
fn fault_outcome(rule: &FaultRule) -> String {
    let kind = serde_json::to_value(rule.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    match rule.status {
        Some(s) => format!("fault_{kind}_{s}"),
        None => format!("fault_{kind}"),
    }
}

/// The error an error fault sends, and its `retry-after` in seconds.
fn fault_error(family: Family, rule: &FaultRule) -> (WireError<'static>, Option<u64>) {
    let anthropic = family == Family::Anthropic;
    match rule.kind {
        FaultKind::RateLimit => {
            let secs = rule.retry_after_secs.unwrap_or(1);
            let err = if anthropic {
                WireError::new(
                    429,
                    "This request would exceed your organization's rate limit. Please try again \
                     later. (simulated)",
                )
            } else {
                WireError::new(
                    429,
                    format!(
                        "Rate limit reached in organization org-sim on requests per min (RPM). \
                         Please try again in {secs}s. (simulated)"
                    ),
                )
                .kind("requests")
                .code("rate_limit_exceeded")
            };
            (err, Some(secs))
        }
        FaultKind::InsufficientQuota if !anthropic => (
            WireError::new(
                429,
                "You exceeded your current quota, please check your plan and billing details. \
                 For more information on this error, read the docs: \
                 https://platform.openai.com/docs/guides/error-codes/api-errors.",
            )
            .kind("insufficient_quota")
            .code("insufficient_quota"),
            None,
        ),
        FaultKind::InsufficientQuota | FaultKind::Billing if anthropic => (
            WireError::new(
                402,
                "Your credit balance is too low to access the Anthropic API. Please go to Plans \
                 & Billing to upgrade or purchase credits.",
            ),
            None,
        ),
        FaultKind::Billing => (
            WireError::new(
                402,
                "Your account is not active, please check your billing details on our website.",
            )
            .code("billing_not_active"),
            None,
        ),
        FaultKind::Overloaded if anthropic => {
            (WireError::new(529, wire::status_message(family, 529)), None)
        }
        FaultKind::Overloaded => (
            WireError::new(
                503,
                "The engine is currently overloaded, please try again later.",
            ),
            None,
        ),
        _ => {
            let status = rule.status.unwrap_or(500);
            (
                WireError::new(status, wire::status_message(family, status)),
                None,
            )
        }
    }
}

fn invalid_json(family: Family) -> WireError<'static> {
    match family {
        Family::Anthropic => WireError::new(
            400,
            "There was an error parsing the body of your request. Please make sure it is valid JSON.",
        ),
        _ => WireError::new(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you \
             aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, \
             but what was sent was not valid JSON. If you have trouble figuring out how to fix \
             this, please contact us through our help center at help.openai.com.)",
        ),
    }
}

/// The 429 of an enforced limit, in each provider's words.
fn rate_limit_error(
    family: Family,
    model: &str,
    which: usize,
    view: LimitView,
    requested: u64,
) -> WireError<'static> {
    match family {
        Family::Anthropic => {
            let what = ["requests", "input tokens", "output tokens"][which.min(2)];
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
        _ => {
            let (kind, what) = if which == 0 {
                ("requests", "requests per min (RPM)")
            } else {
                ("tokens", "tokens per min (TPM)")
            };
            WireError::new(
                429,
                format!(
                    "Rate limit reached for {model} in organization org-sim on {what}: Limit {}, \
                     Used {}, Requested {requested}. Please try again in {}. Visit \
                     https://platform.openai.com/account/rate-limits to learn more.",
                    view.limit,
                    view.limit - view.remaining,
                    wire::go_duration(view.reset.min(Duration::from_secs(3600)))
                ),
            )
            .kind(kind)
            .code("rate_limit_exceeded")
        }
    }
}

/// Sets `x-request-id` (OpenAI) or `request-id` (Anthropic).
pub(crate) fn set_request_id(family: Family, h: &mut HeaderMap, id: &str) {
    match family {
        Family::Anthropic => wire::set(h, "request-id", id),
        _ => wire::set(h, "x-request-id", id),
    }
}

/// `retry-after` in whole seconds, rounded up; OpenAI adds `retry-after-ms`.
fn retry_after_headers(family: Family, h: &mut HeaderMap, wait: Duration) {
    let ms = wait.as_nanos().div_ceil(1_000_000);
    wire::set(h, "retry-after", ms.div_ceil(1000).to_string());
    if family == Family::Openai {
        wire::set(h, "retry-after-ms", ms.to_string());
    }
}

/// The rate-limit headers of a decision.
fn limit_headers(family: Family, h: &mut HeaderMap, d: &Decision) {
    let v = &d.views;
    match family {
        Family::Anthropic => {
            let now = SystemTime::now();
            let at = |reset: Duration| wire::rfc3339(now + reset + Duration::from_millis(999));
            let combined = LimitView {
                limit: v[1].limit + v[2].limit,
                remaining: v[1].remaining + v[2].remaining,
                reset: v[1].reset.max(v[2].reset),
            };
            for (name, view) in [
                ("requests", v[0]),
                ("input-tokens", v[1]),
                ("output-tokens", v[2]),
                ("tokens", combined),
            ] {
                for (field, value) in [
                    ("limit", view.limit.to_string()),
                    ("remaining", view.remaining.to_string()),
                    ("reset", at(view.reset)),
                ] {
                    let name = format!("anthropic-ratelimit-{name}-{field}");
                    if let (Ok(n), Ok(v)) = (
                        http::HeaderName::try_from(name),
                        http::HeaderValue::try_from(value),
                    ) {
                        h.insert(n, v);
                    }
                }
            }
        }
        _ => {
            for (name, view) in [("requests", v[0]), ("tokens", v[1])] {
                let pairs = [
                    ("limit", view.limit.to_string()),
                    ("remaining", view.remaining.to_string()),
                    ("reset", wire::go_duration(view.reset)),
                ];
                for (field, value) in pairs {
                    let name = format!("x-ratelimit-{field}-{name}");
                    if let (Ok(n), Ok(v)) = (
                        http::HeaderName::try_from(name),
                        http::HeaderValue::try_from(value),
                    ) {
                        h.insert(n, v);
                    }
                }
            }
        }
    }
}

/// A string or an array of `{"type":"text","text":…}` parts, as both APIs take content.
pub(crate) fn text_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Null => Some(String::new()),
        Value::Array(parts) => Some(
            parts
                .iter()
                .filter_map(|p| p.get("text").and_then(Value::as_str))
                .collect::<Vec<_>>()
                .join(""),
        ),
        _ => None,
    }
}

/// An optional positive integer field; the error names it in the family's words.
pub(crate) fn positive_int(
    v: &Value,
    field: &'static str,
    family: Family,
) -> Result<Option<u64>, WireError<'static>> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => match x.as_u64() {
            Some(n) if n >= 1 => Ok(Some(n)),
            Some(n) => Err(match family {
                Family::Anthropic => WireError::new(
                    400,
                    format!("{field}: Input should be greater than or equal to 1"),
                ),
                _ => WireError::new(
                    400,
                    format!(
                        "Invalid '{field}': integer below minimum value. Expected a value >= 1, \
                         but got {n} instead."
                    ),
                )
                .param(field)
                .code("integer_below_min_value"),
            }),
            None => Err(match family {
                Family::Anthropic => {
                    WireError::new(400, format!("{field}: Input should be a valid integer"))
                }
                _ => WireError::new(
                    400,
                    format!("Invalid type for '{field}': expected an integer."),
                )
                .param(field)
                .code("invalid_type"),
            }),
        },
    }
}
