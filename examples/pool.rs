//! # Pools: one model on two Azure regions and an OpenAI key, spread by headroom
//!
//! Three deployments of `gpt-4o-mini`, one priority group of the [`portcullis::Stack`]:
//! Azure `eu` (its own limits: 20 requests a minute), Azure `us`, and an OpenAI key. Each has
//! its own breaker and bucket; every call goes to the one with the most headroom left after it
//! (the limits are learned from each deployment's rate-limit headers), and a failure goes to a
//! sibling at once. Halfway, `us` goes down: its calls move to the others without a single
//! failed call.
//!
//! ```text
//! cargo run --example pool
//! ```
//!
//! Against the embedded simulator (one per deployment here), which serves the Azure
//! deployment route and the OpenAI one. It exits non-zero if a call failed or a deployment
//! answered 429.

use std::time::Duration;

use portcullis::layers::pool::PoolConfig;
use portcullis::providers::{ApiKey, AzureOpenAi, AzureOpenAiProvider, OpenAiProvider};
use portcullis::{ChatMessage, ChatRequest, ProviderStack, Stack};
use portcullis_sim::{FaultRule, Limits, OpenAiLimits, Simulator};
use tower::ServiceExt;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Three simulators, one per deployment, so that one can go down alone. A 6 s "minute";
    // `gpt-4o-eu` has its own, smaller limits.
    let mut limits = Limits {
        time_scale: 10.0,
        ..Limits::default()
    };
    let eu_limits = OpenAiLimits {
        rpm: 20,
        tpm: 100_000,
    };
    limits.models.insert("gpt-4o-eu".into(), eu_limits);
    let sims = [
        Simulator::builder().limits(limits.clone()).start().await?,
        Simulator::builder().limits(limits.clone()).start().await?,
        Simulator::builder().limits(limits).start().await?,
    ];
    let key = || ApiKey::new("sk-portcullis-example");
    let azure = |i: usize, deployment: &str| -> Result<ProviderStack, Box<dyn std::error::Error>> {
        let p = AzureOpenAiProvider::builder_for(AzureOpenAi::new(deployment))
            .base_url(format!("http://{}", sims[i].addr()))
            .api_key(key()?)
            .build()?;
        Ok(ProviderStack::azure(p))
    };
    let openai = OpenAiProvider::builder()
        .base_url(sims[2].openai_base_url())
        .api_key(key()?)
        .build()?;
    let deployments = vec![
        azure(0, "gpt-4o-eu")?.name("azure-eu"),
        azure(1, "gpt-4o-us")?.name("azure-us"),
        ProviderStack::openai(openai).name("openai"),
    ];
    let stack = Stack::builder()
        .pool("gpt-4o-mini", PoolConfig::default(), deployments)
        .build()?;

    let req = ChatRequest::new("gpt-4o-mini", vec![ChatMessage::user("Hello")]).max_tokens(20);
    let mut failed = 0;
    for i in 0..60 {
        if i == 30 {
            sims[1].set_faults(vec![FaultRule::status(503)])?;
            println!("# call 30: azure-us goes down (503 to everything)");
        }
        if stack.completions().oneshot(req.clone()).await.is_err() {
            failed += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!("deployment   calls  in flight  latency     available in");
    for d in stack.pool("gpt-4o-mini").ok_or("no pool")?.status(&req) {
        println!(
            "{:<11}  {:>5}  {:>9}  {:>9.1?}  {:>12.1?}",
            d.name, d.finished, d.in_flight, d.latency, d.available_in
        );
    }
    let upstream_429s: u64 = sims.iter().map(|s| s.stats().status(429)).sum();
    println!("failed calls: {failed} of 60; upstream 429s: {upstream_429s}");
    if failed > 0 || upstream_429s > 0 {
        return Err("the pool let a call fail or drew a 429".into());
    }
    Ok(())
}
