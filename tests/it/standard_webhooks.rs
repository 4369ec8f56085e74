//! The Standard Webhooks signature (docs/receiving.md), verified by the specification's
//! own Python library on real deliveries.

use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::helpers::*;

const NEW: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const OLD: &str = "whsec_dGhpcyBpcyB0aGUgb2xkIGtleSBiZWluZyByZXRpcmVk";
const OTHER: &str = "whsec_c29tZW9uZSBlbHNlJ3Mga2V5LCBub3QgY291cmllcidz";

/// What the library says of each request: `name` → verified, `tampered:name` → verified
/// with one byte of the body changed.
fn verify_with_library(
    python: &std::path::Path,
    secrets: &[(&str, &str)],
    requests: &[Recorded],
) -> Vec<HashMap<String, bool>> {
    let job = serde_json::json!({
        "secrets": secrets.iter().cloned().collect::<HashMap<_, _>>(),
        "requests": requests.iter().map(|r| serde_json::json!({
            "headers": r.headers.iter()
                .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap().to_owned()))
                .collect::<HashMap<_, _>>(),
            "body": BASE64.encode(&r.body),
        })).collect::<Vec<_>>(),
    });
    let mut child = Command::new(python)
        .arg(repo_root().join("tests/py/verify_standard_webhooks.py"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python runs");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(job.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "verifier failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("the verifier's JSON")
}

async fn deliveries(secret_line: &str, batch_size: usize, events: usize) -> Vec<Recorded> {
    let receiver = Receiver::start().await;
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let spec = ConfigSpec {
        accounts: format!(
            r#"
[[account]]
id = "acme"
companies_url = "{}"
batch_size = {batch_size}
flush_interval = "100ms"
hmac_secret = "goodfit-secret"
{secret_line}
"#,
            receiver.url("/hooks")
        ),
        ..Default::default()
    };
    let worker = TestWorker::spawn(settings(&names, &spec)).await;
    let bodies: Vec<Vec<u8>> = (0..events)
        .map(|i| event(&format!("sw-{i}"), "acme", "company"))
        .collect();
    broker.publish(&bodies).await;
    assert_eq!(
        receiver
            .wait_for_events(events, Duration::from_secs(20))
            .await,
        events
    );
    worker.shutdown().await;
    drop(broker);
    receiver.requests()
}

#[tokio::test]
async fn the_standard_webhooks_library_accepts_both_keys_of_a_rotation() {
    let Some(python) = python("the_standard_webhooks_library_accepts_both_keys_of_a_rotation")
    else {
        return;
    };
    let requests = deliveries(
        &format!("standard_webhooks_secret = [\"{NEW}\", \"{OLD}\"]"),
        3,
        7,
    )
    .await;
    assert!(requests.len() >= 3, "{} requests", requests.len());
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for r in &requests {
        assert_eq!(r.header("webhook-id"), r.header("x-courier-delivery-id"));
        let ts: u64 = r.header("webhook-timestamp").unwrap().parse().unwrap();
        assert!(ts.abs_diff(now) < 120, "timestamp {ts}, now {now}");
        let sigs: Vec<&str> = r.header("webhook-signature").unwrap().split(' ').collect();
        assert_eq!(sigs.len(), 2, "one signature per key");
        assert!(sigs.iter().all(|s| s.starts_with("v1,")));
        // The GoodFit signature is still there, beside it.
        assert!(courier::sign::verify(
            b"goodfit-secret",
            &r.body,
            r.header("x-goodfit-hmac-sha256").unwrap()
        ));
    }
    let secrets = [("new", NEW), ("old", OLD), ("other", OTHER)];
    for (i, verdict) in verify_with_library(&python, &secrets, &requests)
        .iter()
        .enumerate()
    {
        let want = [
            ("new", true),
            ("old", true),
            ("other", false),
            ("tampered:new", false),
            ("tampered:old", false),
            ("tampered:other", false),
        ];
        for (check, expected) in want {
            assert_eq!(verdict[check], expected, "request {i}: {check}");
        }
    }
    run_receiving_examples(&python, &requests[0]);
}

/// The receiving examples of docs/examples on one real request: each key of the rotation
/// verifies, another key and a tampered body do not.
fn run_receiving_examples(python: &std::path::Path, request: &Recorded) {
    let test = "the_standard_webhooks_library_accepts_both_keys_of_a_rotation";
    if node(test).is_none() {
        return;
    }
    let dir = temp_dir();
    let headers: HashMap<String, String> = request
        .headers
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.to_str().unwrap().to_owned()))
        .collect();
    std::fs::write(
        dir.join("headers.json"),
        serde_json::to_vec(&headers).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("body"), &request.body).unwrap();
    let mut tampered = request.body.to_vec();
    tampered[1] ^= 0x01;
    std::fs::write(dir.join("tampered"), tampered).unwrap();
    let examples = repo_root().join("docs/examples");
    for script in ["verify_standard_webhooks.py", "verify_standard_webhooks.js"] {
        for (secret, body, expected) in [
            (NEW, "body", "ok"),
            (OLD, "body", "ok"),
            (OTHER, "body", "mismatch"),
            (NEW, "tampered", "mismatch"),
        ] {
            let mut cmd = if script.ends_with(".py") {
                Command::new(python)
            } else {
                node(test).unwrap()
            };
            let out = cmd
                .arg(examples.join(script))
                .arg(secret)
                .arg(dir.join(body))
                .arg(dir.join("headers.json"))
                .output()
                .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                expected,
                "{script} {body}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(out.status.success(), expected == "ok", "{script} {body}");
        }
    }
}

#[tokio::test]
async fn one_key_one_signature_and_none_without_the_key() {
    let Some(python) = python("one_key_one_signature_and_none_without_the_key") else {
        return;
    };
    let requests = deliveries(&format!("standard_webhooks_secret = \"{NEW}\""), 1, 2).await;
    assert_eq!(requests.len(), 2);
    for r in &requests {
        assert_eq!(r.header("webhook-signature").unwrap().split(' ').count(), 1);
    }
    let verdicts = verify_with_library(&python, &[("new", NEW), ("old", OLD)], &requests);
    for verdict in verdicts {
        assert!(verdict["new"] && !verdict["old"] && !verdict["tampered:new"]);
    }
    // Without the key: none of the three headers.
    let plain = deliveries("", 1, 1).await;
    for name in ["webhook-id", "webhook-timestamp", "webhook-signature"] {
        assert!(plain[0].header(name).is_none(), "{name}");
    }
}
