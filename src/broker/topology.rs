//! The broker topology (docs/operations.md, "Broker topology"), declared idempotently with every queue's final
//! arguments. The dead-letter queue's arguments depend on the server version
//! (docs/operations.md, "Supported RabbitMQ versions").

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{Connection, ExchangeKind};

use super::{BrokerError, ServerVersion};
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

/// `x-delivery-limit` of the dead-letter queue on a broker of `version`: none before
/// RabbitMQ 4 (no limit is the default there, and a negative one reads as 0), -1
/// (unlimited) from 4.0, where a quorum queue without one gets a limit of 20 and drops
/// what `dlq list` returned that often. An unknown version gets the 3.x form.
pub fn dead_letter_limit(version: Option<ServerVersion>) -> Option<i64> {
    version
        .filter(|v| v.has_default_delivery_limit())
        .map(|_| -1)
}

/// The queues courier declares on a broker of `version`, in declaration order: dead,
/// deliver, then the retry tiers.
pub fn queues(
    broker: &BrokerSettings,
    schedule: &[std::time::Duration],
    version: Option<ServerVersion>,
) -> Vec<QueueSpec> {
    let quorum = |extra: &[(&str, AMQPValue)]| {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), string("quorum"));
        for (k, v) in extra {
            args.insert((*k).into(), v.clone());
        }
        args
    };
    let deliver = broker.deliver_queue();
    let dead_limit =
        dead_letter_limit(version).map(|limit| ("x-delivery-limit", AMQPValue::LongLongInt(limit)));
    let deliver_args = [
        (
            "x-delivery-limit",
            AMQPValue::LongLongInt(broker.delivery_limit.into()),
        ),
        ("x-dead-letter-exchange", string("")),
        ("x-dead-letter-routing-key", string(&broker.dead_queue())),
        ("x-dead-letter-strategy", string("at-least-once")),
        ("x-overflow", string("reject-publish")),
    ];
    let mut specs = vec![
        QueueSpec {
            name: broker.dead_queue(),
            arguments: quorum(dead_limit.as_slice()),
        },
        QueueSpec {
            name: deliver.clone(),
            arguments: if broker.per_record {
                // One router at a time (docs/ordering.md, "How events reach their
                // shard"): a quorum queue does not enforce an exclusive consumer.
                quorum(&single_active(&deliver_args))
            } else {
                quorum(&deliver_args)
            },
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
    if broker.per_record {
        // docs/ordering.md: the shards are delivery queues with one active consumer; the
        // parking log is a stream.
        let shard_args = single_active(&deliver_args);
        for n in 0..broker.shards {
            specs.push(QueueSpec {
                name: broker.shard_queue(n),
                arguments: quorum(&shard_args),
            });
        }
        let mut log = FieldTable::default();
        log.insert("x-queue-type".into(), string("stream"));
        log.insert("x-max-age".into(), string(PARKING_LOG_MAX_AGE));
        specs.push(QueueSpec {
            name: broker.parking_queue(),
            arguments: log,
        });
    }
    specs
}

/// `args` with `x-single-active-consumer`: the broker delivers to one consumer at a time
/// and hands over to another when it goes.
fn single_active<'a>(args: &[(&'a str, AMQPValue)]) -> Vec<(&'a str, AMQPValue)> {
    let mut args = args.to_vec();
    args.push(("x-single-active-consumer", AMQPValue::Boolean(true)));
    args
}

/// How long the parking log keeps its entries (`x-max-age` of the stream): far longer
/// than any record waits in the retry tiers (docs/ordering.md, "The parking log").
pub const PARKING_LOG_MAX_AGE: &str = "7D";

/// Declares the exchange, the queues and the binding for a broker of `version`. A queue
/// that exists with other arguments is a [`BrokerError::QueueMismatch`] naming the queue
/// and argument, but for a dead-letter queue declared before RabbitMQ 4, which is kept
/// with a warning (docs/operations.md, "Upgrading to RabbitMQ 4").
pub async fn declare(
    conn: &Connection,
    broker: &BrokerSettings,
    schedule: &[std::time::Duration],
    version: Option<ServerVersion>,
) -> Result<(), BrokerError> {
    let open = || async {
        conn.create_channel()
            .await
            .map_err(BrokerError::amqp("opening a channel"))
    };
    // A refused declaration closes its channel: use one of its own.
    let mut channel = open().await?;
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
    for spec in queues(broker, schedule, version) {
        match declare_queue(&channel, &spec).await {
            Ok(()) => {}
            Err(BrokerError::QueueMismatch { argument, .. })
                if spec.name == broker.dead_queue()
                    && argument == "x-delivery-limit"
                    && dead_letter_limit(version).is_some() =>
            {
                channel = open().await?;
                keep_pre_4_dead_queue(&channel, broker, schedule).await?;
            }
            Err(e) => return Err(e),
        }
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

async fn declare_queue(channel: &lapin::Channel, spec: &QueueSpec) -> Result<(), BrokerError> {
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
        .map(|_| ())
        .map_err(|e| mismatch_or(e, &spec.name))
}

/// On RabbitMQ 4, a dead-letter queue declared under 3.x (without `x-delivery-limit`)
/// cannot take the new argument in place. It is kept if it matches the 3.x form exactly,
/// with a warning: only a `delivery-limit` policy keeps its letters past 20 listings.
async fn keep_pre_4_dead_queue(
    channel: &lapin::Channel,
    broker: &BrokerSettings,
    schedule: &[std::time::Duration],
) -> Result<(), BrokerError> {
    let legacy = queues(broker, schedule, None)
        .into_iter()
        .next()
        .expect("the dead-letter queue comes first");
    match declare_queue(channel, &legacy).await {
        Ok(()) => {
            tracing::warn!(
                queue = %legacy.name,
                "the dead-letter queue was declared before RabbitMQ 4, without x-delivery-limit: \
                 RabbitMQ 4 drops a dead letter listed more than 20 times unless a policy sets \
                 delivery-limit = -1 on it (docs/operations.md, \"Upgrading to RabbitMQ 4\")"
            );
            Ok(())
        }
        Err(BrokerError::QueueMismatch { .. }) => Err(BrokerError::QueueMismatch {
            queue: legacy.name,
            argument: "x-delivery-limit".into(),
            detail: "expected -1 (unlimited) on RabbitMQ 4".into(),
        }),
        Err(e) => Err(e),
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::testing::parse_with;

    fn dead_queue_limit(version: &str) -> Option<AMQPValue> {
        let settings = parse_with(crate::config::testing::MINIMAL, &[]).unwrap();
        let version = ServerVersion::parse(version);
        let dead = queues(&settings.broker, &settings.retry.schedule, version)
            .into_iter()
            .next()
            .unwrap();
        assert_eq!(dead.name, settings.broker.dead_queue());
        dead.arguments.inner().get("x-delivery-limit").cloned()
    }

    #[test]
    fn the_dead_letter_queue_is_unlimited_on_every_version() {
        // 3.x: no limit by default, and a negative one would read as 0.
        assert_eq!(dead_queue_limit("3.10.8"), None);
        assert_eq!(dead_queue_limit("3.13.7"), None);
        // 4.x: a default of 20 unless set; -1 is unlimited.
        assert_eq!(dead_queue_limit("4.0.5"), Some(AMQPValue::LongLongInt(-1)));
        assert_eq!(dead_queue_limit("4.3.0"), Some(AMQPValue::LongLongInt(-1)));
        assert_eq!(dead_queue_limit("unknown"), None);
    }

    #[test]
    fn per_record_ordering_adds_the_shards_and_the_parking_log() {
        let text = crate::config::testing::MINIMAL.replace(
            "[broker]",
            "[delivery]\nordering = \"per_record\"\n[broker]\nshards = 3",
        );
        let settings = parse_with(&text, &[]).unwrap();
        let specs = queues(&settings.broker, &settings.retry.schedule, None);
        let unordered = parse_with(crate::config::testing::MINIMAL, &[]).unwrap();
        let plain = queues(&unordered.broker, &unordered.retry.schedule, None);
        // The queues of "none" come first, in the same order; the intake queue gets a
        // single active consumer (the router), the others are unchanged.
        assert_eq!(specs.len(), plain.len() + 4);
        let deliver = &plain[1].arguments;
        let mut single = deliver.clone();
        single.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
        for (n, (a, b)) in plain.iter().zip(&specs).enumerate() {
            let expected = if n == 1 { &single } else { &a.arguments };
            assert_eq!((&a.name, expected), (&b.name, &b.arguments));
        }
        for (n, shard) in specs[plain.len()..plain.len() + 3].iter().enumerate() {
            assert_eq!(shard.name, format!("courier.deliver.{n}"));
            let mut expected = deliver.clone();
            expected.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
            assert_eq!(shard.arguments, expected);
        }
        let log = specs.last().unwrap();
        assert_eq!(log.name, "courier.parking");
        assert_eq!(
            log.arguments.inner().get("x-queue-type"),
            Some(&string("stream"))
        );
        assert_eq!(log.arguments.inner().get("x-max-age"), Some(&string("7D")));
    }

    #[test]
    fn other_queues_do_not_depend_on_the_version() {
        let settings = parse_with(crate::config::testing::MINIMAL, &[]).unwrap();
        let of = |v: &str| {
            queues(
                &settings.broker,
                &settings.retry.schedule,
                ServerVersion::parse(v),
            )
        };
        for version in ["3.13.7", "4.0.5", "4.3.0"] {
            let (old, new) = (of("3.10.8"), of(version));
            assert_eq!(old.len(), new.len());
            for (a, b) in old.iter().zip(&new).skip(1) {
                assert_eq!(a.name, b.name);
                assert_eq!(a.arguments, b.arguments, "{} on {version}", a.name);
            }
        }
        let deliver = &of("4.3.0")[1];
        assert_eq!(
            deliver.arguments.inner().get("x-delivery-limit"),
            Some(&AMQPValue::LongLongInt(
                settings.broker.delivery_limit.into()
            ))
        );
        // Every queue is durable and quorum: RabbitMQ 4.3 refuses transient
        // non-exclusive queues, and quorum queues cannot be transient.
        for q in of("4.3.0") {
            assert_eq!(
                q.arguments.inner().get("x-queue-type"),
                Some(&string("quorum")),
                "{}",
                q.name
            );
        }
    }
}
