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
//! ```
//!
//! The demo talks to the gateway with Portcullis' own [`OpenAiProvider`] pointed at it (any
//! OpenAI SDK works the same with `base_url = "http://127.0.0.1:3000/v1"`). Upstream is the
//! embedded simulator, or the real APIs when both `OPENAI_API_KEY` and `ANTHROPIC_API_KEY` are
//! set (the fault steps, which need the simulator, are then skipped).
//! `PORTCULLIS_EXAMPLES_SIM=1` keeps the simulator even when the keys are set.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures_util::{StreamExt, stream};
use portcullis::providers::{ApiKey, OpenAiProvider};
use portcullis::{
    ChatMessage, ChatRequest, ChatStream, CompletionResult, ErrorKind, LlmError, ResponseFormat,
    Stack, StreamChunk,
};
use portcullis_sim::{Family, FaultKind, FaultRule, Simulator};
use serde::Deserialize;
use serde_json::{Value, json};
use tower::ServiceExt;

use common::{MODEL, SECONDARY_MODEL};

/// The OpenAI request fields the gateway understands; others (`n`, `tools`, …) are ignored.
#[derive(Debug, Deserialize)]
struct ChatCompletionRequest {
    model: String,
    messages: Vec<ChatMessage>,
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
}

impl ChatCompletionRequest {
    fn into_chat_request(self) -> Result<ChatRequest, LlmError> {
        let invalid = |m: &'static str| LlmError::new(ErrorKind::InvalidRequest, m);
        if self.messages.is_empty() {
            return Err(invalid("`messages` must not be empty"));
        }
        let mut req = ChatRequest::new(&self.model, self.messages);
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
        match self.response_format.as_ref().map(|f| f.kind.as_str()) {
            None | Some("text") => {}
            Some("json_object") => req = req.response_format(ResponseFormat::JsonObject),
            Some(_) => return Err(invalid("unsupported `response_format.type`")),
        }
        Ok(req)
    }
}

/// `POST /v1/chat/completions`.
async fn chat_completions(State(stack): State<Stack>, body: Bytes) -> Response {
    let parsed: ChatCompletionRequest = match serde_json::from_slice(&body) {
        Ok(p) => p,
        Err(e) => {
            return error_response(&LlmError::new(
                ErrorKind::InvalidRequest,
                format!("invalid body: {e}"),
            ));
        }
    };
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
    let body = json!({
        "id": id,
        "object": "chat.completion",
        "created": created(),
        "model": res.model,
        "choices": [{
            "index": 0,
            "message": {"role": "assistant", "content": res.content},
            "finish_reason": res.finish_reason.as_str(),
        }],
        "usage": {
            "prompt_tokens": res.usage.input_tokens,
            "completion_tokens": res.usage.output_tokens,
            "total_tokens": res.usage.total_tokens,
        },
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
                    finish_reason,
                    usage,
                    ..
                })) => {
                    let mut out = Vec::new();
                    if !delta.is_empty() {
                        out.push(chunk(json!({ "content": delta }), None));
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
    json!({"error": {
        "message": e.to_string(),
        "type": error_type,
        "param": null,
        "code": kind.as_str(),
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

/// The gateway: one route over the stack.
fn app(stack: Stack) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .with_state(stack)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let serve = match args.next().as_deref() {
        None => None,
        Some("--serve") => Some(args.next().unwrap_or_else(|| "127.0.0.1:3000".into())),
        Some(other) => {
            return Err(format!("unknown argument {other:?} (try --serve [ADDR])").into());
        }
    };

    let backend = common::backend(Simulator::builder().seed(5)).await?;
    let stack = backend.stack().deadline(Duration::from_secs(60)).build()?;

    let addr: SocketAddr = serve.as_deref().unwrap_or("127.0.0.1:0").parse()?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(
        axum::serve(listener, app(stack.clone()))
            .with_graceful_shutdown(async {
                let _ = stopped.await;
            })
            .into_future(),
    );
    println!("# gateway listening on http://{addr}/v1/chat/completions");

    if serve.is_some() {
        println!(
            "# try: curl -s http://{addr}/v1/chat/completions -H 'content-type: application/json' \\\n\
             #        -d '{{\"model\": \"{MODEL}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hi\"}}]}}'"
        );
        println!("# Ctrl-C to stop");
        tokio::signal::ctrl_c().await?;
    } else {
        demo(&stack, addr, backend.sim.as_ref()).await?;
    }
    let _ = stop.send(());
    server.await??;
    println!("# gateway stopped");
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
