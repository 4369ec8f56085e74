//! The subcommands' arguments, and where on the broker a run is (`Target`).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Args;

use crate::Result;

const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const SIGNATURE_HEADER: &str = "x-goodfit-hmac-sha256";

/// Where on the broker: a courier configuration, or explicit names.
#[derive(Args, Clone)]
pub struct Target {
    /// A courier configuration: broker URL, exchange, delivery queue and prefetch from it.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Broker URL (else from --config, else $BENCH_AMQP_URL, else the local broker).
    #[arg(long, env = "BENCH_AMQP_URL")]
    pub url: Option<String>,
    /// Exchange (else from --config).
    #[arg(long)]
    pub exchange: Option<String>,
    /// Queue (else courier's delivery queue from --config).
    #[arg(long)]
    pub queue: Option<String>,
}

/// A target with the configuration applied.
pub struct Resolved {
    pub url: String,
    pub exchange: Option<String>,
    pub queue: Option<String>,
    pub prefetch: Option<u16>,
    /// Every queue courier declares for this configuration.
    pub topology: Vec<String>,
}

impl Target {
    /// The configuration's names, overridden by the explicit ones.
    pub fn resolve(&self) -> Result<Resolved> {
        let mut r = Resolved {
            url: DEFAULT_AMQP_URL.into(),
            exchange: None,
            queue: None,
            prefetch: None,
            topology: Vec::new(),
        };
        if let Some(path) = &self.config {
            let settings = courier::config::load(path)?;
            let b = &settings.broker;
            r.url = b.urls.first().ok_or("no broker URL")?.expose().to_owned();
            r.exchange = Some(b.exchange.clone());
            r.queue = Some(b.deliver_queue());
            r.prefetch = Some(b.prefetch);
            r.topology = courier::broker::topology::queues(b, &settings.retry.schedule, None)
                .into_iter()
                .map(|q| q.name)
                .collect();
        }
        if let Some(url) = &self.url {
            r.url = url.clone();
        }
        if let Some(x) = &self.exchange {
            r.exchange = Some(x.clone());
        }
        if let Some(q) = &self.queue {
            r.queue = Some(q.clone());
        }
        Ok(r)
    }
}

#[derive(Args)]
pub struct PreloadArgs {
    #[command(flatten)]
    pub target: Target,
    /// Events to publish.
    #[arg(long, default_value_t = 200_000)]
    pub events: u64,
    /// Accounts `acct-0000`…, chosen uniformly.
    #[arg(long, default_value_t = 20)]
    pub accounts: u32,
    /// Declare the exchange (topic) and --queue as a quorum queue bound with `#` first.
    #[arg(long)]
    pub declare: bool,
    /// Unconfirmed publishes allowed per publisher.
    #[arg(long, default_value_t = 1000)]
    pub window: usize,
    /// Publishing connections, each with its share of the events.
    #[arg(long, default_value_t = 2)]
    pub publishers: u32,
    /// Seed of the event generator.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Args)]
pub struct DrainArgs {
    #[command(flatten)]
    pub target: Target,
    /// Prefetch (else the configuration's, else 1000).
    #[arg(long)]
    pub prefetch: Option<u16>,
    /// Stop after this many messages.
    #[arg(long)]
    pub expect: u64,
    /// 1: ack every message on its own, in order; K > 1: one `multiple` ack every K.
    #[arg(long, default_value_t = 1)]
    pub ack_every: u64,
    /// With --ack-every 1: await each ack before taking the next message, instead of
    /// sending acks while the next messages are taken (the default).
    #[arg(long)]
    pub await_each_ack: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
}

#[derive(Args)]
pub struct ReceiveArgs {
    /// Address to listen on (loopback).
    #[arg(long, default_value = "127.0.0.1:8788")]
    pub listen: SocketAddr,
    /// Distinct events to wait for.
    #[arg(long)]
    pub expect: u64,
    /// Verify `--header` with this HMAC secret (failures are counted, the answer stays 200).
    #[arg(long, env = "BENCH_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// The signature header.
    #[arg(long, default_value = SIGNATURE_HEADER)]
    pub header: String,
    /// Also write the summary line to this file (atomically) when done.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Give up (summary with `"complete": false`) after this many seconds.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
    /// ...or after this many seconds without a request, once one arrived.
    #[arg(long, default_value_t = 60)]
    pub idle_timeout: u64,
    /// Keep answering this long after the summary (courier's last responses), then exit.
    #[arg(long, default_value_t = 120)]
    pub linger: u64,
}

#[derive(Args)]
pub struct FloodArgs {
    /// Where to POST (loopback).
    #[arg(long)]
    pub url: String,
    /// Requests in flight.
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Requests in all.
    #[arg(long)]
    pub requests: u64,
    /// Sign each body like courier does.
    #[arg(long, env = "BENCH_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// The signature header.
    #[arg(long, default_value = SIGNATURE_HEADER)]
    pub header: String,
    #[arg(long, default_value_t = 2)]
    pub seed: u64,
}

#[derive(Args)]
pub struct LatencyArgs {
    #[command(flatten)]
    pub target: Target,
    /// Events per second.
    #[arg(long, default_value_t = 2000)]
    pub rate: u64,
    /// Seconds to publish for.
    #[arg(long, default_value_t = 20)]
    pub duration: u64,
    #[arg(long, default_value_t = 20)]
    pub accounts: u32,
    #[arg(long, default_value_t = 1000)]
    pub window: usize,
    #[arg(long, default_value_t = 3)]
    pub seed: u64,
}

#[derive(Args)]
pub struct CleanupArgs {
    #[command(flatten)]
    pub target: Target,
}

#[derive(Args)]
pub struct ReportArgs {
    /// JSON lines collected by scripts/bench.sh.
    #[arg(long)]
    pub input: PathBuf,
    /// Write the machine-readable results here.
    #[arg(long)]
    pub json: PathBuf,
    /// Write the Markdown table here (it is printed too).
    #[arg(long)]
    pub md: PathBuf,
    /// `key=value` facts for the header (machine, command, sizes).
    #[arg(long = "meta")]
    pub meta: Vec<String>,
}
