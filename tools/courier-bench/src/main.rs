//! `courier-bench`: the load tools of `make bench` (scripts/bench.sh, docs/performance.md).
//!
//! Each subcommand is one side of a scenario and prints one JSON line that the script
//! collects:
//!
//! - `preload`: publish N realistic events (docs/events.md) with pipelined publisher confirms;
//! - `drain`: the bare consumer, the broker's ceiling: consume and ack, nothing else;
//! - `receive`: an HTTP receiver that counts events, verifies signatures and measures
//!   the publish→receipt latency of events that carry a `bench_ts`;
//! - `http-flood`: the bare reqwest loop, the HTTP ceiling of one receiver;
//! - `latency`: publish at a fixed rate, each event stamped with `bench_ts`;
//! - `cleanup`: delete the queues and exchange of a run; `free-port`: a free loopback port;
//! - `report`: turn the collected lines into the table (median and spread, ratios).
//!
//! It talks to the broker and to loopback receivers only; it does not touch courier's
//! internals beyond loading a configuration, its queue names and the signing functions.
//!
//! One module a concern: `cli` (arguments, where on the broker), `events` (the generator),
//! `broker` (connections, the confirmed publisher, `cleanup`), `publish` (`preload`,
//! `latency`), `drain`, `receive`, `flood` (`http-flood`), `report`; this file dispatches.

mod broker;
mod cli;
mod drain;
mod events;
mod flood;
mod publish;
mod receive;
mod report;

use std::time::Duration;

use clap::{Parser, Subcommand};

use cli::{CleanupArgs, DrainArgs, FloodArgs, LatencyArgs, PreloadArgs, ReceiveArgs, ReportArgs};

type Result<T, E = Box<dyn std::error::Error + Send + Sync>> = std::result::Result<T, E>;

/// Load tools for courier's benchmarks.
#[derive(Parser)]
#[command(name = "courier-bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Publish N events (publisher confirms, pipelined) to the exchange.
    Preload(PreloadArgs),
    /// Consume and ack only: the broker's ceiling.
    Drain(DrainArgs),
    /// An HTTP receiver that counts, verifies and times what it gets.
    Receive(ReceiveArgs),
    /// POST single events as fast as C concurrent requests allow: the HTTP ceiling.
    HttpFlood(FloodArgs),
    /// Publish at a fixed rate, each event stamped with `bench_ts` (ns since the epoch).
    Latency(LatencyArgs),
    /// Delete a run's queues and exchange.
    Cleanup(CleanupArgs),
    /// Print a free TCP port on 127.0.0.1.
    FreePort,
    /// Build the results table from the collected JSON lines.
    Report(ReportArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Preload(a) => publish::preload(a).await,
            Command::Drain(a) => drain::drain(a).await,
            Command::Receive(a) => receive::receive(a).await,
            Command::HttpFlood(a) => flood::http_flood(a).await,
            Command::Latency(a) => publish::latency(a).await,
            Command::Cleanup(a) => broker::cleanup(a).await,
            Command::FreePort => free_port(),
            Command::Report(a) => report::report(a),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(1));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("courier-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// utime + stime of this process in seconds, and VmHWM in KiB.
fn own_resources() -> (f64, u64) {
    let cpu = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            // Fields after the command name, which is in parentheses and may hold spaces.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
            Some(ticks as f64 / 100.0)
        })
        .unwrap_or(0.0);
    let hwm = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    (cpu, hwm)
}

fn free_port() -> Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    println!("{}", listener.local_addr()?.port());
    Ok(())
}
