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
use crate::content::{Part, ToolCall};
use crate::error::LlmError;
use crate::hints::RateLimitHints;
use crate::request::ChatMessage;

/// Token counts a provider reports for one call, provider-neutral.
///
/// `input_tokens` counts every prompt token, cached or not (OpenAI's `prompt_tokens`;
/// Anthropic's `input_tokens + cache_read_input_tokens + cache_creation_input_tokens`), and
/// `output_tokens` every generated one, reasoning included. The cache and reasoning counts are
/// parts of those, so `total_tokens` is what the provider bills in tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(default)]
pub struct Usage {
    /// Prompt tokens, cached ones included.
    pub input_tokens: u64,
    /// Generated tokens, reasoning included.
    pub output_tokens: u64,
    /// Their sum, as the provider reported it (or computed when it reports none).
    pub total_tokens: u64,
    /// Of `input_tokens`, those read from the prompt cache (OpenAI
    /// `prompt_tokens_details.cached_tokens`, Anthropic `cache_read_input_tokens`).
    pub cached_input_tokens: u64,
    /// Of `input_tokens`, those written to the prompt cache (Anthropic
    /// `cache_creation_input_tokens`).
    pub cache_creation_input_tokens: u64,
    /// Of `output_tokens`, those spent reasoning (OpenAI
    /// `completion_tokens_details.reasoning_tokens`; Anthropic reports none apart).
    pub reasoning_tokens: u64,
}

impl Usage {
    /// Usage from input and output counts; the total is their sum.
    pub fn new(input_tokens: u64, output_tokens: u64) -> Self {
        Usage {
            input_tokens,
            output_tokens,
            total_tokens: input_tokens.saturating_add(output_tokens),
            ..Usage::default()
        }
    }

    /// Sets the cache counts (parts of `input_tokens`).
    pub fn with_cache(mut self, read: u64, created: u64) -> Self {
        self.cached_input_tokens = read;
        self.cache_creation_input_tokens = created;
        self
    }

    /// Sets the reasoning count (part of `output_tokens`).
    pub fn with_reasoning(mut self, reasoning: u64) -> Self {
        self.reasoning_tokens = reasoning;
        self
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
///
/// The answer's text is in `content`; its tool calls, its reasoning and any content block this
/// library does not model are beside it. [`CompletionResult::message`] turns it back into the
/// assistant turn to send in the next request of a conversation.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct CompletionResult {
    /// The generated text (every text block, joined).
    pub content: String,
    /// The tools the model called, in order.
    pub tool_calls: Vec<ToolCall>,
    /// Thinking and redacted-thinking parts, with their signatures, in order.
    pub reasoning: Vec<Part>,
    /// Content blocks this library does not model, kept as [`Part::Raw`].
    pub other: Vec<Part>,
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
            tool_calls: Vec::new(),
            reasoning: Vec::new(),
            other: Vec::new(),
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

    /// Sets the tool calls.
    pub fn with_tool_calls(mut self, calls: Vec<ToolCall>) -> Self {
        self.tool_calls = calls;
        self
    }

    /// The assistant turn this answer is, to send back in the conversation: reasoning first
    /// (unchanged, as Anthropic requires), then the text, then the tool calls, then the blocks
    /// kept raw.
    pub fn message(&self) -> ChatMessage {
        let mut parts = self.reasoning.clone();
        if !self.content.is_empty() {
            parts.push(Part::text(self.content.clone()));
        }
        parts.extend(self.tool_calls.iter().cloned().map(Part::ToolCall));
        parts.extend(self.other.iter().cloned());
        ChatMessage::assistant_parts(parts)
    }
}

/// A fragment of a tool call in a stream. The first fragment of a call carries its `id` and
/// `name`; every fragment may carry a piece of the arguments' JSON.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ToolCallDelta {
    /// Which call of the answer (0, 1, … in the order the calls started).
    pub index: usize,
    /// The call's id (on its first fragment).
    pub id: Option<String>,
    /// The tool's name (on its first fragment).
    pub name: Option<String>,
    /// A piece of the arguments' JSON.
    pub arguments: String,
}

impl ToolCallDelta {
    /// A fragment of call `index`.
    pub fn new(index: usize, id: Option<String>, name: Option<String>, arguments: String) -> Self {
        ToolCallDelta {
            index,
            id,
            name,
            arguments,
        }
    }
}

/// A fragment of a reasoning block in a stream.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ThinkingDelta {
    /// More thinking text for block `index` (0, 1, … among the answer's reasoning blocks).
    Text {
        /// Which reasoning block.
        index: usize,
        /// The text.
        text: String,
    },
    /// The signature of block `index` (Anthropic sends it whole, after the text).
    Signature {
        /// Which reasoning block.
        index: usize,
        /// The signature.
        signature: String,
    },
    /// A whole redacted-thinking block.
    Redacted {
        /// Which reasoning block.
        index: usize,
        /// The opaque data.
        data: String,
    },
}

/// One piece of a streamed completion.
///
/// Content chunks carry text in `delta`, tool-call fragments in `tool_calls`, or a reasoning
/// fragment in `thinking`; the last chunk carries the `finish_reason`, the final `usage` when
/// the provider reports it, and the whole answer assembled in `message`.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct StreamChunk {
    /// New text.
    pub delta: String,
    /// Tool-call fragments.
    pub tool_calls: Vec<ToolCallDelta>,
    /// A reasoning fragment.
    pub thinking: Option<ThinkingDelta>,
    /// Content blocks this library does not model, whole, as [`Part::Raw`].
    pub other: Vec<Part>,
    /// Set on the final chunk.
    pub finish_reason: Option<FinishReason>,
    /// Set on the final chunk (cumulative usage for the whole call).
    pub usage: Option<Usage>,
    /// Set on the final chunk by [`ChatStream`]: the answer assembled from every chunk (text,
    /// tool calls with whole arguments, reasoning with signatures, usage, finish reason).
    pub message: Option<Box<CompletionResult>>,
}

impl StreamChunk {
    /// A text chunk.
    pub fn delta(text: impl Into<String>) -> Self {
        StreamChunk {
            delta: text.into(),
            ..Default::default()
        }
    }

    /// A tool-call fragment.
    pub fn tool_call(delta: ToolCallDelta) -> Self {
        StreamChunk {
            tool_calls: vec![delta],
            ..Default::default()
        }
    }

    /// A reasoning fragment.
    pub fn thinking(delta: ThinkingDelta) -> Self {
        StreamChunk {
            thinking: Some(delta),
            ..Default::default()
        }
    }

    /// The final chunk.
    pub fn finish(reason: FinishReason, usage: Option<Usage>) -> Self {
        StreamChunk {
            finish_reason: Some(reason),
            usage,
            ..Default::default()
        }
    }

    /// Whether this chunk carries content for the caller (text, a tool-call fragment,
    /// reasoning, or a raw block): the first such chunk is a stream's commit point.
    pub fn has_content(&self) -> bool {
        !self.delta.is_empty()
            || !self.tool_calls.is_empty()
            || self.thinking.is_some()
            || !self.other.is_empty()
    }
}

/// Builds a [`CompletionResult`] from a stream's chunks.
#[derive(Debug, Default)]
struct Assembler {
    content: String,
    calls: Vec<ToolCall>,
    reasoning: Vec<Part>,
    other: Vec<Part>,
    finish: Option<FinishReason>,
    usage: Option<Usage>,
}

impl Assembler {
    fn add(&mut self, chunk: &StreamChunk) {
        self.content.push_str(&chunk.delta);
        for d in &chunk.tool_calls {
            if self.calls.len() <= d.index {
                // Indices are small and dense in practice; a gap is filled with empty calls
                // rather than trusting an index to size an allocation.
                let want = (d.index + 1).min(self.calls.len() + 64);
                self.calls.resize(want, ToolCall::new("", "", ""));
            }
            if let Some(c) = self.calls.get_mut(d.index) {
                if let Some(id) = &d.id {
                    c.id.clone_from(id);
                }
                if let Some(name) = &d.name {
                    c.name.clone_from(name);
                }
                c.arguments.push_str(&d.arguments);
            }
        }
        if let Some(t) = &chunk.thinking {
            let index = match t {
                ThinkingDelta::Text { index, .. }
                | ThinkingDelta::Signature { index, .. }
                | ThinkingDelta::Redacted { index, .. } => *index,
            };
            while self.reasoning.len() <= index && self.reasoning.len() < index.min(1 << 16) + 1 {
                self.reasoning.push(Part::Thinking {
                    thinking: String::new(),
                    signature: None,
                });
            }
            if let Some(block) = self.reasoning.get_mut(index) {
                match (t, block) {
                    (ThinkingDelta::Text { text, .. }, Part::Thinking { thinking, .. }) => {
                        thinking.push_str(text)
                    }
                    (
                        ThinkingDelta::Signature { signature: s, .. },
                        Part::Thinking { signature, .. },
                    ) => *signature = Some(s.clone()),
                    (ThinkingDelta::Redacted { data, .. }, block) => {
                        *block = Part::RedactedThinking { data: data.clone() }
                    }
                    _ => {}
                }
            }
        }
        self.other.extend(chunk.other.iter().cloned());
        if chunk.finish_reason.is_some() {
            self.finish.clone_from(&chunk.finish_reason);
        }
        if chunk.usage.is_some() {
            self.usage = chunk.usage;
        }
    }

    fn result(&mut self, meta: &StreamMeta) -> CompletionResult {
        CompletionResult {
            content: std::mem::take(&mut self.content),
            tool_calls: std::mem::take(&mut self.calls),
            reasoning: std::mem::take(&mut self.reasoning),
            other: std::mem::take(&mut self.other),
            usage: self.usage.unwrap_or_default(),
            model: meta.model.clone(),
            finish_reason: self
                .finish
                .take()
                .unwrap_or(FinishReason::Other(String::new())),
            latency: Duration::ZERO,
            provider: meta.provider.clone(),
            request_id: meta.request_id.clone(),
            rate_limits: Some(Box::new(meta.rate_limits.clone())),
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
    assembler: Assembler,
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
            assembler: Assembler::default(),
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

    /// Reads the whole stream into a [`CompletionResult`] (latency is left at zero): the
    /// assembled answer of its final chunk.
    pub async fn collect(mut self) -> Result<CompletionResult, LlmError> {
        let mut last = None;
        while let Some(item) = std::future::poll_fn(|cx| Pin::new(&mut self).poll_next(cx)).await {
            let chunk = item?;
            if let Some(m) = chunk.message {
                last = Some(*m);
            }
        }
        // A stream that ended without a final chunk: what arrived, finish reason unknown.
        Ok(last.unwrap_or_else(|| {
            let meta = self.meta.clone();
            self.assembler.result(&meta)
        }))
    }

    /// Ends the stream with an [`ErrorKind::Timeout`](crate::ErrorKind::Timeout) error when no
    /// item arrives for `idle` (time from `tokio::time`, so paused-time tests drive it).
    pub fn idle_timeout(mut self, idle: Duration) -> Self {
        let inner = std::mem::replace(&mut self.inner, Box::pin(Iter(Vec::new().into_iter())));
        self.inner = Box::pin(Idle {
            inner,
            idle,
            sleep: Box::pin(tokio::time::sleep(idle)),
            last: tokio::time::Instant::now(),
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
        let mut item = std::task::ready!(self.inner.as_mut().poll_next(cx));
        match &mut item {
            Some(Ok(chunk)) => {
                if chunk.usage.is_some() {
                    self.usage = chunk.usage;
                }
                let this = &mut *self;
                this.assembler.add(chunk);
                if chunk.finish_reason.is_some() && chunk.message.is_none() {
                    chunk.message = Some(Box::new(this.assembler.result(&this.meta)));
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
    /// When the last item came. The timer is not reset per item (that costs a timer-wheel
    /// update per chunk): when it fires, it is pushed back to `last + idle` if an item came
    /// since it was set.
    last: tokio::time::Instant,
    provider: Cow<'static, str>,
}

impl Stream for Idle {
    type Item = Result<StreamChunk, LlmError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Poll::Ready(item) = self.inner.as_mut().poll_next(cx) {
            self.last = tokio::time::Instant::now();
            return Poll::Ready(item);
        }
        loop {
            std::task::ready!(self.sleep.as_mut().poll(cx));
            // Saturating: an idle limit too large for the clock (`Duration::MAX`) is no limit.
            let due = self
                .last
                .checked_add(self.idle.min(crate::config::MAX_DURATION));
            match due {
                Some(due) if due > self.sleep.deadline() => self.sleep.as_mut().reset(due),
                _ => break,
            }
        }
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
