//! The whole call path, as a gateway's users pay for it: an HTTP request in, an upstream call,
//! an HTTP answer out. Three axum routes over the same simulator, side by side in one run:
//!
//! - **bare**: forwards the request bytes with a plain `hyper-util` client and streams the
//!   upstream's answer back untouched (no resilience at all);
//! - **stack**: parses the OpenAI body into a `ChatRequest`, calls [`portcullis::Stack`] with its
//!   defaults (OpenAI provider → the same simulator), and writes an OpenAI-shaped answer (JSON,
//!   or server-sent events for a stream);
//! - **http**: the same layers at the HTTP level ([`portcullis::http::HttpLayer`] with its
//!   defaults over the [`Transport`](portcullis::http::Transport)): the request and answer bytes
//!   forwarded untouched, the key and cost read from the body, the usage from the answer.
//!
//! A load generator in this process drives each route in short alternating rounds over keep-alive
//! HTTP/1 connections. Simulator, proxies and load generator share the process and its 2
//! runtime threads, so the CPU each request costs (`/proc/self/stat`, user + system) includes
//! the simulator and the client; the *difference* between the two routes is the cost of the
//! Stack path. Reported per route: CPU µs per request, closed-loop latency p50 / p99 and
//! throughput at 32 connections, and p99 at a fixed rate (5 000 completions/s, 500 streams/s);
//! for a short completion (20 tokens) and for a stream of 100 chunks.
//!
//! Run: `cargo bench --bench gateway` (about 90 s; `-- --quick` for a short pass).
#![allow(missing_docs)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures_util::StreamExt;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis::providers::{ApiKey, OpenAiProvider};
use portcullis::{ChatMessage, ChatRequest, LlmError, ProviderStack, Stack, StreamChunk};
use portcullis_sim::{Limits, OpenAiLimits, SimHandle, Simulator};
use serde::{Deserialize, Serialize};

const CONNECTIONS: usize = 32;
const FIXED_CONNECTIONS: usize = 64;
const STREAM_WORDS: u32 = 100;

// ---- the two routes --------------------------------------------------------------------------

/// The bare proxy: the request and the answer as bytes.
#[derive(Clone)]
struct Bare {
    client: Client<HttpConnector, Body>,
    upstream: String,
}

async fn bare(State(p): State<Bare>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let mut up = http::Request::post(format!("{}/chat/completions", p.upstream));
    for name in [header::CONTENT_TYPE, header::AUTHORIZATION] {
        if let Some(v) = parts.headers.get(&name) {
            up = up.header(name, v);
        }
    }
    let Ok(up) = up.body(body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    match p.client.request(up).await {
        Ok(res) => res.map(Body::new),
        Err(_) => StatusCode::BAD_GATEWAY.into_response(),
    }
}

/// The OpenAI body fields the Stack route reads.
#[derive(Deserialize)]
struct Incoming {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    stream: bool,
}

#[derive(Serialize)]
struct Completion<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: [Choice<'a>; 1],
    usage: UsageOut,
}

#[derive(Serialize)]
struct Choice<'a> {
    index: u32,
    message: Message<'a>,
    finish_reason: &'a str,
}

#[derive(Serialize)]
struct Message<'a> {
    role: &'static str,
    content: &'a str,
}

#[derive(Serialize)]
struct UsageOut {
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    choices: &'a [ChunkChoice<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<UsageOut>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    finish_reason: Option<&'a str>,
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
}

fn usage(u: &portcullis::Usage) -> UsageOut {
    UsageOut {
        prompt_tokens: u.input_tokens,
        completion_tokens: u.output_tokens,
        total_tokens: u.total_tokens,
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);
const CREATED: u64 = 1_764_806_400;

fn error(status: StatusCode, e: &LlmError) -> Response {
    let body = serde_json::json!({"error": {"message": e.to_string(), "type": e.kind().as_str()}});
    (status, axum::Json(body)).into_response()
}

/// The Stack route: parse, call the stack, answer in OpenAI's shape.
async fn through_stack(State(stack): State<Stack>, body: Bytes) -> Response {
    use tower::ServiceExt;
    let Ok(inc) = serde_json::from_slice::<Incoming>(&body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let mut req = ChatRequest::new(&inc.model, inc.messages);
    if let Some(n) = inc.max_completion_tokens.or(inc.max_tokens) {
        req = req.max_tokens(n);
    }
    let id = format!("chatcmpl-{}", NEXT_ID.fetch_add(1, Ordering::Relaxed));
    if !inc.stream {
        return match stack.completions().oneshot(req).await {
            Ok(res) => {
                let body = Completion {
                    id: &id,
                    object: "chat.completion",
                    created: CREATED,
                    model: &res.model,
                    choices: [Choice {
                        index: 0,
                        message: Message {
                            role: "assistant",
                            content: &res.content,
                        },
                        finish_reason: res.finish_reason.as_str(),
                    }],
                    usage: usage(&res.usage),
                };
                let json = serde_json::to_vec(&body).unwrap_or_default();
                ([(header::CONTENT_TYPE, "application/json")], json).into_response()
            }
            Err(e) => error(StatusCode::BAD_GATEWAY, &e),
        };
    }
    let stream = match stack.streams().oneshot(req).await {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_GATEWAY, &e),
    };
    let model = stream.meta().model.clone();
    let event = move |out: &mut Vec<u8>, item: Option<Result<StreamChunk, LlmError>>| {
        let mut write = |chunk: &Chunk<'_>| {
            out.extend_from_slice(b"data: ");
            let _ = serde_json::to_writer(&mut *out, chunk);
            out.extend_from_slice(b"\n\n");
        };
        let (id, model) = (id.as_str(), &*model);
        let mut chunk = |choices: &[ChunkChoice<'_>], usage| {
            let c = Chunk {
                id,
                object: "chat.completion.chunk",
                created: CREATED,
                model,
                choices,
                usage,
            };
            write(&c)
        };
        match item {
            Some(Ok(c)) => {
                if !c.delta.is_empty() || c.finish_reason.is_some() {
                    let choice = [ChunkChoice {
                        index: 0,
                        delta: Delta {
                            content: (!c.delta.is_empty()).then_some(c.delta.as_str()),
                        },
                        finish_reason: c.finish_reason.as_ref().map(|r| r.as_str()),
                    }];
                    chunk(&choice, None);
                }
                if let Some(u) = &c.usage {
                    chunk(&[], Some(usage(u)));
                }
            }
            Some(Err(e)) => {
                out.extend_from_slice(b"data: ");
                let err = serde_json::json!({"error": {"message": e.to_string()}});
                let _ = serde_json::to_writer(&mut *out, &err);
                out.extend_from_slice(b"\n\n");
            }
            None => out.extend_from_slice(b"data: [DONE]\n\n"),
        }
    };
    // The events already there go out in one frame (one write), not one write per chunk.
    let events = stream
        .map(Some)
        .chain(futures_util::stream::iter([None]))
        .ready_chunks(64)
        .map(move |items| {
            let mut frame = Vec::with_capacity(256 * items.len());
            for item in items {
                event(&mut frame, item);
            }
            Ok::<_, Infallible>(Bytes::from(frame))
        });
    (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(events),
    )
        .into_response()
}

/// The HTTP-level route: the same layers over the request and answer bytes
/// ([`portcullis::http::HttpLayer`] over the [`Transport`](portcullis::http::Transport)): no
/// `ChatRequest`, every byte forwarded as the upstream sent it, the usage read from the
/// answer as it passes to settle the bucket.
#[derive(Clone)]
struct Http {
    svc: portcullis::http::HttpStack<portcullis::http::Transport>,
    url: http::Uri,
}

async fn through_http(State(h): State<Http>, req: Request) -> Response {
    use tower::ServiceExt;
    let (parts, body) = req.into_parts();
    let Ok(body) = axum::body::to_bytes(body, 1 << 20).await else {
        return StatusCode::PAYLOAD_TOO_LARGE.into_response();
    };
    let mut up = http::Request::post(h.url.clone());
    for name in [header::CONTENT_TYPE, header::AUTHORIZATION] {
        if let Some(v) = parts.headers.get(&name) {
            up = up.header(name, v);
        }
    }
    let Ok(up) = up.body(body) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    match h.svc.oneshot(up).await {
        Ok(res) => res.into_inner().map(Body::new),
        Err(_) => StatusCode::SERVICE_UNAVAILABLE.into_response(),
    }
}

async fn serve(router: Router) -> SocketAddr {
    use axum::serve::ListenerExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // As any server of small writes (SSE events) must: no Nagle delay behind a delayed ACK.
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

/// The three routes' addresses.
#[derive(Clone, Copy)]
struct Routes {
    bare: SocketAddr,
    stack: SocketAddr,
    http: SocketAddr,
}

/// The simulator (limits far above any load; every text answer 100 words) and the three routes
/// in front of it.
async fn start() -> (SimHandle, Routes) {
    let sim = Simulator::builder()
        .limits(Limits {
            openai: OpenAiLimits {
                rpm: 1_000_000_000,
                tpm: 1_000_000_000_000,
            },
            ..Limits::default()
        })
        .answer_words(STREAM_WORDS)
        .start()
        .await
        .unwrap();
    let routes = routes(&sim).await;
    (sim, routes)
}

async fn routes(sim: &SimHandle) -> Routes {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client = Client::builder(TokioExecutor::new()).build(connector);
    let bare_route = Router::new()
        .route("/v1/chat/completions", post(bare))
        .with_state(Bare {
            client,
            upstream: sim.openai_base_url(),
        });
    let provider = OpenAiProvider::builder()
        .base_url(sim.openai_base_url())
        .api_key(ApiKey::new("sk-bench").unwrap())
        .build()
        .unwrap();
    let stack = Stack::builder()
        .provider(ProviderStack::openai(provider))
        .build()
        .unwrap();
    let stack_route = Router::new()
        .route("/v1/chat/completions", post(through_stack))
        .with_state(stack);
    let transport =
        portcullis::http::Transport::new(portcullis::http::TransportConfig::default()).unwrap();
    let layer = portcullis::http::HttpLayer::new("openai", portcullis::http::HttpConfig::default())
        .unwrap();
    let http_route = Router::new()
        .route("/v1/chat/completions", post(through_http))
        .with_state(Http {
            svc: tower::Layer::layer(&layer, transport),
            url: format!("{}/chat/completions", sim.openai_base_url())
                .parse()
                .unwrap(),
        });
    Routes {
        bare: serve(bare_route).await,
        stack: serve(stack_route).await,
        http: serve(http_route).await,
    }
}

// ---- the load generator ----------------------------------------------------------------------

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(addr: SocketAddr) -> Sender {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.set_nodelay(true).unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// One request; the answer's body is read to its end. `Err`: not a 200.
async fn one(sender: &mut Sender, addr: SocketAddr, body: &Bytes) -> Result<Bytes, String> {
    let req = http::Request::post(format!("http://{addr}/v1/chat/completions"))
        .header(header::CONTENT_TYPE, "application/json")
        .header(header::AUTHORIZATION, "Bearer sk-bench")
        .body(Full::new(body.clone()))
        .unwrap();
    sender.ready().await.map_err(|e| e.to_string())?;
    let res = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = res.status();
    let bytes = res
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    if status != StatusCode::OK {
        return Err(format!("{status}: {}", String::from_utf8_lossy(&bytes)));
    }
    Ok(bytes)
}

/// The process's CPU time so far (user + system; `/proc` counts in 1/100 s).
fn cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat (Linux)");
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<u64> = after
        .split(' ')
        .skip(11)
        .take(2)
        .map(|x| x.parse().unwrap())
        .collect();
    Duration::from_millis((f[0] + f[1]) * 10)
}

/// One round's figures.
#[derive(Clone, Copy, Default)]
struct Round {
    cpu_us: f64,
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
}

fn percentile(sorted: &[u32], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * q).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

/// `CONNECTIONS` connections, each sending its next request when the last one is answered.
async fn closed_loop(addr: SocketAddr, body: &Bytes, secs: f64) -> Round {
    let mut senders = Vec::new();
    for _ in 0..CONNECTIONS {
        senders.push(connect(addr).await);
    }
    let (cpu0, t0) = (cpu(), Instant::now());
    let end = t0 + Duration::from_secs_f64(secs);
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|mut s| {
            let body = body.clone();
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while Instant::now() < end {
                    let t = Instant::now();
                    one(&mut s, addr, &body).await.expect("a 200");
                    lat.push(t.elapsed().as_micros() as u32);
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    let (cpu, wall) = (cpu() - cpu0, t0.elapsed());
    lat.sort_unstable();
    Round {
        cpu_us: cpu.as_secs_f64() * 1e6 / lat.len() as f64,
        rps: lat.len() as f64 / wall.as_secs_f64(),
        p50_ms: percentile(&lat, 0.5),
        p99_ms: percentile(&lat, 0.99),
    }
}

/// `rate` requests per second, spread over `FIXED_CONNECTIONS` connections, each
/// latency counted from when its request was due (so a stall is not hidden). The p99.
async fn fixed_rate(addr: SocketAddr, body: &Bytes, rate: u64, secs: f64) -> f64 {
    let mut senders = Vec::new();
    for _ in 0..FIXED_CONNECTIONS {
        senders.push(connect(addr).await);
    }
    let period = Duration::from_secs_f64(FIXED_CONNECTIONS as f64 / rate as f64);
    let t0 = tokio::time::Instant::now();
    let n = (secs * rate as f64 / FIXED_CONNECTIONS as f64) as u32;
    let tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            let body = body.clone();
            let offset = period * i as u32 / FIXED_CONNECTIONS as u32;
            tokio::spawn(async move {
                let mut lat = Vec::new();
                for k in 0..n {
                    let due = t0 + offset + period * k;
                    tokio::time::sleep_until(due).await;
                    one(&mut s, addr, &body).await.expect("a 200");
                    lat.push(due.elapsed().as_micros() as u32);
                }
                lat
            })
        })
        .collect();
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.unwrap());
    }
    lat.sort_unstable();
    percentile(&lat, 0.99)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

struct Case {
    name: &'static str,
    body: Bytes,
    /// Content chunks per answer (for the per-chunk cost).
    chunks: f64,
    /// The fixed rate whose p99 is reported, requests per second.
    rate: u64,
}

async fn run(quick: bool) {
    let (_sim, routes) = start().await;
    let (rounds, secs) = if quick { (2, 0.5) } else { (15, 0.5) };
    let message = r#"[{"role":"user","content":"Say hello to the benchmark, briefly."}]"#;
    let cases = [
        Case {
            name: "completion (20 tokens)",
            body: Bytes::from(format!(
                r#"{{"model":"gpt-4o-mini","messages":{message},"max_tokens":20}}"#
            )),
            chunks: 1.0,
            rate: 5_000,
        },
        Case {
            name: "stream (100 chunks)",
            body: Bytes::from(format!(
                r#"{{"model":"gpt-4o-mini","messages":{message},"max_tokens":400,"stream":true,"stream_options":{{"include_usage":true}}}}"#
            )),
            chunks: f64::from(STREAM_WORDS),
            // 50 000 chunks per second.
            rate: 500,
        },
    ];
    println!(
        "gateway bench: {rounds} alternating round(s) of {secs} s per route, {CONNECTIONS} connections; \
         fixed-rate p99 over {FIXED_CONNECTIONS} connections"
    );
    for case in &cases {
        // Every route answers, with the same content events.
        let check = |addr| {
            let body = case.body.clone();
            async move {
                let mut s = connect(addr).await;
                let answer = one(&mut s, addr, &body).await.expect("a 200");
                String::from_utf8_lossy(&answer)
                    .matches("\"content\"")
                    .count()
            }
        };
        let (b, s, h) = (
            check(routes.bare).await,
            check(routes.stack).await,
            check(routes.http).await,
        );
        // (The upstream's first event carries the role and an empty content, which the Stack
        // route does not repeat; the HTTP route forwards the upstream's bytes.)
        assert!(
            s + 1 >= b && s as f64 >= case.chunks && h == b,
            "{}: every route gives the content events ({b}, {s} and {h})",
            case.name
        );
        let addrs = [routes.bare, routes.stack, routes.http];
        // Warm up (connections, the tokenizer, the allocator).
        for addr in addrs {
            closed_loop(addr, &case.body, 0.5).await;
        }
        let mut r: [Vec<Round>; 3] = Default::default();
        for _ in 0..rounds {
            for (i, addr) in addrs.iter().enumerate() {
                r[i].push(closed_loop(*addr, &case.body, secs).await);
            }
        }
        let mut p99 = [0.0; 3];
        for (i, addr) in addrs.iter().enumerate() {
            p99[i] = fixed_rate(*addr, &case.body, case.rate, secs).await;
        }
        let m = |v: &[Round], f: fn(&Round) -> f64| median(v.iter().map(f).collect());
        println!("\n== {}", case.name);
        println!(
            "{:<30} {:>10} {:>10} {:>10} {:>8} {:>8}",
            "", "bare", "stack", "http", "stack/b", "http/b"
        );
        let row = |name: &str, [b, s, h]: [f64; 3]| {
            println!(
                "{name:<30} {b:>10.1} {s:>10.1} {h:>10.1} {:>8.2} {:>8.2}",
                s / b,
                h / b
            );
        };
        let col = |f: fn(&Round) -> f64| [m(&r[0], f), m(&r[1], f), m(&r[2], f)];
        row("CPU µs per request", col(|r| r.cpu_us));
        row("throughput, req/s", col(|r| r.rps));
        row("latency p50, ms", col(|r| r.p50_ms));
        row("latency p99, ms", col(|r| r.p99_ms));
        row(&format!("p99 at {} req/s, ms", case.rate), p99);
        for (name, i) in [("stack", 1), ("http", 2)] {
            let added: Vec<f64> = r[0]
                .iter()
                .zip(&r[i])
                .map(|(b, x)| x.cpu_us - b.cpu_us)
                .collect();
            let added_us = median(added.clone());
            println!(
                "{name} adds {added_us:.1} µs of CPU per request (rounds: {}), {:.0} ns per chunk",
                added
                    .iter()
                    .map(|a| format!("{a:+.1}"))
                    .collect::<Vec<_>>()
                    .join(" "),
                added_us * 1000.0 / case.chunks,
            );
        }
    }
}

/// `GATEWAY_PROFILE=bare|stack|http` (and `GATEWAY_PROFILE_SECS`, default 10): drive only that
/// route's completions (its 100-chunk streams with `GATEWAY_PROFILE_STREAM=1`), closed loop,
/// for a profiler (`perf record -g`); see benches/README.md.
async fn profile(route: &str) {
    let (_sim, routes) = start().await;
    let addr = match route {
        "bare" => routes.bare,
        "http" => routes.http,
        _ => routes.stack,
    };
    let stream = std::env::var_os("GATEWAY_PROFILE_STREAM").is_some();
    let secs = std::env::var("GATEWAY_PROFILE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10.0);
    let body = Bytes::from_static(if stream {
        br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello to the benchmark, briefly."}],"max_tokens":400,"stream":true}"#
    } else {
        br#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello to the benchmark, briefly."}],"max_tokens":20}"#
    });
    let r = closed_loop(addr, &body, secs).await;
    println!(
        "{route}: {:.1} CPU µs per request, {:.0} req/s",
        r.cpu_us, r.rps
    );
}

fn main() {
    // `cargo bench` passes `--bench`; anything else is ours.
    let quick = std::env::args().any(|a| a == "--quick");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    match std::env::var("GATEWAY_PROFILE") {
        Ok(route) => rt.block_on(profile(&route)),
        Err(_) => rt.block_on(run(quick)),
    }
}
