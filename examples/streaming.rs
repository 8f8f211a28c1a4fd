//! # Streaming through the stack, and the commit point
//!
//! `stack.streams()` is the streaming face of [`portcullis::Stack`]: its future resolves at the
//! first content chunk (the *commit point*), then the deltas arrive as a
//! [`ChatStream`](portcullis::ChatStream). This example:
//!
//! 1. prints the deltas of a healthy stream as they arrive;
//! 2. makes the primary fail once *before* the first chunk: the retry layer calls it again;
//! 3. makes the primary fail every time before the first chunk: retries, then the fallback to
//!    Anthropic, invisible to the caller but for `meta().provider`;
//! 4. makes the primary fail *after* some content: nothing can be retried or failed over any
//!    more (the caller already printed the text), so the stream ends with a
//!    `StreamInterrupted` error.
//!
//! ```text
//! cargo run --example streaming
//! ```
//!
//! Runs against the embedded simulator. With both `OPENAI_API_KEY` and `ANTHROPIC_API_KEY` set,
//! step 1 streams from the real OpenAI API, and the fault steps (which need the simulator's
//! fault injection) are skipped.
//! `PORTCULLIS_EXAMPLES_SIM=1` keeps the simulator even when the keys are set.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use portcullis::{ChatMessage, ChatRequest, Streams};
use portcullis_sim::{Family, FaultKind, FaultRule, SimHandle, Simulator};
use tower::ServiceExt;

use common::MODEL;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // A pause between streamed events, so that the deltas visibly arrive one by one.
    let sim = Simulator::builder()
        .seed(11)
        .chunk_delay(Duration::from_millis(15));
    let backend = common::backend(sim).await?;
    let stack = backend.stack().build()?;
    let primary = stack
        .provider("openai")
        .ok_or("no primary")?
        .breaker
        .clone();

    println!("\n## 1. a healthy stream");
    stream_once(&stack.streams(), 1).await?;
    let Some(sim) = &backend.sim else {
        println!("\n(the fault steps need the simulator: unset a key to run them)");
        return Ok(());
    };

    println!("\n## 2. the primary fails once before the first chunk: retried");
    inject(sim, FaultRule::new(FaultKind::ErrorBeforeContent).times(1))?;
    stream_once(&stack.streams(), 2).await?;
    calls(sim);

    println!("\n## 3. the primary always fails before the first chunk: failed over");
    inject(sim, FaultRule::new(FaultKind::ErrorBeforeContent))?;
    stream_once(&stack.streams(), 3).await?;
    calls(sim);

    println!("\n## 4. the primary fails after some content: the stream is interrupted");
    // Start from a closed breaker with clean counters, as the steps above left failures on it.
    primary.reset(MODEL);
    inject(sim, FaultRule::new(FaultKind::ErrorAfterContent))?;
    stream_once(&stack.streams(), 4).await?;
    calls(sim);
    Ok(())
}

/// Streams one answer, printing each delta as it arrives, and how the stream ended.
async fn stream_once(streams: &Streams, i: u32) -> Result<(), portcullis::LlmError> {
    let req = ChatRequest::new(
        MODEL,
        vec![ChatMessage::user(format!(
            "Request {i}: tell me about lighthouses."
        ))],
    )
    .max_tokens(30);
    let started = Instant::now();
    // Resolves at the first content chunk: every failure before it was retried or failed over.
    let mut stream = streams.clone().oneshot(req).await?;
    println!(
        "   first chunk after {:.1?} from {} ({})",
        started.elapsed(),
        stream.meta().provider,
        stream.meta().model
    );
    print!("   > ");
    let mut chunks = 0;
    while let Some(item) = stream.next().await {
        match item {
            Ok(chunk) => {
                chunks += 1;
                print!("{}", chunk.delta);
                let _ = std::io::stdout().flush();
            }
            Err(e) => {
                println!("\n   stream ended with an error after {chunks} chunks: {e}");
                println!("   kind = {:?}", e.kind());
                return Ok(());
            }
        }
    }
    let usage = stream.usage().unwrap_or_default();
    println!(
        "\n   {chunks} chunks in {:.1?}; usage {} in + {} out",
        started.elapsed(),
        usage.input_tokens,
        usage.output_tokens
    );
    Ok(())
}

/// Replaces the simulator's faults with `rule`, on OpenAI only, and zeroes its counters.
fn inject(sim: &SimHandle, rule: FaultRule) -> Result<(), portcullis_sim::ScenarioError> {
    sim.reset_stats();
    sim.set_faults(vec![rule.family(Family::Openai)])
}

fn calls(sim: &SimHandle) {
    let s = sim.stats();
    println!(
        "   upstream calls: openai {}, anthropic {}",
        s.endpoint("chat_completions"),
        s.endpoint("messages")
    );
}
