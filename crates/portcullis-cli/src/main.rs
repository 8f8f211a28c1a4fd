//! `portcullis`: chat with a provider, run the simulator, or run the resilience drills.
//!
//! With no API key in the environment, every command runs against the embedded simulator.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod chat;
mod drill;

/// Resilient LLM API calls as tower middleware: chat, the simulator, and the drills.
#[derive(Debug, Parser)]
#[command(name = "portcullis", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Send one prompt to a provider (the embedded simulator when no key is set).
    Chat(chat::ChatArgs),
    /// Run the simulated OpenAI + Anthropic server in the foreground.
    Sim(SimArgs),
    /// Run the resilience drills: each stack on the same seeded scenario and workload.
    Drill(drill::DrillArgs),
    /// Internal: one instance of `drill fleet --processes`, outcomes as JSON lines on stdout.
    #[command(hide = true)]
    DrillWorker(drill::WorkerArgs),
}

#[derive(Debug, clap::Args)]
struct SimArgs {
    /// Port to listen on (0 picks a free one).
    #[arg(long, default_value_t = 8089)]
    port: u16,
    /// A scenario file (TOML or JSON): limits, faults, timeline.
    #[arg(long)]
    scenario: Option<std::path::PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        match cli.command {
            Command::Chat(args) => chat::run(args).await,
            Command::Sim(args) => sim(args).await,
            Command::Drill(args) => drill::run(args).await,
            Command::DrillWorker(args) => drill::worker(args).await,
        }
    })
}

async fn sim(args: SimArgs) -> ExitCode {
    let mut builder = portcullis::sim::Simulator::builder()
        .addr(std::net::SocketAddr::from(([127, 0, 0, 1], args.port)));
    if let Some(path) = &args.scenario {
        builder = match builder.scenario_file(path) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("error: {}: {e}", path.display());
                return ExitCode::from(2);
            }
        };
    }
    let sim = match builder.start().await {
        Ok(sim) => sim,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("portcullis simulator listening on http://{}", sim.addr());
    println!("  OpenAI:    OPENAI_BASE_URL={}", sim.openai_base_url());
    println!(
        "  Anthropic: ANTHROPIC_BASE_URL={}",
        sim.anthropic_base_url()
    );
    println!(
        "  any non-empty API key is accepted; stats at http://{}/_sim/stats",
        sim.addr()
    );
    tokio::select! {
        _ = sim.wait() => ExitCode::SUCCESS,
        _ = tokio::signal::ctrl_c() => ExitCode::SUCCESS,
    }
}
