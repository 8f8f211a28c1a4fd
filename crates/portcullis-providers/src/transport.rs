//! The HTTP transport both providers share: hyper-util's pooled client over hyper-rustls
//! (ring, webpki roots; HTTP/1.1 and HTTP/2), a connect timeout and a response body cap; and
//! [`ApiKey`], a secret that never prints.
//!
//! The transport never retries: retries stacked across layers multiply, so they belong to the
//! retry layer alone.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use portcullis_core::{ErrorKind, LlmError, RateLimitHints};
use serde::Deserialize;

use crate::sse::body_error;

/// The default response body cap: 32 MiB.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 32 * 1024 * 1024;
/// The default connect timeout: 10 s.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// An API key. Its `Debug` and `Display` print `[redacted]`, it is sent as a sensitive header
/// (hidden from hyper's own logs), and provider error messages are scrubbed of it.
///
/// ```
/// use portcullis_providers::ApiKey;
/// let key = ApiKey::new("sk-canary-123").unwrap();
/// assert_eq!(format!("{key} {key:?}"), "[redacted] ApiKey([redacted])");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(Arc<str>);

impl ApiKey {
    /// Wraps a key. It must be non-empty visible ASCII (a valid header value), or this returns a
    /// [`Configuration`](ErrorKind::Configuration) error (which never quotes the key).
    pub fn new(key: impl Into<String>) -> Result<Self, LlmError> {
        let key = key.into();
        let key = key.trim();
        if key.is_empty() || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(LlmError::new(
                ErrorKind::Configuration,
                "an API key must be non-empty visible ASCII",
            ));
        }
        Ok(ApiKey(Arc::from(key)))
    }

    /// Reads the key from an environment variable (e.g. `OPENAI_API_KEY`). A missing or invalid
    /// variable is a [`Configuration`](ErrorKind::Configuration) error.
    pub fn from_env(var: &str) -> Result<Self, LlmError> {
        match std::env::var(var) {
            Ok(v) => Self::new(v),
            Err(_) => Err(LlmError::new(
                ErrorKind::Configuration,
                format!("environment variable {var} is not set (or not unicode)"),
            )),
        }
    }

    /// The key itself. Handle with care: whatever you do with it is no longer redacted.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A sensitive header value `prefix + key`.
    pub(crate) fn header(&self, prefix: &str) -> HeaderValue {
        let mut v = HeaderValue::try_from(format!("{prefix}{}", self.0))
            .expect("checked in ApiKey::new: visible ASCII");
        v.set_sensitive(true);
        v
    }

    /// Replaces every occurrence of the key in `text` with `[redacted]`.
    pub(crate) fn scrub<'a>(&self, text: &'a str) -> Cow<'a, str> {
        if text.contains(&*self.0) {
            Cow::Owned(text.replace(&*self.0, "[redacted]"))
        } else {
            Cow::Borrowed(text)
        }
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey([redacted])")
    }
}

impl fmt::Display for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

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

    /// Sends one request. A failure to connect or send is [`Connect`](ErrorKind::Connect).
    pub(crate) async fn send(
        &self,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, LlmError> {
        self.client.request(req).await.map_err(|e| {
            let what = if e.is_connect() {
                "could not connect"
            } else {
                "sending the request failed"
            };
            LlmError::new(ErrorKind::Connect, what).with_source(e)
        })
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

/// Where and how a provider sends its requests: the transport, the full endpoint URL, the key.
#[derive(Clone, Debug)]
pub(crate) struct Endpoint {
    pub(crate) transport: Transport,
    pub(crate) url: Uri,
    pub(crate) key: Option<ApiKey>,
    /// Headers sent on every request (auth, version); the key's value is marked sensitive.
    pub(crate) headers: HeaderMap,
    pub(crate) provider: &'static str,
    /// The response header holding the request id.
    pub(crate) request_id_header: &'static str,
}

impl Endpoint {
    /// Joins `base` and `path`, and refuses a key over plain http to a non-loopback host.
    pub(crate) fn new(
        transport: Transport,
        base: &str,
        path: &str,
        key: Option<ApiKey>,
        headers: HeaderMap,
        provider: &'static str,
        request_id_header: &'static str,
    ) -> Result<Self, LlmError> {
        let joined = format!("{}{path}", base.trim_end_matches('/'));
        let url: Uri = joined.parse().map_err(|e| {
            LlmError::new(
                ErrorKind::Configuration,
                format!("invalid base URL {base:?}"),
            )
            .with_source(e)
        })?;
        let host = url.host().unwrap_or("");
        match url.scheme_str() {
            Some("https") => {}
            Some("http") if key.is_none() || is_loopback(host) => {}
            Some("http") => {
                return Err(LlmError::new(
                    ErrorKind::Configuration,
                    format!(
                        "refusing to send an API key over plain http to {host}; use https \
                         (plain http is allowed only to loopback)"
                    ),
                )
                .with_provider(provider));
            }
            _ => {
                return Err(LlmError::new(
                    ErrorKind::Configuration,
                    format!("base URL {base:?} must be http:// or https://"),
                ));
            }
        }
        if host.is_empty() {
            return Err(LlmError::new(
                ErrorKind::Configuration,
                format!("base URL {base:?} has no host"),
            ));
        }
        Ok(Endpoint {
            transport,
            url,
            key,
            headers,
            provider,
            request_id_header,
        })
    }

    /// The request id of a response.
    pub(crate) fn request_id(&self, headers: &HeaderMap) -> Option<String> {
        headers
            .get(self.request_id_header)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    /// Adds the provider and the request id (the header's; it wins over a body's) to an error.
    pub(crate) fn finish_error(&self, e: LlmError, request_id: Option<&str>) -> LlmError {
        let e = e.with_provider(self.provider);
        match request_id {
            Some(id) => e.with_request_id(id),
            _ => e,
        }
    }

    /// Turns a non-2xx response into a typed error: the body's `error.type` / `error.code` /
    /// `error.message` (both providers use that shape) through [`ErrorKind::from_wire`], the
    /// rate-limit headers, the request id. A body that is not JSON still gives a typed error
    /// from the status.
    pub(crate) async fn status_error(&self, resp: Response<Incoming>) -> LlmError {
        let (parts, body) = resp.into_parts();
        let status = parts.status.as_u16();
        let request_id = self.request_id(&parts.headers);
        let hints = RateLimitHints::from_headers(&parts.headers);
        let err = match self.transport.read(body).await {
            Ok(bytes) => error_from_body(status, &bytes, self.key.as_ref()),
            Err(e) => LlmError::new(
                ErrorKind::from_wire(Some(status), None, None),
                format!("HTTP {status}; the error body could not be read ({e})"),
            ),
        };
        let err = err.with_status(status).with_rate_limits(hints);
        tracing::debug!(
            provider = self.provider,
            status,
            kind = %err.kind(),
            request_id = request_id.as_deref().unwrap_or(""),
            "provider returned an error status"
        );
        self.finish_error(err, request_id.as_deref())
    }
}

/// Where a builder takes its key from.
#[derive(Debug, Clone)]
pub(crate) enum KeySource {
    /// The provider's environment variable (the default).
    Env,
    /// A key given explicitly.
    Key(ApiKey),
    /// No key (a local OpenAI-compatible server, the simulator without auth).
    None,
}

/// The settings both provider builders share.
#[derive(Debug, Clone)]
pub(crate) struct BuilderCommon {
    pub(crate) base_url: String,
    pub(crate) key: KeySource,
    pub(crate) config: TransportConfig,
    pub(crate) transport: Option<Transport>,
}

impl BuilderCommon {
    pub(crate) fn new(base_url: &str) -> Self {
        BuilderCommon {
            base_url: base_url.to_owned(),
            key: KeySource::Env,
            config: TransportConfig::default(),
            transport: None,
        }
    }

    /// Resolves the key and the transport, checks the URL, and builds the endpoint; `auth`
    /// turns the key into the provider's headers.
    pub(crate) fn endpoint(
        self,
        env_var: &str,
        path: &str,
        provider: &'static str,
        request_id_header: &'static str,
        auth: impl FnOnce(Option<&ApiKey>, &mut HeaderMap),
    ) -> Result<Endpoint, LlmError> {
        let key = match self.key {
            KeySource::Env => Some(ApiKey::from_env(env_var)?),
            KeySource::Key(k) => Some(k),
            KeySource::None => None,
        };
        let transport = match self.transport {
            Some(t) => t,
            None => Transport::new(self.config)?,
        };
        let mut headers = HeaderMap::new();
        auth(key.as_ref(), &mut headers);
        Endpoint::new(
            transport,
            &self.base_url,
            path,
            key,
            headers,
            provider,
            request_id_header,
        )
    }
}

/// The error object both providers send: `{"error":{"type","code","message"}}` (OpenAI adds
/// `param`; Anthropic adds a top-level `"type":"error"` and `request_id`).
#[derive(Debug, Deserialize)]
pub(crate) struct WireError {
    #[serde(default, rename = "type")]
    pub(crate) error_type: Option<String>,
    #[serde(default)]
    pub(crate) code: Option<serde_json::Value>,
    #[serde(default)]
    pub(crate) message: Option<String>,
    #[serde(default)]
    pub(crate) param: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ErrorEnvelope {
    error: WireError,
    #[serde(default)]
    request_id: Option<String>,
}

impl WireError {
    /// The typed error, its message scrubbed of `key`; `status` is `None` for an error event
    /// inside a 200 stream.
    pub(crate) fn into_error(self, status: Option<u16>, key: Option<&ApiKey>) -> LlmError {
        let code = match self.code {
            Some(serde_json::Value::String(s)) => Some(s),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        let kind = ErrorKind::from_wire(status, self.error_type.as_deref(), code.as_deref());
        let mut message = self.message.unwrap_or_default();
        if let Some(serde_json::Value::String(p)) = self.param {
            message = format!("{message} (param: {p})");
        }
        let mut e = LlmError::new(kind, scrub(key, message));
        if let Some(t) = self.error_type {
            e = e.with_error_type(t);
        }
        if let Some(c) = code {
            e = e.with_code(c);
        }
        e
    }
}

/// Parses an error body; a body that is not the documented shape still gives a typed error.
pub(crate) fn error_from_body(status: u16, body: &[u8], key: Option<&ApiKey>) -> LlmError {
    match serde_json::from_slice::<ErrorEnvelope>(body) {
        Ok(env) => {
            let e = env.error.into_error(Some(status), key);
            match env.request_id {
                Some(id) => e.with_request_id(id),
                None => e,
            }
        }
        Err(_) => {
            let text = String::from_utf8_lossy(&body[..body.len().min(512)]);
            LlmError::new(
                ErrorKind::from_wire(Some(status), None, None),
                scrub(key, format!("HTTP {status}: {}", text.trim())),
            )
        }
    }
}

fn scrub(key: Option<&ApiKey>, text: String) -> String {
    match key.map(|k| k.scrub(&text)) {
        Some(Cow::Owned(clean)) => clean,
        _ => text,
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for h in ["localhost", "127.0.0.1", "127.1.2.3", "[::1]", "::1"] {
            assert!(is_loopback(h), "{h}");
        }
        for h in ["example.com", "10.0.0.1", "localhost.evil.com", "[::2]"] {
            assert!(!is_loopback(h), "{h}");
        }
    }

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
