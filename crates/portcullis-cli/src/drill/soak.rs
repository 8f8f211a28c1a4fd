//! `drill soak`: a long run of mixed faults, cancellations and load through the Portcullis
//! stack, then a check that nothing leaked.
//!
//! One simulator serves both providers (OpenAI primary, Anthropic fallback). A seeded timeline
//! changes its faults every 1–3 s: 429 storms, 529s, 500s, resets, hangs, truncated streams,
//! malformed JSON, errors before and after content, and healthy spells. `concurrency` workers
//! send completions and streams over many distinct model names (so many keys), and drop about
//! a quarter of their calls at a random point: before an answer, or in the middle of a stream.
//!
//! At the end, with every call finished or dropped, it checks:
//! - breaker permits in flight: 0 (every provider, every key);
//! - bucket reservations outstanding: 0;
//! - no panic, in any task;
//! - the keys each layer holds within its cap (the workload names twice as many models);
//!
//! and reports the keys each layer holds and the process's peak and final resident memory.
//! The exit code is 0 only if every check holds.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use portcullis::ProviderStack;
use portcullis::sim::{Family, FaultKind, FaultRule, Phase, Simulator};
use portcullis::stack::ProviderHandles;
use portcullis::{ChatMessage, ChatRequest, ErrorKind};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt;

use portcullis::layers::keyed::DEFAULT_MAX_KEYS;

use super::stacks;

/// The secondary's model.
const SECONDARY_MODEL: &str = "claude-haiku-4-5";
/// How many distinct model names the workload uses: twice the layers' default cap on keys,
/// so that the cap and its overflow entry are part of the run.
const MODELS: u64 = 2 * DEFAULT_MAX_KEYS as u64;

/// What the soak ran.
#[derive(Debug, Serialize)]
pub struct Scenario {
    description: &'static str,
    duration_ms: u64,
    concurrency: usize,
    phases: usize,
    distinct_models: u64,
}

/// What the soak measured, and whether each check held.
#[derive(Debug, Serialize)]
pub struct Outcome {
    /// Calls made (completions and streams).
    pub calls: u64,
    /// Calls that were answered (a stream read to its end).
    pub succeeded: u64,
    /// Calls that ended in an error (a stream's mid-stream error included).
    pub failed: u64,
    /// Calls dropped on purpose before they ended.
    pub cancelled: u64,
    /// Breaker permits still held at the end (every provider, every key): must be 0.
    pub breaker_in_flight: u64,
    /// Bucket reservations still outstanding at the end: must be 0.
    pub bucket_reservations: u64,
    /// Keys the breakers hold at the end (the most of any provider): at most the cap.
    pub breaker_keys: usize,
    /// Keys the buckets hold at the end (the most of any provider): at most the cap.
    pub bucket_keys: usize,
    /// The layers' cap on keys (their default).
    pub key_cap: usize,
    /// Panics in any task: must be 0.
    pub panics: u64,
    /// Peak resident memory of the process, MiB.
    pub peak_rss_mib: f64,
    /// Resident memory at the end, MiB.
    pub final_rss_mib: f64,
    /// Whether every check held.
    pub passed: bool,
}

/// The soak's report.
#[derive(Debug, Serialize)]
pub struct Report {
    drill: &'static str,
    seed: u64,
    scenario: Scenario,
    result: Outcome,
}

impl Report {
    /// Whether every check held.
    pub fn passed(&self) -> bool {
        self.result.passed
    }
}

/// The fault phases of the run, seeded: each 1–3 s, with one to three faults (or none).
fn timeline(rng: &mut SmallRng, duration: Duration) -> Vec<Phase> {
    let mut phases = Vec::new();
    let mut at = 0.0;
    while at < duration.as_secs_f64() {
        let secs = rng.random_range(1.0..3.0);
        let faults = (0..rng.random_range(0..=3)).map(|_| fault(rng)).collect();
        phases.push(Phase::new(secs, faults));
        at += secs;
    }
    phases.push(Phase::forever(Vec::new()));
    phases
}

fn fault(rng: &mut SmallRng) -> FaultRule {
    let rule = match rng.random_range(0..10) {
        0 => FaultRule::new(FaultKind::RateLimit).retry_after_secs(1),
        1 => FaultRule::new(FaultKind::Overloaded),
        2 => FaultRule::status(500),
        3 => FaultRule::new(FaultKind::Reset),
        4 => FaultRule::new(FaultKind::Hang),
        5 => FaultRule::new(FaultKind::Truncated),
        6 => FaultRule::new(FaultKind::MalformedJson),
        7 => FaultRule::new(FaultKind::ErrorBeforeContent),
        8 => FaultRule::new(FaultKind::ErrorAfterContent),
        _ => FaultRule::latency(rng.random_range(10..200)),
    };
    let family = match rng.random_range(0..3) {
        0 => Family::Openai,
        1 => Family::Anthropic,
        _ => Family::Both,
    };
    rule.family(family).probability(rng.random_range(0.2..0.9))
}

/// Counts of how calls ended, shared by the workers.
#[derive(Debug, Default)]
struct Tally {
    calls: AtomicU64,
    succeeded: AtomicU64,
    failed: AtomicU64,
    cancelled: AtomicU64,
}

/// Panics anywhere in the process since [`count_panics`] was installed.
static PANICS: AtomicU64 = AtomicU64::new(0);

/// Counts panics (then reports them as before).
fn count_panics() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        PANICS.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
}

/// Runs the soak.
pub async fn run(
    seed: u64,
    duration: Duration,
    concurrency: usize,
) -> Result<Report, Box<dyn std::error::Error>> {
    count_panics();
    let mut rng = SmallRng::seed_from_u64(seed);
    let phases = timeline(&mut rng, duration);
    let scenario = Scenario {
        description: "mixed faults on a seeded timeline, completions and streams over many models, a quarter of the calls dropped at random points",
        duration_ms: duration.as_millis() as u64,
        concurrency,
        phases: phases.len(),
        distinct_models: MODELS,
    };
    let sim = Simulator::builder()
        .seed(seed)
        .timeline(phases)
        .start()
        .await?;
    let openai = stacks::openai(&sim.openai_base_url())?;
    let anthropic = stacks::anthropic(&sim.anthropic_base_url())?;
    let stack = stacks::portcullis(vec![
        stacks::provider_stack(ProviderStack::openai(openai), None, seed),
        stacks::provider_stack(
            ProviderStack::anthropic(anthropic).model(SECONDARY_MODEL),
            None,
            seed,
        ),
    ])?;

    let tally = Arc::new(Tally::default());
    let end = Instant::now() + duration;
    let mut workers = JoinSet::new();
    for w in 0..concurrency {
        let (stack, tally) = (stack.clone(), tally.clone());
        let mut rng = SmallRng::seed_from_u64(seed ^ (w as u64 + 1).wrapping_mul(0x9e37_79b9));
        workers.spawn(async move {
            while Instant::now() < end {
                let model = format!("gpt-4o-mini-{}", rng.random_range(0..MODELS));
                let req = ChatRequest::new(model, vec![ChatMessage::user("Tell me of tides.")])
                    .max_tokens(rng.random_range(4..24));
                // A quarter are dropped: after a random time, or a random number of chunks.
                let cancel = rng.random_bool(0.25).then(|| {
                    (
                        Duration::from_millis(rng.random_range(0..400)),
                        rng.random_range(0..4usize),
                    )
                });
                tally.calls.fetch_add(1, Ordering::Relaxed);
                let ended = match rng.random_bool(0.5) {
                    true => stream_call(&stack, req, cancel).await,
                    false => complete_call(&stack, req, cancel).await,
                };
                let counter = match ended {
                    Ended::Ok => &tally.succeeded,
                    Ended::Failed(_) => &tally.failed,
                    Ended::Cancelled => &tally.cancelled,
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    let mut task_panics = 0;
    while let Some(done) = workers.join_next().await {
        if done.as_ref().is_err_and(|e| e.is_panic()) {
            task_panics += 1;
        }
    }
    // Every call has finished or been dropped: the stack must be back where it started.
    let handles = stack.handles();
    let (breaker_in_flight, bucket_reservations) = leftovers(handles);
    let breaker_keys = handles
        .iter()
        .map(|h| h.breaker.key_count())
        .max()
        .unwrap_or(0);
    let bucket_keys = handles
        .iter()
        .filter_map(|h| h.limiter.as_ref())
        .map(|l| l.key_count())
        .max()
        .unwrap_or(0);
    sim.shutdown().await;
    let panics = PANICS.load(Ordering::SeqCst).max(task_panics);
    let (peak_rss_mib, final_rss_mib) = memory();
    let result = Outcome {
        calls: tally.calls.load(Ordering::Relaxed),
        succeeded: tally.succeeded.load(Ordering::Relaxed),
        failed: tally.failed.load(Ordering::Relaxed),
        cancelled: tally.cancelled.load(Ordering::Relaxed),
        breaker_in_flight,
        bucket_reservations,
        breaker_keys,
        bucket_keys,
        key_cap: DEFAULT_MAX_KEYS,
        panics,
        peak_rss_mib,
        final_rss_mib,
        passed: breaker_in_flight == 0
            && bucket_reservations == 0
            && panics == 0
            && breaker_keys <= DEFAULT_MAX_KEYS
            && bucket_keys <= DEFAULT_MAX_KEYS,
    };
    Ok(Report {
        drill: "soak",
        seed,
        scenario,
        result,
    })
}

/// Breaker permits in flight and bucket reservations outstanding, over every provider and key.
fn leftovers(handles: &[ProviderHandles]) -> (u64, u64) {
    let mut in_flight = 0;
    let mut reservations = 0;
    for h in handles {
        for key in h.breaker.keys() {
            in_flight += h.breaker.metrics(&key).map_or(0, |m| m.in_flight);
        }
        if let Some(l) = &h.limiter {
            reservations += l
                .levels()
                .iter()
                .map(|(_, l)| l.reservations as u64)
                .sum::<u64>();
        }
    }
    (in_flight, reservations)
}

/// How one call ended.
enum Ended {
    Ok,
    Failed(#[allow(dead_code)] ErrorKind),
    Cancelled,
}

async fn complete_call(
    stack: &portcullis::Stack,
    req: ChatRequest,
    cancel: Option<(Duration, usize)>,
) -> Ended {
    let call = stack.completions().oneshot(req);
    let result = match cancel {
        Some((after, _)) => match tokio::time::timeout(after, call).await {
            Ok(r) => r,
            Err(_) => return Ended::Cancelled,
        },
        None => call.await,
    };
    match result {
        Ok(_) => Ended::Ok,
        Err(e) => Ended::Failed(e.kind()),
    }
}

async fn stream_call(
    stack: &portcullis::Stack,
    req: ChatRequest,
    cancel: Option<(Duration, usize)>,
) -> Ended {
    let opened = stack.streams().oneshot(req);
    let opened = match cancel {
        Some((after, _)) => match tokio::time::timeout(after, opened).await {
            Ok(r) => r,
            Err(_) => return Ended::Cancelled,
        },
        None => opened.await,
    };
    let mut stream = match opened {
        Ok(s) => s,
        Err(e) => return Ended::Failed(e.kind()),
    };
    let mut chunks = 0;
    while let Some(item) = stream.next().await {
        if let Err(e) = item {
            return Ended::Failed(e.kind());
        }
        chunks += 1;
        if cancel.is_some_and(|(_, at)| chunks > at) {
            // Dropped in the middle of the stream.
            return Ended::Cancelled;
        }
    }
    Ended::Ok
}

/// Peak and current resident memory (MiB), from `/proc/self/status`; zeros where it is not
/// available.
fn memory() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(0.0, |kb| (kb / 1024.0 * 10.0).round() / 10.0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// Parses a duration: `90`, `90s`, `500ms`, `10m`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (try 60s, 10m, 500ms)"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("unknown unit {other:?} in {s:?} (ms, s, m or h)")),
    };
    match Duration::try_from_secs_f64(secs) {
        Ok(d) if !d.is_zero() => Ok(d),
        _ => Err(format!("{s:?} must be a positive duration")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("0s").is_err());
        assert!(parse_duration("ten").is_err());
        assert!(parse_duration("5y").is_err());
    }

    #[test]
    fn the_timeline_is_seeded_and_covers_the_run() {
        let a = timeline(&mut SmallRng::seed_from_u64(1), Duration::from_secs(30));
        let b = timeline(&mut SmallRng::seed_from_u64(1), Duration::from_secs(30));
        assert_eq!(a, b);
        let covered: f64 = a.iter().filter_map(|p| p.duration_secs).sum();
        assert!(covered >= 30.0);
    }
}
