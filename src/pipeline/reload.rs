//! Reloading the configuration (SIGHUP), in one place: whether a new file may take
//! effect ([`Reloader`]), and what it changes for batches formed afterwards
//! ([`Live::reloaded`]). Open batches keep the settings they were formed under
//! (docs/configuration.md, "Reloading").

use std::sync::Arc;

use tokio::sync::{Semaphore, watch};

use crate::broker;
use crate::config::{self, Settings};
use crate::http::Sender;
use crate::metrics::Metrics;

/// What batches are formed under: the settings and the clients built from them. A batch
/// keeps the one it was formed under.
pub struct Live {
    pub settings: Arc<Settings>,
    pub sender: Sender,
    /// Requests in flight, all destinations together.
    pub requests: Arc<Semaphore>,
    /// The prefetch window holds two of the largest batches: the consumer flushes at half
    /// a window (see `consume`).
    pub pipelined: bool,
}

impl Live {
    /// The clients for `settings`.
    pub fn new(settings: Arc<Settings>) -> Result<Self, reqwest::Error> {
        let sender = Sender::new(&settings.delivery)?;
        let requests = Arc::new(Semaphore::new(settings.delivery.max_concurrency));
        Ok(Self {
            pipelined: pipelined(&settings),
            settings,
            sender,
            requests,
        })
    }

    /// What batches formed after a reload use. An unchanged `[delivery]` keeps the HTTP
    /// client (its pool) and the request limit. The second value says whether the
    /// per-destination request limits must be built again.
    pub fn reloaded(&self, settings: Arc<Settings>) -> Result<(Self, bool), reqwest::Error> {
        if settings.delivery == self.settings.delivery {
            let live = Self {
                pipelined: pipelined(&settings),
                settings,
                sender: self.sender.clone(),
                requests: self.requests.clone(),
            };
            return Ok((live, false));
        }
        let reset = settings.delivery.max_inflight_per_destination
            != self.settings.delivery.max_inflight_per_destination;
        Ok((Self::new(settings)?, reset))
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

/// Applies a new configuration file to a running worker (SIGHUP).
#[derive(Clone)]
pub struct Reloader {
    pub(super) metrics: Arc<Metrics>,
    pub(super) current: Arc<watch::Sender<Arc<Settings>>>,
}

impl Reloader {
    /// Reads the worker's configuration file again. A valid file that changes only
    /// reloadable sections takes effect for batches formed afterwards; otherwise the old
    /// configuration stays, and the error is returned, logged and counted.
    pub async fn reload(&self) -> Result<(), String> {
        let current = self.current.borrow().clone();
        match accept(&current).await {
            Ok(new) => {
                tracing::info!(config = %new.source.display(), accounts = new.accounts.len(), "configuration reloaded");
                self.metrics.config_reload(true);
                self.current.send_replace(Arc::new(new));
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

/// Loads the file of `current` again and checks that it can take effect.
async fn accept(current: &Settings) -> Result<Settings, String> {
    let mut new = config::load(&current.source).map_err(|e| e.to_string())?;
    if !new.broker.prefetch_set && !current.broker.prefetch_set {
        // A derived window follows the accounts at start only: the running session
        // keeps its own (docs/configuration.md, `prefetch`).
        new.broker.prefetch = current.broker.prefetch;
    }
    if let Some(section) = config::restart_only_change(current, &new) {
        return Err(format!(
            "{section} changed: it needs a restart; the reload was refused"
        ));
    }
    // Build the new HTTP client now, so a reload that cannot take effect is refused.
    Sender::new(&new.delivery).map_err(|e| format!("cannot build the HTTP client: {e}"))?;
    if new.retry.schedule != current.retry.schedule {
        // New tiers need their queues before anything is published to them.
        broker::ensure_topology(&new.broker, &new.retry.schedule, "courier reload")
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(new)
}
