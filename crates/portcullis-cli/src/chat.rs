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
    ChatMessage, ChatRequest, CompletionResult, ErrorKind, LlmError, Part, ProviderStack,
    ResponseFormat, Stack, Tool, ToolCall, ToolChoice,
};
use serde_json::{Value, json};
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
    /// Tools the model may call: a JSON file with a list of OpenAI-style definitions
    /// (`{"type":"function","function":{"name","description","parameters","strict"}}`, or
    /// the inner object alone). They work for both providers.
    #[arg(long, value_name = "FILE")]
    tools: Option<std::path::PathBuf>,
    /// Whether the model must call a tool: auto, none, required, or a tool's name.
    #[arg(long, value_name = "CHOICE", requires = "tools")]
    tool_choice: Option<String>,
    /// An image to send with the prompt: a PNG, JPEG, GIF or WebP file, or an http(s) or
    /// data: URL. May be repeated.
    #[arg(long, value_name = "PATH_OR_URL")]
    image: Vec<String>,
    /// Ask for JSON that matches a schema: a JSON file with OpenAI's `json_schema` object
    /// (`{"name","schema","strict"}`) or a bare JSON Schema.
    #[arg(long, value_name = "FILE")]
    json_schema: Option<std::path::PathBuf>,
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
    // The request first: a bad option file fails before anything starts.
    let model = args
        .model
        .clone()
        .unwrap_or_else(|| args.provider.default_model().to_owned());
    let mut messages = Vec::new();
    if let Some(s) = &args.system {
        messages.push(ChatMessage::system(s.clone()));
    }
    if args.image.is_empty() {
        messages.push(ChatMessage::user(args.prompt.clone()));
    } else {
        let mut parts = vec![Part::text(args.prompt.clone())];
        for image in &args.image {
            parts.push(image_part(image)?);
        }
        messages.push(ChatMessage::user_parts(parts));
    }
    let mut req = ChatRequest::new(model, messages).max_tokens(args.max_tokens);
    if let Some(path) = &args.tools {
        req = req.tools(read_tools(path)?);
    }
    if let Some(choice) = &args.tool_choice {
        req = req.tool_choice(match choice.as_str() {
            "auto" => ToolChoice::Auto,
            "none" => ToolChoice::None,
            "required" => ToolChoice::Required,
            name => ToolChoice::Tool(name.to_owned()),
        });
    }
    if let Some(path) = &args.json_schema {
        req = req.response_format(read_schema(path)?);
    }
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
            // The final chunk carries the whole answer: tool calls with whole arguments.
            if let Some(m) = chunk.message {
                out.tool_calls = m.tool_calls;
                out.reasoning = m.reasoning;
            }
        }
        if !args.json {
            println!();
            print_calls(&out);
        }
        out.latency = start.elapsed();
        out
    } else {
        let out = stack.completions().oneshot(req).await?;
        if !args.json {
            println!("{}", out.content);
            print_calls(&out);
        }
        out
    };
    if args.json {
        println!("{}", to_json(&result, start.elapsed()));
    }
    Ok(())
}

/// Prints each tool call on a line of its own: `tool call <id>: <name>(<arguments>)`.
fn print_calls(r: &CompletionResult) {
    for c in &r.tool_calls {
        println!("tool call {}: {}({})", c.id, c.name, c.arguments);
    }
}

/// A typed error for a bad option value.
fn bad_option(option: &str, what: impl std::fmt::Display) -> LlmError {
    LlmError::new(ErrorKind::InvalidRequest, format!("{option}: {what}"))
}

/// Reads a JSON file for `option`.
fn read_json(option: &str, path: &std::path::Path) -> Result<Value, LlmError> {
    let text = std::fs::read(path)
        .map_err(|e| bad_option(option, format_args!("{}: {e}", path.display())))?;
    serde_json::from_slice(&text)
        .map_err(|e| bad_option(option, format_args!("{}: {e}", path.display())))
}

/// `--tools FILE`: a list of OpenAI-style definitions, each checked ([`Tool::new`]).
fn read_tools(path: &std::path::Path) -> Result<Vec<Tool>, LlmError> {
    let Value::Array(defs) = read_json("--tools", path)? else {
        return Err(bad_option(
            "--tools",
            "the file must hold a JSON list of tools",
        ));
    };
    defs.iter()
        .enumerate()
        .map(|(i, def)| {
            let f = def.get("function").unwrap_or(def);
            let name = f.get("name").and_then(Value::as_str).unwrap_or_default();
            let description = f
                .get("description")
                .and_then(Value::as_str)
                .unwrap_or_default();
            let parameters = f
                .get("parameters")
                .cloned()
                .unwrap_or_else(|| json!({"type": "object", "properties": {}}));
            let strict = f.get("strict").and_then(Value::as_bool).unwrap_or(false);
            Tool::new(name, description, parameters)
                .map(|t| t.strict(strict))
                .map_err(|e| bad_option("--tools", format_args!("tool {i}: {e}")))
        })
        .collect()
}

/// `--json-schema FILE`: OpenAI's `{"name","schema","strict"}` object, or a bare schema
/// (named `response`, strict).
fn read_schema(path: &std::path::Path) -> Result<ResponseFormat, LlmError> {
    let v = read_json("--json-schema", path)?;
    let (name, schema, strict) = match v.get("schema") {
        Some(schema) if v.get("name").is_some() => (
            v["name"].as_str().unwrap_or("response").to_owned(),
            schema.clone(),
            v.get("strict").and_then(Value::as_bool).unwrap_or(true),
        ),
        _ => ("response".to_owned(), v, true),
    };
    if schema.get("type").and_then(Value::as_str) != Some("object") {
        return Err(bad_option(
            "--json-schema",
            "the schema must be an object schema (\"type\": \"object\")",
        ));
    }
    Ok(ResponseFormat::JsonSchema {
        name: name.into(),
        schema: schema.into(),
        strict,
    })
}

/// `--image PATH_OR_URL`: a URL as it is; a file by its bytes, its type read from them.
fn image_part(image: &str) -> Result<Part, LlmError> {
    if ["http://", "https://", "data:"]
        .iter()
        .any(|p| image.starts_with(p))
    {
        return Ok(Part::image_url(image));
    }
    let bytes =
        std::fs::read(image).map_err(|e| bad_option("--image", format_args!("{image}: {e}")))?;
    let media_type = portcullis::image_media_type(&bytes).ok_or_else(|| {
        bad_option(
            "--image",
            format_args!("{image}: not a PNG, JPEG, GIF or WebP image"),
        )
    })?;
    Ok(Part::image_bytes(media_type, &bytes))
}

/// A call's arguments for `--json`: the parsed JSON (`{}` for empty input), or the raw string
/// when the model wrote something that is not JSON.
fn arguments(c: &ToolCall) -> Value {
    c.arguments_json()
        .unwrap_or_else(|_| Value::String(c.arguments.clone()))
}

/// The `--json` object: exactly the documented keys.
fn to_json(r: &CompletionResult, latency: Duration) -> serde_json::Value {
    json!({
        "content": r.content,
        "tool_calls": r.tool_calls.iter().map(|c| json!({
            "id": c.id,
            "name": c.name,
            "arguments": arguments(c),
        })).collect::<Vec<_>>(),
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
