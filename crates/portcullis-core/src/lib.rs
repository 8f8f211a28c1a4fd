//! # portcullis-core
//!
//! The vocabulary every Portcullis crate shares:
//!
//! - the chat types: [`ChatRequest`], [`ChatMessage`] of [`Part`]s, [`CompletionOptions`]
//!   with [`Tool`]s, [`ToolChoice`], [`ResponseFormat`] and [`Reasoning`],
//!   [`CompletionResult`] with its [`ToolCall`]s, [`Usage`], [`FinishReason`], [`StreamChunk`],
//!   [`ChatStream`] (the [`content`] module has the parts and the tools);
//! - one typed error, [`LlmError`], with an [`ErrorKind`] per row of the classification table,
//!   and [`ErrorKind::from_wire`], the one place that maps statuses and provider error types;
//! - the layers' own refusals, in one type, [`Refusal`]: [`CircuitOpen`], [`Throttled`],
//!   [`OverCapacity`], [`DeadlineExceeded`], [`AttemptTimedOut`]; and [`RetriesExhausted`];
//! - the traits the layers are generic over: [`Classify`] (errors), [`OnFinish`] (responses;
//!   [`Finished`] wraps a response type you do not own), [`RequestInfo`] and [`CostOf`]
//!   (requests); the contract is spelled out in [`classify`];
//! - [`RateLimitHints`], parsed from response headers in one place;
//! - token estimation: [`TokenEstimator`], [`OpenAiTokenizer`], [`AnthropicEstimator`].
#![forbid(unsafe_code)]

pub mod classify;
pub mod config;
pub mod content;
pub mod error;
pub mod hints;
pub mod kind;
pub mod refusal;
pub mod request;
pub mod response;
pub mod tokens;

pub use classify::{
    Classification, Classify, Failover, Finish, Finished, OnFinish, Replay, RequestInfo,
};
pub use config::ConfigError;
pub use content::{
    CacheControl, ImageDetail, InvalidArguments, InvalidTool, MediaSource, Part, Reasoning,
    ReasoningEffort, Tool, ToolCall, ToolChoice, base64_decode, image_media_type,
};
pub use error::{BoxError, LlmError};
pub use hints::{LimitHint, RateLimitHints};
pub use kind::ErrorKind;
pub use refusal::{
    AttemptTimedOut, CircuitOpen, DeadlineExceeded, OverCapacity, Refusal, RetriesExhausted,
    RetryStop, Throttled,
};
pub use request::{ChatMessage, ChatRequest, CompletionOptions, ResponseFormat, Role};
pub use response::{
    ChatStream, CompletionResult, FinishReason, StreamChunk, StreamMeta, ThinkingDelta,
    ToolCallDelta, Usage,
};
pub use tokens::{
    AnthropicEstimator, ChatCost, CostOf, Encoding, OpenAiTokenizer, TokenCost, TokenEstimator,
    estimator_for_model,
};

/// The provider name of OpenAI services.
pub const OPENAI: &str = "openai";
/// The provider name of Anthropic services.
pub const ANTHROPIC: &str = "anthropic";
