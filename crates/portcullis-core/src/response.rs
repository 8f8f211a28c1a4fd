//! The response side: [`CompletionResult`], [`Usage`], [`FinishReason`], and the streaming
//! [`ChatStream`] of [`StreamChunk`]s.

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_core::Stream;
use serde::{Deserialize, Serialize};

use crate::classify::{Classify, Finish, OnFinish};
use crate::error::LlmError;
use crate::hints::RateLimitHints;

/// Token counts a provider reports for one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Generated tokens.
    pub output_tokens: u64,
    /// Their sum, as the provider reported it (or computed when it reports none).
    pub total_tokens: u64,
}

impl Usage {
    /// Usage from input and output counts; the total is their sum.
    pub fn new(input_tokens: u64, output_tokens: u64) -> Self {
        Usage {
            input_tokens,
            output_tokens,
            total_tokens: input_tokens + output_tokens,
        }
    }
}

/// Why the model stopped. Unknown provider values are kept in [`FinishReason::Other`], never
/// cast silently to a known one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// A natural end or a stop sequence.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// Cut by a content filter.
    ContentFilter,
    /// The model asked for tools.
    ToolCalls,
    /// The model refused.
    Refusal,
    /// Anything else, with the provider's raw value.
    Other(String),
}

impl FinishReason {
    /// The canonical lowercase name: `stop`, `length`, `content_filter`, `tool_calls`,
    /// `refusal`, or the provider's raw value.
    pub fn as_str(&self) -> &str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContentFilter => "content_filter",
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::Refusal => "refusal",
            FinishReason::Other(s) => s,
        }
    }
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for FinishReason {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// A finished, non-streaming completion.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CompletionResult {
    /// The generated text.
    pub content: String,
    /// Reported token usage.
    pub usage: Usage,
    /// The model the provider actually resolved (e.g. `gpt-4o-mini-2024-07-18`).
    pub model: String,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
    /// Wall time of the call that produced it (the successful attempt).
    pub latency: Duration,
    /// Which provider served it (after a fallback, not necessarily the primary).
    pub provider: Cow<'static, str>,
    /// The provider's request id (`x-request-id` / `request-id`).
    pub request_id: Option<String>,
    /// Rate-limit headers that came with the response (`None` when there were none). Boxed:
    /// every layer moves the result, and most of its size would be these hints.
    pub rate_limits: Option<Box<RateLimitHints>>,
}

impl CompletionResult {
    /// A result with the given content, provider and model; other fields empty. Handy in mocks.
    pub fn new(
        provider: impl Into<Cow<'static, str>>,
        model: impl Into<String>,
        content: impl Into<String>,
    ) -> Self {
        CompletionResult {
            content: content.into(),
            usage: Usage::default(),
            model: model.into(),
            finish_reason: FinishReason::Stop,
            latency: Duration::ZERO,
            provider: provider.into(),
            request_id: None,
            rate_limits: None,
        }
    }

    /// Sets the usage.
    pub fn with_usage(mut self, usage: Usage) -> Self {
        self.usage = usage;
        self
    }

    /// Sets the finish reason.
    pub fn with_finish_reason(mut self, reason: FinishReason) -> Self {
        self.finish_reason = reason;
        self
    }
}

/// One piece of a streamed completion.
///
/// Content chunks carry a `delta`; the last chunk carries the `finish_reason` and, when the
/// provider reports it, the final `usage`.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct StreamChunk {
    /// New text.
    pub delta: String,
    /// Set on the final chunk.
    pub finish_reason: Option<FinishReason>,
    /// Set on the final chunk (cumulative usage for the whole call).
    pub usage: Option<Usage>,
}

impl StreamChunk {
    /// A content chunk.
    pub fn delta(text: impl Into<String>) -> Self {
        StreamChunk {
            delta: text.into(),
            ..Default::default()
        }
    }

    /// The final chunk.
    pub fn finish(reason: FinishReason, usage: Option<Usage>) -> Self {
        StreamChunk {
            delta: String::new(),
            finish_reason: Some(reason),
            usage,
        }
    }
}

/// Metadata known when a stream commits (its response headers and first event).
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct StreamMeta {
    /// Which provider serves it.
    pub provider: Cow<'static, str>,
    /// The model the provider resolved.
    pub model: String,
    /// The provider's request id.
    pub request_id: Option<String>,
    /// Rate-limit headers of the response.
    pub rate_limits: RateLimitHints,
}

impl StreamMeta {
    /// Metadata for `provider` and `model`.
    pub fn new(provider: impl Into<Cow<'static, str>>, model: impl Into<String>) -> Self {
        StreamMeta {
            provider: provider.into(),
            model: model.into(),
            ..Default::default()
        }
    }
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<StreamChunk, LlmError>> + Send>>;
type Hook = Box<dyn FnOnce(&Finish) + Send>;

/// A streamed completion: a [`Stream`] of [`StreamChunk`] results.
///
/// A streaming provider's future resolves at the **commit point**, when the first content chunk
/// arrived (it is the first item of this stream), or with the error that came before it. That is
/// why retry and fallback cover pre-content failures with no special code. An error after the
/// commit point is yielded as an item of kind
/// [`StreamInterrupted`](crate::ErrorKind::StreamInterrupted) and ends the stream.
///
/// Layers that must see how a stream ends (the breaker counts a late failure, the token bucket
/// reconciles with the final usage) register a hook through [`OnFinish`]; hooks run exactly once,
/// at the end, on the first error, or when the stream is dropped unfinished.
pub struct ChatStream {
    inner: ChunkStream,
    meta: StreamMeta,
    usage: Option<Usage>,
    hooks: Vec<Hook>,
    done: bool,
}

impl fmt::Debug for ChatStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChatStream")
            .field("meta", &self.meta)
            .field("usage", &self.usage)
            .field("hooks", &self.hooks.len())
            .field("done", &self.done)
            .finish()
    }
}

impl ChatStream {
    /// Wraps a stream of chunks.
    pub fn new<S>(meta: StreamMeta, stream: S) -> Self
    where
        S: Stream<Item = Result<StreamChunk, LlmError>> + Send + 'static,
    {
        ChatStream {
            inner: Box::pin(stream),
            meta,
            usage: None,
            hooks: Vec::new(),
            done: false,
        }
    }

    /// A stream that yields the given items, then ends. Handy in mocks and tests.
    pub fn from_chunks(meta: StreamMeta, items: Vec<Result<StreamChunk, LlmError>>) -> Self {
        Self::new(meta, Iter(items.into_iter()))
    }

    /// Metadata: provider, model, request id, rate-limit headers.
    pub fn meta(&self) -> &StreamMeta {
        &self.meta
    }

    /// Sets the provider name (a fallback layer records which entry served the stream).
    pub fn set_provider(&mut self, provider: Cow<'static, str>) {
        self.meta.provider = provider;
    }

    /// The last usage seen so far.
    pub fn usage(&self) -> Option<Usage> {
        self.usage
    }

    /// Reads the whole stream into a [`CompletionResult`] (latency is left at zero).
    pub async fn collect(mut self) -> Result<CompletionResult, LlmError> {
        let mut content = String::new();
        let mut finish = None;
        let mut usage = None;
        while let Some(item) = std::future::poll_fn(|cx| Pin::new(&mut self).poll_next(cx)).await {
            let chunk = item?;
            content.push_str(&chunk.delta);
            if chunk.finish_reason.is_some() {
                finish = chunk.finish_reason;
            }
            if chunk.usage.is_some() {
                usage = chunk.usage;
            }
        }
        Ok(CompletionResult {
            content,
            usage: usage.unwrap_or_default(),
            model: self.meta.model.clone(),
            finish_reason: finish.unwrap_or(FinishReason::Other(String::new())),
            latency: Duration::ZERO,
            provider: self.meta.provider.clone(),
            request_id: self.meta.request_id.clone(),
            rate_limits: Some(Box::new(self.meta.rate_limits.clone())),
        })
    }

    /// Ends the stream with an [`ErrorKind::Timeout`](crate::ErrorKind::Timeout) error when no
    /// item arrives for `idle` (time from `tokio::time`, so paused-time tests drive it).
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        let inner = std::mem::replace(&mut self.inner, Box::pin(Iter(Vec::new().into_iter())));
        self.inner = Box::pin(Idle {
            inner,
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
            provider: self.meta.provider.clone(),
        });
        self
    }

    /// Ends the stream with an [`ErrorKind::Timeout`](crate::ErrorKind::Timeout) error when it
    /// is still running `total` from now (the commit point, when a layer applies it), however
    /// steadily its chunks arrive: a bound for upstreams that trickle forever. `Duration::MAX`
    /// (or anything past what the clock can hold) is no limit.
    pub fn total_timeout(mut self, total: Duration) -> Self {
        let inner = std::mem::replace(&mut self.inner, Box::pin(Iter(Vec::new().into_iter())));
        let now = tokio::time::Instant::now();
        let at = now
            .checked_add(total.min(crate::config::MAX_DURATION))
            .unwrap_or(now);
        self.inner = Box::pin(Total {
            inner,
            total,
            sleep: Box::pin(tokio::time::sleep_until(at)),
            provider: self.meta.provider.clone(),
            fired: false,
        });
        self
    }

    fn finish(&mut self, how: Finish) {
        self.done = true;
        for hook in self.hooks.drain(..) {
            hook(&how);
        }
    }
}

impl Stream for ChatStream {
    type Item = Result<StreamChunk, LlmError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.done {
            return Poll::Ready(None);
        }
        let item = std::task::ready!(self.inner.as_mut().poll_next(cx));
        match &item {
            Some(Ok(chunk)) => {
                if chunk.usage.is_some() {
                    self.usage = chunk.usage;
                }
            }
            Some(Err(e)) => {
                let usage = self.usage;
                let class = e.classify();
                self.finish(Finish::Failed { usage, class });
            }
            None => {
                let usage = self.usage;
                self.finish(Finish::Completed { usage });
            }
        }
        Poll::Ready(item)
    }
}

impl Drop for ChatStream {
    fn drop(&mut self) {
        if !self.done {
            let usage = self.usage;
            self.finish(Finish::Cancelled { usage });
        }
    }
}

impl OnFinish for ChatStream {
    fn on_finish<F>(&mut self, f: F)
    where
        F: FnOnce(&Finish) + Send + 'static,
    {
        if self.done {
            // Already over: nothing more will be observed. Treat as completed with what we saw.
            f(&Finish::Completed { usage: self.usage });
        } else {
            self.hooks.push(Box::new(f));
        }
    }

    fn is_streaming(&self) -> bool {
        true
    }

    fn rate_limits(&self) -> Option<&RateLimitHints> {
        Some(&self.meta.rate_limits)
    }
}

impl OnFinish for CompletionResult {
    fn on_finish<F>(&mut self, f: F)
    where
        F: FnOnce(&Finish) + Send + 'static,
    {
        f(&Finish::Completed {
            usage: Some(self.usage),
        })
    }

    fn rate_limits(&self) -> Option<&RateLimitHints> {
        self.rate_limits.as_deref()
    }
}

struct Idle {
    inner: ChunkStream,
    idle: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    provider: Cow<'static, str>,
}

impl Stream for Idle {
    type Item = Result<StreamChunk, LlmError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Poll::Ready(item) = self.inner.as_mut().poll_next(cx) {
            // Saturating: an idle limit too large for the clock (`Duration::MAX`) is no limit.
            let now = tokio::time::Instant::now();
            let next = now
                .checked_add(self.idle.min(crate::config::MAX_DURATION))
                .unwrap_or(now);
            self.sleep.as_mut().reset(next);
            return Poll::Ready(item);
        }
        std::task::ready!(self.sleep.as_mut().poll(cx));
        let err = LlmError::new(
            crate::ErrorKind::Timeout,
            format!("stream idle for {:?}", self.idle),
        )
        .with_provider(self.provider.clone());
        Poll::Ready(Some(Err(err)))
    }
}

struct Total {
    inner: ChunkStream,
    total: Duration,
    sleep: Pin<Box<tokio::time::Sleep>>,
    provider: Cow<'static, str>,
    fired: bool,
}

impl Stream for Total {
    type Item = Result<StreamChunk, LlmError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.fired {
            return Poll::Ready(None);
        }
        if let Poll::Ready(item) = self.inner.as_mut().poll_next(cx) {
            return Poll::Ready(item);
        }
        std::task::ready!(self.sleep.as_mut().poll(cx));
        self.fired = true;
        let err = LlmError::new(
            crate::ErrorKind::Timeout,
            format!(
                "stream still running after its total limit of {:?}",
                self.total
            ),
        )
        .with_provider(self.provider.clone());
        Poll::Ready(Some(Err(err)))
    }
}

struct Iter(std::vec::IntoIter<Result<StreamChunk, LlmError>>);

impl Stream for Iter {
    type Item = Result<StreamChunk, LlmError>;
    fn poll_next(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Poll::Ready(self.0.next())
    }
}
