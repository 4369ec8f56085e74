//! Per-record ordering (docs/ordering.md): the topology it declares, and the promise
//! itself under failing requests, scheduled retries, two replicas and a kill -9.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::helpers::*;

const SHARDS: u16 = 4;
const SCHEDULE: [&str; 3] = ["1s", "2s", "3s"];

/// The broker connection of an ordered test: it deletes the shard queues and the
/// parking log too.
async fn ordered_broker(names: &Names) -> Broker {
    let mut broker = Broker::connect(names, &SCHEDULE).await;
    for n in 0..SHARDS {
        broker.owns(format!("{}.deliver.{n}", names.prefix));
    }
    broker.owns(format!("{}.parking", names.prefix));
    broker
}

fn ordered_spec(url: &str, ordering: &str) -> ConfigSpec {
    ConfigSpec {
        broker: format!("shards = {SHARDS}"),
        delivery: format!("ordering = \"{ordering}\""),
        retry: "schedule = [\"1s\", \"2s\", \"3s\"]\nimmediate_attempts = 1".into(),
        top: "shutdown_timeout = \"5s\"\n[circuit]\nfailure_threshold = 100000".into(),
        accounts: format!(
            "[[account]]\nid = \"acme\"\ncompanies_url = \"{url}\"\nbatch_size = 10\nflush_interval = \"50ms\"\n"
        ),
    }
}

#[tokio::test]
async fn setup_declares_the_shards_and_the_parking_log_idempotently() {
    let names = Names::new();
    let _broker = ordered_broker(&names).await;
    let path = write_config(&config_text(
        &names,
        &ordered_spec("http://127.0.0.1:9/", "per_record"),
    ));
    for _ in 0..2 {
        let (code, _, stderr) =
            output(&mut courier(&["setup", "--config", path.to_str().unwrap()]));
        assert_eq!(code, 0, "{stderr}");
    }
    let listing = rabbitmqctl(
        None,
        &[
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "type",
            "arguments",
        ],
    )
    .await;
    let line = |name: &str| {
        listing
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{name} not declared:\n{listing}"))
            .to_owned()
    };
    for n in 0..SHARDS {
        let shard = line(&format!("{}.deliver.{n}", names.prefix));
        assert!(shard.contains("quorum"), "{shard}");
        assert!(shard.contains("x-single-active-consumer"), "{shard}");
        assert!(shard.contains(&names.dead()), "dead-lettering: {shard}");
    }
    // One router at a time: the broker enforces it through the intake queue.
    let intake = line(&names.deliver());
    assert!(intake.contains("x-single-active-consumer"), "{intake}");
    let log = line(&format!("{}.parking", names.prefix));
    assert!(log.contains("stream"), "{log}");
    assert!(log.contains("x-max-age"), "{log}");
    assert!(
        !listing.contains(&format!("{}.deliver.{SHARDS}", names.prefix)),
        "one shard too many"
    );
}

/// What a scenario saw.
struct Seen {
    /// Records whose events were first delivered out of publish order, with the order.
    out_of_order: Vec<(String, Vec<usize>)>,
    published: usize,
    delivered: Vec<String>,
    dead: HashSet<String>,
}

/// Publishes `records` × `updates` events (ids `r<record>-s<seq>`, record by record in
/// turn) to replicas of courier while the receiver fails every 4th request and rejects
/// one event (400: splits, then a dead letter). With `kill`, two replicas run and the
/// one that routes and delivers is killed with SIGKILL once records are parked.
async fn scenario(ordering: &str, kill: bool, records: usize, updates: usize) -> Seen {
    let receiver = Receiver::start().await;
    receiver.fail_every(4, 500);
    receiver.reject_bodies_with("\"r3-s7\"", 400);
    let names = Names::new();
    let broker = ordered_broker(&names).await;
    let spec = ordered_spec(&receiver.url("/hook"), ordering);
    let path = write_config(&config_text(&names, &spec));
    let mut first = start_courier(&path, &path.with_file_name("first.log")).await;
    let second = if kill {
        Some(start_courier(&path, &path.with_file_name("second.log")).await)
    } else {
        None
    };
    let body = |r: usize, s: usize| {
        format!(
            r#"{{"id":"r{r}-s{s}","account":"acme","type":"company","action":"updated","record_id":"r{r}","record":{{"seq":{s}}}}}"#
        )
        .into_bytes()
    };
    let all: Vec<Vec<u8>> = (0..updates)
        .flat_map(|s| (0..records).map(move |r| body(r, s)))
        .collect();
    let half = all.len() / 2;
    broker.publish(&all[..half]).await;
    if kill {
        // Kill once some records wait behind an event in a retry tier.
        let admin = first.admin;
        let parked = eventually_async(Duration::from_secs(30), || async move {
            let (_, metrics) = http_get(admin, "/metrics").await;
            metrics
                .lines()
                .find_map(|l| l.strip_prefix("courier_parked_records "))
                .and_then(|n| n.trim().parse::<f64>().ok())
                .is_some_and(|n| n > 0.0)
        })
        .await;
        assert!(parked, "no record was parked before the kill");
        first.proc.0.kill().unwrap();
        let _ = first.proc.0.wait();
    }
    broker.publish(&all[half..]).await;
    let ids: HashSet<String> = all.iter().map(|b| event_id(b)).collect();
    let dead_queue = names.dead();
    let mut dead = HashSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let done = loop {
        let delivered: HashSet<String> = receiver.delivered_ids().into_iter().collect();
        let missing: Vec<&String> = ids.iter().filter(|id| !delivered.contains(*id)).collect();
        if missing.len() <= 20 {
            dead.extend(
                broker
                    .drain(&dead_queue)
                    .await
                    .iter()
                    .map(|(b, _)| event_id(b)),
            );
            if missing.iter().all(|id| dead.contains(*id)) {
                break true;
            }
        }
        if std::time::Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let delivered = receiver.delivered_ids();
    let got: HashSet<&String> = delivered.iter().chain(dead.iter()).collect();
    let lost: Vec<&String> = ids.iter().filter(|id| !got.contains(id)).collect();
    assert!(
        done && lost.is_empty(),
        "lost {} events: {lost:?}",
        lost.len()
    );
    // Per record, the order of first deliveries.
    let mut firsts: HashMap<String, Vec<usize>> = HashMap::new();
    let mut seen = HashSet::new();
    for id in &delivered {
        if seen.insert(id.clone()) {
            let (record, seq) = id.split_once("-s").unwrap();
            firsts
                .entry(record.to_owned())
                .or_default()
                .push(seq.parse().unwrap());
        }
    }
    let mut out_of_order: Vec<(String, Vec<usize>)> = firsts
        .into_iter()
        .filter(|(_, seqs)| seqs.windows(2).any(|w| w[0] > w[1]))
        .collect();
    out_of_order.sort();
    let mut last = second.unwrap_or(first);
    sigterm(&last.proc.0);
    assert_eq!(
        wait_exit(&mut last.proc.0, Duration::from_secs(20)).await,
        Some(0),
        "the replica left running did not stop cleanly"
    );
    Seen {
        out_of_order,
        published: ids.len(),
        delivered,
        dead,
    }
}

#[tokio::test]
async fn per_record_order_holds_through_retries_splits_and_a_kill() {
    let seen = scenario("per_record", true, 20, 30).await;
    assert!(
        seen.out_of_order.is_empty(),
        "records delivered out of order (first deliveries, by sequence): {:?}",
        seen.out_of_order
    );
    // The rejected event was split out and dead-lettered.
    assert!(seen.dead.contains("r3-s7"), "{:?}", seen.dead);
    print_figures(
        "per-record ordering, kill -9",
        seen.published,
        &seen.delivered,
        seen.dead.len(),
        Duration::ZERO,
    );
}

/// The negative control: the same load without ordering puts some record out of order,
/// so the test above can fail.
#[tokio::test]
async fn without_ordering_the_same_load_reorders_records() {
    let seen = scenario("none", false, 20, 30).await;
    assert!(
        !seen.out_of_order.is_empty(),
        "no record out of order without ordering: the scenario cannot tell"
    );
}
