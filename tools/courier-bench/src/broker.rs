//! The broker side: connections, a confirmed publisher, and deleting a run's topology.

use std::time::Duration;

use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use serde_json::json;

use crate::Result;
use crate::cli::CleanupArgs;

/// A connection named for the broker's management view, within the usual bound.
pub async fn connect(url: &str, name: &str) -> Result<Connection> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Ok(within(Connection::connect(url, props)).await??)
}

/// Bounds one broker operation: a connection whose I/O loop died can leave a reply
/// pending forever, and a benchmark must not hang on it.
pub async fn within<T>(op: impl std::future::Future<Output = T>) -> Result<T> {
    tokio::time::timeout(Duration::from_secs(15), op)
        .await
        .map_err(|_| "the broker did not answer within 15 s".into())
}

/// A confirmed publisher: publishes without waiting, while a task awaits the confirms in
/// order; at most `window` are outstanding.
pub struct ConfirmedPublisher {
    conn: Connection,
    channel: Channel,
    exchange: String,
    confirms: tokio::sync::mpsc::Sender<lapin::PublisherConfirm>,
    done: tokio::task::JoinHandle<Result<u64>>,
    properties: BasicProperties,
}

impl ConfirmedPublisher {
    pub async fn open(url: &str, exchange: &str, window: usize, name: &str) -> Result<Self> {
        let conn = connect(url, name).await?;
        let channel = conn.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<lapin::PublisherConfirm>(window.max(1));
        let done = tokio::spawn(async move {
            let mut confirmed = 0u64;
            while let Some(confirm) = rx.recv().await {
                match within(confirm).await?? {
                    Confirmation::Ack(None) => confirmed += 1,
                    Confirmation::Ack(Some(m)) | Confirmation::Nack(Some(m)) => {
                        return Err(format!(
                            "message returned by the broker ({}): is the topology declared?",
                            m.reply_text
                        )
                        .into());
                    }
                    Confirmation::Nack(None) => return Err("message nacked by the broker".into()),
                    Confirmation::NotRequested => unreachable!("confirm_select is on"),
                }
            }
            Ok(confirmed)
        });
        Ok(Self {
            conn,
            channel,
            exchange: exchange.to_owned(),
            confirms: tx,
            done,
            properties: BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type("application/json".into()),
        })
    }

    pub async fn publish(&self, routing_key: &str, body: &[u8]) -> Result<()> {
        let confirm = within(self.channel.basic_publish(
            self.exchange.as_str().into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            self.properties.clone(),
        ))
        .await??;
        self.confirms
            .send(confirm)
            .await
            .map_err(|_| "the confirm task stopped")?;
        Ok(())
    }

    /// Waits for every confirm; returns how many were acked.
    pub async fn finish(self) -> Result<u64> {
        drop(self.confirms);
        let confirmed = self.done.await??;
        let _ = within(self.conn.close(200, "done".into())).await;
        Ok(confirmed)
    }
}
/// `cleanup`: deletes every queue courier declares for the configuration, and the exchange.
pub async fn cleanup(args: CleanupArgs) -> Result<()> {
    let target = args.target.resolve()?;
    let mut left: Vec<String> = target.topology.clone();
    if let Some(q) = &target.queue
        && !left.contains(q)
    {
        left.push(q.clone());
    }
    let mut exchange = target.exchange.clone();
    let mut deleted = Vec::new();
    // RabbitMQ 3.10 can restart its quorum log writer when a queue is deleted right after
    // heavy traffic, closing the connection: reconnect and carry on with what is left.
    let mut last_error = None;
    for attempt in 0..5 {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let conn = match connect(&target.url, "courier-bench cleanup").await {
            Ok(conn) => conn,
            Err(e) => {
                last_error = Some(e.to_string());
                continue;
            }
        };
        while let Some(q) = left.first().cloned() {
            // A failed delete closes the channel: one channel per queue.
            let result = within(async {
                let ch = conn.create_channel().await?;
                ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await
                    .map(|_| ())
            })
            .await
            .and_then(|r| r.map_err(Into::into));
            match result {
                Ok(()) => {
                    deleted.push(left.remove(0));
                }
                Err(e) => {
                    last_error = Some(format!("deleting {q}: {e}"));
                    break;
                }
            }
        }
        if left.is_empty()
            && let Some(x) = exchange.clone()
        {
            let result = within(async {
                let ch = conn.create_channel().await?;
                ch.exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
                    .await
            })
            .await
            .and_then(|r| r.map_err(Into::into));
            match result {
                Ok(()) => {
                    deleted.push(format!("exchange {x}"));
                    exchange = None;
                }
                Err(e) => last_error = Some(format!("deleting exchange {x}: {e}")),
            }
        }
        let _ = within(conn.close(200, "done".into())).await;
        if left.is_empty() && exchange.is_none() {
            break;
        }
    }
    println!(
        "{}",
        json!({ "cmd": "cleanup", "deleted": deleted, "left": left })
    );
    if !left.is_empty() || exchange.is_some() {
        return Err(last_error
            .unwrap_or_else(|| "cleanup incomplete".into())
            .into());
    }
    Ok(())
}
