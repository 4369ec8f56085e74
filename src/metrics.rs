//! Every metric of docs/operations.md ("Metrics") in one struct, with named methods for call sites so no
//! call site spells a metric name or a label.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::event::RecordType;
use crate::pipeline::batch::FlushReason;

mod destinations;
use destinations::Destinations;

/// Outcome label of `courier_requests_total`.
#[derive(Debug, Clone, Copy)]
pub enum RequestOutcome {
    Success,
    Rejected,
    Retryable,
}

impl RequestOutcome {
    const ALL: [RequestOutcome; 3] = [Self::Success, Self::Rejected, Self::Retryable];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestOutcome::Success => "success",
            RequestOutcome::Rejected => "rejected",
            RequestOutcome::Retryable => "retryable",
        }
    }
}

/// The metrics, registered in their own registry.
pub struct Metrics {
    registry: Registry,
    /// The series kept per destination (consumed, delivered, requests, request duration,
    /// batch size, flushes, splits), in plain atomics.
    destinations: Destinations,
    /// Events acknowledged without delivery by configuration (e.g. contacts disabled).
    events_skipped: IntCounterVec,
    /// Events retried, one per event per retry, by stage.
    events_retried: IntCounterVec,
    /// Events confirmed into the dead-letter queue, by reason.
    events_dead_lettered: IntCounterVec,
    /// From `occurred_at` (else first seen) to delivery, by type (index: `RecordType`).
    delivery_lag: [Histogram; 2],
    /// SIGHUP reloads by result.
    config_reloads: IntCounterVec,
    /// Events held in open batches.
    buffered_events: IntGauge,
    /// Per-record ordering: records waiting behind an event in a retry tier.
    parked_records: IntGauge,
    /// HTTP requests in flight.
    inflight_requests: IntGauge,
    /// 1 while a destination's circuit is open.
    circuit_open: IntGaugeVec,
    /// 1 while the consuming connection is up.
    broker_connected: IntGauge,
    /// Reconnections after a lost broker connection.
    broker_reconnects: IntCounter,
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let metric = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn histogram(
    registry: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let metric = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let metric = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(metric.clone()))
        .expect("unique metric");
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every metric in a fresh registry.
    pub fn new() -> Self {
        let r = Registry::new();
        let at = &["account", "type"];
        let lag_buckets = vec![
            0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
            1800.0, 3600.0, 7200.0, 21600.0, 43200.0, 86400.0, 172800.0,
        ];
        let circuit_open = IntGaugeVec::new(
            Opts::new(
                "courier_circuit_open",
                "1 while the destination's circuit is open",
            ),
            at,
        )
        .expect("valid metric");
        r.register(Box::new(circuit_open.clone()))
            .expect("unique metric");
        let broker_reconnects = IntCounter::new(
            "courier_broker_reconnects_total",
            "Reconnections after a lost broker connection",
        )
        .expect("valid metric");
        r.register(Box::new(broker_reconnects.clone()))
            .expect("unique metric");
        Self {
            destinations: Destinations::default(),
            events_skipped: counter(
                &r,
                "courier_events_skipped_total",
                "Events acknowledged without delivery by configuration",
                &["account", "type", "reason"],
            ),
            events_retried: counter(
                &r,
                "courier_events_retried_total",
                "Events retried, one per event per retry",
                &["account", "type", "stage"],
            ),
            events_dead_lettered: counter(
                &r,
                "courier_events_dead_lettered_total",
                "Events confirmed into the dead-letter queue",
                &["account", "type", "reason"],
            ),
            delivery_lag: {
                let lag = histogram(
                    &r,
                    "courier_delivery_lag_seconds",
                    "From occurred_at (else first seen) to delivery",
                    &["type"],
                    lag_buckets,
                );
                [RecordType::Company, RecordType::Contact]
                    .map(|kind| lag.with_label_values(&[kind.as_str()]))
            },
            config_reloads: counter(
                &r,
                "courier_config_reloads_total",
                "Configuration reloads",
                &["result"],
            ),
            buffered_events: gauge(&r, "courier_buffered_events", "Events held in open batches"),
            parked_records: gauge(
                &r,
                "courier_parked_records",
                "Records waiting behind an event in a retry tier (per-record ordering)",
            ),
            inflight_requests: gauge(&r, "courier_inflight_requests", "HTTP requests in flight"),
            circuit_open,
            broker_connected: gauge(
                &r,
                "courier_broker_connected",
                "1 while connected to the broker",
            ),
            broker_reconnects,
            registry: r,
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut text = self.render_global();
        self.destinations.render(&mut text);
        text
    }

    /// The same text in pieces of tens of KiB, each written when it is taken (the
    /// per-destination series, megabytes with thousands of accounts, are never all held).
    pub fn render_chunks(&self) -> impl Iterator<Item = String> + Send + 'static {
        std::iter::once(self.render_global()).chain(self.destinations.chunks())
    }

    /// The families without per-destination series, from the `prometheus` registry.
    fn render_global(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("prometheus text is UTF-8")
    }

    pub fn event_consumed(&self, account: &str, kind: RecordType) {
        self.destinations
            .with(account, kind, |d| d.consumed.fetch_add(1, Relaxed));
    }

    pub fn events_delivered(&self, account: &str, kind: RecordType, n: usize) {
        self.destinations
            .with(account, kind, |d| d.delivered.fetch_add(n as u64, Relaxed));
    }

    pub fn event_skipped(&self, account: &str, kind: RecordType, reason: &str) {
        self.events_skipped
            .with_label_values(&[account, kind.as_str(), reason])
            .inc();
    }

    pub fn events_retried(&self, account: &str, kind: RecordType, stage: &str, n: usize) {
        self.events_retried
            .with_label_values(&[account, kind.as_str(), stage])
            .inc_by(n as u64);
    }

    /// `account`/`kind` are empty for events too broken to name them.
    pub fn event_dead_lettered(&self, account: &str, kind: &str, reason: &str) {
        self.events_dead_lettered
            .with_label_values(&[account, kind, reason])
            .inc();
    }

    /// One HTTP request of `events` events: `courier_batch_size` counts events per
    /// request, so a batch parked by an open circuit (no request) is not in it.
    pub fn request(
        &self,
        account: &str,
        kind: RecordType,
        events: usize,
        outcome: RequestOutcome,
        elapsed: Duration,
    ) {
        self.destinations.with(account, kind, |d| {
            d.requests[outcome as usize].fetch_add(1, Relaxed);
            d.duration.observe(elapsed.as_secs_f64());
            d.batch_size.observe(events as f64);
        });
    }

    pub fn batch_flushed(&self, account: &str, kind: RecordType, reason: FlushReason) {
        self.destinations.with(account, kind, |d| {
            d.flushed[reason as usize].fetch_add(1, Relaxed);
        });
    }

    pub fn batch_split(&self, account: &str, kind: RecordType) {
        self.destinations
            .with(account, kind, |d| d.splits.fetch_add(1, Relaxed));
    }

    pub fn delivery_lag(&self, kind: RecordType, lag: Duration) {
        self.delivery_lag[kind as usize].observe(lag.as_secs_f64());
    }

    pub fn config_reload(&self, ok: bool) {
        self.config_reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    pub fn set_buffered(&self, n: usize) {
        self.buffered_events.set(n as i64);
    }

    pub fn set_parked_records(&self, n: usize) {
        self.parked_records.set(n as i64);
    }

    pub fn inflight_add(&self, delta: i64) {
        self.inflight_requests.add(delta);
    }

    pub fn set_circuit_open(&self, account: &str, kind: RecordType, open: bool) {
        self.circuit_open
            .with_label_values(&[account, kind.as_str()])
            .set(open as i64);
    }

    pub fn set_broker_connected(&self, connected: bool) {
        self.broker_connected.set(connected as i64);
    }

    pub fn broker_reconnected(&self) {
        self.broker_reconnects.inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_contract_metric_is_exposed() {
        let m = Metrics::new();
        // Label sets appear only once used; touch each vector.
        m.event_consumed("a", RecordType::Company);
        m.events_delivered("a", RecordType::Company, 1);
        m.event_skipped("a", RecordType::Contact, "contacts_disabled");
        m.events_retried("a", RecordType::Company, "immediate", 1);
        m.event_dead_lettered("a", "company", "invalid_event");
        m.request(
            "a",
            RecordType::Company,
            3,
            RequestOutcome::Success,
            Duration::from_millis(3),
        );
        m.batch_flushed("a", RecordType::Company, FlushReason::Size);
        m.batch_split("a", RecordType::Company);
        m.delivery_lag(RecordType::Company, Duration::from_secs(1));
        m.config_reload(true);
        m.set_circuit_open("a", RecordType::Company, false);
        let text = m.render();
        for name in [
            "courier_events_consumed_total",
            "courier_events_delivered_total",
            "courier_events_skipped_total",
            "courier_events_retried_total",
            "courier_events_dead_lettered_total",
            "courier_requests_total",
            "courier_request_duration_seconds",
            "courier_batch_size",
            "courier_batches_flushed_total",
            "courier_batch_splits_total",
            "courier_delivery_lag_seconds",
            "courier_config_reloads_total",
            "courier_buffered_events",
            "courier_inflight_requests",
            "courier_circuit_open",
            "courier_broker_connected",
            "courier_broker_reconnects_total",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} missing");
        }
        for bucket in ["1", "2", "5", "10", "20", "50", "100", "150", "200"] {
            assert!(text.contains(&format!(
                "courier_batch_size_bucket{{account=\"a\",type=\"company\",le=\"{bucket}\"}}"
            )));
        }
        assert!(text.contains("courier_delivery_lag_seconds_bucket{type=\"company\",le=\"0.01\"}"));
        assert!(
            text.contains("courier_delivery_lag_seconds_bucket{type=\"company\",le=\"172800\"}")
        );
    }
}
