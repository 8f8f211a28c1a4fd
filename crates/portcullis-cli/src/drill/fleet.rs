//! `drill fleet`: N client instances share one provider's RPM / TPM limits.
//!
//! - `local`: every instance keeps its own in-memory bucket at the full limit (what a fleet
//!   gets when each replica is configured alone);
//! - `redis`: every instance draws from the same buckets in Redis ([`portcullis_redis`]).
//!
//! With `--processes`, the instances are separate OS processes (this binary, re-run as the
//! hidden `portcullis drill-worker`) and the outcomes come back as JSON lines.
//!
//! In the `redis` run, when the drill started its own `redis-server`, the timeline stops it
//! (`SIGSTOP`) for [`STOP_FOR`] from [`STOP_AT`], then lets it go on: the report says how long
//! the instances spent off Redis (each keeps 1/N of the limits meanwhile) and how many upstream
//! 429s that window drew, against [`STOP_429_TARGET`].

use std::fmt;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use portcullis::sim::Simulator;
use portcullis::{ChatRequest, ProviderStack};
use portcullis_redis::{LocalRedis, RedisConfig, RedisStore};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader};
use tower::util::BoxCloneSyncService;

use super::rate_limit::{
    DURATION, LimitsScenario, MAX_TOKENS, MODEL, RATE, client_limits, goodput, sim_limits,
};
use super::stacks;
use super::workload::{self, Outcome, Served, StackService};
use super::{Latency, Report, Which, latency, progress};

/// When, in the `redis` run, the drill's own Redis is stopped.
pub const STOP_AT: Duration = Duration::from_secs(4);
/// How long it stays stopped.
pub const STOP_FOR: Duration = Duration::from_secs(2);
/// After it resumes, how long the window that counts its 429s lasts (the instances' way back).
const RECOVERY: Duration = Duration::from_millis(1500);
/// The most upstream 429s the stop's window may draw: the instances keep 1/N of the limits
/// while off Redis, so the fleet stays under the provider's limit.
pub const STOP_429_TARGET: u64 = 5;

/// Where the fleet's Redis comes from.
pub enum RedisSource {
    /// A URL given with `--redis`.
    Url(String),
    /// A throwaway `redis-server` started for the drill.
    Local(LocalRedis),
}

impl RedisSource {
    /// Its URL.
    pub fn url(&self) -> String {
        match self {
            RedisSource::Url(u) => u.clone(),
            RedisSource::Local(l) => l.url(),
        }
    }
}

/// Finds the Redis to use, or explains how to get one.
pub fn redis(url: Option<String>) -> Result<RedisSource, String> {
    // `--redis` with no URL: start a throwaway server.
    if let Some(u) = url.filter(|u| !u.is_empty()) {
        return Ok(RedisSource::Url(u));
    }
    match LocalRedis::start() {
        Ok(l) => Ok(RedisSource::Local(l)),
        Err(portcullis_redis::Error::ServerNotFound) => Err(
            "the fleet drill needs Redis: pass --redis redis://HOST:PORT, or install redis-server \
             (Debian/Ubuntu: `apt-get install redis-server`; macOS: `brew install redis`) so the \
             drill can start a throwaway one on a free loopback port"
                .into(),
        ),
        Err(e) => Err(format!("could not start redis-server: {e}")),
    }
}

/// One instance's stack: the recommended [`Stack`](portcullis::Stack) with the drills' scaled
/// settings, its buckets in memory (`local`) or in Redis (`shared`). While Redis is away each of
/// the `instances` keeps 1/N of the limits, as the Redis store's README advises, so the fleet
/// stays within the shared limit.
fn instance(
    sim_url: &str,
    shared: Option<(&str, &str)>,
    seed: u64,
    instances: usize,
) -> Result<(StackService, Option<RedisStore>), Box<dyn std::error::Error>> {
    let provider = ProviderStack::openai(stacks::openai(sim_url)?);
    let provider = stacks::provider_stack(provider, Some(client_limits()?), seed);
    Ok(match shared {
        None => (
            BoxCloneSyncService::new(stacks::portcullis(vec![provider])?.completions()),
            None,
        ),
        Some((url, prefix)) => {
            let redis = RedisConfig::new(url)
                .prefix(prefix)
                .fail_open_share(1.0 / instances.max(1) as f64);
            let provider = provider.store(move |name, limits| {
                Ok(RedisStore::new(name.to_owned(), limits, redis.clone())?)
            });
            let stack = stacks::portcullis(vec![provider])?;
            let store = stack
                .handles()
                .first()
                .and_then(|h| h.limiter.as_ref())
                .map(|l| l.store().clone());
            (BoxCloneSyncService::new(stack.completions()), store)
        }
    })
}

fn request(i: u64, seed: u64) -> ChatRequest {
    workload::request(i, seed, MODEL, MAX_TOKENS)
}

/// The fleet's two ways of sharing the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sharing {
    /// Every instance has its own in-memory bucket at the full limit.
    Local,
    /// Every instance draws from the same buckets in Redis.
    Redis,
}

impl fmt::Display for Sharing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Sharing::Local => "local",
            Sharing::Redis => "redis",
        })
    }
}

/// The fleet's settings.
#[derive(Debug, Serialize)]
pub struct Scenario {
    description: String,
    instances: usize,
    processes: bool,
    #[serde(flatten)]
    limits: LimitsScenario,
}

/// One way of sharing, across the whole fleet.
#[derive(Debug, Serialize)]
pub struct Row {
    name: Sharing,
    instances: usize,
    requests: usize,
    succeeded: usize,
    upstream_429s: u64,
    goodput_ratio: f64,
    latency_ms: Latency,
    /// How long Redis was stopped mid-run (`redis` with the drill's own server only).
    redis_stopped_ms: Option<u64>,
    /// The longest time an instance spent off Redis (in-process instances only).
    off_redis_ms: Option<u64>,
    /// Upstream 429s from the stop until [`RECOVERY`] after it.
    upstream_429s_during_stop: Option<u64>,
    /// Whether those stayed within [`STOP_429_TARGET`].
    stop_target_met: Option<bool>,
}

/// What the stop of Redis cost.
#[derive(Debug, Default)]
struct Stop {
    stopped: Option<Duration>,
    off_redis: Option<Duration>,
    upstream_429s: Option<u64>,
}

/// Stops the drill's own Redis at [`STOP_AT`] for [`STOP_FOR`], watching the instances'
/// stores, and counts the simulator's 429s over the window.
async fn stop_redis(
    redis: &RedisSource,
    stores: &[RedisStore],
    sim: &portcullis::sim::SimHandle,
) -> Result<Stop, Box<dyn std::error::Error>> {
    let RedisSource::Local(local) = redis else {
        return Ok(Stop::default());
    };
    let pid = local.pid().to_string();
    let signal = |sig: &str| -> Result<(), Box<dyn std::error::Error>> {
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()?;
        match status.success() {
            true => Ok(()),
            false => Err(format!("kill {sig} {pid} failed").into()),
        }
    };
    tokio::time::sleep(STOP_AT).await;
    let before = sim.stats().status(429);
    let start = tokio::time::Instant::now();
    signal("-STOP")?;
    let mut off: Vec<Option<(Duration, Duration)>> = vec![None; stores.len()];
    let mut resumed = false;
    let end = STOP_FOR + RECOVERY;
    while start.elapsed() < end {
        if !resumed && start.elapsed() >= STOP_FOR {
            signal("-CONT")?;
            resumed = true;
        }
        let now = start.elapsed();
        for (store, seen) in stores.iter().zip(off.iter_mut()) {
            if store.is_degraded() {
                *seen = Some(seen.map_or((now, now), |(first, _)| (first, now)));
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    if !resumed {
        signal("-CONT")?;
    }
    let off_redis = off.iter().flatten().map(|(a, b)| *b - *a).max();
    Ok(Stop {
        stopped: Some(STOP_FOR),
        off_redis: (!stores.is_empty()).then(|| off_redis.unwrap_or_default()),
        upstream_429s: Some(sim.stats().status(429) - before),
    })
}

/// Runs the drill.
pub async fn run(
    seed: u64,
    instances: usize,
    redis: &RedisSource,
    processes: bool,
) -> Result<Report<Scenario, Row>, Box<dyn std::error::Error>> {
    let mut stacks = Vec::new();
    for name in [Sharing::Local, Sharing::Redis] {
        progress(&format!(
            "drill fleet: running {name} with {instances} instances ({} s)…",
            DURATION.as_secs()
        ));
        let sim = Simulator::builder()
            .seed(seed)
            .limits(sim_limits())
            .start()
            .await?;
        let prefix = format!("portcullis-drill:{}:{}:", std::process::id(), seed);
        let url = redis.url();
        let shared = (name == Sharing::Redis).then_some((url.as_str(), prefix.as_str()));
        let rate = RATE / instances as f64;
        let mut outcomes = Vec::new();
        let mut stop = Stop::default();
        if processes {
            let sim_url = sim.openai_base_url();
            let run = run_processes(&sim_url, shared, seed, instances, rate);
            if name == Sharing::Redis {
                let (run, s) = tokio::join!(run, stop_redis(redis, &[], &sim));
                outcomes = run?;
                stop = s?;
            } else {
                outcomes = run.await?;
            }
        } else {
            let mut runs = Vec::new();
            let mut stores = Vec::new();
            for n in 0..instances {
                let (svc, store) =
                    instance(&sim.openai_base_url(), shared, seed + n as u64, instances)?;
                stores.extend(store);
                let base = n as u64 * 1_000_000;
                runs.push(tokio::spawn(workload::run(svc, rate, DURATION, move |i| {
                    request(base + i, seed)
                })));
            }
            if name == Sharing::Redis {
                stop = stop_redis(redis, &stores, &sim).await?;
            }
            for r in runs {
                outcomes.extend(r.await?);
            }
        }
        let upstream_429s = sim.stats().status(429);
        sim.shutdown().await;
        stacks.push(Row {
            name,
            instances,
            requests: outcomes.len(),
            succeeded: outcomes.iter().filter(|o| o.result.is_ok()).count(),
            upstream_429s,
            goodput_ratio: goodput(&outcomes),
            latency_ms: latency(&outcomes, false),
            redis_stopped_ms: stop.stopped.map(|d| d.as_millis() as u64),
            off_redis_ms: stop.off_redis.map(|d| d.as_millis() as u64),
            upstream_429s_during_stop: stop.upstream_429s,
            stop_target_met: stop.upstream_429s.map(|n| n <= STOP_429_TARGET),
        });
    }
    Ok(Report {
        drill: Which::Fleet,
        seed,
        scenario: Scenario {
            description: format!(
                "{instances} instances share one provider's RPM/TPM limits; offered load is about twice the TPM limit"
            ),
            instances,
            processes,
            limits: LimitsScenario::default(),
        },
        stacks,
    })
}

/// Arguments of the hidden `portcullis drill-worker`: one instance of `drill fleet
/// --processes`.
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// The simulator's OpenAI base URL.
    #[arg(long)]
    sim_url: String,
    /// Seeds the instance's jitter and prompts.
    #[arg(long)]
    seed: u64,
    /// The instance's number: its request numbers start at `index` × 1 000 000.
    #[arg(long)]
    index: u64,
    /// Requests per second this instance offers.
    #[arg(long)]
    rate: f64,
    /// The Redis whose buckets the fleet shares (with `--prefix`); local buckets without.
    #[arg(long, requires = "prefix")]
    redis: Option<String>,
    /// The key prefix of the shared buckets.
    #[arg(long, requires = "redis")]
    prefix: Option<String>,
    /// How many instances the fleet has (each keeps 1/N of the limits while Redis is away).
    #[arg(long, default_value_t = 1)]
    instances: usize,
}

/// One outcome as a worker prints it: a JSON line.
#[derive(Debug, Serialize, Deserialize)]
struct Line {
    sent_us: u64,
    done_us: u64,
    /// The tokens served; `null` for a failure.
    tokens: Option<u64>,
}

impl From<&Outcome> for Line {
    fn from(o: &Outcome) -> Self {
        Line {
            sent_us: o.sent.as_micros() as u64,
            done_us: o.done.as_micros() as u64,
            tokens: o.result.as_ref().ok().map(|s| s.tokens),
        }
    }
}

impl From<Line> for Outcome {
    fn from(l: Line) -> Self {
        Outcome {
            sent: Duration::from_micros(l.sent_us),
            done: Duration::from_micros(l.done_us),
            result: match l.tokens {
                Some(tokens) => Ok(Served {
                    provider: "openai".into(),
                    tokens,
                }),
                None => Err(portcullis::ErrorKind::Server),
            },
        }
    }
}

/// Runs each instance as `portcullis drill-worker ...` and reads its outcomes.
async fn run_processes(
    sim_url: &str,
    shared: Option<(&str, &str)>,
    seed: u64,
    instances: usize,
    rate: f64,
) -> Result<Vec<Outcome>, Box<dyn std::error::Error>> {
    let exe = std::env::current_exe()?;
    let mut children = Vec::new();
    for n in 0..instances {
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args([
            "drill-worker",
            "--sim-url",
            sim_url,
            "--rate",
            &rate.to_string(),
        ])
        .args([
            "--seed",
            &(seed + n as u64).to_string(),
            "--index",
            &n.to_string(),
            "--instances",
            &instances.to_string(),
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true);
        if let Some((url, prefix)) = shared {
            cmd.args(["--redis", url, "--prefix", prefix]);
        }
        children.push(cmd.spawn()?);
    }
    let mut all = Vec::new();
    for mut child in children {
        let Some(stdout) = child.stdout.take() else {
            continue;
        };
        let mut lines = BufReader::new(stdout).lines();
        while let Some(line) = lines.next_line().await? {
            all.push(serde_json::from_str::<Line>(&line)?.into());
        }
        child.wait().await?;
    }
    Ok(all)
}

/// Runs `portcullis drill-worker`: one instance, its outcomes as JSON lines on stdout.
pub async fn worker(args: WorkerArgs) -> ExitCode {
    let shared = args.redis.as_deref().zip(args.prefix.as_deref());
    let svc = match instance(&args.sim_url, shared, args.seed, args.instances) {
        Ok((svc, _)) => svc,
        Err(e) => {
            eprintln!("error: fleet worker: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (seed, base) = (args.seed, args.index * 1_000_000);
    let outcomes = workload::run(svc, args.rate, DURATION, move |i| request(base + i, seed)).await;
    for o in &outcomes {
        match serde_json::to_string(&Line::from(o)) {
            Ok(line) => println!("{line}"),
            Err(e) => {
                eprintln!("error: fleet worker: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
