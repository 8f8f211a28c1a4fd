//! The request flow both APIs share, written once against [`SimApi`]: auth, body cap, parsing,
//! faults, limits, the answer. Everything in which OpenAI and Anthropic differ sits behind the
//! trait, in [`crate::openai`] and [`crate::anthropic`]; [`route`] and [`by_headers`] are the
//! only places that choose between them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Response, StatusCode};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use portcullis_core::Encoding;
use rand::rngs::SmallRng;
use serde_json::Value;

use crate::anthropic::Anthropic;
use crate::cache::CachePoint;
use crate::generate::{Generated, Plan, answer, fingerprint};
use crate::limits::{LimitView, Refusal};
use crate::openai::OpenAi;
use crate::scenario::{Family, FaultKind, FaultRule, Limits};
use crate::state::{Shared, lock};
use crate::stats::Stats;
use crate::wire::{self, Mangle, SimBody, WireError};

/// One provider's simulated API: everything in which OpenAI and Anthropic differ, from the
/// paths it serves to the words of its errors. [`handle`] is the flow, written once.
pub(crate) trait SimApi: Sync {
    /// Which API this is, for fault rules and limit buckets.
    fn family(&self) -> Family;
    /// The `POST` endpoints it serves.
    fn endpoints(&self) -> &'static [Endpoint];
    /// The body of `GET /v1/models`.
    fn models(&self) -> Value;

    /// A fresh request id (drawn before the answer id).
    fn request_id(&self, rng: &mut SmallRng) -> String;
    /// A fresh id for the answer (`chatcmpl-…`, `msg_01…`).
    fn answer_id(&self, rng: &mut SmallRng) -> String;
    /// A tool call id (`call_…`, `toolu_01…`), drawn from the request's own RNG.
    fn tool_call_id(&self, rng: &mut SmallRng) -> String;
    /// The API key the request carries, trimmed (perhaps empty).
    fn api_key<'h>(&self, h: &'h HeaderMap) -> Option<&'h str>;

    /// Reads a request body (JSON already parsed) for an endpoint doing `op`.
    fn parse(&self, v: &Value, op: Op) -> Result<Parsed, WireError<'static>>;
    /// The encoding the answer's text is generated (and counted) in.
    fn encoding(&self, model: &str) -> Encoding;
    /// What a request charges to each limit bucket, in the order of [`SimApi::capacities`].
    fn costs(&self, p: &Parsed) -> Vec<u64>;
    /// The bucket capacities `limits` set for this API.
    fn capacities(&self, limits: &Limits, model: &str) -> Vec<u64>;
    /// What to give back to which bucket once the answer is known, if anything.
    fn refund(&self, p: &Parsed, g: &Generated) -> Option<(usize, u64)>;
    /// The answer, complete or streamed, bent by `mangle`.
    fn render(&self, ctx: &Ctx, p: &Parsed, g: &Generated, mangle: Mangle) -> Response<SimBody>;

    /// The body of an error response.
    fn error_body(&self, request_id: &str, err: &WireError<'_>) -> Value;
    /// The 401 of a request without a key.
    fn missing_key(&self) -> WireError<'static>;
    /// The 413 of a body over `max` bytes.
    fn too_large(&self, max: usize) -> WireError<'static>;
    /// The 400 of a body that is not JSON.
    fn invalid_json(&self) -> WireError<'static>;
    /// The error an error fault sends.
    fn fault_error(&self, rule: &FaultRule) -> WireError<'static>;
    /// The 429 of an enforced limit: the refusal, and the refusing bucket as it stood.
    fn rate_limited(&self, model: &str, refusal: Refusal, view: LimitView) -> WireError<'static>;

    /// Sets the request id header.
    fn set_request_id(&self, h: &mut HeaderMap, id: &str);
    /// Sets the headers that say how long to wait.
    fn retry_after(&self, h: &mut HeaderMap, wait: Duration);
    /// Sets the rate-limit headers of the buckets' views.
    fn limit_headers(&self, h: &mut HeaderMap, views: &[LimitView]);
    /// Sets the headers only a successful answer carries.
    fn answer_headers(&self, h: &mut HeaderMap);
}

/// Every API served, in the order their endpoints are matched.
const APIS: [&dyn SimApi; 2] = [&OpenAi, &Anthropic];

/// The API and endpoint that serve `POST path`, if any.
pub(crate) fn route(path: &str) -> Option<(&'static dyn SimApi, &'static Endpoint)> {
    APIS.into_iter()
        .find_map(|api| Some((api, api.endpoints().iter().find(|e| e.path == path)?)))
}

/// The API a request to no endpoint of its own is for, by its headers: Anthropic's SDK sends
/// `anthropic-version` and `x-api-key`, OpenAI's neither.
pub(crate) fn by_headers(h: &HeaderMap) -> &'static dyn SimApi {
    if h.contains_key("anthropic-version") || h.contains_key("x-api-key") {
        &Anthropic
    } else {
        &OpenAi
    }
}

/// A `POST` endpoint of one API.
#[derive(Debug)]
pub(crate) struct Endpoint {
    /// Its path.
    pub path: &'static str,
    /// Its name in [`Stats::by_endpoint`].
    pub name: &'static str,
    /// What it does.
    pub op: Op,
}

/// What an endpoint does.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Op {
    /// Answers with generated text; faults and limits apply.
    Answer,
    /// Counts the input tokens, answering with this body; no faults, no limits.
    CountTokens(fn(&Parsed) -> Value),
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
    /// What the answer is to be: tool calls, structured output, thinking.
    pub plan: Plan,
    /// The cacheable prefixes of the prompt, shortest first.
    pub cache_points: Vec<CachePoint>,
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
    pub(crate) fn send(response: Response<SimBody>, outcome: impl Into<String>) -> Self {
        Answer {
            response: Some(response),
            outcome: outcome.into(),
        }
    }

    fn dropped(outcome: impl Into<String>) -> Self {
        Answer {
            response: None,
            outcome: outcome.into(),
        }
    }
}

/// An error response of `api`, with its request id.
pub(crate) fn error(api: &dyn SimApi, request_id: &str, err: &WireError<'_>) -> Response<SimBody> {
    let status = StatusCode::from_u16(err.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = wire::json_response(status, &api.error_body(request_id, err));
    api.set_request_id(r.headers_mut(), request_id);
    r
}

/// Serves one request to an endpoint of `api`.
pub(crate) async fn handle<B>(
    shared: &Shared,
    api: &dyn SimApi,
    endpoint: &Endpoint,
    headers: HeaderMap,
    body: B,
    deployment: Option<&str>,
) -> Answer
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let settings = shared.settings();
    let (request_id, id) = {
        let mut rng = lock(&shared.rng);
        let request_id = api.request_id(&mut rng);
        (request_id, api.answer_id(&mut rng))
    };
    let fail = |err: WireError<'_>| error(api, &request_id, &err);

    let Some(key) = api.api_key(&headers).filter(|k| !k.is_empty()) else {
        return Answer::send(fail(api.missing_key()), "unauthorized");
    };
    let key = key.to_owned();
    // An Azure deployment's quota is the deployment's, whichever of the resource's keys calls
    // it; OpenAI's and Anthropic's limits are per key (organization) and model.
    let limit_key = if deployment.is_some() {
        ""
    } else {
        key.as_str()
    };

    let bytes = match Limited::new(body, settings.max_body_bytes).collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => {
            return Answer::send(fail(api.too_large(settings.max_body_bytes)), "too_large");
        }
        Err(_) => return Answer::dropped("aborted"),
    };
    let parsed = serde_json::from_slice::<Value>(&bytes)
        .map_err(|_| api.invalid_json())
        .and_then(|v| api.parse(&v, endpoint.op));
    let mut parsed = match parsed {
        Ok(p) => p,
        Err(e) => return Answer::send(fail(e), "bad_request"),
    };
    // An Azure deployment answers as its deployment, and its limits are its own.
    if let Some(d) = deployment {
        parsed.model = d.to_owned();
    }
    shared.stats(|s| Stats::bump(&mut s.by_model, &parsed.model));

    if let Op::CountTokens(body) = endpoint.op {
        let mut r = wire::json_response(StatusCode::OK, &body(&parsed));
        api.set_request_id(r.headers_mut(), &request_id);
        return Answer::send(r, "ok");
    }

    let chosen = shared.decide(api.family(), parsed.stream);
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
                return Answer::dropped("");
            }
            FaultKind::Reset => return Answer::dropped(outcome),
            FaultKind::ErrorBeforeContent => mangle = Mangle::ErrorBeforeContent,
            FaultKind::ErrorAfterContent => mangle = Mangle::ErrorAfterContent,
            FaultKind::Truncated => mangle = Mangle::Truncated,
            FaultKind::MalformedJson => mangle = Mangle::MalformedJson,
            FaultKind::Latency => {}
            _ => {
                let mut r = fail(api.fault_error(rule));
                if rule.kind == FaultKind::RateLimit {
                    api.retry_after(r.headers_mut(), Duration::from_secs(rule.retry_after()));
                }
                return Answer::send(r, outcome);
            }
        }
    }

    let model = parsed.model.as_str();
    let decision = lock(&shared.limiter).check(
        api,
        limit_key,
        model,
        &api.costs(&parsed),
        tokio::time::Instant::now(),
    );
    if let Some(refusal) = decision.refused {
        let view = decision.views[refusal.which];
        let mut r = fail(api.rate_limited(model, refusal, view));
        api.retry_after(r.headers_mut(), refusal.retry_after);
        api.limit_headers(r.headers_mut(), &decision.views);
        return Answer::send(r, "rate_limited");
    }

    let seed = fingerprint(
        settings.seed,
        &[model.as_bytes(), parsed.content_key.as_bytes()],
    );
    let mut generated = answer(
        seed,
        api.encoding(model),
        &parsed.plan,
        parsed.max_tokens,
        &parsed.stops,
        settings.answer_words,
        |rng| api.tool_call_id(rng),
    );
    if !parsed.cache_points.is_empty() {
        let family = [api.family() as u8];
        let scope: [&[u8]; 3] = [&family, key.as_bytes(), model.as_bytes()];
        generated.cache =
            lock(&shared.cache).apply(&scope, &parsed.cache_points, tokio::time::Instant::now());
    }
    if let Some((which, amount)) = api.refund(&parsed, &generated) {
        lock(&shared.limiter).refund(api, limit_key, model, which, amount);
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
    let mut r = api.render(&ctx, &parsed, &generated, mangle);
    let h = r.headers_mut();
    api.set_request_id(h, &ctx.request_id);
    api.limit_headers(h, &decision.views);
    api.answer_headers(h);
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

/// Why an integer field was refused.
#[derive(Debug, Clone, Copy)]
pub(crate) enum BadInt {
    /// An integer below 1.
    BelowOne(u64),
    /// Not an integer.
    NotInt,
}

/// An optional positive integer field; each API words the [`BadInt`] its own way.
pub(crate) fn positive_int(v: &Value, field: &str) -> Result<Option<u64>, BadInt> {
    match v.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => match x.as_u64() {
            Some(n) if n >= 1 => Ok(Some(n)),
            Some(n) => Err(BadInt::BelowOne(n)),
            None => Err(BadInt::NotInt),
        },
    }
}
