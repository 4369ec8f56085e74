//! Paths off the happy road: failed republishes, publisher reconnect, reload, shutdown
//! limits and signals, the circuit probe, redirects, `dlq replay` filters and failures,
//! broker failover, the ack fallback, and a session lost mid-stream.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::future::join_all;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use tokio::time::Instant;

use crate::helpers::*;

/// An `[[account]]` table with batches of `batch_size`, flushed after 50 ms.
fn account(id: &str, url: &str, batch_size: usize) -> String {
    format!(
        "[[account]]\nid = \"{id}\"\ncompanies_url = \"{url}\"\nbatch_size = {batch_size}\nflush_interval = \"50ms\"\n\n"
    )
}

/// The test's names and its broker connection, with the one `30s` tier most tests use.
async fn on_broker() -> (Names, Broker) {
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    (names, broker)
}

/// A circuit that never opens, for tests about something else.
const NO_CIRCUIT: &str = "[circuit]\nfailure_threshold = 100000";

/// One immediate attempt, then the `30s` tier.
const ONE_ATTEMPT: &str = "immediate_attempts = 1\nschedule = [\"30s\"]";

/// Parses a configuration text with an empty environment.
fn clean_settings(text: &str) -> courier::config::Settings {
    courier::config::parse(Path::new("test.toml"), text, &|_| None)
        .unwrap_or_else(|e| panic!("test config invalid: {e}\n{text}"))
}

fn bodies(prefix: &str, account: &str, kind: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| event(&format!("{prefix}{i}"), account, kind))
        .collect()
}

fn ids(bodies: &[Vec<u8>]) -> HashSet<String> {
    bodies.iter().map(|b| event_id(b)).collect()
}

/// Messages ready in `queue`, or `None` when it does not exist.
async fn ready(broker: &Broker, queue: &str) -> Option<u32> {
    let channel = broker.conn.create_channel().await.unwrap();
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    channel
        .queue_declare(queue.into(), passive, FieldTable::default())
        .await
        .ok()
        .map(|q| q.message_count())
}

async fn delete_queue(broker: &Broker, queue: &str) {
    let channel = broker.conn.create_channel().await.unwrap();
    channel
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await
        .unwrap_or_else(|e| panic!("deleting {queue}: {e}"));
    assert_eq!(ready(broker, queue).await, None, "{queue} still there");
}

/// Waits until `queue` holds `n` messages, then takes them all.
async fn take(broker: &Broker, queue: &str, n: u32) -> Vec<(Vec<u8>, FieldTable)> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while ready(broker, queue).await.expect("queue exists") < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    broker.drain(queue).await
}

/// The ids of what `take` took.
async fn take_ids(broker: &Broker, queue: &str, n: u32) -> Vec<String> {
    let taken = take(broker, queue, n).await;
    taken.iter().map(|(body, _)| event_id(body)).collect()
}

/// Takes `n` dead letters: event id and `x-courier-reason` of each.
async fn take_dead(broker: &Broker, n: u32) -> Vec<(String, String)> {
    let taken = take(broker, &broker.names.dead(), n).await;
    taken
        .iter()
        .map(|(body, headers)| {
            let reason = header_str(headers, "x-courier-reason").unwrap_or_default();
            (event_id(body), reason)
        })
        .collect()
}

fn count_of(ids: &[String], id: &str) -> usize {
    ids.iter().filter(|i| *i == id).count()
}

/// Ids of every request the receiver got, answered or not, whatever the status.
fn requested_ids(receiver: &Receiver) -> Vec<String> {
    receiver.requests().iter().flat_map(Recorded::ids).collect()
}

fn run_courier(config: &Path) -> Proc {
    let log = std::fs::File::create(config.with_file_name("courier.log")).unwrap();
    Proc(
        courier(&["run", "--config", config.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    )
}

async fn admin_metric(admin: u16, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_value(&http_get(admin, "/metrics").await.1, name, labels)
}

fn signal(child: &Child, signal: libc::c_int) {
    unsafe { libc::kill(child.id() as i32, signal) };
}

/// A republish that the broker returns (its queue deleted) must give the original back
/// to the delivery queue: the receiver sees the event again, and gets it once it accepts.
async fn a_failed_republish_returns_the_original(status: u16, target: fn(&Names) -> String) {
    let receiver = Receiver::start().await;
    receiver.set_status(status);
    let (names, broker) = on_broker().await;
    let spec = ConfigSpec {
        // Returns must not reach the delivery limit while the test runs.
        broker: "delivery_limit = 100000".into(),
        retry: ONE_ATTEMPT.into(),
        top: NO_CIRCUIT.into(),
        accounts: account("acme", &receiver.url("/hook"), 1),
        ..Default::default()
    };
    let worker = TestWorker::spawn(settings(&names, &spec)).await;
    delete_queue(&broker, &target(&names)).await;
    broker.publish(&[event("back", "acme", "company")]).await;
    let returned = || count_of(&requested_ids(&receiver), "back") >= 3;
    assert!(
        eventually(Duration::from_secs(10), returned).await,
        "the original did not come back after a failed republish: {} request(s)",
        receiver.requests().len()
    );
    receiver.set_status(200);
    assert_eq!(
        receiver.wait_for_events(1, Duration::from_secs(10)).await,
        1
    );
    assert_eq!(receiver.delivered_ids(), vec!["back"]);
    // No republish landed, so none is counted.
    assert_eq!(
        worker.metric("courier_events_retried_total", &[("stage", "scheduled")]),
        0.0
    );
    assert_eq!(
        worker.metric("courier_events_dead_lettered_total", &[]),
        0.0
    );
    worker.shutdown().await;
    assert_eq!(ready(&broker, &names.deliver()).await, Some(0));
}

#[tokio::test]
async fn a_failed_republish_to_a_retry_tier_returns_the_original() {
    a_failed_republish_returns_the_original(500, |n| format!("{}.retry.30s", n.prefix)).await;
}

#[tokio::test]
async fn a_failed_republish_to_the_dead_letter_queue_returns_the_original() {
    a_failed_republish_returns_the_original(400, Names::dead).await;
}
#[tokio::test]
async fn the_publisher_reconnects_after_the_broker_closed_its_connection() {
    let receiver = Receiver::start().await;
    receiver.set_status(500);
    receiver.reject_bodies_with("\"id\":\"dl-", 400);
    let (names, broker) = on_broker().await;
    let spec = ConfigSpec {
        retry: ONE_ATTEMPT.into(),
        top: NO_CIRCUIT.into(),
        accounts: account("acme", &receiver.url("/hook"), 1),
        ..Default::default()
    };
    let worker = TestWorker::spawn(settings(&names, &spec)).await;
    let name = format!("courier publish {}", names.prefix);
    let old = close_named(None, &name).await;
    assert_eq!(old.len(), 1, "one publish connection named {name}");
    broker
        .publish(&[
            event("dl-1", "acme", "company"),
            event("rt-1", "acme", "company"),
        ])
        .await;
    let tier = format!("{}.retry.30s", names.prefix);
    assert_eq!(
        take_dead(&broker, 1).await,
        vec![("dl-1".to_owned(), "rejected_400".to_owned())]
    );
    assert_eq!(take_ids(&broker, &tier, 1).await, vec!["rt-1"]);
    assert!(
        wait_for_new_connection(&name, &old, Duration::from_secs(10)).await,
        "no new publish connection"
    );
    // Each republish landed at its first try: no original went back for another request.
    let requested = requested_ids(&receiver);
    assert_eq!(count_of(&requested, "dl-1"), 1, "{requested:?}");
    assert_eq!(count_of(&requested, "rt-1"), 1, "{requested:?}");
    worker.shutdown().await;
    assert_eq!(ready(&broker, &names.deliver()).await, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_that_meet_a_reconnect_share_it_and_land_once() {
    let (names, broker) = on_broker().await;
    let spec = ConfigSpec {
        accounts: account("acme", "http://127.0.0.1:9/hook", 1),
        ..Default::default()
    };
    let settings = settings(&names, &spec);
    let (publisher, name) = topology_and_publisher(&settings, &names).await;
    assert_eq!(publisher.connects(), 1);
    let old = close_named(None, &name).await;
    assert_eq!(old.len(), 1, "one publisher connection named {name}");
    // One publish starts every millisecond: some find the connection broken, some come
    // while the reconnect is under way, some after it. None may open a connection of its
    // own, which would close the new one under the publishes written on it.
    let queue = names.dead();
    let n = 60;
    let published = join_all((0..n).map(|i| {
        let (publisher, queue) = (&publisher, &queue);
        async move {
            tokio::time::sleep(Duration::from_millis(i)).await;
            let body = event(&format!("p-{i}"), "acme", "company");
            let properties = lapin::BasicProperties::default().with_delivery_mode(2);
            publisher.publish("", queue, &body, properties).await
        }
    }))
    .await;
    assert!(published.iter().all(Result::is_ok), "{published:?}");
    assert_eq!(publisher.connects(), 2, "one reconnect for all");
    let landed = take_ids(&broker, &queue, n as u32).await;
    assert_eq!(
        landed.len(),
        n as usize,
        "each publish landed once: {landed:?}"
    );
    let expected: HashSet<String> = (0..n).map(|i| format!("p-{i}")).collect();
    assert_eq!(landed.into_iter().collect::<HashSet<_>>(), expected);
    publisher.close().await;
}

#[tokio::test]
async fn sighup_adds_a_tier_applies_delivery_and_dead_letters_a_removed_account() {
    let acme = Receiver::start().await;
    acme.set_delay(Duration::from_millis(1000));
    let gone = Receiver::start().await;
    let names = Names::new();
    let broker = Broker::connect(&names, &["1s", "30s"]).await;
    let spec = ConfigSpec {
        delivery: "timeout = \"300ms\"".into(),
        retry: ONE_ATTEMPT.into(),
        top: NO_CIRCUIT.into(),
        accounts: account("acme", &acme.url("/a"), 1) + &account("gone", &gone.url("/g"), 1),
        ..Default::default()
    };
    let (text, admin) = config_with_admin(&names, &spec);
    let path = write_config(&text);
    let mut child = run_courier(&path);
    assert!(wait_ready(admin).await, "never ready");
    let (tier_1s, tier_30s) = (
        format!("{}.retry.1s", names.prefix),
        format!("{}.retry.30s", names.prefix),
    );
    // Before: a request slower than the timeout fails and parks; the other account delivers.
    broker
        .publish(&[
            event("slow-1", "acme", "company"),
            event("g-1", "gone", "company"),
        ])
        .await;
    assert_eq!(gone.wait_for_events(1, Duration::from_secs(10)).await, 1);
    assert_eq!(take_ids(&broker, &tier_30s, 1).await, vec!["slow-1"]);
    assert_eq!(ready(&broker, &tier_1s).await, None, "no 1s tier yet");

    let new = text
        .replace("timeout = \"300ms\"", "timeout = \"5s\"")
        .replace("schedule = [\"30s\"]", "schedule = [\"1s\", \"30s\"]")
        .replace(&account("gone", &gone.url("/g"), 1), "");
    assert_ne!(new, text);
    assert!(!new.contains("id = \"gone\""));
    std::fs::write(&path, new).unwrap();
    sighup(&child.0);
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            admin_metric(admin, "courier_config_reloads_total", &[("result", "ok")]).await == 1.0
        })
        .await,
        "reload not applied"
    );
    assert_eq!(
        ready(&broker, &tier_1s).await,
        Some(0),
        "the new tier's queue is declared"
    );
    broker
        .publish(&[
            event("slow-2", "acme", "company"),
            event("g-2", "gone", "company"),
        ])
        .await;
    // The new timeout: the 1 s answer now arrives in time.
    assert_eq!(acme.wait_for_events(1, Duration::from_secs(10)).await, 1);
    assert_eq!(acme.delivered_ids(), vec!["slow-2"]);
    // The removed account: its new event is an unknown_account dead letter.
    assert_eq!(
        take_dead(&broker, 1).await,
        vec![("g-2".to_owned(), "unknown_account".to_owned())]
    );
    assert_eq!(gone.delivered_ids(), vec!["g-1"]);
    // The new first tier is where a failure goes now.
    acme.set_status(500);
    acme.set_delay(Duration::ZERO);
    broker.publish(&[event("tier", "acme", "company")]).await;
    assert_eq!(
        broker
            .wait_for_depth(&tier_1s, 1, Duration::from_secs(10))
            .await,
        1,
        "nothing parked in the new tier"
    );
    sigterm(&child.0);
    assert_eq!(
        wait_exit(&mut child.0, Duration::from_secs(20)).await,
        Some(0)
    );
}

#[tokio::test]
async fn shutdown_timeout_running_out_exits_and_leaves_the_rest_for_redelivery() {
    let receiver = Receiver::start().await;
    receiver.set_delay(Duration::from_secs(120)); // never answers while the test runs
    let (names, broker) = on_broker().await;
    let spec = ConfigSpec {
        top: "shutdown_timeout = \"1s\"".into(),
        delivery: "timeout = \"5m\"".into(),
        accounts: account("acme", &receiver.url("/hook"), 1),
        ..Default::default()
    };
    let (text, admin) = config_with_admin(&names, &spec);
    let path = write_config(&text);
    let mut child = run_courier(&path);
    assert!(wait_ready(admin).await, "never ready");
    let published = bodies("st", "acme", "company", 5);
    broker.publish(&published).await;
    assert!(
        eventually(Duration::from_secs(10), || receiver.requests().len() == 5).await,
        "not every request in flight"
    );
    sigterm(&child.0);
    let signalled = std::time::Instant::now();
    assert_eq!(
        wait_exit(&mut child.0, Duration::from_secs(30)).await,
        Some(0),
        "no exit while the requests were held"
    );
    eprintln!(
        "figures shutdown: exit {:.1} s after SIGTERM with shutdown_timeout = 1s",
        signalled.elapsed().as_secs_f64()
    );
    assert!(receiver.accepted().is_empty());
    let returned: HashSet<String> = take_ids(&broker, &names.deliver(), 5)
        .await
        .into_iter()
        .collect();
    assert_eq!(returned, ids(&published), "unsettled messages returned");
}

#[tokio::test]
async fn sigint_flushes_open_batches_and_exits_0() {
    let receiver = Receiver::start().await;
    let (names, broker) = on_broker().await;
    let spec = ConfigSpec {
        accounts: format!(
            "[[account]]\nid = \"acme\"\ncompanies_url = \"{}\"\nbatch_size = 200\nflush_interval = \"5m\"\n",
            receiver.url("/hook")
        ),
        ..Default::default()
    };
    let (text, admin) = config_with_admin(&names, &spec);
    let path = write_config(&text);
    let mut child = run_courier(&path);
    assert!(wait_ready(admin).await, "never ready");
    let published = bodies("int", "acme", "company", 10);
    broker.publish(&published).await;
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            admin_metric(admin, "courier_buffered_events", &[]).await == 10.0
        })
        .await,
        "events not buffered"
    );
    assert!(receiver.requests().is_empty(), "flushed before the signal");
    signal(&child.0, libc::SIGINT);
    assert_eq!(
        wait_exit(&mut child.0, Duration::from_secs(20)).await,
        Some(0),
        "exit code after SIGINT"
    );
    let delivered: HashSet<String> = receiver.delivered_ids().into_iter().collect();
    assert_eq!(delivered, ids(&published), "the open batch was delivered");
    assert_eq!(ready(&broker, &names.deliver()).await, Some(0), "all acked");
}

/// A worker whose one destination has just opened its circuit (the receiver answering
/// 500, threshold 2, cooldown 500 ms) with nothing in flight: its next request is a probe.
struct OpenCircuit {
    receiver: Receiver,
    broker: Broker,
    worker: TestWorker,
    early: Vec<Vec<u8>>,
}

impl OpenCircuit {
    async fn start() -> Self {
        let receiver = Receiver::start().await;
        receiver.set_status(500);
        let names = Names::new();
        let schedule = ["200ms", "400ms", "600ms", "800ms", "1s", "2s", "3s", "5s"];
        let broker = Broker::connect(&names, &schedule).await;
        let spec = ConfigSpec {
            delivery: "timeout = \"10s\"".into(),
            retry: format!("immediate_attempts = 1\nschedule = {schedule:?}"),
            top: "[circuit]\nfailure_threshold = 2\ncooldown = \"500ms\"\nmax_cooldown = \"500ms\""
                .into(),
            accounts: account("acme", &receiver.url("/hook"), 1),
            ..Default::default()
        };
        let worker = TestWorker::spawn(settings(&names, &spec)).await;
        let early = bodies("early", "acme", "company", 4);
        broker.publish(&early).await;
        let open = || worker.metric("courier_circuit_open", &[("account", "acme")]) == 1.0;
        assert!(
            eventually(Duration::from_secs(10), open).await,
            "the circuit never opened"
        );
        // Requests sent before it opened are answered: from now on only probes go out.
        let idle = || worker.metric("courier_inflight_requests", &[]) == 0.0;
        assert!(eventually(Duration::from_secs(10), idle).await);
        Self {
            receiver,
            broker,
            worker,
            early,
        }
    }

    /// With the receiver answering 200: later batches are sent and delivered, the circuit
    /// closes, and nothing is lost (every event delivered or dead-lettered).
    async fn recovers(self, refused: &str) {
        let Self {
            receiver,
            broker,
            worker,
            early,
        } = self;
        let later = bodies("late", "acme", "company", 3);
        broker.publish(&later).await;
        let arrived = || ids(&later).is_subset(&receiver.delivered_ids().into_iter().collect());
        assert!(
            eventually(Duration::from_secs(15), arrived).await,
            "{refused}"
        );
        let closed = || worker.metric("courier_circuit_open", &[("account", "acme")]) == 0.0;
        assert!(eventually(Duration::from_secs(5), closed).await);
        let all: HashSet<String> = ids(&early).union(&ids(&later)).cloned().collect();
        let dead = broker.names.dead();
        let missing = || {
            let delivered: HashSet<String> = receiver.delivered_ids().into_iter().collect();
            all.difference(&delivered).count() as u32
        };
        assert!(
            eventually_async(Duration::from_secs(20), || async {
                ready(&broker, &dead).await.unwrap_or(0) >= missing()
            })
            .await,
            "events neither delivered nor dead-lettered"
        );
        worker.shutdown().await;
        let mut accounted: HashSet<String> = receiver.delivered_ids().into_iter().collect();
        accounted.extend(take_ids(&broker, &dead, 0).await);
        assert!(
            accounted.is_superset(&all),
            "lost {:?}",
            all.difference(&accounted)
        );
    }
}

#[tokio::test]
async fn a_rejected_probe_does_not_refuse_the_destination_for_ever() {
    let circuit = OpenCircuit::start().await;
    circuit.receiver.script(&[400]);
    circuit.receiver.set_status(200);
    let rejected = || {
        circuit.worker.metric(
            "courier_events_dead_lettered_total",
            &[("reason", "rejected_400")],
        ) == 1.0
    };
    assert!(
        eventually(Duration::from_secs(10), rejected).await,
        "no probe was rejected"
    );
    let statuses: Vec<u16> = circuit
        .receiver
        .requests()
        .iter()
        .map(|r| r.status)
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == 400).count(),
        1,
        "{statuses:?}"
    );
    circuit
        .recovers("the destination stays refused after a rejected probe")
        .await;
}

#[tokio::test]
async fn a_probe_cut_off_by_a_lost_session_does_not_refuse_the_destination_for_ever() {
    let circuit = OpenCircuit::start().await;
    // The probe is held at the receiver when the session is lost.
    circuit.receiver.set_delay(Duration::from_secs(3));
    circuit.receiver.set_status(200);
    let held = || circuit.receiver.requests().iter().any(|r| !r.answered);
    assert!(
        eventually(Duration::from_secs(10), held).await,
        "no probe went out"
    );
    let name = format!("courier consume {}", circuit.broker.names.prefix);
    assert_eq!(close_named(None, &name).await.len(), 1, "no {name}");
    circuit.receiver.set_delay(Duration::ZERO);
    let reconnected = || {
        circuit
            .worker
            .metric("courier_broker_reconnects_total", &[])
            >= 1.0
    };
    assert!(
        eventually(Duration::from_secs(20), reconnected).await,
        "no reconnect"
    );
    circuit
        .recovers("the destination stays refused after its probe's session was lost")
        .await;
}

/// A receiver that answers every request with a redirect to `location`; counts them.
async fn redirector(status: u16, location: String) -> (String, Arc<AtomicUsize>) {
    use axum::http::{StatusCode, header};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().fallback(move || {
        counter.fetch_add(1, Ordering::SeqCst);
        let location = location.clone();
        async move {
            (
                StatusCode::from_u16(status).unwrap(),
                [(header::LOCATION, location)],
            )
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/hook"), hits)
}

#[tokio::test]
async fn redirects_are_never_followed_and_count_as_retryable() {
    let elsewhere = Receiver::start().await;
    let (found, found_hits) = redirector(302, elsewhere.url("/stolen")).await;
    let (temporary, temporary_hits) = redirector(307, elsewhere.url("/stolen")).await;
    let (names, broker) = on_broker().await;
    let spec = ConfigSpec {
        retry: "immediate_attempts = 2\nschedule = [\"30s\"]".into(),
        top: NO_CIRCUIT.into(),
        accounts: account("found", &found, 1) + &account("temporary", &temporary, 1),
        ..Default::default()
    };
    let worker = TestWorker::spawn(settings(&names, &spec)).await;
    broker
        .publish(&[
            event("r302", "found", "company"),
            event("r307", "temporary", "company"),
        ])
        .await;
    let tier = format!("{}.retry.30s", names.prefix);
    assert_eq!(
        broker
            .wait_for_depth(&tier, 2, Duration::from_secs(15))
            .await,
        2,
        "a redirect is retried, then parked"
    );
    assert!(
        elsewhere.requests().is_empty(),
        "a redirect was followed: {:?}",
        elsewhere.requests()
    );
    // Both immediate attempts went to the redirecting receivers, none elsewhere.
    assert_eq!(found_hits.load(Ordering::SeqCst), 2);
    assert_eq!(temporary_hits.load(Ordering::SeqCst), 2);
    assert_eq!(
        worker.metric("courier_requests_total", &[("outcome", "retryable")]),
        4.0
    );
    worker.shutdown().await;
    let parked = broker.drain(&tier).await;
    for (body, headers) in &parked {
        let error = header_str(headers, "x-courier-last-error").unwrap();
        let status = if event_id(body) == "r302" {
            "302"
        } else {
            "307"
        };
        assert!(error.contains(status), "{error}");
    }
    assert!(elsewhere.requests().is_empty());
}

/// Runs `courier dlq replay ARGS`; its exit code and output.
fn replay(config: &str, args: &[&str]) -> (i32, String, String) {
    let mut all = vec!["dlq", "replay", "--config", config];
    all.extend_from_slice(args);
    output(&mut courier(&all))
}

#[tokio::test]
async fn dlq_replay_moves_what_account_type_and_limit_select_and_keeps_all_on_failure() {
    let (names, broker) = on_broker().await;
    let nowhere = "http://127.0.0.1:9/";
    let spec = ConfigSpec {
        accounts: account("a", nowhere, 1) + &account("b", nowhere, 1),
        ..Default::default()
    };
    let path = write_config(&config_text(&names, &spec));
    let config = path.to_str().unwrap();
    let (code, _, stderr) = output(&mut courier(&["setup", "--config", config]));
    assert_eq!(code, 0, "{stderr}");
    let a_company = bodies("ac", "a", "company", 6);
    let a_contact = bodies("an", "a", "contact", 3);
    let b_company = bodies("bc", "b", "company", 5);
    let mut dead = a_company.clone();
    dead.extend(b_company.clone());
    dead.extend(a_contact.clone());
    broker.publish_to_queue(&names.dead(), &dead).await;
    let mut left = ids(&dead);
    let steps: [(&[&str], HashSet<String>); 2] = [
        (&["--account", "b"], ids(&b_company)),
        (&["--type", "contact"], ids(&a_contact)),
    ];
    for (args, expected) in steps {
        let (code, stdout, stderr) = replay(config, args);
        assert_eq!(code, 0, "{args:?}: {stderr}");
        assert!(
            stdout.contains(&format!("replayed {}", expected.len())),
            "{args:?}: {stdout}"
        );
        let moved: HashSet<String> = take_ids(&broker, &names.deliver(), expected.len() as u32)
            .await
            .into_iter()
            .collect();
        assert_eq!(moved, expected, "{args:?}");
        left.retain(|id| !expected.contains(id));
        let stayed = take_ids(&broker, &names.dead(), left.len() as u32).await;
        assert_eq!(stayed.iter().cloned().collect::<HashSet<_>>(), left);
        broker
            .publish_to_queue(
                &names.dead(),
                &dead
                    .iter()
                    .filter(|b| left.contains(&event_id(b)))
                    .cloned()
                    .collect::<Vec<_>>(),
            )
            .await;
    }
    let (code, stdout, stderr) = replay(config, &["--limit", "2"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("replayed 2"), "{stdout}");
    let moved = take_ids(&broker, &names.deliver(), 2).await;
    assert_eq!(moved.len(), 2, "{moved:?}");
    assert!(moved.iter().all(|id| left.remove(id)), "{moved:?}");
    // A replay whose publish fails (no delivery queue): exit 1, every dead letter stays.
    delete_queue(&broker, &names.deliver()).await;
    let (code, _, stderr) = replay(config, &[]);
    assert_eq!(code, 1, "{stderr}");
    let stayed: Vec<String> = take_ids(&broker, &names.dead(), left.len() as u32).await;
    assert_eq!(stayed.len(), left.len(), "{stayed:?}");
    assert_eq!(stayed.into_iter().collect::<HashSet<_>>(), left);
}

/// A TCP port whose listener closes every connection at once: a dead broker node.
async fn dead_node() -> (u16, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tries = Arc::new(AtomicUsize::new(0));
    let counter = tries.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(socket);
        }
    });
    (port, tries)
}

#[tokio::test]
async fn a_dead_first_node_in_the_url_list_is_passed_over() {
    let (port, tries) = dead_node().await;
    let receiver = Receiver::start().await;
    let (names, broker) = on_broker().await;
    let spec = ConfigSpec {
        accounts: account("acme", &receiver.url("/hook"), 5),
        ..Default::default()
    };
    let urls = [
        format!("amqp://guest:guest@127.0.0.1:{port}/%2f"),
        amqp_url(),
    ];
    let worker = TestWorker::spawn(clean_settings(&with_nodes(&names, &spec, &urls))).await;
    assert!(
        tries.load(Ordering::SeqCst) >= 2,
        "the consume and publish connections try the first node first"
    );
    let published = bodies("f", "acme", "company", 10);
    broker.publish(&published).await;
    assert_eq!(
        receiver.wait_for_events(10, Duration::from_secs(10)).await,
        10
    );
    assert_eq!(
        receiver.delivered_ids().into_iter().collect::<HashSet<_>>(),
        ids(&published)
    );
    worker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_moves_to_the_next_node_when_its_node_stops() {
    let node = PrivateNode::start().await;
    let receiver = Receiver::start().await;
    let (names, broker) = on_broker().await;
    let spec = ConfigSpec {
        accounts: account("acme", &receiver.url("/hook"), 5),
        ..Default::default()
    };
    let urls = [node.url(), amqp_url()];
    let worker = TestWorker::spawn(clean_settings(&with_nodes(&names, &spec, &urls))).await;
    let on_private = bodies("p", "acme", "company", 5);
    publish_with_cli(&with_nodes(&names, &spec, &[node.url()]), &on_private);
    assert_eq!(
        receiver.wait_for_events(5, Duration::from_secs(10)).await,
        5,
        "the worker consumes from the first node"
    );
    node.stop().await;
    let stopped = std::time::Instant::now();
    assert!(
        eventually(Duration::from_secs(30), || worker
            .metric("courier_broker_reconnects_total", &[])
            >= 1.0)
        .await,
        "no reconnect after the node stopped"
    );
    let on_shared = bodies("s", "acme", "company", 5);
    broker.publish(&on_shared).await;
    assert_eq!(
        receiver
            .wait_for_distinct(10, Duration::from_secs(15))
            .await,
        10
    );
    let mut all = ids(&on_private);
    all.extend(ids(&on_shared));
    assert_eq!(
        receiver.delivered_ids().into_iter().collect::<HashSet<_>>(),
        all
    );
    let recovered = stopped.elapsed();
    worker.shutdown().await;
    assert_eq!(ready(&broker, &names.deliver()).await, Some(0));
    print_figures(
        "node stopped",
        all.len(),
        &receiver.delivered_ids(),
        0,
        recovered,
    );
}

#[tokio::test]
async fn a_stuck_batch_at_the_watermark_does_not_stall_a_healthy_destination() {
    let stuck = Receiver::start().await;
    stuck.set_delay(Duration::from_secs(120));
    let healthy = Receiver::start().await;
    let (names, broker) = on_broker().await;
    let spec = ConfigSpec {
        top: "shutdown_timeout = \"1s\"".into(),
        broker: "prefetch = 20".into(),
        delivery: "timeout = \"5m\"".into(),
        accounts: account("stuck", &stuck.url("/s"), 1) + &account("good", &healthy.url("/g"), 10),
        ..Default::default()
    };
    let worker = TestWorker::spawn(settings(&names, &spec)).await;
    // The stuck event takes the lowest delivery tag and holds it.
    broker.publish(&[event("held", "stuck", "company")]).await;
    assert!(eventually(Duration::from_secs(10), || stuck.requests().len() == 1).await);
    // Fifteen windows of the healthy destination behind it: each needs acks past the
    // stuck tag.
    let published = bodies("g", "good", "company", 300);
    broker.publish(&published).await;
    assert_eq!(
        healthy.wait_for_events(300, Duration::from_secs(20)).await,
        300,
        "the healthy destination stalled behind the stuck tag"
    );
    assert_eq!(
        healthy.delivered_ids().into_iter().collect::<HashSet<_>>(),
        ids(&published)
    );
    // Acked, not only delivered: the broker holds just the stuck one unacknowledged.
    let deliver = names.deliver();
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            unacked(&deliver).await == Some(1)
        })
        .await,
        "unacked: {:?}",
        unacked(&deliver).await
    );
    worker.shutdown().await;
    assert!(stuck.accepted().is_empty());
    assert_eq!(take_ids(&broker, &deliver, 1).await, vec!["held"]);
}

fn attempt(request: &Recorded) -> u32 {
    request
        .header("x-courier-attempt")
        .and_then(|a| a.parse().ok())
        .expect("x-courier-attempt")
}

#[tokio::test]
async fn a_session_lost_mid_stream_leaves_no_work_behind() {
    let receiver = Receiver::start().await;
    receiver.set_status(503);
    receiver.set_delay(Duration::from_millis(300)); // fails slowly
    let (names, broker) = on_broker().await;
    let spec = ConfigSpec {
        delivery: "timeout = \"2s\"\nmax_inflight_per_destination = 4".into(),
        retry: "immediate_attempts = 20\nmax_interval = \"600ms\"\nschedule = [\"30s\"]".into(),
        top: "shutdown_timeout = \"3s\"\n[circuit]\nfailure_threshold = 100000".into(),
        accounts: account("acme", &receiver.url("/hook"), 1),
        ..Default::default()
    };
    let worker = TestWorker::spawn(settings(&names, &spec)).await;
    let published = bodies("m", "acme", "company", 10);
    broker.publish(&published).await;
    // Mid-stream: every event tried, requests in flight, others in backoff.
    let mid_stream = || {
        let requests = receiver.requests();
        let tried: HashSet<String> = requests.iter().flat_map(Recorded::ids).collect();
        tried == ids(&published) && requests.iter().any(|r| attempt(r) >= 2)
    };
    assert!(eventually(Duration::from_secs(10), mid_stream).await);
    let name = format!("courier consume {}", names.prefix);
    assert_eq!(close_named(None, &name).await.len(), 1, "no {name}");
    let closed = std::time::Instant::now();
    receiver.set_status(200);
    assert!(
        eventually(Duration::from_secs(20), || worker
            .metric("courier_broker_reconnects_total", &[])
            >= 1.0)
        .await,
        "no reconnect"
    );
    assert_eq!(
        receiver
            .wait_for_distinct(10, Duration::from_secs(20))
            .await,
        10,
        "lost events"
    );
    let recovered = closed.elapsed();
    // Whatever the old session's tasks would still do, they have done once shutdown ends.
    worker.shutdown().await;
    let requests = receiver.requests();
    for id in ids(&published) {
        let after: Vec<&Recorded> = requests
            .iter()
            .filter(|r| r.at > closed && r.ids() == [id.as_str()])
            .collect();
        // The new session's requests for a redelivered event start at attempt 1; requests
        // of the old session started before it noticed the loss come first.
        let Some(new) = after.iter().position(|r| attempt(r) == 1) else {
            continue;
        };
        let attempts: Vec<u32> = after.iter().map(|r| attempt(r)).collect();
        let own: Vec<u32> = (1..=(after.len() - new) as u32).collect();
        assert_eq!(
            attempts[new..],
            own,
            "{id}: a request of the lost session after the reconnect (attempts after the close: {attempts:?})"
        );
        let accepted = after[new..].iter().filter(|r| r.status == 200).count();
        assert!(
            accepted <= 1,
            "{id}: delivered {accepted} times by the new session"
        );
    }
    // Duplicates come only from requests the old session had started: each was accepted
    // before the new session's first request for it (checked above).
    let delivered: HashSet<String> = receiver.delivered_ids().into_iter().collect();
    assert_eq!(delivered, ids(&published), "nothing lost");
    let tier = format!("{}.retry.30s", names.prefix);
    assert_eq!(
        ready(&broker, &tier).await,
        Some(0),
        "the lost session republished"
    );
    print_figures(
        "session lost mid-stream",
        published.len(),
        &receiver.delivered_ids(),
        0,
        recovered,
    );
}
