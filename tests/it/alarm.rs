//! The broker stops reading: a memory alarm on a private node blocks every publisher, a
//! retry queue goes away for a while. Nothing hangs, nothing is lost, and no event burns
//! its delivery limit waiting for the broker (docs/operations.md, "When the broker blocks
//! publishers").

use std::collections::HashSet;
use std::time::Duration;

use courier::broker::PublishError;
use courier::config::Settings;
use futures_util::future::join_all;
use lapin::BasicProperties;
use tokio::time::Instant;

use crate::helpers::*;

/// An account whose companies go to `url`, in batches of 10.
fn account(url: &str) -> String {
    format!(
        "[[account]]\nid = \"acme\"\ncompanies_url = \"{url}\"\nbatch_size = 10\nflush_interval = \"50ms\"\n"
    )
}

fn bodies(prefix: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| event(&format!("{prefix}{i}"), "acme", "company"))
        .collect()
}

fn ids(bodies: &[Vec<u8>]) -> HashSet<String> {
    bodies.iter().map(|b| event_id(b)).collect()
}

/// Ids of every event the receiver was sent, whatever it answered.
fn requested(receiver: &Receiver) -> HashSet<String> {
    receiver.requests().iter().flat_map(Recorded::ids).collect()
}

/// Dead letters as (event id, reason).
async fn dead_letters(settings: &Settings) -> Vec<(String, String)> {
    let listing = courier::commands::dlq::list(settings, usize::MAX)
        .await
        .expect("reading the dead-letter queue");
    listing
        .groups
        .into_iter()
        .flat_map(|((reason, _, _), (_, samples))| {
            samples.into_iter().map(move |id| (id, reason.clone()))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_alarm_holds_republishes_without_loss_or_delivery_limit() {
    let node = PrivateNode::start().await;
    let receiver = Receiver::start().await;
    receiver.set_status(503);
    let names = Names::new();
    let spec = ConfigSpec {
        top: "shutdown_timeout = \"2s\"\n[circuit]\nfailure_threshold = 100000".into(),
        // Any event given back twice is dead-lettered as `delivery_limit`.
        broker: "delivery_limit = 2".into(),
        retry: "immediate_attempts = 1\nschedule = [\"1s\", \"2s\", \"3s\", \"4s\"]".into(),
        accounts: account(&receiver.url("/hook")),
        ..Default::default()
    };
    let (settings, admin) = node.settings(&names, &spec);
    let worker = TestWorker::spawn(settings.clone()).await;
    let published = bodies("m", 200);
    let input = published.join(&b'\n');
    let summary = courier::commands::publish::publish(&settings, input.as_slice(), false)
        .await
        .expect("publishing the events");
    assert_eq!(summary.published, published.len());
    assert!(
        eventually(Duration::from_secs(20), || requested(&receiver).len()
            == 200)
        .await,
        "not every event was tried before the alarm"
    );

    // Every event failed once and is on its way to the first tier, or there.
    node.set_memory_watermark("0.0000001").await;
    let raised = Instant::now();
    // The events come back from their tier, fail again, and their republish meets the
    // alarm: the publish connection is blocked.
    assert!(
        eventually_async(Duration::from_secs(20), || async {
            node.blocked_connections().await >= 1
        })
        .await,
        "the alarm blocked no publisher"
    );
    // While it is blocked, courier answers and reports.
    while raised.elapsed() < Duration::from_secs(10) {
        assert_eq!(
            http_get(admin, "/readyz").await.0,
            200,
            "not ready under the alarm"
        );
        let (status, metrics) = http_get(admin, "/metrics").await;
        assert_eq!(status, 200);
        assert!(
            metrics.contains("courier_events_consumed_total"),
            "{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let alarm = raised.elapsed();

    receiver.set_status(200);
    node.set_memory_watermark("0.4").await;
    let lifted = Instant::now();
    // Alone this takes about 2 s.
    let delivered = receiver
        .wait_for_distinct(200, Duration::from_secs(60))
        .await;
    let recovery = lifted.elapsed();
    tokio::time::timeout(Duration::from_secs(30), worker.shutdown())
        .await
        .expect("shutdown took longer than 30 s");

    let dead = dead_letters(&settings).await;
    assert!(
        dead.iter().all(|(_, reason)| reason != "delivery_limit"),
        "dead-lettered for waiting on the broker: {dead:?}"
    );
    let accepted = receiver.delivered_ids();
    let mut seen: HashSet<String> = accepted.iter().cloned().collect();
    seen.extend(dead.iter().map(|(id, _)| id.clone()));
    assert_eq!(seen, ids(&published), "events lost");
    eprintln!(
        "alarm figures: {} events, {} delivered ({} duplicate deliveries), {} dead-lettered {:?}, \
         alarm held {alarm:?}, all delivered {recovery:?} after it was lifted",
        published.len(),
        delivered,
        accepted.len() - delivered,
        dead.len(),
        dead.iter().map(|(_, r)| r.as_str()).collect::<HashSet<_>>(),
    );
}

#[tokio::test]
async fn a_retry_queue_gone_for_a_while_burns_no_delivery_limit() {
    let receiver = Receiver::start().await;
    receiver.set_status(503);
    let names = Names::new();
    let broker = Broker::connect(&names, &["1s"]).await;
    let spec = ConfigSpec {
        top: "[circuit]\nfailure_threshold = 100000".into(),
        broker: "delivery_limit = 3".into(),
        retry: "immediate_attempts = 1\nschedule = [\"1s\"]".into(),
        accounts: account(&receiver.url("/hook")),
        ..Default::default()
    };
    let settings = settings(&names, &spec);
    let worker = TestWorker::spawn(settings.clone()).await;
    // The tier is gone (as while its queue has no leader): republishes to it fail.
    let tier = format!("{}.retry.1s", names.prefix);
    let channel = broker.conn.create_channel().await.unwrap();
    channel
        .queue_delete(tier.as_str().into(), Default::default())
        .await
        .unwrap();
    let published = bodies("q", 20);
    broker.publish(&published).await;
    assert!(
        eventually(Duration::from_secs(10), || requested(&receiver).len() == 20).await,
        "not every event was tried"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The tier is back.
    courier::broker::ensure_topology(&settings.broker, &settings.retry.schedule, "test tier back")
        .await
        .expect("declaring the tier again");
    receiver.set_status(200);
    assert_eq!(
        receiver
            .wait_for_distinct(20, Duration::from_secs(30))
            .await,
        20,
        "events were lost while the tier was gone"
    );
    worker.shutdown().await;
    let dead = broker.drain_settled(&names.dead()).await;
    assert!(
        dead.is_empty(),
        "{} event(s) dead-lettered while the tier was gone",
        dead.len()
    );
    assert_eq!(
        receiver.delivered_ids().into_iter().collect::<HashSet<_>>(),
        ids(&published)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_to_a_blocked_broker_ends_by_its_deadline_and_reconnects_once() {
    let node = PrivateNode::start().await;
    let names = Names::new();
    let spec = ConfigSpec {
        accounts: account("http://127.0.0.1:9/hook"),
        ..Default::default()
    };
    let (settings, _) = node.settings(&names, &spec);
    let (publisher, name) = topology_and_publisher(&settings, &names).await;
    let queue = names.deliver();
    // Bodies of 1 MiB: the socket's buffers fill, so the write itself waits for the
    // broker (a small body would be written and only its confirm would wait).
    let publish = |id: String, within: Duration| {
        let (publisher, queue) = (&publisher, &queue);
        async move {
            let mut body = event(&id, "acme", "company");
            body.resize(1 << 20, b' ');
            let properties = BasicProperties::default().with_delivery_mode(2);
            let deadline = Instant::now() + within;
            publisher
                .publish_before("", queue, &body, properties, deadline)
                .await
        }
    };
    publish("before".into(), Duration::from_secs(10))
        .await
        .expect("a publish before the alarm");

    node.set_memory_watermark("0.0000001").await;
    // The broker blocks a connection at its first publish under the alarm, which it may
    // still take: this one puts the connection in that state, whatever becomes of it.
    let _ = publish("probe".into(), Duration::from_secs(2)).await;
    // Each publish, the first that meets the blocked connection and those written behind
    // it, ends by its deadline instead of waiting for the broker to read again.
    let blocked = join_all((0..10).map(|i| publish(format!("b{i}"), Duration::from_secs(2))));
    let ended = tokio::time::timeout(Duration::from_secs(30), blocked)
        .await
        .expect("publishes to a blocked broker did not end by their deadline");
    assert!(
        ended
            .iter()
            .all(|r| matches!(r, Err(PublishError::TimedOut(_)))),
        "{ended:?}"
    );
    assert!(
        node.blocked_connections().await >= 1,
        "the alarm blocked nothing"
    );

    node.set_memory_watermark("0.4").await;
    publish("after".into(), Duration::from_secs(20))
        .await
        .expect("a publish once the alarm is lifted");

    // The broker closes the connection: the publishes that find it broken share one
    // reconnect.
    let connects = publisher.connects();
    let old = close_named(Some(&node.name), &name).await;
    assert_eq!(old.len(), 1, "one publisher connection named {name}");
    let again = join_all((0..10).map(|i| publish(format!("r{i}"), Duration::from_secs(20)))).await;
    assert!(again.iter().all(Result::is_ok), "{again:?}");
    assert_eq!(publisher.connects(), connects + 1, "one reconnect for all");
    let now = connections_named(Some(&node.name), &name).await;
    assert_eq!(
        now.len(),
        1,
        "one new connection, not one per publish: {now:?}"
    );
    assert_ne!(now, old);
    tokio::time::timeout(Duration::from_secs(10), publisher.close())
        .await
        .expect("closing the publisher");
}
