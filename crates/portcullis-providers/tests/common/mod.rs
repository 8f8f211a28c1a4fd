//! Test support: a loopback HTTP server that replays a canned response (a recorded fixture with
//! its status and headers), and records what it received.
#![allow(dead_code)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use portcullis_core::{ChatMessage, ChatRequest};
use portcullis_providers::{AnthropicProvider, ApiKey, OpenAiProvider};

/// A canned response.
#[derive(Clone, Debug)]
pub struct Canned {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
    /// Send the body in frames of this many bytes.
    pub chunk: usize,
    /// Keep the body open (never end it) after the bytes.
    pub hang: bool,
}

impl Canned {
    pub fn new(status: u16, content_type: &str, body: impl Into<Bytes>) -> Self {
        Canned {
            status,
            headers: vec![("content-type".into(), content_type.into())],
            body: body.into(),
            chunk: 64,
            hang: false,
        }
    }
    pub fn json(status: u16, body: &str) -> Self {
        Self::new(status, "application/json", body.to_owned())
    }
    pub fn header(mut self, k: &str, v: &str) -> Self {
        self.headers.push((k.into(), v.into()));
        self
    }
    pub fn body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }
    pub fn hang(mut self) -> Self {
        self.hang = true;
        self
    }
    pub fn chunk(mut self, n: usize) -> Self {
        self.chunk = n.max(1);
        self
    }
}

/// A request the server received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub path: String,
    pub headers: HeaderMap,
    pub body: serde_json::Value,
}

#[derive(Default)]
struct State {
    canned: Option<Canned>,
    seen: Vec<Seen>,
    connections: usize,
}

/// The loopback server.
#[derive(Clone)]
pub struct Server {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
}

impl Server {
    pub async fn start() -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(State::default()));
        let st = state.clone();
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                st.lock().unwrap().connections += 1;
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Server { addr, state }
    }

    pub fn set(&self, canned: Canned) {
        self.state.lock().unwrap().canned = Some(canned);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// How many TCP connections were accepted.
    pub fn connections(&self) -> usize {
        self.state.lock().unwrap().connections
    }

    pub fn last(&self) -> Seen {
        self.seen().pop().expect("a request")
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn openai(&self) -> OpenAiProvider {
        OpenAiProvider::builder()
            .base_url(format!("{}/v1", self.base()))
            .api_key(ApiKey::new(CANARY).unwrap())
            .build()
            .unwrap()
    }

    pub fn anthropic(&self) -> AnthropicProvider {
        AnthropicProvider::builder()
            .base_url(self.base())
            .api_key(ApiKey::new(CANARY).unwrap())
            .build()
            .unwrap()
    }
}

/// The API key every test uses: it must never show up anywhere.
pub const CANARY: &str = "sk-CANARY-5e1f7b2a9c";

type FrameStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> + Send>>;

async fn handle(
    st: Arc<Mutex<State>>,
    req: Request<Incoming>,
) -> Result<Response<StreamBody<FrameStream>>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let canned = {
        let mut s = st.lock().unwrap();
        s.seen.push(Seen {
            path: parts.uri.path().to_owned(),
            headers: parts.headers,
            body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        });
        s.canned.clone().expect("a canned response")
    };
    let frames: Vec<_> = canned
        .body
        .chunks(canned.chunk)
        .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
        .collect();
    let frames = futures_util::stream::iter(frames);
    let stream: FrameStream = if canned.hang {
        Box::pin(frames.chain(futures_util::stream::pending()))
    } else {
        Box::pin(frames)
    };
    let mut resp = Response::new(StreamBody::new(stream));
    *resp.status_mut() = StatusCode::from_u16(canned.status).unwrap();
    for (k, v) in &canned.headers {
        resp.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    Ok(resp)
}

/// A recorded fixture: `tests/data/<name>` (+ its `.meta.json` when there is one).
pub struct Fixture {
    pub body: Bytes,
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub request_id: Option<String>,
}

pub fn data_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(name)
}

/// Loads a fixture. Recordings without headers get a synthetic request id header
/// (`x-request-id` for OpenAI, `request-id` for Anthropic) so that its propagation is checked.
pub fn fixture(name: &str) -> Fixture {
    let path = data_path(name);
    let body = Bytes::from(std::fs::read(&path).unwrap());
    let meta_path = path.with_extension("meta.json");
    let content_type = if name.ends_with(".sse") {
        "text/event-stream"
    } else {
        "application/json"
    };
    let mut headers = vec![("content-type".to_owned(), content_type.to_owned())];
    let mut status = 200;
    if let Ok(meta) = std::fs::read(&meta_path) {
        let meta: serde_json::Value = serde_json::from_slice(&meta).unwrap();
        status = meta["status"].as_u64().unwrap() as u16;
        let ct = ("content-type".to_owned(), content_type.to_owned());
        headers = meta["response_headers"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| *k != "connection")
            .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
            .collect();
        if !headers.iter().any(|(k, _)| k == "content-type") {
            headers.push(ct);
        }
    }
    let id_header = if name.starts_with("openai/") {
        "x-request-id"
    } else {
        "request-id"
    };
    let request_id = match headers.iter().find(|(k, _)| k == id_header) {
        Some((_, v)) => v.clone(),
        None => {
            let id = format!("req_synthetic_{}", name.len());
            headers.push((id_header.to_owned(), id.clone()));
            id
        }
    };
    Fixture {
        body,
        status,
        headers,
        request_id: Some(request_id),
    }
}

impl Fixture {
    pub fn canned(&self) -> Canned {
        Canned {
            status: self.status,
            headers: self.headers.clone(),
            body: self.body.clone(),
            chunk: 7,
            hang: false,
        }
    }
}

/// A simple request.
pub fn request(model: &str) -> ChatRequest {
    ChatRequest::new(
        model,
        vec![
            ChatMessage::system("Be brief."),
            ChatMessage::user("Hello!"),
        ],
    )
    .max_tokens(64)
}

/// Every `.sse` recording, as (name, bytes).
pub fn sse_recordings() -> Vec<(String, Bytes)> {
    let mut out = Vec::new();
    for dir in ["openai", "anthropic"] {
        let mut names: Vec<_> = std::fs::read_dir(data_path(dir))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sse"))
            .collect();
        names.sort();
        for n in names {
            let name = format!("{dir}/{n}");
            let body = Bytes::from(std::fs::read(data_path(&name)).unwrap());
            out.push((name, body));
        }
    }
    out
}
