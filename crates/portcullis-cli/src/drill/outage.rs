//! `drill outage`: the primary answers 503 to everything for a middle phase.

use std::sync::Arc;
use std::time::Duration;

use portcullis::ProviderStack;
use portcullis::sim::{Family, FaultRule, Phase, Simulator};
use serde_json::{Value, json};
use tokio::time::Instant;
use tower::util::BoxCloneSyncService;

use super::stacks::{self, NAMES};
use super::workload::{self, Outcome};
use super::{Report, latency, progress, svg};

const HEALTHY_BEFORE: Duration = Duration::from_secs(2);
const OUTAGE: Duration = Duration::from_secs(5);
const HEALTHY_AFTER: Duration = Duration::from_secs(3);
const RATE: f64 = 40.0;
const MODEL: &str = "gpt-4o-mini";
const SECONDARY_MODEL: &str = "claude-haiku-4-5";
const MAX_TOKENS: u32 = 16;

pub async fn run(seed: u64) -> Result<Report, Box<dyn std::error::Error>> {
    let mut stacks_json = Vec::new();
    let mut timelines = Vec::new();
    for name in NAMES {
        progress(&format!(
            "drill outage: running {name} ({} s)…",
            (HEALTHY_BEFORE + OUTAGE + HEALTHY_AFTER).as_secs()
        ));
        let (json, timeline) = one(name, seed).await?;
        stacks_json.push(json);
        timelines.push(timeline);
    }
    Ok(Report {
        json: json!({
            "drill": "outage",
            "seed": seed,
            "scenario": {
                "description": "primary (OpenAI) healthy, then 503 on everything, then healthy; secondary (Anthropic) healthy",
                "rate_per_sec": RATE,
                "healthy_before_ms": HEALTHY_BEFORE.as_millis() as u64,
                "outage_ms": OUTAGE.as_millis() as u64,
                "healthy_after_ms": HEALTHY_AFTER.as_millis() as u64,
                "time_scale": 1.0 / super::SCALE,
            },
            "stacks": stacks_json,
        }),
        timelines,
    })
}

async fn one(name: &str, seed: u64) -> Result<(Value, svg::Timeline), Box<dyn std::error::Error>> {
    let primary = Simulator::builder().seed(seed).start().await?;
    let secondary = Simulator::builder().seed(seed).start().await?;
    let openai = stacks::openai(&primary.openai_base_url())?;
    let anthropic = stacks::anthropic(&secondary.anthropic_base_url())?;

    let mut breaker_events = None;
    let mut seed_client = None;
    let svc = match name {
        "bare" => stacks::bare(openai),
        "seed" => {
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
        _ => {
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

    let transitions: Vec<(Duration, String, String)> = match (breaker_events, &seed_client) {
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
    let json = json!({
        "name": name,
        "requests": outcomes.len(),
        "succeeded": ok,
        "failed": outcomes.len() - ok,
        "success_rate": ratio(ok, outcomes.len()),
        "latency_ms": latency(&outcomes, true),
        "upstream_calls": {
            "primary": primary.stats().requests,
            "secondary": secondary.stats().requests,
        },
        "primary_calls_during_outage": primary_calls_during_outage,
        "failover_ms": failover_ms,
        "recovery_ms": recovery_ms,
        "breaker_transitions": transitions.iter().map(|(at, from, to)| json!({
            "at_ms": at.as_millis() as u64, "from": from, "to": to,
        })).collect::<Vec<_>>(),
    });
    primary.shutdown().await;
    secondary.shutdown().await;
    let timeline = svg::Timeline {
        name: name.to_string(),
        outcomes,
        transitions,
        outage: (outage_start, outage_end),
        total,
    };
    Ok((json, timeline))
}

/// `a / b`, rounded to four places.
pub fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        (a as f64 / b as f64 * 10_000.0).round() / 10_000.0
    }
}
