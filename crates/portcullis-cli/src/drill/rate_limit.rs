//! `drill rate-limit`: one simulator enforces RPM and TPM; the offered load is about twice the
//! token limit.

use std::time::Duration;

use portcullis::ErrorKind;
use portcullis::ProviderStack;
use portcullis::layers::token_bucket::{KeyLimits, Rate, TokenBucketConfig};
use portcullis::sim::{Limits, OpenAiLimits, SimHandle, Simulator};
use serde::Serialize;
use tower::util::BoxCloneSyncService;

use super::seed::SeedLimits;
use super::stacks::{self, StackKind};
use super::workload::{self, Outcome, StackService};
use super::{Latency, Report, TIME_SCALE, Which, each_stack, latency, scaled};

/// How long the drill offers load.
pub const DURATION: Duration = Duration::from_secs(10);
/// The simulator's minute lasts 60 s × SCALE.
pub const RPM: u64 = 1_000;
/// Tokens per (scaled) minute.
pub const TPM: u64 = 6_000;
/// Offered load: about twice the TPM limit.
pub const RATE: f64 = 133.0;
/// The model every request names.
pub const MODEL: &str = "gpt-4o-mini";
/// `max_tokens` of every request.
pub const MAX_TOKENS: u32 = 8;
/// The client keeps this share of the server's limits: the margin absorbs the jitter between
/// when the client admits a request and when the server counts it.
pub const SAFETY: f64 = 0.97;
/// The longest wait for admission (the library's default), before scaling.
const MAX_WAIT: Duration = portcullis::layers::token_bucket::DEFAULT_MAX_WAIT;
/// The first part of the run is the initial burst, the last part the drain: goodput counts
/// the steady part in between.
const STEADY: (Duration, Duration) = (Duration::from_secs(4), Duration::from_secs(10));

/// The shared limits of `rate-limit` and `fleet`, as their scenarios report them.
#[derive(Debug, Serialize)]
pub struct LimitsScenario {
    rpm: u64,
    tpm: u64,
    rate_per_sec: f64,
    client_share_of_limits: f64,
    time_scale: f64,
}

impl Default for LimitsScenario {
    /// This drill's limits, offered rate and safety share.
    fn default() -> Self {
        LimitsScenario {
            rpm: RPM,
            tpm: TPM,
            rate_per_sec: RATE,
            client_share_of_limits: SAFETY,
            time_scale: TIME_SCALE,
        }
    }
}

/// The rate-limit drill's settings.
#[derive(Debug, Serialize)]
pub struct Scenario {
    description: &'static str,
    minute_ms: u64,
    max_tokens: u32,
    #[serde(flatten)]
    limits: LimitsScenario,
}

/// One stack's run under the limits.
#[derive(Debug, Serialize)]
pub struct Row {
    /// The stack; `learned` is the Portcullis stack with no limits configured, pacing at the
    /// limits the simulator's headers state; with the `async-openai` feature, `async-openai
    /// defaults` and `async-openai + portcullis` are async-openai's client without and with
    /// `portcullis::async_openai` (which learns the limits too).
    name: String,
    requests: usize,
    succeeded: usize,
    upstream_429s: u64,
    /// Refused by the client itself: throttled or circuit open.
    rejected_locally: usize,
    goodput_ratio: f64,
    latency_ms: Latency,
}

/// Runs the drill.
pub async fn run(seed: u64) -> Result<Report<Scenario, Row>, Box<dyn std::error::Error>> {
    let mut stacks = each_stack(Which::RateLimit, DURATION, |kind| {
        one(kind, seed, Configured::Yes)
    })
    .await?;
    super::progress(&format!(
        "drill {}: running learned ({} s)…",
        Which::RateLimit,
        DURATION.as_secs()
    ));
    stacks.push(one(StackKind::Portcullis, seed, Configured::No).await?);
    #[cfg(feature = "async-openai")]
    for setup in super::async_openai::Setup::ALL {
        super::progress(&format!(
            "drill {}: running {} ({} s)…",
            Which::RateLimit,
            setup.name(),
            DURATION.as_secs()
        ));
        let sim = start_sim(seed).await?;
        let (svc, _) = super::async_openai::service(&sim.openai_base_url(), setup, seed)?;
        stacks.push(measure(setup.name().to_owned(), sim, svc, seed).await);
    }
    let minute = scaled(Duration::from_secs(60));
    Ok(Report {
        drill: Which::RateLimit,
        seed,
        scenario: Scenario {
            description: "one simulator enforces RPM and TPM; offered load is about twice the TPM limit",
            minute_ms: minute.as_millis() as u64,
            max_tokens: MAX_TOKENS,
            limits: LimitsScenario::default(),
        },
        stacks,
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
        .max_wait(scaled(MAX_WAIT)))
}

/// Whether the Portcullis stack is given the limits, or learns them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Configured {
    Yes,
    No,
}

async fn one(
    kind: StackKind,
    seed: u64,
    configured: Configured,
) -> Result<Row, Box<dyn std::error::Error>> {
    let sim = start_sim(seed).await?;
    let openai = stacks::openai(&sim.openai_base_url())?;
    let minute = scaled(Duration::from_secs(60));
    let svc = match kind {
        StackKind::Bare => stacks::bare_with_sdk_retry(openai),
        StackKind::Seed => BoxCloneSyncService::new(stacks::seed(
            vec![("openai".into(), BoxCloneSyncService::new(openai), None)],
            Some(SeedLimits {
                rpm: RPM as f64,
                tpm: TPM as f64,
                minute,
            }),
            seed,
        )),
        StackKind::Portcullis => {
            let config = match configured {
                Configured::Yes => Some(client_limits()?),
                // Only the wait for admission, as the configured row has.
                Configured::No => Some(TokenBucketConfig::new().max_wait(scaled(MAX_WAIT))),
            };
            let stack = stacks::portcullis(vec![stacks::provider_stack(
                ProviderStack::openai(openai),
                config,
                seed,
            )])?;
            BoxCloneSyncService::new(stack.completions())
        }
    };
    let name = match configured {
        Configured::Yes => kind.to_string(),
        Configured::No => "learned".to_owned(),
    };
    Ok(measure(name, sim, svc, seed).await)
}

/// The simulator of the drill, enforcing its limits.
async fn start_sim(seed: u64) -> Result<SimHandle, Box<dyn std::error::Error>> {
    Ok(Simulator::builder()
        .seed(seed)
        .limits(sim_limits())
        .start()
        .await?)
}

/// Runs the workload through `svc` against `sim` (then stops it), and measures the run.
async fn measure(name: String, sim: SimHandle, svc: StackService, seed: u64) -> Row {
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
    Row {
        name,
        requests: outcomes.len(),
        succeeded: ok,
        upstream_429s,
        rejected_locally,
        goodput_ratio: goodput(&outcomes),
        latency_ms: latency(&outcomes, false),
    }
}

/// Tokens served per second over the steady part, over the TPM limit per second.
pub fn goodput(outcomes: &[Outcome]) -> f64 {
    let (from, to) = STEADY;
    let tokens = workload::tokens_done(outcomes, from, to);
    let per_sec = tokens as f64 / (to - from).as_secs_f64();
    ((per_sec / self::per_sec(TPM)) * 1000.0).round() / 1000.0
}
