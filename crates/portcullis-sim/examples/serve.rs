//! Runs the simulator in the foreground until Ctrl-C.
//!
//! ```text
//! cargo run -p portcullis-sim --example serve -- [--port P] [--scenario FILE]
//! ```
//!
//! The first line on stdout is the base address (`http://127.0.0.1:P`); the next two are the
//! OpenAI and Anthropic base URLs.

use std::io::Write;
use std::net::SocketAddr;

use portcullis_sim::Simulator;

#[tokio::main]
async fn main() {
    if let Err(e) = run().await {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let mut sim = Simulator::builder();
    let mut port = 0u16;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--port" => port = value()?.parse()?,
            "--scenario" => sim = sim.scenario_file(value()?)?,
            other => return Err(format!("unknown argument {other}").into()),
        }
    }
    let handle = sim
        .addr(SocketAddr::from(([127, 0, 0, 1], port)))
        .start()
        .await?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "http://{}", handle.addr())?;
    writeln!(out, "OPENAI_BASE_URL={}", handle.openai_base_url())?;
    writeln!(out, "ANTHROPIC_BASE_URL={}", handle.anthropic_base_url())?;
    out.flush()?;
    drop(out);
    handle.wait().await;
    Ok(())
}
