//! `courier dlq list` and `courier dlq replay`: the dead-letter queue for operators.
//!
//! Both read with manual acknowledgement. `list` never acks, so every dead letter stays
//! (the broker counts the extra delivery). `replay` republishes a matching dead letter to
//! the delivery queue, confirmed, and only then acks it; the others stay.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};

use lapin::options::{BasicAckOptions, BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};

use crate::broker::headers::{Trail, broker_death_reason, republish_properties};
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

/// Which dead letters `replay` moves.
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
}

/// Counts by (reason, account, type), with up to `samples` event ids each.
#[derive(Debug, Default)]
pub struct Listing {
    pub total: usize,
    pub groups: BTreeMap<(String, String, String), (usize, Vec<String>)>,
}

impl Listing {
    /// The table `dlq list` prints.
    pub fn render(&self, queue: &str) -> String {
        let mut out = format!("{queue}: {} dead letter(s)\n", self.total);
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

/// What `replay` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    pub examined: usize,
    pub replayed: usize,
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
}

struct Reader {
    conn: Connection,
    channel: Channel,
    /// Messages in the queue when reading began: each is looked at once.
    count: usize,
    queue: String,
    progress: bool,
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
        })
    }

    /// The next dead letter, unacknowledged.
    async fn next(&self) -> Result<Option<lapin::message::BasicGetMessage>, BrokerError> {
        self.channel
            .basic_get(
                self.queue.as_str().into(),
                BasicGetOptions { no_ack: false },
            )
            .await
            .map_err(BrokerError::amqp("reading the dead-letter queue"))
    }

    fn show_progress(&self, done: usize, verb: &str) {
        if self.progress && (done.is_multiple_of(100) || done == self.count) {
            eprint!("\r{verb} {done}/{}", self.count);
            let _ = std::io::stderr().flush();
        }
    }

    /// Closes the connection: every unacknowledged dead letter returns to the queue.
    async fn close(self) {
        if self.progress {
            eprintln!();
        }
        let _ = self.conn.close(200, "done".into()).await;
    }
}

/// `courier dlq list`.
pub async fn list(settings: &Settings, samples: usize) -> Result<Listing, BrokerError> {
    let reader = Reader::open(settings, "list").await?;
    let mut listing = Listing::default();
    while listing.total < reader.count {
        let Some(message) = reader.next().await? else {
            break;
        };
        let letter = describe(
            &message.delivery.data,
            message.delivery.properties.headers().as_ref(),
        );
        listing.total += 1;
        let group = listing
            .groups
            .entry((letter.reason, letter.account, letter.kind))
            .or_default();
        group.0 += 1;
        if group.1.len() < samples {
            group.1.push(letter.id);
        }
        reader.show_progress(listing.total, "read");
    }
    reader.close().await;
    Ok(listing)
}

/// `courier dlq replay`.
pub async fn replay(settings: &Settings, filter: &Filter) -> Result<Replayed, DlqError> {
    let reader = Reader::open(settings, "replay").await?;
    let publisher = Publisher::connect(&settings.broker.urls, "courier dlq replay publish").await?;
    let deliver = settings.broker.deliver_queue();
    let mut done = Replayed::default();
    let result = async {
        while done.examined < reader.count && filter.limit.is_none_or(|limit| done.replayed < limit)
        {
            let Some(message) = reader.next().await? else {
                break;
            };
            done.examined += 1;
            reader.show_progress(done.examined, "examined");
            let delivery = message.delivery;
            let letter = describe(&delivery.data, delivery.properties.headers().as_ref());
            if !filter.matches(&letter) {
                continue; // left unacknowledged: it returns to the queue
            }
            let properties = replay_properties(&delivery.properties);
            publisher
                .publish("", &deliver, &delivery.data, properties)
                .await
                .map_err(|source| DlqError::Publish {
                    replayed: done.replayed,
                    source,
                })?;
            // Confirmed in the delivery queue: only now may the dead letter go.
            delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .map_err(BrokerError::amqp("acknowledging"))?;
            done.replayed += 1;
        }
        Ok::<_, DlqError>(())
    }
    .await;
    reader.close().await;
    publisher.close().await;
    result.map(|()| done)
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
