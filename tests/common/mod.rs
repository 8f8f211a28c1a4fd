//! What the integration tests share: a key the simulator accepts, a retry with short backoffs,
//! and providers pointed at a simulator.
#![allow(dead_code)]

use std::time::Duration;

use portcullis::layers::retry::RetryConfig;
use portcullis::providers::{AnthropicProvider, ApiKey, OpenAiProvider};
use portcullis_sim::SimHandle;

/// A key the simulator accepts (any non-empty one).
pub fn key() -> ApiKey {
    ApiKey::new("sk-test").unwrap()
}

/// `max_retries` retries, 5 ms doubling to 10 ms: outages play out in milliseconds.
pub fn fast_retry(max_retries: u32) -> RetryConfig {
    RetryConfig {
        max_retries,
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(10),
        ..RetryConfig::default()
    }
}

/// The OpenAI provider of `sim`.
pub fn openai(sim: &SimHandle) -> OpenAiProvider {
    OpenAiProvider::builder()
        .base_url(sim.openai_base_url())
        .api_key(key())
        .build()
        .unwrap()
}

/// The Anthropic provider of `sim`.
pub fn anthropic(sim: &SimHandle) -> AnthropicProvider {
    AnthropicProvider::builder()
        .base_url(sim.anthropic_base_url())
        .api_key(key())
        .build()
        .unwrap()
}
