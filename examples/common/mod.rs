//! What the examples share: OpenAI + Anthropic providers, against the embedded simulator by
//! default, or against the real APIs when both `OPENAI_API_KEY` and `ANTHROPIC_API_KEY` are set
//! (and `PORTCULLIS_EXAMPLES_SIM` is not).

use std::time::Duration;

use portcullis::layers::retry::RetryConfig;
use portcullis::providers::{AnthropicProvider, ApiKey, OpenAiProvider};
use portcullis::{ProviderStack, StackBuilder};
use portcullis_sim::{SimHandle, Simulator};

/// The model asked for; the Anthropic entry of a stack remaps it to [`SECONDARY_MODEL`].
pub const MODEL: &str = "gpt-4o-mini";
/// The secondary's model.
pub const SECONDARY_MODEL: &str = "claude-haiku-4-5";

/// Where the providers point.
pub struct Backend {
    /// The primary.
    pub openai: OpenAiProvider,
    /// The secondary.
    pub anthropic: AnthropicProvider,
    /// The simulator both point at, or `None` for the real APIs.
    pub sim: Option<SimHandle>,
}

/// The real APIs when both keys are set, else a fresh simulator built by `sim` (one simulator
/// serves both APIs: `/v1/chat/completions` and `/v1/messages`).
pub async fn backend(sim: Simulator) -> Result<Backend, Box<dyn std::error::Error>> {
    let real = std::env::var_os("OPENAI_API_KEY").is_some()
        && std::env::var_os("ANTHROPIC_API_KEY").is_some()
        && std::env::var_os("PORTCULLIS_EXAMPLES_SIM").is_none();
    if real {
        println!("# using the real OpenAI and Anthropic APIs (keys from the environment)");
        return Ok(Backend {
            openai: OpenAiProvider::from_env()?,
            anthropic: AnthropicProvider::from_env()?,
            sim: None,
        });
    }
    let sim = sim.start().await?;
    println!("# using the embedded simulator at {}", sim.addr());
    // The simulator accepts any non-empty key.
    let key = || ApiKey::new("sk-portcullis-example");
    Ok(Backend {
        openai: OpenAiProvider::builder()
            .base_url(sim.openai_base_url())
            .api_key(key()?)
            .build()?,
        anthropic: AnthropicProvider::builder()
            .base_url(sim.anthropic_base_url())
            .api_key(key()?)
            .build()?,
        sim: Some(sim),
    })
}

impl Backend {
    /// The recommended stack over OpenAI (primary) and Anthropic (secondary, remapped to
    /// [`SECONDARY_MODEL`]), with a short retry backoff (50 ms doubling to 500 ms) so that
    /// outages play out in well under a second. Everything else is the default: 5 consecutive
    /// failures open a breaker for 60 s, 30 s attempt timeout, 150 s overall deadline.
    pub fn stack(
        &self,
    ) -> StackBuilder<portcullis::stack::Provider, portcullis::stack::ProviderStream> {
        let retry = RetryConfig {
            base_delay: Duration::from_millis(50),
            max_delay: Duration::from_millis(500),
            ..RetryConfig::default()
        };
        portcullis::Stack::builder()
            .provider(ProviderStack::openai(self.openai.clone()).retry(retry.clone()))
            .provider(
                ProviderStack::anthropic(self.anthropic.clone())
                    .model(SECONDARY_MODEL)
                    .retry(retry),
            )
    }
}
