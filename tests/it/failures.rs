//! Faults: receivers that fail, bad events, rejected records, a dropped broker connection.

use std::collections::HashSet;
use std::time::Duration;

use crate::helpers::*;

fn one_account(receiver: &Receiver, batch_size: usize) -> ConfigSpec {
    ConfigSpec {
        accounts: format!(
            "[[account]]\nid = \"acme\"\ncompanies_url = \"{}\"\nbatch_size = {batch_size}\nflush_interval = \"100ms\"\nhmac_secret = \"k\"\n",
            receiver.url("/hook/secret-path?token=abc")
        ),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_receiver_that_fails_twice_then_succeeds_gets_everything() {
    let receiver = Receiver::start().await;
    receiver.script(&[503, 500]);
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let worker = TestWorker::spawn(settings(&names, &one_account(&receiver, 5))).await;
    broker
        .publish(&[event("a", "acme", "company"), event("b", "acme", "company")])
        .await;
    assert_eq!(
        receiver.wait_for_events(2, Duration::from_secs(10)).await,
        2
    );
    let requests = receiver.requests();
    assert_eq!(requests.len(), 3);
    let attempts: Vec<_> = requests
        .iter()
        .map(|r| r.header("x-courier-attempt").unwrap().to_owned())
        .collect();
    assert_eq!(attempts, vec!["1", "2", "3"]);
    let ids: HashSet<_> = requests
        .iter()
        .map(|r| r.header("x-courier-delivery-id").unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 1, "one delivery id on every attempt");
    assert_eq!(
        worker.metric("courier_events_retried_total", &[("stage", "immediate")]),
        4.0
    );
    assert_eq!(
        worker.metric("courier_requests_total", &[("outcome", "retryable")]),
        2.0
    );
    // The receiver answered; courier counts once the answer reached it.
    let delivered = || worker.metric("courier_events_delivered_total", &[]) == 2.0;
    assert!(eventually(Duration::from_secs(5), delivered).await);
    worker.shutdown().await;
    assert_eq!(broker.depth(&names.dead()).await, 0);
}

#[tokio::test]
async fn a_receiver_that_always_fails_leaves_everything_in_the_dead_letter_queue() {
    let receiver = Receiver::start().await;
    receiver.set_status(500);
    let names = Names::new();
    let broker = Broker::connect(&names, &["200ms"]).await;
    let spec = ConfigSpec {
        retry: "schedule = [\"200ms\"]".into(),
        // This test is about exhausting the schedule, not about the circuit.
        top: "[circuit]\nfailure_threshold = 1000".into(),
        ..one_account(&receiver, 3)
    };
    let worker = TestWorker::spawn(settings(&names, &spec)).await;
    let bodies: Vec<Vec<u8>> = (0..7)
        .map(|i| event(&format!("d{i}"), "acme", "company"))
        .collect();
    broker.publish(&bodies).await;
    assert_eq!(
        broker
            .wait_for_depth(&names.dead(), 7, Duration::from_secs(15))
            .await,
        7
    );
    assert!(
        eventually(Duration::from_secs(5), || worker.metric(
            "courier_events_dead_lettered_total",
            &[("reason", "retries_exhausted")]
        ) == 7.0)
        .await
    );
    let retried = worker.metric("courier_events_retried_total", &[("stage", "scheduled")]);
    assert_eq!(retried, 7.0, "each event went through the one tier");
    worker.shutdown().await;
    assert!(
        receiver.requests().len() >= 6,
        "immediate attempts, then again after the tier"
    );
    let dead = broker.drain(&names.dead()).await;
    let mut seen = HashSet::new();
    for (body, headers) in &dead {
        assert!(bodies.contains(body), "dead letter body changed");
        seen.insert(event_id(body));
        assert_eq!(
            header_str(headers, "x-courier-reason").as_deref(),
            Some("retries_exhausted")
        );
        assert_eq!(
            header_str(headers, "x-courier-last-status").as_deref(),
            Some("500")
        );
        assert_eq!(
            header_str(headers, "x-courier-retries").as_deref(),
            Some("1"),
            "the one tier used"
        );
        assert!(
            !headers.inner().contains_key("x-death"),
            "broker history dropped"
        );
        assert!(
            header_str(headers, "x-courier-last-error")
                .unwrap()
                .contains("500")
        );
        for name in [
            "x-courier-first-failure",
            "x-courier-dead-at",
            "x-courier-first-seen",
        ] {
            let value = header_str(headers, name).unwrap_or_else(|| panic!("{name} missing"));
            chrono::DateTime::parse_from_rfc3339(&value)
                .unwrap_or_else(|_| panic!("{name} = {value:?} is not RFC 3339"));
        }
        let destination = header_str(headers, "x-courier-destination").unwrap();
        assert_eq!(
            destination,
            format!("http://{}", receiver.addr),
            "scheme, host and port only"
        );
        for value in headers.inner().values() {
            let text = format!("{value:?}");
            assert!(
                !text.contains("secret-path") && !text.contains("token=abc"),
                "URL path leaked: {text}"
            );
        }
    }
    assert_eq!(seen.len(), 7, "published = dead-lettered");
    assert_eq!(broker.depth(&names.deliver()).await, 0);
}

#[tokio::test]
async fn bad_events_are_dead_lettered_with_their_reason_and_good_ones_flow_on() {
    let receiver = Receiver::start().await;
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let spec = ConfigSpec {
        broker: "max_event_bytes = 2000".into(),
        ..one_account(&receiver, 1)
    };
    let worker = TestWorker::spawn(settings(&names, &spec)).await;
    let good = event("good-1", "acme", "company");
    let bad: Vec<(Vec<u8>, &str)> = vec![
        (b"not json at all".to_vec(), "invalid_event"),
        (b"[1,2,3]".to_vec(), "invalid_event"),
        (br#"{"id":"x1","account":"acme","type":"company","action":"created","record":{}}"#.to_vec(), "invalid_event"),
        (br#"{"id":"x2","account":"ac me","type":"company","action":"created","record_id":"r","record":{}}"#.to_vec(), "invalid_event"),
        (br#"{"id":"x3","account":"acme","type":"deal","action":"created","record_id":"r","record":{}}"#.to_vec(), "invalid_event"),
        (br#"{"id":"x4","account":"acme","type":"company","action":"deleted","record_id":"r","record":{}}"#.to_vec(), "invalid_event"),
        (br#"{"id":"x5","account":"acme","type":"company","action":"created","record_id":"r","record":{},"occurred_at":"yesterday"}"#.to_vec(), "invalid_event"),
        (br#"{"id":"x6","id":"x7","account":"acme","type":"company","action":"created","record_id":"r","record":{}}"#.to_vec(), "invalid_event"),
        (br#"{"id":"x8","account":"acme","type":"company","action":"created","record_id":"r","record":"flat"}"#.to_vec(), "invalid_event"),
        (format!(r#"{{"id":"x9","account":"acme","type":"company","action":"created","record_id":"r","record":{{"pad":"{}"}}}}"#, "p".repeat(2100)).into_bytes(), "invalid_event"),
        (b"{\"id\":\"x10\",\"account\":\"acme\",\"type\":\"company\",\"action\":\"created\",\"record_id\":\"r\",\"record\":{\"s\":\"\xff\"}}".to_vec(), "invalid_event"),
        (event("x11", "nobody", "company"), "unknown_account"),
    ];
    let mut bodies: Vec<Vec<u8>> = bad.iter().map(|(b, _)| b.clone()).collect();
    bodies.push(good.clone());
    broker.publish(&bodies).await;
    assert_eq!(
        receiver.wait_for_events(1, Duration::from_secs(10)).await,
        1
    );
    assert_eq!(
        receiver.delivered_ids(),
        vec!["good-1"],
        "the worker keeps delivering after bad events"
    );
    assert_eq!(
        broker
            .wait_for_depth(&names.dead(), bad.len() as u32, Duration::from_secs(10))
            .await,
        bad.len() as u32
    );
    let dead = broker.drain(&names.dead()).await;
    for (body, reason) in &bad {
        let (_, headers) = dead
            .iter()
            .find(|(b, _)| b == body)
            .unwrap_or_else(|| panic!("{} not dead-lettered", String::from_utf8_lossy(body)));
        assert_eq!(
            header_str(headers, "x-courier-reason").as_deref(),
            Some(*reason),
            "{}",
            String::from_utf8_lossy(body)
        );
        assert!(
            !header_str(headers, "x-courier-last-error")
                .unwrap()
                .is_empty()
        );
        assert!(
            header_str(headers, "x-courier-last-status").is_none(),
            "no HTTP status for a bad event"
        );
    }
    // Counted once the broker's confirm reached courier, just after the queue shows it.
    let counted = || {
        worker.metric(
            "courier_events_dead_lettered_total",
            &[("reason", "invalid_event")],
        ) == 11.0
            && worker.metric(
                "courier_events_dead_lettered_total",
                &[("reason", "unknown_account")],
            ) == 1.0
    };
    assert!(eventually(Duration::from_secs(5), counted).await);
    worker.shutdown().await;
    assert_eq!(broker.depth(&names.deliver()).await, 0);
}

#[tokio::test]
async fn a_rejected_record_is_isolated_and_the_rest_delivered() {
    let receiver = Receiver::start().await;
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let spec = ConfigSpec {
        accounts: format!(
            "[[account]]\nid = \"acme\"\ncompanies_url = \"{}\"\nbatch_size = 10\nflush_interval = \"5s\"\n",
            receiver.url("/hook")
        ),
        ..Default::default()
    };
    let poison = event("poison", "acme", "company");
    let worker = TestWorker::spawn(settings(&names, &spec)).await;
    let bodies: Vec<Vec<u8>> = (0..10)
        .map(|i| {
            if i == 6 {
                poison.clone()
            } else {
                event(&format!("ok{i}"), "acme", "company")
            }
        })
        .collect();
    // The receiver rejects any body that holds the poison record.
    receiver.reject_bodies_with("\"id\":\"poison\"", 400);
    broker.publish(&bodies).await;
    assert_eq!(
        receiver.wait_for_events(9, Duration::from_secs(15)).await,
        9
    );
    assert_eq!(
        broker
            .wait_for_depth(&names.dead(), 1, Duration::from_secs(10))
            .await,
        1
    );
    let dead = broker.drain(&names.dead()).await;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].0, poison, "the original bytes");
    assert_eq!(
        header_str(&dead[0].1, "x-courier-reason").as_deref(),
        Some("rejected_400")
    );
    let delivered: HashSet<_> = receiver.delivered_ids().into_iter().collect();
    assert_eq!(delivered.len(), 9);
    assert!(!delivered.contains("poison"));
    assert!(worker.metric("courier_batch_splits_total", &[]) >= 2.0);
    for request in receiver.requests() {
        assert_eq!(
            request.body[0], b'[',
            "halves are still arrays, even of one"
        );
    }
    worker.shutdown().await;
}

#[tokio::test]
async fn a_dropped_broker_connection_loses_nothing() {
    let receiver = Receiver::start().await;
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let spec = ConfigSpec {
        accounts: format!(
            "[[account]]\nid = \"acme\"\ncompanies_url = \"{}\"\nbatch_size = 50\nflush_interval = \"200ms\"\n",
            receiver.url("/hook")
        ),
        ..Default::default()
    };
    let worker = TestWorker::spawn(settings(&names, &spec)).await;
    let first: Vec<Vec<u8>> = (0..100)
        .map(|i| event(&format!("a{i}"), "acme", "company"))
        .collect();
    broker.publish(&first).await;
    assert_eq!(
        receiver.wait_for_events(100, Duration::from_secs(10)).await,
        100
    );
    // Close the worker's consuming connection from the broker side.
    let name = format!("courier consume {}", names.prefix);
    let closed = close_connections_named(&name);
    assert!(closed >= 1, "found no connection named {name}");
    assert!(
        eventually(Duration::from_secs(20), || worker
            .metric("courier_broker_reconnects_total", &[])
            >= 1.0)
        .await
    );
    let second: Vec<Vec<u8>> = (0..100)
        .map(|i| event(&format!("b{i}"), "acme", "company"))
        .collect();
    broker.publish(&second).await;
    assert!(
        receiver
            .wait_for_distinct(200, Duration::from_secs(20))
            .await
            >= 200
    );
    worker.shutdown().await;
    let delivered: HashSet<_> = receiver.delivered_ids().into_iter().collect();
    for body in first.iter().chain(&second) {
        assert!(
            delivered.contains(&event_id(body)),
            "lost {}",
            event_id(body)
        );
    }
    assert_eq!(broker.depth(&names.deliver()).await, 0);
}

/// Closes the broker connections with this client-provided name; returns how many.
fn close_connections_named(name: &str) -> usize {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "-q",
            "--no-table-headers",
            "pid",
            "client_properties",
        ])
        .output()
        .expect("rabbitmqctl");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut closed = 0;
    for line in text.lines() {
        if line.contains(&format!("\"{name}\"")) {
            let pid = line.split_whitespace().next().unwrap();
            let status = std::process::Command::new("rabbitmqctl")
                .args(["close_connection", pid, "test: dropped connection"])
                .status()
                .unwrap();
            if status.success() {
                closed += 1;
            }
        }
    }
    closed
}
