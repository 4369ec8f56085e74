//! The publishing examples of docs/ (docs/examples/publish.py with pika,
//! docs/examples/publish.js with amqplib, `courier publish`) against the real broker
//! and a real worker; what the receiver gets is then checked by the receiving example
//! docs/examples/verify.py and docs/examples/verify.js.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::helpers::*;

const SECRET: &str = "examples-secret";

/// Runs a publisher; returns the event line it printed (what it published).
fn publish_with(mut cmd: Command, names: &Names, what: &str) -> String {
    let out = cmd
        .env("AMQP_URL", amqp_url())
        .env("COURIER_EXCHANGE", &names.exchange)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what} runs: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8(out.stdout).unwrap();
    printed.trim_end_matches('\n').to_owned()
}

#[tokio::test]
async fn publishing_examples_reach_the_receiver_byte_for_byte() {
    let test = "publishing_examples_reach_the_receiver_byte_for_byte";
    let (Some(python), Some(node)) = (python(test), node(test)) else {
        return;
    };
    let receiver = Receiver::start().await;
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let spec = ConfigSpec {
        accounts: format!(
            "[[account]]\nid = \"acme\"\ncompanies_url = \"{}\"\nhmac_secret = \"{SECRET}\"\n",
            receiver.url("/acme/companies")
        ),
        ..Default::default()
    };
    let worker = TestWorker::spawn(settings(&names, &spec)).await;
    let examples = repo_root().join("docs/examples");

    let mut published = Vec::new();
    let mut py = Command::new(&python);
    py.arg(examples.join("publish.py"))
        .args(["acme", "company", "cmp-py", "Python Ltd"]);
    published.push(publish_with(py, &names, "publish.py"));
    let mut js = node;
    js.arg(examples.join("publish.js"))
        .args(["acme", "company", "cmp-js", "Node Ltd"]);
    published.push(publish_with(js, &names, "publish.js"));
    // courier publish: an NDJSON file, with the test's config.
    let line = r#"{"id":"cli-1","account":"acme","type":"company","action":"created","record_id":"cmp-cli","record":{"name":"CLI GmbH"}}"#;
    let dir = temp_dir();
    std::fs::write(dir.join("events.ndjson"), format!("{line}\n")).unwrap();
    std::fs::write(dir.join("courier.toml"), config_text(&names, &spec)).unwrap();
    let cli = courier(&[
        "--config",
        dir.join("courier.toml").to_str().unwrap(),
        "publish",
        dir.join("events.ndjson").to_str().unwrap(),
    ]);
    let (code, _, stderr) = output(&mut { cli });
    assert_eq!(code, 0, "courier publish: {stderr}");
    published.push(line.to_owned());

    assert_eq!(
        receiver.wait_for_events(3, Duration::from_secs(20)).await,
        3
    );
    let requests = receiver.requests();
    // The receiving examples, each run as the docs show (`node` is there: `node(test)`
    // said so, or the test was skipped before it started).
    let body = dir.join("body.json");
    let body_path = body.to_str().unwrap();
    for (interpreter, script) in [("python3", "verify.py"), ("node", "verify.js")] {
        let verify = |bytes: &[u8], signature: &str| {
            std::fs::write(&body, bytes).unwrap();
            run_example(interpreter, script, &[SECRET, body_path, signature], true)
                .expect("required")
        };
        for event in &published {
            let request = requests
                .iter()
                .find(|r| r.body == event.as_bytes())
                .unwrap_or_else(|| panic!("no request carries {event}"));
            let signature = request.header("x-goodfit-hmac-sha256").unwrap();
            // It accepts the request as it arrived: the same signature, checked by
            // another tool...
            assert_eq!(
                verify(&request.body, signature),
                (0, "ok\n".to_owned(), String::new()),
                "{script}: {event}"
            );
            // ...and refuses it with one byte of the body changed.
            let mut tampered = request.body.to_vec();
            tampered[0] ^= 1;
            assert_eq!(
                verify(&tampered, signature),
                (1, "mismatch\n".to_owned(), String::new()),
                "{script} on a tampered {event}"
            );
        }
    }
    worker.shutdown().await;
    drop(broker);
}
