//! The broker topology (docs/operations.md, "Broker topology"), declared idempotently with every queue's final
//! arguments.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Connection, ExchangeKind};

use super::BrokerError;
use crate::config::BrokerSettings;

/// One queue to declare: its name and arguments.
#[derive(Debug, Clone)]
pub struct QueueSpec {
    pub name: String,
    pub arguments: FieldTable,
}

fn string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// The queues courier declares, in declaration order: dead, deliver, then the retry tiers.
pub fn queues(broker: &BrokerSettings, schedule: &[std::time::Duration]) -> Vec<QueueSpec> {
    let quorum = |extra: &[(&str, AMQPValue)]| {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), string("quorum"));
        for (k, v) in extra {
            args.insert((*k).into(), v.clone());
        }
        args
    };
    let deliver = broker.deliver_queue();
    let mut specs = vec![
        QueueSpec {
            name: broker.dead_queue(),
            arguments: quorum(&[]),
        },
        QueueSpec {
            name: deliver.clone(),
            arguments: quorum(&[
                (
                    "x-delivery-limit",
                    AMQPValue::LongLongInt(broker.delivery_limit.into()),
                ),
                ("x-dead-letter-exchange", string("")),
                ("x-dead-letter-routing-key", string(&broker.dead_queue())),
                ("x-dead-letter-strategy", string("at-least-once")),
                ("x-overflow", string("reject-publish")),
            ]),
        },
    ];
    for delay in schedule {
        specs.push(QueueSpec {
            name: broker.retry_queue(*delay),
            arguments: quorum(&[
                (
                    "x-message-ttl",
                    AMQPValue::LongLongInt(delay.as_millis() as i64),
                ),
                ("x-dead-letter-exchange", string("")),
                ("x-dead-letter-routing-key", string(&deliver)),
                ("x-dead-letter-strategy", string("at-least-once")),
                ("x-overflow", string("reject-publish")),
            ]),
        });
    }
    specs
}

/// Declares the exchange, the queues and the binding. A queue that exists with other
/// arguments is a [`BrokerError::QueueMismatch`] naming the queue and argument.
pub async fn declare(
    conn: &Connection,
    broker: &BrokerSettings,
    schedule: &[std::time::Duration],
) -> Result<(), BrokerError> {
    // A refused declaration closes its channel: use one of its own.
    let channel = conn
        .create_channel()
        .await
        .map_err(BrokerError::amqp("opening a channel"))?;
    channel
        .exchange_declare(
            broker.exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::amqp(format!(
            "declaring exchange {}",
            broker.exchange
        )))?;
    for spec in queues(broker, schedule) {
        channel
            .queue_declare(
                spec.name.as_str().into(),
                QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                spec.arguments.clone(),
            )
            .await
            .map_err(|e| mismatch_or(e, &spec.name))?;
    }
    channel
        .queue_bind(
            broker.deliver_queue().as_str().into(),
            broker.exchange.as_str().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::amqp("binding the delivery queue"))?;
    let _ = channel.close(200, "topology declared".into()).await;
    Ok(())
}

fn mismatch_or(error: lapin::Error, queue: &str) -> BrokerError {
    let text = error.to_string();
    if text.contains("PRECONDITION_FAILED") || text.contains("inequivalent arg") {
        // "inequivalent arg 'x-delivery-limit' for queue 'courier.deliver' in vhost '/': ..."
        let argument = text
            .split("inequivalent arg '")
            .nth(1)
            .and_then(|rest| rest.split('\'').next())
            .unwrap_or("arguments")
            .to_owned();
        return BrokerError::QueueMismatch {
            queue: queue.to_owned(),
            argument,
            detail: text,
        };
    }
    BrokerError::Amqp {
        context: format!("declaring queue {queue}"),
        source: error,
    }
}
