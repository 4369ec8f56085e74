//! Confirmed publishing on a connection of its own (a blocked publisher must not stall
//! the consumer's acks). Every publish is `mandatory` and awaits its confirm; a returned
//! or nacked message is a failure.

use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection, PublisherConfirm};
use tokio::sync::Mutex;

use super::{BrokerError, connect};
use crate::config::BrokerUrl;

/// Why a publish did not land.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("the broker returned the message as unroutable: {0}")]
    Returned(String),
    #[error("the broker refused the message (nack)")]
    Nacked,
    #[error("no publisher confirm within {0:?} (is the broker blocked by a resource alarm?)")]
    TimedOut(Duration),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// How long a publish waits for its confirm before it counts as failed.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);

/// A publisher-confirmed channel that reconnects on demand.
pub struct Publisher {
    urls: Vec<BrokerUrl>,
    name: String,
    state: Mutex<Option<(Connection, Channel)>>,
}

impl Publisher {
    /// Opens the publishing connection now, so a broken broker shows at start-up.
    pub async fn connect(urls: &[BrokerUrl], name: &str) -> Result<Self, BrokerError> {
        let publisher = Self {
            urls: urls.to_vec(),
            name: name.to_owned(),
            state: Mutex::new(None),
        };
        publisher.channel().await?;
        Ok(publisher)
    }

    async fn channel(&self) -> Result<Channel, BrokerError> {
        let mut state = self.state.lock().await;
        if let Some((conn, channel)) = state.as_ref()
            && conn.status().connected()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        if let Some((conn, _)) = state.take() {
            let _ = conn.close(200, "reconnecting".into()).await;
        }
        let conn = connect(&self.urls, &self.name).await?;
        let channel = conn
            .create_channel()
            .await
            .map_err(BrokerError::amqp("opening the publish channel"))?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(BrokerError::amqp("enabling publisher confirms"))?;
        *state = Some((conn, channel.clone()));
        Ok(channel)
    }

    /// Publishes once; the returned [`Confirm`] resolves when the broker has taken the
    /// message. Several may be outstanding at once (`courier publish` keeps a window).
    pub async fn send(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<Confirm, PublishError> {
        let channel = self.channel().await?;
        let confirm = channel
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
        Ok(Confirm(confirm))
    }

    /// Publishes with confirm, reconnecting and retrying a few times on a broken
    /// connection. An `Err` means the message may not be stored: the caller must not ack
    /// its original.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let mut delay = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            let result = match self
                .send(exchange, routing_key, body, properties.clone())
                .await
            {
                Ok(confirm) => confirm.wait().await,
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => return Ok(()),
                Err(PublishError::Broker(e)) if attempt < 4 && !e.is_fatal() => {
                    tracing::warn!(error = %e, attempt, "publish failed; reconnecting");
                    tokio::time::sleep(delay).await;
                    delay *= 4;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Closes the connection (waiting at most a few seconds for the broker).
    pub async fn close(&self) {
        if let Some((conn, _)) = self.state.lock().await.take() {
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                conn.close(200, "shutting down".into()),
            )
            .await;
        }
    }
}

/// A message the broker has not confirmed yet.
pub struct Confirm(PublisherConfirm);

impl Confirm {
    /// Waits for the broker's confirm (bounded: a blocked broker must not hold the
    /// originals unacknowledged for long). A returned or nacked message is an error.
    pub async fn wait(self) -> Result<(), PublishError> {
        let confirm = tokio::time::timeout(CONFIRM_TIMEOUT, self.0)
            .await
            .map_err(|_| PublishError::TimedOut(CONFIRM_TIMEOUT))?
            .map_err(BrokerError::amqp("waiting for a publisher confirm"))?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                Err(PublishError::Returned(returned.reply_text.to_string()))
            }
            Confirmation::Nack(None) => Err(PublishError::Nacked),
            Confirmation::NotRequested => unreachable!("confirm_select is always enabled"),
        }
    }
}
