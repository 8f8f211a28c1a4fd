//! `drill rate-limit`: one simulator enforces RPM and TPM; the offered load is about twice the
//! token limit.

use std::time::Duration;

use portcullis::ErrorKind;
use portcullis::ProviderStack;
use portcullis::layers::token_bucket::{KeyLimits, Rate, TokenBucketConfig};
use portcullis::sim::{Limits, OpenAiLimits, Simulator};
use serde_json::{Value, json};
use tower::util::BoxCloneSyncService;

use super::seed::SeedLimits;
use super::stacks::{self, NAMES};
use super::workload::{self, Outcome};
use super::{Report, latency, progress, scaled};

pub const DURATION: Duration = Duration::from_secs(10);
/// The simulator's minute lasts 60 s × SCALE.
pub const RPM: u64 = 1_000;
/// Tokens per (scaled) minute.
pub const TPM: u64 = 6_000;
/// Offered load: about twice the TPM limit.
pub const RATE: f64 = 133.0;
pub const MODEL: &str = "gpt-4o-mini";
pub const MAX_TOKENS: u32 = 8;
/// The client keeps this share of the server's limits: the margin absorbs the jitter between
/// when the client admits a request and when the server counts it.
pub const SAFETY: f64 = 0.97;
/// The first part of the run is the initial burst, the last part the drain: goodput counts
/// the steady part in between.
const STEADY: (Duration, Duration) = (Duration::from_secs(4), Duration::from_secs(10));

pub async fn run(seed: u64) -> Result<Report, Box<dyn std::error::Error>> {
    let mut stacks_json = Vec::new();
    for name in NAMES {
        progress(&format!(
            "drill rate-limit: running {name} ({} s)…",
            DURATION.as_secs()
        ));
        stacks_json.push(one(name, seed).await?);
    }
    let minute = scaled(Duration::from_secs(60));
    Ok(Report {
        json: json!({
            "drill": "rate-limit",
            "seed": seed,
            "scenario": {
                "description": "one simulator enforces RPM and TPM; offered load is about twice the TPM limit",
                "rpm": RPM,
                "tpm": TPM,
                "minute_ms": minute.as_millis() as u64,
                "rate_per_sec": RATE,
                "max_tokens": MAX_TOKENS,
                "client_share_of_limits": SAFETY,
                "time_scale": 1.0 / super::SCALE,
            },
            "stacks": stacks_json,
        }),
        timelines: Vec::new(),
    })
}

fn per_sec(per_minute: u64) -> f64 {
    per_minute as f64 / scaled(Duration::from_secs(60)).as_secs_f64()
}

/// The simulator's limits.
pub fn sim_limits() -> Limits {
    Limits {
        time_scale: 1.0 / super::SCALE,
        openai: OpenAiLimits { rpm: RPM, tpm: TPM },
        ..Limits::default()
    }
}

/// The client's limits: [`SAFETY`] of the simulator's, and a scaled 30 s `max_wait`.
pub fn client_limits() -> Result<TokenBucketConfig, Box<dyn std::error::Error>> {
    let rate = |per_minute: u64| {
        let cap = (per_minute as f64 * SAFETY).floor() as u64;
        Rate::new(cap, per_sec(per_minute) * SAFETY)
    };
    let limits = KeyLimits::default()
        .with_requests(rate(RPM)?)
        .with_tokens(rate(TPM)?);
    Ok(TokenBucketConfig::new()
        .limit(MODEL, limits)
        .max_wait(scaled(Duration::from_secs(30))))
}

async fn one(name: &str, seed: u64) -> Result<Value, Box<dyn std::error::Error>> {
    let sim = Simulator::builder()
        .seed(seed)
        .limits(sim_limits())
        .start()
        .await?;
    let openai = stacks::openai(&sim.openai_base_url())?;
    let minute = scaled(Duration::from_secs(60));
    let svc = match name {
        "bare" => stacks::bare_with_sdk_retry(openai),
        "seed" => BoxCloneSyncService::new(stacks::seed(
            vec![("openai".into(), BoxCloneSyncService::new(openai), None)],
            Some(SeedLimits {
                rpm: RPM as f64,
                tpm: TPM as f64,
                minute,
            }),
            seed,
        )),
        _ => {
            let config = client_limits()?;
            let stack = stacks::portcullis(vec![stacks::provider_stack(
                ProviderStack::openai(openai),
                Some(config),
                seed,
            )])?;
            BoxCloneSyncService::new(stack.completions())
        }
    };
    sim.reset_stats();
    let outcomes = workload::run(svc, RATE, DURATION, |i| {
        workload::request(i, seed, MODEL, MAX_TOKENS)
    })
    .await;
    let upstream_429s = sim.stats().status(429);
    sim.shutdown().await;
    let ok = outcomes.iter().filter(|o| o.result.is_ok()).count();
    let rejected_locally = outcomes
        .iter()
        .filter(|o| matches!(o.result, Err(ErrorKind::Throttled | ErrorKind::CircuitOpen)))
        .count();
    Ok(json!({
        "name": name,
        "requests": outcomes.len(),
        "succeeded": ok,
        "upstream_429s": upstream_429s,
        "rejected_locally": rejected_locally,
        "goodput_ratio": goodput(&outcomes),
        "latency_ms": latency(&outcomes, false),
    }))
}

/// Tokens served per second over the steady part, over the TPM limit per second.
pub fn goodput(outcomes: &[Outcome]) -> f64 {
    let (from, to) = STEADY;
    let tokens: u64 = outcomes
        .iter()
        .filter(|o| o.done >= from && o.done < to)
        .filter_map(|o| o.result.as_ref().ok())
        .map(|s| s.tokens)
        .sum();
    let per_sec = tokens as f64 / (to - from).as_secs_f64();
    ((per_sec / self::per_sec(TPM)) * 1000.0).round() / 1000.0
}
