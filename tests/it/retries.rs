//! Durable retries, Retry-After, the circuit breaker, dead-letter replay, the delivery
//! limit, isolation of slow destinations and SIGHUP reload.

use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;

use crate::helpers::*;

fn account(receiver: &Receiver, batch_size: usize) -> String {
    format!(
        "[[account]]\nid = \"acme\"\ncompanies_url = \"{}\"\nbatch_size = {batch_size}\nflush_interval = \"50ms\"\n",
        receiver.url("/hook")
    )
}

fn ids_of(bodies: &[Vec<u8>]) -> HashSet<String> {
    bodies.iter().map(|b| event_id(b)).collect()
}

#[tokio::test]
async fn a_receiver_down_longer_than_the_immediate_attempts_gets_everything_through_the_tiers() {
    let receiver = Receiver::start().await;
    receiver.set_status(503);
    let names = Names::new();
    let broker = Broker::connect(&names, &["1s", "2s", "10s"]).await;
    let spec = ConfigSpec {
        retry: "immediate_attempts = 2\nschedule = [\"1s\", \"2s\", \"10s\"]".into(),
        top: "[circuit]\nfailure_threshold = 1000".into(),
        accounts: account(&receiver, 10),
        ..Default::default()
    };
    let worker = TestWorker::spawn(settings(&names, &spec)).await;
    let bodies: Vec<Vec<u8>> = (0..20)
        .map(|i| event(&format!("r{i}"), "acme", "company"))
        .collect();
    broker.publish(&bodies).await;
    // The events park in the first tier.
    let tier = format!("{}.retry.1s", names.prefix);
    assert!(
        broker
            .wait_for_depth(&tier, 1, Duration::from_secs(10))
            .await
            >= 1,
        "no event reached {tier}"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    receiver.set_status(200);
    assert_eq!(
        receiver.wait_for_events(20, Duration::from_secs(20)).await,
        20
    );
    assert_eq!(
        receiver.delivered_ids().into_iter().collect::<HashSet<_>>(),
        ids_of(&bodies)
    );
    assert!(worker.metric("courier_events_retried_total", &[("stage", "scheduled")]) >= 20.0);
    // A batch formed again after a tier starts counting attempts at 1.
    let delivered = receiver.accepted();
    assert!(
        delivered
            .iter()
            .all(|r| r.header("x-courier-attempt") == Some("1"))
    );
    worker.shutdown().await;
    assert_eq!(broker.depth(&names.dead()).await, 0);
}

#[tokio::test]
async fn a_receiver_that_never_recovers_ends_in_the_dlq_which_lists_and_replays() {
    let receiver = Receiver::start().await;
    receiver.set_status(500);
    let names = Names::new();
    let broker = Broker::connect(&names, &["100ms", "200ms"]).await;
    let spec = ConfigSpec {
        retry: "immediate_attempts = 1\nschedule = [\"100ms\", \"200ms\"]".into(),
        top: "[circuit]\nfailure_threshold = 1000".into(),
        accounts: account(&receiver, 5),
        ..Default::default()
    };
    let text = config_text(&names, &spec);
    let path = write_config(&text);
    let config = path.to_str().unwrap();
    let worker = TestWorker::spawn(settings(&names, &spec)).await;
    let bodies: Vec<Vec<u8>> = (0..30)
        .map(|i| event(&format!("n{i}"), "acme", "company"))
        .collect();
    broker.publish(&bodies).await;
    assert_eq!(
        broker
            .wait_for_depth(&names.dead(), 30, Duration::from_secs(20))
            .await,
        30
    );
    assert!(receiver.accepted().is_empty());

    // `dlq list` counts them and leaves every one in place.
    let (code, stdout, stderr) = output(&mut courier(&["dlq", "list", "--config", config]));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains(": 30 dead letter(s)"), "{stdout}");
    let row = stdout
        .lines()
        .find(|l| l.starts_with("retries_exhausted"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        row.contains("acme") && row.contains("company") && row.contains(" 30 "),
        "{row}"
    );
    assert_eq!(
        broker
            .wait_for_depth(&names.dead(), 30, Duration::from_secs(5))
            .await,
        30,
        "list took nothing"
    );

    // The receiver recovers; replay delivers them all.
    receiver.set_status(200);
    let (code, stdout, stderr) = output(&mut courier(&[
        "dlq",
        "replay",
        "--reason",
        "retries_exhausted",
        "--config",
        config,
    ]));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("replayed 30"), "{stdout}");
    assert_eq!(
        receiver.wait_for_events(30, Duration::from_secs(20)).await,
        30
    );
    assert_eq!(
        receiver.delivered_ids().into_iter().collect::<HashSet<_>>(),
        ids_of(&bodies)
    );
    worker.shutdown().await;
    assert_eq!(broker.depth(&names.dead()).await, 0);
}

#[tokio::test]
async fn a_replay_killed_half_way_loses_nothing() {
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let spec = ConfigSpec {
        accounts: "[[account]]\nid = \"acme\"\ncompanies_url = \"http://127.0.0.1:9/\"\n".into(),
        ..Default::default()
    };
    let path = write_config(&config_text(&names, &spec));
    let config = path.to_str().unwrap();
    let (code, _, stderr) = output(&mut courier(&["setup", "--config", config]));
    assert_eq!(code, 0, "{stderr}");
    // 2,000 dead letters, straight into the dead-letter queue.
    let bodies: Vec<Vec<u8>> = (0..2000)
        .map(|i| event(&format!("k{i}"), "acme", "company"))
        .collect();
    broker.publish_to_queue(&names.dead(), &bodies).await;
    let mut replay = Proc(
        courier(&["dlq", "replay", "--config", config])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    // Kill it once it has moved some, well before it is done.
    assert!(
        broker
            .wait_for_depth(&names.deliver(), 50, Duration::from_secs(20))
            .await
            >= 50
    );
    replay.0.kill().unwrap();
    let _ = replay.0.wait();
    // The broker returns what the killed replay held a little after the kill.
    let mut seen = broker.drain_settled_ids(&names.deliver()).await;
    let moved = seen.len();
    seen.extend(broker.drain_settled_ids(&names.dead()).await);
    assert!(moved < 2000, "the kill came after the replay finished");
    assert_eq!(
        seen,
        ids_of(&bodies),
        "delivered ∪ still dead = all ({moved} moved before the kill)"
    );
}

#[tokio::test]
async fn payload_too_large_halves_until_accepted() {
    let receiver = Receiver::start().await;
    // Bodies over 3 KiB are refused with 413: four events fit.
    receiver.reject_bodies_larger_than(3 * 1024, 413);
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let spec = ConfigSpec {
        accounts: "[[account]]\nid = \"acme\"\ncompanies_url = \"URL\"\nbatch_size = 16\nflush_interval = \"5s\"\n"
            .replace("URL", &receiver.url("/hook")),
        ..Default::default()
    };
    let worker = TestWorker::spawn(settings(&names, &spec)).await;
    let bodies: Vec<Vec<u8>> = (0..16)
        .map(|i| padded_event(&format!("big{i}"), 700))
        .collect();
    broker.publish(&bodies).await;
    assert_eq!(
        receiver.wait_for_events(16, Duration::from_secs(15)).await,
        16
    );
    assert_eq!(
        receiver.delivered_ids().into_iter().collect::<HashSet<_>>(),
        ids_of(&bodies)
    );
    assert!(receiver.accepted().iter().all(|r| r.body.len() <= 3 * 1024));
    // Four events fit in 3 KiB, eight do not: 16 → 8 + 8 → four of 4, that is three
    // splits of two halves each, in 1 + 2 + 4 requests.
    let body_of = |n: usize| 2 + bodies[..n].iter().map(|b| b.len() + 1).sum::<usize>() - 1;
    assert!(body_of(4) <= 3 * 1024 && body_of(8) > 3 * 1024);
    assert_eq!(worker.metric("courier_batch_splits_total", &[]), 6.0);
    assert_eq!(receiver.requests().len(), 7);
    worker.shutdown().await;
    assert_eq!(
        broker.depth(&names.dead()).await,
        0,
        "nothing dead-lettered"
    );
}

fn padded_event(id: &str, size: usize) -> Vec<u8> {
    let base = String::from_utf8(event(id, "acme", "company")).unwrap();
    let pad = "x".repeat(size.saturating_sub(base.len() + 12));
    base.replacen(
        "\"record\":{",
        &format!("\"record\":{{\"pad\":\"{pad}\","),
        1,
    )
    .into_bytes()
}

#[tokio::test]
async fn retry_after_sets_the_next_attempt_or_sends_to_a_tier() {
    for retry_after in ["2", "date"] {
        let receiver = Receiver::start().await;
        let names = Names::new();
        let broker = Broker::connect(&names, &["30s"]).await;
        let spec = ConfigSpec {
            retry: "max_interval = \"5s\"".into(),
            accounts: account(&receiver, 1),
            ..Default::default()
        };
        let worker = TestWorker::spawn(settings(&names, &spec)).await;
        receiver.script(&[429]);
        // An HTTP date has whole seconds: built from the next whole second, it means
        // exactly what it says (2 s after that second).
        let date = {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            std::time::UNIX_EPOCH + Duration::from_secs(now.as_secs() + 1 + 2)
        };
        let value = match retry_after {
            "date" => httpdate::fmt_http_date(date),
            seconds => seconds.to_owned(),
        };
        receiver.set_retry_after(Some(&value));
        broker.publish(&[event("ra", "acme", "company")]).await;
        assert_eq!(
            receiver.wait_for_events(1, Duration::from_secs(15)).await,
            1
        );
        let requests = receiver.requests();
        assert_eq!(requests.len(), 2);
        let waited = requests[1].at - requests[0].at;
        // The least the answer asked for, from the moment the 429 arrived.
        let asked = match retry_after {
            "date" => {
                let first_at = std::time::SystemTime::now() - requests[0].at.elapsed();
                date.duration_since(first_at).unwrap_or_default()
            }
            _ => Duration::from_secs(2),
        };
        assert!(
            waited + Duration::from_millis(50) >= asked,
            "Retry-After {value}: waited {waited:?} of {asked:?}"
        );
        assert!(waited < asked + Duration::from_secs(3));
        worker.shutdown().await;
    }

    // Longer than max_interval: no immediate attempt, the event goes to a tier.
    let receiver = Receiver::start().await;
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s", "5m"]).await;
    let spec = ConfigSpec {
        retry: "max_interval = \"1s\"\nschedule = [\"30s\", \"5m\"]".into(),
        accounts: account(&receiver, 1),
        ..Default::default()
    };
    let worker = TestWorker::spawn(settings(&names, &spec)).await;
    receiver.set_status(503);
    receiver.set_retry_after(Some("120"));
    broker.publish(&[event("long", "acme", "company")]).await;
    let tier = format!("{}.retry.5m", names.prefix);
    assert_eq!(
        broker
            .wait_for_depth(&tier, 1, Duration::from_secs(10))
            .await,
        1,
        "120 s goes to the 5m tier"
    );
    assert_eq!(receiver.requests().len(), 1, "no immediate retry");
    worker.shutdown().await;
    let parked = broker.drain(&tier).await;
    assert_eq!(
        header_str(&parked[0].1, "x-courier-retries").as_deref(),
        Some("2"),
        "the 30s tier is used up"
    );
}

#[tokio::test]
async fn the_circuit_opens_parks_events_and_closes_on_a_good_probe() {
    let receiver = Receiver::start().await;
    receiver.set_status(500);
    let names = Names::new();
    let schedule = ["300ms", "600ms", "1s", "2s", "3s", "5s", "10s"];
    let broker = Broker::connect(&names, &schedule).await;
    let spec = ConfigSpec {
        retry: format!("immediate_attempts = 1\nschedule = {schedule:?}"),
        top: "[circuit]\nfailure_threshold = 3\ncooldown = \"1500ms\"\nmax_cooldown = \"1500ms\""
            .into(),
        accounts: account(&receiver, 1),
        ..Default::default()
    };
    let worker = TestWorker::spawn(settings(&names, &spec)).await;
    let mut bodies: Vec<Vec<u8>> = (0..10)
        .map(|i| event(&format!("c{i}"), "acme", "company"))
        .collect();
    broker.publish(&bodies).await;
    let open = || worker.metric("courier_circuit_open", &[("account", "acme")]) == 1.0;
    assert!(
        eventually(Duration::from_secs(10), open).await,
        "the circuit never opened"
    );
    // While open, with a fresh event every 100 ms: at most one probe per cooldown (each
    // failed probe opens it for 1.5 s again), the rest parked in the tiers.
    // Requests let through before it opened may still arrive just after; the first probe
    // comes 1.5 s after the opening.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let opened = receiver.requests().len();
    for i in 0..30 {
        let fresh = event(&format!("w{i}"), "acme", "company");
        broker.publish(std::slice::from_ref(&fresh)).await;
        bodies.push(fresh);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let probes: Vec<_> = receiver.requests()[opened..].iter().map(|r| r.at).collect();
    for pair in probes.windows(2) {
        let gap = pair[1] - pair[0];
        assert!(
            gap >= Duration::from_millis(1450),
            "probes {gap:?} apart with a 1.5 s cooldown ({} in 3 s)",
            probes.len()
        );
    }
    // Every event was parked at least once: refused while open, or a failed probe.
    assert!(worker.metric("courier_events_retried_total", &[("stage", "scheduled")]) >= 40.0);
    // It recovers: a probe succeeds, the circuit closes, everything arrives.
    receiver.set_status(200);
    assert_eq!(
        receiver
            .wait_for_distinct(40, Duration::from_secs(30))
            .await,
        40
    );
    assert!(
        eventually(Duration::from_secs(5), || worker
            .metric("courier_circuit_open", &[("account", "acme")])
            == 0.0)
        .await
    );
    assert_eq!(
        receiver.delivered_ids().into_iter().collect::<HashSet<_>>(),
        ids_of(&bodies)
    );
    worker.shutdown().await;
}

#[tokio::test]
async fn the_broker_delivery_limit_dead_letters_and_replay_delivers() {
    let receiver = Receiver::start().await;
    receiver.set_delay(Duration::from_secs(60)); // hold the message until the kill
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let spec = ConfigSpec {
        broker: "delivery_limit = 2".into(),
        delivery: "timeout = \"90s\"".into(),
        accounts: account(&receiver, 1),
        ..Default::default()
    };
    let path = write_config(&config_text(&names, &spec));
    let config = path.to_str().unwrap();
    let (code, _, stderr) = output(&mut courier(&["setup", "--config", config]));
    assert_eq!(code, 0, "{stderr}");
    broker.publish(&[event("limited", "acme", "company")]).await;
    let mut kills = 0;
    while broker.depth(&names.dead()).await == 0 {
        assert!(kills < 6, "never dead-lettered after {kills} kills");
        let before = receiver.requests().len();
        let log = std::fs::File::create(path.with_file_name(format!("run{kills}.log"))).unwrap();
        let mut child = Proc(
            courier(&["run", "--config", config])
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let held = eventually(Duration::from_secs(20), || {
            receiver.requests().len() > before
        })
        .await;
        child.0.kill().unwrap(); // SIGKILL while the request is in flight
        let _ = child.0.wait();
        kills += 1;
        if !held {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        broker
            .wait_for_depth(&names.dead(), 1, Duration::from_secs(10))
            .await,
        1
    );
    let (code, stdout, stderr) = output(&mut courier(&["dlq", "list", "--config", config]));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("delivery_limit") && l.contains("limited")),
        "{stdout}"
    );
    // `dlq show` gives the broker's x-death summary of such a letter.
    let (code, stdout, stderr) = output(&mut courier(&[
        "dlq",
        "show",
        "--reason",
        "delivery_limit",
        "--config",
        config,
    ]));
    assert_eq!(code, 0, "{stderr}");
    let deliver = names.deliver();
    assert!(
        stdout.contains(&format!(
            "x-death: reason delivery_limit, queue {deliver}, count 1"
        )),
        "{stdout}"
    );
    receiver.set_delay(Duration::ZERO);
    let (code, stdout, stderr) = output(&mut courier(&[
        "dlq",
        "replay",
        "--reason",
        "delivery_limit",
        "--config",
        config,
    ]));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("replayed 1"), "{stdout}");
    let log = std::fs::File::create(path.with_file_name("final.log")).unwrap();
    let mut child = Proc(
        courier(&["run", "--config", config])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    assert!(
        eventually(Duration::from_secs(20), || receiver
            .delivered_ids()
            .contains(&"limited".to_string()))
        .await
    );
    sigterm(&child.0);
    assert_eq!(
        wait_exit(&mut child.0, Duration::from_secs(20)).await,
        Some(0)
    );
}

#[tokio::test]
async fn a_stuck_destination_does_not_hold_back_a_healthy_one() {
    let healthy = Receiver::start().await;
    let stuck = Receiver::start().await;
    // The stuck one answers after the 60 s timeout: a healthy destination that had to
    // wait for even one of its requests could not finish within the 20 s below.
    stuck.hold();
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let spec = ConfigSpec {
        top: "shutdown_timeout = \"1s\"".into(),
        delivery: "timeout = \"60s\"".into(),
        accounts: format!(
            "[[account]]\nid = \"good\"\ncompanies_url = \"{}\"\nbatch_size = 10\nflush_interval = \"50ms\"\n\n[[account]]\nid = \"bad\"\ncompanies_url = \"{}\"\nbatch_size = 1\n",
            healthy.url("/good"),
            stuck.url("/bad")
        ),
        ..Default::default()
    };
    let worker = TestWorker::spawn(settings(&names, &spec)).await;
    let mut bodies = Vec::new();
    for i in 0..500 {
        bodies.push(event(&format!("g{i}"), "good", "company"));
        if i % 10 == 0 {
            bodies.push(event(&format!("b{i}"), "bad", "company"));
        }
    }
    broker.publish(&bodies).await;
    assert_eq!(
        healthy.wait_for_events(500, Duration::from_secs(20)).await,
        500
    );
    // Meanwhile the stuck destination had its requests open, none answered.
    let waiting = stuck.in_flight().len();
    assert!(waiting >= 1, "the stuck destination was never tried");
    assert_eq!(stuck.requests().len(), waiting);
    worker.shutdown().await;
    stuck.release();
    // Nothing lost: the stuck events are back in the queue.
    let returned: HashSet<String> = broker.drain_settled_ids(&names.deliver()).await;
    let bad: HashSet<String> = bodies
        .iter()
        .map(|b| event_id(b))
        .filter(|id| id.starts_with('b'))
        .collect();
    assert_eq!(returned, bad, "the stuck destination's events are returned");
}

#[tokio::test]
async fn sighup_applies_a_new_batch_size_and_keeps_the_old_config_on_errors() {
    let receiver = Receiver::start().await;
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let spec = ConfigSpec {
        accounts: account(&receiver, 1),
        ..Default::default()
    };
    let text = config_text(&names, &spec);
    let path = write_config(&text);
    let Running {
        proc: mut child,
        admin,
        ..
    } = start_courier(&path, &path.with_file_name("courier.log")).await;
    broker
        .publish(&[
            event("h1", "acme", "company"),
            event("h2", "acme", "company"),
        ])
        .await;
    assert_eq!(
        receiver.wait_for_events(2, Duration::from_secs(10)).await,
        2
    );
    assert!(
        receiver.accepted().iter().all(|r| r.body[0] == b'{'),
        "batch_size 1 sends objects"
    );

    let reloads = |result: &'static str| async move {
        metric_value(
            &http_get(admin, "/metrics").await.1,
            "courier_config_reloads_total",
            &[("result", result)],
        )
    };
    std::fs::write(
        &path,
        text.replace("batch_size = 1", "batch_size = 5\nflush_interval = \"5s\"")
            .replace("flush_interval = \"50ms\"\n", ""),
    )
    .unwrap();
    sighup(&child.0);
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            reloads("ok").await == 1.0
        })
        .await,
        "reload not applied"
    );
    let five: Vec<Vec<u8>> = (0..5)
        .map(|i| event(&format!("five{i}"), "acme", "company"))
        .collect();
    broker.publish(&five).await;
    assert_eq!(
        receiver.wait_for_events(7, Duration::from_secs(10)).await,
        7
    );
    let last = receiver.accepted().pop().unwrap();
    assert_eq!(last.events().len(), 5, "the new batch_size took effect");

    // A broken file and a restart-only change are both refused; the old settings stay.
    std::fs::write(&path, "this is [not toml").unwrap();
    sighup(&child.0);
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            reloads("error").await == 1.0
        })
        .await
    );
    // Its other change (batches of 2) would show if it were applied.
    std::fs::write(
        &path,
        text.replace("batch_size = 1", "batch_size = 2\nflush_interval = \"5s\"")
            .replace("flush_interval = \"50ms\"\n", "")
            .replace("[broker]", "[broker]\nprefetch = 500"),
    )
    .unwrap();
    sighup(&child.0);
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            reloads("error").await == 2.0
        })
        .await
    );
    let more: Vec<Vec<u8>> = (0..5)
        .map(|i| event(&format!("more{i}"), "acme", "company"))
        .collect();
    broker.publish(&more).await;
    assert_eq!(
        receiver.wait_for_events(12, Duration::from_secs(10)).await,
        12
    );
    assert_eq!(
        receiver.accepted().pop().unwrap().events().len(),
        5,
        "still batching by 5"
    );
    sigterm(&child.0);
    assert_eq!(
        wait_exit(&mut child.0, Duration::from_secs(20)).await,
        Some(0)
    );
    // The refused reload named the key that needs a restart.
    let logged = std::fs::read_to_string(path.with_file_name("courier.log")).unwrap();
    assert!(
        logged.contains("broker.prefetch changed, which needs a restart"),
        "{logged}"
    );
}
