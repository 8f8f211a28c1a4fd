//! # Already using async-openai? Portcullis inside it, side by side with its defaults
//!
//! The same async-openai 0.43 client twice, against the embedded simulator (no key, no
//! network): once with its defaults (its own `OpenAIRetryLayer`: 3 retries, 100 ms × 2ⁿ, an
//! integer `Retry-After` obeyed; no timeout), once with Portcullis' adapter in one line:
//!
//! ```text
//! let client = Client::with_config(config)
//!     .with_http_service(portcullis::async_openai::service(Default::default())?);
//! ```
//!
//! Each case gets a fresh simulator and fresh clients, and prints one row of a table.
//! Time is tokio's paused clock, the same for both clients and the simulator: the table shows
//! simulated seconds (a 60 s wait takes no real time), so the whole run lasts a few seconds.
//!
//! ```text
//! cargo run --release --example async_openai --features async-openai
//! ```

use std::time::Duration;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::error::OpenAIError;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, ChatCompletionStreamOptions, CreateChatCompletionRequest,
    CreateChatCompletionRequestArgs,
};
use futures_util::StreamExt;
use portcullis::Refusal;
use portcullis::async_openai as adapter;
use portcullis_sim::{FaultKind, FaultRule, Limits, OpenAiLimits, SimHandle, Simulator};
use tokio::time::Instant;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The two clients of the table.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Setup {
    /// async-openai with its defaults.
    Defaults,
    /// async-openai + `portcullis::async_openai::service(Default::default())`.
    Portcullis,
}

fn client(sim: &SimHandle, setup: Setup) -> Result<Client<OpenAIConfig>, BoxError> {
    let config = OpenAIConfig::new()
        .with_api_base(sim.openai_base_url())
        .with_api_key("sk-example");
    Ok(match setup {
        Setup::Defaults => Client::with_config(config),
        Setup::Portcullis => {
            Client::with_config(config).with_http_service(adapter::service(Default::default())?)
        }
    })
}

fn request(i: usize) -> Result<CreateChatCompletionRequest, OpenAIError> {
    let msg = ChatCompletionRequestUserMessageArgs::default()
        .content(format!("Request {i}: one short fact about owls."))
        .build()?;
    CreateChatCompletionRequestArgs::default()
        .model("gpt-4o-mini")
        .max_completion_tokens(16u32)
        .messages(vec![msg.into()])
        .build()
}

async fn sim(limits: Option<Limits>, fault: Option<FaultRule>) -> Result<SimHandle, BoxError> {
    let mut b = Simulator::builder().seed(42);
    if let Some(l) = limits {
        b = b.limits(l);
    }
    if let Some(f) = fault {
        b = b.fault(f);
    }
    Ok(b.start().await?)
}

/// How an error reads in the table.
fn describe(e: &OpenAIError) -> String {
    if let Some(r) = adapter::refusal(e) {
        let kind = match r {
            Refusal::CircuitOpen(_) => "CircuitOpen",
            Refusal::Throttled(_) => "Throttled",
            Refusal::DeadlineExceeded(_) => "DeadlineExceeded",
            Refusal::AttemptTimedOut(_) => "AttemptTimedOut",
            _ => "refused",
        };
        return match r.retry_after() {
            Some(d) => format!("`{kind}` (retry_after {:.1} s)", d.as_secs_f64()),
            None => format!("`{kind}`"),
        };
    }
    if let Some(l) = adapter::llm_error(e) {
        return match l.retry_after() {
            Some(d) => format!("`{}` (retry_after {:.0} s)", l.kind(), d.as_secs_f64()),
            None => format!("`{}`", l.kind()),
        };
    }
    match e {
        OpenAIError::ApiError(a) => format!("ApiError {}", a.status_code.as_u16()),
        other => format!("{other}").chars().take(40).collect(),
    }
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// A completion and a stream with `include_usage`.
async fn happy(setup: Setup) -> Result<String, BoxError> {
    let sim = sim(None, None).await?;
    let client = client(&sim, setup)?;
    let res = client.chat().create(request(1)?).await?;
    let ok = res.choices[0].message.content.is_some()
        && res.choices[0].finish_reason.is_some()
        && res.usage.is_some();
    let mut req = request(2)?;
    req.stream_options = Some(ChatCompletionStreamOptions {
        include_usage: Some(true),
        ..Default::default()
    });
    let mut stream = client.chat().create_stream(req).await?;
    let (mut content, mut finish, mut usage) = (false, false, false);
    while let Some(chunk) = stream.next().await {
        let chunk = chunk?;
        if let Some(c) = chunk.choices.first() {
            content |= c.delta.content.is_some();
            finish |= c.finish_reason.is_some();
        }
        usage |= chunk.usage.is_some();
    }
    sim.shutdown().await;
    Ok(match ok && content && finish && usage {
        true => "both parse: content, finish reason, usage ✔".to_owned(),
        false => "something missing ✘".to_owned(),
    })
}

/// 503 on every request: the first call, then ten more.
async fn outage(setup: Setup) -> Result<String, BoxError> {
    let sim = sim(None, Some(FaultRule::status(503))).await?;
    let client = client(&sim, setup)?;
    let t0 = Instant::now();
    let err = client.chat().create(request(0)?).await.err();
    let first = (t0.elapsed(), sim.stats().requests);
    let mut later = Vec::new();
    for i in 1..=10 {
        let t = std::time::Instant::now();
        client.chat().create(request(i)?).await.err();
        later.push(t.elapsed());
    }
    later.sort();
    let total = sim.stats().requests;
    sim.shutdown().await;
    Ok(format!(
        "{} after {} and {} upstream requests; 10 more calls: +{} upstream requests, {:.2} ms each (median, real time)",
        err.as_ref().map_or("no error".into(), describe),
        secs(first.0),
        first.1,
        total - first.1,
        later[5].as_secs_f64() * 1000.0,
    ))
}

/// 429 with `retry-after: 20` on every request: one call, and 5 concurrent ones after it.
async fn retry_after(setup: Setup) -> Result<String, BoxError> {
    let rule = FaultRule::new(FaultKind::RateLimit).retry_after_secs(20);
    let sim = sim(None, Some(rule)).await?;
    let client = client(&sim, setup)?;
    let t0 = Instant::now();
    let err = client.chat().create(request(0)?).await.err();
    let (took, requests) = (t0.elapsed(), sim.stats().requests);
    sim.shutdown().await;
    Ok(format!(
        "{} after {}, {requests} upstream requests",
        err.as_ref().map_or("no error".into(), describe),
        secs(took),
    ))
}

/// No answer at all: give up waiting after 200 s.
async fn hang(setup: Setup) -> Result<String, BoxError> {
    let sim = sim(None, Some(FaultRule::new(FaultKind::Hang))).await?;
    let client = client(&sim, setup)?;
    let t0 = Instant::now();
    let limit = Duration::from_secs(200);
    let out = match tokio::time::timeout(limit, client.chat().create(request(0)?)).await {
        Err(_) => format!("**still waiting after {}**", secs(limit)),
        Ok(Ok(_)) => "answered?".to_owned(),
        Ok(Err(e)) => format!(
            "{} after {}, {} upstream requests",
            describe(&e),
            secs(t0.elapsed()),
            sim.stats().requests
        ),
    };
    sim.shutdown().await;
    Ok(out)
}

/// 60 requests per minute: one warm-up call, then 100 at once.
async fn burst(setup: Setup) -> Result<String, BoxError> {
    let limits = Limits {
        time_scale: 1.0,
        openai: OpenAiLimits {
            rpm: 60,
            tpm: 1_000_000,
        },
        ..Limits::default()
    };
    let sim = sim(Some(limits), None).await?;
    let client = client(&sim, setup)?;
    client.chat().create(request(0)?).await?;
    let t0 = Instant::now();
    let mut calls = Vec::new();
    for i in 1..=100 {
        let (client, req) = (client.clone(), request(i)?);
        calls.push(tokio::spawn(async move { client.chat().create(req).await }));
    }
    let (mut ok, mut local, mut failed) = (0, 0, 0);
    for c in calls {
        match c.await? {
            Ok(_) => ok += 1,
            Err(e) if adapter::refusal(&e).is_some() => local += 1,
            Err(_) => failed += 1,
        }
    }
    let took = t0.elapsed();
    let stats = sim.stats();
    sim.shutdown().await;
    let local = match local {
        0 => String::new(),
        n => format!(", {n} refused locally with `Throttled` + retry_after"),
    };
    Ok(format!(
        "{} upstream 429s of {} requests; {ok} of 100 served, {failed} failed{local}; in {}",
        stats.status(429),
        stats.requests,
        secs(took)
    ))
}

/// The rows of the table.
const CASES: [&str; 5] = [
    "a completion and a stream with `include_usage`",
    "503 on every request",
    "429 with `retry-after: 20` on every request",
    "no answer at all (a hang)",
    "60 requests per minute, 1 warm-up then 100 concurrent calls",
];

async fn run(case: usize, setup: Setup) -> Result<String, BoxError> {
    match case {
        0 => happy(setup).await,
        1 => outage(setup).await,
        2 => retry_after(setup).await,
        3 => hang(setup).await,
        _ => burst(setup).await,
    }
}

#[tokio::main(flavor = "current_thread", start_paused = true)]
async fn main() -> Result<(), BoxError> {
    println!(
        "| case | async-openai 0.43, its defaults | async-openai + `portcullis::async_openai` |"
    );
    println!("|---|---|---|");
    for (i, name) in CASES.iter().enumerate() {
        let mut cells = Vec::new();
        for setup in [Setup::Defaults, Setup::Portcullis] {
            cells.push(
                run(i, setup)
                    .await
                    .unwrap_or_else(|e| format!("error: {e}")),
            );
        }
        println!("| {name} | {} | {} |", cells[0], cells[1]);
    }
    Ok(())
}
