//! # Quickstart: the recommended stack, and an outage it absorbs
//!
//! Builds [`portcullis::Stack`] over OpenAI (primary) and Anthropic (secondary, which gets the
//! request remapped to its own model), makes a completion, then takes the primary down and
//! shows the calls still succeeding, served by Anthropic, while the primary's circuit breaker
//! opens.
//!
//! ```text
//! cargo run --example quickstart
//! ```
//!
//! By default everything runs against the embedded simulator (no key, no network). With both
//! `OPENAI_API_KEY` and `ANTHROPIC_API_KEY` set, it calls the real APIs instead; as a real
//! outage cannot be ordered, the primary's breaker is then forced open to show the failover.
//! `PORTCULLIS_EXAMPLES_SIM=1` keeps the simulator even when the keys are set.
//! Add `RUST_LOG=portcullis_layers=info` to see the layers' own events (each failover, each
//! breaker transition).

mod common;

use std::time::Instant;

use portcullis::{ChatMessage, ChatRequest, CompletionResult};
use portcullis_sim::{Family, FaultRule, Simulator};
use tower::ServiceExt;

use common::MODEL;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let backend = common::backend(Simulator::builder().seed(7)).await?;

    // The demo stack (see common/mod.rs): retries with a short backoff, so that the outage
    // below plays out in well under a second; everything else is the default.
    let stack = backend.stack().build()?;
    let primary = stack
        .provider("openai")
        .ok_or("no primary")?
        .breaker
        .clone();
    let mut transitions = primary.subscribe();

    println!("\n## 1. a healthy call");
    let req = ChatRequest::new(
        MODEL,
        vec![
            ChatMessage::system("Be brief."),
            ChatMessage::user("Name one fact about owls."),
        ],
    )
    .max_tokens(40);
    let started = Instant::now();
    let res = stack.completions().oneshot(req.clone()).await?;
    report(&res, started);
    println!("   breaker openai:{MODEL} is {}", primary.state(MODEL));

    println!("\n## 2. the primary goes down");
    match &backend.sim {
        Some(sim) => {
            println!("   (simulator: every OpenAI call now answers 503)");
            sim.set_faults(vec![FaultRule::status(503).family(Family::Openai)])?;
        }
        None => {
            println!("   (real APIs: forcing the primary's breaker open)");
            primary.force_open(MODEL);
        }
    }
    for i in 1..=3 {
        let started = Instant::now();
        let res = stack.completions().oneshot(req.clone()).await?;
        print!("   call {i}: ");
        report(&res, started);
        let m = primary.metrics(MODEL).ok_or("no metrics")?;
        println!(
            "   breaker openai:{MODEL} is {} (failures {}, refused {})",
            m.state, m.failures, m.rejected
        );
    }
    if let Some(sim) = &backend.sim {
        let stats = sim.stats();
        println!(
            "   the simulator saw {} OpenAI and {} Anthropic calls",
            stats.endpoint("chat_completions"),
            stats.endpoint("messages")
        );
    }

    println!("\n## breaker transitions");
    while let Ok(t) = transitions.try_recv() {
        println!("   {t}");
    }
    Ok(())
}

fn report(res: &CompletionResult, started: Instant) {
    println!(
        "served by {} ({}), {} in + {} out = {} tokens, provider latency {:.1?}, total {:.1?}",
        res.provider,
        res.model,
        res.usage.input_tokens,
        res.usage.output_tokens,
        res.usage.total_tokens,
        res.latency,
        started.elapsed(),
    );
    println!("   > {}", res.content.trim());
}
