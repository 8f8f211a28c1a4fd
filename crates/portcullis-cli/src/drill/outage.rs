//! `drill outage`: the primary answers 503 to everything for a middle phase.

use std::sync::Arc;
use std::time::Duration;

use portcullis::ProviderStack;
use portcullis::layers::circuit_breaker::Transition as BreakerTransition;
use portcullis::sim::{Family, FaultRule, Phase, SimHandle, Simulator};
use serde::Serialize;
use tokio::sync::broadcast;
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;

use super::seed::SeedClient;
use super::stacks::{self, StackKind};
use super::workload::{self, Outcome, StackService};
use super::{Latency, Report, TIME_SCALE, Which, each_stack, latency, svg};

const HEALTHY_BEFORE: Duration = Duration::from_secs(2);
const OUTAGE: Duration = Duration::from_secs(5);
const HEALTHY_AFTER: Duration = Duration::from_secs(3);
const RATE: f64 = 40.0;
const MODEL: &str = "gpt-4o-mini";
const SECONDARY_MODEL: &str = "claude-haiku-4-5";
const MAX_TOKENS: u32 = 16;

/// The outage's settings.
#[derive(Debug, Serialize)]
pub struct Scenario {
    description: &'static str,
    rate_per_sec: f64,
    healthy_before_ms: u64,
    outage_ms: u64,
    healthy_after_ms: u64,
    time_scale: f64,
}

/// One stack's run through the outage.
#[derive(Debug, Serialize)]
pub struct Row {
    /// The stack (with the `async-openai` feature, also `async-openai defaults` and
    /// `async-openai + portcullis`, on the primary alone: async-openai has no fallback).
    name: String,
    requests: usize,
    succeeded: usize,
    failed: usize,
    success_rate: f64,
    latency_ms: Latency,
    upstream_calls: UpstreamCalls,
    primary_calls_during_outage: u64,
    /// From the outage's start to the first answer served by the secondary.
    failover_ms: Option<u64>,
    /// From the outage's end to the first answer served by the primary again.
    recovery_ms: Option<u64>,
    breaker_transitions: Vec<Transition>,
}

/// Calls each simulator received.
#[derive(Debug, Serialize)]
pub struct UpstreamCalls {
    primary: u64,
    secondary: u64,
}

/// A transition of the primary's breaker.
#[derive(Debug, Serialize)]
pub struct Transition {
    at_ms: u64,
    from: String,
    to: String,
}

/// Runs the drill; the timelines are for the chart.
pub async fn run(
    seed: u64,
) -> Result<(Report<Scenario, Row>, Vec<svg::Timeline>), Box<dyn std::error::Error>> {
    let total = HEALTHY_BEFORE + OUTAGE + HEALTHY_AFTER;
    #[allow(unused_mut)]
    let (mut stacks, timelines): (Vec<Row>, Vec<svg::Timeline>) =
        each_stack(Which::Outage, total, |kind| one(kind, seed))
            .await?
            .into_iter()
            .unzip();
    // async-openai has no fallback: its rows go to the primary alone.
    #[cfg(feature = "async-openai")]
    for setup in super::async_openai::Setup::ALL {
        super::progress(&format!(
            "drill {}: running {} ({} s)…",
            Which::Outage,
            setup.name(),
            total.as_secs()
        ));
        let (primary, secondary) = start_sims(seed).await?;
        let (svc, breaker) = super::async_openai::service(&primary.openai_base_url(), setup, seed)?;
        let events = breaker.map(|b| b.subscribe());
        let run = measure(&primary, &secondary, svc, events, None, seed).await?;
        stacks.push(run.row(setup.name().to_owned(), &primary, &secondary));
        primary.shutdown().await;
        secondary.shutdown().await;
    }
    let report = Report {
        drill: Which::Outage,
        seed,
        scenario: Scenario {
            description: "primary (OpenAI) healthy, then 503 on everything, then healthy; secondary (Anthropic) healthy",
            rate_per_sec: RATE,
            healthy_before_ms: HEALTHY_BEFORE.as_millis() as u64,
            outage_ms: OUTAGE.as_millis() as u64,
            healthy_after_ms: HEALTHY_AFTER.as_millis() as u64,
            time_scale: TIME_SCALE,
        },
        stacks,
    };
    Ok((report, timelines))
}

async fn one(
    kind: StackKind,
    seed: u64,
) -> Result<(Row, svg::Timeline), Box<dyn std::error::Error>> {
    let (primary, secondary) = start_sims(seed).await?;
    let openai = stacks::openai(&primary.openai_base_url())?;
    let anthropic = stacks::anthropic(&secondary.anthropic_base_url())?;

    let mut breaker_events = None;
    let mut seed_client = None;
    let svc = match kind {
        StackKind::Bare => stacks::bare(openai),
        StackKind::Seed => {
            let client = stacks::seed(
                vec![
                    ("openai".into(), BoxCloneSyncService::new(openai), None),
                    (
                        "anthropic".into(),
                        BoxCloneSyncService::new(anthropic),
                        Some(Arc::from(SECONDARY_MODEL)),
                    ),
                ],
                None,
                seed,
            );
            seed_client = Some(client.clone());
            BoxCloneSyncService::new(client)
        }
        StackKind::Portcullis => {
            let stack = stacks::portcullis(vec![
                stacks::provider_stack(ProviderStack::openai(openai), None, seed),
                stacks::provider_stack(
                    ProviderStack::anthropic(anthropic).model(SECONDARY_MODEL),
                    None,
                    seed,
                ),
            ])?;
            breaker_events = stack.provider("openai").map(|h| h.breaker.subscribe());
            BoxCloneSyncService::new(stack.completions())
        }
    };

    let run = measure(
        &primary,
        &secondary,
        svc,
        breaker_events,
        seed_client.as_ref(),
        seed,
    )
    .await?;
    let row = run.row(kind.to_string(), &primary, &secondary);
    primary.shutdown().await;
    secondary.shutdown().await;
    let timeline = svg::Timeline {
        name: kind,
        outcomes: run.outcomes,
        transitions: run.transitions,
        outage: (HEALTHY_BEFORE, HEALTHY_BEFORE + OUTAGE),
        total: HEALTHY_BEFORE + OUTAGE + HEALTHY_AFTER,
    };
    Ok((row, timeline))
}

/// The primary and the secondary simulator.
async fn start_sims(seed: u64) -> Result<(SimHandle, SimHandle), Box<dyn std::error::Error>> {
    let primary = Simulator::builder().seed(seed).start().await?;
    let secondary = Simulator::builder().seed(seed).start().await?;
    Ok((primary, secondary))
}

/// One run through the outage: every outcome, the primary's breaker transitions, and the
/// primary's calls during the outage.
struct Run {
    outcomes: Vec<Outcome>,
    transitions: Vec<(Duration, String, String)>,
    primary_calls_during_outage: u64,
}

/// Plays the outage on `primary` while the workload goes through `svc`.
async fn measure(
    primary: &SimHandle,
    secondary: &SimHandle,
    svc: StackService,
    breaker_events: Option<broadcast::Receiver<BreakerTransition<Arc<str>>>>,
    seed_client: Option<&SeedClient>,
    seed: u64,
) -> Result<Run, Box<dyn std::error::Error>> {
    primary.set_timeline(vec![
        Phase::new(HEALTHY_BEFORE.as_secs_f64(), vec![]),
        Phase::new(
            OUTAGE.as_secs_f64(),
            vec![FaultRule::status(503).family(Family::Openai)],
        ),
        Phase::forever(vec![]),
    ])?;
    primary.reset_stats();
    secondary.reset_stats();
    let start = Instant::now();
    let total = HEALTHY_BEFORE + OUTAGE + HEALTHY_AFTER;
    let during = async {
        tokio::time::sleep_until(start + HEALTHY_BEFORE).await;
        let before = primary.stats().requests;
        tokio::time::sleep_until(start + HEALTHY_BEFORE + OUTAGE).await;
        primary.stats().requests - before
    };
    let work = workload::run(svc, RATE, total, |i| {
        workload::request(i, seed, MODEL, MAX_TOKENS)
    });
    let (outcomes, primary_calls_during_outage) = tokio::join!(work, during);

    let transitions: Vec<(Duration, String, String)> = match (breaker_events, seed_client) {
        (Some(mut rx), _) => {
            let mut v = Vec::new();
            while let Ok(t) = rx.try_recv() {
                v.push((
                    t.at.saturating_duration_since(start),
                    t.from.as_str().to_string(),
                    t.to.as_str().to_string(),
                ));
            }
            v
        }
        (None, Some(c)) => c
            .primary_transitions()
            .into_iter()
            .map(|(at, from, to)| {
                (
                    at.saturating_duration_since(start),
                    from.to_string(),
                    to.to_string(),
                )
            })
            .collect(),
        _ => Vec::new(),
    };
    Ok(Run {
        outcomes,
        transitions,
        primary_calls_during_outage,
    })
}

impl Run {
    /// The run's row.
    fn row(&self, name: String, primary: &SimHandle, secondary: &SimHandle) -> Row {
        let outcomes = &self.outcomes;
        let ok = outcomes.iter().filter(|o| o.result.is_ok()).count();
        let served_by = |o: &Outcome, p: &str| matches!(&o.result, Ok(s) if s.provider == p);
        let outage_start = HEALTHY_BEFORE;
        let outage_end = HEALTHY_BEFORE + OUTAGE;
        let failover_ms = outcomes
            .iter()
            .filter(|o| served_by(o, "anthropic") && o.done >= outage_start)
            .map(|o| o.done - outage_start)
            .min()
            .map(|d| d.as_millis() as u64);
        let recovery_ms = outcomes
            .iter()
            .filter(|o| served_by(o, "openai") && o.sent >= outage_end)
            .map(|o| o.done - outage_end)
            .min()
            .map(|d| d.as_millis() as u64);
        Row {
            name,
            requests: outcomes.len(),
            succeeded: ok,
            failed: outcomes.len() - ok,
            success_rate: ratio(ok, outcomes.len()),
            latency_ms: latency(outcomes, true),
            upstream_calls: UpstreamCalls {
                primary: primary.stats().requests,
                secondary: secondary.stats().requests,
            },
            primary_calls_during_outage: self.primary_calls_during_outage,
            failover_ms,
            recovery_ms,
            breaker_transitions: self
                .transitions
                .iter()
                .map(|(at, from, to)| Transition {
                    at_ms: at.as_millis() as u64,
                    from: from.clone(),
                    to: to.clone(),
                })
                .collect(),
        }
    }
}

/// `a / b`, rounded to four places.
pub fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        (a as f64 / b as f64 * 10_000.0).round() / 10_000.0
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::drill::Latency;

    /// The typed report serializes to the keys and shape `--json` has always printed.
    #[test]
    fn a_row_serializes_to_the_documented_shape() {
        let row = Row {
            name: "portcullis".into(),
            requests: 2,
            succeeded: 2,
            failed: 0,
            success_rate: 1.0,
            latency_ms: Latency {
                p50: 1.5,
                p99: 2.0,
                max: Some(3.0),
            },
            upstream_calls: UpstreamCalls {
                primary: 1,
                secondary: 1,
            },
            primary_calls_during_outage: 1,
            failover_ms: Some(77),
            recovery_ms: None,
            breaker_transitions: vec![Transition {
                at_ms: 5,
                from: "closed".into(),
                to: "open".into(),
            }],
        };
        assert_eq!(
            serde_json::to_value(&row).unwrap(),
            json!({
                "name": "portcullis",
                "requests": 2,
                "succeeded": 2,
                "failed": 0,
                "success_rate": 1.0,
                "latency_ms": {"p50": 1.5, "p99": 2.0, "max": 3.0},
                "upstream_calls": {"primary": 1, "secondary": 1},
                "primary_calls_during_outage": 1,
                "failover_ms": 77,
                "recovery_ms": null,
                "breaker_transitions": [{"at_ms": 5, "from": "closed", "to": "open"}],
            })
        );
    }
}
