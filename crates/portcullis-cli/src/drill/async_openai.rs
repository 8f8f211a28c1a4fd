//! The async-openai rows of `drill rate-limit` and `drill outage` (feature `async-openai`):
//! async-openai 0.43 with its defaults, and with `portcullis::async_openai` inside, each
//! driven by the drills' workload through async-openai's own client and types.

use std::sync::Arc;
use std::time::Duration;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::chat::{
    ChatCompletionRequestAssistantMessageArgs, ChatCompletionRequestMessage,
    ChatCompletionRequestSystemMessageArgs, ChatCompletionRequestUserMessageArgs,
    CreateChatCompletionRequest, CreateChatCompletionRequestArgs,
};
use portcullis::async_openai as adapter;
use portcullis::layers::circuit_breaker::CircuitBreakerHandle;
use portcullis::layers::token_bucket::{DEFAULT_MAX_WAIT, TokenBucketConfig};
use portcullis::{ChatRequest, CompletionResult, ErrorKind, LlmError, Role, Usage};
use tower::util::BoxCloneSyncService;

use super::scaled;
use super::stacks::{self, ATTEMPT_TIMEOUT, DEADLINE};
use super::workload::StackService;

/// The two async-openai clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setup {
    /// async-openai with its defaults (its own `OpenAIRetryLayer`, no timeout).
    Defaults,
    /// async-openai with `portcullis::async_openai::service`, scaled like the other stacks.
    Portcullis,
}

impl Setup {
    /// Both, in the order they run.
    pub const ALL: [Setup; 2] = [Setup::Defaults, Setup::Portcullis];

    /// The row's name.
    pub fn name(self) -> &'static str {
        match self {
            Setup::Defaults => "async-openai defaults",
            Setup::Portcullis => "async-openai + portcullis",
        }
    }
}

/// The adapter's breakers (`None` for async-openai's defaults, which have none).
pub type Breakers = Option<CircuitBreakerHandle<Arc<str>>>;

/// The client for `setup` against the simulator at `base_url`, as a drill stack; with the
/// adapter's breakers, for the outage drill's transitions.
pub fn service(
    base_url: &str,
    setup: Setup,
    seed: u64,
) -> Result<(StackService, Breakers), Box<dyn std::error::Error>> {
    let config = OpenAIConfig::new()
        .with_api_base(base_url)
        .with_api_key("sk-portcullis-drill");
    let (client, breaker) = match setup {
        Setup::Defaults => (Client::with_config(config), None),
        Setup::Portcullis => {
            let svc = adapter::service(adapter_config(seed))?;
            let breaker = svc.breaker().clone();
            (
                Client::with_config(config).with_http_service(svc),
                Some(breaker),
            )
        }
    };
    let svc = tower::service_fn(move |req: ChatRequest| {
        let client = client.clone();
        async move {
            let res = client.chat().create(request(&req)?).await.map_err(error)?;
            let content = res
                .choices
                .first()
                .and_then(|c| c.message.content.clone())
                .unwrap_or_default();
            let usage = res.usage.map_or_else(Usage::default, |u| {
                Usage::new(u64::from(u.prompt_tokens), u64::from(u.completion_tokens))
            });
            Ok(CompletionResult::new(portcullis::OPENAI, res.model, content).with_usage(usage))
        }
    });
    Ok((BoxCloneSyncService::new(svc), breaker))
}

/// The adapter's defaults, every duration scaled as the Portcullis stack's are; limits learned.
fn adapter_config(seed: u64) -> adapter::Config {
    let mut config = adapter::Config::default();
    config.http.deadline = scaled(DEADLINE);
    config.http.attempt_timeout = scaled(ATTEMPT_TIMEOUT);
    config.http.stream_idle_timeout = scaled(ATTEMPT_TIMEOUT);
    config.http.retry = stacks::retry_config(seed);
    config.http.breaker = stacks::breaker_config();
    config.http.limits = TokenBucketConfig::new()
        .max_wait(scaled(DEFAULT_MAX_WAIT))
        .learn_window(scaled(Duration::from_secs(60)));
    config
}

/// The drill's request in async-openai's types.
fn request(req: &ChatRequest) -> Result<CreateChatCompletionRequest, LlmError> {
    let invalid = |e: OpenAIError| LlmError::new(ErrorKind::InvalidRequest, e.to_string());
    if req.messages.iter().any(|m| m.role == Role::Tool) {
        // The drill's conversations are text only.
        return Err(LlmError::new(
            ErrorKind::Unsupported,
            "the async-openai drill sends text messages only",
        ));
    }
    let messages = req
        .messages
        .iter()
        .map(|m| -> Result<ChatCompletionRequestMessage, OpenAIError> {
            let text = m.text().into_owned();
            Ok(match m.role {
                Role::System => ChatCompletionRequestSystemMessageArgs::default()
                    .content(text)
                    .build()?
                    .into(),
                Role::Assistant => ChatCompletionRequestAssistantMessageArgs::default()
                    .content(text)
                    .build()?
                    .into(),
                Role::User | Role::Tool => ChatCompletionRequestUserMessageArgs::default()
                    .content(text)
                    .build()?
                    .into(),
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(invalid)?;
    CreateChatCompletionRequestArgs::default()
        .model(&*req.model)
        .max_completion_tokens(req.options.max_tokens)
        .temperature(req.options.temperature)
        .messages(messages)
        .build()
        .map_err(invalid)
}

/// An async-openai error as the drills count it: by its kind.
fn error(e: OpenAIError) -> LlmError {
    if let Some(r) = adapter::refusal(&e) {
        return LlmError::from(r.clone());
    }
    if let Some(l) = adapter::llm_error(&e) {
        return LlmError::new(l.kind(), l.to_string());
    }
    let kind = match &e {
        OpenAIError::ApiError(a) => ErrorKind::from_wire(
            Some(a.status_code.as_u16()),
            a.api_error.r#type.as_deref(),
            a.api_error.code.as_deref(),
        ),
        OpenAIError::Reqwest(r) if r.is_timeout() => ErrorKind::Timeout,
        OpenAIError::Reqwest(_) => ErrorKind::Connect,
        OpenAIError::Boxed(_) => ErrorKind::Connect,
        _ => ErrorKind::Protocol,
    };
    LlmError::new(kind, e.to_string())
}
