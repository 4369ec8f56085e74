//! Settling: the only code that acknowledges, returns or republishes a consumed message.
//!
//! A message is acknowledged only when its effect is durable: delivered with a 2xx,
//! skipped by configuration, or confirmed into a retry tier or the dead-letter queue.
//! [`Pending`] is moved into every settling call, so a message is settled at most once.
//! A [`Settler`] belongs to one broker session: once that session has ended it settles
//! nothing, and what it held returns through the broker.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::future::join_all;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use tokio::sync::mpsc;

use super::decide::{Failure, MAX_HOLD, Next, next_tier};
use super::order::{Fate, RecordKey};
use crate::broker::Publisher;
use crate::broker::acks::Acks;
use crate::broker::headers::{Carried, Trail, republish_properties};
use crate::broker::parking::{self, Entry, Op, ParkingLog};
use crate::broker::publish::PUBLISH_TIMEOUT;
use crate::config::{BrokerSettings, RetrySettings};
use crate::event::RecordType;
use crate::metrics::Metrics;

/// One consumed event on its way to a receiver.
pub struct Pending {
    pub body: Bytes,
    pub id: String,
    /// `occurred_at`, else first seen: the start of the delivery lag.
    pub lag_from: SystemTime,
    /// When courier first consumed this event (this time or before a retry).
    pub first_seen: SystemTime,
    /// When this delivery arrived: how long it has been held unacknowledged.
    pub consumed_at: Instant,
    /// The message's properties, where a copy would carry something of them.
    pub carried: Carried,
    /// What courier recorded on it before, if it put it back itself.
    pub trail: Trail,
    /// The delivery tag on its channel.
    pub tag: u64,
    /// Its record and shard, with per-record ordering.
    pub order: Option<OrderTag>,
}

/// Where an event stands in per-record ordering (docs/ordering.md).
#[derive(Debug, Clone)]
pub struct OrderTag {
    pub shard: u16,
    pub record: RecordKey,
    /// It is the head of its parked record: its delivery releases the next.
    pub head: bool,
}

/// What became of an event of an ordered batch, for the consumer loop.
#[derive(Debug)]
pub struct Resolved {
    pub record: RecordKey,
    pub id: String,
    pub fate: Fate,
}

/// What settling needs for per-record ordering: where to report fates, and the parking
/// log, written before each park or release is acknowledged.
pub struct Ordered {
    pub resolved: mpsc::UnboundedSender<Resolved>,
    pub log: ParkingLog,
}

/// Where the events of a batch went when they left the immediate stage.
#[derive(Debug, Default)]
pub struct Scheduled {
    /// Events confirmed into each retry tier, by the tier's delay.
    pub tiers: BTreeMap<Duration, usize>,
    /// Ids of the events confirmed into the dead-letter queue as `retries_exhausted`.
    pub exhausted: Vec<String>,
}

/// Why an event goes to the dead-letter queue, with what its headers will say.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    /// `x-courier-reason`.
    pub reason: String,
    /// The metric labels: a configured account (or `(unknown)`) and the record type.
    pub account: String,
    pub kind: String,
    pub status: Option<u16>,
    pub error: String,
    /// Scheme, host and port of the destination, if one was tried.
    pub destination: Option<String>,
}

/// The account label of events whose account is not configured: metric labels only ever
/// take configured values.
pub const UNKNOWN_ACCOUNT: &str = "(unknown)";

/// Publishes of one republish before its original goes back to the queue: a short
/// outage of the target queue is ridden out without spending one of the event's
/// deliveries (docs/operations.md, "When the broker blocks publishers").
const REPUBLISH_TRIES: u32 = 4;

/// The wait after a republish's first failed publish; it doubles after each.
const REPUBLISH_BACKOFF: Duration = Duration::from_millis(300);

/// By when a republish must be done: the hold limit of its message ([`MAX_HOLD`] after
/// it was consumed, well clear of the broker's `consumer_timeout`), or one
/// [`PUBLISH_TIMEOUT`] from now if that is later, so that a message whose immediate
/// attempts used up the hold still gets one publish.
fn republish_deadline(consumed_at: Instant, now: Instant) -> Instant {
    (consumed_at + MAX_HOLD).max(now + PUBLISH_TIMEOUT)
}

/// Settles the messages of one broker session.
#[derive(Clone)]
pub struct Settler {
    acks: Acks,
    publisher: Arc<Publisher>,
    broker: Arc<BrokerSettings>,
    metrics: Arc<Metrics>,
    /// Cancelled when the session ends.
    session: CancellationToken,
    /// With per-record ordering.
    ordered: Option<Arc<Ordered>>,
}

impl Settler {
    pub fn new(
        acks: Acks,
        publisher: Arc<Publisher>,
        broker: Arc<BrokerSettings>,
        metrics: Arc<Metrics>,
        session: CancellationToken,
        ordered: Option<Arc<Ordered>>,
    ) -> Self {
        Self {
            acks,
            publisher,
            broker,
            metrics,
            session,
            ordered,
        }
    }

    /// Whether events keep their order per record.
    pub fn is_ordered(&self) -> bool {
        self.ordered.is_some()
    }

    /// Acknowledges events delivered with a 2xx (after logging the release of those that
    /// headed a parked record).
    pub async fn delivered(&self, items: Vec<Pending>) {
        let ordered = self.is_ordered();
        if ordered {
            for item in items
                .iter()
                .filter(|i| i.order.as_ref().is_some_and(|o| o.head))
            {
                self.log(item, Op::Release, None).await;
            }
        }
        self.ack(items.iter().map(|item| item.tag).collect());
        if ordered {
            for item in &items {
                self.report(item, Fate::Done);
            }
        }
    }

    /// Tells the consumer loop what became of an ordered event.
    fn report(&self, item: &Pending, fate: Fate) {
        if let (Some(ordered), Some(tag)) = (&self.ordered, &item.order) {
            let _ = ordered.resolved.send(Resolved {
                record: tag.record.clone(),
                id: item.id.clone(),
                fate,
            });
        }
    }

    /// Appends a park or release of an ordered event to the parking log. A failure is
    /// logged and the settlement goes on: the record's order holds in this replica, and
    /// one that takes the shard over waits at most until the overdue limit for the event
    /// (docs/ordering.md, "The parking log").
    async fn log(&self, item: &Pending, op: Op, tier: Option<Duration>) {
        let (Some(ordered), Some(tag)) = (&self.ordered, &item.order) else {
            return;
        };
        let entry = Entry {
            shard: tag.shard,
            op,
            id: item.id.clone(),
            account: tag.record.account.clone(),
            kind: tag.record.kind.as_str().to_owned(),
            record_id: tag.record.record_id.clone(),
            tier_ms: tier.map_or(0, |t| t.as_millis() as u64),
            at: parking::millis(SystemTime::now()),
        };
        if let Err(e) = ordered.log.append(&entry).await {
            tracing::warn!(error = %e, shard = tag.shard, id = %item.id, ?op, "cannot append to the parking log");
        }
    }

    /// Parks an event behind the head of its record: republishes it to the head's tier
    /// with its own trail, marked parked, then acks it. Returns whether it was parked.
    pub async fn park(&self, item: Pending, tier: Duration) -> bool {
        let trail = Trail {
            first_seen: Some(item.first_seen),
            parked: true,
            ..item.trail.clone()
        };
        let queue = self.broker.retry_queue(tier);
        self.republish(item, &queue, &trail, Some((Op::Park, tier)))
            .await
    }

    /// Acknowledges an event the account chose not to receive.
    pub fn skipped(&self, item: Pending) {
        self.ack(vec![item.tag]);
    }

    fn ack(&self, tags: Vec<u64>) {
        if !self.session.is_cancelled() {
            self.acks.ack(tags);
        }
    }

    /// Sends each event to its next scheduled tier, or dead-letters it as
    /// `retries_exhausted` when its retries are used up. Returns where they went (those
    /// whose republish failed went back to the queue and are not counted).
    pub async fn schedule(
        &self,
        items: Vec<Pending>,
        failure: &Failure,
        destination: &str,
        retry: &RetrySettings,
        (account, kind): (&str, RecordType),
    ) -> Scheduled {
        enum Went {
            Tier(Duration),
            Exhausted(String),
            Back,
        }
        let went = join_all(items.into_iter().map(|item| async move {
            let now = SystemTime::now();
            let retries = item.trail.retries.unwrap_or(0).max(0) as usize;
            let first_failure = item.trail.first_failure.unwrap_or(now);
            let next = next_tier(
                &retry.schedule,
                retries,
                failure.retry_after,
                first_failure,
                now,
                retry.max_age,
            );
            match next {
                Next::Exhausted => {
                    let dead = DeadLetter {
                        reason: "retries_exhausted".into(),
                        account: account.to_owned(),
                        kind: kind.as_str().to_owned(),
                        status: failure.status,
                        error: failure.error.clone(),
                        destination: Some(destination.to_owned()),
                    };
                    let id = item.id.clone();
                    if self.dead_letter(item, &dead).await {
                        return Went::Exhausted(id);
                    }
                }
                Next::Tier { index, retries } => {
                    let trail = Trail {
                        retries: Some(retries as i64),
                        first_failure: Some(first_failure),
                        first_seen: Some(item.first_seen),
                        last_error: Some(failure.error.clone()),
                        ..Trail::default()
                    };
                    let delay = retry.schedule[index];
                    let queue = self.broker.retry_queue(delay);
                    if self
                        .republish(item, &queue, &trail, Some((Op::Park, delay)))
                        .await
                    {
                        self.metrics.events_retried(account, kind, "scheduled", 1);
                        return Went::Tier(delay);
                    }
                }
            }
            Went::Back
        }))
        .await;
        let mut scheduled = Scheduled::default();
        for went in went {
            match went {
                Went::Tier(delay) => *scheduled.tiers.entry(delay).or_default() += 1,
                Went::Exhausted(id) => scheduled.exhausted.push(id),
                Went::Back => {}
            }
        }
        scheduled
    }

    /// Republishes one event to the dead-letter queue, then acks its original. Returns
    /// whether it was dead-lettered (else it went back to the queue).
    pub async fn dead_letter(&self, item: Pending, dead: &DeadLetter) -> bool {
        let now = SystemTime::now();
        let trail = Trail {
            retries: Some(item.trail.retries.unwrap_or(0)),
            first_failure: Some(item.trail.first_failure.unwrap_or(now)),
            first_seen: Some(item.first_seen),
            last_error: Some(dead.error.clone()),
            reason: Some(dead.reason.clone()),
            last_status: dead.status,
            dead_at: Some(now),
            destination: dead.destination.clone(),
            parked: false,
        };
        let release = item
            .order
            .as_ref()
            .is_some_and(|o| o.head)
            .then_some((Op::Release, Duration::ZERO));
        let published = self
            .republish(item, &self.broker.dead_queue(), &trail, release)
            .await;
        if published {
            self.metrics
                .event_dead_lettered(&dead.account, &dead.kind, &dead.reason);
        }
        published
    }

    /// Publishes a copy of `item` to `queue` (confirmed, mandatory) with `trail`, then
    /// acks the original. A failed publish is tried again after a backoff, a few times
    /// and never past the message's hold limit (a broker blocking publishers holds one
    /// publish until then); only then does the original go back to the queue (nack with
    /// requeue), so nothing is lost. Returns whether it was published.
    ///
    /// With per-record ordering, `log` is appended to the parking log between the publish
    /// and the ack, and the consumer loop is told where the event went (a parked
    /// follower's place is the loop's own already).
    async fn republish(
        &self,
        item: Pending,
        queue: &str,
        trail: &Trail,
        log: Option<(Op, Duration)>,
    ) -> bool {
        if self.session.is_cancelled() {
            return false;
        }
        let original = item.carried.properties();
        let headers = trail.write(original.headers().as_ref());
        let properties = republish_properties(original, headers);
        let deadline = republish_deadline(item.consumed_at, Instant::now());
        let mut delay = REPUBLISH_BACKOFF;
        let mut tries = 1;
        let published = loop {
            let published = self
                .publisher
                .publish_before("", queue, &item.body, properties.clone(), deadline)
                .await;
            match published {
                Err(e) if tries < REPUBLISH_TRIES && Instant::now() + delay < deadline => {
                    tracing::debug!(error = %e, %queue, tries, retry_in = ?delay, "republishing failed; trying again");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                    tries += 1;
                }
                published => break published,
            }
        };
        if self.session.is_cancelled() {
            // The channel of the original is gone: the broker returns it.
            return published.is_ok();
        }
        let fate = match (&published, log) {
            (Err(_), _) => Fate::Back,
            (Ok(()), Some((Op::Park, tier))) => Fate::Tier(tier),
            (Ok(()), _) => Fate::Done,
        };
        if let (Ok(()), Some((op, tier))) = (&published, log) {
            self.log(&item, op, Some(tier).filter(|_| op == Op::Park))
                .await;
        }
        if !trail.parked {
            self.report(&item, fate);
        }
        match published {
            Ok(()) => {
                self.acks.ack(vec![item.tag]);
                true
            }
            Err(e) => {
                tracing::error!(error = %e, %queue, tries, "republishing failed; returning the message to the queue");
                self.acks.nack(item.tag);
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_republish_ends_at_the_hold_limit_or_after_one_publish_if_that_is_later() {
        let consumed = Instant::now();
        let soon = consumed + Duration::from_secs(5);
        assert_eq!(republish_deadline(consumed, soon), consumed + MAX_HOLD);
        let late = consumed + MAX_HOLD;
        assert_eq!(republish_deadline(consumed, late), late + PUBLISH_TIMEOUT);
    }

    /// Every message of the prefetch window waits as a `Pending` (docs/design.md,
    /// "Memory"): what it holds besides its body stays small.
    #[test]
    fn a_waiting_event_stays_small() {
        let size = std::mem::size_of::<Pending>();
        assert!(size <= 336, "a Pending takes {size} bytes");
    }
}
