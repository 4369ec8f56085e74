//! Confirmed publishing on a connection of its own (a blocked publisher must not stall
//! the consumer's acks). Every publish is `mandatory` and awaits its confirm; a returned
//! or nacked message is a failure.
//!
//! A publish is bounded as a whole, the write and the confirm: while the broker blocks
//! publishers on a resource alarm, the write itself does not complete (docs/operations.md,
//! "When the broker blocks publishers"). A broken connection is replaced once per
//! publish, by one publish for all that found it broken; the others wait for that
//! reconnect, and publishes on a working connection never wait for it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};
use tokio::time::Instant;

use super::{BrokerError, connect};
use crate::config::BrokerUrl;

/// Why a publish did not land.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the broker returned the message as unroutable: {0}")]
    Returned(String),
    #[error("the broker refused the message (nack)")]
    Nacked,
    #[error("not published within {0:?} (is the broker blocking publishers on a resource alarm?)")]
    TimedOut(Duration),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl PublishError {
    /// Whether publishing again may succeed: the connection was lost (its node stopped or
    /// went away; the next connection goes to the next node that answers) or no node
    /// answered, or the broker refused the message (a quorum queue without a leader
    /// while its members elect one). Not an unroutable message, a timeout, nor what the
    /// broker refuses for good (a missing exchange, a denied permission).
    pub fn is_transient(&self) -> bool {
        use lapin::ErrorKind;
        use lapin::protocol::{AMQPErrorKind, AMQPHardError};
        match self {
            PublishError::Nacked => true,
            PublishError::Broker(BrokerError::Connect { .. }) => true,
            PublishError::Broker(BrokerError::Amqp { source, .. }) => match source.kind() {
                ErrorKind::IOError(_)
                | ErrorKind::MissingHeartbeatError
                | ErrorKind::InvalidConnectionState(_)
                | ErrorKind::InvalidChannelState(..) => true,
                ErrorKind::ProtocolError(amqp) => matches!(
                    amqp.kind(),
                    AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED)
                ),
                _ => false,
            },
            PublishError::Broker(_) | PublishError::Returned(_) | PublishError::TimedOut(_) => {
                false
            }
        }
    }
}

/// How long a publish may take, write and confirm, when its caller sets no deadline.
pub const PUBLISH_TIMEOUT: Duration = Duration::from_secs(60);

/// One publishing connection and its confirmed channel.
struct Link {
    /// Which reconnect opened it: a publish that failed on it names it.
    generation: u64,
    conn: Connection,
    channel: Channel,
}

impl Link {
    fn usable(&self) -> bool {
        self.conn.status().connected() && self.channel.status().connected()
    }
}

/// A publisher-confirmed channel that reconnects on demand.
pub struct Publisher {
    urls: Vec<BrokerUrl>,
    name: String,
    /// The current link; never locked across an await.
    link: Mutex<Option<Arc<Link>>>,
    /// Held by the one publish that reconnects; it keeps the failure of the last attempt
    /// for the publishes that waited on it.
    reconnecting: tokio::sync::Mutex<Option<String>>,
    /// Connections opened or tried so far; changed only by the holder of `reconnecting`,
    /// once its attempt has ended.
    attempts: AtomicU64,
}

impl Publisher {
    /// Opens the publishing connection now, so a broken broker shows at start-up.
    pub async fn connect(urls: &[BrokerUrl], name: &str) -> Result<Self, BrokerError> {
        let publisher = Self::lazy(urls, name);
        publisher.link(None).await?;
        Ok(publisher)
    }

    /// A publisher that connects at its first publish (the worker, which may start
    /// before the broker does).
    pub fn lazy(urls: &[BrokerUrl], name: &str) -> Self {
        Self {
            urls: urls.to_vec(),
            name: name.to_owned(),
            link: Mutex::new(None),
            reconnecting: tokio::sync::Mutex::new(None),
            attempts: AtomicU64::new(0),
        }
    }

    /// Opens the publishing connection if it is not open yet; a failure is left to the
    /// next publish, which tries again.
    pub async fn warm(&self) -> Result<(), BrokerError> {
        self.link(None).await.map(|_| ())
    }

    fn current(&self) -> Option<Arc<Link>> {
        self.link.lock().expect("publisher link").clone()
    }

    /// A usable link: the current one unless it is broken or is the one a publish just
    /// failed on (`failed`), else a new one. Publishes that need a new link at the same
    /// time share one reconnect and its outcome.
    async fn link(&self, failed: Option<u64>) -> Result<Arc<Link>, BrokerError> {
        let fits = |link: &Link| link.usable() && Some(link.generation) != failed;
        let seen = self.attempts.load(Ordering::SeqCst);
        if let Some(link) = self.current()
            && fits(&link)
        {
            return Ok(link);
        }
        let mut last_failure = self.reconnecting.lock().await;
        // Another publish may have reconnected while this one waited for the lock: its
        // link serves this one too (reconnecting again would close it under the publishes
        // already written on it), and its failure is this one's.
        if let Some(link) = self.current()
            && fits(&link)
        {
            return Ok(link);
        }
        if self.attempts.load(Ordering::SeqCst) != seen {
            return Err(BrokerError::Connect {
                nodes: self.nodes(),
                last: last_failure
                    .clone()
                    .unwrap_or_else(|| "connection lost".into()),
            });
        }
        let old = self.link.lock().expect("publisher link").take();
        if let Some(old) = old {
            // A broken connection closes at once; a blocked one cannot, so do not wait.
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                old.conn.close(200, "reconnecting".into()),
            )
            .await;
        }
        // Only the holder of `reconnecting` changes `attempts`, and only once the attempt
        // has ended: a publish that read it before then finds it changed and takes this
        // attempt's outcome instead of making another.
        let generation = seen + 1;
        let opened = self.open(generation).await;
        match &opened {
            Ok(link) => {
                *last_failure = None;
                *self.link.lock().expect("publisher link") = Some(link.clone());
            }
            Err(e) => *last_failure = Some(e.to_string()),
        }
        self.attempts.store(generation, Ordering::SeqCst);
        opened
    }

    /// Connections opened or tried so far, the first one included.
    pub fn connects(&self) -> u64 {
        self.attempts.load(Ordering::SeqCst)
    }

    async fn open(&self, generation: u64) -> Result<Arc<Link>, BrokerError> {
        let conn = connect(&self.urls, &self.name).await?;
        let channel = conn
            .create_channel()
            .await
            .map_err(BrokerError::amqp("opening the publish channel"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(BrokerError::amqp("enabling publisher confirms"))?;
        Ok(Arc::new(Link {
            generation,
            conn,
            channel,
        }))
    }

    fn nodes(&self) -> String {
        let nodes: Vec<&str> = self.urls.iter().map(|u| u.display.as_str()).collect();
        nodes.join(", ")
    }

    /// Publishes once; the returned [`Confirm`] resolves when the broker has taken the
    /// message. Several may be outstanding at once (`courier publish` keeps a window).
    /// The write and the confirm together take at most [`PUBLISH_TIMEOUT`].
    pub async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<Confirm, PublishError> {
        let deadline = Instant::now() + PUBLISH_TIMEOUT;
        let write = async {
            let link = self.link(None).await?;
            write(&link, exchange, routing_key, body, properties).await
        };
        let confirm = tokio::time::timeout_at(deadline, write)
            .await
            .map_err(|_| PublishError::TimedOut(PUBLISH_TIMEOUT))??;
        Ok(Confirm { confirm, deadline })
    }

    /// Publishes with confirm within [`PUBLISH_TIMEOUT`]; see [`Self::publish_before`].
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let deadline = Instant::now() + PUBLISH_TIMEOUT;
        self.publish_before(exchange, routing_key, body, properties, deadline)
            .await
    }

    /// Publishes with confirm, write and confirm done by `deadline`; on a broken
    /// connection it reconnects once and tries again. An `Err` means the message may not
    /// be stored: the caller must not ack its original. (After a timeout it may still be
    /// stored once the broker reads again: a duplicate, never a loss.)
    pub async fn publish_before(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        deadline: Instant,
    ) -> Result<(), PublishError> {
        let allowed = deadline.saturating_duration_since(Instant::now());
        let attempts = async {
            let mut failed = None;
            loop {
                let link = self.link(failed).await?;
                let result =
                    match write(&link, exchange, routing_key, body, properties.clone()).await {
                        Ok(confirm) => confirmed(confirm.await),
                        Err(e) => Err(e),
                    };
                match result {
                    Err(PublishError::Broker(e)) if failed.is_none() && !e.is_fatal() => {
                        tracing::warn!(error = %e, "publish failed; reconnecting");
                        failed = Some(link.generation);
                    }
                    result => return result,
                }
            }
        };
        tokio::time::timeout_at(deadline, attempts)
            .await
            .unwrap_or(Err(PublishError::TimedOut(allowed)))
    }

    /// Closes the connection (waiting at most a few seconds for the broker).
    pub async fn close(&self) {
        let link = self.link.lock().expect("publisher link").take();
        if let Some(link) = link {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                link.conn.close(200, "shutting down".into()),
            )
            .await;
        }
    }
}

/// Writes one mandatory publish on `link`.
async fn write(
    link: &Link,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    properties: BasicProperties,
) -> Result<PublisherConfirm, PublishError> {
    let confirm = link
        .channel
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            properties,
        )
        .await
        .map_err(BrokerError::amqp("publishing"))?;
    Ok(confirm)
}

/// What the broker's confirm says: a returned or nacked message is an error.
fn confirmed(confirm: Result<Confirmation, lapin::Error>) -> Result<(), PublishError> {
    match confirm.map_err(BrokerError::amqp("waiting for a publisher confirm"))? {
        Confirmation::Ack(None) => Ok(()),
        Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
            Err(PublishError::Returned(returned.reply_text.to_string()))
        }
        Confirmation::Nack(None) => Err(PublishError::Nacked),
        Confirmation::NotRequested => unreachable!("confirm_select is always enabled"),
    }
}

/// A message the broker has not confirmed yet.
pub struct Confirm {
    confirm: PublisherConfirm,
    /// Its [`Publisher::send`]'s deadline.
    deadline: Instant,
}

impl Confirm {
    /// Waits for the broker's confirm, until the deadline its send set (a blocked broker
    /// must not hold the originals unacknowledged for long). A returned or nacked message
    /// is an error.
    pub async fn wait(self) -> Result<(), PublishError> {
        let confirm = tokio::time::timeout_at(self.deadline, self.confirm)
            .await
            .map_err(|_| PublishError::TimedOut(PUBLISH_TIMEOUT))?;
        confirmed(confirm)
    }
}

#[cfg(test)]
mod tests {
    use lapin::protocol::{AMQPError, AMQPErrorKind, AMQPHardError, AMQPSoftError};
    use lapin::{ChannelState, ConnectionState, ErrorKind};

    use super::*;

    fn amqp(kind: ErrorKind) -> PublishError {
        PublishError::Broker(BrokerError::Amqp {
            context: "publishing".into(),
            source: kind.into(),
        })
    }

    fn refused(kind: AMQPErrorKind) -> PublishError {
        amqp(ErrorKind::ProtocolError(AMQPError::new(kind, "".into())))
    }

    #[test]
    fn a_lost_connection_or_a_nack_may_pass_when_tried_again() {
        let transient = [
            PublishError::Nacked,
            amqp(ErrorKind::IOError(Arc::new(std::io::Error::from(
                std::io::ErrorKind::ConnectionReset,
            )))),
            amqp(ErrorKind::MissingHeartbeatError),
            amqp(ErrorKind::InvalidConnectionState(ConnectionState::Closed)),
            amqp(ErrorKind::InvalidChannelState(
                ChannelState::Closing,
                "basic.publish",
            )),
            refused(AMQPErrorKind::Hard(AMQPHardError::CONNECTIONFORCED)),
            PublishError::Broker(BrokerError::Connect {
                nodes: "a, b".into(),
                last: "Connection refused".into(),
            }),
        ];
        for error in transient {
            assert!(error.is_transient(), "{error:?}");
        }
        let for_good = [
            refused(AMQPErrorKind::Soft(AMQPSoftError::NOTFOUND)),
            refused(AMQPErrorKind::Soft(AMQPSoftError::ACCESSREFUSED)),
            PublishError::Returned("NO_ROUTE".into()),
            PublishError::TimedOut(PUBLISH_TIMEOUT),
            PublishError::Broker(BrokerError::TooOld {
                node: "a".into(),
                version: "3.9.0".into(),
            }),
        ];
        for error in for_good {
            assert!(!error.is_transient(), "{error:?}");
        }
    }
}
