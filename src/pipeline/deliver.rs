//! The delivery task: one flushed batch from its first request to its settlement. It
//! carries out what [`decide`](super::decide) says and holds no policy of its own: take a
//! request slot, ask the circuit, send, tell the circuit, then ack, split, reject, wait and
//! try again, or leave for the scheduled tiers.
//!
//! A task runs inside its broker session ([`Tasks`](super::session::Tasks)): when the
//! session ends, the task is dropped wherever it waits, its request slots are released
//! and nothing is settled on its behalf.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use secrecy::ExposeSecret;
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use super::Key;
use super::batch::Limits;
use super::decide::{
    self, Attempted, CircuitNote, MAX_HOLD, Progress, Step, circuit_note, immediate_backoff,
};
use super::reload::{self, Live};
use super::session::Tasks;
use super::settle::{DeadLetter, Pending, Settler};
use super::warnings::DeadLetterLog;
use crate::circuit::{Admission, Breakers};
use crate::config::{Account, CircuitSettings, Settings, redact_url};
use crate::event::RecordType;
use crate::http::{Outcome, Request, encode_body_shared};
use crate::metrics::{Metrics, RequestOutcome};
use crate::sign;

/// What every delivery task shares with the others: the worker's state that outlives
/// broker sessions.
pub struct Deliveries {
    pub metrics: Arc<Metrics>,
    pub circuits: Mutex<Breakers<Key>>,
    /// The configuration in force (reloads replace it): whether a batch's URL and TLS
    /// identity are still its destination's.
    pub settings: watch::Receiver<Arc<Settings>>,
    /// Dead-letterings logged, summarised per account, type and reason.
    pub dead_log: Mutex<DeadLetterLog>,
}

impl Deliveries {
    pub fn new(metrics: Arc<Metrics>, settings: watch::Receiver<Arc<Settings>>) -> Self {
        Self {
            metrics,
            circuits: Mutex::new(Breakers::default()),
            settings,
            dead_log: Mutex::new(DeadLetterLog::default()),
        }
    }

    /// Whether destination `key` is still reached as under `formed`, the settings a batch
    /// was formed under: a batch formed before a reload that moved it (another URL or TLS
    /// identity) tells nothing about the new receiver.
    fn is_current(&self, key: &Key, formed: &Settings) -> bool {
        let settings = self.settings.borrow();
        std::ptr::eq(&**settings, formed) || reload::same_destination(formed, &settings, key)
    }

    /// Closes the circuits of destinations reached another way (URL or TLS identity):
    /// another receiver.
    pub fn reset_circuits(&self, moved: &[Key]) {
        let mut circuits = self.circuits.lock().expect("circuit lock");
        for key in moved {
            if circuits.reset(key).is_some() {
                tracing::info!(account = %key.0, r#type = %key.1, "circuit closed: the destination's URL or TLS identity changed");
                self.metrics.set_circuit_open(&key.0, key.1, false);
            }
        }
    }

    /// Logs the summaries of dead-letterings due by now (every one on `shutdown`).
    pub fn log_dead_summaries(&self, shutdown: bool) {
        let mut log = self.dead_log.lock().expect("dead-letter log lock");
        let due = if shutdown {
            log.flush()
        } else {
            log.due(Instant::now())
        };
        drop(log);
        due.iter().for_each(|summary| summary.log());
    }
}

/// A flushed batch with what its delivery task needs.
pub struct Batch {
    pub live: Arc<Live>,
    pub account: Arc<Account>,
    pub kind: RecordType,
    pub limits: Limits,
    pub items: Vec<Pending>,
    /// Requests in flight to this destination.
    pub destination: Arc<Semaphore>,
}

/// What a delivery task works with: one per session, shared by its tasks.
pub struct Context {
    pub shared: Arc<Deliveries>,
    pub settle: Settler,
    pub tasks: Tasks,
}

/// Starts the delivery task of `batch` in its session.
pub fn spawn(cx: &Arc<Context>, batch: Batch) {
    cx.tasks.spawn(deliver(cx.clone(), batch));
}

/// Delivers one batch: immediate attempts with backoff, then settlement.
async fn deliver(cx: Arc<Context>, mut batch: Batch) {
    let key: Key = (batch.account.id.clone(), batch.kind);
    let url = batch
        .account
        .url(batch.kind)
        .expect("only routable events are batched");
    let destination = redact_url(url);
    // The events then point into the body: a batch holds its events once.
    let body = encode_body_shared(
        batch.limits.batch_size,
        batch.items.iter_mut().map(|p| &mut p.body).collect(),
    );
    let signature = batch
        .account
        .hmac_secret
        .as_ref()
        .map(|s| sign::signature(s.expose_secret().as_bytes(), &body));
    let delivery_id = sign::delivery_id(batch.items.iter().map(|p| p.id.as_str()));
    let live = batch.live.clone();
    let retry = &live.settings.retry;
    let mut backoff = immediate_backoff(retry);
    let held_since = batch.items.iter().map(|p| p.consumed_at).min();
    let hold_deadline = held_since.unwrap_or_else(Instant::now) + MAX_HOLD;
    let mut attempt = 1;
    loop {
        let request = Request {
            account: &batch.account,
            url,
            body: body.clone(),
            signature: signature.as_deref(),
            delivery_id: &delivery_id,
            attempt,
            event_count: batch.items.len(),
        };
        let attempted = cx
            .attempt(&batch, &key, &live, request, hold_deadline, &destination)
            .await;
        let progress = Progress {
            attempt,
            events: batch.items.len(),
            now: Instant::now(),
            hold_deadline,
            backoff: backoff.next().unwrap_or(retry.max_interval),
            destination: &destination,
        };
        let step = decide::decide(&attempted, &progress, retry);
        match step {
            Step::Wait(delay) => {
                tracing::debug!(account = %key.0, r#type = %key.1, attempt, ?delay, "attempt failed; trying again");
                cx.shared
                    .metrics
                    .events_retried(&key.0, key.1, "immediate", batch.items.len());
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
            step => return cx.finish(batch, step, &destination).await,
        }
    }
}

impl Context {
    /// One try: the request slots (waiting at most until `hold_deadline`, so no message
    /// nears the broker's consumer_timeout), the circuit's admission, the request.
    /// Slots come first: a batch that waited behind a dead endpoint learns here that the
    /// circuit opened meanwhile, and leaves without a request.
    async fn attempt(
        &self,
        batch: &Batch,
        key: &Key,
        live: &Live,
        request: Request<'_>,
        hold_deadline: Instant,
        destination: &str,
    ) -> Attempted {
        let slots = tokio::time::timeout_at(hold_deadline, async {
            let slot = batch.destination.clone().acquire_owned().await;
            let permit = live.requests.clone().acquire_owned().await;
            (slot.expect("never closed"), permit.expect("never closed"))
        })
        .await;
        let Ok(_slots) = slots else {
            return Attempted::NoSlot;
        };
        let admission = self.admit(key);
        if admission == Admission::Refuse {
            let cause = self
                .shared
                .circuits
                .lock()
                .expect("circuit lock")
                .last_cause(key);
            return Attempted::CircuitOpen { cause };
        }
        let probe = ProbeGuard::new(&self.shared, key, admission);
        let outcome = self.send(live, request, key, destination).await;
        if self.shared.is_current(key, &live.settings) {
            probe.disarm();
            self.note_circuit(key, admission, &outcome, &live.settings.circuit);
        }
        // Otherwise a reload changed the URL or TLS identity meanwhile: the outcome is not
        // the new receiver's (an armed probe guard lets the next batch probe).
        Attempted::Sent { admission, outcome }
    }

    fn admit(&self, key: &Key) -> Admission {
        let mut circuits = self.shared.circuits.lock().expect("circuit lock");
        circuits.admit(key, Instant::now())
    }

    /// One HTTP attempt, counted, and logged at debug.
    async fn send(
        &self,
        live: &Live,
        request: Request<'_>,
        key: &Key,
        destination: &str,
    ) -> Outcome {
        let metrics = &self.shared.metrics;
        let (events, attempt) = (request.event_count, request.attempt);
        let delivery_id = request.delivery_id;
        metrics.inflight_add(1);
        let _inflight = scopeguard(|| metrics.inflight_add(-1));
        let started = Instant::now();
        // Boxed: a batch waiting for its slots (hundreds of them with many destinations)
        // then holds a small task, not the whole request machinery.
        let outcome = Box::pin(live.sender.send(request)).await;
        let label = match outcome {
            Outcome::Delivered { .. } => RequestOutcome::Success,
            Outcome::Rejected { .. } => RequestOutcome::Rejected,
            Outcome::Retryable { .. } => RequestOutcome::Retryable,
        };
        let duration = started.elapsed();
        metrics.request(&key.0, key.1, events, label, duration);
        if tracing::enabled!(tracing::Level::DEBUG) {
            let (status, error) = match &outcome {
                Outcome::Delivered { status } | Outcome::Rejected { status } => {
                    (Some(*status), None)
                }
                Outcome::Retryable { status, error, .. } => (*status, Some(error.as_str())),
            };
            tracing::debug!(account = %key.0, r#type = %key.1, %destination, events, status, error, ?duration, %delivery_id, attempt, outcome = label.as_str(), "request");
        }
        outcome
    }

    /// Tells the destination's circuit what the attempt came to.
    fn note_circuit(
        &self,
        key: &Key,
        admission: Admission,
        outcome: &Outcome,
        settings: &CircuitSettings,
    ) {
        let mut circuits = self.shared.circuits.lock().expect("circuit lock");
        let change = match circuit_note(admission, outcome) {
            CircuitNote::Success => circuits.success(key),
            CircuitNote::Failure { probe, cause } => {
                circuits.failure(key, Instant::now(), settings, probe, cause)
            }
            CircuitNote::Neutral => {
                circuits.neutral(key);
                None
            }
            CircuitNote::Nothing => None,
        };
        drop(circuits);
        if let Some(change) = change {
            if change.open {
                tracing::warn!(account = %key.0, r#type = %key.1, cooldown = ?settings.cooldown, "circuit opened");
            } else {
                tracing::info!(account = %key.0, r#type = %key.1, "circuit closed");
            }
            self.shared
                .metrics
                .set_circuit_open(&key.0, key.1, change.open);
        }
    }

    /// Carries out the step that ends a batch's immediate stage.
    async fn finish(self: &Arc<Self>, batch: Batch, step: Step, destination: &str) {
        let Batch {
            live,
            account,
            kind,
            limits,
            items,
            destination: slots,
        } = batch;
        let metrics = &self.shared.metrics;
        match step {
            Step::Ack => {
                let now = SystemTime::now();
                for item in &items {
                    metrics
                        .delivery_lag(kind, now.duration_since(item.lag_from).unwrap_or_default());
                }
                metrics.events_delivered(&account.id, kind, items.len());
                // Boxed, like every settlement below: a delivery task waits for its slots
                // with this future inside it, and the settlements' futures (a confirmed
                // publish, the parking log) are large (docs/design.md, "Memory").
                Box::pin(self.settle.delivered(items)).await;
            }
            Step::Split { status } => {
                // Isolate the rejected events: each half is a batch of its own.
                let mut first = items;
                let second = first.split_off(first.len() / 2);
                tracing::info!(account = %account.id, r#type = %kind, status, events = first.len() + second.len(), "batch rejected; splitting");
                for half in [first, second] {
                    metrics.batch_split(&account.id, kind);
                    let batch = Batch {
                        live: live.clone(),
                        account: account.clone(),
                        kind,
                        limits,
                        items: half,
                        destination: slots.clone(),
                    };
                    if self.settle.is_ordered() {
                        // Per-record ordering: the first half first (docs/ordering.md).
                        Box::pin(deliver(self.clone(), batch)).await;
                    } else {
                        spawn(self, batch);
                    }
                }
            }
            Step::Reject { status } => {
                let dead = DeadLetter {
                    reason: format!("rejected_{status}"),
                    account: account.id.to_string(),
                    kind: kind.as_str().to_owned(),
                    status: Some(status),
                    error: format!("HTTP {status}: the receiver rejected the event"),
                    destination: Some(destination.to_owned()),
                };
                let mut ids = Vec::new();
                for item in items {
                    let id = item.id.clone();
                    if Box::pin(self.settle.dead_letter(item, &dead)).await {
                        ids.push(id);
                    }
                }
                self.log_dead_letters(&dead, &ids);
            }
            Step::Schedule(failure) => {
                let retry = &live.settings.retry;
                let scheduled = Box::pin(self.settle.schedule(
                    items,
                    &failure,
                    destination,
                    retry,
                    (&account.id, kind),
                ))
                .await;
                for (delay, events) in &scheduled.tiers {
                    let tier = humantime::format_duration(*delay);
                    tracing::info!(account = %account.id, r#type = %kind, events, %tier, status = failure.status, error = %failure.error, %destination, "scheduled retry");
                }
                if !scheduled.exhausted.is_empty() {
                    let dead = DeadLetter {
                        reason: "retries_exhausted".into(),
                        account: account.id.to_string(),
                        kind: kind.as_str().to_owned(),
                        status: failure.status,
                        error: failure.error,
                        destination: Some(destination.to_owned()),
                    };
                    self.log_dead_letters(&dead, &scheduled.exhausted);
                }
            }
            Step::Wait(_) => unreachable!("waiting is the delivery loop's"),
        }
    }
}

impl Context {
    /// Logs dead-letterings at warn: the first of its account, type and reason in an
    /// interval with its cause, the rest summarised ([`DeadLetterLog`]).
    fn log_dead_letters(&self, dead: &DeadLetter, ids: &[String]) {
        if ids.is_empty() {
            return;
        }
        let group = (dead.account.clone(), dead.kind.clone(), dead.reason.clone());
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let now = self
            .shared
            .dead_log
            .lock()
            .expect("dead-letter log lock")
            .note(group, &refs, Instant::now());
        if now {
            let sample = refs.iter().take(3).copied().collect::<Vec<_>>().join(", ");
            tracing::warn!(account = %dead.account, r#type = %dead.kind, reason = %dead.reason, events = ids.len(), status = dead.status, error = %dead.error, destination = dead.destination.as_deref().unwrap_or("-"), ids = %sample, "dead-lettered; more of this account, type and reason are summarised every {:?}", super::warnings::INTERVAL);
        }
    }
}

/// A probe that never reports (its session ended while it was out) would leave the
/// circuit waiting for it for ever: if dropped armed, the probe counts as neutral and the
/// next batch probes again.
struct ProbeGuard<'a> {
    shared: &'a Deliveries,
    key: &'a Key,
    armed: bool,
}

impl<'a> ProbeGuard<'a> {
    fn new(shared: &'a Deliveries, key: &'a Key, admission: Admission) -> Self {
        Self {
            shared,
            key,
            armed: admission == Admission::Probe,
        }
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if self.armed
            && let Ok(mut circuits) = self.shared.circuits.lock()
        {
            circuits.neutral(self.key);
        }
    }
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}
