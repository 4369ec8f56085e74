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
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Acker, BasicProperties, Connection, Consumer};
use secrecy::ExposeSecret;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::batch::{Accumulator, Flushed, Limits};
use crate::broker::{self, BrokerError, Publisher, history_free_headers};
use crate::config::{Account, Settings, redact_url};
use crate::deliver::{Outcome, Request, Sender, encode_body};
use crate::event::{self, RecordType};
use crate::metrics::{Metrics, RequestOutcome};
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
    body: Vec<u8>,
    id: String,
    /// `occurred_at`, else first seen: the start of the delivery lag.
    lag_from: SystemTime,
    first_seen: SystemTime,
    properties: BasicProperties,
    acker: Acker,
}

/// Why an event goes to the dead-letter queue, with the headers that explain it.
struct DeadLetter<'a> {
    reason: String,
    account: &'a str,
    kind: &'a str,
    status: Option<u16>,
    error: &'a str,
    destination: Option<String>,
}

/// Unsettled messages of one channel: the prefetch window in use. Each channel
/// generation gets its own, so late settlements of a dead channel never skew a new one.
type Window = Arc<AtomicUsize>;

/// A flushed batch with what its delivery task needs.
struct Batch {
    account: Arc<Account>,
    kind: RecordType,
    limits: Limits,
    items: Vec<Pending>,
    window: Window,
    destination: Arc<Semaphore>,
}

/// State shared by the consumer loop and the delivery tasks.
struct Shared {
    settings: Arc<Settings>,
    metrics: Arc<Metrics>,
    sender: Sender,
    publisher: Publisher,
    requests: Semaphore,
    tracker: TaskTracker,
}

/// The worker: `run` until `shutdown` is cancelled.
pub struct Worker {
    settings: Arc<Settings>,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
}

impl Worker {
    /// A worker for these settings, with fresh metrics.
    pub fn new(settings: Settings) -> Self {
        Self {
            settings: Arc::new(settings),
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

    /// Runs the pipeline until `shutdown` is cancelled, then flushes open batches and
    /// gives in-flight work up to `shutdown_timeout`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RunError> {
        let settings = self.settings.clone();
        let metrics = self.metrics.clone();
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
            metrics.clone(),
            self.ready.clone(),
            admin_stop.clone(),
        ));
        let result = self.pipeline(shutdown).await;
        admin_stop.cancel();
        let _ = admin.await;
        result
    }

    async fn pipeline(self, shutdown: CancellationToken) -> Result<(), RunError> {
        let settings = self.settings.clone();
        let metrics = self.metrics.clone();
        let sender = Sender::new(&settings.delivery)?;
        let publisher = Publisher::connect(
            &settings.broker.urls,
            &format!("courier publish {}", settings.broker.queue_prefix),
        )
        .await?;
        let shared = Arc::new(Shared {
            settings: settings.clone(),
            metrics: metrics.clone(),
            sender,
            publisher,
            requests: Semaphore::new(settings.delivery.max_concurrency),
            tracker: TaskTracker::new(),
        });
        let mut destinations: HashMap<Key, Arc<Semaphore>> = HashMap::new();
        let mut reconnect = reconnect_backoff();
        let mut first = true;
        loop {
            let session = match open_session(&settings).await {
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
            tracing::info!(queue = %settings.broker.deliver_queue(), prefetch = settings.broker.prefetch, "consuming");

            let ended = consume(&shared, session.consumer, &mut destinations, &shutdown).await;
            self.ready.store(false, Ordering::SeqCst);
            match ended {
                Ended::Shutdown => {
                    let _ = session
                        .channel
                        .basic_cancel(session.tag.as_str().into(), BasicCancelOptions::default())
                        .await;
                    shared.tracker.close();
                    let grace = settings.shutdown_timeout;
                    if tokio::time::timeout(grace, shared.tracker.wait())
                        .await
                        .is_err()
                    {
                        tracing::warn!(
                            ?grace,
                            "shutdown timeout passed; unsettled messages return to the queue"
                        );
                    }
                    let _ = session.connection.close(200, "shutting down".into()).await;
                    metrics.set_broker_connected(false);
                    shared.publisher.close().await;
                    return Ok(());
                }
                Ended::Lost(error) => {
                    metrics.set_broker_connected(false);
                    tracing::warn!(%error, "broker connection lost; reconnecting");
                    let _ = session.connection.close(200, "reconnecting".into()).await;
                }
            }
        }
        // Shut down while reconnecting: nothing is open on the broker side.
        shared.tracker.close();
        let _ = tokio::time::timeout(settings.shutdown_timeout, shared.tracker.wait()).await;
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
    consumer: Consumer,
    tag: String,
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
    Ok(Session {
        connection,
        channel,
        consumer,
        tag,
    })
}

enum Ended {
    Shutdown,
    Lost(String),
}

/// The consumer loop: takes deliveries, batches them, and hands flushed batches to
/// delivery tasks.
async fn consume(
    shared: &Arc<Shared>,
    mut consumer: Consumer,
    destinations: &mut HashMap<Key, Arc<Semaphore>>,
    shutdown: &CancellationToken,
) -> Ended {
    let settings = &shared.settings;
    let prefetch = settings.broker.prefetch as usize;
    let window: Window = Arc::new(AtomicUsize::new(0));
    let mut acc: Accumulator<Key, Arc<Account>, Pending> = Accumulator::default();
    let mut dispatch = |flushed: Flushed<Key, Arc<Account>, Pending>| {
        let destination = destinations
            .entry(flushed.key.clone())
            .or_insert_with(|| {
                Arc::new(Semaphore::new(
                    settings.delivery.max_inflight_per_destination,
                ))
            })
            .clone();
        shared.metrics.batch_flushed(
            &flushed.key.0,
            flushed.key.1,
            flushed.items.len(),
            flushed.reason,
        );
        let batch = Batch {
            account: flushed.ctx,
            kind: flushed.key.1,
            limits: flushed.limits,
            items: flushed.items,
            window: window.clone(),
            destination,
        };
        spawn_delivery(shared, batch);
    };
    let ended = loop {
        let deadline = acc.next_deadline();
        let due = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                acc.drain(&mut dispatch);
                break Ended::Shutdown;
            }
            _ = due => acc.expired(Instant::now(), &mut dispatch),
            next = consumer.next() => {
                let delivery = match next {
                    Some(Ok(delivery)) => delivery,
                    Some(Err(e)) => break Ended::Lost(e.to_string()),
                    None => break Ended::Lost("the consumer was cancelled".into()),
                };
                window.fetch_add(1, Ordering::SeqCst);
                if let Some((key, account, pending)) = route(shared, delivery, &window).await {
                    let limits = Limits {
                        batch_size: account.batch_size,
                        max_body_bytes: settings.delivery.max_body_bytes,
                        flush_interval: account.flush_interval,
                    };
                    let len = pending.body.len();
                    acc.push(&key, pending, len, Instant::now(), || (account, limits), &mut dispatch);
                }
                // A full window means no new message can arrive: flush the fullest
                // batches instead of waiting for their timers.
                if window.load(Ordering::SeqCst) >= prefetch && acc.buffered() > 0 {
                    acc.flush_fullest(acc.buffered().div_ceil(2), &mut dispatch);
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
async fn route(
    shared: &Arc<Shared>,
    delivery: lapin::message::Delivery,
    window: &Window,
) -> Option<(Key, Arc<Account>, Pending)> {
    let settings = &shared.settings;
    let lapin::message::Delivery {
        data,
        properties,
        acker,
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
        body: data,
        id,
        lag_from,
        first_seen,
        properties,
        acker,
    };
    match parsed {
        Err(invalid) => {
            let item = pending(String::new(), first_seen);
            let dead = DeadLetter {
                reason: "invalid_event".into(),
                account: "",
                kind: "",
                status: None,
                error: &invalid.0,
                destination: None,
            };
            tracing::warn!(error = %invalid, "invalid event dead-lettered");
            spawn_dead_letter(shared, item, dead, window);
            None
        }
        Ok((id, account_id, kind, occurred_at)) => {
            let lag_from = occurred_at.map(SystemTime::from).unwrap_or(first_seen);
            let item = pending(id, lag_from);
            let Some(account) = settings.accounts.get(&account_id) else {
                tracing::warn!(account = %account_id, "event of an unknown account dead-lettered");
                let error = format!("account {account_id:?} is not configured");
                let dead = DeadLetter {
                    reason: "unknown_account".into(),
                    account: &account_id,
                    kind: kind.as_str(),
                    status: None,
                    error: &error,
                    destination: None,
                };
                spawn_dead_letter(shared, item, dead, window);
                return None;
            };
            shared.metrics.event_consumed(&account.id, kind);
            if account.url(kind).is_none() {
                shared
                    .metrics
                    .event_skipped(&account.id, kind, "contacts_disabled");
                settle(item, true, window).await;
                return None;
            }
            Some(((account.id.clone(), kind), account.clone(), item))
        }
    }
}

fn spawn_dead_letter(shared: &Arc<Shared>, item: Pending, dead: DeadLetter<'_>, window: &Window) {
    let shared2 = shared.clone();
    let window = window.clone();
    let reason = dead.reason.clone();
    let account = dead.account.to_owned();
    let kind = dead.kind.to_owned();
    let error = dead.error.to_owned();
    let status = dead.status;
    let destination = dead.destination.clone();
    shared.tracker.spawn(async move {
        let dead = DeadLetter {
            reason,
            account: &account,
            kind: &kind,
            status,
            error: &error,
            destination,
        };
        dead_letter(&shared2, item, &dead, &window).await;
    });
}

/// Acks (or nacks with requeue) one message and releases its window slot.
async fn settle(item: Pending, ack: bool, window: &Window) {
    let result = if ack {
        item.acker.ack(BasicAckOptions::default()).await
    } else {
        item.acker
            .nack(BasicNackOptions {
                requeue: true,
                ..Default::default()
            })
            .await
    };
    if let Err(e) = result {
        // The channel died: the broker redelivers the message.
        tracing::debug!(error = %e, "settling failed; the message will be redelivered");
    }
    window.fetch_sub(1, Ordering::SeqCst);
}

/// Starts a delivery task (a plain function, so `deliver` can start its own halves).
fn spawn_delivery(shared: &Arc<Shared>, batch: Batch) {
    shared.tracker.spawn(deliver(shared.clone(), batch));
}

/// Delivers one batch: immediate attempts with backoff, then settle.
async fn deliver(shared: Arc<Shared>, batch: Batch) {
    let settings = &shared.settings;
    let Batch {
        account,
        kind,
        limits,
        items,
        window,
        destination,
    } = batch;
    let url = account.url(kind).expect("only routable events are batched");
    let body = encode_body(limits.batch_size, items.iter().map(|p| p.body.as_slice()));
    let signature = account
        .hmac_secret
        .as_ref()
        .map(|s| sign::signature(s.expose_secret().as_bytes(), &body));
    let delivery_id = sign::delivery_id(items.iter().map(|p| p.id.as_str()));
    let retry = &settings.retry;
    let mut backoff = ExponentialBuilder::default()
        .with_min_delay(retry.initial_interval)
        .with_max_delay(retry.max_interval)
        .with_jitter()
        .without_max_times()
        .build();
    let mut attempt = 1;
    let (status, error) = loop {
        let outcome = {
            let _slot = destination.acquire().await.expect("never closed");
            let _permit = shared.requests.acquire().await.expect("never closed");
            shared.metrics.inflight_add(1);
            let started = Instant::now();
            let outcome = shared
                .sender
                .send(Request {
                    account: &account,
                    url,
                    body: body.clone(),
                    signature: signature.as_deref(),
                    delivery_id: &delivery_id,
                    attempt,
                    event_count: items.len(),
                })
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
                let now = SystemTime::now();
                for item in &items {
                    shared
                        .metrics
                        .delivery_lag(kind, now.duration_since(item.lag_from).unwrap_or_default());
                }
                shared
                    .metrics
                    .events_delivered(&account.id, kind, items.len());
                futures_util::future::join_all(
                    items.into_iter().map(|item| settle(item, true, &window)),
                )
                .await;
                return;
            }
            Outcome::Rejected { status } if items.len() > 1 => {
                // Isolate the rejected events: each half is a batch of its own.
                let mut first = items;
                let second = first.split_off(first.len() / 2);
                tracing::info!(account = %account.id, %kind, status, events = first.len() + second.len(), "batch rejected; splitting");
                for half in [first, second] {
                    shared.metrics.batch_split(&account.id, kind);
                    let batch = Batch {
                        account: account.clone(),
                        kind,
                        limits,
                        items: half,
                        window: window.clone(),
                        destination: destination.clone(),
                    };
                    spawn_delivery(&shared, batch);
                }
                return;
            }
            Outcome::Rejected { status } => {
                let error = format!("HTTP {status}: the receiver rejected the event");
                let dead = DeadLetter {
                    reason: format!("rejected_{status}"),
                    account: &account.id,
                    kind: kind.as_str(),
                    status: Some(status),
                    error: &error,
                    destination: Some(redact_url(url)),
                };
                for item in items {
                    dead_letter(&shared, item, &dead, &window).await;
                }
                return;
            }
            Outcome::Retryable {
                status,
                error,
                retry_after,
            } => {
                tracing::debug!(account = %account.id, %kind, attempt, ?status, %error, "attempt failed");
                if attempt >= retry.immediate_attempts {
                    break (status, error);
                }
                let delay = match retry_after {
                    Some(wait) if wait <= retry.max_interval => wait,
                    // Longer than the immediate stage allows: it belongs to a scheduled tier.
                    Some(_) => break (status, error),
                    None => backoff
                        .next()
                        .unwrap_or(retry.max_interval)
                        .min(retry.max_interval),
                };
                shared
                    .metrics
                    .events_retried(&account.id, kind, "immediate", items.len());
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
        }
    };
    // Scheduled retry tiers are not built yet: an event whose immediate attempts are used
    // up is dead-lettered (and can be replayed from there).
    tracing::warn!(account = %account.id, %kind, events = items.len(), ?status, %error, "retries exhausted; dead-lettering");
    let dead = DeadLetter {
        reason: "retries_exhausted".into(),
        account: &account.id,
        kind: kind.as_str(),
        status,
        error: &error,
        destination: Some(redact_url(url)),
    };
    futures_util::future::join_all(
        items
            .into_iter()
            .map(|item| dead_letter(&shared, item, &dead, &window)),
    )
    .await;
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

/// Republishes one event to the dead-letter queue (confirmed, mandatory), then acks its
/// original; if the publish fails, the original is returned to the queue instead.
async fn dead_letter(shared: &Shared, item: Pending, dead: &DeadLetter<'_>, window: &Window) {
    let now = SystemTime::now();
    let mut headers = history_free_headers(item.properties.headers().as_ref());
    let retries = header_int(&item.properties, "x-courier-retries").unwrap_or(0);
    let first_failure = header_time(&item.properties, "x-courier-first-failure").unwrap_or(now);
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
    headers.insert(
        "x-courier-last-error".into(),
        long_string(truncate(dead.error, 1024)),
    );
    headers.insert(
        "x-courier-first-failure".into(),
        long_string(&rfc3339(first_failure)),
    );
    headers.insert(
        "x-courier-first-seen".into(),
        long_string(&rfc3339(item.first_seen)),
    );
    headers.insert("x-courier-dead-at".into(), long_string(&rfc3339(now)));
    if let Some(destination) = &dead.destination {
        headers.insert("x-courier-destination".into(), long_string(destination));
    }
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
    let queue = shared.settings.broker.dead_queue();
    match shared
        .publisher
        .publish("", &queue, &item.body, properties)
        .await
    {
        Ok(()) => {
            shared
                .metrics
                .event_dead_lettered(dead.account, dead.kind, &dead.reason);
            settle(item, true, window).await;
        }
        Err(e) => {
            tracing::error!(error = %e, reason = %dead.reason, "dead-lettering failed; returning the message to the queue");
            settle(item, false, window).await;
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
