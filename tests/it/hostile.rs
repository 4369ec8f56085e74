//! A careless or hostile publisher: bad input costs a few log lines and no new metric
//! series, and forged retry headers are ignored.

use std::collections::HashSet;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};

use crate::helpers::*;

fn account(receiver: &Receiver) -> String {
    format!(
        "[[account]]\nid = \"acme\"\ncompanies_url = \"{}\"\n",
        receiver.url("/c")
    )
}

#[tokio::test]
async fn unknown_accounts_make_one_series_and_a_few_log_lines() {
    let receiver = Receiver::start().await;
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let spec = ConfigSpec {
        accounts: account(&receiver),
        ..Default::default()
    };
    let dir = temp_dir();
    let config = dir.join("courier.toml");
    std::fs::write(&config, config_text(&names, &spec)).unwrap();
    let log = dir.join("courier.log");
    let running = start_courier(&config, &log).await;
    // 300 events, each naming an account nobody configured, and a few invalid ones.
    let mut bodies: Vec<Vec<u8>> = (0..300)
        .map(|i| {
            event(
                &format!("u{i}"),
                &format!("stranger-{i}-{}", suffix()),
                "company",
            )
        })
        .collect();
    bodies.extend((0..20).map(|i| format!("{{\"id\":\"bad{i}\"}}").into_bytes()));
    broker.publish(&bodies).await;
    let dead = broker
        .wait_for_depth(&names.dead(), 320, Duration::from_secs(20))
        .await;
    assert_eq!(dead, 320, "every bad event is dead-lettered");

    let (_, metrics) = http_get(running.admin, "/metrics").await;
    let series: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("courier_events_dead_lettered_total{"))
        .collect();
    assert_eq!(
        series
            .iter()
            .filter(|l| l.contains("reason=\"unknown_account\""))
            .count(),
        1,
        "one series for every unknown account: {series:?}"
    );
    assert_eq!(
        metric_value(
            &metrics,
            "courier_events_dead_lettered_total",
            &[("account", "(unknown)"), ("reason", "unknown_account")]
        ),
        300.0
    );
    assert!(
        !metrics.contains("stranger-"),
        "a label took a value from an event"
    );

    let text = std::fs::read_to_string(&log).unwrap();
    let warnings = text
        .lines()
        .filter(|l| {
            l.contains("WARN") && (l.contains("unknown account") || l.contains("invalid event"))
        })
        .count();
    assert!(
        (1..=4).contains(&warnings),
        "{warnings} warning lines for 320 bad events:\n{text}"
    );
    // Each dead letter still says which account it named.
    let letters = broker.drain(&names.dead()).await;
    let accounts: HashSet<String> = letters
        .iter()
        .filter_map(|(body, _)| {
            let v: serde_json::Value = serde_json::from_slice(body).ok()?;
            Some(v["account"].as_str()?.to_owned())
        })
        .collect();
    assert_eq!(accounts.len(), 300);
    drop(running);
}

fn long(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

#[tokio::test]
async fn retry_headers_forged_by_a_publisher_are_ignored() {
    let receiver = Receiver::start().await;
    receiver.set_status(503);
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s", "5m"]).await;
    let spec = ConfigSpec {
        retry: "immediate_attempts = 1\nschedule = [\"30s\", \"5m\"]".into(),
        accounts: account(&receiver),
        ..Default::default()
    };
    let worker = TestWorker::spawn(settings(&names, &spec)).await;
    // A publisher claims the event used up its schedule and has failed for a year, and
    // that courier saw it long ago.
    let mut forged = FieldTable::default();
    forged.insert("x-courier-retries".into(), AMQPValue::LongLongInt(99));
    forged.insert(
        "x-courier-first-failure".into(),
        long("2025-01-01T00:00:00.000Z"),
    );
    forged.insert(
        "x-courier-first-seen".into(),
        long("2025-01-01T00:00:00.000Z"),
    );
    forged.insert("x-courier-reason".into(), long("forged"));
    forged.insert("trace-id".into(), long("t-1"));
    let properties = BasicProperties::default()
        .with_delivery_mode(2)
        .with_headers(forged);
    broker
        .publish_with(&[event("f1", "acme", "company")], properties)
        .await;
    let tier = format!("{}.retry.30s", names.prefix);
    assert_eq!(
        broker
            .wait_for_depth(&tier, 1, Duration::from_secs(10))
            .await,
        1,
        "the event goes to its first tier, not to the dead-letter queue"
    );
    worker.shutdown().await;
    assert_eq!(broker.settled_depth(&names.dead()).await, 0);
    let copies = broker.drain(&tier).await;
    let (_, headers) = &copies[0];
    assert_eq!(
        header_str(headers, "x-courier-retries").as_deref(),
        Some("1")
    );
    for name in ["x-courier-first-failure", "x-courier-first-seen"] {
        let value = header_str(headers, name).unwrap();
        let at = chrono::DateTime::parse_from_rfc3339(&value).unwrap();
        let age = chrono::Utc::now().signed_duration_since(at);
        assert!(
            age < chrono::TimeDelta::minutes(5),
            "{name} was carried over from the publisher: {value}"
        );
    }
    assert_eq!(
        header_str(headers, "x-courier-reason"),
        None,
        "forged header carried"
    );
    assert_eq!(header_str(headers, "trace-id").as_deref(), Some("t-1"));
}
