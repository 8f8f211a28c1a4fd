//! `portcullis drill`: the same seeded scenario and workload through three stacks, one after
//! another, against in-process simulators with time compressed.
//!
//! - `bare`: the provider alone (in `rate-limit`, with the official SDKs' retry: 2 retries
//!   honouring `retry-after`);
//! - `seed`: a faithful port of the seed's classes ([`seed`]), flaws included;
//! - `portcullis`: the [`Stack`](portcullis::Stack).
//!
//! Every duration of every stack is its real-world default multiplied by [`SCALE`], so that a
//! 60 s breaker recovery lasts 3 s here; where two stacks share a concept they get the same
//! value.

use std::fmt;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;
use stacks::StackKind;

#[cfg(feature = "async-openai")]
mod async_openai;
mod failover;
mod fleet;
mod litellm;
mod outage;
pub mod pool;
mod rate_limit;
pub mod seed;
mod soak;
mod stacks;
mod storm;
mod svg;
pub mod workload;

pub use fleet::{WorkerArgs, worker};

/// Real time per simulated second: 1/20, so a 60 s recovery timeout lasts 3 s.
pub const SCALE: f64 = 1.0 / 20.0;

/// Scales a real-world duration to drill time.
pub fn scaled(d: Duration) -> Duration {
    d.mul_f64(SCALE)
}

/// Which drill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Which {
    /// The primary answers 503 for a middle phase; a secondary provider exists.
    Outage,
    /// One simulator enforces RPM and TPM; the offered load is about twice the token limit.
    RateLimit,
    /// The primary answers 503 to everything; no fallback.
    Storm,
    /// The primary fails (503, 529, 429 with Retry-After 1/20/120 s, hangs) while a fallback is
    /// healthy: the library's default settings, on paused time; targets checked.
    Failover,
    /// All four, one after another.
    All,
    /// N client instances share one provider's limits: local buckets vs one Redis.
    Fleet,
    /// Mixed faults, cancellations and load for `--duration`, then a check that nothing leaked
    /// (permits, reservations, panics); exits non-zero if anything did.
    Soak,
    /// Three deployments of one model with their own limits; one slows, another goes down:
    /// one deployment, round-robin, LiteLLM-like usage routing and the pool; exits non-zero if
    /// the pool misses a target. With `--redis`, `--instances` pools share the buckets.
    Pool,
}

impl fmt::Display for Which {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let value = clap::ValueEnum::to_possible_value(self).ok_or(fmt::Error)?;
        f.write_str(value.get_name())
    }
}

/// Arguments of `portcullis drill`.
#[derive(Debug, clap::Args)]
pub struct DrillArgs {
    /// Which drill to run.
    #[arg(value_enum)]
    which: Which,
    /// Print one JSON object per drill (an array for `all`).
    #[arg(long)]
    json: bool,
    /// Seeds the simulators, the jitter and the workload.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Write a timeline chart of the outage drill to this SVG file.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// `fleet`: how many client instances.
    #[arg(long, default_value_t = 4)]
    instances: usize,
    /// `fleet`: the Redis to share (default: start a throwaway `redis-server`). `pool`: share
    /// the deployments' buckets across `--instances` pools in this Redis (`--redis` alone:
    /// a throwaway server).
    #[arg(long, num_args = 0..=1, default_missing_value = "")]
    redis: Option<String>,
    /// `fleet`: run the instances as separate OS processes.
    #[arg(long)]
    processes: bool,
    /// `soak`: how long to run (`90s`, `10m`, `500ms`).
    #[arg(long, default_value = "60s", value_parser = soak::parse_duration)]
    duration: Duration,
    /// `soak`: how many workers send calls at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Print, after the report, every metric the layers recorded during the run (all stacks
    /// together), in the names of `portcullis::layers::telemetry`.
    #[arg(long)]
    metrics: bool,
}

/// A recorder that keeps every metric of the run, for `--metrics`.
struct Recorded(metrics_util::debugging::Snapshotter);

impl Recorded {
    /// Installs the recorder for the whole process (`None` if another one already is).
    fn install() -> Option<Recorded> {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        metrics::set_global_recorder(recorder).ok()?;
        Some(Recorded(snapshotter))
    }

    /// Prints every series: a counter's count, a gauge's value, a histogram's count and sum.
    fn print(&self) {
        use metrics_util::debugging::DebugValue;
        let mut lines: Vec<String> = self
            .0
            .snapshot()
            .into_vec()
            .into_iter()
            .map(|(k, _, _, v)| {
                let labels: Vec<String> = k
                    .key()
                    .labels()
                    .map(|l| format!("{}={}", l.key(), l.value()))
                    .collect();
                let value = match v {
                    DebugValue::Counter(n) => n.to_string(),
                    DebugValue::Gauge(g) => format!("{:.3}", g.into_inner()),
                    DebugValue::Histogram(h) => {
                        let sum: f64 = h.iter().map(|x| x.into_inner()).sum();
                        format!("count {} sum {sum:.3}", h.len())
                    }
                };
                format!("{}{{{}}} {value}", k.key().name(), labels.join(","))
            })
            .collect();
        lines.sort();
        println!("\n== metrics recorded ({} series)", lines.len());
        for l in lines {
            println!("{l}");
        }
    }
}

async fn run_soak(args: &DrillArgs) -> ExitCode {
    if args.concurrency == 0 {
        eprintln!("error: --concurrency must be at least 1");
        return ExitCode::from(2);
    }
    progress(&format!(
        "drill soak: {} s with {} workers…",
        args.duration.as_secs(),
        args.concurrency
    ));
    let report = match soak::run(args.seed, args.duration, args.concurrency).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: drill soak: {e}");
            return ExitCode::FAILURE;
        }
    };
    let passed = report.passed();
    match to_value(&report) {
        Ok(v) if args.json => print_json(&v),
        Ok(v) => {
            println!(
                "\n== drill soak: {}",
                v["scenario"]["description"].as_str().unwrap_or("")
            );
            if let Some(result) = v["result"].as_object() {
                for (k, value) in result {
                    println!("{k:24}  {}", cell(value));
                }
            }
        }
        Err(e) => eprintln!("error: drill soak: {e}"),
    }
    match passed {
        true => ExitCode::SUCCESS,
        false => {
            eprintln!("error: drill soak: something leaked or panicked (see above)");
            ExitCode::FAILURE
        }
    }
}

async fn run_fleet(args: &DrillArgs) -> ExitCode {
    if args.instances == 0 {
        eprintln!("error: --instances must be at least 1");
        return ExitCode::from(2);
    }
    let redis = match fleet::redis(args.redis.clone()) {
        Ok(r) => r,
        Err(msg) => {
            eprintln!("error: {msg}");
            return ExitCode::from(2);
        }
    };
    let report = fleet::run(args.seed, args.instances, &redis, args.processes).await;
    match report.and_then(|r| to_value(&r)) {
        Ok(r) => {
            if args.json {
                print_json(&r);
            } else {
                print_table(&r);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: drill fleet: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn run_pool(args: &DrillArgs) -> ExitCode {
    let result = match &args.redis {
        Some(_) => match fleet::redis(args.redis.clone()) {
            Ok(redis) => pool::run_fleet(args.seed, args.instances.max(1), &redis).await,
            Err(msg) => {
                eprintln!("error: {msg}");
                return ExitCode::from(2);
            }
        },
        _ => pool::run(args.seed).await,
    };
    let (report, runs) = match result {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: drill pool: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(path) = &args.svg {
        if let Err(e) = svg::write_pool(path, &runs) {
            eprintln!("error: writing {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        progress(&format!("wrote {}", path.display()));
    }
    let missed = report.stacks.iter().any(pool::missed);
    match to_value(&report) {
        Ok(v) if args.json => print_json(&v),
        Ok(v) => print_table(&v),
        Err(e) => eprintln!("error: drill pool: {e}"),
    }
    if missed {
        eprintln!("error: drill pool: the pool missed a target (see targets_met)");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// A drill's report: what `--json` prints and the table shows (one column per stack).
#[derive(Debug, Serialize)]
pub struct Report<Scenario, Row> {
    /// Which drill.
    pub drill: Which,
    /// The seed it ran with.
    pub seed: u64,
    /// What the drill does (its `description`) and its settings.
    pub scenario: Scenario,
    /// One row per stack, in the order they ran; each with its `name`.
    pub stacks: Vec<Row>,
}

/// The serialized form of a report. serde_json's map sorts the keys, so `--json` and the
/// table list them in the same order as when the reports were built with `json!`.
fn to_value(report: &impl Serialize) -> Result<Value, Box<dyn std::error::Error>> {
    Ok(serde_json::to_value(report)?)
}

fn print_json(report: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(report).unwrap_or_default()
    );
}

/// Runs `one` on every stack in turn, with a progress line for each of the `run`'s length.
pub async fn each_stack<Row, Run>(
    drill: Which,
    run: Duration,
    mut one: impl FnMut(StackKind) -> Run,
) -> Result<Vec<Row>, Box<dyn std::error::Error>>
where
    Run: Future<Output = Result<Row, Box<dyn std::error::Error>>>,
{
    let mut rows = Vec::new();
    for kind in StackKind::ALL {
        progress(&format!(
            "drill {drill}: running {kind} ({} s)…",
            run.as_secs()
        ));
        rows.push(one(kind).await?);
    }
    Ok(rows)
}

/// Progress on stderr, when it is a terminal.
pub fn progress(msg: &str) {
    if std::io::stderr().is_terminal() {
        eprintln!("{msg}");
    }
}

/// Runs `portcullis drill`: prints a table per drill, or the JSON reports (then, with
/// `--metrics`, every metric recorded).
pub async fn run(args: DrillArgs) -> ExitCode {
    let recorded = if args.metrics {
        Recorded::install()
    } else {
        None
    };
    let code = run_drills(args).await;
    if let Some(r) = recorded {
        r.print();
    }
    code
}

async fn run_drills(args: DrillArgs) -> ExitCode {
    if args.which == Which::Fleet {
        return run_fleet(&args).await;
    }
    if args.which == Which::Soak {
        return run_soak(&args).await;
    }
    if args.which == Which::Pool {
        return run_pool(&args).await;
    }
    let which: &[Which] = match args.which {
        Which::All => &[
            Which::Outage,
            Which::RateLimit,
            Which::Storm,
            Which::Failover,
        ],
        Which::Outage => &[Which::Outage],
        Which::RateLimit => &[Which::RateLimit],
        Which::Storm => &[Which::Storm],
        Which::Failover => &[Which::Failover],
        Which::Fleet | Which::Soak | Which::Pool => &[],
    };
    if args.svg.is_some() && !which.contains(&Which::Outage) {
        eprintln!("error: --svg draws the outage drill; run `drill outage --svg FILE`");
        return ExitCode::from(2);
    }
    let mut reports = Vec::new();
    let mut missed = false;
    for w in which {
        let mut timelines = Vec::new();
        if *w == Which::Failover {
            match failover::run(args.seed).await {
                Ok(r) => {
                    missed |= !r.stacks.iter().all(failover::Row::passed);
                    if !args.json {
                        failover::print(&r);
                    }
                    match to_value(&r) {
                        Ok(v) => reports.push(v),
                        Err(e) => eprintln!("error: drill failover: {e}"),
                    }
                }
                Err(e) => {
                    eprintln!("error: drill failover: {e}");
                    return ExitCode::FAILURE;
                }
            }
            continue;
        }
        let result = match w {
            Which::Outage => outage::run(args.seed).await.and_then(|(r, t)| {
                timelines = t;
                to_value(&r)
            }),
            Which::RateLimit => rate_limit::run(args.seed).await.and_then(|r| to_value(&r)),
            Which::Storm => storm::run(args.seed).await.and_then(|r| to_value(&r)),
            Which::All | Which::Failover | Which::Fleet | Which::Soak | Which::Pool => {
                unreachable!("expanded or run above")
            }
        };
        match result {
            Ok(r) => {
                if *w == Which::Outage {
                    if let Some(path) = &args.svg {
                        if let Err(e) = svg::write(path, &timelines) {
                            eprintln!("error: writing {}: {e}", path.display());
                            return ExitCode::FAILURE;
                        }
                        progress(&format!("wrote {}", path.display()));
                    }
                }
                if !args.json {
                    print_table(&r);
                }
                reports.push(r);
            }
            Err(e) => {
                eprintln!("error: drill {w:?}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if args.json {
        if args.which == Which::All {
            print_json(&Value::Array(reports));
        } else if !reports.is_empty() {
            print_json(&reports.remove(0));
        }
    }
    if missed {
        eprintln!("error: drill failover: the default stack missed a target (see above)");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Prints a drill's stacks as a table: one row per metric, one column per stack.
fn print_table(report: &Value) {
    let name = report["drill"].as_str().unwrap_or("?");
    println!(
        "\n== drill {name}: {}",
        report["scenario"]["description"].as_str().unwrap_or("")
    );
    let Some(stacks) = report["stacks"].as_array() else {
        return;
    };
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    if let Some(first) = stacks.first().and_then(|s| s.as_object()) {
        for (key, value) in first {
            if key == "name" {
                continue;
            }
            let keys: Vec<String> = match value {
                Value::Object(m) => m.keys().map(|k| format!("{key}.{k}")).collect(),
                _ => vec![key.clone()],
            };
            for k in keys {
                let cells = stacks.iter().map(|s| cell(lookup(s, &k))).collect();
                rows.push((k, cells));
            }
        }
    }
    let w0 = rows.iter().map(|r| r.0.len()).max().unwrap_or(6).max(6);
    print!("{:w0$}", "metric");
    for s in stacks {
        print!("  {:>14}", s["name"].as_str().unwrap_or("?"));
    }
    println!();
    for (k, cells) in rows {
        print!("{k:w0$}");
        for c in cells {
            print!("  {c:>14}");
        }
        println!();
    }
}

fn lookup<'a>(v: &'a Value, dotted: &str) -> &'a Value {
    dotted.split('.').fold(v, |v, k| &v[k])
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::Number(n) => match n.as_f64() {
            Some(f) if n.is_f64() => format!("{f:.3}"),
            _ => n.to_string(),
        },
        Value::Array(a) => format!("{} items", a.len()),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Latency percentiles of a run, in milliseconds.
#[derive(Debug, Serialize)]
pub struct Latency {
    /// The median.
    pub p50: f64,
    /// The 99th percentile.
    pub p99: f64,
    /// The slowest, where the drill reports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

/// Latency percentiles of a run, with the maximum if `with_max`.
pub fn latency(outcomes: &[workload::Outcome], with_max: bool) -> Latency {
    Latency {
        p50: workload::percentile_ms(outcomes, 50.0),
        p99: workload::percentile_ms(outcomes, 99.0),
        max: with_max.then(|| workload::percentile_ms(outcomes, 100.0)),
    }
}

/// `scenario.time_scale` of every drill: simulated seconds per real second.
pub const TIME_SCALE: f64 = 1.0 / SCALE;
