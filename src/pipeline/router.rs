//! The router of per-record ordering (docs/ordering.md, "How events reach their shard"):
//! every replica consumes the intake queue (`courier.deliver`, declared with a single
//! active consumer in this mode), and the one the broker makes active republishes each
//! message, in consume order and publisher-confirmed, to the shard queue of its record;
//! the original is acknowledged once its copy is confirmed. When the active one goes,
//! the broker makes another active: that is the failover. (An exclusive consumer would
//! not do: a quorum queue accepts several.)
//!
//! The copy keeps the trail (`x-courier-*`) of a message that courier put back itself
//! (from a retry tier or `dlq replay`, through the default exchange) and drops it from
//! one that came through the events exchange: on the shard queue it would look trusted.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions,
};
use lapin::types::{FieldTable, ShortString};
use lapin::{BasicProperties, Confirmation, Connection, PublisherConfirm};
use tokio_util::sync::CancellationToken;

use super::order::shard_of;
use crate::broker::headers::{Trail, republish_properties};
use crate::broker::{self, BrokerError};
use crate::config::BrokerSettings;
use crate::event;

/// The wait before a router that stopped on an error consumes again.
pub const RETRY: Duration = Duration::from_secs(1);

/// Copies written but not yet confirmed, at most.
const WINDOW: u16 = 1000;

/// Routes until `stop` is cancelled; reconnects after errors.
pub async fn run(broker: Arc<BrokerSettings>, stop: CancellationToken) {
    let name = format!("courier route {}", broker.queue_prefix);
    let mut routing = false;
    while !stop.is_cancelled() {
        let conn = tokio::select! {
            _ = stop.cancelled() => return,
            conn = broker::connect(&broker.urls, &name) => conn,
        };
        match conn {
            Ok(conn) => {
                let ended = route(&conn, &broker, &stop, &mut routing).await;
                let _ = tokio::time::timeout(
                    Duration::from_secs(5),
                    conn.close(200, "router stopped".into()),
                )
                .await;
                match ended {
                    Ok(()) => {}
                    Err(e) => tracing::warn!(error = %e, "router stopped; trying again"),
                }
            }
            Err(e) => tracing::debug!(error = %e, "router cannot connect"),
        }
        if routing {
            tracing::info!("no longer routing the intake queue");
            routing = false;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// One connection's worth of routing: consumes the intake queue and routes what the
/// broker delivers, which it does only while this is its active consumer. `Ok` when
/// stopped.
async fn route(
    conn: &Connection,
    broker: &BrokerSettings,
    stop: &CancellationToken,
    routing: &mut bool,
) -> Result<(), BrokerError> {
    let intake = broker.deliver_queue();
    let publish = conn
        .create_channel()
        .await
        .map_err(BrokerError::amqp("opening the router's publish channel"))?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(BrokerError::amqp("enabling publisher confirms"))?;
    let channel = conn
        .create_channel()
        .await
        .map_err(BrokerError::amqp("opening the router's channel"))?;
    channel
        .basic_qos(WINDOW, BasicQosOptions::default())
        .await
        .map_err(BrokerError::amqp("setting the router's prefetch"))?;
    let mut consumer = channel
        .basic_consume(
            intake.as_str().into(),
            format!("courier-route-{}", std::process::id())
                .as_str()
                .into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(BrokerError::amqp(format!("consuming from {intake}")))?;
    tracing::debug!(queue = %intake, "consuming the intake queue; routing while the broker makes this replica its active consumer");
    let mut outstanding: VecDeque<(u64, PublisherConfirm)> = VecDeque::new();
    let mut confirmed_up_to = None;
    let result = loop {
        if let Some(tag) = confirmed_up_to.take() {
            channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await
                .map_err(BrokerError::amqp("acknowledging routed messages"))?;
        }
        let room = outstanding.len() < WINDOW as usize;
        let front = async {
            match outstanding.front_mut() {
                Some((_, confirm)) => confirm.await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            biased;
            _ = stop.cancelled() => break Ok(()),
            confirm = front => {
                let (tag, _) = outstanding.pop_front().expect("a confirm was awaited");
                check(confirm)?;
                confirmed_up_to = Some(tag);
                // Take every confirm that is already in.
                while let Some((_, confirm)) = outstanding.front_mut() {
                    match futures_util::FutureExt::now_or_never(&mut *confirm) {
                        Some(done) => {
                            let (tag, _) = outstanding.pop_front().expect("present");
                            check(done)?;
                            confirmed_up_to = Some(tag);
                        }
                        None => break,
                    }
                }
            }
            next = consumer.next(), if room => {
                let delivery = match next {
                    Some(Ok(delivery)) => delivery,
                    Some(Err(e)) => break Err(BrokerError::amqp("routing")(e)),
                    None => break Err(BrokerError::Connect { nodes: intake.clone(), last: "the router's consumer was cancelled".into() }),
                };
                if !*routing {
                    tracing::info!(queue = %intake, shards = broker.shards, "routing the intake queue to the shards");
                    *routing = true;
                }
                let shard = shard_of_body(&delivery.data, broker);
                let properties = copy_properties(delivery.exchange.as_str(), &delivery.properties, SystemTime::now());
                let confirm = publish
                    .basic_publish(
                        "".into(),
                        broker.shard_queue(shard).as_str().into(),
                        BasicPublishOptions { mandatory: true, ..Default::default() },
                        &delivery.data,
                        properties,
                    )
                    .await
                    .map_err(BrokerError::amqp("routing to a shard"))?;
                outstanding.push_back((delivery.delivery_tag, confirm));
            }
        }
    };
    // Stopping: what is confirmed already is acknowledged; the rest returns to the intake
    // queue and is routed again (a duplicate, never a loss).
    let drain = async {
        let mut last = confirmed_up_to;
        while let Some((tag, confirm)) = outstanding.pop_front() {
            if check(confirm.await).is_err() {
                break;
            }
            last = Some(tag);
        }
        if let Some(tag) = last {
            let _ = channel
                .basic_ack(tag, BasicAckOptions { multiple: true })
                .await;
        }
    };
    if result.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
        // Channels closed before their connection: what the broker still sends to a
        // closing connection would be logged as an error.
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            channel.close(200, "router stopped".into()),
        )
        .await;
        let _ = tokio::time::timeout(
            Duration::from_secs(5),
            publish.close(200, "router stopped".into()),
        )
        .await;
    }
    result
}

/// A confirm that is not a plain ack stops the router: a copy written after it may be
/// stored already, so going on could put a record's events out of order.
fn check(confirm: Result<Confirmation, lapin::Error>) -> Result<(), BrokerError> {
    match confirm {
        Ok(Confirmation::Ack(None)) => Ok(()),
        Ok(other) => Err(BrokerError::Connect {
            nodes: "shard queue".into(),
            last: format!("the broker did not take a routed message: {other:?}"),
        }),
        Err(e) => Err(BrokerError::amqp("waiting for a routing confirm")(e)),
    }
}

/// The shard of an event's record; an event that does not parse goes to shard 0, whose
/// consumer dead-letters it as usual.
pub fn shard_of_body(body: &[u8], broker: &BrokerSettings) -> u16 {
    match event::parse(body, broker.max_event_bytes) {
        Ok(e) => shard_of(&e.account, e.kind.as_str(), &e.record_id, broker.shards),
        Err(_) => 0,
    }
}

/// The properties of a routed copy: the trail only if courier put the message back
/// itself (`exchange` is the default one), first seen now if not known yet, without the
/// broker's history headers.
pub fn copy_properties(
    exchange: &str,
    original: &BasicProperties,
    now: SystemTime,
) -> BasicProperties {
    let mut trail = Trail::of_delivery(exchange, original);
    trail.first_seen.get_or_insert(now);
    let headers = trail.write(original.headers().as_ref());
    let mut properties = republish_properties(original, headers);
    if let Some(kind) = original.content_type() {
        properties = properties.with_content_type(ShortString::from(kind.as_str()));
    }
    properties
}

#[cfg(test)]
mod tests {
    use lapin::types::{AMQPValue, LongString};

    use super::*;
    use crate::broker::headers::{FIRST_SEEN, PARKED, RETRIES};

    fn props(pairs: &[(&str, AMQPValue)]) -> BasicProperties {
        let mut h = FieldTable::default();
        for (k, v) in pairs {
            h.insert((*k).into(), v.clone());
        }
        BasicProperties::default().with_headers(h)
    }

    fn keys(p: &BasicProperties) -> Vec<String> {
        p.headers()
            .as_ref()
            .unwrap()
            .inner()
            .keys()
            .map(|k| k.to_string())
            .collect()
    }

    #[test]
    fn the_router_drops_forged_trails_and_keeps_courier_s_own() {
        let text = |s: &str| AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()));
        let original = props(&[
            (RETRIES, AMQPValue::LongLongInt(5)),
            (PARKED, AMQPValue::Boolean(true)),
            ("x-courier-reason", text("forged")),
            ("x-death", AMQPValue::Boolean(true)),
            ("x-delivery-count", AMQPValue::LongLongInt(2)),
            ("trace", text("t1")),
        ]);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        // Through the events exchange: only the foreign header and a fresh first-seen.
        let published = copy_properties("record-changes", &original, now);
        assert_eq!(keys(&published), vec!["trace", FIRST_SEEN]);
        assert_eq!(
            Trail::read(published.headers().as_ref()).first_seen,
            Some(now)
        );
        // Back from a retry tier (default exchange): the trail stays, history goes.
        let returned = copy_properties("", &original, now);
        let trail = Trail::read(returned.headers().as_ref());
        assert_eq!(trail.retries, Some(5));
        assert!(trail.parked);
        assert_eq!(trail.reason.as_deref(), Some("forged"));
        assert!(
            !keys(&returned)
                .iter()
                .any(|k| k.starts_with("x-death") || k == "x-delivery-count")
        );
        assert_eq!(returned.delivery_mode(), &Some(2));
    }

    #[test]
    fn an_event_goes_to_its_record_s_shard_and_garbage_to_shard_0() {
        let settings =
            crate::config::testing::parse_with(crate::config::testing::MINIMAL, &[]).unwrap();
        let body = br#"{"id":"e1","account":"acme","type":"company","action":"updated","record_id":"r1","record":{}}"#;
        assert_eq!(
            shard_of_body(body, &settings.broker),
            shard_of("acme", "company", "r1", settings.broker.shards)
        );
        assert_eq!(shard_of_body(b"not json", &settings.broker), 0);
    }
}
