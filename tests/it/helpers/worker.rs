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
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<Result<(), RunError>>,
}

impl TestWorker {
    pub async fn spawn(settings: Settings) -> Self {
        init_logs();
        let worker = Worker::new(settings);
        let metrics = worker.metrics();
        let ready = worker.ready();
        let stop = CancellationToken::new();
        let handle = tokio::spawn(worker.run(stop.clone()));
        let deadline = Instant::now() + Duration::from_secs(20);
        while !ready.load(Ordering::SeqCst) {
            assert!(!handle.is_finished(), "worker exited during start-up");
            assert!(Instant::now() < deadline, "worker not ready in time");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Self {
            metrics,
            stop,
            handle,
        }
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
