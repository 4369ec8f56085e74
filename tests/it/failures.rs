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
        retry: "immediate_attempts = 3\nschedule = [\"200ms\"]".into(),
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
    // However the events were batched: every batch was tried 3 times, once before the
    // tier and once after it, so each event was sent exactly 6 times.
    let requests = receiver.requests();
    let mut attempts: std::collections::HashMap<String, Vec<String>> = Default::default();
    for r in &requests {
        attempts
            .entry(r.header("x-courier-delivery-id").unwrap().to_owned())
            .or_default()
            .push(r.header("x-courier-attempt").unwrap().to_owned());
    }
    for (id, seen) in &attempts {
        // A delivery id may come back from the tier with its batch; each round is 1, 2, 3.
        assert!(
            seen.len() % 3 == 0 && seen.chunks(3).all(|round| round == ["1", "2", "3"]),
            "attempts of delivery {id}: {seen:?}"
        );
    }
    for body in &bodies {
        let id = event_id(body);
        let sent = requests.iter().filter(|r| r.ids().contains(&id)).count();
        assert_eq!(
            sent, 6,
            "event {id}: 3 immediate attempts, before and after the tier"
        );
    }
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
    assert_eq!(broker.settled_depth(&names.deliver()).await, 0);
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
    assert_eq!(broker.settled_depth(&names.deliver()).await, 0);
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
    // 10 → 5 + 5 (poison at index 6 in the second), 5 → 2 + 3, 2 → 1 + 1: three splits
    // of two halves each, and the 7 requests they make (the 400 for the single poison
    // dead-letters it).
    assert_eq!(worker.metric("courier_batch_splits_total", &[]), 6.0);
    assert_eq!(receiver.requests().len(), 7);
    for request in receiver.requests() {
        assert_eq!(
            request.body[0], b'[',
            "halves are still arrays, even of one"
        );
    }
    worker.shutdown().await;
}

#[tokio::test]
async fn dropped_broker_connections_lose_nothing_in_flight() {
    let receiver = Receiver::start().await;
    receiver.reject_bodies_with("\"id\":\"poison", 400);
    // Answers wait until both connections are gone: their acks meet a dead channel.
    receiver.hold();
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let spec = ConfigSpec {
        delivery: "timeout = \"20s\"".into(),
        accounts: format!(
            "[[account]]\nid = \"acme\"\ncompanies_url = \"{}\"\nbatch_size = 10\nflush_interval = \"3s\"\n",
            receiver.url("/hook")
        ),
        ..Default::default()
    };
    let worker = TestWorker::spawn(settings(&names, &spec)).await;
    let batch = |prefix: &str, n: usize, poison: usize| -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| {
                let id = if i == poison {
                    format!("poison-{prefix}")
                } else {
                    format!("{prefix}{i}")
                };
                event(&id, "acme", "company")
            })
            .collect()
    };
    // Ten full batches go out (one holds a rejected event: after the drop it is split
    // and dead-lettered through the publish connection); five events stay in an open
    // batch for 3 s.
    let first = batch("a", 105, 42);
    broker.publish(&first).await;
    let held = || receiver.in_flight().len() == 10;
    let open = || worker.metric("courier_buffered_events", &[]) == 5.0;
    assert!(
        eventually(Duration::from_secs(10), || held() && open()).await,
        "{} requests in flight, {} events in open batches",
        receiver.in_flight().len(),
        worker.metric("courier_buffered_events", &[])
    );
    for name in [
        format!("courier consume {}", names.prefix),
        format!("courier publish {}", names.prefix),
    ] {
        assert_eq!(close_connections_named(&name), 1, "connection {name}");
    }
    let dropped = std::time::Instant::now();
    assert_eq!(
        receiver.in_flight().len(),
        10,
        "requests in flight at the drop"
    );
    assert!(
        eventually(Duration::from_secs(20), || worker
            .metric("courier_broker_reconnects_total", &[])
            >= 1.0)
        .await,
        "the consumer never reconnected"
    );
    receiver.release();
    let second = batch("b", 50, 17);
    broker.publish(&second).await;

    let published: HashSet<String> = first.iter().chain(&second).map(|b| event_id(b)).collect();
    let poison: HashSet<String> = ["poison-a", "poison-b"].map(String::from).into();
    let wanted: HashSet<String> = published.difference(&poison).cloned().collect();
    let delivered = || receiver.delivered_ids().into_iter().collect::<HashSet<_>>();
    assert!(
        eventually(Duration::from_secs(30), || delivered().is_superset(&wanted)).await,
        "never delivered: {:?}",
        wanted.difference(&delivered()).collect::<Vec<_>>()
    );
    let recovered = dropped.elapsed();
    assert!(
        broker
            .wait_for_depth(&names.dead(), 2, Duration::from_secs(20))
            .await
            >= 2,
        "the rejected events were not dead-lettered"
    );
    worker.shutdown().await;
    // Redelivered events may arrive (or be dead-lettered) twice; none may be missing.
    let dead: HashSet<String> = broker.drain_settled_ids(&names.dead()).await;
    assert_eq!(dead, poison, "dead-lettered");
    let delivered = delivered();
    assert!(
        delivered.is_disjoint(&poison),
        "a rejected event was accepted"
    );
    let accounted: HashSet<String> = delivered.union(&dead).cloned().collect();
    assert_eq!(
        accounted, published,
        "delivered ∪ dead-lettered = published"
    );
    assert_eq!(broker.settled_depth(&names.deliver()).await, 0);
    print_figures(
        "dropped connections",
        published.len(),
        &receiver.delivered_ids(),
        dead.len(),
        recovered,
    );
}

/// Closes the broker connections with this client-provided name; returns how many.
/// Blocking on purpose, unlike `helpers::close_named`: the worker shares this test's
/// single-threaded runtime, so it cannot reconnect before both connections are closed
/// and the requests in flight are counted.
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
