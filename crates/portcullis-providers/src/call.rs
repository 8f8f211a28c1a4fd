//! What both providers do the same way: send one request, map a non-2xx status, read a complete
//! body, or drive an SSE body through a provider's event parser up to the commit point.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_core::Stream;
use http::header::{ACCEPT, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, Request, Uri};
use http_body_util::{Full, Limited};
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use portcullis_core::{
    ChatStream, CompletionResult, ErrorKind, FinishReason, LlmError, RateLimitHints, StreamChunk,
    StreamMeta, Usage,
};
use tokio::time::Instant;

use crate::sse::{SseDecoder, SseEvent, SseStream};
use crate::transport::{ApiKey, Transport};

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
        if !matches!(url.scheme_str(), Some("http" | "https")) {
            return Err(LlmError::new(
                ErrorKind::Configuration,
                format!("base URL {base:?} must be http:// or https://"),
            ));
        }
        crate::key::check_plain_http(&url, key.as_ref(), provider)?;
        let host = url.host().unwrap_or("");
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
}

/// The future a provider service returns: the HTTP call, boxed (the call does I/O anyway).
#[must_use = "futures do nothing unless polled"]
pub struct ResponseFuture<T> {
    inner: Pin<Box<dyn Future<Output = Result<T, LlmError>> + Send + 'static>>,
}

impl<T> ResponseFuture<T> {
    pub(crate) fn new<F>(f: F) -> Self
    where
        F: Future<Output = Result<T, LlmError>> + Send + 'static,
    {
        ResponseFuture { inner: Box::pin(f) }
    }
}

impl<T> Future for ResponseFuture<T> {
    type Output = Result<T, LlmError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        self.inner.as_mut().poll(cx)
    }
}

impl<T> fmt::Debug for ResponseFuture<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ResponseFuture")
    }
}

/// A parsed complete (non-streaming) response body.
pub(crate) struct Parsed {
    pub(crate) content: String,
    pub(crate) usage: Usage,
    pub(crate) model: String,
    pub(crate) finish_reason: FinishReason,
}

/// What one SSE event meant to a provider's parser.
pub(crate) enum Step {
    /// Nothing for the caller (ping, block start, role-only delta…).
    Skip,
    /// New content: the first one is the commit point.
    Content(String),
    /// The end of the stream, with the final chunk (finish reason and usage).
    End(StreamChunk),
}

/// A provider's stream state machine.
pub(crate) trait EventParser: Send + Unpin + 'static {
    /// Handles one event. `key` scrubs error messages.
    fn on_event(&mut self, ev: SseEvent, key: Option<&ApiKey>) -> Result<Step, LlmError>;
    /// The model the provider resolved (empty until the stream said).
    fn model(&self) -> &str;
    /// The message for a body that ended before the end event.
    const TRUNCATED: &'static str;
}

/// A protocol error (malformed JSON, a missing field).
pub(crate) fn protocol(what: impl fmt::Display) -> LlmError {
    LlmError::new(ErrorKind::Protocol, format!("malformed response: {what}"))
}

/// Builds a POST of a JSON body with the endpoint's headers.
fn post(ep: &Endpoint, body: Vec<u8>, stream: bool) -> Result<Request<Full<Bytes>>, LlmError> {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(ep.url.clone())
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| LlmError::new(ErrorKind::Configuration, "invalid request").with_source(e))?;
    let h = req.headers_mut();
    h.extend(ep.headers.clone());
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    let accept = if stream {
        "text/event-stream"
    } else {
        "application/json"
    };
    h.insert(ACCEPT, HeaderValue::from_static(accept));
    Ok(req)
}

/// Sends a request and maps a non-2xx answer to its typed error.
async fn send(
    ep: &Endpoint,
    model: &str,
    body: Vec<u8>,
    stream: bool,
) -> Result<(http::response::Parts, Incoming), LlmError> {
    let req = post(ep, body, stream)?;
    tracing::debug!(provider = ep.provider, model, stream, "sending request");
    let resp = ep
        .transport
        .send(req)
        .await
        .map_err(|e| ep.finish_error(e, None))?;
    if !resp.status().is_success() {
        return Err(crate::error_body::status_error(ep, resp).await);
    }
    Ok(resp.into_parts())
}

/// One complete call: send, map the status, read and parse the body.
pub(crate) async fn complete(
    ep: Arc<Endpoint>,
    model: Arc<str>,
    body: Result<Vec<u8>, LlmError>,
    parse: fn(&[u8]) -> Result<Parsed, LlmError>,
) -> Result<CompletionResult, LlmError> {
    let start = Instant::now();
    let (parts, body) = send(&ep, &model, body?, false).await?;
    let request_id = ep.request_id(&parts.headers);
    let bytes = ep
        .transport
        .read(body)
        .await
        .map_err(|e| ep.finish_error(e, request_id.as_deref()))?;
    let p = parse(&bytes).map_err(|e| ep.finish_error(e, request_id.as_deref()))?;
    let mut r = CompletionResult::new(ep.provider, p.model, p.content)
        .with_usage(p.usage)
        .with_finish_reason(p.finish_reason);
    r.latency = start.elapsed();
    r.request_id = request_id;
    r.rate_limits = RateLimitHints::from_headers(&parts.headers);
    tracing::debug!(
        provider = ep.provider,
        model = %r.model,
        latency_ms = r.latency.as_millis() as u64,
        finish_reason = %r.finish_reason,
        "completion done"
    );
    Ok(r)
}

/// One streaming call: send, map the status, then read events until the commit point (the first
/// content chunk, or the end of a stream with no content), or the error before it.
pub(crate) async fn stream<P: EventParser>(
    ep: Arc<Endpoint>,
    model: Arc<str>,
    body: Result<Vec<u8>, LlmError>,
    parser: P,
) -> Result<ChatStream, LlmError> {
    let (parts, body) = send(&ep, &model, body?, true).await?;
    let request_id = ep.request_id(&parts.headers);
    let decoder = SseDecoder::with_limits(
        ep.transport.config().max_event_bytes,
        ep.transport.config().max_event_bytes,
    );
    let mut events = EventStream {
        sse: SseStream::new(ep.transport.limit(body), decoder),
        parser,
        first: None,
        committed: false,
        done: false,
        request_id: request_id.clone(),
        ep: ep.clone(),
    };
    let first = std::future::poll_fn(|cx| Pin::new(&mut events).poll_next(cx)).await;
    match first {
        Some(Ok(chunk)) => {
            events.first = Some(chunk);
            let mut meta = StreamMeta::new(ep.provider, events.parser.model());
            meta.request_id = request_id;
            meta.rate_limits = RateLimitHints::from_headers(&parts.headers);
            tracing::debug!(provider = ep.provider, model = %meta.model, "stream committed");
            Ok(ChatStream::new(meta, events))
        }
        Some(Err(e)) => Err(e),
        None => Err(ep.finish_error(protocol(P::TRUNCATED), request_id.as_deref())),
    }
}

pin_project! {
    /// A provider's parser over an SSE body. Errors after the commit point become
    /// `StreamInterrupted` (their provider type and code kept).
    struct EventStream<P> {
        #[pin]
        sse: SseStream<Limited<Incoming>>,
        parser: P,
        first: Option<StreamChunk>,
        committed: bool,
        done: bool,
        request_id: Option<String>,
        ep: Arc<Endpoint>,
    }
}

impl<P: EventParser> Stream for EventStream<P> {
    type Item = Result<StreamChunk, LlmError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut this = self.project();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        loop {
            if *this.done {
                // Read what is already there (the body's end, usually) so that the connection
                // can go back to the pool; never wait for more.
                while let Poll::Ready(Some(_)) = this.sse.as_mut().poll_next(cx) {}
                return Poll::Ready(None);
            }
            let step = match std::task::ready!(this.sse.as_mut().poll_next(cx)) {
                Some(Ok(ev)) => this.parser.on_event(ev, this.ep.key.as_ref()),
                Some(Err(e)) => Err(e),
                None => Err(protocol(P::TRUNCATED)),
            };
            let item = match step {
                Ok(Step::Skip) => continue,
                Ok(Step::Content(text)) => {
                    *this.committed = true;
                    Ok(StreamChunk::delta(text))
                }
                Ok(Step::End(chunk)) => {
                    *this.done = true;
                    Ok(chunk)
                }
                Err(e) => {
                    *this.done = true;
                    let mut e = this.ep.finish_error(e, this.request_id.as_deref());
                    if *this.committed {
                        tracing::debug!(provider = this.ep.provider, kind = %e.kind(), "stream interrupted after content");
                        e = e.with_kind(ErrorKind::StreamInterrupted);
                    }
                    Err(e)
                }
            };
            return Poll::Ready(Some(item));
        }
    }
}
