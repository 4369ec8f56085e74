//! The parking log of per-record ordering (docs/ordering.md, "The parking log"): a stream
//! (`courier.parking`) to which every park and every release of a record is appended,
//! publisher-confirmed, before the message concerned is acknowledged. A replica that
//! becomes the active consumer of a shard appends a marker, reads the stream up to it,
//! and so knows which records of that shard wait behind an event in a retry tier.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use serde::{Deserialize, Serialize};

use super::{BrokerError, PublishError, Publisher};

/// What an entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    /// The event went to tier `tier_ms`, its record parked.
    Park,
    /// The event left its record's FIFO: delivered or dead-lettered.
    Release,
    /// A replica became the active consumer of the shard; `id` is its nonce.
    Marker,
}

/// One line of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub shard: u16,
    pub op: Op,
    /// The event's id (a marker's nonce).
    pub id: String,
    #[serde(default)]
    pub account: String,
    #[serde(default, rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub record_id: String,
    #[serde(default)]
    pub tier_ms: u64,
    /// When it was written, in milliseconds since the Unix epoch.
    pub at: u64,
}

/// Milliseconds since the Unix epoch.
pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// The time of `millis`.
pub fn time(millis: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_millis(millis)
}

/// Appends to the log and reads it back.
#[derive(Clone)]
pub struct ParkingLog {
    publisher: Arc<Publisher>,
    queue: String,
}

impl ParkingLog {
    pub fn new(publisher: Arc<Publisher>, queue: String) -> Self {
        Self { publisher, queue }
    }

    /// Appends one entry, confirmed.
    pub async fn append(&self, entry: &Entry) -> Result<(), PublishError> {
        let body = serde_json::to_vec(entry).expect("an entry serialises");
        let properties = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into());
        self.publisher
            .publish("", &self.queue, &body, properties)
            .await
    }

    /// Appends a marker for `shard`, then reads the log on `conn` from `since` up to that
    /// marker, giving up after `limit`. Returns the entries of `shard`, in order.
    pub async fn read_shard(
        &self,
        conn: &Connection,
        shard: u16,
        since: SystemTime,
        limit: Duration,
    ) -> Result<Vec<Entry>, BrokerError> {
        let now = SystemTime::now();
        let nonce = format!(
            "{}-{}-{}",
            std::process::id(),
            millis(now),
            now.duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .subsec_nanos()
        );
        let marker = Entry {
            shard,
            op: Op::Marker,
            id: nonce.clone(),
            account: String::new(),
            kind: String::new(),
            record_id: String::new(),
            tier_ms: 0,
            at: millis(now),
        };
        self.append(&marker)
            .await
            .map_err(|e| BrokerError::Connect {
                nodes: self.queue.clone(),
                last: format!("appending a marker to the parking log: {e}"),
            })?;
        let channel = conn
            .create_channel()
            .await
            .map_err(BrokerError::amqp("opening the parking log channel"))?;
        // A stream consumer needs a prefetch; its acks only give credit.
        channel
            .basic_qos(1000, BasicQosOptions::default())
            .await
            .map_err(BrokerError::amqp("setting the parking log prefetch"))?;
        let mut args = FieldTable::default();
        let secs = since
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        args.insert("x-stream-offset".into(), AMQPValue::Timestamp(secs));
        let tag = format!("courier-parking-{nonce}");
        let mut consumer = channel
            .basic_consume(
                self.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                args,
            )
            .await
            .map_err(BrokerError::amqp(format!("reading {}", self.queue)))?;
        let mut entries = Vec::new();
        let read = async {
            while let Some(delivery) = consumer.next().await {
                let delivery =
                    delivery.map_err(BrokerError::amqp(format!("reading {}", self.queue)))?;
                let _ = delivery.acker.ack(BasicAckOptions::default()).await;
                let Ok(entry) = serde_json::from_slice::<Entry>(&delivery.data) else {
                    continue;
                };
                if entry.shard != shard {
                    continue;
                }
                if entry.op == Op::Marker {
                    if entry.id == nonce {
                        return Ok(true);
                    }
                    continue;
                }
                entries.push(entry);
            }
            Ok::<_, BrokerError>(false)
        };
        let found = tokio::time::timeout(limit, read).await;
        let _ = channel.close(200, "parking log read".into()).await;
        match found {
            Ok(Ok(true)) => Ok(entries),
            Ok(Ok(false)) => Err(BrokerError::Connect {
                nodes: self.queue.clone(),
                last: "the parking log ended before its marker".into(),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                tracing::warn!(
                    shard,
                    read = entries.len(),
                    ?limit,
                    "the parking log's marker did not come back in time; going on with what was read"
                );
                Ok(entries)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_plain_json() {
        let entry = Entry {
            shard: 3,
            op: Op::Park,
            id: "e1".into(),
            account: "acme".into(),
            kind: "company".into(),
            record_id: "r1".into(),
            tier_ms: 30_000,
            at: 1_800_000_000_000,
        };
        let text = serde_json::to_string(&entry).unwrap();
        assert_eq!(
            text,
            r#"{"shard":3,"op":"park","id":"e1","account":"acme","type":"company","record_id":"r1","tier_ms":30000,"at":1800000000000}"#
        );
        assert_eq!(serde_json::from_str::<Entry>(&text).unwrap(), entry);
        let marker: Entry =
            serde_json::from_str(r#"{"shard":1,"op":"marker","id":"n","at":5}"#).unwrap();
        assert_eq!(marker.op, Op::Marker);
    }
}
