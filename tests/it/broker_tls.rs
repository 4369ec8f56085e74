//! `amqps` to a private node with a TLS listener and certificates the test generates:
//! with `broker.ca_file` and a client certificate courier checks the version, declares,
//! consumes and delivers; without the CA, to another name, or without a client
//! certificate the connection fails with the reason, and `courier run` keeps waiting
//! (docs/configuration.md, "TLS").

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use courier::config::Settings;

use crate::helpers::*;

/// The test's configuration with `url` as the only broker, its admin port.
fn on(url: &str, names: &Names, spec: &ConfigSpec) -> (Settings, u16) {
    let (text, admin) = config_with_admin(names, spec);
    let text = text.replace(&amqp_url(), url);
    let settings = courier::config::parse(Path::new("test.toml"), &text, &|_| None)
        .unwrap_or_else(|e| panic!("test config invalid: {e}\n{text}"));
    (settings, admin)
}

/// Why connecting with `settings` fails.
async fn refusal(settings: &Settings) -> String {
    let why = courier::broker::connect(&settings.broker.urls, "courier tls test")
        .await
        .map(|_| ())
        .expect_err("the connection should fail")
        .to_string();
    eprintln!("refused: {why}");
    why
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqps_with_the_ca_and_a_client_certificate_delivers_and_fails_clearly_otherwise() {
    let certs = TestCerts::generate();
    let node = PrivateNode::prepare_tls(&certs);
    node.boot().await;
    let receiver = Receiver::start().await;
    let names = Names::new();
    let ca = format!("ca_file = \"{}\"", certs.file("ca.pem"));
    let identity = format!(
        "client_cert = \"{}\"\nclient_key = \"{}\"",
        certs.file("client.pem"),
        certs.file("client.key")
    );
    let spec = |broker: String| ConfigSpec {
        top: "shutdown_timeout = \"2s\"".into(),
        broker,
        accounts: format!(
            "[[account]]\nid = \"acme\"\ncompanies_url = \"{}\"\nbatch_size = 5\nflush_interval = \"50ms\"\n",
            receiver.url("/hook")
        ),
        ..Default::default()
    };
    let good = spec(format!("{ca}\n{identity}"));

    let (settings, admin) = on(&node.tls_url("127.0.0.1"), &names, &good);
    let worker = TestWorker::spawn(settings.clone()).await;
    assert_eq!(http_get(admin, "/readyz").await.0, 200);
    let published: Vec<Vec<u8>> = (0..20)
        .map(|i| event(&format!("tls{i}"), "acme", "company"))
        .collect();
    let input = published.join(&b'\n');
    courier::commands::publish::publish(&settings, input.as_slice(), false)
        .await
        .expect("publishing over amqps");
    assert_eq!(
        receiver
            .wait_for_distinct(20, Duration::from_secs(20))
            .await,
        20
    );
    assert_eq!(
        receiver.delivered_ids().into_iter().collect::<HashSet<_>>(),
        published.iter().map(|b| event_id(b)).collect()
    );
    worker.shutdown().await;

    // Without the private CA: the server's certificate is not trusted.
    let (no_ca, _) = on(&node.tls_url("127.0.0.1"), &names, &spec(identity.clone()));
    let why = refusal(&no_ca).await;
    assert!(
        why.contains("invalid peer certificate") && why.contains("UnknownIssuer"),
        "{why}"
    );
    assert!(!why.contains("guest:"), "the password never shows: {why}");
    // The node reached by another name (127.0.0.2) than its certificate's.
    let (misnamed, _) = on(&node.tls_url("127.0.0.2"), &names, &good);
    let why = refusal(&misnamed).await;
    assert!(why.contains("not valid for name"), "{why}");
    // No client certificate: the node demands one. (TLS 1.3 sends that refusal after
    // the handshake: courier waits briefly for it before writing, so the reason shows.)
    let (anonymous, _) = on(&node.tls_url("127.0.0.1"), &names, &spec(ca.clone()));
    for _ in 0..3 {
        let why = refusal(&anonymous).await;
        assert!(why.contains("CertificateRequired"), "{why}");
    }

    // `courier run` without the CA keeps waiting, unready, instead of exiting.
    let (settings, admin) = on(&node.tls_url("127.0.0.1"), &names, &spec(identity.clone()));
    let worker = TestWorker::start(settings);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(worker.running(), "the worker exited on a TLS failure");
    assert_eq!(http_get(admin, "/readyz").await.0, 503);
    worker.shutdown().await;

    // The node's queues go with the node.
}
