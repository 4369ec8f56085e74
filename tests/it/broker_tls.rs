//! `amqps` to a private node with a TLS listener and certificates the test generates:
//! with `broker.ca_file` and a client certificate courier checks the version, declares,
//! consumes and delivers; without the CA, to another name, or without a client
//! certificate the connection fails with the reason, and `courier run` keeps waiting
//! (docs/configuration.md, "TLS"). With `?auth_mechanism=external` the client
//! certificate is the login: courier works as the user its CN names, and a certificate
//! without a user, or a listener that does not offer that login, is refused clearly.

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

/// Publishes `count` events with `settings` (`courier publish` over their broker URL)
/// and waits until `receiver` has had every one of them.
async fn publish_and_see_delivered(
    settings: &Settings,
    receiver: &Receiver,
    prefix: &str,
    count: usize,
) {
    let published: Vec<Vec<u8>> = (0..count)
        .map(|i| event(&format!("{prefix}{i}"), "acme", "company"))
        .collect();
    let input = published.join(&b'\n');
    courier::commands::publish::publish(settings, input.as_slice(), false)
        .await
        .expect("publishing over amqps");
    assert_eq!(
        receiver
            .wait_for_distinct(count, Duration::from_secs(20))
            .await,
        count
    );
    assert_eq!(
        receiver.delivered_ids().into_iter().collect::<HashSet<_>>(),
        published.iter().map(|b| event_id(b)).collect()
    );
}

/// `courier run` with `settings` that cannot connect keeps waiting, unready, instead of
/// exiting.
async fn keeps_waiting_unready(settings: Settings, admin: u16) {
    let worker = TestWorker::start(settings);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        worker.running(),
        "the worker exited on a connection failure"
    );
    assert_eq!(http_get(admin, "/readyz").await.0, 503);
    worker.shutdown().await;
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
    publish_and_see_delivered(&settings, &receiver, "tls", 20).await;
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
    keeps_waiting_unready(settings, admin).await;

    // The node's queues go with the node.
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_authentication_logs_in_as_the_certificates_cn_and_refuses_a_cn_without_a_user() {
    let certs = TestCerts::generate();
    let node = PrivateNode::prepare_tls(&certs);
    node.boot().await;
    node.add_certificate_user(CLIENT_CN).await;
    // No password login can pass in its stead.
    rabbitmqctl(Some(&node.name), &["delete_user", "guest"]).await;
    let receiver = Receiver::start().await;
    let names = Names::new();
    let spec = |stem: &str| ConfigSpec {
        top: "shutdown_timeout = \"2s\"".into(),
        broker: format!(
            "ca_file = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"",
            certs.file("ca.pem"),
            certs.file(&format!("{stem}.pem")),
            certs.file(&format!("{stem}.key")),
        ),
        accounts: format!(
            "[[account]]\nid = \"acme\"\ncompanies_url = \"{}\"\nbatch_size = 5\nflush_interval = \"50ms\"\n",
            receiver.url("/hook")
        ),
        ..Default::default()
    };
    let url = node.external_url("127.0.0.1");

    let (settings, admin) = on(&url, &names, &spec("client"));
    let worker = TestWorker::spawn(settings.clone()).await;
    assert_eq!(http_get(admin, "/readyz").await.0, 200);
    publish_and_see_delivered(&settings, &receiver, "x509-", 10).await;
    // Every connection of the worker logged in with its certificate, as the CN's user.
    let logins = node.connection_logins().await;
    assert!(!logins.is_empty(), "the worker has no connection");
    for login in &logins {
        assert_eq!(
            (login.0.as_str(), login.1.as_str()),
            (CLIENT_CN, "EXTERNAL"),
            "{logins:?}"
        );
    }
    worker.shutdown().await;

    // A certificate the node trusts, whose CN has no user.
    let (stranger, admin) = on(&url, &names, &spec("stranger"));
    let why = refusal(&stranger).await;
    assert!(
        why.contains("refused the client certificate's login")
            && why.contains("user named after the certificate's CN"),
        "{why}"
    );
    // A listener that does not ask for a certificate (the node's plain one) does not offer
    // EXTERNAL: courier says so instead of trying (the broker would close silently).
    let plain = courier::config::BrokerUrl::parse(&format!(
        "amqp://127.0.0.1:{}/%2f?auth_mechanism=external",
        node.port
    ))
    .unwrap();
    let why = courier::broker::connect(&[plain], "courier tls test")
        .await
        .map(|_| ())
        .expect_err("EXTERNAL is not offered")
        .to_string();
    assert!(
        why.contains("does not offer x509 authentication") && why.contains("only \"PLAIN\""),
        "{why}"
    );
    // `courier run` keeps waiting, unready, instead of exiting.
    keeps_waiting_unready(stranger, admin).await;
}
