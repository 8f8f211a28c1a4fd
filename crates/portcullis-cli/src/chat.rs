//! `portcullis chat`: one prompt through the recommended [`Stack`] (the simulator when no key
//! is set): deadline → fallback (failing over first, each provider retried by its policy) →
//! per provider breaker → bucket → attempt timeout.
//!
//! The seed's defaults: a 30 s attempt timeout, 3 retries with jittered backoff (1 s, 2 s,
//! 4 s at most), a 30 s idle limit between stream chunks. The whole call is bounded by a
//! deadline of the attempts and their backoff (`timeout × (retries + 1) + Σ backoff caps + 1 s`);
//! a committed stream is bounded by it too, so a trickle cannot outlive it. A provider's
//! keep-alive (`: ping` comments, Anthropic's `ping` events) is not content: before the first
//! chunk it does not stop the attempt timeout, and after it it does not reset the idle limit.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use futures_util::StreamExt;
use portcullis::layers::retry::RetryConfig;
use portcullis::providers::{AnthropicProvider, ApiKey, OpenAiProvider};
use portcullis::sim::{SimHandle, Simulator};
use portcullis::{
    ChatMessage, ChatRequest, CompletionResult, ErrorKind, LlmError, ProviderStack, Stack,
};
use serde_json::json;
use tower::ServiceExt;

/// Which API to call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProviderKind {
    /// OpenAI Chat Completions.
    Openai,
    /// Anthropic Messages.
    Anthropic,
}

impl ProviderKind {
    fn env_var(self) -> &'static str {
        match self {
            ProviderKind::Openai => "OPENAI_API_KEY",
            ProviderKind::Anthropic => "ANTHROPIC_API_KEY",
        }
    }

    fn default_model(self) -> &'static str {
        match self {
            ProviderKind::Openai => "gpt-4o-mini",
            ProviderKind::Anthropic => "claude-haiku-4-5",
        }
    }
}

/// Arguments of `portcullis chat`.
#[derive(Debug, clap::Args)]
pub struct ChatArgs {
    /// The provider.
    #[arg(long, value_enum, default_value_t = ProviderKind::Openai)]
    provider: ProviderKind,
    /// The model (default: gpt-4o-mini for OpenAI, claude-haiku-4-5 for Anthropic).
    #[arg(long)]
    model: Option<String>,
    /// Print text as it arrives.
    #[arg(long)]
    stream: bool,
    /// The API base URL (for example the one `portcullis sim` prints).
    #[arg(long)]
    base_url: Option<String>,
    /// The most tokens to generate.
    #[arg(long, default_value_t = 1000)]
    max_tokens: u32,
    /// A system message.
    #[arg(long)]
    system: Option<String>,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
    /// Seconds one attempt may take (to the first chunk, for a stream); also the idle limit
    /// between a stream's chunks.
    #[arg(long, value_name = "SECONDS", default_value = "30", value_parser = seconds)]
    timeout: Duration,
    /// Retries after the first attempt, per provider.
    #[arg(long, default_value_t = 3)]
    retries: u32,
    /// A second provider to fail over to (its default model; its key from the environment,
    /// else the embedded simulator).
    #[arg(long, value_enum)]
    fallback: Option<ProviderKind>,
    /// The prompt.
    prompt: String,
}

/// A positive, finite number of seconds.
fn seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if secs.is_nan() || secs <= 0.0 {
        return Err(format!("must be above zero, got {s}"));
    }
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s}: {e}"))
}

pub async fn run(args: ChatArgs) -> ExitCode {
    match chat(&args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let status = e.status().map(|s| format!(" HTTP {s}")).unwrap_or_default();
            // One line: the kind, the status, the message, then every cause in the source
            // chain that the line does not already say.
            let mut line = format!("error: {}{status}: {}", e.kind(), e.message());
            let mut cause = std::error::Error::source(&e);
            while let Some(c) = cause {
                let text = c.to_string();
                if !line.contains(&text) {
                    line.push_str(": ");
                    line.push_str(&text);
                }
                cause = c.source();
            }
            eprintln!("{line}");
            ExitCode::FAILURE
        }
    }
}

/// Where a provider's calls go: its base URL (`None`: the real API) and its key.
struct Endpoint {
    base_url: Option<String>,
    key: Option<ApiKey>,
}

/// The endpoint of `kind`: `base_url` if given (with the key from the environment, if set),
/// else the real API with that key, else the embedded simulator (started once, in `sim`).
async fn endpoint(
    kind: ProviderKind,
    base_url: Option<&str>,
    sim: &mut Option<SimHandle>,
) -> Result<Endpoint, LlmError> {
    let env_var = kind.env_var();
    let has_key = std::env::var(env_var).is_ok_and(|v| !v.trim().is_empty());
    let key = || ApiKey::from_env(env_var);
    Ok(match (base_url, has_key) {
        (Some(url), true) => Endpoint {
            base_url: Some(url.to_owned()),
            key: Some(key()?),
        },
        (Some(url), false) => Endpoint {
            base_url: Some(url.to_owned()),
            key: None,
        },
        (None, true) => Endpoint {
            base_url: None,
            key: Some(key()?),
        },
        (None, false) => {
            if sim.is_none() {
                let started = Simulator::builder().start().await.map_err(|e| {
                    LlmError::new(ErrorKind::Configuration, format!("simulator: {e}"))
                })?;
                *sim = Some(started);
            }
            let sim = sim.as_ref().expect("started above");
            let url = match kind {
                ProviderKind::Openai => sim.openai_base_url(),
                ProviderKind::Anthropic => sim.anthropic_base_url(),
            };
            eprintln!("{env_var} is not set: using the embedded simulator at {url}");
            Endpoint {
                base_url: Some(url),
                key: Some(ApiKey::new("sk-portcullis-simulator")?),
            }
        }
    })
}

/// One provider of the stack, with the CLI's attempt timeout, retries and idle limit.
fn provider_stack(
    kind: ProviderKind,
    ep: Endpoint,
    args: &ChatArgs,
) -> Result<ProviderStack, LlmError> {
    macro_rules! build {
        ($builder:expr) => {{
            let mut b = $builder;
            if let Some(url) = ep.base_url {
                b = b.base_url(url);
            }
            match ep.key {
                Some(k) => b.api_key(k),
                None => b.without_api_key(),
            }
            .build()?
        }};
    }
    let p = match kind {
        ProviderKind::Openai => ProviderStack::openai(build!(OpenAiProvider::builder())),
        ProviderKind::Anthropic => ProviderStack::anthropic(build!(AnthropicProvider::builder())),
    };
    Ok(p.retry(RetryConfig {
        max_retries: args.retries,
        ..RetryConfig::default()
    })
    .attempt_timeout(args.timeout)
    .stream_idle_timeout(args.timeout))
}

/// The attempts and their backoff: `timeout × (retries + 1)` plus each retry's backoff cap
/// (the seed's 1 s, 2 s, 4 s, … up to 30 s), plus 1 s, so that the last attempt ends by its
/// own timeout rather than racing the deadline.
fn deadline(args: &ChatArgs) -> Duration {
    let retry = RetryConfig::default();
    let backoff = (0..args.retries)
        .map(|k| {
            let doubled = retry.base_delay.saturating_mul(1u32 << k.min(31));
            doubled.min(retry.max_delay)
        })
        .fold(Duration::ZERO, Duration::saturating_add);
    args.timeout
        .saturating_mul(args.retries.saturating_add(1))
        .saturating_add(backoff)
        .saturating_add(Duration::from_secs(1))
}

async fn chat(args: &ChatArgs) -> Result<(), LlmError> {
    let config = |e: portcullis::StackError| LlmError::new(ErrorKind::Configuration, e.to_string());
    let mut sim = None;
    let primary = endpoint(args.provider, args.base_url.as_deref(), &mut sim).await?;
    let deadline = deadline(args);
    let mut builder = Stack::builder()
        .deadline(deadline)
        .provider(provider_stack(args.provider, primary, args)?.stream_total_timeout(deadline));
    if let Some(kind) = args.fallback {
        let ep = endpoint(kind, None, &mut sim).await?;
        let p = provider_stack(kind, ep, args)?
            .model(kind.default_model())
            .stream_total_timeout(deadline);
        builder = builder.provider(p);
    }
    let stack = builder.build().map_err(config)?;

    let model = args
        .model
        .clone()
        .unwrap_or_else(|| args.provider.default_model().to_owned());
    let mut messages = Vec::new();
    if let Some(s) = &args.system {
        messages.push(ChatMessage::system(s.clone()));
    }
    messages.push(ChatMessage::user(args.prompt.clone()));
    let req = ChatRequest::new(model, messages).max_tokens(args.max_tokens);
    let start = tokio::time::Instant::now();

    let result = if args.stream {
        let mut stream = stack.streams().oneshot(req).await?;
        let meta = stream.meta().clone();
        let mut out = CompletionResult::new(meta.provider.clone(), meta.model.clone(), "");
        out.request_id = meta.request_id.clone();
        let mut stdout = std::io::stdout();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            if !args.json {
                let _ = write!(stdout, "{}", chunk.delta);
                let _ = stdout.flush();
            }
            out.content.push_str(&chunk.delta);
            if let Some(r) = chunk.finish_reason {
                out.finish_reason = r;
            }
            if let Some(u) = chunk.usage {
                out.usage = u;
            }
        }
        if !args.json {
            println!();
        }
        out.latency = start.elapsed();
        out
    } else {
        let out = stack.completions().oneshot(req).await?;
        if !args.json {
            println!("{}", out.content);
        }
        out
    };
    if args.json {
        println!("{}", to_json(&result, start.elapsed()));
    }
    Ok(())
}

/// The `--json` object: exactly the documented keys.
fn to_json(r: &CompletionResult, latency: Duration) -> serde_json::Value {
    json!({
        "content": r.content,
        "model": r.model,
        "finish_reason": r.finish_reason.as_str(),
        "usage": {
            "input_tokens": r.usage.input_tokens,
            "output_tokens": r.usage.output_tokens,
            "total_tokens": r.usage.total_tokens,
        },
        "latency_ms": latency.as_millis() as u64,
        "provider": r.provider,
        "request_id": r.request_id,
    })
}
