//! The HTTP client every provider shares: hyper-util's pooled client over hyper-rustls (ring,
//! webpki roots; HTTP/1.1 and HTTP/2), a connect timeout and a response body cap.
//!
//! The transport never retries: retries stacked across layers multiply, so they belong to the
//! retry layer alone.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use portcullis_core::{ErrorKind, LlmError};
use serde::Deserialize;

#[doc(no_inline)]
pub use crate::key::ApiKey;
use crate::sse::body_error;

/// The default response body cap: 32 MiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;
/// The default connect timeout: 10 s.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Transport settings, serde-deserializable and validated by [`Transport::new`].
///
/// ```
/// use portcullis_providers::TransportConfig;
/// let cfg: TransportConfig =
///     serde_json::from_str(r#"{"connect_timeout_ms": 2000, "max_response_bytes": 1048576}"#).unwrap();
/// assert_eq!(cfg.max_response_bytes, 1 << 20);
/// assert!(portcullis_providers::Transport::new(cfg).is_ok());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct TransportConfig {
    /// TCP connect timeout, in milliseconds (default 10 000). Must be > 0.
    pub connect_timeout_ms: u64,
    /// The most bytes a response body may have (default 32 MiB), streams included. Going over
    /// is [`ResponseTooLarge`](ErrorKind::ResponseTooLarge). Must be > 0.
    pub max_response_bytes: usize,
    /// The most bytes one SSE line or event may have (default 4 MiB). Must be > 0.
    pub max_event_bytes: usize,
    /// How long an idle pooled connection is kept, in milliseconds (default 90 000).
    pub pool_idle_timeout_ms: u64,
}

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT.as_millis() as u64,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
            max_event_bytes: crate::sse::DEFAULT_MAX_EVENT_BYTES,
            pool_idle_timeout_ms: 90_000,
        }
    }
}

impl TransportConfig {
    /// Checks the values; a bad one is a [`Configuration`](ErrorKind::Configuration) error.
    pub fn validate(&self) -> Result<(), LlmError> {
        let bad = |what: &str| {
            Err(LlmError::new(
                ErrorKind::Configuration,
                format!("transport: {what} must be greater than zero"),
            ))
        };
        if self.connect_timeout_ms == 0 {
            return bad("connect_timeout_ms");
        }
        if self.max_response_bytes == 0 {
            return bad("max_response_bytes");
        }
        if self.max_event_bytes == 0 {
            return bad("max_event_bytes");
        }
        Ok(())
    }
}

type HyperClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A pooled HTTPS client. Cheap to clone: clones share the connection pool, so several
/// providers can share one transport.
#[derive(Clone)]
pub struct Transport {
    client: HyperClient,
    config: Arc<TransportConfig>,
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transport")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Transport {
    /// A transport with the given (validated) settings.
    pub fn new(config: TransportConfig) -> Result<Self, LlmError> {
        config.validate()?;
        let tls_err = |e: rustls::Error| {
            LlmError::new(ErrorKind::Configuration, "TLS setup failed").with_source(e)
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(Duration::from_millis(config.connect_timeout_ms)));
        http.set_nodelay(true);
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(provider)
            .map_err(tls_err)?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_millis(config.pool_idle_timeout_ms))
            .pool_timer(hyper_util::rt::TokioTimer::new())
            .build(https);
        Ok(Transport {
            client,
            config: Arc::new(config),
        })
    }

    /// The settings.
    pub fn config(&self) -> &TransportConfig {
        &self.config
    }

    /// Sends one request. A failure to connect, or a connection closed or reset before any
    /// answer, is [`Connect`](ErrorKind::Connect); a response head that cannot be parsed (too
    /// large, too many headers, not HTTP) is [`Protocol`](ErrorKind::Protocol). The message
    /// names the cause; the source keeps hyper's error.
    pub(crate) async fn send(
        &self,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, LlmError> {
        self.client
            .request(req)
            .await
            .map_err(|e| send_error(e.is_connect(), e))
    }

    /// Wraps a body in the response cap.
    pub(crate) fn limit(&self, body: Incoming) -> Limited<Incoming> {
        Limited::new(body, self.config.max_response_bytes)
    }

    /// Reads a whole body, within the cap.
    pub(crate) async fn read(&self, body: Incoming) -> Result<Bytes, LlmError> {
        Ok(self
            .limit(body)
            .collect()
            .await
            .map_err(body_error)?
            .to_bytes())
    }
}

/// The transport as a tower service of raw HTTP: the request is sent as it is (method, URI,
/// headers, body: nothing is added, not even a key), and the response body comes back within
/// the cap (a [`Limited`] body: going over is an error while reading it). This is the upstream of
/// the HTTP level ([`crate::http`]) and of a pass-through gateway.
///
/// ```
/// use bytes::Bytes;
/// use portcullis_providers::{Transport, TransportConfig};
/// use tower::ServiceExt;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let transport = Transport::new(TransportConfig::default()).unwrap();
/// let req = http::Request::get("http://127.0.0.1:9/").body(Bytes::new()).unwrap();
/// // Nothing listens on the discard port: a typed `Connect` error, never a panic.
/// let err = transport.oneshot(req).await.unwrap_err();
/// assert_eq!(err.kind(), portcullis_core::ErrorKind::Connect);
/// # }
/// ```
impl tower_service::Service<Request<Bytes>> for Transport {
    type Response = Response<Limited<Incoming>>;
    type Error = LlmError;
    type Future = SendFuture;

    fn poll_ready(
        &mut self,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), LlmError>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Bytes>) -> SendFuture {
        SendFuture {
            inner: self.client.request(req.map(Full::new)),
            max: self.config.max_response_bytes,
        }
    }
}

pin_project_lite::pin_project! {
    /// The future of the [`Transport`] as a service: the response head, its body capped.
    pub struct SendFuture {
        #[pin]
        inner: hyper_util::client::legacy::ResponseFuture,
        max: usize,
    }
}

impl fmt::Debug for SendFuture {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SendFuture").finish_non_exhaustive()
    }
}

impl std::future::Future for SendFuture {
    type Output = Result<Response<Limited<Incoming>>, LlmError>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let max = *this.max;
        this.inner.poll(cx).map(|r| match r {
            Ok(res) => Ok(res.map(|body| Limited::new(body, max))),
            Err(e) => Err(send_error(e.is_connect(), e)),
        })
    }
}

/// Types a failure to send a request by its cause (hyper's error, somewhere in the chain).
fn send_error(is_connect: bool, e: impl std::error::Error + Send + Sync + 'static) -> LlmError {
    let hyper = {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        std::iter::from_fn(|| {
            let c = cause?;
            cause = c.source();
            Some(c)
        })
        .find_map(|c| c.downcast_ref::<hyper::Error>())
    };
    let (kind, what) = match hyper {
        _ if is_connect => (ErrorKind::Connect, "could not connect".to_owned()),
        Some(h) if h.is_parse_too_large() => (
            ErrorKind::Protocol,
            format!("the response head is too large (too many or too long headers): {h}"),
        ),
        Some(h) if h.is_parse() || h.is_parse_status() => (
            ErrorKind::Protocol,
            format!("the response head could not be parsed: {h}"),
        ),
        Some(h) if h.is_incomplete_message() => (
            ErrorKind::Connect,
            format!("the connection closed before a response: {h}"),
        ),
        Some(h) => (
            ErrorKind::Connect,
            format!("sending the request failed: {h}"),
        ),
        None => (
            ErrorKind::Connect,
            format!("sending the request failed: {e}"),
        ),
    };
    LlmError::new(kind, what).with_source(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_validation() {
        let t = TransportConfig {
            max_response_bytes: 0,
            ..Default::default()
        };
        assert_eq!(t.validate().unwrap_err().kind(), ErrorKind::Configuration);
        assert!(serde_json::from_str::<TransportConfig>(r#"{"bogus":1}"#).is_err());
    }
}
