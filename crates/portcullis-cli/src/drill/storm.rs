//! `drill storm`: the primary answers 503 to everything, and there is no fallback.

use std::time::Duration;

use portcullis::ProviderStack;
use portcullis::sim::{FaultRule, Simulator};
use serde_json::{Value, json};
use tower::util::BoxCloneSyncService;

use super::stacks::{self, NAMES};
use super::workload;
use super::{Report, latency, progress};

const DURATION: Duration = Duration::from_secs(8);
const RATE: f64 = 40.0;
const MODEL: &str = "gpt-4o-mini";

pub async fn run(seed: u64) -> Result<Report, Box<dyn std::error::Error>> {
    let mut stacks_json = Vec::new();
    for name in NAMES {
        progress(&format!(
            "drill storm: running {name} ({} s)…",
            DURATION.as_secs()
        ));
        stacks_json.push(one(name, seed).await?);
    }
    Ok(Report {
        json: json!({
            "drill": "storm",
            "seed": seed,
            "scenario": {
                "description": "the primary answers 503 to everything for the whole run; no fallback",
                "rate_per_sec": RATE,
                "duration_ms": DURATION.as_millis() as u64,
                "time_scale": 1.0 / super::SCALE,
            },
            "stacks": stacks_json,
        }),
        timelines: Vec::new(),
    })
}

async fn one(name: &str, seed: u64) -> Result<Value, Box<dyn std::error::Error>> {
    let sim = Simulator::builder()
        .seed(seed)
        .fault(FaultRule::status(503))
        .start()
        .await?;
    let openai = stacks::openai(&sim.openai_base_url())?;
    let svc = match name {
        "bare" => stacks::bare(openai),
        "seed" => BoxCloneSyncService::new(stacks::seed(
            vec![("openai".into(), BoxCloneSyncService::new(openai), None)],
            None,
            seed,
        )),
        _ => {
            let stack = stacks::portcullis(vec![stacks::provider_stack(
                ProviderStack::openai(openai),
                None,
                seed,
            )])?;
            BoxCloneSyncService::new(stack.completions())
        }
    };
    sim.reset_stats();
    let outcomes = workload::run(svc, RATE, DURATION, |i| {
        workload::request(i, seed, MODEL, 16)
    })
    .await;
    let calls = sim.stats().requests;
    sim.shutdown().await;
    let requests = outcomes.len();
    Ok(json!({
        "name": name,
        "requests": requests,
        "upstream_calls": calls,
        "amplification": if requests == 0 { 0.0 } else { (calls as f64 / requests as f64 * 1000.0).round() / 1000.0 },
        "latency_ms": latency(&outcomes, false),
    }))
}
