//! The test's own broker connection: publishing and inspection on the test's queues,
//! which it deletes when dropped.

use std::time::Duration;

use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::time::Instant;

use super::{Names, amqp_url};

/// A broker connection for the test's own publishing and inspection; deletes the test's
/// queues and exchange when dropped (even when the test panics).
pub struct Broker {
    pub names: Names,
    pub conn: Connection,
    channel: lapin::Channel,
    queues: Vec<String>,
}

impl Broker {
    pub async fn connect(names: &Names, schedule: &[&str]) -> Self {
        let conn = Connection::connect(&amqp_url(), ConnectionProperties::default())
            .await
            .expect("broker");
        let channel = conn.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let mut queues = vec![names.deliver(), names.dead()];
        queues.extend(
            schedule
                .iter()
                .map(|d| format!("{}.retry.{d}", names.prefix)),
        );
        Self {
            names: names.clone(),
            conn,
            channel,
            queues,
        }
    }

    /// Deletes `queue` too when dropped (shard queues, the parking log).
    pub fn owns(&mut self, queue: String) {
        self.queues.push(queue);
    }

    /// Declares `queue` (durable) as courier would, but with `limit` as its
    /// `x-delivery-limit`: a queue that exists with other arguments.
    pub async fn declare_with_limit(
        &self,
        queue: &courier::broker::topology::QueueSpec,
        limit: i64,
    ) {
        let mut args = queue.arguments.clone();
        args.insert("x-delivery-limit".into(), AMQPValue::LongLongInt(limit));
        let channel = self.conn.create_channel().await.unwrap();
        channel
            .queue_declare(
                queue.name.as_str().into(),
                lapin::options::QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                args,
            )
            .await
            .unwrap();
        let _ = channel.close(200, "declared".into()).await;
    }

    /// Publishes bodies to the test exchange with routing key `<account>.<type>`, confirmed.
    pub async fn publish(&self, bodies: &[Vec<u8>]) {
        self.publish_with(bodies, BasicProperties::default().with_delivery_mode(2))
            .await;
    }

    pub async fn publish_with(&self, bodies: &[Vec<u8>], properties: BasicProperties) {
        let mut confirms = Vec::with_capacity(bodies.len());
        for body in bodies {
            let key = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .map(|v| {
                    format!(
                        "{}.{}",
                        v["account"].as_str().unwrap_or("x"),
                        v["type"].as_str().unwrap_or("y")
                    )
                })
                .unwrap_or_else(|| "bad.event".into());
            let confirm = self
                .channel
                .basic_publish(
                    self.names.exchange.as_str().into(),
                    key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    body,
                    properties.clone(),
                )
                .await
                .unwrap();
            confirms.push(confirm);
            if confirms.len() >= 500 {
                for c in confirms.drain(..) {
                    assert_eq!(
                        c.await.unwrap(),
                        lapin::Confirmation::Ack(None),
                        "publish not confirmed"
                    );
                }
            }
        }
        for c in confirms {
            assert_eq!(
                c.await.unwrap(),
                lapin::Confirmation::Ack(None),
                "publish not confirmed"
            );
        }
    }

    /// Publishes bodies straight into `queue` through the default exchange, confirmed.
    pub async fn publish_to_queue(&self, queue: &str, bodies: &[Vec<u8>]) {
        let mut confirms = Vec::with_capacity(bodies.len());
        for body in bodies {
            let confirm = self
                .channel
                .basic_publish(
                    "".into(),
                    queue.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    body,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await
                .unwrap();
            confirms.push(confirm);
        }
        for c in confirms {
            assert_eq!(
                c.await.unwrap(),
                lapin::Confirmation::Ack(None),
                "publish not confirmed"
            );
        }
    }

    /// Takes every message of `queue` (acking them): event id and
    /// `x-courier-last-error` ("" when absent).
    pub async fn drain_last_errors(&self, queue: &str) -> Vec<(String, String)> {
        self.drain(queue)
            .await
            .into_iter()
            .map(|(body, headers)| {
                let error = header_str(&headers, "x-courier-last-error").unwrap_or_default();
                (super::event_id(&body), error)
            })
            .collect()
    }

    /// Takes every message of `queue` (acking them): body and headers.
    pub async fn drain(&self, queue: &str) -> Vec<(Vec<u8>, FieldTable)> {
        let channel = self.conn.create_channel().await.unwrap();
        let mut out = Vec::new();
        while let Some(msg) = channel
            .basic_get(queue.into(), BasicGetOptions::default())
            .await
            .unwrap()
        {
            let headers = msg
                .delivery
                .properties
                .headers()
                .clone()
                .unwrap_or_default();
            msg.delivery.ack(BasicAckOptions::default()).await.unwrap();
            out.push((msg.delivery.data.clone(), headers));
        }
        out
    }

    /// Messages ready in `queue` (the broker leaves out those delivered and not yet
    /// acked); panics when the queue cannot be read, a missing queue included.
    pub async fn depth(&self, queue: &str) -> u32 {
        self.counts(queue).await.0
    }

    /// Ready messages and consumers of `queue`; panics when it cannot be read.
    pub async fn counts(&self, queue: &str) -> (u32, u32) {
        let channel = self.conn.create_channel().await.unwrap();
        let q = channel
            .queue_declare(
                queue.into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("cannot read queue {queue}: {e}"));
        let _ = channel.close(200, "counted".into()).await;
        (q.message_count(), q.consumer_count())
    }

    /// Messages in `queue` once its consumers are gone (a stopped worker's unacked
    /// messages are back) and the count holds still: what was never acked counts too.
    pub async fn settled_depth(&self, queue: &str) -> u32 {
        self.wait_no_consumers(queue).await;
        let mut last = self.depth(queue).await;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = self.depth(queue).await;
            if now == last {
                return now;
            }
            last = now;
        }
    }

    /// `drain` once the queue's consumers are gone, again until a round finds nothing:
    /// after a worker stops, the broker returns its unacked messages a little later.
    pub async fn drain_settled(&self, queue: &str) -> Vec<(Vec<u8>, FieldTable)> {
        self.wait_no_consumers(queue).await;
        let mut out = self.drain(queue).await;
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let more = self.drain(queue).await;
            if more.is_empty() {
                return out;
            }
            out.extend(more);
        }
    }

    /// The event ids `drain_settled` takes from `queue`.
    pub async fn drain_settled_ids(&self, queue: &str) -> std::collections::HashSet<String> {
        self.drain_settled(queue)
            .await
            .iter()
            .map(|(body, _)| super::event_id(body))
            .collect()
    }

    async fn wait_no_consumers(&self, queue: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.counts(queue).await.1 > 0 {
            assert!(
                Instant::now() < deadline,
                "queue {queue} still has a consumer"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until `queue` holds at least `n` messages.
    pub async fn wait_for_depth(&self, queue: &str, n: u32, timeout: Duration) -> u32 {
        let deadline = Instant::now() + timeout;
        loop {
            let depth = self.depth(queue).await;
            if depth >= n || Instant::now() >= deadline {
                return depth;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let queues = self.queues.clone();
        let exchange = self.names.exchange.clone();
        // Drop cannot await: clean up on a thread of its own.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let Ok(conn) =
                    Connection::connect(&amqp_url(), ConnectionProperties::default()).await
                else {
                    return;
                };
                let Ok(channel) = conn.create_channel().await else {
                    return;
                };
                for q in queues {
                    let _ = channel
                        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                        .await;
                }
                let _ = channel
                    .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                    .await;
                let _ = conn.close(200, "cleanup".into()).await;
            });
        })
        .join();
    }
}

/// A header's value as text or integer.
pub fn header_str(headers: &FieldTable, name: &str) -> Option<String> {
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        AMQPValue::LongLongInt(n) => Some(n.to_string()),
        AMQPValue::LongInt(n) => Some(n.to_string()),
        other => Some(format!("{other:?}")),
    }
}

/// Declares the topology `settings` name and opens a publisher named
/// `test publisher <prefix>` on its broker; returns it with its connection name.
pub async fn topology_and_publisher(
    settings: &courier::config::Settings,
    names: &Names,
) -> (courier::broker::Publisher, String) {
    courier::broker::ensure_topology(&settings.broker, &settings.retry.schedule, "test setup")
        .await
        .expect("declaring the topology");
    let name = format!("test publisher {}", names.prefix);
    let publisher = courier::broker::Publisher::connect(&settings.broker.urls, &name)
        .await
        .expect("publisher");
    (publisher, name)
}
