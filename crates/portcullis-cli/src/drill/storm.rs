//! `drill storm`: the primary answers 503 to everything, and there is no fallback.

use std::time::Duration;

use portcullis::ProviderStack;
use portcullis::sim::{FaultRule, Simulator};
use serde::Serialize;
use tower::util::BoxCloneSyncService;

use super::stacks::{self, StackKind};
use super::workload;
use super::{Latency, Report, TIME_SCALE, Which, each_stack, latency};

const DURATION: Duration = Duration::from_secs(8);
const RATE: f64 = 40.0;
const MODEL: &str = "gpt-4o-mini";

/// The storm's settings.
#[derive(Debug, Serialize)]
pub struct Scenario {
    description: &'static str,
    rate_per_sec: f64,
    duration_ms: u64,
    time_scale: f64,
}

/// One stack's storm.
#[derive(Debug, Serialize)]
pub struct Row {
    name: StackKind,
    requests: usize,
    upstream_calls: u64,
    /// Upstream calls per request, rounded to three places.
    amplification: f64,
    latency_ms: Latency,
}

/// Runs the drill.
pub async fn run(seed: u64) -> Result<Report<Scenario, Row>, Box<dyn std::error::Error>> {
    let stacks = each_stack(Which::Storm, DURATION, |kind| one(kind, seed)).await?;
    Ok(Report {
        drill: Which::Storm,
        seed,
        scenario: Scenario {
            description: "the primary answers 503 to everything for the whole run; no fallback",
            rate_per_sec: RATE,
            duration_ms: DURATION.as_millis() as u64,
            time_scale: TIME_SCALE,
        },
        stacks,
    })
}

async fn one(kind: StackKind, seed: u64) -> Result<Row, Box<dyn std::error::Error>> {
    let sim = Simulator::builder()
        .seed(seed)
        .fault(FaultRule::status(503))
        .start()
        .await?;
    let openai = stacks::openai(&sim.openai_base_url())?;
    let svc = match kind {
        StackKind::Bare => stacks::bare(openai),
        StackKind::Seed => BoxCloneSyncService::new(stacks::seed(
            vec![("openai".into(), BoxCloneSyncService::new(openai), None)],
            None,
            seed,
        )),
        StackKind::Portcullis => {
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
    Ok(Row {
        name: kind,
        requests,
        upstream_calls: calls,
        amplification: if requests == 0 {
            0.0
        } else {
            (calls as f64 / requests as f64 * 1000.0).round() / 1000.0
        },
        latency_ms: latency(&outcomes, false),
    })
}
