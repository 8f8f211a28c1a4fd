//! What every provider does the same way, whatever its [`Wire`]: send one request, map a
//! non-2xx status, read a complete body, or drive an SSE body through the wire's event parser
//! up to the commit point.

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
    ChatRequest, ChatStream, CompletionResult, ErrorKind, LlmError, RateLimitHints, StreamChunk,
    StreamMeta,
};
use tokio::time::Instant;

use crate::key::ApiKey;
use crate::sse::{SseDecoder, SseStream};
use crate::transport::Transport;
use crate::wire::{EventParser, Step, Wire, malformed};

/// Where and how a provider sends its requests: the wire, the transport, the full endpoint URL,
/// the key; and what the wire said once at build time (headers, name, request-id header).
#[derive(Clone, Debug)]
pub(crate) struct Endpoint<W> {
    pub(crate) wire: W,
    pub(crate) transport: Transport,
    pub(crate) url: Uri,
    pub(crate) key: Option<ApiKey>,
    /// Headers sent on every request (auth, version); the key's value is marked sensitive.
    pub(crate) headers: HeaderMap,
    pub(crate) provider: &'static str,
    /// The response header holding the request id.
    pub(crate) request_id_header: http::HeaderName,
}

impl<W: Wire> Endpoint<W> {
    /// Joins `base` and the wire's path, refuses a key over plain http to a non-loopback host,
    /// and asks the wire for its headers.
    pub(crate) fn new(
        wire: W,
        transport: Transport,
        base: &str,
        key: Option<ApiKey>,
    ) -> Result<Self, LlmError> {
        let provider = wire.name();
        let joined = format!("{}{}", base.trim_end_matches('/'), wire.path());
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
        let mut headers = HeaderMap::new();
        wire.headers(key.as_ref(), &mut headers);
        let id = wire.request_id_header();
        let request_id_header = http::HeaderName::from_bytes(id.as_bytes()).map_err(|e| {
            LlmError::new(
                ErrorKind::Configuration,
                format!("the wire's request id header {id:?} is not a header name"),
            )
            .with_source(e)
        })?;
        Ok(Endpoint {
            request_id_header,
            wire,
            transport,
            url,
            key,
            headers,
            provider,
        })
    }

    /// The request id of a response.
    pub(crate) fn request_id(&self, headers: &HeaderMap) -> Option<String> {
        headers
            .get(&self.request_id_header)
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

/// Builds a POST of a JSON body with the endpoint's headers.
fn post<W>(
    ep: &Endpoint<W>,
    body: Vec<u8>,
    stream: bool,
) -> Result<Request<Full<Bytes>>, LlmError> {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(ep.url.clone())
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| LlmError::new(ErrorKind::Configuration, "invalid request").with_source(e))?;
    let h = req.headers_mut();
    *h = ep.headers.clone();
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
async fn send<W: Wire>(
    ep: &Endpoint<W>,
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
pub(crate) async fn complete<W: Wire>(
    ep: Arc<Endpoint<W>>,
    req: ChatRequest,
    body: Result<Vec<u8>, LlmError>,
) -> Result<CompletionResult, LlmError> {
    let start = Instant::now();
    let (parts, body) = send(&ep, &req.model, body?, false).await?;
    let request_id = ep.request_id(&parts.headers);
    let bytes = ep
        .transport
        .read(body)
        .await
        .map_err(|e| ep.finish_error(e, request_id.as_deref()))?;
    let mut r = ep.wire.parse_response(&req, &bytes).map_err(|e| {
        // A 2xx whose body is the provider's error envelope is that error, typed by its `type`
        // and `code` as an error event in a stream is, not a parse failure. Only tried once
        // the body failed to parse as an answer, so an answer is parsed once.
        let e = match ep.wire.parse_error(parts.status.as_u16(), &bytes) {
            Some(body) => body.into_error(None, ep.key.as_ref()),
            None => e,
        };
        ep.finish_error(e, request_id.as_deref())
    })?;
    r.provider = ep.provider.into();
    r.latency = start.elapsed();
    r.request_id = request_id;
    r.rate_limits = Some(Box::new(RateLimitHints::from_headers(&parts.headers)));
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
pub(crate) async fn stream<W: Wire>(
    ep: Arc<Endpoint<W>>,
    req: ChatRequest,
    body: Result<Vec<u8>, LlmError>,
) -> Result<ChatStream, LlmError> {
    let parser = ep.wire.event_parser(&req);
    let (parts, body) = send(&ep, &req.model, body?, true).await?;
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
        None => Err(ep.finish_error(malformed(W::Parser::TRUNCATED), request_id.as_deref())),
    }
}

pin_project! {
    /// A provider's parser over an SSE body. Errors after the commit point become
    /// `StreamInterrupted` (their provider type and code kept).
    struct EventStream<W: Wire> {
        #[pin]
        sse: SseStream<Limited<Incoming>>,
        parser: W::Parser,
        first: Option<StreamChunk>,
        committed: bool,
        done: bool,
        request_id: Option<String>,
        ep: Arc<Endpoint<W>>,
    }
}

impl<W: Wire> Stream for EventStream<W> {
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
                Some(Ok(ev)) => this.parser.on_event(ev),
                Some(Err(e)) => Err(e),
                None => Err(malformed(W::Parser::TRUNCATED)),
            };
            let item = match step {
                Ok(Step::Skip) => continue,
                Ok(Step::Content(chunk)) => {
                    *this.committed = true;
                    Ok(chunk)
                }
                Ok(Step::End(chunk)) => {
                    *this.done = true;
                    Ok(chunk)
                }
                Ok(Step::Error(body)) => Err(body.into_error(None, this.ep.key.as_ref())),
                Err(e) => Err(e),
            };
            return Poll::Ready(Some(item.map_err(|e| {
                *this.done = true;
                let e = this.ep.finish_error(e, this.request_id.as_deref());
                if !*this.committed {
                    return e;
                }
                tracing::debug!(provider = this.ep.provider, kind = %e.kind(), "stream interrupted after content");
                e.with_kind(ErrorKind::StreamInterrupted)
            })));
        }
    }
}
