//! `drill failover`: how soon a healthy fallback answers while the primary fails, with the
//! library's **default** settings (not the other drills' compressed ones).
//!
//! The primary (an OpenAI simulator) is healthy, then fails for [`OUTAGE`] by one fault (503,
//! 529, 429 with `retry-after` 1, 20 or 120 s, hangs), then is healthy again; the fallback (an
//! Anthropic simulator) is healthy throughout. Three stacks meet each fault:
//!
//! - `failover_first`: `Stack::builder()` with its defaults ([`FailoverPolicy::FailoverFirst`]);
//! - `retry_each`: the same with [`FailoverPolicy::RetryEachThenFallback`];
//! - `litellm_like`: LiteLLM's router as documented: 2 retries per model group (0.5 s doubling
//!   to 8 s, `retry-after` up to 60 s honoured), then the fallback group; a deployment cools
//!   down for 5 s when more than half of its calls in the last minute failed (429s included);
//!   the same 30 s attempt timeout as the others, no client-side limiter, no overall deadline.
//!
//! Real-time defaults (a 30 s attempt timeout, a 60 s breaker recovery) would make this drill
//! last an hour, so it runs the simulators, the stacks and the workload on one tokio runtime
//! with **paused time**: the clock jumps to the next timer whenever every task is waiting, so
//! the run takes seconds while every timer fires at its real-world time. Loopback I/O and CPU
//! take no time on that clock: latencies are the library's own waits (backoff, `Retry-After`,
//! attempt timeouts, bucket pauses) exactly, without network noise.

use std::time::Duration;

use portcullis::layers::circuit_breaker::{
    CircuitBreakerConfig, MAX_HALF_OPEN_PROBES, TripPolicy, Window,
};
use portcullis::layers::fallback::{Entry, FailoverPolicy, Fallback};
use portcullis::layers::retry::RetryConfig;
use portcullis::layers::{CircuitBreakerLayer, TimeoutLayer};
use portcullis::sim::{Family, FaultKind, FaultRule, Phase, SimHandle, Simulator};
use portcullis::stack::{DEFAULT_ATTEMPT_TIMEOUT, Provider};
use portcullis::{ErrorKind, LlmError, ProviderStack, Stack};
use serde::Serialize;
use tokio::time::Instant;
use tower::ServiceBuilder;
use tower::util::{BoxCloneSyncService, Either};

use super::stacks::{self, SdkPolicy};
use super::workload::{self, Outcome, StackService};
use super::{Report, Which, progress};

/// Healthy before the outage.
pub const HEALTHY_BEFORE: Duration = Duration::from_secs(30);
/// The outage.
pub const OUTAGE: Duration = Duration::from_secs(300);
/// Healthy after it: long enough for a breaker's recovery (60 s) and its probes.
pub const HEALTHY_AFTER: Duration = Duration::from_secs(180);
/// Requests per second.
pub const RATE: f64 = 2.0;
/// The breaker's default recovery time: the target for returning to the primary.
pub const RECOVERY: Duration = Duration::from_secs(60);
/// The slack of "at once" in the targets.
pub const AT_ONCE: Duration = Duration::from_millis(50);

const MODEL: &str = "gpt-4o-mini";
const SECONDARY_MODEL: &str = "claude-haiku-4-5";
const MAX_TOKENS: u32 = 16;

/// How the primary fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// 503 on every request.
    Status503,
    /// 529 on every request.
    Status529,
    /// 429 with `retry-after: 1`.
    RateLimited1s,
    /// 429 with `retry-after: 20`.
    RateLimited20s,
    /// 429 with `retry-after: 120`.
    RateLimited120s,
    /// No answer at all.
    Hang,
}

impl Fault {
    const ALL: [Fault; 6] = [
        Fault::Status503,
        Fault::Status529,
        Fault::RateLimited1s,
        Fault::RateLimited20s,
        Fault::RateLimited120s,
        Fault::Hang,
    ];

    fn rule(self) -> FaultRule {
        let limited = |s| FaultRule::new(FaultKind::RateLimit).retry_after_secs(s);
        let rule = match self {
            Fault::Status503 => FaultRule::status(503),
            Fault::Status529 => FaultRule::status(529),
            Fault::RateLimited1s => limited(1),
            Fault::RateLimited20s => limited(20),
            Fault::RateLimited120s => limited(120),
            Fault::Hang => FaultRule::new(FaultKind::Hang),
        };
        rule.family(Family::Openai)
    }

    fn label(self) -> &'static str {
        match self {
            Fault::Status503 => "503",
            Fault::Status529 => "529",
            Fault::RateLimited1s => "429 ra=1s",
            Fault::RateLimited20s => "429 ra=20s",
            Fault::RateLimited120s => "429 ra=120s",
            Fault::Hang => "hang",
        }
    }

    /// How long one failed attempt on the primary takes with the default settings.
    fn attempt(self) -> Duration {
        match self {
            Fault::Hang => DEFAULT_ATTEMPT_TIMEOUT,
            _ => Duration::ZERO,
        }
    }
}

/// The stacks compared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// The default `Stack`: fail over first.
    FailoverFirst,
    /// The default `Stack` with `FailoverPolicy::RetryEachThenFallback`.
    RetryEach,
    /// LiteLLM's router, approximated with Portcullis' layers.
    LitellmLike,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::FailoverFirst, Kind::RetryEach, Kind::LitellmLike];

    fn label(self) -> &'static str {
        match self {
            Kind::FailoverFirst => "failover_first",
            Kind::RetryEach => "retry_each",
            Kind::LitellmLike => "litellm_like",
        }
    }
}

/// The drill's settings.
#[derive(Debug, Serialize)]
pub struct Scenario {
    description: &'static str,
    clock: &'static str,
    rate_per_sec: f64,
    healthy_before_ms: u64,
    outage_ms: u64,
    healthy_after_ms: u64,
}

/// One stack meeting one fault.
#[derive(Debug, Serialize)]
pub struct Row {
    fault: Fault,
    name: Kind,
    /// The first call sent during the outage: its latency.
    first_call_ms: Option<f64>,
    /// Latency of the calls sent during the outage.
    outage_p50_ms: f64,
    /// Latency of the calls sent during the outage.
    outage_p99_ms: f64,
    /// The slowest call sent during the outage.
    outage_max_ms: f64,
    /// Requests the primary received during the outage.
    primary_attempts: u64,
    /// From the outage's end to the first answer served by the primary again.
    return_to_primary_ms: Option<u64>,
    /// Calls sent during the outage that failed.
    failed: usize,
    /// The targets, for the default stack (`None` for the others).
    targets: Option<Targets>,
}

/// The targets of the default stack, each met or not.
#[derive(Debug, Serialize)]
pub struct Targets {
    /// First call answered within the primary's failed attempt + 50 ms (503, 529, 429).
    first_call: bool,
    /// No call during the outage waits on a backoff: each within its failed attempt + 50 ms.
    no_backoff: bool,
    /// Traffic returns to the primary within its breaker's recovery time (60 s). For hangs,
    /// plus one attempt timeout (30 s): a probe admitted while the primary hung learns nothing
    /// before its own timeout, which reopens the breaker for its recovery time.
    returns: bool,
    /// No call failed.
    no_failures: bool,
}

impl Targets {
    fn all(&self) -> bool {
        self.first_call && self.no_backoff && self.returns && self.no_failures
    }
}

impl Row {
    /// Whether the row meets its targets (rows without any do).
    pub fn passed(&self) -> bool {
        self.targets.as_ref().is_none_or(Targets::all)
    }
}

/// The report: one row per fault and stack.
pub type FailoverReport = Report<Scenario, Row>;

/// Runs the drill on a runtime of its own whose clock is paused (on a blocking thread, so that
/// it can be called from any runtime).
pub async fn run(seed: u64) -> Result<FailoverReport, Box<dyn std::error::Error>> {
    let report = tokio::task::spawn_blocking(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .start_paused(true)
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(all(seed)).map_err(|e| e.to_string())
    })
    .await??;
    Ok(report)
}

async fn all(seed: u64) -> Result<FailoverReport, Box<dyn std::error::Error>> {
    let mut rows = Vec::new();
    for fault in Fault::ALL {
        progress(&format!("drill failover: primary {}…", fault.label()));
        for kind in Kind::ALL {
            rows.push(one(fault, kind, seed).await?);
        }
    }
    Ok(Report {
        drill: Which::Failover,
        seed,
        scenario: Scenario {
            description: "primary (OpenAI) healthy, then failing by one fault, then healthy; fallback (Anthropic) healthy; the library's default settings",
            clock: "tokio paused time: real-world timers, no network or CPU time",
            rate_per_sec: RATE,
            healthy_before_ms: HEALTHY_BEFORE.as_millis() as u64,
            outage_ms: OUTAGE.as_millis() as u64,
            healthy_after_ms: HEALTHY_AFTER.as_millis() as u64,
        },
        stacks: rows,
    })
}

/// The stack `kind` over the two simulators.
fn stack(
    kind: Kind,
    primary: &SimHandle,
    secondary: &SimHandle,
    seed: u64,
) -> Result<StackService, Box<dyn std::error::Error>> {
    let openai = stacks::openai(&primary.openai_base_url())?;
    let anthropic = stacks::anthropic(&secondary.anthropic_base_url())?;
    let order = match kind {
        Kind::FailoverFirst => FailoverPolicy::FailoverFirst,
        Kind::RetryEach => FailoverPolicy::RetryEachThenFallback,
        Kind::LitellmLike => return litellm_like(openai, anthropic),
    };
    // The defaults, with the jitter seeded so that a run can be repeated.
    let retry = |seed| RetryConfig {
        seed: Some(seed),
        ..RetryConfig::default()
    };
    let stack = Stack::builder()
        .failover(order)
        .provider(ProviderStack::openai(openai).retry(retry(seed)))
        .provider(
            ProviderStack::anthropic(anthropic)
                .model(SECONDARY_MODEL)
                .retry(retry(seed ^ 1)),
        )
        .build()?;
    Ok(BoxCloneSyncService::new(stack.completions()))
}

/// LiteLLM's router, as its documentation and code describe it, from Portcullis' layers: per
/// model group a cooldown (a breaker that opens for 5 s when more than half of the last
/// minute's calls failed, 429s included, and then lets everything through again) over the
/// provider with a 30 s timeout; 2 retries per group by the OpenAI SDK's backoff, which
/// LiteLLM shares ([`SdkPolicy`]); then the fallback group.
fn litellm_like(
    openai: portcullis::providers::OpenAiProvider,
    anthropic: portcullis::providers::AnthropicProvider,
) -> Result<StackService, Box<dyn std::error::Error>> {
    let cooldown = CircuitBreakerConfig {
        trip: TripPolicy::failure_rate(0.51, Window::Time(Duration::from_secs(60)), 2),
        recovery_timeout: Duration::from_secs(5),
        half_open_probes: MAX_HALF_OPEN_PROBES,
        ..CircuitBreakerConfig::default()
    };
    // LiteLLM cools a deployment down on 429s too: the breaker sees them as overloads.
    fn rate_limits_count(e: LlmError) -> LlmError {
        match e.kind() {
            ErrorKind::RateLimited => e.with_kind(ErrorKind::Overloaded),
            _ => e,
        }
    }
    let group = |name: &'static str, p: Provider| -> Result<_, Box<dyn std::error::Error>> {
        let svc = ServiceBuilder::new()
            .layer(CircuitBreakerLayer::new(name, cooldown.clone())?)
            .map_err(rate_limits_count as fn(LlmError) -> LlmError)
            .layer(TimeoutLayer::new(DEFAULT_ATTEMPT_TIMEOUT))
            .service(p);
        Ok(Entry::new(name, svc).retry(SdkPolicy))
    };
    let chain = vec![
        group("openai", Either::Left(openai))?,
        group("anthropic", Either::Right(Either::Left(anthropic)))?.model(SECONDARY_MODEL),
    ];
    let fallback = Fallback::new(chain)?.failover(FailoverPolicy::RetryEachThenFallback);
    Ok(BoxCloneSyncService::new(fallback))
}

async fn one(fault: Fault, kind: Kind, seed: u64) -> Result<Row, Box<dyn std::error::Error>> {
    let primary = Simulator::builder().seed(seed).start().await?;
    let secondary = Simulator::builder().seed(seed).start().await?;
    let svc = stack(kind, &primary, &secondary, seed)?;
    primary.set_timeline(vec![
        Phase::new(HEALTHY_BEFORE.as_secs_f64(), vec![]),
        Phase::new(OUTAGE.as_secs_f64(), vec![fault.rule()]),
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
    let (outcomes, primary_attempts) = tokio::join!(work, during);
    primary.shutdown().await;
    secondary.shutdown().await;
    Ok(row(fault, kind, &outcomes, primary_attempts))
}

fn row(fault: Fault, kind: Kind, outcomes: &[Outcome], primary_attempts: u64) -> Row {
    let (from, to) = (HEALTHY_BEFORE, HEALTHY_BEFORE + OUTAGE);
    let during: Vec<Outcome> = outcomes
        .iter()
        .filter(|o| o.sent >= from && o.sent < to)
        .cloned()
        .collect();
    let ms = |d: Duration| (d.as_secs_f64() * 10_000.0).round() / 10.0;
    let first = during.first().map(Outcome::latency);
    let max = during
        .iter()
        .map(Outcome::latency)
        .max()
        .unwrap_or_default();
    let served_by_primary = |o: &&Outcome| matches!(&o.result, Ok(s) if s.provider == "openai");
    let back = outcomes
        .iter()
        .filter(|o| o.sent >= to)
        .find(served_by_primary)
        .map(|o| o.done - to);
    let failed = during.iter().filter(|o| o.result.is_err()).count();
    let targets = (kind == Kind::FailoverFirst).then(|| Targets {
        first_call: first.is_some_and(|d| d <= fault.attempt() + AT_ONCE),
        no_backoff: max <= fault.attempt() + AT_ONCE,
        returns: back.is_some_and(|d| d <= RECOVERY + fault.attempt()),
        no_failures: failed == 0,
    });
    Row {
        fault,
        name: kind,
        first_call_ms: first.map(ms),
        outage_p50_ms: workload::percentile_ms(&during, 50.0),
        outage_p99_ms: workload::percentile_ms(&during, 99.0),
        outage_max_ms: ms(max),
        primary_attempts,
        return_to_primary_ms: back.map(|d| d.as_millis() as u64),
        failed,
        targets,
    }
}

/// Prints the report as one table: a row per fault and stack.
pub fn print(report: &FailoverReport) {
    println!(
        "\n== drill failover: {}\n   ({}; {} req/s; healthy {} s, outage {} s, healthy {} s)",
        report.scenario.description,
        report.scenario.clock,
        report.scenario.rate_per_sec,
        HEALTHY_BEFORE.as_secs(),
        OUTAGE.as_secs(),
        HEALTHY_AFTER.as_secs(),
    );
    println!(
        "{:<12} {:<15} {:>10} {:>9} {:>9} {:>9} {:>8} {:>10} {:>6}  targets",
        "fault",
        "stack",
        "first_ms",
        "p50_ms",
        "p99_ms",
        "max_ms",
        "primary",
        "return_ms",
        "failed"
    );
    let opt = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    for r in &report.stacks {
        let targets = match &r.targets {
            None => "-".to_string(),
            Some(t) => {
                let mark =
                    |ok: bool, what: &str| format!("{what} {}", if ok { "ok" } else { "FAIL" });
                [
                    mark(t.first_call, "first"),
                    mark(t.no_backoff, "no-backoff"),
                    mark(t.returns, "return"),
                    mark(t.no_failures, "no-fail"),
                ]
                .join(", ")
            }
        };
        println!(
            "{:<12} {:<15} {:>10} {:>9.1} {:>9.1} {:>9.1} {:>8} {:>10} {:>6}  {}",
            r.fault_label(),
            r.name.label(),
            opt(r.first_call_ms.map(|v| format!("{v:.1}"))),
            r.outage_p50_ms,
            r.outage_p99_ms,
            r.outage_max_ms,
            r.primary_attempts,
            opt(r.return_to_primary_ms.map(|v| v.to_string())),
            r.failed,
            targets,
        );
    }
}

impl Row {
    fn fault_label(&self) -> &'static str {
        self.fault.label()
    }
}
