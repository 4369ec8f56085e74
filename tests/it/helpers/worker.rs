//! A worker running in-process, stopped by the test as SIGTERM would stop it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use courier::config::Settings;
use courier::metrics::Metrics;
use courier::pipeline::{RunError, Worker};

use super::init_logs;

/// A worker running in-process on its own queues.
pub struct TestWorker {
    pub metrics: Arc<Metrics>,
    ready: Arc<std::sync::atomic::AtomicBool>,
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), RunError>>,
}

impl TestWorker {
    /// Starts the worker and waits until it is ready.
    pub async fn spawn(settings: Settings) -> Self {
        let worker = Self::start(settings);
        assert!(
            worker.wait_ready(Duration::from_secs(20)).await,
            "worker not ready in time"
        );
        worker
    }

    /// Starts the worker without waiting for it to connect.
    pub fn start(settings: Settings) -> Self {
        init_logs();
        let worker = Worker::new(settings);
        let stop = CancellationToken::new();
        Self {
            metrics: worker.metrics(),
            ready: worker.ready(),
            stop: stop.clone(),
            handle: tokio::spawn(worker.run(stop)),
        }
    }

    /// Waits until the worker is connected and consuming; panics if it exits.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while !self.ready.load(Ordering::SeqCst) {
            assert!(!self.handle.is_finished(), "worker exited");
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Whether the worker is still running.
    pub fn running(&self) -> bool {
        !self.handle.is_finished()
    }

    /// A metric's value summed over the label sets whose rendering contains every
    /// `label="value"` of `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_value(&self.metrics.render(), name, labels)
    }

    /// Stops the worker (as SIGTERM would) and waits for it.
    pub async fn shutdown(self) {
        self.stop.cancel();
        self.handle.await.expect("worker task").expect("worker run");
    }
}

/// Sums the samples of `name` in Prometheus text that carry all `labels`.
pub fn metric_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let (metric, _) = l.split_once(' ').unwrap_or((l, ""));
            let base = metric.split('{').next().unwrap();
            base == name
                && labels
                    .iter()
                    .all(|(k, v)| metric.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
