//! The happy path: routing, bytes, batching, signing, headers, skips.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use crate::helpers::*;

#[tokio::test]
async fn every_event_arrives_byte_identical_at_its_url() {
    let receiver = Receiver::start().await;
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let spec = ConfigSpec {
        accounts: format!(
            r#"
[[account]]
id = "acme"
companies_url = "{}"
contacts_url = "{}"
batch_size = 7
flush_interval = "200ms"

[[account]]
id = "solo"
companies_url = "{}"
"#,
            receiver.url("/acme/companies?token=t1"),
            receiver.url("/acme/contacts"),
            receiver.url("/solo/companies"),
        ),
        ..Default::default()
    };
    let worker = TestWorker::spawn(settings(&names, &spec)).await;

    // Odd spellings survive untouched: escapes, exponents, big integers, negative zero.
    let oddities = [
        r#""name":"caf\u00e9 \"quoted\" \/ slash \ud83d\ude00","n":1e3"#,
        r#""n":-0.0,"big":123456789012345678901234567890,"f":1.50"#,
        r#""nested":{"a":[1,2,{"b":null}]},"t":true , "ws" : "x""#,
    ];
    let mut published: HashMap<String, (String, String)> = HashMap::new();
    let mut bodies = Vec::new();
    for i in 0..60 {
        let (account, kind, path) = match i % 3 {
            0 => ("acme", "company", "/acme/companies"),
            1 => ("acme", "contact", "/acme/contacts"),
            _ => ("solo", "company", "/solo/companies"),
        };
        let id = format!("ev-{i}");
        let body = format!(
            r#"{{"id":"{id}","account":"{account}","type":"{kind}","action":"updated","record_id":"r{i}","record":{{{}}},"extra":{i}}}"#,
            oddities[i % oddities.len()]
        );
        published.insert(id, (body.clone(), path.to_owned()));
        bodies.push(body.into_bytes());
    }
    broker.publish(&bodies).await;
    assert_eq!(
        receiver.wait_for_events(60, Duration::from_secs(20)).await,
        60
    );
    worker.shutdown().await;

    let mut seen = HashSet::new();
    for request in receiver.accepted() {
        let events = request.events();
        match request.path.as_str() {
            "/solo/companies" => {
                assert_eq!(request.body[0], b'{', "batch_size 1 sends the bare object");
                assert_eq!(events.len(), 1);
            }
            _ => {
                assert_eq!(request.body[0], b'[', "batch_size 7 sends arrays");
                assert!(
                    events.len() <= 7,
                    "a batch of {} exceeds batch_size 7",
                    events.len()
                );
                // Joined with commas only: the body is exactly "[" + events + "]".
                assert_eq!(
                    request.body.len(),
                    2 + events.iter().map(String::len).sum::<usize>() + events.len() - 1
                );
            }
        }
        assert_eq!(
            request.header("x-courier-event-count"),
            Some(events.len().to_string().as_str())
        );
        assert_eq!(request.header("content-type"), Some("application/json"));
        assert!(
            request
                .header("user-agent")
                .unwrap()
                .starts_with("courier/")
        );
        for event in events {
            let id = event_id(event.as_bytes());
            let (body, path) = &published[&id];
            assert_eq!(&event, body, "event {id} changed on the way");
            assert_eq!(&request.path, path, "event {id} went to the wrong URL");
            assert!(seen.insert(id.clone()), "event {id} delivered twice");
        }
    }
    assert_eq!(seen.len(), 60);
    assert_eq!(
        broker.settled_depth(&names.deliver()).await,
        0,
        "every message acked"
    );
}

#[tokio::test]
async fn a_part_filled_batch_flushes_on_its_interval() {
    let receiver = Receiver::start().await;
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let spec = ConfigSpec {
        accounts: format!(
            "[[account]]\nid = \"acme\"\ncompanies_url = \"{}\"\nbatch_size = 200\nflush_interval = \"300ms\"\n",
            receiver.url("/c")
        ),
        ..Default::default()
    };
    let worker = TestWorker::spawn(settings(&names, &spec)).await;
    let published = std::time::Instant::now();
    broker
        .publish(&[
            event("a", "acme", "company"),
            event("b", "acme", "company"),
            event("c", "acme", "company"),
        ])
        .await;
    assert_eq!(
        receiver.wait_for_events(3, Duration::from_secs(10)).await,
        3
    );
    let waited = published.elapsed();
    let requests = receiver.accepted();
    assert_eq!(requests.len(), 1, "one batch of three");
    assert_eq!(
        requests[0].ids(),
        vec!["a", "b", "c"],
        "consumption order kept inside a body"
    );
    assert!(
        waited >= Duration::from_millis(250),
        "flushed before the interval: {waited:?}"
    );
    assert_eq!(
        worker.metric("courier_batches_flushed_total", &[("reason", "interval")]),
        1.0
    );
    worker.shutdown().await;
}

#[tokio::test]
async fn a_full_prefetch_window_flushes_early() {
    // 100 accounts, batch 200, interval 60 s, prefetch 200: without the early flush,
    // consumption stalls for a minute once 200 events sit in 100 part-filled batches.
    let receiver = Receiver::start().await;
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let mut accounts = String::new();
    for a in 0..100 {
        accounts.push_str(&format!(
            "[[account]]\nid = \"acct{a}\"\ncompanies_url = \"{}\"\nbatch_size = 200\nflush_interval = \"60s\"\n\n",
            receiver.url(&format!("/a{a}"))
        ));
    }
    let spec = ConfigSpec {
        broker: "prefetch = 200".into(),
        accounts,
        ..Default::default()
    };
    let worker = TestWorker::spawn(settings(&names, &spec)).await;
    let bodies: Vec<Vec<u8>> = (0..2000)
        .map(|i| event(&format!("e{i}"), &format!("acct{}", i % 100), "company"))
        .collect();
    broker.publish(&bodies).await;
    let got = receiver
        .wait_for_events(2000 - 200, Duration::from_secs(30))
        .await;
    assert!(
        got >= 1800,
        "only {got} of 2000 events arrived within 30 s of a 60 s interval"
    );
    assert!(worker.metric("courier_batches_flushed_total", &[("reason", "window")]) > 0.0);
    assert_eq!(
        worker.metric("courier_batches_flushed_total", &[("reason", "interval")]),
        0.0
    );
    // Shutdown flushes what is batched; prefetched messages not yet batched go back to
    // the queue. Nothing is lost either way.
    worker.shutdown().await;
    let mut ids: HashSet<String> = receiver.delivered_ids().into_iter().collect();
    ids.extend(
        broker
            .drain_settled(&names.deliver())
            .await
            .iter()
            .map(|(b, _)| event_id(b)),
    );
    assert_eq!(ids.len(), 2000, "delivered ∪ returned = published");
}

#[tokio::test]
async fn an_open_batch_that_holds_the_acks_is_flushed_before_the_window_fills() {
    // The first message sits alone in the batch of "early" (60 s interval) while 2,000
    // others flow to ten busy accounts. Until it is settled no `multiple` ack can pass
    // it, so the window fills with settled messages behind it: the consumer must flush
    // it then, not wait a minute for its interval.
    let receiver = Receiver::start().await;
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let mut accounts = String::new();
    for a in [
        "early", "b0", "b1", "b2", "b3", "b4", "b5", "b6", "b7", "b8", "b9",
    ] {
        accounts.push_str(&format!(
            "[[account]]\nid = \"{a}\"\ncompanies_url = \"{}\"\nbatch_size = 200\nflush_interval = \"60s\"\n\n",
            receiver.url(&format!("/{a}"))
        ));
    }
    let spec = ConfigSpec {
        broker: "prefetch = 1000".into(),
        accounts,
        ..Default::default()
    };
    let worker = TestWorker::spawn(settings(&names, &spec)).await;
    let mut bodies = vec![event("first", "early", "company")];
    bodies.extend((0..2000).map(|i| event(&format!("e{i}"), &format!("b{}", i % 10), "company")));
    broker.publish(&bodies).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !receiver.delivered_ids().iter().any(|id| id == "first") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the first event was not delivered within 20 s of a 60 s interval"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let labels = [("account", "early"), ("reason", "window")];
    assert_eq!(worker.metric("courier_batches_flushed_total", &labels), 1.0);
    worker.shutdown().await;
}

#[tokio::test]
async fn signatures_and_custom_headers_arrive_and_contacts_can_be_skipped() {
    let receiver = Receiver::start().await;
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let spec = ConfigSpec {
        accounts: format!(
            r#"
[[account]]
id = "acme"
companies_url = "{}"
contacts_url = ""
batch_size = 3
flush_interval = "100ms"
hmac_secret = "it's a $ecret"
headers = {{ Authorization = "Bearer tok-123", X-Tenant = "acme" }}
"#,
            receiver.url("/hook")
        ),
        ..Default::default()
    };
    let worker = TestWorker::spawn(settings(&names, &spec)).await;
    broker
        .publish(&[
            event("c1", "acme", "company"),
            event("p1", "acme", "contact"),
            event("c2", "acme", "company"),
            event("p2", "acme", "contact"),
        ])
        .await;
    assert_eq!(
        receiver.wait_for_events(2, Duration::from_secs(10)).await,
        2
    );
    assert!(
        eventually(Duration::from_secs(5), || worker.metric(
            "courier_events_skipped_total",
            &[("reason", "contacts_disabled")]
        ) == 2.0)
        .await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let requests = receiver.accepted();
    assert_eq!(
        receiver.delivered_ids(),
        vec!["c1", "c2"],
        "contacts are not sent"
    );
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.header("authorization"), Some("Bearer tok-123"));
    assert_eq!(request.header("x-tenant"), Some("acme"));
    let signature = request.header("x-goodfit-hmac-sha256").expect("signed");
    assert!(courier::sign::verify(
        b"it's a $ecret",
        &request.body,
        signature
    ));

    // An independent implementation agrees: openssl, over the exact bytes received.
    let dir = std::env::temp_dir().join(format!("courier-sig-{}", suffix()));
    std::fs::create_dir_all(&dir).unwrap();
    let body_file = dir.join("body");
    std::fs::write(&body_file, &request.body).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", "it's a $ecret", "-r"])
        .arg(&body_file)
        .output()
        .expect("openssl runs");
    let hex = String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(signature, format!("sha256={hex}"));

    let _ = std::fs::remove_dir_all(&dir);
    // Acked, not merely delivered to the worker: once it has stopped, anything it held
    // unacked is back in the queue.
    worker.shutdown().await;
    assert_eq!(
        broker.settled_depth(&names.deliver()).await,
        0,
        "skipped contacts were acked"
    );
}

#[test]
fn the_receiver_examples_accept_exactly_what_courier_signs() {
    let dir = temp_dir();
    let file = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        std::fs::write(&path, bytes).unwrap();
        path.to_str().unwrap().to_owned()
    };
    let body = r#"[{"id":"e1","account":"acme","record":{"name":"Zürich \u00e9 ✓"}}]"#.as_bytes();
    let body_file = file("body", body);
    let tampered_file = file(
        "tampered",
        &String::from_utf8_lossy(body)
            .replace("\"e1\"", "\"e2\"")
            .into_bytes(),
    );
    let secret = "it's a $ecret";
    let good = courier::sign::signature(secret.as_bytes(), body);
    // A secret outside ASCII is used as its UTF-8 bytes, not as Latin-1.
    let non_ascii = "clé über";
    let non_ascii_good = courier::sign::signature(non_ascii.as_bytes(), body);
    let latin1: Vec<u8> = non_ascii.chars().map(|c| c as u8).collect();
    let latin1_sig = courier::sign::signature(&latin1, body);
    let upper = format!("sha256={}", good["sha256=".len()..].to_uppercase());
    let body_file = body_file.as_str();
    let cases: Vec<(&str, Vec<&str>, i32, &str)> = vec![
        ("correct", vec![secret, body_file, &good], 0, "ok\n"),
        (
            "tampered body",
            vec![secret, &tampered_file, &good],
            1,
            "mismatch\n",
        ),
        (
            "missing header",
            vec![secret, body_file, ""],
            1,
            "mismatch\n",
        ),
        (
            "wrong secret",
            vec!["wrong secret", body_file, &good],
            1,
            "mismatch\n",
        ),
        (
            "non-ASCII secret",
            vec![non_ascii, body_file, &non_ascii_good],
            0,
            "ok\n",
        ),
        (
            "non-ASCII secret taken as Latin-1",
            vec![non_ascii, body_file, &latin1_sig],
            1,
            "mismatch\n",
        ),
        (
            "upper-case hex",
            vec![secret, body_file, &upper],
            1,
            "mismatch\n",
        ),
        (
            "non-ASCII header",
            vec![secret, body_file, "sha256=é✓"],
            1,
            "mismatch\n",
        ),
    ];
    for (interpreter, script, required) in
        [("python3", "verify.py", true), ("node", "verify.js", false)]
    {
        for (case, args, code, stdout) in &cases {
            let Some(out) = run_example(interpreter, script, args, required) else {
                break;
            };
            // Nothing on stderr: a crash also exits non-zero, but says so there.
            assert_eq!(
                out,
                (*code, (*stdout).to_owned(), String::new()),
                "{script}, {case}"
            );
        }
        let Some((code, stdout, stderr)) =
            run_example(interpreter, script, &[secret, body_file], required)
        else {
            continue;
        };
        assert_eq!(
            (code, stdout.as_str()),
            (2, ""),
            "{script} without a header argument"
        );
        assert!(stderr.starts_with("usage:"), "{script}: {stderr}");
        let (code, stdout, stderr) = run_example(
            interpreter,
            script,
            &[secret, "/nonexistent/body", &good],
            true,
        )
        .unwrap();
        assert_eq!(
            (code, stdout.as_str()),
            (2, ""),
            "{script} with no body file"
        );
        assert!(stderr.starts_with("cannot read"), "{script}: {stderr}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_broker_url_can_set_the_frame_size() {
    // docs/configuration.md: `?frame_max=` trades lapin's buffer memory (32 frames per
    // buffer) against the largest message header the connection accepts.
    let sep = if amqp_url().contains('?') { '&' } else { '?' };
    let url = courier::config::BrokerUrl::parse(&format!("{}{sep}frame_max=65536", amqp_url()))
        .expect("test URL");
    let conn = courier::broker::connect(&[url], "courier test frames")
        .await
        .expect("connect");
    assert_eq!(conn.configuration().frame_max(), 65536);
    conn.close(200, "done".into()).await.expect("close");
}
