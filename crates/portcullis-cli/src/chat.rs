//! `portcullis chat`: one prompt to one provider (the simulator when no key is set), through
//! the bare provider service.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use futures_util::StreamExt;
use portcullis::providers::{AnthropicProvider, ApiKey, OpenAiProvider};
use portcullis::sim::{SimHandle, Simulator};
use portcullis::{ChatMessage, ChatRequest, CompletionResult, LlmError};
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
    /// The prompt.
    prompt: String,
}

enum Provider {
    OpenAi(OpenAiProvider),
    Anthropic(AnthropicProvider),
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

async fn chat(args: &ChatArgs) -> Result<(), LlmError> {
    let env_var = match args.provider {
        ProviderKind::Openai => "OPENAI_API_KEY",
        ProviderKind::Anthropic => "ANTHROPIC_API_KEY",
    };
    let has_key = std::env::var(env_var)
        .map(|v| !v.trim().is_empty())
        .unwrap_or(false);
    // With no key and no base URL, the embedded simulator answers.
    let mut _sim: Option<SimHandle> = None;
    let (base_url, key) = match (&args.base_url, has_key) {
        (Some(url), true) => (Some(url.clone()), Some(ApiKey::from_env(env_var)?)),
        (Some(url), false) => (Some(url.clone()), None),
        (None, true) => (None, Some(ApiKey::from_env(env_var)?)),
        (None, false) => {
            let sim = Simulator::builder().start().await.map_err(|e| {
                LlmError::new(
                    portcullis::ErrorKind::Configuration,
                    format!("simulator: {e}"),
                )
            })?;
            let url = match args.provider {
                ProviderKind::Openai => sim.openai_base_url(),
                ProviderKind::Anthropic => sim.anthropic_base_url(),
            };
            eprintln!("{env_var} is not set: using the embedded simulator at {url}");
            _sim = Some(sim);
            (Some(url), Some(ApiKey::new("sk-portcullis-simulator")?))
        }
    };
    let provider = match args.provider {
        ProviderKind::Openai => {
            let mut b = OpenAiProvider::builder();
            if let Some(url) = &base_url {
                b = b.base_url(url.clone());
            }
            b = match key {
                Some(k) => b.api_key(k),
                None => b.without_api_key(),
            };
            Provider::OpenAi(b.build()?)
        }
        ProviderKind::Anthropic => {
            let mut b = AnthropicProvider::builder();
            if let Some(url) = &base_url {
                b = b.base_url(url.clone());
            }
            b = match key {
                Some(k) => b.api_key(k),
                None => b.without_api_key(),
            };
            Provider::Anthropic(b.build()?)
        }
    };
    let model = args.model.clone().unwrap_or_else(|| match args.provider {
        ProviderKind::Openai => "gpt-4o-mini".into(),
        ProviderKind::Anthropic => "claude-haiku-4-5".into(),
    });
    let mut messages = Vec::new();
    if let Some(s) = &args.system {
        messages.push(ChatMessage::system(s.clone()));
    }
    messages.push(ChatMessage::user(args.prompt.clone()));
    let req = ChatRequest::new(model, messages).max_tokens(args.max_tokens);
    let start = tokio::time::Instant::now();

    let result = if args.stream {
        let mut stream = match &provider {
            Provider::OpenAi(p) => p.streaming().oneshot(req).await?,
            Provider::Anthropic(p) => p.streaming().oneshot(req).await?,
        };
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
        let out = match &provider {
            Provider::OpenAi(p) => p.clone().oneshot(req).await?,
            Provider::Anthropic(p) => p.clone().oneshot(req).await?,
        };
        if !args.json {
            println!("{}", out.content);
        }
        out
    };
    if args.json {
        println!("{}", to_json(&result, result.latency));
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
