//! The worker: the pipeline's stages wired together, broker sessions supervised.
//!
//! ```text
//! session ──▶ consume ──▶ batch ──▶ deliver ──▶ decide
//!  (channel,    (parse,     (open      (one task    (pure: what
//!   acks,        route,      batches    per batch)   comes next)
//!   tasks)       flush)      per key)       │
//!                                           ▼
//!                                        settle (ack, nack, republish)
//! ```
//!
//! - [`session`]: one consuming connection; owns its tasks and cancels them when it ends;
//! - [`consume`]: the select loop, routing, the flush policy;
//! - [`batch`]: the accumulator, one open batch per destination;
//! - [`deliver`]: the delivery task, which carries out decisions;
//! - [`decide`]: the retry policy, pure and table-tested;
//! - [`settle`]: the only code that acks, nacks and republishes;
//! - [`order`] and [`router`]: per-record ordering, when configured (docs/ordering.md):
//!   which record waits for which event, and the router from the intake queue to the
//!   shards;
//! - [`reload`]: what a new configuration file changes;
//! - [`warnings`]: warnings about bad input, summarised.
//!
//! This module runs the admin server and the sessions: it reconnects with backoff when a
//! session is lost, and shuts down on its token. docs/design.md draws the same flow.

pub mod batch;
mod consume;
pub mod decide;
mod deliver;
pub mod order;
mod reload;
pub mod router;
mod session;
pub mod settle;
mod warnings;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::admin;
use crate::broker::parking::ParkingLog;
use crate::broker::{BrokerError, Publisher};
use crate::config::Settings;
use crate::event::RecordType;
use crate::metrics::Metrics;
use consume::{Ended, Intake};
use deliver::{Context, Deliveries};
use session::Session;
use settle::{Ordered, Settler};

use reload::Live;
pub use reload::Reloader;

/// A destination: events of one account and record type share batches.
pub type Key = (Arc<str>, RecordType);

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

/// The worker: `run` until `shutdown` is cancelled.
pub struct Worker {
    settings: Arc<Settings>,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    current: Arc<watch::Sender<Arc<Settings>>>,
}

impl Worker {
    /// A worker for these settings, with fresh metrics.
    pub fn new(settings: Settings) -> Self {
        let settings = Arc::new(settings);
        Self {
            current: Arc::new(watch::channel(settings.clone()).0),
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
            current: self.current.clone(),
        }
    }

    /// Runs the pipeline until `shutdown` is cancelled, then flushes open batches and
    /// gives in-flight work up to `shutdown_timeout`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), RunError> {
        let addr = self.settings.admin.listen;
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| RunError::Admin { addr, source })?;
        let bound = listener
            .local_addr()
            .map_err(|source| RunError::Admin { addr, source })?;
        tracing::info!(listen = %bound, "admin endpoints up");
        let admin_stop = CancellationToken::new();
        let admin = tokio::spawn(admin::serve(
            listener,
            self.metrics.clone(),
            self.ready.clone(),
            admin_stop.clone(),
        ));
        let result = self.supervise(shutdown).await;
        admin_stop.cancel();
        let _ = admin.await;
        result
    }

    /// Opens sessions one after the other until shutdown. A broker that does not answer,
    /// at start or later, is retried with backoff (`/readyz` is 503 meanwhile); only
    /// errors that waiting cannot mend (a broker too old, a queue declared with other
    /// arguments) end the worker.
    async fn supervise(self, shutdown: CancellationToken) -> Result<(), RunError> {
        let mut reloads = self.current.subscribe();
        let live = Live::new(reloads.borrow_and_update().clone())?;
        let mut intake = Intake {
            live: Arc::new(live),
            reloads,
            destinations: HashMap::new(),
            warnings: Default::default(),
        };
        let broker = Arc::new(self.settings.broker.clone());
        let name = format!("courier publish {}", broker.queue_prefix);
        // Connects at its first publish, after the first session: the broker may be
        // absent at start.
        let publisher = Arc::new(Publisher::lazy(&broker.urls, &name));
        let shared = Arc::new(Deliveries::new(
            self.metrics.clone(),
            self.current.subscribe(),
        ));
        let summaries_stop = CancellationToken::new();
        let _stop_summaries = summaries_stop.clone().drop_guard();
        let summaries = tokio::spawn(log_dead_summaries(shared.clone(), summaries_stop.clone()));
        let mut reconnect = reconnect_backoff();
        let mut first = true;
        let log = ParkingLog::new(publisher.clone(), broker.parking_queue());
        // Per-record ordering: the router runs beside the sessions, on its own connection.
        let router_stop = CancellationToken::new();
        let mut router = None;
        loop {
            let settings = intake.live.settings.clone();
            let opened = tokio::select! {
                _ = shutdown.cancelled() => break,
                opened = Session::open(&settings) => opened,
            };
            let mut session = match opened {
                Ok(session) => session,
                Err(e) if e.is_fatal() => return Err(e.into()),
                Err(e) => {
                    let delay = reconnect.next().unwrap_or(Duration::from_secs(10));
                    tracing::warn!(error = %e, retry_in = ?delay, "broker unavailable");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            if first {
                // Ready to republish before the first delivery needs it.
                if let Err(e) = publisher.warm().await {
                    tracing::warn!(error = %e, "publish connection not open yet; the first republish retries");
                }
            } else {
                self.metrics.broker_reconnected();
            }
            first = false;
            reconnect = reconnect_backoff();
            self.metrics.set_broker_connected(true);
            self.set_ready(true);
            if broker.per_record && router.is_none() {
                router = Some(tokio::spawn(router::run(
                    broker.clone(),
                    router_stop.clone(),
                )));
            }
            let ordered = broker.per_record.then(|| {
                let (resolved, rx) = tokio::sync::mpsc::unbounded_channel();
                let link = Arc::new(Ordered {
                    resolved,
                    log: log.clone(),
                });
                (link, consume::Ordered::new(rx, log.clone()))
            });
            let (link, ordered) = ordered.unzip();
            if broker.per_record {
                tracing::info!(shards = broker.shards, prefix = %broker.queue_prefix, prefetch = broker.prefetch, "consuming the shards (per-record ordering)");
            } else {
                tracing::info!(queue = %broker.deliver_queue(), prefetch = broker.prefetch, "consuming");
            }
            let cx = Arc::new(Context {
                shared: shared.clone(),
                settle: Settler::new(
                    session.acks.clone(),
                    publisher.clone(),
                    broker.clone(),
                    self.metrics.clone(),
                    session.tasks.token(),
                    link,
                ),
                tasks: session.tasks.clone(),
            });
            let ended = consume::consume(&mut intake, &mut session, &cx, &shutdown, ordered).await;
            drop(cx);
            self.set_ready(false);
            match ended {
                Ended::Shutdown { flushed } => {
                    router_stop.cancel();
                    let left = session
                        .shut_down(intake.live.settings.shutdown_timeout)
                        .await;
                    tracing::info!(
                        batches_flushed = flushed,
                        events_left = left,
                        "shutdown: {flushed} open batch(es) flushed; {left} event(s) left unacknowledged for the broker to redeliver"
                    );
                    break;
                }
                Ended::Lost(error) => {
                    self.metrics.set_broker_connected(false);
                    tracing::warn!(%error, "broker connection lost; reconnecting");
                    session.abandon().await;
                }
            }
        }
        self.metrics.set_broker_connected(false);
        router_stop.cancel();
        if let Some(router) = router {
            let _ = router.await;
        }
        publisher.close().await;
        summaries_stop.cancel();
        let _ = summaries.await;
        Ok(())
    }

    fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }
}

/// Logs the summaries of dead-letterings as their intervals end, and what is left when
/// `stop` is cancelled.
async fn log_dead_summaries(shared: Arc<Deliveries>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(warnings::INTERVAL / 10);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => shared.log_dead_summaries(false),
        }
    }
    shared.log_dead_summaries(true);
}

/// Reconnect delays: 0.5 s doubling to 10 s, with jitter, for as long as it takes. The
/// cap bounds how long a worker stays idle after its broker is back.
fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build()
}
