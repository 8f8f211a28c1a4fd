//! [`Meter`]: the innermost service of the HTTP level. It classifies a raw response by the one
//! table (reading a bounded error body) and wraps its body in a [`MeteredBody`].

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::CONTENT_TYPE;
use http::{Request, Response, StatusCode};
use http_body::Body;
use pin_project_lite::pin_project;
use portcullis_core::{
    BoxError, Classification, ErrorKind, Finish, LlmError, OnFinish, RateLimitHints,
};
use tower_layer::Layer;
use tower_service::Service;

use super::body::MeteredBody;
use super::call::{CallInfo, Format};
use crate::error_body::ErrorBody;

/// The most bytes of an error body read to classify it (64 KiB; the frame that crosses the
/// limit is kept whole). A longer body is classified by its status and still passed on whole.
pub const DEFAULT_MAX_ERROR_BODY: usize = 64 * 1024;

/// A raw response as the layers see it: the `http::Response` (its body a [`MeteredBody`]),
/// the failure it stands for by the one classification table, and the rate-limit headers it
/// came with. It implements [`OnFinish`], so every layer reads it as it reads an error:
///
/// - a 4xx / 5xx is classified from its status, its headers (`retry-after-ms`, `retry-after`,
///   `x-should-retry`) and its error body's `type` / `code`, by
///   [`ErrorKind::from_wire`]: a 429 `insufficient_quota` is quota (not retried), a 429
///   `rate_limit_exceeded` a rate limit (retried after its `retry-after`, pausing the bucket's
///   key), a 503 or 529 an overload (retried, a breaker failure);
/// - [`rate_limits`](OnFinish::rate_limits) are the response's `x-ratelimit-*` /
///   `anthropic-ratelimit-*` headers, from which a token bucket learns its limits;
/// - it is [over](OnFinish::on_finish) when its body is (see [`MeteredBody`]), with the usage
///   the body reported.
///
/// Above the layers, [`into_inner`](Metered::into_inner) gives the `http::Response` back, and
/// [`to_error`](Metered::to_error) the failure as a typed [`LlmError`].
pub struct Metered<B> {
    response: Response<MeteredBody<B>>,
    failure: Option<Classification>,
    error: Option<ErrorBody>,
    hints: RateLimitHints,
    stream: bool,
}

impl<B> fmt::Debug for Metered<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metered")
            .field("status", &self.response.status())
            .field("failure", &self.failure)
            .field("error", &self.error)
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

impl<B> Metered<B> {
    /// The response.
    pub fn into_inner(self) -> Response<MeteredBody<B>> {
        self.response
    }

    /// The response, borrowed.
    pub fn get_ref(&self) -> &Response<MeteredBody<B>> {
        &self.response
    }

    /// The response, mutably (its body is read through it).
    pub fn get_mut(&mut self) -> &mut Response<MeteredBody<B>> {
        &mut self.response
    }

    /// Its status.
    pub fn status(&self) -> StatusCode {
        self.response.status()
    }

    /// The error object of a 4xx / 5xx body, when it had one.
    pub fn error_body(&self) -> Option<&ErrorBody> {
        self.error.as_ref()
    }

    /// The failure this response stands for, as a typed [`LlmError`]: its kind by the table, the
    /// status, the error body's `type`, `code` and message, the `retry-after` and rate-limit
    /// headers, the request id. `None` for a success.
    ///
    /// ```
    /// use portcullis_core::ErrorKind;
    /// # use portcullis_providers::http::Metered;
    /// # fn check<B>(res: &Metered<B>) {
    /// if let Some(err) = res.to_error() {
    ///     if err.kind() == ErrorKind::RateLimited {
    ///         println!("rate limited; retry after {:?}", err.retry_after());
    ///     }
    /// }
    /// # }
    /// ```
    pub fn to_error(&self) -> Option<LlmError> {
        self.failure?;
        let status = self.response.status().as_u16();
        let err = match &self.error {
            Some(body) => body.clone().into_error(Some(status), None),
            None => LlmError::new(
                ErrorKind::from_wire(Some(status), None, None),
                format!("HTTP {status}"),
            ),
        };
        let headers = self.response.headers();
        let id = ["x-request-id", "request-id"]
            .iter()
            .find_map(|h| headers.get(*h)?.to_str().ok());
        let err = err.with_status(status).with_rate_limits(self.hints.clone());
        Some(match id {
            Some(id) => err.with_request_id(id),
            None => err,
        })
    }

    fn new(response: Response<MeteredBody<B>>, error: Option<ErrorBody>, stream: bool) -> Self {
        let hints = RateLimitHints::from_headers(response.headers());
        let status = response.status().as_u16();
        let failure = (status >= 400).then(|| {
            let (t, c) = error.as_ref().map_or((None, None), |e| {
                (e.error_type.as_deref(), e.code.as_deref())
            });
            ErrorKind::from_wire(Some(status), t, c)
                .classification_with(hints.retry_after, hints.should_retry)
        });
        Metered {
            response,
            failure,
            error,
            hints,
            stream,
        }
    }
}

impl<B> OnFinish for Metered<B> {
    fn on_finish<F>(&mut self, f: F)
    where
        F: FnOnce(&Finish) + Send + 'static,
    {
        self.response.body_mut().on_finish(Box::new(f));
    }

    fn is_streaming(&self) -> bool {
        self.stream
    }

    fn rate_limits(&self) -> Option<&RateLimitHints> {
        Some(&self.hints)
    }

    fn failure(&self) -> Option<Classification> {
        self.failure
    }
}

/// Puts a [`Meter`] under the layers: see there.
#[derive(Debug, Clone, Copy)]
pub struct MeterLayer {
    max_error_body: usize,
    stream_idle: Option<Duration>,
}

impl Default for MeterLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl MeterLayer {
    /// Reads at most [`DEFAULT_MAX_ERROR_BODY`] of an error body; no idle limit on streams.
    pub fn new() -> Self {
        MeterLayer {
            max_error_body: DEFAULT_MAX_ERROR_BODY,
            stream_idle: None,
        }
    }

    /// Reads at most `bytes` of an error body to classify it.
    pub fn max_error_body(mut self, bytes: usize) -> Self {
        self.max_error_body = bytes;
        self
    }

    /// Ends an SSE body that sends nothing for `idle` with a `Timeout` error (its hooks see a
    /// `Timeout` failure). `Duration::MAX` is no limit.
    pub fn stream_idle(mut self, idle: Duration) -> Self {
        self.stream_idle = Some(idle);
        self
    }
}

impl<S> Layer<S> for MeterLayer {
    type Service = Meter<S>;

    fn layer(&self, inner: S) -> Meter<S> {
        Meter {
            inner,
            layer: *self,
        }
    }
}

/// The service under the layers of the HTTP level: it calls a raw HTTP service and returns
/// its response as a [`Metered`], classified by the one table.
///
/// - For a 4xx / 5xx, it reads the error body (at most [`DEFAULT_MAX_ERROR_BODY`]) to tell a
///   rate limit from exhausted quota, then passes the body on whole.
/// - For a success, it wraps the body in a [`MeteredBody`], which reads the usage on the way.
/// - The inner error becomes a `BoxError` (the layers' refusals box the same way).
///
/// ```
/// use bytes::Bytes;
/// use portcullis_core::OnFinish;
/// use portcullis_providers::http::MeterLayer;
/// use tower::{Layer, ServiceExt, service_fn};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let upstream = service_fn(|_req: http::Request<Bytes>| async {
///     let body = r#"{"error":{"type":"insufficient_quota","code":"insufficient_quota","message":"no"}}"#;
///     let res = http::Response::builder().status(429).body(http_body_util::Full::new(Bytes::from(body)));
///     Ok::<_, std::convert::Infallible>(res.unwrap())
/// });
/// let res = MeterLayer::new().layer(upstream)
///     .oneshot(http::Request::post("http://h/v1/chat/completions").body(Bytes::new()).unwrap())
///     .await
///     .unwrap();
/// let class = res.failure().unwrap();
/// assert!(!class.retry && !class.rate_limited); // quota: never retried
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Meter<S> {
    inner: S,
    layer: MeterLayer,
}

impl<S, B> Service<Request<Bytes>> for Meter<S>
where
    S: Service<Request<Bytes>, Response = Response<B>>,
    S::Error: Into<BoxError>,
    B: Body + Unpin,
{
    type Response = Metered<B>;
    type Error = BoxError;
    type Future = MeterFuture<S::Future, B>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let format = CallInfo::of(&req).map_or_else(
            || Format::of(req.method(), req.uri().path()),
            CallInfo::format,
        );
        MeterFuture {
            call: self.inner.call(req),
            reading: None,
            format,
            layer: self.layer,
        }
    }
}

pin_project! {
    /// The future of [`Meter`]: the inner call, then (for a 4xx / 5xx) the bounded read of its
    /// error body.
    pub struct MeterFuture<F, B> {
        #[pin]
        call: F,
        reading: Option<Reading<B>>,
        format: Format,
        layer: MeterLayer,
    }
}

impl<F, B> fmt::Debug for MeterFuture<F, B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeterFuture")
            .field("format", &self.format)
            .field("reading_error_body", &self.reading.is_some())
            .finish_non_exhaustive()
    }
}

/// An error response whose body is being read.
struct Reading<B> {
    parts: http::response::Parts,
    body: B,
    buf: BytesMut,
}

impl<F, B, E> Future for MeterFuture<F, B>
where
    F: Future<Output = Result<Response<B>, E>>,
    E: Into<BoxError>,
    B: Body + Unpin,
{
    type Output = Result<Metered<B>, BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let format = *this.format;
        if this.reading.is_none() {
            let res = ready!(this.call.poll(cx)).map_err(Into::into)?;
            if !res.status().is_client_error() && !res.status().is_server_error() {
                let sse = res
                    .headers()
                    .get(CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("text/event-stream"));
                let idle = this.layer.stream_idle;
                let res = res.map(|b| MeteredBody::watching(b, format, sse, idle));
                return Poll::Ready(Ok(Metered::new(res, None, sse)));
            }
            let (parts, body) = res.into_parts();
            *this.reading = Some(Reading {
                parts,
                body,
                buf: BytesMut::new(),
            });
        }
        let Some(r) = this.reading.as_mut() else {
            unreachable!("set just above")
        };
        let whole = loop {
            if r.buf.len() >= this.layer.max_error_body {
                break false;
            }
            match ready!(Pin::new(&mut r.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Ok(mut data) = frame.into_data() {
                        while bytes::Buf::has_remaining(&data) {
                            let chunk = bytes::Buf::chunk(&data);
                            let n = chunk.len();
                            r.buf.extend_from_slice(chunk);
                            bytes::Buf::advance(&mut data, n);
                        }
                    }
                }
                // A body cut short: classified by what was read, passed on as it is.
                Some(Err(_)) | None => break true,
            }
        };
        let Some(Reading { parts, body, buf }) = this.reading.take() else {
            unreachable!("set above")
        };
        let buf: Bytes = buf.freeze();
        let error = match whole {
            true => ErrorBody::from_envelope(&buf),
            false => None,
        };
        let rest = (!whole).then_some(body);
        let res = Response::from_parts(parts, MeteredBody::error(buf, rest, format));
        Poll::Ready(Ok(Metered::new(res, error, false)))
    }
}
