//! `courier-bench`: the load tools of `make bench` (scripts/bench.sh, docs/performance.md).
//!
//! Each subcommand is one side of a scenario and prints one JSON line that the script
//! collects:
//!
//! - `preload`: publish N realistic events (CONTRACT §1) with pipelined publisher confirms;
//! - `drain`: the bare consumer, the broker's ceiling: consume and ack, nothing else;
//! - `receive`: an HTTP receiver that counts events, verifies signatures and measures
//!   the publish→receipt latency of events that carry a `bench_ts`;
//! - `http-flood`: the bare reqwest loop, the HTTP ceiling of one receiver;
//! - `latency`: publish at a fixed rate, each event stamped with `bench_ts`;
//! - `cleanup`: delete the queues and exchange of a run; `free-port`: a free loopback port;
//! - `report`: turn the collected lines into the table (median and spread, ratios).
//!
//! It talks to the broker and to loopback receivers only; it does not touch courier's
//! internals beyond loading a configuration and the signing functions.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use clap::{Args, Parser, Subcommand};
use futures_util::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use serde_json::{Value, json};
use tokio::sync::Notify;

const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const SIGNATURE_HEADER: &str = "x-goodfit-hmac-sha256";

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

/// Where on the broker: a courier configuration, or explicit names.
#[derive(Args, Clone)]
struct Target {
    /// A courier configuration: broker URL, exchange, delivery queue and prefetch from it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Broker URL (else from --config, else $BENCH_AMQP_URL, else the local broker).
    #[arg(long, env = "BENCH_AMQP_URL")]
    url: Option<String>,
    /// Exchange (else from --config).
    #[arg(long)]
    exchange: Option<String>,
    /// Queue (else courier's delivery queue from --config).
    #[arg(long)]
    queue: Option<String>,
}

/// A target with the configuration applied.
struct Resolved {
    url: String,
    exchange: Option<String>,
    queue: Option<String>,
    prefetch: Option<u16>,
    /// Every queue courier declares for this configuration.
    topology: Vec<String>,
}

impl Target {
    fn resolve(&self) -> Result<Resolved> {
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
            r.topology = courier::broker::topology::queues(b, &settings.retry.schedule)
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
struct PreloadArgs {
    #[command(flatten)]
    target: Target,
    /// Events to publish.
    #[arg(long, default_value_t = 200_000)]
    events: u64,
    /// Accounts `acct-0000`…, chosen uniformly.
    #[arg(long, default_value_t = 20)]
    accounts: u32,
    /// Declare the exchange (topic) and --queue as a quorum queue bound with `#` first.
    #[arg(long)]
    declare: bool,
    /// Unconfirmed publishes allowed per publisher.
    #[arg(long, default_value_t = 1000)]
    window: usize,
    /// Publishing connections, each with its share of the events.
    #[arg(long, default_value_t = 2)]
    publishers: u32,
    /// Seed of the event generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Args)]
struct DrainArgs {
    #[command(flatten)]
    target: Target,
    /// Prefetch (else the configuration's, else 1000).
    #[arg(long)]
    prefetch: Option<u16>,
    /// Stop after this many messages.
    #[arg(long)]
    expect: u64,
    /// 1: ack every message on its own, in order; K > 1: one `multiple` ack every K.
    #[arg(long, default_value_t = 1)]
    ack_every: u64,
    /// With --ack-every 1: await each ack before taking the next message, instead of
    /// sending acks while the next messages are taken (the default).
    #[arg(long)]
    await_each_ack: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout: u64,
}

#[derive(Args)]
struct ReceiveArgs {
    /// Address to listen on (loopback).
    #[arg(long, default_value = "127.0.0.1:8788")]
    listen: SocketAddr,
    /// Distinct events to wait for.
    #[arg(long)]
    expect: u64,
    /// Verify `--header` with this HMAC secret (failures are counted, the answer stays 200).
    #[arg(long, env = "BENCH_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// The signature header.
    #[arg(long, default_value = SIGNATURE_HEADER)]
    header: String,
    /// Also write the summary line to this file (atomically) when done.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Give up (summary with `"complete": false`) after this many seconds.
    #[arg(long, default_value_t = 900)]
    timeout: u64,
    /// ...or after this many seconds without a request, once one arrived.
    #[arg(long, default_value_t = 60)]
    idle_timeout: u64,
    /// Keep answering this long after the summary (courier's last responses), then exit.
    #[arg(long, default_value_t = 120)]
    linger: u64,
}

#[derive(Args)]
struct FloodArgs {
    /// Where to POST (loopback).
    #[arg(long)]
    url: String,
    /// Requests in flight.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Requests in all.
    #[arg(long)]
    requests: u64,
    /// Sign each body like courier does.
    #[arg(long, env = "BENCH_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// The signature header.
    #[arg(long, default_value = SIGNATURE_HEADER)]
    header: String,
    #[arg(long, default_value_t = 2)]
    seed: u64,
}

#[derive(Args)]
struct LatencyArgs {
    #[command(flatten)]
    target: Target,
    /// Events per second.
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// Seconds to publish for.
    #[arg(long, default_value_t = 20)]
    duration: u64,
    #[arg(long, default_value_t = 20)]
    accounts: u32,
    #[arg(long, default_value_t = 1000)]
    window: usize,
    #[arg(long, default_value_t = 3)]
    seed: u64,
}

#[derive(Args)]
struct CleanupArgs {
    #[command(flatten)]
    target: Target,
}

#[derive(Args)]
struct ReportArgs {
    /// JSON lines collected by scripts/bench.sh.
    #[arg(long)]
    input: PathBuf,
    /// Write the machine-readable results here.
    #[arg(long)]
    json: PathBuf,
    /// Write the Markdown table here (it is printed too).
    #[arg(long)]
    md: PathBuf,
    /// `key=value` facts for the header (machine, command, sizes).
    #[arg(long = "meta")]
    meta: Vec<String>,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Preload(a) => preload(a).await,
            Command::Drain(a) => drain(a).await,
            Command::Receive(a) => receive(a).await,
            Command::HttpFlood(a) => http_flood(a).await,
            Command::Latency(a) => latency(a).await,
            Command::Cleanup(a) => cleanup(a).await,
            Command::FreePort => free_port(),
            Command::Report(a) => report(a),
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

// ---------------------------------------------------------------------------------------
// Events

/// xorshift64*: enough randomness for test data, no dependency.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[self.below(items.len() as u64) as usize]
    }
}

#[rustfmt::skip]
const FIRST: &[&str] = &[
    "Grace", "Oskar", "Mei", "Noah", "Amara", "Lukas", "Sofía", "Kenji", "Zoë", "Ravi",
    "Ingrid", "Tomás", "Aisha", "Chen", "Olivia", "Mateo",
];
#[rustfmt::skip]
const LAST: &[&str] = &[
    "Kim", "Novak", "Patel", "García", "O'Brien", "Müller", "Nakamura", "Okafor", "Silva",
    "Johansson", "Rossi", "Dubois", "Kowalski", "Haddad",
];
#[rustfmt::skip]
const COMPANY: &[&str] = &[
    "Cyberdyne Systems", "Adventure Works", "Tailspin Toys", "Humongous Insurance",
    "Southridge Video", "Northwind Traders", "Fabrikam \\\"Labs\\\"", "Contoso Ltd",
    "Wide World Importers", "Blue Yonder Airlines", "Lamna Healthcare", "Proseware, Inc.",
];
#[rustfmt::skip]
const INDUSTRY: &[&str] = &[
    "Financial Services", "Software", "Healthcare", "Retail", "Manufacturing", "Logistics",
    "Education", "Media & Entertainment",
];
#[rustfmt::skip]
const TITLE: &[&str] = &[
    "CTO", "Procurement Lead", "Revenue Operations Manager", "VP Sales", "Head of Data",
    "Account Executive", "Marketing Director", "Chief Financial Officer",
];
const COUNTRY: &[&str] = &["GB", "US", "DE", "JP", "FR", "BR", "IN", "NG", "SE", "ES"];
#[rustfmt::skip]
const WORDS: &[&str] = &[
    "platform", "customer", "pipeline", "growth", "enterprise", "regional", "partner",
    "analytics", "renewal", "expansion", "mid-market", "signals", "intent", "hiring", "funding",
    "launch", "migration", "integration", "quarterly", "forecast", "über", "café", "naïve",
    "\\n", "\\t", "\\u00e9",
];

/// Builds realistic events: 740–1,000 bytes (mean ≈ 870), both types, unique ids.
struct EventGen {
    rng: Rng,
    accounts: u32,
    tag: String,
}

impl EventGen {
    fn new(seed: u64, accounts: u32) -> Self {
        let mut rng = Rng::new(seed ^ now_ns());
        let tag: String = (0..6)
            .map(|_| char::from(b'a' + rng.below(26) as u8))
            .collect();
        Self {
            rng,
            accounts: accounts.max(1),
            tag,
        }
    }

    /// Routing key and body of event `seq`, with `bench_ts` (ns since the epoch) when given.
    fn event(&mut self, seq: u64, bench_ts: Option<u64>) -> (String, Vec<u8>) {
        let r = &mut self.rng;
        let account = format!("acct-{:04}", r.below(u64::from(self.accounts)));
        let company = r.below(10) < 6;
        let kind = if company { "company" } else { "contact" };
        let action = if r.below(4) == 0 {
            "created"
        } else {
            "updated"
        };
        let target = 740 + r.below(261) as usize;
        let record_id = format!("{account}-{}-{:06}", &kind[..2], r.below(1_000_000));
        let mut s = String::with_capacity(1100);
        s.push_str(&format!("{{\"id\":\"{}-{seq}\"", self.tag));
        if let Some(ts) = bench_ts {
            s.push_str(&format!(",\"bench_ts\":{ts}"));
        }
        s.push_str(&format!(
            ",\"account\":\"{account}\",\"type\":\"{kind}\",\"action\":\"{action}\",\"record_id\":\"{record_id}\""
        ));
        if r.below(5) != 0 {
            s.push_str(&format!(
                ",\"occurred_at\":\"2026-11-{:02}T{:02}:{:02}:{:02}.{:03}Z\"",
                1 + r.below(28),
                r.below(24),
                r.below(60),
                r.below(60),
                r.below(1000)
            ));
        }
        if company {
            let name = r.pick(COMPANY);
            s.push_str(&format!(
                ",\"record\":{{\"id\":\"{record_id}\",\"name\":\"{name}\",\"domain\":\"d{}.example\",\"employees\":{},\"industry\":\"{}\",\"country\":\"{}\",\"founded\":{},\"revenue_usd\":{},\"tags\":[\"{}\",\"{}\"],\"description\":\"",
                r.below(100_000),
                1 + r.below(50_000),
                r.pick(INDUSTRY),
                r.pick(COUNTRY),
                1950 + r.below(75),
                r.below(5_000_000_000),
                r.pick(WORDS),
                r.pick(WORDS),
            ));
        } else {
            let (first, last) = (r.pick(FIRST), r.pick(LAST));
            s.push_str(&format!(
                ",\"record\":{{\"id\":\"{record_id}\",\"first_name\":\"{first}\",\"last_name\":\"{last}\",\"email\":\"{}.{}@c{}.example\",\"title\":\"{}\",\"company_id\":\"{account}-co-{:06}\",\"phone\":\"+44 20 7946 {:04}\",\"seniority\":{},\"notes\":\"",
                first.to_lowercase(),
                last.to_lowercase().replace('\'', ""),
                r.below(100_000),
                r.pick(TITLE),
                r.below(1_000_000),
                r.below(10_000),
                r.below(6),
            ));
        }
        // Pad the free-text field to the target size (the closing `"}}` is 3 bytes).
        while s.len() + 3 < target {
            let w = r.pick(WORDS);
            if s.len() + w.len() + 4 > target {
                s.push('.');
            } else {
                s.push_str(w);
                s.push(' ');
            }
        }
        s.push_str("\"}}");
        let routing_key = format!("{account}.{kind}");
        (routing_key, s.into_bytes())
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------------------
// Broker side

async fn connect(url: &str, name: &str) -> Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Ok(within(Connection::connect(url, props)).await??)
}

/// Bounds one broker operation: a connection whose I/O loop died can leave a reply
/// pending forever, and a benchmark must not hang on it.
async fn within<T>(op: impl std::future::Future<Output = T>) -> Result<T> {
    tokio::time::timeout(Duration::from_secs(15), op)
        .await
        .map_err(|_| "the broker did not answer within 15 s".into())
}

/// A confirmed publisher: publishes without waiting, while a task awaits the confirms in
/// order; at most `window` are outstanding.
struct ConfirmedPublisher {
    conn: Connection,
    channel: Channel,
    exchange: String,
    confirms: tokio::sync::mpsc::Sender<lapin::PublisherConfirm>,
    done: tokio::task::JoinHandle<Result<u64>>,
    properties: BasicProperties,
}

impl ConfirmedPublisher {
    async fn open(url: &str, exchange: &str, window: usize, name: &str) -> Result<Self> {
        let conn = connect(url, name).await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<lapin::PublisherConfirm>(window.max(1));
        let done = tokio::spawn(async move {
            let mut confirmed = 0u64;
            while let Some(confirm) = rx.recv().await {
                match within(confirm).await?? {
                    Confirmation::Ack(None) => confirmed += 1,
                    Confirmation::Ack(Some(m)) | Confirmation::Nack(Some(m)) => {
                        return Err(format!(
                            "message returned by the broker ({}): is the topology declared?",
                            m.reply_text
                        )
                        .into());
                    }
                    Confirmation::Nack(None) => return Err("message nacked by the broker".into()),
                    Confirmation::NotRequested => unreachable!("confirm_select is on"),
                }
            }
            Ok(confirmed)
        });
        Ok(Self {
            conn,
            channel,
            exchange: exchange.to_owned(),
            confirms: tx,
            done,
            properties: BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into()),
        })
    }

    async fn publish(&self, routing_key: &str, body: &[u8]) -> Result<()> {
        let confirm = within(self.channel.basic_publish(
            self.exchange.as_str().into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            self.properties.clone(),
        ))
        .await??;
        self.confirms
            .send(confirm)
            .await
            .map_err(|_| "the confirm task stopped")?;
        Ok(())
    }

    /// Waits for every confirm; returns how many were acked.
    async fn finish(self) -> Result<u64> {
        drop(self.confirms);
        let confirmed = self.done.await??;
        let _ = within(self.conn.close(200, "done".into())).await;
        Ok(confirmed)
    }
}

async fn preload(args: PreloadArgs) -> Result<()> {
    let target = args.target.resolve()?;
    let exchange = target
        .exchange
        .clone()
        .ok_or("--exchange or --config needed")?;
    if args.declare {
        let queue = target.queue.clone().ok_or("--declare needs --queue")?;
        let conn = connect(&target.url, "courier-bench declare").await?;
        let ch = conn.create_channel().await?;
        ch.exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
        let mut qargs = FieldTable::default();
        qargs.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            qargs,
        )
        .await?;
        ch.queue_bind(
            queue.as_str().into(),
            exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
        let _ = within(conn.close(200, "done".into())).await;
    }
    let publishers = args.publishers.max(1) as u64;
    let bytes = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..publishers {
        let url = target.url.clone();
        let exchange = exchange.clone();
        let bytes = bytes.clone();
        let window = args.window;
        let (events, accounts, seed) = (args.events, args.accounts, args.seed);
        tasks.push(tokio::spawn(async move {
            let publisher = ConfirmedPublisher::open(
                &url,
                &exchange,
                window,
                &format!("courier-bench preload {p}"),
            )
            .await?;
            let mut generator = EventGen::new(seed.wrapping_add(p * 7919), accounts);
            let mut seq = p;
            while seq < events {
                let (key, body) = generator.event(seq, None);
                bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                publisher.publish(&key, &body).await?;
                seq += publishers;
            }
            publisher.finish().await
        }));
    }
    let mut confirmed = 0;
    for t in tasks {
        confirmed += t.await??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({
            "cmd": "preload",
            "events": confirmed,
            "mean_bytes": bytes.load(Ordering::Relaxed) as f64 / confirmed.max(1) as f64,
            "elapsed_s": elapsed,
            "events_per_s": confirmed as f64 / elapsed,
        })
    );
    if confirmed != args.events {
        return Err(format!("only {confirmed} of {} events confirmed", args.events).into());
    }
    Ok(())
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

async fn drain(args: DrainArgs) -> Result<()> {
    let target = args.target.resolve()?;
    let queue = target.queue.clone().ok_or("--queue or --config needed")?;
    let prefetch = args.prefetch.or(target.prefetch).unwrap_or(1000);
    let conn = connect(&target.url, "courier-bench drain").await?;
    let channel = conn.create_channel().await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    let mut consumer = channel
        .basic_consume(
            queue.as_str().into(),
            "courier-bench-drain".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let (cpu0, _) = own_resources();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    let mut count = 0u64;
    let mut first: Option<Instant> = None;
    let mut last = Instant::now();
    let every = args.ack_every.max(1);
    let mut acks = futures_util::stream::FuturesUnordered::new();
    while count < args.expect {
        let next = tokio::time::timeout_at(deadline, consumer.next()).await;
        let delivery = match next {
            Ok(Some(d)) => d?,
            Ok(None) => return Err("the consumer was cancelled".into()),
            Err(_) => break,
        };
        first.get_or_insert_with(Instant::now);
        count += 1;
        if every == 1 && args.await_each_ack {
            delivery.acker.ack(BasicAckOptions::default()).await?;
        } else if every == 1 {
            // Each ack is sent in order; its write is awaited alongside the next deliveries.
            acks.push(async move { delivery.acker.ack(BasicAckOptions::default()).await });
            while let Some(Some(done)) = acks.next().now_or_never() {
                done?;
            }
        } else if count.is_multiple_of(every) || count == args.expect {
            channel
                .basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true })
                .await?;
        }
        last = Instant::now();
    }
    while let Some(done) = acks.next().await {
        done?;
    }
    let (cpu1, hwm) = own_resources();
    let elapsed = first.map(|f| (last - f).as_secs_f64()).unwrap_or(0.0);
    let _ = within(conn.close(200, "done".into())).await;
    println!(
        "{}",
        json!({
            "cmd": "drain",
            "complete": count >= args.expect,
            "events": count,
            "prefetch": prefetch,
            "ack_every": every,
            "await_each_ack": args.await_each_ack,
            "elapsed_s": elapsed,
            "events_per_s": if elapsed > 0.0 { count as f64 / elapsed } else { 0.0 },
            "cpu_s": cpu1 - cpu0,
            "hwm_kib": hwm,
        })
    );
    if count < args.expect {
        return Err(format!("timed out after {count} of {} messages", args.expect).into());
    }
    Ok(())
}

async fn latency(args: LatencyArgs) -> Result<()> {
    let target = args.target.resolve()?;
    let exchange = target
        .exchange
        .clone()
        .ok_or("--exchange or --config needed")?;
    let publisher =
        ConfirmedPublisher::open(&target.url, &exchange, args.window, "courier-bench latency")
            .await?;
    let mut generator = EventGen::new(args.seed, args.accounts);
    let total = args.rate * args.duration;
    let start = Instant::now();
    let mut sent = 0u64;
    let mut behind_max = 0.0f64;
    while sent < total {
        let due = ((start.elapsed().as_secs_f64() * args.rate as f64) as u64 + 1).min(total);
        behind_max = behind_max.max((due - sent.min(due)) as f64 / args.rate as f64);
        while sent < due {
            // Stamped as late as possible: what is measured starts at the publish call.
            let (key, body) = generator.event(sent, Some(now_ns()));
            publisher.publish(&key, &body).await?;
            sent += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let confirmed = publisher.finish().await?;
    println!(
        "{}",
        json!({
            "cmd": "latency",
            "events": confirmed,
            "rate": args.rate,
            "achieved_rate": sent as f64 / elapsed,
            "max_behind_s": behind_max,
            "elapsed_s": elapsed,
        })
    );
    Ok(())
}

async fn cleanup(args: CleanupArgs) -> Result<()> {
    let target = args.target.resolve()?;
    let mut left: Vec<String> = target.topology.clone();
    if let Some(q) = &target.queue
        && !left.contains(q)
    {
        left.push(q.clone());
    }
    let mut exchange = target.exchange.clone();
    let mut deleted = Vec::new();
    // RabbitMQ 3.10 can restart its quorum log writer when a queue is deleted right after
    // heavy traffic, closing the connection: reconnect and carry on with what is left.
    let mut last_error = None;
    for attempt in 0..5 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let conn = match connect(&target.url, "courier-bench cleanup").await {
            Ok(conn) => conn,
            Err(e) => {
                last_error = Some(e.to_string());
                continue;
            }
        };
        while let Some(q) = left.first().cloned() {
            // A failed delete closes the channel: one channel per queue.
            let result = within(async {
                let ch = conn.create_channel().await?;
                ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .map(|_| ())
            })
            .await
            .and_then(|r| r.map_err(Into::into));
            match result {
                Ok(()) => {
                    deleted.push(left.remove(0));
                }
                Err(e) => {
                    last_error = Some(format!("deleting {q}: {e}"));
                    break;
                }
            }
        }
        if left.is_empty()
            && let Some(x) = exchange.clone()
        {
            let result = within(async {
                let ch = conn.create_channel().await?;
                ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                    .await
            })
            .await
            .and_then(|r| r.map_err(Into::into));
            match result {
                Ok(()) => {
                    deleted.push(format!("exchange {x}"));
                    exchange = None;
                }
                Err(e) => last_error = Some(format!("deleting exchange {x}: {e}")),
            }
        }
        let _ = within(conn.close(200, "done".into())).await;
        if left.is_empty() && exchange.is_none() {
            break;
        }
    }
    println!(
        "{}",
        json!({ "cmd": "cleanup", "deleted": deleted, "left": left })
    );
    if !left.is_empty() || exchange.is_some() {
        return Err(last_error
            .unwrap_or_else(|| "cleanup incomplete".into())
            .into());
    }
    Ok(())
}

fn free_port() -> Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    println!("{}", listener.local_addr()?.port());
    Ok(())
}

// ---------------------------------------------------------------------------------------
// HTTP side

/// What one body held: per event, its sequence number and `bench_ts` when readable.
#[derive(Default)]
struct Scan {
    events: u64,
    marks: Vec<(Option<u64>, Option<u64>)>,
}

/// Counts the events of a body (a JSON array of objects, or one object) without building
/// a tree, and reads the `"id":"<tag>-<seq>"` and `"bench_ts":<ns>` that this tool's
/// events start with.
fn scan_body(body: &[u8]) -> Scan {
    let mut scan = Scan::default();
    match body.first() {
        Some(b'{') => {
            scan.events = 1;
            scan.marks.push(mark(body));
        }
        Some(b'[') => {
            let (mut depth, mut in_str, mut i) = (0usize, false, 1usize);
            while i < body.len() {
                let b = body[i];
                if in_str {
                    match b {
                        b'\\' => i += 1,
                        b'"' => in_str = false,
                        _ => {}
                    }
                } else {
                    match b {
                        b'"' => in_str = true,
                        b'{' | b'[' => {
                            if depth == 0 {
                                scan.events += 1;
                                scan.marks.push(mark(&body[i..]));
                            }
                            depth += 1;
                        }
                        b'}' | b']' => {
                            if depth == 0 {
                                break;
                            }
                            depth -= 1;
                        }
                        _ => {}
                    }
                }
                i += 1;
            }
        }
        _ => {}
    }
    scan
}

fn mark(event: &[u8]) -> (Option<u64>, Option<u64>) {
    let Some(rest) = event.strip_prefix(b"{\"id\":\"") else {
        return (None, None);
    };
    let Some(end) = rest.iter().position(|&b| b == b'"') else {
        return (None, None);
    };
    let id = &rest[..end];
    let seq = id
        .iter()
        .rposition(|&b| b == b'-')
        .and_then(|p| std::str::from_utf8(&id[p + 1..]).ok())
        .and_then(|s| s.parse().ok());
    let ts = rest[end + 1..]
        .strip_prefix(b",\"bench_ts\":")
        .and_then(|t| {
            let n = t.iter().take_while(|b| b.is_ascii_digit()).count();
            std::str::from_utf8(&t[..n]).ok()?.parse().ok()
        });
    (seq, ts)
}

/// Sequence numbers seen, to count distinct events and duplicates.
#[derive(Default)]
struct Seen(Vec<u64>);

impl Seen {
    /// True when `seq` is new.
    fn insert(&mut self, seq: u64) -> bool {
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        if word >= self.0.len() {
            self.0.resize(word + 1, 0);
        }
        let new = self.0[word] & (1 << bit) == 0;
        self.0[word] |= 1 << bit;
        new
    }
}

#[derive(Default)]
struct Stats {
    requests: u64,
    events: u64,
    distinct: u64,
    duplicates: u64,
    untracked: u64,
    bytes: u64,
    sig_failures: u64,
    retried_requests: u64,
    first: Option<Instant>,
    last: Option<Instant>,
    latencies_ns: Vec<u64>,
    seen: Seen,
}

struct Receiver {
    secret: Option<String>,
    header: String,
    expect: u64,
    stats: Mutex<Stats>,
    done: Notify,
    touched: AtomicU64,
    connections: AtomicU64,
}

async fn on_request(
    State(rx): State<Arc<Receiver>>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let now = Instant::now();
    let now_wall = now_ns();
    let sig_ok = match &rx.secret {
        None => true,
        Some(secret) => {
            let given = headers
                .get(&rx.header)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("");
            courier::sign::verify(secret.as_bytes(), &body, given)
        }
    };
    let retried = headers
        .get("x-courier-attempt")
        .is_some_and(|v| v.as_bytes() != b"1");
    let scan = scan_body(&body);
    let complete = {
        let mut s = rx.stats.lock().expect("stats lock");
        s.requests += 1;
        s.events += scan.events;
        s.bytes += body.len() as u64;
        s.sig_failures += u64::from(!sig_ok);
        s.retried_requests += u64::from(retried);
        s.first.get_or_insert(now);
        s.last = Some(now);
        for (seq, ts) in scan.marks {
            match seq {
                Some(seq) if seq < 1 << 32 => {
                    if s.seen.insert(seq) {
                        s.distinct += 1;
                    } else {
                        s.duplicates += 1;
                    }
                }
                _ => s.untracked += 1,
            }
            if let Some(ts) = ts {
                s.latencies_ns.push(now_wall.saturating_sub(ts));
            }
        }
        s.distinct + s.untracked >= rx.expect
    };
    rx.touched.store(now_wall, Ordering::Relaxed);
    if complete {
        rx.done.notify_one();
    }
    StatusCode::OK
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1] as f64 / 1e6
}

fn summary(rx: &Receiver, complete: bool) -> Value {
    let mut s = rx.stats.lock().expect("stats lock");
    let elapsed = match (s.first, s.last) {
        (Some(f), Some(l)) => (l - f).as_secs_f64(),
        _ => 0.0,
    };
    let per_s = |n: u64| {
        if elapsed > 0.0 {
            n as f64 / elapsed
        } else {
            0.0
        }
    };
    s.latencies_ns.sort_unstable();
    let l = &s.latencies_ns;
    let latency = if l.is_empty() {
        Value::Null
    } else {
        json!({
            "n": l.len(),
            "p50_ms": percentile(l, 50.0),
            "p90_ms": percentile(l, 90.0),
            "p99_ms": percentile(l, 99.0),
            "max_ms": *l.last().expect("not empty") as f64 / 1e6,
            "mean_ms": l.iter().map(|&x| x as f64).sum::<f64>() / l.len() as f64 / 1e6,
        })
    };
    json!({
        "cmd": "receive",
        "complete": complete,
        "expect": rx.expect,
        "events": s.events,
        "distinct": s.distinct,
        "duplicates": s.duplicates,
        "untracked": s.untracked,
        "requests": s.requests,
        "connections": rx.connections.load(Ordering::Relaxed),
        "bytes": s.bytes,
        "mean_batch": if s.requests > 0 { s.events as f64 / s.requests as f64 } else { 0.0 },
        "sig_failures": s.sig_failures,
        "retried_requests": s.retried_requests,
        "elapsed_s": elapsed,
        "events_per_s": per_s(s.distinct + s.untracked),
        "requests_per_s": per_s(s.requests),
        "latency": latency,
    })
}

async fn receive(args: ReceiveArgs) -> Result<()> {
    let rx = Arc::new(Receiver {
        secret: args.secret.clone(),
        header: args.header.to_ascii_lowercase(),
        expect: args.expect,
        stats: Mutex::new(Stats::default()),
        done: Notify::new(),
        touched: AtomicU64::new(0),
        connections: AtomicU64::new(0),
    });
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!(
        "courier-bench receive: listening on http://{}, expecting {} events",
        listener.local_addr()?,
        args.expect
    );
    let app = Router::new().fallback(on_request).with_state(rx.clone());
    // Counts connections: a client that does not reuse them pays a handshake per request.
    let listener = {
        use axum::serve::ListenerExt;
        let rx = rx.clone();
        listener.tap_io(move |_| {
            rx.connections.fetch_add(1, Ordering::Relaxed);
        })
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn({
        let stop = stop.clone();
        async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await
        }
    });

    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout);
    let idle = Duration::from_secs(args.idle_timeout).as_nanos() as u64;
    let complete = loop {
        tokio::select! {
            _ = rx.done.notified() => break true,
            _ = tokio::time::sleep_until(deadline) => break false,
            _ = tokio::time::sleep(Duration::from_millis(250)) => {
                let touched = rx.touched.load(Ordering::Relaxed);
                if touched > 0 && now_ns().saturating_sub(touched) > idle {
                    break false;
                }
            }
        }
    };
    let line = summary(&rx, complete).to_string();
    println!("{line}");
    if let Some(out) = &args.out {
        let tmp = out.with_extension("tmp");
        std::fs::write(&tmp, format!("{line}\n"))?;
        std::fs::rename(&tmp, out)?;
    }
    // Keep answering: courier may still be waiting for its last responses.
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
        _ = tokio::time::sleep(Duration::from_secs(args.linger)) => {}
    }
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(2), server).await;
    Ok(())
}

async fn http_flood(args: FloodArgs) -> Result<()> {
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(args.concurrency)
        .tcp_nodelay(true)
        .build()?;
    let url: reqwest::Url = args.url.parse()?;
    if !url
        .host_str()
        .is_some_and(|h| h == "localhost" || h.starts_with("127.") || h == "[::1]")
    {
        return Err("http-flood only targets loopback addresses".into());
    }
    let next = Arc::new(AtomicU64::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.concurrency.max(1) {
        let (client, url, next, failures) =
            (client.clone(), url.clone(), next.clone(), failures.clone());
        let secret = args.secret.clone();
        let header = args.header.clone();
        let mut generator = EventGen::new(args.seed.wrapping_add(c as u64), 20);
        let total = args.requests;
        tasks.push(tokio::spawn(async move {
            loop {
                let seq = next.fetch_add(1, Ordering::Relaxed);
                if seq >= total {
                    break;
                }
                let (_, body) = generator.event(seq, None);
                let mut req = client
                    .post(url.clone())
                    .header("content-type", "application/json")
                    .header("user-agent", "courier-bench")
                    .header("x-courier-attempt", "1")
                    .header("x-courier-event-count", "1");
                if let Some(secret) = &secret {
                    req = req.header(
                        header.as_str(),
                        courier::sign::signature(secret.as_bytes(), &body),
                    );
                }
                match req.body(body).send().await {
                    Ok(resp) if resp.status().is_success() => {
                        let _ = resp.bytes().await;
                    }
                    _ => {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let (cpu, _) = own_resources();
    println!(
        "{}",
        json!({
            "cmd": "http-flood",
            "requests": args.requests,
            "failures": failures.load(Ordering::Relaxed),
            "concurrency": args.concurrency,
            "elapsed_s": elapsed,
            "requests_per_s": args.requests as f64 / elapsed,
            "cpu_s": cpu,
        })
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The report

/// One figure's runs.
struct Figure {
    values: Vec<f64>,
}

impl Figure {
    fn median(&self) -> f64 {
        median(&self.values)
    }
    fn min(&self) -> f64 {
        self.values.iter().copied().fold(f64::INFINITY, f64::min)
    }
    fn max(&self) -> f64 {
        self.values
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max)
    }
    /// (max − min) / median, in percent.
    fn spread_pct(&self) -> f64 {
        let m = self.median();
        if self.values.len() < 2 || m == 0.0 {
            0.0
        } else {
            (self.max() - self.min()) / m.abs() * 100.0
        }
    }
}

fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A row of the table: a figure, and how it compares with its target.
struct Row {
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    figure: Figure,
    target: Goal,
}

/// A target's text and its test of the median.
type Goal = Option<(&'static str, fn(f64) -> bool)>;

fn row(
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    figure: Figure,
    target: Goal,
) -> Row {
    Row {
        key,
        label,
        unit,
        figure,
        target,
    }
}

fn report(args: ReportArgs) -> Result<()> {
    let text = std::fs::read_to_string(&args.input)?;
    // scenario -> run -> record
    let mut by: BTreeMap<String, BTreeMap<u64, Value>> = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value = serde_json::from_str(line)
            .map_err(|e| format!("{}: bad line {line:?}: {e}", args.input.display()))?;
        let scenario = v["scenario"].as_str().unwrap_or("?").to_owned();
        let run = v["run"].as_u64().unwrap_or(0);
        by.entry(scenario).or_default().insert(run, v);
    }
    let get = |scenario: &str, path: &[&str]| -> BTreeMap<u64, f64> {
        by.get(scenario)
            .map(|runs| {
                runs.iter()
                    .filter_map(|(r, v)| {
                        let mut x = v;
                        for p in path {
                            x = &x[*p];
                        }
                        x.as_f64().map(|f| (*r, f))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let fig = |m: BTreeMap<u64, f64>| Figure {
        values: m.into_values().collect(),
    };
    // Ratios are taken run by run (the same run, the same machine state), then summarised.
    let ratio = |a: &BTreeMap<u64, f64>, b: &BTreeMap<u64, f64>| Figure {
        values: a
            .iter()
            .filter_map(|(r, x)| b.get(r).filter(|y| **y > 0.0).map(|y| x / y))
            .collect(),
    };
    let per_100k = |scenario: &str| -> BTreeMap<u64, f64> {
        let cpu = get(scenario, &["proc", "cpu_s"]);
        let events = get(scenario, &["data", "distinct"]);
        cpu.iter()
            .filter_map(|(r, c)| {
                events
                    .get(r)
                    .filter(|e| **e > 0.0)
                    .map(|e| (*r, c / e * 1e5))
            })
            .collect()
    };
    let mib = |m: BTreeMap<u64, f64>| -> BTreeMap<u64, f64> {
        m.into_iter().map(|(r, k)| (r, k / 1024.0)).collect()
    };

    let drain = get("drain", &["data", "events_per_s"]);
    let drain_multi = get("drain_multi", &["data", "events_per_s"]);
    let b200 = get("batch200", &["data", "events_per_s"]);
    let b1 = get("batch1", &["data", "requests_per_s"]);
    let flood = get("flood", &["data", "requests_per_s"]);
    let many = get("many", &["data", "events_per_s"]);

    // The drain's own CPU: what the broker client costs with nothing else to do.
    let drain_cpu = |scenario: &str| -> BTreeMap<u64, f64> {
        let events = get(scenario, &["data", "events"]);
        get(scenario, &["data", "cpu_s"])
            .into_iter()
            .filter_map(|(r, c)| events.get(&r).map(|e| (r, c / e * 1e5)))
            .collect()
    };
    let rss = |scenario: &str| fig(mib(get(scenario, &["proc", "hwm_kib"])));
    #[rustfmt::skip]
    let rows = vec![
        row("drain_events_per_s", "1. broker limit: bare drain, one ack per message, in order (same prefetch)", "events/s", fig(drain.clone()), None),
        row("drain_cpu_s_per_100k", "   bare drain: the consumer's CPU per 100k events", "CPU s", fig(drain_cpu("drain")), None),
        row("drain_multi_events_per_s", "1b. bare drain, one `multiple` ack every 100", "events/s", fig(drain_multi.clone()), None),
        row("drain_multi_cpu_s_per_100k", "   bare drain (1b): the consumer's CPU per 100k events", "CPU s", fig(drain_cpu("drain_multi")), None),
        row("batch200_events_per_s", "2. courier batch 200, 20 accounts", "events/s", fig(b200.clone()), None),
        row("batch200_ratio", "   ratio to (1), per run", "×", ratio(&b200, &drain), Some(("≥ 0.9", |x| x >= 0.9))),
        row("batch200_ratio_multi", "   ratio to (1b), per run", "×", ratio(&b200, &drain_multi), None),
        row("batch200_mean_batch", "   mean batch size", "events", fig(get("batch200", &["data", "mean_batch"])), None),
        row("batch1_requests_per_s", "3. courier batch 1", "requests/s", fig(b1.clone()), None),
        row("flood_requests_per_s", "   bare reqwest loop, same receiver and concurrency", "requests/s", fig(flood.clone()), None),
        row("batch1_ratio", "   ratio courier / bare HTTP, per run", "×", ratio(&b1, &flood), Some(("≥ 0.8", |x| x >= 0.8))),
        row("batch1_connections", "   TCP connections the receiver accepted: courier batch 1", "connections", fig(get("batch1", &["data", "connections"])), None),
        row("flood_connections", "   TCP connections the receiver accepted: bare loop", "connections", fig(get("flood", &["data", "connections"])), None),
        row("many_events_per_s", "4. courier batch 200, 2,000 accounts", "events/s", fig(many.clone()), None),
        row("many_ratio", "   ratio to (1), per run", "×", ratio(&many, &drain), Some(("≥ 0.5", |x| x >= 0.5))),
        row("many_mean_batch", "   mean batch size", "events", fig(get("many", &["data", "mean_batch"])), None),
        row("many_connections", "   TCP connections the receiver accepted", "connections", fig(get("many", &["data", "connections"])), None),
        row("latency_p50_ms", "5. latency publish→receipt, p50", "ms", fig(get("latency", &["data", "latency", "p50_ms"])), None),
        row("latency_p99_ms", "   p99", "ms", fig(get("latency", &["data", "latency", "p99_ms"])), Some(("≤ 120 (flush_interval + 20)", |x| x <= 120.0))),
        row("latency_max_ms", "   max", "ms", fig(get("latency", &["data", "latency", "max_ms"])), None),
        row("cpu_per_100k_large", "6. courier CPU per 100k events, large backlog (2)", "CPU s", fig(per_100k("batch200")), None),
        row("cpu_per_100k_small", "   courier CPU per 100k events, 10k backlog", "CPU s", fig(per_100k("small")), None),
        row("cpu_per_100k_many", "   courier CPU per 100k events, 2,000 accounts (4)", "CPU s", fig(per_100k("many")), None),
        row("cpu_per_100k_batch1", "   courier CPU per 100k events, batch 1 (3)", "CPU s", fig(per_100k("batch1")), None),
        row("cpu_per_100k_latency", "   courier CPU per 100k events, 2,000/s (5)", "CPU s", fig(per_100k("latency")), None),
        row("rss_large_mib", "   courier peak RSS, large backlog (2)", "MiB", rss("batch200"), Some(("≤ 64", |x| x <= 64.0))),
        row("rss_small_mib", "   courier peak RSS, 10k backlog", "MiB", rss("small"), Some(("≤ 64", |x| x <= 64.0))),
        row("rss_many_mib", "   courier peak RSS, 2,000 accounts (4)", "MiB", rss("many"), Some(("≤ 64", |x| x <= 64.0))),
        row("rss_batch1_mib", "   courier peak RSS, batch 1 (3)", "MiB", rss("batch1"), Some(("≤ 64", |x| x <= 64.0))),
    ];

    let meta: BTreeMap<String, String> = args
        .meta
        .iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect();

    // Problems a reader must see next to the numbers.
    let mut warnings = Vec::new();
    for (scenario, runs) in &by {
        for (run, v) in runs {
            let d = &v["data"];
            if d["complete"] == Value::Bool(false) {
                warnings.push(format!(
                    "{scenario} run {run}: incomplete ({} of {} events)",
                    d["distinct"], d["expect"]
                ));
            }
            for k in ["sig_failures", "duplicates", "retried_requests"] {
                if d[k].as_u64().unwrap_or(0) > 0 {
                    warnings.push(format!("{scenario} run {run}: {k} = {}", d[k]));
                }
            }
            if v["extra"]["failures"].as_u64().unwrap_or(0) > 0 {
                let n = &v["extra"]["failures"];
                warnings.push(format!("{scenario} run {run}: {n} failed requests"));
            }
        }
    }

    let fmt = |x: f64| -> String {
        if !x.is_finite() {
            "–".into()
        } else if x.abs() >= 100.0 {
            format!("{x:.0}")
        } else if x.abs() >= 10.0 {
            format!("{x:.1}")
        } else {
            format!("{x:.2}")
        }
    };
    let mut md = String::new();
    md.push_str("| figure | unit | median | min – max | spread | runs | target |\n");
    md.push_str("|---|---|---:|---:|---:|---:|---|\n");
    let mut rows_json = Vec::new();
    for row in &rows {
        let f = &row.figure;
        let n = f.values.len();
        let target = match row.target {
            Some((text, ok)) if n > 0 => {
                format!(
                    "{text}: {}",
                    if ok(f.median()) { "met" } else { "**not met**" }
                )
            }
            Some((text, _)) => text.to_owned(),
            None => String::new(),
        };
        if n == 0 {
            md.push_str(&format!(
                "| {} | {} | – | – | – | 0 | {target} |\n",
                row.label, row.unit
            ));
        } else {
            md.push_str(&format!(
                "| {} | {} | {} | {} – {} | {:.0}% | {n} | {target} |\n",
                row.label,
                row.unit,
                fmt(f.median()),
                fmt(f.min()),
                fmt(f.max()),
                f.spread_pct(),
            ));
        }
        rows_json.push(json!({
            "key": row.key,
            "label": row.label.trim(),
            "unit": row.unit,
            "values": f.values,
            "median": if n > 0 { json!(f.median()) } else { Value::Null },
            "min": if n > 0 { json!(f.min()) } else { Value::Null },
            "max": if n > 0 { json!(f.max()) } else { Value::Null },
            "spread_pct": f.spread_pct(),
            "target": row.target.map(|(t, _)| t),
            "met": row.target.filter(|_| n > 0).map(|(_, ok)| ok(f.median())),
        }));
    }
    // Where the two cores went: CPU seconds of each process over the measured phase's
    // wall time, median over the runs.
    let cores = |scenario: &str, cpu: &[&str]| -> BTreeMap<u64, f64> {
        let wall = get(scenario, &["proc", "wall_s"]);
        get(scenario, cpu)
            .into_iter()
            .filter_map(|(r, c)| wall.get(&r).filter(|w| **w > 0.0).map(|w| (r, c / w)))
            .collect()
    };
    md.push_str(
        "\nCPU over each measured phase, in cores (CPU s ÷ wall s, median of the runs):\n\n\
         | scenario | courier (or the bare client) | broker | receiver | total |\n\
         |---|---:|---:|---:|---:|\n",
    );
    let mut cores_json = BTreeMap::new();
    for scenario in [
        "drain",
        "drain_multi",
        "batch200",
        "batch1",
        "flood",
        "many",
        "latency",
        "small",
    ] {
        if !by.contains_key(scenario) {
            continue;
        }
        let client = match scenario {
            "drain" | "drain_multi" => cores(scenario, &["data", "cpu_s"]),
            "flood" => cores(scenario, &["extra", "cpu_s"]),
            _ => cores(scenario, &["proc", "cpu_s"]),
        };
        let broker = cores(scenario, &["proc", "broker_cpu_s"]);
        let receiver = cores(scenario, &["proc", "receiver_cpu_s"]);
        let total: BTreeMap<u64, f64> = client
            .iter()
            .map(|(r, c)| {
                (
                    *r,
                    c + broker.get(r).unwrap_or(&0.0) + receiver.get(r).unwrap_or(&0.0),
                )
            })
            .collect();
        let [c, b, rcv, t] = [&client, &broker, &receiver, &total]
            .map(|m| median(&m.values().copied().collect::<Vec<_>>()));
        md.push_str(&format!(
            "| {scenario} | {} | {} | {} | {} |\n",
            fmt(c),
            fmt(b),
            if scenario.starts_with("drain") {
                "–".into()
            } else {
                fmt(rcv)
            },
            fmt(t)
        ));
        cores_json.insert(
            scenario,
            json!({ "client": c, "broker": b, "receiver": rcv, "total": t }),
        );
    }
    if !warnings.is_empty() {
        md.push_str("\nWarnings:\n");
        for w in &warnings {
            md.push_str(&format!("- {w}\n"));
        }
    }
    let raw: BTreeMap<&String, Vec<&Value>> = by
        .iter()
        .map(|(k, runs)| (k, runs.values().collect()))
        .collect();
    let out = json!({
        "meta": meta,
        "figures": rows_json,
        "cores": cores_json,
        "warnings": warnings,
        "runs": raw,
    });
    write_file(&args.json, &serde_json::to_string_pretty(&out)?)?;
    let mut header = String::new();
    for (k, v) in &meta {
        header.push_str(&format!("- {k}: {v}\n"));
    }
    write_file(&args.md, &format!("{header}\n{md}"))?;
    print!("{header}\n{md}");
    Ok(())
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, text)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_events_are_valid_and_sized() {
        let mut g = EventGen::new(7, 20);
        let mut total = 0;
        for seq in 0..2000 {
            let (key, body) = g.event(seq, if seq % 2 == 0 { Some(now_ns()) } else { None });
            let e = courier::event::parse(&body, 1 << 20)
                .unwrap_or_else(|err| panic!("{err}: {}", String::from_utf8_lossy(&body)));
            assert_eq!(key, format!("{}.{}", e.account, e.kind));
            assert!((500..=1000).contains(&body.len()), "{}", body.len());
            serde_json::from_slice::<Value>(&body).expect("valid JSON");
            total += body.len();
        }
        let mean = total / 2000;
        assert!((820..=920).contains(&mean), "mean {mean}");
    }

    #[test]
    fn scanning_counts_events_and_reads_marks() {
        let mut g = EventGen::new(8, 3);
        let events: Vec<Vec<u8>> = (0..5).map(|s| g.event(s, Some(1000 + s)).1).collect();
        let mut body = b"[".to_vec();
        body.extend(events.join(&b","[..]));
        body.push(b']');
        let scan = scan_body(&body);
        assert_eq!(scan.events, 5);
        assert_eq!(scan.marks[3], (Some(3), Some(1003)));
        let one = scan_body(&events[0]);
        assert_eq!((one.events, one.marks[0]), (1, (Some(0), Some(1000))));
        let foreign = scan_body(br#"[{"a":"x]}\"{"},{"b":[1,{"c":2}]}]"#);
        assert_eq!(foreign.events, 2);
        assert_eq!(foreign.marks[0], (None, None));
    }
}
