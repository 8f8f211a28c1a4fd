//! The hyper server: the accept loop, routing, the control endpoints, `GET /v1/models` and 404s.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::api::{self, Answer};
use crate::scenario::{FaultPlan, Limits, json_error};
use crate::state::{Shared, lock};
use crate::stats::Stats;
use crate::wire::{self, SimBody, WireError};

/// The error a service returns to make hyper drop the connection without an answer.
#[derive(Debug)]
pub(crate) struct DropConnection;

impl std::fmt::Display for DropConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("simulated connection reset")
    }
}

impl std::error::Error for DropConnection {}

/// Accepts connections until `shutdown` is set, then closes them gracefully (at most 5 s).
pub(crate) async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    let mut stop = shared.shutdown.subscribe();
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                // Small writes (an SSE event, the chunked terminator) must not wait for
                // Nagle's algorithm and the peer's delayed ACK: 40 ms per stream otherwise.
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                let service = service_fn(move |req| {
                    let shared = shared.clone();
                    async move { route(&shared, req).await }
                });
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                let conn = graceful.watch(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "simulator connection ended");
                    }
                });
            }
            _ = stop.wait_for(|s| *s) => break,
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}

async fn route(
    shared: &Shared,
    req: Request<Incoming>,
) -> Result<Response<SimBody>, DropConnection> {
    let (mut parts, body) = req.into_parts();
    let path = parts.uri.path();
    // Azure OpenAI: a deployment's URL is the OpenAI route for that deployment.
    let azure = (parts.method == Method::POST)
        .then(|| azure::deployment(&parts.uri))
        .flatten();
    let endpoint = match &azure {
        Some(_) => api::route(azure::OPENAI_PATH),
        None => (parts.method == Method::POST)
            .then(|| api::route(path))
            .flatten(),
    };
    if path.starts_with("/_sim/") {
        return Ok(control(shared, &parts.method, path, body).await);
    }
    shared.stats(|s| {
        s.requests += 1;
        let name = match (endpoint, path) {
            (Some(_), _) if azure.is_some() => azure::ENDPOINT_NAME,
            (Some((_, e)), _) => e.name,
            (None, "/v1/models") => "models",
            _ => "not_found",
        };
        Stats::bump(&mut s.by_endpoint, name);
    });
    let answer = match endpoint {
        Some((api, e)) if azure.is_some() => {
            let deployment = azure.as_ref().and_then(|d| d.as_ref().ok());
            match deployment {
                Some(d) => {
                    let keyed = azure::auth(&mut parts.headers);
                    if keyed && !shared.deployments.is_empty() && !shared.deployments.contains(d) {
                        azure::deployment_not_found()
                    } else {
                        let answer =
                            api::handle(shared, api, e, parts.headers, body, Some(d)).await;
                        azure::answer(answer)
                    }
                }
                None => azure::missing_version(),
            }
        }
        Some((api, e)) => api::handle(shared, api, e, parts.headers, body, None).await,
        None if parts.method == Method::GET && path == "/v1/models" => {
            let models = api::by_headers(&parts.headers).models();
            Answer::send(wire::json_response(StatusCode::OK, &models), "ok")
        }
        None => not_found(shared, &parts.headers, &parts.method, path),
    };
    shared.stats(|s| {
        if !answer.outcome.is_empty() {
            Stats::bump(&mut s.by_outcome, &answer.outcome);
        }
        if let Some(r) = &answer.response {
            *s.by_status.entry(r.status().as_u16()).or_insert(0) += 1;
        }
    });
    answer.response.ok_or(DropConnection)
}

/// The Azure OpenAI shape over the OpenAI routes.
mod azure {
    use http::{HeaderMap, HeaderValue, StatusCode, Uri};

    use crate::api::Answer;
    use crate::wire;

    /// The OpenAI route a deployment's URL serves.
    pub(super) const OPENAI_PATH: &str = "/v1/chat/completions";
    /// Its name in the stats.
    pub(super) const ENDPOINT_NAME: &str = "azure_chat_completions";

    /// `/openai/deployments/{name}/chat/completions`: the deployment, with `Err` when the
    /// query has no `api-version` (Azure answers 404).
    pub(super) fn deployment(uri: &Uri) -> Option<Result<String, ()>> {
        let name = uri
            .path()
            .strip_prefix("/openai/deployments/")?
            .strip_suffix("/chat/completions")
            .filter(|d| !d.is_empty() && !d.contains('/'))?;
        let versioned = uri.query().is_some_and(|q| {
            q.split('&')
                .any(|kv| kv.starts_with("api-version=") && kv.len() > 12)
        });
        Some(versioned.then(|| name.to_owned()).ok_or(()))
    }

    /// `api-key: K` is Azure's `Authorization: Bearer K`. Whether the request carries a key
    /// at all (a missing one is left to the OpenAI route's 401).
    pub(super) fn auth(headers: &mut HeaderMap) -> bool {
        if let Some(key) = headers.get("api-key").and_then(|k| k.to_str().ok()) {
            if let Ok(v) = HeaderValue::from_str(&format!("Bearer {key}")) {
                headers.insert(http::header::AUTHORIZATION, v);
            }
        }
        headers.contains_key(http::header::AUTHORIZATION)
    }

    /// Azure's request id header beside OpenAI's.
    pub(super) fn answer(mut answer: Answer) -> Answer {
        if let Some(r) = answer.response.as_mut() {
            if let Some(id) = r.headers().get("x-request-id").cloned() {
                r.headers_mut().insert("apim-request-id", id);
            }
        }
        answer
    }

    /// What Azure answers for a deployment the resource does not have.
    pub(super) fn deployment_not_found() -> Answer {
        let body = serde_json::json!({"error": {
            "code": "DeploymentNotFound",
            "message": "The API deployment for this resource does not exist. If you created the \
                        deployment within the last 5 minutes, please wait a moment and try again."
        }});
        Answer::send(
            wire::json_response(StatusCode::NOT_FOUND, &body),
            "deployment_not_found",
        )
    }

    /// What Azure answers without an `api-version`.
    pub(super) fn missing_version() -> Answer {
        let body = serde_json::json!({"error": {"code": "404", "message": "Resource not found"}});
        Answer::send(
            wire::json_response(StatusCode::NOT_FOUND, &body),
            "not_found",
        )
    }
}

/// The 404 of a path no API serves, in the shape of whichever API the headers look like.
fn not_found(shared: &Shared, h: &HeaderMap, method: &Method, path: &str) -> Answer {
    let api = api::by_headers(h);
    let request_id = api.request_id(&mut lock(&shared.rng));
    let err = WireError::new(404, format!("Invalid URL ({method} {path})"));
    Answer::send(api::error(api, &request_id, &err), "not_found")
}

/// `GET /_sim/stats`, `POST /_sim/faults` (a [`FaultPlan`]), `POST /_sim/limits` (a
/// [`Limits`]), `POST /_sim/reset`.
async fn control(
    shared: &Shared,
    method: &Method,
    path: &str,
    body: Incoming,
) -> Response<SimBody> {
    let ok = |v: Value| wire::json_response(StatusCode::OK, &v);
    let bad = |msg: String| wire::json_response(StatusCode::BAD_REQUEST, &json!({"error": msg}));
    match (method, path) {
        (&Method::GET, "/_sim/stats") => {
            let stats = lock(&shared.stats).clone();
            ok(serde_json::to_value(stats).unwrap_or(Value::Null))
        }
        (&Method::POST, "/_sim/reset") => {
            *lock(&shared.stats) = Stats::default();
            lock(&shared.limiter).reset();
            lock(&shared.cache).clear();
            shared.restart_plan();
            ok(json!({"ok": true}))
        }
        (&Method::POST, "/_sim/faults") => match read_json::<FaultPlan>(body).await {
            Ok(plan) => match plan.validate() {
                Ok(()) => {
                    shared.set_plan(plan);
                    ok(json!({"ok": true}))
                }
                Err(e) => bad(e.to_string()),
            },
            Err(e) => bad(e),
        },
        (&Method::POST, "/_sim/limits") => match read_json::<Limits>(body).await {
            Ok(limits) => match limits.validate() {
                Ok(()) => {
                    lock(&shared.limiter).set_limits(limits);
                    ok(json!({"ok": true}))
                }
                Err(e) => bad(e.to_string()),
            },
            Err(e) => bad(e),
        },
        _ => wire::json_response(
            StatusCode::NOT_FOUND,
            &json!({"error": format!("no control endpoint {method} {path}")}),
        ),
    }
}

async fn read_json<T: DeserializeOwned>(body: Incoming) -> Result<T, String> {
    let bytes: Bytes = Limited::new(body, 1 << 20)
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let text = String::from_utf8_lossy(&bytes);
    serde_json::from_str(&text).map_err(|e| json_error(&text, &e).to_string())
}
