//! The pipeline itself: wires the stages together and owns the acknowledgements.
//!
//! consume (`Delivery`) → parse (`Event`, or a dead letter) → route (account, type) →
//! accumulate ([`Accumulator`]) → encode → sign → send ([`Outcome`]) → settle (ack, split,
//! dead-letter). A message is acknowledged only when its effect is durable: delivered with
//! a 2xx, skipped by configuration, or confirmed into the dead-letter queue. Anything
//! unsettled when a channel dies simply returns to the broker.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures_util::StreamExt;
use futures_util::future::join_all;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, Consumer};
use secrecy::ExposeSecret;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::batch::{Accumulator, FlushReason, Flushed, Limits};
use crate::broker::acks::Acks;
use crate::broker::{self, BrokerError, Publisher, history_free_headers};
use crate::circuit::{Admission, Breakers};
use crate::config::{Account, Settings, redact_url};
use crate::deliver::{Outcome, Request, Sender, encode_body};
use crate::event::{self, RecordType};
use crate::metrics::{Metrics, RequestOutcome};
use crate::retry::{self, Next};
use crate::{admin, sign};

/// Why the worker stopped with an error (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("cannot serve the admin endpoints on {addr}: {source}")]
    Admin {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
}

/// A destination: events of one account and record type share batches.
type Key = (Arc<str>, RecordType);

/// One consumed event on its way to a receiver. Settling consumes it, so a message can be
/// acknowledged at most once.
struct Pending {
    body: bytes::Bytes,
    id: String,
    /// `occurred_at`, else first seen: the start of the delivery lag.
    lag_from: SystemTime,
    first_seen: SystemTime,
    /// When this delivery arrived: how long it has been held unacknowledged.
    consumed_at: Instant,
    properties: BasicProperties,
    /// The delivery tag on its channel.
    tag: u64,
}

/// Why an event goes to the dead-letter queue, with the headers that explain it.
struct DeadLetter {
    reason: String,
    account: String,
    kind: String,
    status: Option<u16>,
    error: String,
    destination: Option<String>,
}

impl DeadLetter {
    fn new(reason: &str, account: &str, kind: &str, error: String) -> Self {
        Self {
            reason: reason.to_owned(),
            account: account.to_owned(),
            kind: kind.to_owned(),
            status: None,
            error,
            destination: None,
        }
    }
}

/// Unsettled messages of one channel: the prefetch window in use. Each channel
/// generation gets its own, so late settlements of a dead channel never skew a new one.
type Window = Arc<AtomicUsize>;

/// What batches are formed under: the settings and the clients built from them.
/// Replaced on reload; a batch keeps the one it was formed under.
struct Live {
    settings: Arc<Settings>,
    sender: Sender,
    /// Requests in flight, all destinations together.
    requests: Arc<Semaphore>,
    /// The window holds two of the largest batches: flush at half a window (see `consume`).
    pipelined: bool,
}

impl Live {
    fn new(settings: Arc<Settings>) -> Result<Self, reqwest::Error> {
        let sender = Sender::new(&settings.delivery)?;
        let requests = Arc::new(Semaphore::new(settings.delivery.max_concurrency));
        Ok(Self {
            pipelined: pipelined(&settings),
            settings,
            sender,
            requests,
        })
    }
}

fn pipelined(settings: &Settings) -> bool {
    let largest = settings
        .accounts
        .values()
        .map(|a| a.batch_size)
        .max()
        .unwrap_or(1);
    settings.broker.prefetch as usize >= 2 * largest
}

/// A flushed batch with what its delivery task needs.
struct Batch {
    live: Arc<Live>,
    account: Arc<Account>,
    kind: RecordType,
    limits: Limits,
    items: Vec<Pending>,
    acks: Acks,
    destination: Arc<Semaphore>,
}

/// State shared by the consumer loop and the delivery tasks.
struct Shared {
    /// The settings the worker started with: `[broker]` cannot change without a restart.
    broker: crate::config::BrokerSettings,
    metrics: Arc<Metrics>,
    publisher: Publisher,
    circuits: std::sync::Mutex<Breakers<Key>>,
    tracker: TaskTracker,
}

/// The worker: `run` until `shutdown` is cancelled.
pub struct Worker {
    settings: Arc<Settings>,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    reload: Arc<watch::Sender<Arc<Settings>>>,
}

/// Applies a new configuration file to a running worker (SIGHUP).
#[derive(Clone)]
pub struct Reloader {
    metrics: Arc<Metrics>,
    reload: Arc<watch::Sender<Arc<Settings>>>,
}

impl Reloader {
    /// Reads the worker's configuration file again. A valid file that changes only
    /// reloadable sections takes effect for batches formed afterwards; otherwise the old
    /// configuration stays, and the error is returned, logged and counted.
    pub async fn reload(&self) -> Result<(), String> {
        let current = self.reload.borrow().clone();
        let result = async {
            let new = crate::config::load(&current.source).map_err(|e| e.to_string())?;
            if let Some(section) = crate::config::restart_only_change(&current, &new) {
                return Err(format!(
                    "{section} changed: it needs a restart; the reload was refused"
                ));
            }
            // Build the new HTTP client now, so a reload that cannot take effect is refused.
            Sender::new(&new.delivery).map_err(|e| format!("cannot build the HTTP client: {e}"))?;
            if new.retry.schedule != current.retry.schedule {
                // New tiers need their queues before anything is published to them.
                let conn = broker::connect(&new.broker.urls, "courier reload")
                    .await
                    .map_err(|e| e.to_string())?;
                let declared = broker::declare(&conn, &new.broker, &new.retry.schedule).await;
                let _ = conn.close(200, "declared".into()).await;
                declared.map_err(|e| e.to_string())?;
            }
            Ok(new)
        }
        .await;
        match result {
            Ok(new) => {
                tracing::info!(config = %new.source.display(), accounts = new.accounts.len(), "configuration reloaded");
                self.metrics.config_reload(true);
                self.reload.send_replace(Arc::new(new));
                Ok(())
            }
            Err(error) => {
                tracing::error!(%error, "configuration reload failed; the old configuration stays");
                self.metrics.config_reload(false);
                Err(error)
            }
        }
    }
}

impl Worker {
    /// A worker for these settings, with fresh metrics.
    pub fn new(settings: Settings) -> Self {
        let settings = Arc::new(settings);
        Self {
            reload: Arc::new(watch::channel(settings.clone()).0),
            settings,
            metrics: Arc::new(Metrics::new()),
            ready: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The metrics this worker updates.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }

    /// True while connected and consuming.
    pub fn ready(&self) -> Arc<AtomicBool> {
        self.ready.clone()
    }

    /// A handle that reloads the configuration file.
    pub fn reloader(&self) -> Reloader {
        Reloader {
            metrics: self.metrics.clone(),
            reload: self.reload.clone(),
        }
    }

    /// Runs the pipeline until `shutdown` is cancelled, then flushes open batches and
    /// gives in-flight work up to `shutdown_timeout`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RunError> {
        let settings = self.settings.clone();
        let admin_stop = CancellationToken::new();
        let listener = tokio::net::TcpListener::bind(settings.admin.listen)
            .await
            .map_err(|source| RunError::Admin {
                addr: settings.admin.listen,
                source,
            })?;
        tracing::info!(listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "admin endpoints up");
        let admin = tokio::spawn(admin::serve(
            listener,
            self.metrics.clone(),
            self.ready.clone(),
            admin_stop.clone(),
        ));
        let result = self.pipeline(shutdown).await;
        admin_stop.cancel();
        let _ = admin.await;
        result
    }

    async fn pipeline(self, shutdown: CancellationToken) -> Result<(), RunError> {
        let metrics = self.metrics.clone();
        let mut reloads = self.reload.subscribe();
        let mut live = Arc::new(Live::new(reloads.borrow_and_update().clone())?);
        let broker = self.settings.broker.clone();
        let publisher = Publisher::connect(
            &broker.urls,
            &format!("courier publish {}", broker.queue_prefix),
        )
        .await?;
        let shared = Arc::new(Shared {
            broker,
            metrics: metrics.clone(),
            publisher,
            circuits: std::sync::Mutex::new(Breakers::default()),
            tracker: TaskTracker::new(),
        });
        let mut destinations: HashMap<Key, Arc<Semaphore>> = HashMap::new();
        let mut reconnect = reconnect_backoff();
        let mut first = true;
        loop {
            let session = match open_session(&live.settings).await {
                Ok(session) => session,
                Err(e) if first || e.is_fatal() => return Err(e.into()),
                Err(e) => {
                    let delay = reconnect.next().unwrap_or(Duration::from_secs(30));
                    tracing::warn!(error = %e, retry_in = ?delay, "broker unavailable");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            if !first {
                metrics.broker_reconnected();
            }
            first = false;
            reconnect = reconnect_backoff();
            metrics.set_broker_connected(true);
            self.ready.store(true, Ordering::SeqCst);
            tracing::info!(queue = %shared.broker.deliver_queue(), prefetch = shared.broker.prefetch, "consuming");

            let Session {
                connection,
                channel,
                tag,
                stream,
                ack_task,
            } = session;
            let ended = consume(
                &shared,
                &mut live,
                &mut reloads,
                stream,
                &mut destinations,
                &shutdown,
            )
            .await;
            self.ready.store(false, Ordering::SeqCst);
            match ended {
                Ended::Shutdown => {
                    let brief = Duration::from_secs(5);
                    let cancel =
                        channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default());
                    let _ = tokio::time::timeout(brief, cancel).await;
                    shared.tracker.close();
                    let grace = live.settings.shutdown_timeout;
                    if tokio::time::timeout(grace, shared.tracker.wait())
                        .await
                        .is_err()
                    {
                        tracing::warn!(
                            ?grace,
                            "shutdown timeout passed; unsettled messages return to the queue"
                        );
                    }
                    // The delivery tasks are done and their ack handles gone: the ack task
                    // sends what is left, then the channel may close.
                    let _ = tokio::time::timeout(Duration::from_secs(5), ack_task).await;
                    let _ =
                        tokio::time::timeout(brief, connection.close(200, "shutting down".into()))
                            .await;
                    metrics.set_broker_connected(false);
                    shared.publisher.close().await;
                    return Ok(());
                }
                Ended::Lost(error) => {
                    metrics.set_broker_connected(false);
                    tracing::warn!(%error, "broker connection lost; reconnecting");
                    let _ = connection.close(200, "reconnecting".into()).await;
                }
            }
        }
        // Shut down while reconnecting: nothing is open on the broker side.
        shared.tracker.close();
        let _ = tokio::time::timeout(live.settings.shutdown_timeout, shared.tracker.wait()).await;
        shared.publisher.close().await;
        Ok(())
    }
}

fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build()
}

/// A consuming connection.
struct Session {
    connection: Connection,
    channel: lapin::Channel,
    tag: String,
    stream: Stream,
    ack_task: tokio::task::JoinHandle<()>,
}

/// What the consumer loop takes from a session.
struct Stream {
    consumer: Consumer,
    /// Messages the broker holds unacknowledged for this channel.
    window: Window,
    acks: Acks,
}

async fn open_session(settings: &Settings) -> Result<Session, BrokerError> {
    let broker = &settings.broker;
    let connection = broker::connect(
        &broker.urls,
        &format!("courier consume {}", broker.queue_prefix),
    )
    .await?;
    broker::declare(&connection, broker, &settings.retry.schedule).await?;
    let channel = connection
        .create_channel()
        .await
        .map_err(BrokerError::amqp("opening the consume channel"))?;
    channel
        .basic_qos(broker.prefetch, BasicQosOptions::default())
        .await
        .map_err(BrokerError::amqp("setting prefetch"))?;
    let tag = format!("courier-{}", std::process::id());
    let consumer = channel
        .basic_consume(
            broker.deliver_queue().as_str().into(),
            tag.as_str().into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::amqp(format!(
            "consuming from {}",
            broker.deliver_queue()
        )))?;
    let window: Window = Arc::new(AtomicUsize::new(0));
    let (acks, ack_task) = Acks::spawn(channel.clone(), broker.prefetch, window.clone());
    Ok(Session {
        connection,
        channel,
        tag,
        stream: Stream {
            consumer,
            window,
            acks,
        },
        ack_task,
    })
}

enum Ended {
    Shutdown,
    Lost(String),
}

/// The consumer loop: takes deliveries, batches them, and hands flushed batches to
/// delivery tasks. A reload swaps `live` for batches formed afterwards.
async fn consume(
    shared: &Arc<Shared>,
    live: &mut Arc<Live>,
    reloads: &mut watch::Receiver<Arc<Settings>>,
    stream: Stream,
    destinations: &mut HashMap<Key, Arc<Semaphore>>,
    shutdown: &CancellationToken,
) -> Ended {
    let Stream {
        mut consumer,
        window,
        acks,
    } = stream;
    let prefetch = shared.broker.prefetch as usize;
    let mut acc: Accumulator<Key, (Arc<Live>, Arc<Account>), Pending> = Accumulator::default();
    let ended = loop {
        let deadline = acc.next_deadline();
        let due = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        let mut dispatch = |flushed: Flushed<Key, (Arc<Live>, Arc<Account>), Pending>| {
            let (live, account) = flushed.ctx;
            let limit = live.settings.delivery.max_inflight_per_destination;
            let destination = destinations
                .entry(flushed.key.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(limit)))
                .clone();
            shared.metrics.batch_flushed(
                &flushed.key.0,
                flushed.key.1,
                flushed.items.len(),
                flushed.reason,
            );
            let batch = Batch {
                live,
                account,
                kind: flushed.key.1,
                limits: flushed.limits,
                items: flushed.items,
                acks: acks.clone(),
                destination,
            };
            spawn_delivery(shared, batch);
        };
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                acc.drain(FlushReason::Shutdown, &mut dispatch);
                break Ended::Shutdown;
            }
            Ok(()) = reloads.changed() => {
                let settings = reloads.borrow_and_update().clone();
                if settings.delivery == live.settings.delivery {
                    // Same [delivery]: keep the HTTP client, its pool and the request limit.
                    let (sender, requests) = (live.sender.clone(), live.requests.clone());
                    let pipelined = pipelined(&settings);
                    *live = Arc::new(Live { settings, sender, requests, pipelined });
                } else {
                    match Live::new(settings) {
                        Ok(new) => {
                            if new.settings.delivery.max_inflight_per_destination
                                != live.settings.delivery.max_inflight_per_destination
                            {
                                destinations.clear();
                            }
                            *live = Arc::new(new);
                        }
                        Err(e) => tracing::error!(error = %e, "cannot build the HTTP client of the new configuration"),
                    }
                }
            }
            _ = due => acc.expired(Instant::now(), &mut dispatch),
            next = consumer.next() => {
                let delivery = match next {
                    Some(Ok(delivery)) => delivery,
                    Some(Err(e)) => break Ended::Lost(e.to_string()),
                    None => break Ended::Lost("the consumer was cancelled".into()),
                };
                window.fetch_add(1, Ordering::SeqCst);
                if let Some((key, account, pending)) = route(shared, live, delivery, &acks) {
                    let limits = Limits {
                        batch_size: account.batch_size,
                        max_body_bytes: live.settings.delivery.max_body_bytes,
                        flush_interval: account.flush_interval,
                    };
                    let len = pending.body.len();
                    let ctx = || ((live.clone(), account), limits);
                    acc.push(&key, pending, len, Instant::now(), ctx, &mut dispatch);
                }
                // A full window means no new message can arrive: flush every open batch
                // (so the fullest among them) instead of waiting for their timers. Where the window
                // holds two full batches, flush already at half a window: the broker keeps
                // sending while those are delivered (~1.6× the throughput at prefetch
                // 1000 and 40 destinations), and any batch can still fill.
                let full = window.load(Ordering::SeqCst) >= prefetch;
                let half = live.pipelined && acc.buffered() >= prefetch.div_ceil(2);
                if (full || half) && acc.buffered() > 0 {
                    acc.drain(FlushReason::Window, &mut dispatch);
                }
            }
        }
        shared.metrics.set_buffered(acc.buffered());
    };
    if let Ended::Lost(_) = ended {
        // Their channel is gone: the broker redelivers them.
        let dropped = acc.discard();
        tracing::debug!(dropped, "open batches dropped with their channel");
    }
    shared.metrics.set_buffered(acc.buffered());
    ended
}

/// Parses and routes one delivery. Returns the event to batch, or settles it here
/// (skip) or in a task of its own (dead letter).
fn route(
    shared: &Arc<Shared>,
    live: &Live,
    delivery: lapin::message::Delivery,
    acks: &Acks,
) -> Option<(Key, Arc<Account>, Pending)> {
    let settings = &live.settings;
    let lapin::message::Delivery {
        delivery_tag: tag,
        data,
        properties,
        ..
    } = delivery;
    let first_seen =
        header_time(&properties, "x-courier-first-seen").unwrap_or_else(SystemTime::now);
    let parsed = event::parse(&data, settings.broker.max_event_bytes).map(|e| {
        (
            e.id.into_owned(),
            e.account.into_owned(),
            e.kind,
            e.occurred_at,
        )
    });
    let pending = |id: String, lag_from| Pending {
        body: data.into(),
        id,
        lag_from,
        first_seen,
        consumed_at: Instant::now(),
        properties,
        tag,
    };
    match parsed {
        Err(invalid) => {
            tracing::warn!(error = %invalid, "invalid event dead-lettered");
            let dead = DeadLetter::new("invalid_event", "", "", invalid.0);
            spawn_dead_letter(shared, pending(String::new(), first_seen), dead, acks);
            None
        }
        Ok((id, account_id, kind, occurred_at)) => {
            let lag_from = occurred_at.map(SystemTime::from).unwrap_or(first_seen);
            let item = pending(id, lag_from);
            let Some(account) = settings.accounts.get(&account_id) else {
                tracing::warn!(account = %account_id, "event of an unknown account dead-lettered");
                let error = format!("account {account_id:?} is not configured");
                let dead = DeadLetter::new("unknown_account", &account_id, kind.as_str(), error);
                spawn_dead_letter(shared, item, dead, acks);
                return None;
            };
            shared.metrics.event_consumed(&account.id, kind);
            if account.url(kind).is_none() {
                shared
                    .metrics
                    .event_skipped(&account.id, kind, "contacts_disabled");
                settle(item, true, acks);
                return None;
            }
            Some(((account.id.clone(), kind), account.clone(), item))
        }
    }
}

fn spawn_dead_letter(shared: &Arc<Shared>, item: Pending, dead: DeadLetter, acks: &Acks) {
    let shared2 = shared.clone();
    let acks = acks.clone();
    shared
        .tracker
        .spawn(async move { dead_letter(&shared2, item, &dead, &acks).await });
}

/// Acks one message, or returns it to the queue; the channel's ack task does the rest.
fn settle(item: Pending, ack: bool, acks: &Acks) {
    if ack {
        acks.ack(vec![item.tag])
    } else {
        acks.nack(item.tag)
    }
}

/// Starts a delivery task (a plain function, so `deliver` can start its own halves).
fn spawn_delivery(shared: &Arc<Shared>, batch: Batch) {
    shared.tracker.spawn(deliver(shared.clone(), batch));
}

/// The longest a message waits unacknowledged for its immediate attempts (request slots
/// and backoff included) before it goes to a scheduled tier: well below the broker's
/// `consumer_timeout` (30 min by default), which closes the channel.
pub const MAX_HOLD: Duration = Duration::from_secs(600);

/// Why a batch left the immediate stage.
struct Failure {
    status: Option<u16>,
    error: String,
    /// A `Retry-After` longer than the immediate stage allows.
    retry_after: Option<Duration>,
    destination: String,
}

/// Delivers one batch: circuit check, immediate attempts with backoff, then settle
/// (ack, split, dead-letter, or scheduled retry).
async fn deliver(shared: Arc<Shared>, batch: Batch) {
    let Batch {
        live,
        account,
        kind,
        limits,
        items,
        acks,
        destination,
    } = batch;
    let key: Key = (account.id.clone(), kind);
    let url = account.url(kind).expect("only routable events are batched");
    let body = encode_body(
        limits.batch_size,
        &items.iter().map(|p| &p.body).collect::<Vec<_>>(),
    );
    let signature = account
        .hmac_secret
        .as_ref()
        .map(|s| sign::signature(s.expose_secret().as_bytes(), &body));
    let delivery_id = sign::delivery_id(items.iter().map(|p| p.id.as_str()));
    let retry = &live.settings.retry;
    let mut backoff = retry::immediate_backoff(retry);
    let held_since = items
        .iter()
        .map(|p| p.consumed_at)
        .min()
        .unwrap_or_else(Instant::now);
    let hold_deadline = held_since + MAX_HOLD;
    let mut attempt = 1;
    let failure = |status, error, retry_after| Failure {
        status,
        error,
        retry_after,
        destination: redact_url(url),
    };
    let failure = loop {
        // The request slots first: a batch that waited behind a dead endpoint learns
        // here that the circuit opened meanwhile, and leaves without a request. Waiting is
        // bounded, so no message nears the broker's consumer_timeout.
        let slots = tokio::time::timeout_at(hold_deadline, async {
            let slot = destination.acquire().await.expect("never closed");
            let permit = live.requests.acquire().await.expect("never closed");
            (slot, permit)
        })
        .await;
        let Ok((slot, permit)) = slots else {
            break failure(
                None,
                format!(
                    "no request slot for {} within {MAX_HOLD:?}",
                    redact_url(url)
                ),
                None,
            );
        };
        let admission = shared
            .circuits
            .lock()
            .expect("circuit lock")
            .admit(&key, Instant::now());
        if admission == Admission::Refuse {
            break failure(None, format!("circuit open for {}", redact_url(url)), None);
        }
        let outcome = {
            let (_slot, _permit) = (slot, permit);
            shared.metrics.inflight_add(1);
            let started = Instant::now();
            // Boxed: a batch waiting for its slots (hundreds of them with many
            // destinations) then holds a small task, not the whole request machinery.
            let outcome = Box::pin(live.sender.send(Request {
                account: &account,
                url,
                body: body.clone(),
                signature: signature.as_deref(),
                delivery_id: &delivery_id,
                attempt,
                event_count: items.len(),
            }))
            .await;
            shared.metrics.inflight_add(-1);
            let label = match outcome {
                Outcome::Delivered { .. } => RequestOutcome::Success,
                Outcome::Rejected { .. } => RequestOutcome::Rejected,
                Outcome::Retryable { .. } => RequestOutcome::Retryable,
            };
            shared
                .metrics
                .request(&account.id, kind, label, started.elapsed());
            outcome
        };
        match outcome {
            Outcome::Delivered { .. } => {
                if shared
                    .circuits
                    .lock()
                    .expect("circuit lock")
                    .success(&key)
                    .is_some()
                {
                    tracing::info!(account = %account.id, %kind, "circuit closed");
                    shared.metrics.set_circuit_open(&account.id, kind, false);
                }
                let now = SystemTime::now();
                for item in &items {
                    shared
                        .metrics
                        .delivery_lag(kind, now.duration_since(item.lag_from).unwrap_or_default());
                }
                shared
                    .metrics
                    .events_delivered(&account.id, kind, items.len());
                acks.ack(items.iter().map(|item| item.tag).collect());
                return;
            }
            Outcome::Rejected { status } => {
                if admission == Admission::Probe {
                    // Neither success nor failure: the next batch probes again.
                    shared.circuits.lock().expect("circuit lock").neutral(&key);
                }
                if items.len() > 1 {
                    // Isolate the rejected events: each half is a batch of its own.
                    let mut first = items;
                    let second = first.split_off(first.len() / 2);
                    tracing::info!(account = %account.id, %kind, status, events = first.len() + second.len(), "batch rejected; splitting");
                    for half in [first, second] {
                        shared.metrics.batch_split(&account.id, kind);
                        let batch = Batch {
                            live: live.clone(),
                            account: account.clone(),
                            kind,
                            limits,
                            items: half,
                            acks: acks.clone(),
                            destination: destination.clone(),
                        };
                        spawn_delivery(&shared, batch);
                    }
                } else {
                    let mut dead = DeadLetter::new(
                        &format!("rejected_{status}"),
                        &account.id,
                        kind.as_str(),
                        format!("HTTP {status}: the receiver rejected the event"),
                    );
                    dead.status = Some(status);
                    dead.destination = Some(redact_url(url));
                    for item in items {
                        Box::pin(dead_letter(&shared, item, &dead, &acks)).await;
                    }
                }
                return;
            }
            Outcome::Retryable {
                status,
                error,
                retry_after,
            } => {
                tracing::debug!(account = %account.id, %kind, attempt, ?status, %error, "attempt failed");
                let settings = &live.settings.circuit;
                if shared
                    .circuits
                    .lock()
                    .expect("circuit lock")
                    .failure(
                        &key,
                        Instant::now(),
                        settings,
                        admission == Admission::Probe,
                    )
                    .is_some()
                {
                    tracing::warn!(account = %account.id, %kind, cooldown = ?settings.cooldown, "circuit opened");
                    shared.metrics.set_circuit_open(&account.id, kind, true);
                }
                let too_long = retry_after.filter(|wait| *wait > retry.max_interval);
                if admission == Admission::Probe
                    || attempt >= retry.immediate_attempts
                    || too_long.is_some()
                {
                    break failure(status, error, too_long);
                }
                let delay =
                    retry_after.unwrap_or_else(|| backoff.next().unwrap_or(retry.max_interval));
                if Instant::now() + delay > hold_deadline {
                    break failure(status, error, None);
                }
                shared
                    .metrics
                    .events_retried(&account.id, kind, "immediate", items.len());
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
        }
    };
    tracing::info!(account = %account.id, %kind, events = items.len(), status = ?failure.status, error = %failure.error, "to scheduled retry");
    join_all(
        items
            .into_iter()
            .map(|item| schedule_retry(&shared, &live, &account.id, kind, item, &failure, &acks)),
    )
    .await;
}

/// Republishes one event to its next retry tier (or dead-letters it when its retries are
/// used up), then acks the original.
async fn schedule_retry(
    shared: &Shared,
    live: &Live,
    account: &str,
    kind: RecordType,
    item: Pending,
    failure: &Failure,
    acks: &Acks,
) {
    let now = SystemTime::now();
    let retry = &live.settings.retry;
    let retries = header_int(&item.properties, "x-courier-retries")
        .unwrap_or(0)
        .max(0) as usize;
    let first_failure = header_time(&item.properties, "x-courier-first-failure").unwrap_or(now);
    match retry::next_tier(
        &retry.schedule,
        retries,
        failure.retry_after,
        first_failure,
        now,
        retry.max_age,
    ) {
        Next::Exhausted => {
            let mut dead = DeadLetter::new(
                "retries_exhausted",
                account,
                kind.as_str(),
                failure.error.clone(),
            );
            dead.status = failure.status;
            dead.destination = Some(failure.destination.clone());
            dead_letter(shared, item, &dead, acks).await;
        }
        Next::Tier { index, retries } => {
            let mut headers = failure_headers(&item, first_failure, &failure.error);
            headers.insert(
                "x-courier-retries".into(),
                AMQPValue::LongLongInt(retries as i64),
            );
            let queue = shared.broker.retry_queue(retry.schedule[index]);
            if republish(shared, item, &queue, headers, acks).await {
                shared.metrics.events_retried(account, kind, "scheduled", 1);
            }
        }
    }
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

fn rfc3339(t: SystemTime) -> String {
    chrono::DateTime::<chrono::Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn header_time(properties: &BasicProperties, name: &str) -> Option<SystemTime> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => {
            let text = std::str::from_utf8(s.as_bytes()).ok()?;
            chrono::DateTime::parse_from_rfc3339(text)
                .ok()
                .map(SystemTime::from)
        }
        _ => None,
    }
}

fn header_int(properties: &BasicProperties, name: &str) -> Option<i64> {
    match properties.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongLongInt(n) => Some(*n),
        AMQPValue::LongInt(n) => Some((*n).into()),
        AMQPValue::ShortInt(n) => Some((*n).into()),
        AMQPValue::LongUInt(n) => Some((*n).into()),
        _ => None,
    }
}

/// Truncates to at most `max` bytes on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Headers every republished copy carries: the original's without the broker's history,
/// with when it first failed, when courier first saw it, and why it failed last.
fn failure_headers(
    item: &Pending,
    first_failure: SystemTime,
    error: &str,
) -> std::collections::BTreeMap<lapin::types::ShortString, AMQPValue> {
    let mut headers = history_free_headers(item.properties.headers().as_ref());
    headers.insert(
        "x-courier-first-failure".into(),
        long_string(&rfc3339(first_failure)),
    );
    headers.insert(
        "x-courier-first-seen".into(),
        long_string(&rfc3339(item.first_seen)),
    );
    headers.insert(
        "x-courier-last-error".into(),
        long_string(truncate(error, 1024)),
    );
    headers
}

/// Republishes one event to the dead-letter queue (confirmed, mandatory), then acks its
/// original; if the publish fails, the original is returned to the queue instead.
async fn dead_letter(shared: &Shared, item: Pending, dead: &DeadLetter, acks: &Acks) {
    let now = SystemTime::now();
    let retries = header_int(&item.properties, "x-courier-retries").unwrap_or(0);
    let first_failure = header_time(&item.properties, "x-courier-first-failure").unwrap_or(now);
    let mut headers = failure_headers(&item, first_failure, &dead.error);
    for name in ["x-courier-last-status", "x-courier-destination"] {
        headers.remove(name);
    }
    headers.insert("x-courier-reason".into(), long_string(&dead.reason));
    headers.insert("x-courier-retries".into(), AMQPValue::LongLongInt(retries));
    if let Some(status) = dead.status {
        headers.insert(
            "x-courier-last-status".into(),
            AMQPValue::LongLongInt(status.into()),
        );
    }
    headers.insert("x-courier-dead-at".into(), long_string(&rfc3339(now)));
    if let Some(destination) = &dead.destination {
        headers.insert("x-courier-destination".into(), long_string(destination));
    }
    let queue = shared.broker.dead_queue();
    if republish(shared, item, &queue, headers, acks).await {
        shared
            .metrics
            .event_dead_lettered(&dead.account, &dead.kind, &dead.reason);
    }
}

/// Publishes `item` to `queue` (confirmed, mandatory) with `headers`, then acks the
/// original. If the publish fails the original goes back to the queue instead (nack with
/// requeue), so nothing is lost. Returns whether it was published.
async fn republish(
    shared: &Shared,
    item: Pending,
    queue: &str,
    headers: std::collections::BTreeMap<lapin::types::ShortString, AMQPValue>,
    acks: &Acks,
) -> bool {
    // No `expiration`: a stale one could expire the copy.
    let mut properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_content_type("application/json".into())
        .with_headers(FieldTable::from(headers));
    if let Some(id) = item.properties.message_id() {
        properties = properties.with_message_id(id.clone());
    }
    if let Some(ts) = item.properties.timestamp() {
        properties = properties.with_timestamp(*ts);
    }
    match shared
        .publisher
        .publish("", queue, &item.body, properties)
        .await
    {
        Ok(()) => {
            settle(item, true, acks);
            true
        }
        Err(e) => {
            tracing::error!(error = %e, %queue, "republishing failed; returning the message to the queue");
            settle(item, false, acks);
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "h");
        assert_eq!(truncate("héllo", 3), "hé");
        assert_eq!(truncate("abc", 10), "abc");
    }
}
