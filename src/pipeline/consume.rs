//! The consumer loop: takes deliveries, parses and routes them, accumulates batches, and
//! hands flushed batches to delivery tasks. It also applies reloads and decides when to
//! flush (size, bytes, interval, a full window, shutdown; docs/design.md, "Batching").
//!
//! With per-record ordering (docs/ordering.md) it consumes the shards: it asks
//! [`Records`] whether each event is batched, held or parked, hears from settling what
//! became of each ordered event, and reads a shard's parking log when it receives the
//! shard's first message (it has just become the shard's active consumer).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Key;
use super::batch::{Accumulator, FlushReason, Flushed, Limits};
use super::deliver::{self, Batch, Context};
use super::order::{Admit, RecordKey, Records, shard_of};
use super::reload::{self, Live};
use super::session::Session;
use super::settle::{DeadLetter, OrderTag, Pending, Resolved, UNKNOWN_ACCOUNT};
use super::warnings::{Kind, Warnings};
use crate::broker::headers::{Carried, Trail};
use crate::broker::parking::{self, Op, ParkingLog};
use crate::config::{Account, Settings};
use crate::event;

/// What the consumer keeps from one session to the next.
pub struct Intake {
    /// What new batches are formed under; replaced on reload.
    pub live: Arc<Live>,
    pub reloads: watch::Receiver<Arc<Settings>>,
    /// Requests in flight per destination.
    pub destinations: HashMap<Key, Arc<Semaphore>>,
    /// Warnings about bad input, summarised.
    pub warnings: Warnings,
}

/// Why the consumer loop ended.
pub enum Ended {
    /// Shutdown: `flushed` open batches were sent at once.
    Shutdown {
        flushed: usize,
    },
    Lost(String),
}

type Open = Accumulator<Key, (Arc<Live>, Arc<Account>), Pending>;
type Flush = Flushed<Key, (Arc<Live>, Arc<Account>), Pending>;

/// A routed event on its way into a batch.
type Routed = (Key, Arc<Account>, Pending);

/// Per-record ordering in one session (docs/ordering.md).
pub struct Ordered {
    records: Records<Routed>,
    /// What became of the events of ordered batches.
    resolved: mpsc::UnboundedReceiver<Resolved>,
    /// Followers to park, in order: one task republishes them one after the other.
    parks: Option<mpsc::UnboundedSender<(Pending, Duration)>>,
    /// Shards whose parking log was read in this session.
    active: HashSet<u16>,
    log: ParkingLog,
}

impl Ordered {
    pub fn new(resolved: mpsc::UnboundedReceiver<Resolved>, log: ParkingLog) -> Self {
        Self {
            records: Records::default(),
            resolved,
            parks: None,
            active: HashSet::new(),
            log,
        }
    }
}

/// How far back the parking log is read: the longest a record can wait in the tiers
/// (`retry.max_age` and the largest tier) and an hour.
fn log_horizon(settings: &Settings) -> Duration {
    let largest = settings
        .retry
        .schedule
        .iter()
        .max()
        .copied()
        .unwrap_or_default();
    settings.retry.max_age + largest + Duration::from_secs(3600)
}

/// Consumes `session` until shutdown or until the connection is lost. On shutdown every
/// open batch is flushed; on a lost connection they are dropped with their channel (the
/// broker redelivers them).
pub async fn consume(
    intake: &mut Intake,
    session: &mut Session,
    cx: &Arc<Context>,
    shutdown: &CancellationToken,
    mut ordered: Option<Ordered>,
) -> Ended {
    let prefetch = intake.live.settings.broker.prefetch as usize;
    let mut open = Open::default();
    if let Some(o) = ordered.as_mut() {
        let (parks, mut queue) = mpsc::unbounded_channel::<(Pending, Duration)>();
        let settle = cx.settle.clone();
        cx.tasks.spawn(async move {
            while let Some((item, tier)) = queue.recv().await {
                settle.park(item, tier).await;
            }
        });
        o.parks = Some(parks);
    }
    let ended = loop {
        let resolved = async {
            match ordered.as_mut() {
                Some(o) => o.resolved.recv().await,
                None => std::future::pending().await,
            }
        };
        let deadline = [open.next_deadline(), intake.warnings.next_deadline()]
            .into_iter()
            .flatten()
            .min();
        let due = async {
            match deadline {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                let mut flushed = 0;
                open.drain(FlushReason::Shutdown, |f| {
                    flushed += 1;
                    dispatch(cx, &mut intake.destinations, f)
                });
                break Ended::Shutdown { flushed };
            }
            Ok(()) = intake.reloads.changed() => reloaded(intake, cx),
            Some(resolved) = resolved => {
                let o = ordered.as_mut().expect("only ordered batches resolve");
                let now = SystemTime::now();
                for routed in o.records.resolve(&resolved.record, &resolved.id, resolved.fate, now) {
                    admit(intake, &mut open, cx, o, routed);
                }
                cx.shared.metrics.set_parked_records(o.records.parked());
            }
            _ = due => {
                let now = Instant::now();
                open.expired(now, |f| dispatch(cx, &mut intake.destinations, f));
                intake.warnings.due(now).iter().for_each(|line| line.log());
            }
            next = session.consumer.next() => {
                let delivery = match next {
                    Some(Ok(delivery)) => delivery,
                    Some(Err(e)) => break Ended::Lost(e.to_string()),
                    None => break Ended::Lost("the consumer was cancelled".into()),
                };
                session.window.fetch_add(1, Ordering::SeqCst);
                match ordered.as_mut() {
                    Some(o) => {
                        let broker = &intake.live.settings.broker;
                        let shard = shard_of_queue(delivery.routing_key.as_str(), broker);
                        if let Some(shard) = shard
                            && o.active.insert(shard)
                        {
                            let horizon = log_horizon(&intake.live.settings);
                            rebuild(o, session, shard, horizon).await;
                        }
                        if let Some(routed) = route(&intake.live, cx, &mut intake.warnings, delivery, shard) {
                            admit(intake, &mut open, cx, o, routed);
                        }
                    }
                    None => accept(intake, &mut open, cx, delivery),
                }
                let window = session.window.load(Ordering::SeqCst);
                window_flush(intake, &mut open, cx, window, session.acks.low(), prefetch);
            }
        }
        cx.shared.metrics.set_buffered(open.buffered());
    };
    if let Ended::Lost(_) = ended {
        let dropped = open.discard();
        tracing::debug!(dropped, "open batches dropped with their channel");
    }
    cx.shared.metrics.set_buffered(open.buffered());
    ended
}

/// Carries out [`window_rule`] after each delivery.
fn window_flush(
    intake: &mut Intake,
    open: &mut Open,
    cx: &Arc<Context>,
    window: usize,
    low: u64,
    prefetch: usize,
) {
    let state = Window {
        pipelined: intake.live.pipelined,
        prefetch,
        unacked: window,
        buffered: open.buffered(),
    };
    let mut emit = |f| dispatch(cx, &mut intake.destinations, f);
    // Looked up only when the rule asks: most deliveries end before it.
    let oldest_holds_low = || open.oldest().is_some_and(|(_, first)| first.tag <= low);
    match window_rule(&state, oldest_holds_low) {
        None => {}
        Some(WindowFlush::All) => open.drain(FlushReason::Window, emit),
        Some(WindowFlush::Fullest { keep }) => open.flush_fullest(FlushReason::Window, keep, emit),
        Some(WindowFlush::Oldest) => {
            if let Some((key, _)) = open.oldest() {
                let key = key.clone();
                open.flush(&key, FlushReason::Window, &mut emit);
            }
        }
    }
}

/// The prefetch window as the consumer sees it after a delivery.
#[derive(Debug, Clone, Copy)]
struct Window {
    /// The window holds at least two of the largest batches.
    pipelined: bool,
    prefetch: usize,
    /// Messages the broker holds unacknowledged for this channel.
    unacked: usize,
    /// Of those, events in open batches.
    buffered: usize,
}

/// What the window calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WindowFlush {
    /// Every open batch.
    All,
    /// The fullest, until at most `keep` events stay open.
    Fullest { keep: usize },
    /// The oldest open batch.
    Oldest,
}

/// Keeps the prefetch window moving (docs/design.md, "Early flush when the prefetch
/// window is full"):
/// - where the window holds fewer than two of the largest batches, a full window flushes
///   every open batch;
/// - else open batches may hold at most half the window: past that, the fullest are
///   flushed until a quarter is left, so the broker keeps sending while they are
///   delivered and the rest go on filling;
/// - a full window (no new message can arrive) halves what is open, the fullest first;
/// - from three quarters of a window, an open batch that holds the oldest unsettled
///   message is flushed: the settled messages behind it can be acknowledged only after
///   it, and they fill the window meanwhile.
///
/// `oldest_holds_low`: whether the oldest open batch holds the oldest unsettled message
/// (no ack can pass it).
fn window_rule(w: &Window, oldest_holds_low: impl FnOnce() -> bool) -> Option<WindowFlush> {
    if w.buffered == 0 {
        None
    } else if !w.pipelined {
        (w.unacked >= w.prefetch).then_some(WindowFlush::All)
    } else if w.buffered >= w.prefetch.div_ceil(2) {
        Some(WindowFlush::Fullest {
            keep: w.prefetch / 4,
        })
    } else if w.unacked >= w.prefetch {
        Some(WindowFlush::Fullest {
            keep: w.buffered / 2,
        })
    } else if 4 * w.unacked >= 3 * w.prefetch && oldest_holds_low() {
        Some(WindowFlush::Oldest)
    } else {
        None
    }
}

/// Applies a reloaded configuration to batches formed from now on.
fn reloaded(intake: &mut Intake, cx: &Context) {
    let settings = intake.reloads.borrow_and_update().clone();
    cx.shared.reset_circuits(&reload::moved_destinations(
        &intake.live.settings,
        &settings,
    ));
    match intake.live.reloaded(settings) {
        Ok((live, reset_destinations)) => {
            if reset_destinations {
                intake.destinations.clear();
            }
            intake.live = Arc::new(live);
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot build the HTTP client of the new configuration");
        }
    }
}

/// Routes one delivery into its open batch, or settles it at once.
fn accept(
    intake: &mut Intake,
    open: &mut Open,
    cx: &Arc<Context>,
    delivery: lapin::message::Delivery,
) {
    let Intake {
        live,
        destinations,
        warnings,
        ..
    } = intake;
    let Some(routed) = route(live, cx, warnings, delivery, None) else {
        return;
    };
    batch_in(live, destinations, open, cx, routed);
}

/// Puts a routed event into its open batch.
fn batch_in(
    live: &Arc<Live>,
    destinations: &mut HashMap<Key, Arc<Semaphore>>,
    open: &mut Open,
    cx: &Arc<Context>,
    (key, account, pending): Routed,
) {
    let limits = Limits {
        batch_size: account.batch_size,
        max_body_bytes: live.settings.delivery.max_body_bytes,
        flush_interval: account.flush_interval,
    };
    let len = pending.body.len();
    let ctx = || ((live.clone(), account), limits);
    open.push(&key, pending, len, Instant::now(), ctx, |f| {
        dispatch(cx, destinations, f)
    });
}

/// Per-record ordering: batches an event, holds it, or parks it behind its record's head
/// ([`Records::admit`]).
fn admit(
    intake: &mut Intake,
    open: &mut Open,
    cx: &Arc<Context>,
    o: &mut Ordered,
    mut routed: Routed,
) {
    let tag = routed
        .2
        .order
        .as_mut()
        .expect("events of a shard carry their record");
    let (admit, dropped) = o
        .records
        .admit(tag.shard, &tag.record, &routed.2.id, SystemTime::now());
    for id in dropped {
        tracing::warn!(shard = tag.shard, account = %tag.record.account, r#type = %tag.record.kind, %id, "a parked event did not come back in time; its record goes on without waiting for it");
    }
    match admit {
        Admit::Batch { head } => {
            tag.head = head;
            batch_in(&intake.live, &mut intake.destinations, open, cx, routed);
        }
        Admit::Hold => {
            let record = tag.record.clone();
            o.records.hold(record, routed);
        }
        Admit::Park { tier, .. } => {
            if let Some(parks) = &o.parks {
                let _ = parks.send((routed.2, tier));
            }
        }
    }
    cx.shared.metrics.set_parked_records(o.records.parked());
}

/// Reads `shard`'s parking log when this session receives its first event from it: the
/// replica has just become its active consumer (docs/ordering.md, "The parking log").
async fn rebuild(o: &mut Ordered, session: &Session, shard: u16, horizon: Duration) {
    let since = SystemTime::now() - horizon;
    let limit = Duration::from_secs(60);
    let entries = match o
        .log
        .read_shard(session.connection(), shard, since, limit)
        .await
    {
        Ok(entries) => entries,
        Err(e) => {
            tracing::warn!(error = %e, shard, "cannot read the parking log; going on with no record parked on this shard");
            Vec::new()
        }
    };
    let ops = entries.iter().filter_map(|e| {
        let record = RecordKey {
            account: e.account.clone(),
            kind: event::RecordType::parse(&e.kind)?,
            record_id: e.record_id.clone(),
        };
        Some(match e.op {
            Op::Park => super::order::LogOp::Park {
                record,
                id: &e.id,
                tier: Duration::from_millis(e.tier_ms),
                at: parking::time(e.at),
            },
            Op::Release => super::order::LogOp::Release { record, id: &e.id },
            Op::Marker => return None,
        })
    });
    o.records.rebuild(shard, ops);
    tracing::info!(
        shard,
        entries = entries.len(),
        parked = o.records.parked(),
        "active on a shard; parked records read from the parking log"
    );
}

/// The shard of a delivery, from the shard queue it came from.
fn shard_of_queue(routing_key: &str, broker: &crate::config::BrokerSettings) -> Option<u16> {
    routing_key
        .strip_prefix(broker.queue_prefix.as_str())?
        .strip_prefix(".deliver.")?
        .parse()
        .ok()
}

/// Starts the delivery task of a flushed batch.
fn dispatch(cx: &Arc<Context>, destinations: &mut HashMap<Key, Arc<Semaphore>>, flushed: Flush) {
    let (live, account) = flushed.ctx;
    let limit = live.settings.delivery.max_inflight_per_destination;
    let destination = destinations
        .entry(flushed.key.clone())
        .or_insert_with(|| Arc::new(Semaphore::new(limit)))
        .clone();
    cx.shared
        .metrics
        .batch_flushed(&flushed.key.0, flushed.key.1, flushed.reason);
    let batch = Batch {
        live,
        account,
        kind: flushed.key.1,
        limits: flushed.limits,
        items: flushed.items,
        destination,
    };
    deliver::spawn(cx, batch);
}

/// Parses one delivery. Returns the event to batch, or settles it here (skip) or in a
/// task of its own (dead letter). `shard`: the shard queue it came from, with per-record
/// ordering.
fn route(
    live: &Live,
    cx: &Arc<Context>,
    warnings: &mut Warnings,
    delivery: lapin::message::Delivery,
    shard: Option<u16>,
) -> Option<(Key, Arc<Account>, Pending)> {
    let settings = &live.settings;
    let lapin::message::Delivery {
        delivery_tag: tag,
        exchange,
        data,
        properties,
        ..
    } = delivery;
    let trail = Trail::of_delivery(exchange.as_str(), &properties);
    let first_seen = trail.first_seen.unwrap_or_else(SystemTime::now);
    let parsed = event::parse(&data, settings.broker.max_event_bytes).map(|e| {
        (
            e.id.into_owned(),
            e.account.into_owned(),
            e.kind,
            e.occurred_at,
            e.record_id.into_owned(),
        )
    });
    // Read before the body moves into its `Pending`, and only for an invalid event.
    let labels = parsed.is_err().then(|| invalid_labels(&data, settings));
    let carried = Carried::new(properties);
    let pending = |id: String, lag_from, carried| Pending {
        body: data.into(),
        id,
        lag_from,
        first_seen,
        consumed_at: Instant::now(),
        carried,
        trail,
        tag,
        order: None,
    };
    let (id, account_id, kind, occurred_at, record_id) = match parsed {
        Ok(parsed) => parsed,
        Err(invalid) => {
            // What a warning about an invalid event may show of it.
            let label = match carried.properties().message_id() {
                Some(id) => id.to_string(),
                None => format!("(delivery {tag})"),
            };
            let line = warnings.note(Kind::InvalidEvent, &label, &invalid.0, Instant::now());
            line.iter().for_each(|line| line.log());
            let (account, kind) = labels.expect("labels are read for an invalid event");
            let dead = dead_letter("invalid_event", &account, kind, invalid.0);
            spawn_dead_letter(cx, pending(String::new(), first_seen, carried), dead);
            return None;
        }
    };
    let lag_from = occurred_at.map(SystemTime::from).unwrap_or(first_seen);
    let item = pending(id, lag_from, carried);
    let Some(account) = settings.accounts.get(&account_id) else {
        let error = format!("account {account_id:?} is not configured");
        let line = warnings.note(Kind::UnknownAccount, &item.id, &error, Instant::now());
        line.iter().for_each(|line| line.log());
        let dead = dead_letter("unknown_account", UNKNOWN_ACCOUNT, kind.as_str(), error);
        spawn_dead_letter(cx, item, dead);
        return None;
    };
    cx.shared.metrics.event_consumed(&account.id, kind);
    if account.url(kind).is_none() {
        cx.shared
            .metrics
            .event_skipped(&account.id, kind, "contacts_disabled");
        cx.settle.skipped(item);
        return None;
    }
    let mut item = item;
    if settings.broker.per_record {
        let broker = &settings.broker;
        let shard = shard
            .unwrap_or_else(|| shard_of(&account.id, kind.as_str(), &record_id, broker.shards));
        item.order = Some(OrderTag {
            shard,
            record: RecordKey {
                account: account.id.to_string(),
                kind,
                record_id,
            },
            head: false,
        });
    }
    Some(((account.id.clone(), kind), account.clone(), item))
}

/// The metric labels of an invalid event: its account if the body names a configured
/// one, its type if valid; `(unknown)` otherwise (labels only take configured values).
fn invalid_labels(data: &[u8], settings: &Settings) -> (String, &'static str) {
    #[derive(serde::Deserialize)]
    struct Named<'a> {
        #[serde(borrow)]
        account: Option<std::borrow::Cow<'a, str>>,
        #[serde(rename = "type", borrow)]
        kind: Option<std::borrow::Cow<'a, str>>,
    }
    let named = serde_json::from_slice::<Named>(data).ok();
    let account = named
        .as_ref()
        .and_then(|n| n.account.as_deref())
        .and_then(|id| settings.accounts.get(id))
        .map(|a| a.id.to_string());
    let kind = named
        .as_ref()
        .and_then(|n| n.kind.as_deref())
        .and_then(event::RecordType::parse)
        .map(event::RecordType::as_str);
    (
        account.unwrap_or_else(|| UNKNOWN_ACCOUNT.to_owned()),
        kind.unwrap_or(UNKNOWN_ACCOUNT),
    )
}

fn dead_letter(reason: &str, account: &str, kind: &str, error: String) -> DeadLetter {
    DeadLetter {
        reason: reason.to_owned(),
        account: account.to_owned(),
        kind: kind.to_owned(),
        status: None,
        error,
        destination: None,
    }
}

fn spawn_dead_letter(cx: &Arc<Context>, item: Pending, dead: DeadLetter) {
    let settle = cx.settle.clone();
    cx.tasks.spawn(async move {
        settle.dead_letter(item, &dead).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(unacked: usize, buffered: usize, oldest_holds_low: bool) -> (Window, bool) {
        let window = Window {
            pipelined: true,
            prefetch: 1000,
            unacked,
            buffered,
        };
        (window, oldest_holds_low)
    }

    #[test]
    fn window_rules() {
        use WindowFlush::*;
        let small = Window {
            pipelined: false,
            ..window(1000, 300, true).0
        };
        let cases = [
            // (state, expected, why)
            (window(400, 0, true), None, "nothing open"),
            (window(400, 300, true), None, "room left, batches filling"),
            (
                window(900, 499, false),
                None,
                "three quarters, the oldest is in flight",
            ),
            (window(749, 300, true), None, "below three quarters"),
            (
                window(750, 300, true),
                Some(Oldest),
                "the oldest open batch holds the acks",
            ),
            (
                window(600, 500, false),
                Some(Fullest { keep: 250 }),
                "half the window open",
            ),
            (
                window(1000, 300, false),
                Some(Fullest { keep: 150 }),
                "full: halve",
            ),
            (
                window(1000, 300, true),
                Some(Fullest { keep: 150 }),
                "full comes first",
            ),
            (
                (small, true),
                Some(All),
                "a small window: everything when full",
            ),
            (
                (
                    Window {
                        unacked: 999,
                        ..small
                    },
                    true,
                ),
                None,
                "a small window not yet full",
            ),
        ];
        for ((state, holds), expected, why) in cases {
            let rule = window_rule(&state, || holds);
            assert_eq!(rule, expected, "{why}: {state:?}, oldest holds: {holds}");
        }
    }
}
