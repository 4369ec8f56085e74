//! `courier dlq list`, `show`, `replay` and `discard`: the dead-letter queue for
//! operators (docs/operations.md, "Dead letters").
//!
//! Each reads every message present when it starts, once, with manual acknowledgement.
//! `list` and `show` never ack, so every dead letter stays. `replay` republishes a
//! matching dead letter to the delivery queue, confirmed, and only then acks it;
//! `discard` acks the matching ones it was allowed to remove. What is not acked is given
//! back with `basic.nack` (requeue) when the command ends: a nack is not counted as a
//! failed delivery by RabbitMQ 4.3 and newer, where closing the channel or a reject
//! would be.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};

use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};

use crate::broker::headers::{PREFIX, Trail, broker_death_reason, republish_properties};
use crate::broker::{self, BrokerError, PublishError, Publisher};
use crate::config::Settings;

/// What `list` and `replay` know of one dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Letter {
    /// `x-courier-reason`, or the broker's reason from `x-death` (e.g. `delivery_limit`).
    pub reason: String,
    pub account: String,
    pub kind: String,
    pub id: String,
}

/// Reads a dead letter's reason and routing facts; `-` for what it does not say.
pub fn describe(body: &[u8], headers: Option<&FieldTable>) -> Letter {
    let reason = Trail::read(headers)
        .reason
        .or_else(|| broker_death_reason(headers))
        .unwrap_or_else(|| "unknown".into());
    #[derive(serde::Deserialize, Default)]
    struct Partial {
        id: Option<String>,
        account: Option<String>,
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    let partial: Partial = serde_json::from_slice(body).unwrap_or_default();
    let dash = || "-".to_owned();
    Letter {
        reason,
        account: partial.account.unwrap_or_else(dash),
        kind: partial.kind.unwrap_or_else(dash),
        id: partial.id.unwrap_or_else(dash),
    }
}

/// The reasons a dead letter can have: courier's own, the broker's `delivery_limit`, and
/// `unknown` for a message that says none. Filters accept only these.
pub const REASONS: &[&str] = &[
    "retries_exhausted",
    "rejected_400",
    "rejected_413",
    "rejected_422",
    "invalid_event",
    "unknown_account",
    "delivery_limit",
    "unknown",
];

/// The reason of events that can only fail again: `replay` leaves them unless asked.
pub const INVALID_EVENT: &str = "invalid_event";

/// Which dead letters a command takes.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub account: Option<String>,
    pub kind: Option<String>,
    pub reason: Option<String>,
    pub limit: Option<usize>,
}

impl Filter {
    fn matches(&self, letter: &Letter) -> bool {
        let eq = |want: &Option<String>, got: &str| want.as_deref().is_none_or(|w| w == got);
        eq(&self.account, &letter.account)
            && eq(&self.kind, &letter.kind)
            && eq(&self.reason, &letter.reason)
    }

    fn full(&self, taken: usize) -> bool {
        self.limit.is_some_and(|limit| taken >= limit)
    }
}

/// Counts by (reason, account, type), with up to `samples` event ids each.
#[derive(Debug, Default)]
pub struct Listing {
    pub total: usize,
    pub groups: BTreeMap<(String, String, String), (usize, Vec<String>)>,
}

impl Listing {
    fn add(&mut self, letter: Letter, samples: usize) {
        self.total += 1;
        let group = self
            .groups
            .entry((letter.reason, letter.account, letter.kind))
            .or_default();
        group.0 += 1;
        if group.1.len() < samples {
            group.1.push(letter.id);
        }
    }

    /// The table `dlq list` prints.
    pub fn render(&self, queue: &str) -> String {
        self.table(format!("{queue}: {} dead letter(s)\n", self.total))
    }

    /// The groups as a table under `heading`.
    pub fn table(&self, heading: String) -> String {
        let mut out = heading;
        if self.total > 0 {
            out.push_str(&format!(
                "{:<20} {:<24} {:<8} {:>8}  samples\n",
                "reason", "account", "type", "count"
            ));
        }
        for ((reason, account, kind), (count, samples)) in &self.groups {
            out.push_str(&format!(
                "{reason:<20} {account:<24} {kind:<8} {count:>8}  {}\n",
                samples.join(", ")
            ));
        }
        out
    }
}

/// What `replay` did (or, with `dry_run`, would do).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    pub examined: usize,
    pub replayed: usize,
    /// `invalid_event` letters left in place because no `--reason` asked for them.
    pub invalid_left: usize,
}

/// What `show` found.
#[derive(Debug, Default)]
pub struct Shown {
    pub examined: usize,
    /// Matching dead letters, those shown included.
    pub matched: usize,
    /// Each shown letter, rendered.
    pub letters: Vec<String>,
}

/// What `discard` found and removed.
#[derive(Debug, Default)]
pub struct Discarded {
    pub examined: usize,
    /// The dead letters that matched (at most `--limit`).
    pub matched: Listing,
    pub removed: usize,
}

/// A DLQ failure.
#[derive(Debug, thiserror::Error)]
pub enum DlqError {
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("replay stopped after {replayed} message(s): {source}")]
    Publish {
        replayed: usize,
        #[source]
        source: PublishError,
    },
    #[error("discard stopped after {removed} message(s): {source}")]
    Discard {
        removed: usize,
        #[source]
        source: BrokerError,
    },
}

struct Reader {
    conn: Connection,
    channel: Channel,
    /// Messages in the queue when reading began: each is looked at once.
    count: usize,
    queue: String,
    progress: bool,
    /// Messages read so far.
    examined: usize,
    /// Delivery tags read and not acknowledged: given back at the end, up to the last
    /// (a `multiple` nack must name a tag still unacknowledged).
    unacked: BTreeSet<u64>,
}

impl Reader {
    async fn open(settings: &Settings, what: &str) -> Result<Self, BrokerError> {
        let queue = settings.broker.dead_queue();
        let conn = broker::connect(&settings.broker.urls, &format!("courier dlq {what}")).await?;
        let channel = conn
            .create_channel()
            .await
            .map_err(BrokerError::amqp("opening a channel"))?;
        let declared = channel
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .map_err(BrokerError::amqp(format!(
                "finding {queue} (has `courier setup` run?)"
            )))?;
        Ok(Self {
            conn,
            channel,
            count: declared.message_count() as usize,
            queue,
            progress: std::io::stderr().is_terminal(),
            examined: 0,
            unacked: BTreeSet::new(),
        })
    }

    /// The next dead letter, unacknowledged, and what it is; `None` once every message
    /// present at the start was read.
    async fn next(&mut self) -> Result<Option<(Letter, Delivery)>, BrokerError> {
        if self.examined >= self.count {
            return Ok(None);
        }
        let message = self
            .channel
            .basic_get(
                self.queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .map_err(BrokerError::amqp("reading the dead-letter queue"))?;
        let Some(message) = message else {
            return Ok(None);
        };
        let delivery = message.delivery;
        self.unacked.insert(delivery.delivery_tag);
        self.examined += 1;
        if self.progress && (self.examined.is_multiple_of(100) || self.examined == self.count) {
            eprint!("\rread {}/{}", self.examined, self.count);
            let _ = std::io::stderr().flush();
        }
        let letter = describe(&delivery.data, delivery.properties.headers().as_ref());
        Ok(Some((letter, delivery)))
    }

    /// Acknowledges one dead letter read: it leaves the queue.
    async fn ack(&mut self, tag: u64) -> Result<(), BrokerError> {
        self.channel
            .basic_ack(tag, BasicAckOptions::default())
            .await
            .map_err(BrokerError::amqp("acknowledging"))?;
        self.unacked.remove(&tag);
        Ok(())
    }

    /// Gives every unacknowledged dead letter back to the queue (one `basic.nack` with
    /// requeue, which RabbitMQ 4.3 and newer do not count as a failed delivery), then
    /// closes the connection; were the nack lost, closing returns them all the same.
    async fn close(self) {
        if self.progress {
            eprintln!();
        }
        if let Some(&tag) = self.unacked.last() {
            let options = BasicNackOptions {
                multiple: true,
                requeue: true,
            };
            let _ = self.channel.basic_nack(tag, options).await;
        }
        let _ = self.conn.close(200, "done".into()).await;
    }
}

/// `courier dlq list`.
pub async fn list(settings: &Settings, samples: usize) -> Result<Listing, BrokerError> {
    let mut reader = Reader::open(settings, "list").await?;
    let mut listing = Listing::default();
    while let Some((letter, _)) = reader.next().await? {
        listing.add(letter, samples);
    }
    reader.close().await;
    Ok(listing)
}

/// `courier dlq show`: every matching dead letter is counted, the first `limit` are
/// rendered; none is removed.
pub async fn show(settings: &Settings, filter: &Filter) -> Result<Shown, BrokerError> {
    let mut reader = Reader::open(settings, "show").await?;
    let mut shown = Shown::default();
    while let Some((letter, delivery)) = reader.next().await? {
        if !filter.matches(&letter) {
            continue;
        }
        shown.matched += 1;
        if !filter.full(shown.letters.len()) {
            let headers = delivery.properties.headers().as_ref();
            shown
                .letters
                .push(render_letter(&letter, headers, &delivery.data));
        }
    }
    shown.examined = reader.examined;
    reader.close().await;
    Ok(shown)
}

/// One dead letter as `show` prints it: what it is, every `x-courier-*` header, the
/// broker's `x-death` entries, the body.
pub fn render_letter(letter: &Letter, headers: Option<&FieldTable>, body: &[u8]) -> String {
    let mut out = format!(
        "--- id {} (account {}, type {}, reason {})\n",
        letter.id, letter.account, letter.kind, letter.reason
    );
    let table = headers.map(FieldTable::inner);
    for (name, value) in table.into_iter().flatten() {
        if name.as_str().starts_with(PREFIX) {
            out.push_str(&format!("{name}: {}\n", field(value)));
        }
    }
    let deaths = match table.and_then(|t| t.get("x-death")) {
        Some(AMQPValue::FieldArray(deaths)) => deaths.as_slice().to_vec(),
        _ => Vec::new(),
    };
    for death in deaths {
        let AMQPValue::FieldTable(death) = death else {
            continue;
        };
        let get = |key: &str| {
            death
                .inner()
                .get(key)
                .map(field)
                .unwrap_or_else(|| "-".into())
        };
        out.push_str(&format!(
            "x-death: reason {}, queue {}, count {}, time {}\n",
            get("reason"),
            get("queue"),
            get("count"),
            get("time")
        ));
    }
    out.push_str(&format!(
        "body ({} bytes):\n{}\n",
        body.len(),
        String::from_utf8_lossy(body)
    ));
    out
}

/// A header value as text.
fn field(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::Timestamp(t) => chrono::DateTime::from_timestamp(*t as i64, 0)
            .map(|t| t.to_rfc3339())
            .unwrap_or_else(|| t.to_string()),
        other => format!("{other:?}"),
    }
}

/// `courier dlq replay` (with `dry_run`, only counts what it would move). Without a
/// reason in the filter, `invalid_event` letters stay where they are and are counted.
pub async fn replay(
    settings: &Settings,
    filter: &Filter,
    dry_run: bool,
) -> Result<Replayed, DlqError> {
    let mut reader = Reader::open(settings, "replay").await?;
    let publisher = if dry_run {
        None
    } else {
        Some(Publisher::connect(&settings.broker.urls, "courier dlq replay publish").await?)
    };
    let deliver = settings.broker.deliver_queue();
    let mut done = Replayed::default();
    let result = async {
        while !filter.full(done.replayed) {
            let Some((letter, delivery)) = reader.next().await? else {
                break;
            };
            if !filter.matches(&letter) {
                continue; // left unacknowledged: it is given back
            }
            if filter.reason.is_none() && letter.reason == INVALID_EVENT {
                done.invalid_left += 1;
                continue;
            }
            let Some(publisher) = &publisher else {
                done.replayed += 1;
                continue;
            };
            let properties = replay_properties(&delivery.properties);
            publisher
                .publish("", &deliver, &delivery.data, properties)
                .await
                .map_err(|source| DlqError::Publish {
                    replayed: done.replayed,
                    source,
                })?;
            // Confirmed in the delivery queue: only now may the dead letter go.
            reader.ack(delivery.delivery_tag).await?;
            done.replayed += 1;
        }
        Ok::<_, DlqError>(())
    }
    .await;
    done.examined = reader.examined;
    reader.close().await;
    if let Some(publisher) = publisher {
        publisher.close().await;
    }
    result.map(|()| done)
}

/// `courier dlq discard`: reads the matching dead letters (at most `filter.limit`),
/// holding them, and asks `confirm` with what they are; removes them only if it says
/// yes. The others, and all of them on a no, are given back.
pub async fn discard(
    settings: &Settings,
    filter: &Filter,
    confirm: impl FnOnce(&Listing) -> bool,
) -> Result<Discarded, DlqError> {
    let mut reader = Reader::open(settings, "discard").await?;
    let mut done = Discarded::default();
    let mut held = Vec::new();
    let read = async {
        while !filter.full(held.len()) {
            let Some((letter, delivery)) = reader.next().await? else {
                break;
            };
            if filter.matches(&letter) {
                done.matched.add(letter, 3);
                held.push(delivery.delivery_tag);
            }
        }
        Ok::<_, BrokerError>(())
    }
    .await;
    done.examined = reader.examined;
    if let Err(e) = read {
        reader.close().await;
        return Err(e.into());
    }
    if !held.is_empty() && confirm(&done.matched) {
        for tag in held {
            if let Err(source) = reader.ack(tag).await {
                reader.close().await;
                return Err(DlqError::Discard {
                    removed: done.removed,
                    source,
                });
            }
            done.removed += 1;
        }
    }
    reader.close().await;
    Ok(done)
}

/// A dead letter's properties for replay: the broker's history and courier's retry and
/// dead-letter headers dropped (`x-courier-first-seen` stays, for the lag metric).
fn replay_properties(original: &BasicProperties) -> BasicProperties {
    let headers = original.headers().as_ref();
    let trail = Trail {
        first_seen: Trail::read(headers).first_seen,
        ..Trail::default()
    };
    republish_properties(original, trail.write(headers))
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{AMQPValue, FieldArray, LongString};

    fn long(s: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
    }

    #[test]
    fn reasons_come_from_courier_or_the_broker() {
        let body = br#"{"id":"e1","account":"acme","type":"company"}"#;
        let mut courier = FieldTable::default();
        courier.insert("x-courier-reason".into(), long("rejected_400"));
        assert_eq!(
            describe(body, Some(&courier)),
            Letter {
                reason: "rejected_400".into(),
                account: "acme".into(),
                kind: "company".into(),
                id: "e1".into()
            }
        );
        let mut death = FieldTable::default();
        death.insert("reason".into(), long("delivery_limit"));
        let mut broker = FieldTable::default();
        broker.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        assert_eq!(describe(body, Some(&broker)).reason, "delivery_limit");
        let junk = describe(b"not json", None);
        assert_eq!(
            (junk.reason.as_str(), junk.account.as_str()),
            ("unknown", "-")
        );
    }

    #[test]
    fn filters_match_on_every_given_field() {
        let letter = Letter {
            reason: "retries_exhausted".into(),
            account: "a".into(),
            kind: "company".into(),
            id: "1".into(),
        };
        assert!(Filter::default().matches(&letter));
        assert!(
            Filter {
                account: Some("a".into()),
                kind: Some("company".into()),
                ..Default::default()
            }
            .matches(&letter)
        );
        assert!(
            !Filter {
                reason: Some("delivery_limit".into()),
                ..Default::default()
            }
            .matches(&letter)
        );
    }

    #[test]
    fn replay_resets_retry_headers() {
        let mut h = FieldTable::default();
        for k in [
            "x-courier-reason",
            "x-courier-retries",
            "x-courier-first-failure",
            "x-death",
            "x-courier-first-seen",
            "trace-id",
        ] {
            h.insert(k.into(), long("v"));
        }
        h.insert(
            "x-courier-first-seen".into(),
            long("2026-11-28T10:00:00.000Z"),
        );
        let props = replay_properties(&BasicProperties::default().with_headers(h));
        let kept: Vec<String> = props
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .keys()
            .map(|k| k.to_string())
            .collect();
        assert_eq!(kept, vec!["trace-id", "x-courier-first-seen"]);
    }
}
