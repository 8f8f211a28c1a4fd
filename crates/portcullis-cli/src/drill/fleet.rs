//! `drill fleet`: N client instances share one provider's RPM / TPM limits.
//!
//! - `local`: every instance keeps its own in-memory bucket at the full limit (what a fleet
//!   gets when each replica is configured alone);
//! - `redis`: every instance draws from the same buckets in Redis ([`portcullis_redis`]).
//!
//! With `--processes`, the instances are separate OS processes (this binary, re-run as the
//! hidden `portcullis drill-worker`) and the outcomes come back as JSON lines.

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

/// Where the fleet's Redis comes from.
pub enum RedisSource {
    /// A URL given with `--redis`.
    Url(String),
    /// A throwaway `redis-server` started for the drill.
    Local(LocalRedis),
}

impl RedisSource {
    fn url(&self) -> String {
        match self {
            RedisSource::Url(u) => u.clone(),
            RedisSource::Local(l) => l.url(),
        }
    }
}

/// Finds the Redis to use, or explains how to get one.
pub fn redis(url: Option<String>) -> Result<RedisSource, String> {
    if let Some(u) = url {
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
) -> Result<StackService, Box<dyn std::error::Error>> {
    let provider = ProviderStack::openai(stacks::openai(sim_url)?);
    let provider = stacks::provider_stack(provider, Some(client_limits()?), seed);
    Ok(match shared {
        None => BoxCloneSyncService::new(stacks::portcullis(vec![provider])?.completions()),
        Some((url, prefix)) => {
            let redis = RedisConfig::new(url)
                .prefix(prefix)
                .fail_open_share(1.0 / instances.max(1) as f64);
            let provider = provider.store(move |name, limits| {
                Ok(RedisStore::new(name.to_owned(), limits, redis.clone())?)
            });
            BoxCloneSyncService::new(stacks::portcullis(vec![provider])?.completions())
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
        if processes {
            outcomes = run_processes(&sim.openai_base_url(), shared, seed, instances, rate).await?;
        } else {
            let mut runs = Vec::new();
            for n in 0..instances {
                let svc = instance(&sim.openai_base_url(), shared, seed + n as u64, instances)?;
                let base = n as u64 * 1_000_000;
                runs.push(tokio::spawn(workload::run(svc, rate, DURATION, move |i| {
                    request(base + i, seed)
                })));
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
        Ok(svc) => svc,
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
