//! # portcullis
//!
//! Resilient LLM API clients as tower middleware. This facade re-exports the workspace's
//! crates and adds [`Stack`], the recommended composition of the layers over the providers.
//!
//! | crate | what |
//! |---|---|
//! | [`core`] | chat types, [`LlmError`] and its classification, rate-limit hints, token estimation |
//! | [`layers`] | retry, circuit breaker, token bucket, fallback, timeouts (no hyper) |
//! | [`providers`] | OpenAI and Anthropic over hyper + rustls, one SSE decoder |
//! | [`http`] | the layers over raw `http::Request<Bytes>` → `http::Response<B>` calls (OpenAI and Anthropic wire formats), no `ChatRequest` in between |
//! | `async_openai` (feature `async-openai`, off by default) | the whole resilience inside an existing async-openai client, in a few lines |
//! | `sim` (feature `sim`, off by default) | the simulated OpenAI + Anthropic server every test, example and drill runs against |
#![forbid(unsafe_code)]

#[cfg(feature = "async-openai")]
pub mod async_openai;
pub mod http;
pub mod stack;

pub use portcullis_core as core;
pub use portcullis_core::*;
pub use portcullis_layers as layers;
pub use portcullis_layers::FailoverPolicy;
pub use portcullis_providers as providers;
#[cfg(feature = "sim")]
pub use portcullis_sim as sim;
pub use stack::{
    Api, Completions, ProviderConfig, ProviderHandles, ProviderStack, Stack, StackBuilder,
    StackConfig, StackError, Streams,
};
