//! # An OpenAI-compatible gateway in axum, backed by the stack
//!
//! The layers composed inside an existing axum service: `POST /v1/chat/completions` takes an
//! OpenAI Chat Completions body, sends it through [`portcullis::Stack`] (deadline → fallback →
//! retry → breaker → bucket → timeout → OpenAI or Anthropic) and answers in OpenAI's shape,
//! streaming as server-sent events when the body says `"stream": true`. The upstream that
//! served the call is in the `x-portcullis-provider` header (and in `model`).
//!
//! Errors keep their meaning on the way out ([`status_of`]): a request the upstream refused
//! stays a 400 / 401 / 404, the stack's own refusals (circuit open, throttled) become a 503
//! with `Retry-After`, upstream failures a 502 / 504. A stream that fails before its first
//! chunk still gets a proper status; one that fails after it ends with an `{"error": …}` event,
//! as OpenAI's own streams do.
//!
//! The client chooses the `model`, and the breaker and the bucket keep one state per model: both
//! maps are bounded (at most 10 000 keys each, idle ones dropped after 10 minutes; keys beyond
//! the cap share one overflow state), see `keys` in `CircuitBreakerConfig` / `TokenBucketConfig`
//! and "Bounded keyed state" in the README. A gateway that serves a known set of models can also
//! refuse the others before the stack.
//!
//! ```text
//! cargo run --example axum_gateway            # start, send a few requests, shut down
//! cargo run --example axum_gateway -- --serve # keep serving on 127.0.0.1:3000 until Ctrl-C
//! cargo run --example axum_gateway -- --serve 127.0.0.1:8081
//! # in front of any OpenAI-compatible host (key from OPENAI_API_KEY when set):
//! cargo run --example axum_gateway -- --serve --upstream http://localhost:8000/v1 --model llama-3.1-8b
//! ```
//!
//! It carries the whole chat vocabulary ([`ChatCompletionRequest`]): parts, images, tools,
//! tool choice, tool calls and results, JSON schemas, reasoning effort.
//!
//! **Safe defaults, because people copy examples** ([`GatewayLimits`]):
//! - a request body limit (1 MiB): a larger body is a 413 in OpenAI's error shape;
//! - a model allowlist: a model the gateway does not serve is a 404 `model_not_found`, so a
//!   client cannot make the layers keep state for arbitrary model names;
//! - a limit on requests in flight, **streams included until their last byte** (256), with
//!   load shedding: beyond it a request is answered at once with a 503, `Retry-After: 1` and
//!   `x-should-retry: true`, which the OpenAI SDKs retry. (tower's `ConcurrencyLimit` would
//!   release its permit when the response head is sent, letting streams escape the limit, so
//!   the permit here lives in the response body.)
//! - graceful shutdown: new connections stop, in-flight requests and streams may finish for up
//!   to 30 s ([`DRAIN`]), then the server stops regardless.
//!
//! The demo talks to the gateway with Portcullis' own [`OpenAiProvider`] pointed at it (any
//! OpenAI SDK works the same with `base_url = "http://127.0.0.1:3000/v1"`). Upstream is the
//! embedded simulator, or the real APIs when both `OPENAI_API_KEY` and `ANTHROPIC_API_KEY` are
//! set (the fault steps, which need the simulator, are then skipped).
//! `PORTCULLIS_EXAMPLES_SIM=1` keeps the simulator even when the keys are set.

mod common;

use std::collections::BTreeSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures_util::{StreamExt, stream};
use portcullis::providers::{ApiKey, OpenAiProvider};
use portcullis::{
    ChatMessage, ChatRequest, ChatStream, CompletionResult, ErrorKind, LlmError, MediaSource, Part,
    ProviderStack, ResponseFormat, Stack, StreamChunk, Tool, ToolCall, ToolChoice,
};
use portcullis_sim::{Family, FaultKind, FaultRule, Simulator};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tower::ServiceExt;

use common::{MODEL, SECONDARY_MODEL};

/// An OpenAI Chat Completions request, as the gateway reads it: the whole chat vocabulary
/// Portcullis carries (text and image parts, tools and tool choice, tool calls and their
/// results, JSON and schema answers, reasoning effort, stop sequences). Fields it does not
/// know (`n`, `user`, `logprobs`, …) are ignored; a content part or a tool of a type it cannot
/// carry is a 400, never silently dropped.
#[derive(Debug, Deserialize)]
struct ChatCompletionRequest {
    model: String,
    messages: Vec<InMessage>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    stop: Option<Stop>,
    #[serde(default)]
    response_format: Option<Format>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    tools: Option<Vec<InTool>>,
    #[serde(default)]
    tool_choice: Option<InToolChoice>,
    #[serde(default)]
    parallel_tool_calls: Option<bool>,
    #[serde(default)]
    reasoning_effort: Option<portcullis::ReasoningEffort>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Stop {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
struct Format {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    json_schema: Option<InSchema>,
}

#[derive(Debug, Deserialize)]
struct InSchema {
    name: String,
    #[serde(default)]
    schema: Option<Value>,
    #[serde(default)]
    strict: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<InContent>,
    #[serde(default)]
    tool_calls: Option<Vec<InToolCall>>,
    #[serde(default)]
    tool_call_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum InContent {
    Text(String),
    Parts(Vec<InPart>),
}

#[derive(Debug, Deserialize)]
struct InPart {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    image_url: Option<InImage>,
}

#[derive(Debug, Deserialize)]
struct InImage {
    url: String,
    #[serde(default)]
    detail: Option<portcullis::ImageDetail>,
}

#[derive(Debug, Deserialize)]
struct InToolCall {
    id: String,
    function: InFunctionCall,
}

#[derive(Debug, Deserialize)]
struct InFunctionCall {
    name: String,
    #[serde(default)]
    arguments: String,
}

#[derive(Debug, Deserialize)]
struct InTool {
    #[serde(rename = "type")]
    kind: String,
    function: InFunction,
}

#[derive(Debug, Deserialize)]
struct InFunction {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<Value>,
    #[serde(default)]
    strict: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum InToolChoice {
    Mode(String),
    Named { function: InNamed },
}

#[derive(Debug, Deserialize)]
struct InNamed {
    name: String,
}

fn invalid(message: impl Into<String>) -> LlmError {
    LlmError::new(ErrorKind::InvalidRequest, message.into())
}

impl InContent {
    /// The parts of a message's content.
    fn parts(self) -> Result<Vec<Part>, LlmError> {
        match self {
            InContent::Text(t) => Ok(vec![Part::text(t)]),
            InContent::Parts(parts) => parts.into_iter().map(InPart::into_part).collect(),
        }
    }

    /// The text of a content that may only be text (a system or tool message).
    fn text(self) -> Result<String, LlmError> {
        let mut text = String::new();
        for part in self.parts()? {
            match part.as_text() {
                Some(t) => text.push_str(t),
                None => return Err(invalid("this message's content may only be text")),
            }
        }
        Ok(text)
    }
}

impl InPart {
    fn into_part(self) -> Result<Part, LlmError> {
        match (self.kind.as_str(), self.text, self.image_url) {
            ("text", Some(text), _) => Ok(Part::text(text)),
            ("image_url", _, Some(image)) => Ok(Part::Image {
                source: MediaSource::Url { url: image.url },
                detail: image.detail,
                cache_control: None,
            }),
            (kind, _, _) => Err(invalid(format!(
                "unsupported content part type `{kind}` (this gateway takes `text` and `image_url`)"
            ))),
        }
    }
}

impl InMessage {
    fn into_message(self) -> Result<ChatMessage, LlmError> {
        let content = self.content;
        match self.role.as_str() {
            "system" | "developer" => Ok(ChatMessage::system(
                content
                    .map(InContent::text)
                    .transpose()?
                    .unwrap_or_default(),
            )),
            "user" => match content {
                Some(c) => Ok(ChatMessage::user_parts(c.parts()?)),
                None => Err(invalid("a user message needs `content`")),
            },
            "assistant" => {
                let mut parts = match content {
                    Some(c) => c.parts()?,
                    None => Vec::new(),
                };
                for call in self.tool_calls.unwrap_or_default() {
                    parts.push(Part::ToolCall(ToolCall::new(
                        call.id,
                        call.function.name,
                        call.function.arguments,
                    )));
                }
                Ok(ChatMessage::assistant_parts(parts))
            }
            "tool" => {
                let id = self
                    .tool_call_id
                    .ok_or_else(|| invalid("a tool message needs `tool_call_id`"))?;
                let text = content
                    .map(InContent::text)
                    .transpose()?
                    .unwrap_or_default();
                Ok(ChatMessage::tool_result(id, text))
            }
            other => Err(invalid(format!("unknown message role `{other}`"))),
        }
    }
}

impl ChatCompletionRequest {
    fn into_chat_request(self) -> Result<ChatRequest, LlmError> {
        if self.messages.is_empty() {
            return Err(invalid("`messages` must not be empty"));
        }
        let messages = self
            .messages
            .into_iter()
            .map(InMessage::into_message)
            .collect::<Result<Vec<_>, _>>()?;
        let mut req = ChatRequest::new(&self.model, messages);
        if let Some(n) = self.max_completion_tokens.or(self.max_tokens) {
            req = req.max_tokens(n);
        }
        if let Some(t) = self.temperature {
            req = req.temperature(t);
        }
        match self.stop {
            Some(Stop::One(s)) => req = req.stop_sequences([s]),
            Some(Stop::Many(v)) => req = req.stop_sequences(v),
            None => {}
        }
        match self.response_format {
            None => {}
            Some(f) => match (f.kind.as_str(), f.json_schema) {
                ("text", _) => {}
                ("json_object", _) => req = req.response_format(ResponseFormat::JsonObject),
                ("json_schema", Some(s)) => {
                    let schema = s.schema.unwrap_or_else(|| json!({"type": "object"}));
                    req = req.response_format(ResponseFormat::JsonSchema {
                        name: s.name.into(),
                        schema: Arc::new(schema),
                        strict: s.strict.unwrap_or(false),
                    });
                }
                _ => return Err(invalid("unsupported `response_format`")),
            },
        }
        if let Some(tools) = self.tools {
            let tools = tools
                .into_iter()
                .map(|t| {
                    if t.kind != "function" {
                        return Err(invalid(format!("unsupported tool type `{}`", t.kind)));
                    }
                    let f = t.function;
                    let params = f.parameters.unwrap_or_else(|| json!({"type": "object"}));
                    Tool::new(f.name, f.description.unwrap_or_default(), params)
                        .map(|tool| tool.strict(f.strict.unwrap_or(false)))
                        .map_err(|e| invalid(e.to_string()))
                })
                .collect::<Result<Vec<_>, _>>()?;
            req = req.tools(tools);
        }
        match self.tool_choice {
            None => {}
            Some(InToolChoice::Mode(m)) => {
                req = req.tool_choice(match m.as_str() {
                    "auto" => ToolChoice::Auto,
                    "none" => ToolChoice::None,
                    "required" => ToolChoice::Required,
                    other => return Err(invalid(format!("unknown `tool_choice` `{other}`"))),
                })
            }
            Some(InToolChoice::Named { function }) => {
                req = req.tool_choice(ToolChoice::Tool(function.name))
            }
        }
        if let Some(p) = self.parallel_tool_calls {
            req = req.parallel_tool_calls(p);
        }
        if let Some(e) = self.reasoning_effort {
            req = req.reasoning(portcullis::Reasoning::effort(e));
        }
        Ok(req)
    }
}

/// What the gateway lets in. [`Default`] is the safe configuration the module docs describe.
#[derive(Debug, Clone)]
pub struct GatewayLimits {
    /// The largest request body, in bytes.
    pub body_bytes: usize,
    /// Requests in flight at once, a stream counting until its last byte; more are shed.
    pub in_flight: usize,
    /// The models a client may ask for.
    pub models: BTreeSet<String>,
}

impl Default for GatewayLimits {
    fn default() -> Self {
        GatewayLimits {
            body_bytes: 1 << 20,
            in_flight: 256,
            models: [MODEL.to_owned()].into(),
        }
    }
}

/// How long a graceful shutdown lets in-flight requests and streams finish.
pub const DRAIN: Duration = Duration::from_secs(30);

/// The handler's state.
#[derive(Clone)]
struct Gateway {
    stack: Stack,
    models: Arc<BTreeSet<String>>,
}

/// `POST /v1/chat/completions`.
async fn chat_completions(
    State(gw): State<Gateway>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        // Over the body limit (or unreadable): OpenAI's shape, with the rejection's status.
        Err(rejection) => {
            let kind = match rejection.status() {
                StatusCode::PAYLOAD_TOO_LARGE => ErrorKind::RequestTooLarge,
                _ => ErrorKind::InvalidRequest,
            };
            return error_response(&LlmError::new(kind, rejection.body_text()));
        }
    };
    let parsed: ChatCompletionRequest = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return error_response(&LlmError::new(
                ErrorKind::InvalidRequest,
                format!("invalid body: {e}"),
            ));
        }
    };
    if !gw.models.contains(&parsed.model) {
        let e = LlmError::new(
            ErrorKind::NotFound,
            format!("the model `{}` is not served here", parsed.model),
        );
        return error_response(&e);
    }
    let stack = gw.stack;
    let streaming = parsed.stream;
    let req = match parsed.into_chat_request() {
        Ok(r) => r,
        Err(e) => return error_response(&e),
    };
    let id = format!("chatcmpl-gw{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
    if streaming {
        // Resolves at the first content chunk: failures before it were retried or failed over,
        // and one that still fails can get a real HTTP status.
        match stack.streams().oneshot(req).await {
            Ok(s) => sse_response(id, s),
            Err(e) => error_response(&e),
        }
    } else {
        match stack.completions().oneshot(req).await {
            Ok(res) => completion_response(id, res),
            Err(e) => error_response(&e),
        }
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn created() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn completion_response(id: String, res: CompletionResult) -> Response {
    // OpenAI's shape: a refusal is its own field; tool calls leave `content` null.
    let refusal = res.finish_reason == portcullis::FinishReason::Refusal;
    let mut message = json!({"role": "assistant", "content": Value::Null});
    match (refusal, res.content.is_empty()) {
        (true, _) => message["refusal"] = json!(res.content),
        (false, false) => message["content"] = json!(res.content),
        (false, true) if res.tool_calls.is_empty() => message["content"] = json!(""),
        _ => {}
    }
    if !res.tool_calls.is_empty() {
        message["tool_calls"] = res
            .tool_calls
            .iter()
            .map(|c| {
                json!({"id": c.id, "type": "function",
                       "function": {"name": c.name, "arguments": c.arguments}})
            })
            .collect();
    }
    let finish = if refusal {
        "stop"
    } else {
        res.finish_reason.as_str()
    };
    let body = json!({
        "id": id,
        "object": "chat.completion",
        "created": created(),
        "model": res.model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        "usage": usage_json(res.usage),
    });
    let mut r = axum::Json(body).into_response();
    set_provider(&mut r, &res.provider);
    r
}

/// The stream as OpenAI's `chat.completion.chunk` events, a usage chunk, and `[DONE]`; an
/// error after the first chunk becomes an `{"error": …}` event and ends the stream.
fn sse_response(id: String, stream: ChatStream) -> Response {
    let meta = stream.meta().clone();
    let (model, created) = (meta.model.clone(), created());
    let chunk = move |delta: Value, finish: Option<&str>| {
        json!({
            "id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        })
    };
    let first = chunk(json!({"role": "assistant", "content": ""}), None);
    let events = stream
        .map(Some)
        .chain(stream::iter([None]))
        .scan(false, move |done, item| {
            if *done {
                return std::future::ready(None);
            }
            let data: Vec<Value> = match item {
                Some(Ok(StreamChunk {
                    delta,
                    tool_calls,
                    finish_reason,
                    usage,
                    ..
                })) => {
                    let mut out = Vec::new();
                    if !delta.is_empty() {
                        out.push(chunk(json!({ "content": delta }), None));
                    }
                    if !tool_calls.is_empty() {
                        let calls: Vec<Value> = tool_calls
                            .into_iter()
                            .map(|d| {
                                let mut c = json!({"index": d.index,
                                                   "function": {"arguments": d.arguments}});
                                if let Some(id) = d.id {
                                    c["id"] = json!(id);
                                    c["type"] = json!("function");
                                }
                                if let Some(name) = d.name {
                                    c["function"]["name"] = json!(name);
                                }
                                c
                            })
                            .collect();
                        out.push(chunk(json!({ "tool_calls": calls }), None));
                    }
                    if let Some(r) = finish_reason {
                        out.push(chunk(json!({}), Some(r.as_str())));
                    }
                    if let Some(u) = usage {
                        let mut c = chunk(json!({}), None);
                        c["choices"] = json!([]);
                        c["usage"] = usage_json(u);
                        out.push(c);
                    }
                    out
                }
                Some(Err(e)) => {
                    *done = true;
                    vec![error_body(&e)]
                }
                None => {
                    *done = true;
                    vec![Value::String("[DONE]".into())]
                }
            };
            let events: Vec<Result<Event, Infallible>> = data
                .into_iter()
                .map(|v| {
                    Ok(match v {
                        Value::String(s) => Event::default().data(s),
                        v => Event::default().data(v.to_string()),
                    })
                })
                .collect();
            std::future::ready(Some(stream::iter(events)))
        })
        .flatten();
    let first = stream::iter([Ok(Event::default().data(first.to_string()))]);
    let mut r = Sse::new(first.chain(events)).into_response();
    set_provider(&mut r, &meta.provider);
    r
}

fn usage_json(u: portcullis::Usage) -> Value {
    json!({
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.total_tokens,
    })
}

fn set_provider(r: &mut Response, provider: &str) {
    if let Ok(v) = HeaderValue::from_str(provider) {
        r.headers_mut().insert("x-portcullis-provider", v);
    }
}

/// The HTTP status a gateway answers for an error of the stack.
fn status_of(kind: ErrorKind) -> StatusCode {
    use ErrorKind::*;
    match kind {
        InvalidRequest | ContextLengthExceeded => StatusCode::BAD_REQUEST,
        // The upstream refused the gateway's own key: say so, as the seed's callers expect.
        // (A gateway that hides its upstream keys may prefer a 502 here.)
        Authentication => StatusCode::UNAUTHORIZED,
        PermissionDenied => StatusCode::FORBIDDEN,
        NotFound => StatusCode::NOT_FOUND,
        RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        RateLimited | QuotaExhausted => StatusCode::TOO_MANY_REQUESTS,
        // Every upstream was refused locally (breakers open, buckets empty), or is overloaded.
        CircuitOpen | Throttled | Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        Timeout | DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Server | Connect | Protocol | StreamInterrupted | ResponseTooLarge => {
            StatusCode::BAD_GATEWAY
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// OpenAI's error shape. `type` and `code` are chosen so that an OpenAI client maps the
/// answer back to the same kind (`insufficient_quota`, `context_length_exceeded`).
fn error_body(e: &LlmError) -> Value {
    let kind = e.kind();
    let error_type = match kind {
        ErrorKind::QuotaExhausted => "insufficient_quota",
        ErrorKind::RateLimited => "rate_limit_exceeded",
        ErrorKind::Authentication => "authentication_error",
        ErrorKind::PermissionDenied => "permission_error",
        ErrorKind::NotFound => "not_found_error",
        k if status_of(k).is_client_error() => "invalid_request_error",
        _ => "server_error",
    };
    let code = match kind {
        ErrorKind::NotFound => "model_not_found",
        k => k.as_str(),
    };
    json!({"error": {
        "message": e.to_string(),
        "type": error_type,
        "param": null,
        "code": code,
    }})
}

fn error_response(e: &LlmError) -> Response {
    let mut r = (status_of(e.kind()), axum::Json(error_body(e))).into_response();
    if let Some(after) = e.retry_after() {
        // Whole seconds, rounded up, at least 1.
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    if let Some(p) = e.provider() {
        set_provider(&mut r, p);
    }
    r
}

/// The gateway: one route over the stack, behind the [`GatewayLimits`].
fn app(stack: Stack, limits: GatewayLimits) -> Router {
    let permits = Arc::new(Semaphore::new(limits.in_flight));
    let gw = Gateway {
        stack,
        models: Arc::new(limits.models),
    };
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/metrics", axum::routing::get(metrics))
        .with_state(gw)
        .layer(DefaultBodyLimit::max(limits.body_bytes))
        .layer(axum::middleware::from_fn_with_state(permits, shed))
}

/// The Prometheus recorder, installed once at start (with the `metrics` feature).
static PROMETHEUS: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
    std::sync::OnceLock::new();

/// Installs the Prometheus recorder, before the stack is built (built with `--features
/// metrics`; without it the layers record nothing and `/metrics` says how to turn it on).
fn install_prometheus() {
    if !portcullis::layers::telemetry::ENABLED {
        return;
    }
    match metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder() {
        Ok(handle) => {
            let _ = PROMETHEUS.set(handle);
        }
        Err(e) => eprintln!("# metrics: no Prometheus recorder: {e}"),
    }
}

/// `GET /metrics`: every metric of the stack in the Prometheus text format.
async fn metrics() -> Response {
    match PROMETHEUS.get() {
        Some(h) => (
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            h.render(),
        )
            .into_response(),
        None => (
            StatusCode::NOT_FOUND,
            "metrics are off: cargo run --example axum_gateway --features metrics\n",
        )
            .into_response(),
    }
}

/// Admits a request if a permit is free, else answers 503 at once. The permit lives in the
/// response body, so a stream holds it until its last byte (or until the client goes away).
async fn shed(State(permits): State<Arc<Semaphore>>, req: Request, next: Next) -> Response {
    let Ok(permit) = permits.try_acquire_owned() else {
        let e = LlmError::new(
            ErrorKind::Overloaded,
            "the gateway is at its limit of requests in flight; retry shortly",
        );
        let mut r = error_response(&e);
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        r.headers_mut()
            .insert("x-should-retry", HeaderValue::from_static("true"));
        return r;
    };
    let (parts, body) = next.run(req).await.into_parts();
    let body = body.into_data_stream().inspect(move |_| {
        let _held = &permit;
    });
    Response::from_parts(parts, Body::from_stream(body))
}

/// The command line: `[--serve [ADDR]] [--upstream URL] [--model NAME]...`.
#[derive(Debug, Default)]
struct Args {
    serve: Option<String>,
    upstream: Option<String>,
    models: BTreeSet<String>,
}

impl Args {
    fn parse(args: impl Iterator<Item = String>) -> Result<Args, String> {
        let usage = "usage: axum_gateway [--serve [ADDR]] [--upstream URL] [--model NAME]...";
        let mut out = Args::default();
        let mut args = args.peekable();
        while let Some(a) = args.next() {
            match a.as_str() {
                "--serve" => {
                    let addr = args.next_if(|n| !n.starts_with("--"));
                    out.serve = Some(addr.unwrap_or_else(|| "127.0.0.1:3000".into()));
                }
                "--upstream" => {
                    let url = args
                        .next()
                        .ok_or(format!("--upstream needs a URL\n{usage}"))?;
                    out.upstream = Some(url);
                }
                "--model" => {
                    let m = args
                        .next()
                        .ok_or(format!("--model needs a name\n{usage}"))?;
                    out.models.insert(m);
                }
                other => return Err(format!("unknown argument {other:?}\n{usage}")),
            }
        }
        if out.upstream.is_some() && out.serve.is_none() {
            return Err(format!(
                "--upstream serves real traffic: add --serve\n{usage}"
            ));
        }
        if out.upstream.is_some() && out.models.is_empty() {
            return Err(format!(
                "--upstream: name the models the gateway lets through with --model\n{usage}"
            ));
        }
        Ok(out)
    }
}

/// The provider for `--upstream URL`: OpenAI itself (`api.openai.com`, key from
/// `OPENAI_API_KEY`), or any OpenAI-compatible server (the legacy `max_tokens` they all know;
/// a key from `OPENAI_API_KEY` when set, else none).
fn upstream_provider(url: &str) -> Result<OpenAiProvider, Box<dyn std::error::Error>> {
    let key = std::env::var("OPENAI_API_KEY").ok();
    let builder = if url.contains("://api.openai.com") {
        OpenAiProvider::builder().base_url(url)
    } else {
        OpenAiProvider::compatible(url)
    };
    let builder = match key {
        Some(k) => builder.api_key(ApiKey::new(k)?),
        None => builder,
    };
    Ok(builder.build()?)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Args {
        serve,
        upstream,
        models,
    } = Args::parse(std::env::args().skip(1))?;

    install_prometheus();
    let mut limits = GatewayLimits::default();
    let (stack, backend) = match &upstream {
        // Any OpenAI-compatible host: vLLM, Ollama, LM Studio, or OpenAI itself with a key.
        Some(url) => {
            let provider = upstream_provider(url)?;
            let stack = Stack::builder()
                .provider(ProviderStack::openai(provider))
                .deadline(Duration::from_secs(60))
                .build()?;
            (stack, None)
        }
        None => {
            let backend = common::backend(Simulator::builder().seed(5)).await?;
            let stack = backend.stack().deadline(Duration::from_secs(60)).build()?;
            (stack, Some(backend))
        }
    };
    if !models.is_empty() {
        limits.models = models;
    }

    let addr: SocketAddr = serve.as_deref().unwrap_or("127.0.0.1:0").parse()?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        axum::serve(listener, app(stack.clone(), limits.clone()))
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .into_future(),
    );
    println!("# gateway listening on http://{addr}/v1/chat/completions (metrics: GET /metrics)");

    if serve.is_some() {
        if let Some(url) = &upstream {
            println!("# upstream: {url} (models: {:?})", limits.models);
        }
        let model = limits.models.iter().next().map_or(MODEL, String::as_str);
        println!(
            "# try: curl -s http://{addr}/v1/chat/completions -H 'content-type: application/json' \\\n\
             #        -d '{{\"model\": \"{model}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hi\"}}]}}'"
        );
        println!("# Ctrl-C to stop");
        tokio::signal::ctrl_c().await?;
    } else {
        let sim = backend.as_ref().and_then(|b| b.sim.as_ref());
        demo(&stack, addr, sim).await?;
        if let Some(h) = PROMETHEUS.get() {
            let text = h.render();
            println!(
                "# GET /metrics: {} series, e.g.:",
                text.lines().filter(|l| !l.starts_with('#')).count()
            );
            for line in text
                .lines()
                .filter(|l| l.starts_with("gen_ai_client_operation_duration_count"))
            {
                println!("#   {line}");
            }
        }
    }
    let _ = stop.send(());
    drain(server, DRAIN).await?;
    Ok(())
}

/// Waits for a server told to shut down gracefully: in-flight requests and streams finish, for
/// at most `limit`; then it is stopped regardless.
async fn drain(
    mut server: tokio::task::JoinHandle<std::io::Result<()>>,
    limit: Duration,
) -> Result<(), Box<dyn std::error::Error>> {
    match tokio::time::timeout(limit, &mut server).await {
        Ok(done) => {
            done??;
            println!("# gateway stopped");
        }
        Err(_) => {
            server.abort();
            println!("# gateway stopped after {limit:?}: streams still open were cut");
        }
    }
    Ok(())
}

/// Talks to the gateway as any OpenAI client would: here, Portcullis' own OpenAI provider.
async fn demo(
    stack: &Stack,
    addr: SocketAddr,
    sim: Option<&portcullis_sim::SimHandle>,
) -> Result<(), Box<dyn std::error::Error>> {
    let client = OpenAiProvider::builder()
        .base_url(format!("http://{addr}/v1"))
        .api_key(ApiKey::new("sk-gateway-client")?)
        .build()?;
    let req = |text: &str| ChatRequest::new(MODEL, vec![ChatMessage::user(text)]).max_tokens(24);

    println!("\n## 1. a completion through the gateway");
    let res = client.clone().oneshot(req("What is a portcullis?")).await?;
    println!(
        "   model {} | {} tokens | {}",
        res.model, res.usage.total_tokens, res.content
    );

    println!("\n## 2. a stream through the gateway (SSE)");
    let mut s = client
        .streaming()
        .oneshot(req("Describe a castle gate."))
        .await?;
    print!("   > ");
    while let Some(chunk) = s.next().await {
        print!("{}", chunk?.delta);
    }
    println!("\n   usage {:?}", s.usage().map(|u| u.total_tokens));

    if let Some(sim) = sim {
        println!("\n## 3. OpenAI is down upstream: the gateway's callers do not notice");
        sim.set_faults(vec![FaultRule::status(503).family(Family::Openai)])?;
        let res = client.clone().oneshot(req("Still there?")).await?;
        println!(
            "   model {} (served by the secondary) | {}",
            res.model, res.content
        );

        println!("\n## 4. OpenAI fails in the middle of a stream: the error reaches the client");
        sim.set_faults(vec![
            FaultRule::new(FaultKind::ErrorAfterContent).family(Family::Openai),
        ])?;
        let mut s = client.streaming().oneshot(req("Go on.")).await?;
        print!("   > ");
        while let Some(item) = s.next().await {
            match item {
                Ok(chunk) => print!("{}", chunk.delta),
                Err(e) => println!("\n   stream ended: {} ({})", e.kind(), e.message()),
            }
        }
        sim.clear_faults();
    }

    println!("\n## 5. errors keep their meaning through the gateway");
    let empty = ChatRequest::new(MODEL, Vec::<ChatMessage>::new());
    let e = client.clone().oneshot(empty).await.unwrap_err();
    println!("   empty messages  -> HTTP {:?} {}", e.status(), e.kind());
    let unknown = ChatRequest::new("gpt-unknown", vec![ChatMessage::user("Hi")]);
    let e = client.clone().oneshot(unknown).await.unwrap_err();
    println!(
        "   a model not served -> HTTP {:?} {}",
        e.status(),
        e.kind()
    );
    let huge = ChatRequest::new(MODEL, vec![ChatMessage::user("x".repeat(2 << 20))]);
    let e = client.clone().oneshot(huge).await.unwrap_err();
    println!("   a 2 MiB body     -> HTTP {:?} {}", e.status(), e.kind());
    // Every breaker open (each keyed by the model its provider is asked for).
    for (h, model) in stack.handles().iter().zip([MODEL, SECONDARY_MODEL]) {
        h.breaker.force_open(model);
    }
    let e = client.clone().oneshot(req("Anyone?")).await.unwrap_err();
    println!(
        "   all breakers open -> HTTP {:?} {}, retry-after {:?}",
        e.status(),
        e.kind(),
        e.retry_after()
    );
    for (h, model) in stack.handles().iter().zip([MODEL, SECONDARY_MODEL]) {
        h.breaker.reset(model);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::Request;
    use http_body_util::BodyExt;

    async fn gateway(limits: GatewayLimits) -> (Router, portcullis_sim::SimHandle) {
        let sim = Simulator::builder().seed(9).start().await.unwrap();
        (app(stack_over(&sim), limits), sim)
    }

    /// The default stack over the simulator's OpenAI API.
    fn stack_over(sim: &portcullis_sim::SimHandle) -> Stack {
        let openai = OpenAiProvider::builder()
            .base_url(sim.openai_base_url())
            .api_key(ApiKey::new("sk-test").unwrap())
            .build()
            .unwrap();
        Stack::builder()
            .provider(ProviderStack::openai(openai))
            .build()
            .unwrap()
    }

    fn post(body: impl Into<Body>) -> Request<Body> {
        Request::post("/v1/chat/completions")
            .header(header::CONTENT_TYPE, "application/json")
            .body(body.into())
            .unwrap()
    }

    fn chat(model: &str, stream: bool) -> String {
        json!({"model": model, "stream": stream, "max_tokens": 8,
               "messages": [{"role": "user", "content": "Hi"}]})
        .to_string()
    }

    async fn error_code(res: Response) -> (StatusCode, String) {
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let v: Value = serde_json::from_slice(&body).unwrap();
        (status, v["error"]["code"].as_str().unwrap().to_owned())
    }

    async fn body_json(res: Response) -> (StatusCode, Value) {
        let status = res.status();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    fn weather_tool() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                           "required": ["city"]}}}])
    }

    /// What the official SDKs send: content as a list of parts, tools with
    /// `tool_choice: "required"`; the answer carries the tool call, and its result goes back.
    #[tokio::test]
    async fn parts_tools_and_tool_results_go_through() {
        let (app, _sim) = gateway(GatewayLimits::default()).await;
        let ask = json!({"model": MODEL, "max_tokens": 50, "tools": weather_tool(),
            "tool_choice": "required",
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "What is the weather in Paris?"}]}]});
        let res = app.clone().oneshot(post(ask.to_string())).await.unwrap();
        let (status, v) = body_json(res).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let choice = &v["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
        let call = &choice["message"]["tool_calls"][0];
        assert_eq!(call["type"], "function");
        assert_eq!(call["function"]["name"], "get_weather");
        assert!(choice["message"]["content"].is_null(), "{v}");
        // The tool's result, as the SDK sends it back.
        let answer = json!({"model": MODEL, "max_tokens": 50, "tools": weather_tool(),
            "messages": [
                {"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": null, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": call["id"], "content": "Sunny, 21 C"}]});
        let res = app.clone().oneshot(post(answer.to_string())).await.unwrap();
        let (status, v) = body_json(res).await;
        assert_eq!(status, StatusCode::OK, "{v}");
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        assert!(text.contains("Sunny"), "{v}");
        // A streamed tool call arrives as `tool_calls` deltas.
        let mut streamed = ask.clone();
        streamed["stream"] = json!(true);
        let res = app
            .clone()
            .oneshot(post(streamed.to_string()))
            .await
            .unwrap();
        let body = res.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("\"tool_calls\""), "{text}");
        assert!(text.contains("\"get_weather\""), "{text}");
        assert!(text.contains("\"finish_reason\":\"tool_calls\""), "{text}");
        // What cannot be carried is a 400, never dropped.
        let audio = json!({"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]}]});
        let res = app.oneshot(post(audio.to_string())).await.unwrap();
        let (status, v) = body_json(res).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(
            v["error"]["message"]
                .as_str()
                .unwrap()
                .contains("input_audio"),
            "{v}"
        );
    }

    /// Past the upstream's own limits (the simulator's 429s, 5 requests a minute here), a
    /// client sees 200s while there is room, then 429s with `Retry-After` (the upstream's
    /// refusal, its wait longer than the stack retries for) or 503s with `Retry-After` (the
    /// stack's own refusal: the bucket, paused by those 429s, will not wait that long); each
    /// in OpenAI's error shape, which the SDKs retry after that wait. Never a 500.
    #[tokio::test(start_paused = true)]
    async fn under_the_upstreams_429s_clients_get_429_or_503_with_retry_after() {
        use portcullis_sim::{Limits, OpenAiLimits};
        let sim = Simulator::builder()
            .limits(Limits {
                openai: OpenAiLimits {
                    rpm: 5,
                    tpm: 1_000_000,
                },
                ..Limits::default()
            })
            .start()
            .await
            .unwrap();
        let app = app(stack_over(&sim), GatewayLimits::default());
        let calls = (0..20).map(|_| {
            let app = app.clone();
            async move { app.oneshot(post(chat(MODEL, false))).await.unwrap() }
        });
        let mut seen = std::collections::BTreeMap::new();
        for res in futures_util::future::join_all(calls).await {
            let status = res.status();
            *seen.entry(status.as_u16()).or_insert(0) += 1;
            if status == StatusCode::OK {
                continue;
            }
            assert!(
                status == StatusCode::TOO_MANY_REQUESTS
                    || status == StatusCode::SERVICE_UNAVAILABLE,
                "{status}"
            );
            let after: u64 = res.headers()[header::RETRY_AFTER]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=60).contains(&after), "Retry-After {after}");
            let (_, code) = error_code(res).await;
            assert!(
                ["rate_limited", "throttled", "circuit_open"].contains(&code.as_str()),
                "{code}"
            );
        }
        // The 5 of the first minute, and those whose retry waited (in paused time) for the
        // window to refill; the rest refused with a wait.
        let ok = seen.get(&200).copied().unwrap_or(0);
        assert!((5..20).contains(&ok), "{seen:?}");
        assert_eq!(seen.values().sum::<u32>(), 20, "{seen:?}");
    }

    #[test]
    fn the_command_line() {
        let parse = |a: &[&str]| Args::parse(a.iter().map(|s| s.to_string()));
        let a = parse(&["--serve"]).unwrap();
        assert_eq!(a.serve.as_deref(), Some("127.0.0.1:3000"));
        assert!(a.upstream.is_none());
        let a = parse(&[
            "--serve",
            "--upstream",
            "http://localhost:8000/v1",
            "--model",
            "llama",
        ])
        .unwrap();
        assert_eq!(a.serve.as_deref(), Some("127.0.0.1:3000"));
        assert_eq!(a.upstream.as_deref(), Some("http://localhost:8000/v1"));
        assert_eq!(a.models, ["llama".to_owned()].into());
        let a = parse(&["--serve", "0.0.0.0:80", "--upstream", "u", "--model", "m"]).unwrap();
        assert_eq!(a.serve.as_deref(), Some("0.0.0.0:80"));
        // Real traffic needs --serve and an explicit model allowlist.
        assert!(parse(&["--upstream", "u", "--model", "m"]).is_err());
        assert!(parse(&["--serve", "--upstream", "u"]).is_err());
        assert!(parse(&["--upstream"]).is_err());
        assert!(parse(&["--bogus"]).is_err());
    }

    /// `--upstream` to an OpenAI-compatible host (the simulator stands in for vLLM): the key
    /// is `OPENAI_API_KEY` when set, else none, and the simulator, like OpenAI, wants one.
    #[tokio::test]
    async fn an_upstream_url_serves_through_any_openai_compatible_host() {
        let sim = Simulator::builder().seed(9).start().await.unwrap();
        let provider = upstream_provider(&sim.openai_base_url()).unwrap();
        let stack = Stack::builder()
            .provider(ProviderStack::openai(provider))
            .build()
            .unwrap();
        let res = app(stack, GatewayLimits::default())
            .oneshot(post(chat(MODEL, false)))
            .await
            .unwrap();
        if std::env::var_os("OPENAI_API_KEY").is_some() {
            assert_eq!(res.status(), StatusCode::OK);
        } else {
            // The upstream refused the gateway's (missing) key: a 401 the caller can read.
            assert_eq!(error_code(res).await.0, StatusCode::UNAUTHORIZED);
        }
        assert_eq!(sim.stats().requests, 1, "the call went to the upstream URL");
    }

    #[tokio::test]
    async fn a_body_over_the_limit_is_a_413_in_openais_shape() {
        let (app, _sim) = gateway(GatewayLimits::default()).await;
        let res = app.oneshot(post(vec![b' '; (1 << 20) + 1])).await.unwrap();
        let (status, code) = error_code(res).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::PAYLOAD_TOO_LARGE, "request_too_large")
        );
    }

    #[tokio::test]
    async fn a_model_off_the_allowlist_is_a_404_and_never_reaches_the_layers() {
        let (app, sim) = gateway(GatewayLimits::default()).await;
        let res = app
            .clone()
            .oneshot(post(chat("gpt-anything", false)))
            .await
            .unwrap();
        let (status, code) = error_code(res).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::NOT_FOUND, "model_not_found")
        );
        assert_eq!(sim.stats().requests, 0);
        let res = app.oneshot(post(chat(MODEL, false))).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn beyond_the_limit_in_flight_requests_are_shed_and_a_stream_holds_its_permit() {
        let limits = GatewayLimits {
            in_flight: 1,
            ..GatewayLimits::default()
        };
        let (app, _sim) = gateway(limits).await;
        // A stream whose body is not read yet holds the only permit.
        let stream = app.clone().oneshot(post(chat(MODEL, true))).await.unwrap();
        assert_eq!(stream.status(), StatusCode::OK);
        let res = app.clone().oneshot(post(chat(MODEL, false))).await.unwrap();
        assert_eq!(res.headers()[header::RETRY_AFTER], "1");
        assert_eq!(res.headers()["x-should-retry"], "true");
        let (status, code) = error_code(res).await;
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::SERVICE_UNAVAILABLE, "overloaded")
        );
        // Read to its end, the stream gives the permit back.
        stream.into_body().collect().await.unwrap();
        let res = app.oneshot(post(chat(MODEL, false))).await.unwrap();
        assert_eq!(res.status(), StatusCode::OK);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_waits_for_in_flight_work_at_most_the_drain_limit() {
        let forever = tokio::spawn(async {
            std::future::pending::<()>().await;
            Ok(())
        });
        let t0 = tokio::time::Instant::now();
        drain(forever, DRAIN).await.unwrap();
        assert_eq!(t0.elapsed(), DRAIN);
        let quick = tokio::spawn(async { Ok(()) });
        drain(quick, DRAIN).await.unwrap();
    }
}
