//! The broker goes away and comes back: absent when the worker starts, stopped and
//! started again while events flow. The worker waits, reports itself unready meanwhile,
//! and delivers every event once the broker is back (docs/operations.md, "Delivery
//! guarantee"). Each test runs its own private node.

use std::collections::HashSet;
use std::time::Duration;

use courier::config::Settings;

use crate::helpers::*;

fn account(receiver: &Receiver) -> ConfigSpec {
    ConfigSpec {
        top: "shutdown_timeout = \"2s\"".into(),
        accounts: format!(
            "[[account]]\nid = \"acme\"\ncompanies_url = \"{}\"\nbatch_size = 10\nflush_interval = \"50ms\"\n",
            receiver.url("/hook")
        ),
        ..Default::default()
    }
}

fn bodies(prefix: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| event(&format!("{prefix}{i}"), "acme", "company"))
        .collect()
}

/// Publishes through courier's own publisher (the private node has no test connection).
async fn publish(settings: &Settings, bodies: &[Vec<u8>]) {
    let input = bodies.join(&b'\n');
    let summary = courier::commands::publish::publish(settings, input.as_slice(), false)
        .await
        .expect("publishing the events");
    assert_eq!(summary.published, bodies.len());
}

async fn readyz(admin: u16) -> u16 {
    http_get(admin, "/readyz").await.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_started_before_its_broker_waits_and_becomes_ready() {
    let node = PrivateNode::prepare();
    let receiver = Receiver::start().await;
    let names = Names::new();
    let (settings, admin) = node.settings(&names, &account(&receiver));
    let worker = TestWorker::start(settings.clone());
    // No broker: the worker stays up, unready, disconnected.
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            readyz(admin).await == 503
        })
        .await,
        "the admin endpoints never answered 503"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(worker.running(), "the worker exited without a broker");
    assert_eq!(readyz(admin).await, 503);
    assert_eq!(http_get(admin, "/healthz").await.0, 200);
    assert_eq!(worker.metric("courier_broker_connected", &[]), 0.0);

    node.boot().await;
    assert!(
        worker.wait_ready(Duration::from_secs(45)).await,
        "not ready after the broker appeared"
    );
    assert_eq!(readyz(admin).await, 200);
    assert_eq!(worker.metric("courier_broker_connected", &[]), 1.0);
    let published = bodies("s", 30);
    publish(&settings, &published).await;
    assert_eq!(
        receiver
            .wait_for_distinct(30, Duration::from_secs(20))
            .await,
        30
    );
    worker.shutdown().await;
    let delivered: HashSet<String> = receiver.delivered_ids().into_iter().collect();
    let wanted: HashSet<String> = published.iter().map(|b| event_id(b)).collect();
    assert_eq!(delivered, wanted);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_node_restarted_while_events_flow_loses_nothing() {
    let node = PrivateNode::start().await;
    let receiver = Receiver::start().await;
    // Slow enough that requests are in flight when the node stops.
    receiver.set_delay(Duration::from_secs(2));
    let names = Names::new();
    let spec = ConfigSpec {
        delivery: "timeout = \"5s\"".into(),
        ..account(&receiver)
    };
    let (settings, admin) = node.settings(&names, &spec);
    let worker = TestWorker::spawn(settings.clone()).await;
    let first = bodies("r", 400);
    publish(&settings, &first).await;
    assert!(
        eventually(Duration::from_secs(20), || !receiver.requests().is_empty()).await,
        "nothing was delivered before the stop"
    );

    node.stop().await;
    let stopped = std::time::Instant::now();
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            readyz(admin).await == 503
        })
        .await,
        "still ready with the broker down"
    );
    assert_eq!(worker.metric("courier_broker_connected", &[]), 0.0);
    assert!(
        receiver.delivered_ids().len() < first.len(),
        "everything was delivered before the stop: the test stopped nothing in flight"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(readyz(admin).await, 503, "ready while the broker is down");

    node.boot().await;
    assert!(
        worker.wait_ready(Duration::from_secs(45)).await,
        "not ready after the broker came back"
    );
    assert_eq!(readyz(admin).await, 200);
    assert!(worker.metric("courier_broker_reconnects_total", &[]) >= 1.0);
    let second = bodies("t", 100);
    publish(&settings, &second).await;

    let published: HashSet<String> = first.iter().chain(&second).map(|b| event_id(b)).collect();
    let delivered = || receiver.delivered_ids().into_iter().collect::<HashSet<_>>();
    if !eventually(Duration::from_secs(60), || {
        delivered().is_superset(&published)
    })
    .await
    {
        let delivered = delivered();
        let mut missing: Vec<_> = published.difference(&delivered).collect();
        missing.sort();
        panic!(
            "never delivered: {} of {}: {missing:?}\n{} requests, {} events accepted\nqueues:\n{}",
            missing.len(),
            published.len(),
            receiver.requests().len(),
            receiver.delivered_ids().len(),
            node.queue_depths().await
        );
    }
    let recovered = stopped.elapsed();
    worker.shutdown().await;
    let listing = courier::commands::dlq::list(&settings, 0)
        .await
        .expect("dlq list");
    assert_eq!(listing.total, 0, "dead-lettered: {listing:?}");
    print_figures(
        "broker node restart",
        published.len(),
        &receiver.delivered_ids(),
        0,
        recovered,
    );
}
