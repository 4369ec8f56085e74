//! HTTPS receivers with certificates the test generates: a private CA given by
//! `delivery.ca_file`, a certificate for another name, and a receiver that demands a
//! client certificate (an account's `client_cert` / `client_key`). A refused handshake
//! is retryable, with a `last_error` that says why (docs/configuration.md, "TLS").

use std::collections::HashSet;
use std::time::Duration;

use crate::helpers::*;

/// One attempt, then the 30 s tier: a refused event shows up there with its last error.
const ONE_ATTEMPT: &str = "immediate_attempts = 1";

fn account(id: &str, url: &str, extra: &str) -> String {
    format!("[[account]]\nid = \"{id}\"\ncompanies_url = \"{url}\"\n{extra}\n")
}

fn bodies(prefix: &str, account: &str, n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| event(&format!("{prefix}{i}"), account, "company"))
        .collect()
}

/// The ids and `x-courier-last-error` of the `n` events that reach the 30 s tier.
async fn retried(broker: &Broker, names: &Names, n: u32) -> Vec<(String, String)> {
    let tier = format!("{}.retry.30s", names.prefix);
    assert_eq!(
        broker
            .wait_for_depth(&tier, n, Duration::from_secs(20))
            .await,
        n,
        "events in the retry tier"
    );
    broker.drain_last_errors(&tier).await
}

#[tokio::test]
async fn an_https_receiver_with_a_private_ca_gets_events_only_with_ca_file_and_its_name() {
    let certs = TestCerts::generate();
    let good = Receiver::start_tls(certs.server_config("server", false)).await;
    let misnamed = Receiver::start_tls(certs.server_config("other-name", false)).await;
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let spec = ConfigSpec {
        delivery: format!("ca_file = \"{}\"", certs.file("ca.pem")),
        retry: ONE_ATTEMPT.into(),
        accounts: account("acme", &good.url("/hook"), "")
            + &account("misnamed", &misnamed.url("/hook"), ""),
        ..Default::default()
    };
    let worker = TestWorker::spawn(settings(&names, &spec)).await;
    let delivered = bodies("ok", "acme", 5);
    broker.publish(&delivered).await;
    broker.publish(&bodies("name", "misnamed", 2)).await;
    assert_eq!(good.wait_for_distinct(5, Duration::from_secs(10)).await, 5);
    assert_eq!(
        good.delivered_ids().into_iter().collect::<HashSet<_>>(),
        delivered.iter().map(|b| event_id(b)).collect()
    );
    // A certificate for another name is refused, retryably, and says so.
    for (id, error) in retried(&broker, &names, 2).await {
        assert!(id.starts_with("name"), "{id}");
        assert!(
            error.contains("invalid peer certificate") && error.contains("not valid for name"),
            "{error}"
        );
    }
    assert!(misnamed.requests().is_empty());
    assert!(
        worker.metric(
            "courier_requests_total",
            &[("account", "misnamed"), ("outcome", "retryable")]
        ) >= 2.0
    );
    worker.shutdown().await;

    // Without ca_file the private CA is unknown: refused, retryably, and said so.
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let spec = ConfigSpec {
        retry: ONE_ATTEMPT.into(),
        accounts: account("acme", &good.url("/hook"), ""),
        ..Default::default()
    };
    let worker = TestWorker::spawn(settings(&names, &spec)).await;
    broker.publish(&bodies("noca", "acme", 3)).await;
    for (id, error) in retried(&broker, &names, 3).await {
        assert!(id.starts_with("noca"), "{id}");
        assert!(
            error.contains("invalid peer certificate") && error.contains("UnknownIssuer"),
            "{error}"
        );
    }
    assert_eq!(good.delivered_ids().len(), 5, "nothing more was accepted");
    worker.shutdown().await;
}

#[tokio::test]
async fn an_mtls_receiver_accepts_the_configured_client_certificate_and_refuses_none() {
    let certs = TestCerts::generate();
    let receiver = Receiver::start_tls(certs.server_config("server", true)).await;
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let identity = format!(
        "client_cert = \"{}\"\nclient_key = \"{}\"",
        certs.file("client.pem"),
        certs.file("client.key")
    );
    let spec = ConfigSpec {
        delivery: format!("ca_file = \"{}\"", certs.file("ca.pem")),
        retry: ONE_ATTEMPT.into(),
        accounts: account("acme", &receiver.url("/acme"), &identity)
            + &account("anon", &receiver.url("/anon"), ""),
        ..Default::default()
    };
    let worker = TestWorker::spawn(settings(&names, &spec)).await;
    let signed = bodies("m", "acme", 4);
    broker.publish(&signed).await;
    broker.publish(&bodies("a", "anon", 2)).await;
    assert_eq!(
        receiver.wait_for_distinct(4, Duration::from_secs(10)).await,
        4
    );
    // The account without a certificate never gets past the handshake.
    for (id, error) in retried(&broker, &names, 2).await {
        assert!(id.starts_with('a'), "{id}");
        // TLS 1.3: the server's refusal arrives once the client sends its request; when
        // the request is written before the alert is read, the client sees the reset.
        assert!(
            error.contains("CertificateRequired") || error.contains("reset"),
            "{error}"
        );
    }
    assert!(
        receiver
            .tls_failures
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 2
    );
    let paths: HashSet<String> = receiver.requests().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, HashSet::from(["/acme".to_owned()]));
    assert_eq!(
        receiver.delivered_ids().into_iter().collect::<HashSet<_>>(),
        signed.iter().map(|b| event_id(b)).collect()
    );
    worker.shutdown().await;
}

/// A reload that adds the missing client certificate also closes the circuit the refusals
/// opened: the next events go out at once, long before the cooldown
/// (docs/operations.md, "The circuit breaker").
#[tokio::test]
async fn client_certificates_are_read_again_on_reload() {
    let certs = TestCerts::generate();
    let receiver = Receiver::start_tls(certs.server_config("server", true)).await;
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let spec = ConfigSpec {
        delivery: format!("ca_file = \"{}\"", certs.file("ca.pem")),
        retry: ONE_ATTEMPT.into(),
        top: "[circuit]\nfailure_threshold = 1\ncooldown = \"60s\"\nmax_cooldown = \"60s\"".into(),
        accounts: account("acme", &receiver.url("/acme"), ""),
        ..Default::default()
    };
    let text = config_text(&names, &spec);
    let path = write_config(&text);
    let running = start_courier(&path, &path.with_file_name("courier.log")).await;
    let admin = running.admin;
    let reloads = |result: &'static str| async move {
        metric_value(
            &http_get(admin, "/metrics").await.1,
            "courier_config_reloads_total",
            &[("result", result)],
        )
    };
    let circuit_open = || async move {
        metric_value(
            &http_get(admin, "/metrics").await.1,
            "courier_circuit_open",
            &[("account", "acme"), ("type", "company")],
        )
    };
    // No client certificate yet: refused, and the circuit opens.
    broker.publish(&bodies("before", "acme", 1)).await;
    assert_eq!(retried(&broker, &names, 1).await.len(), 1);
    assert_eq!(circuit_open().await, 1.0, "the circuit did not open");

    // A key file that cannot be read: the reload is refused, naming the key.
    let with_identity = |key: &str| {
        text.replace(
            &format!("companies_url = \"{}\"", receiver.url("/acme")),
            &format!(
                "companies_url = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{key}\"",
                receiver.url("/acme"),
                certs.file("client.pem")
            ),
        )
    };
    std::fs::write(&path, with_identity("/nonexistent/client.key")).unwrap();
    sighup(&running.proc.0);
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            reloads("error").await == 1.0
        })
        .await,
        "the reload with a missing key file was not refused"
    );
    let log = std::fs::read_to_string(path.with_file_name("courier.log")).unwrap();
    assert!(log.contains("account.client_key"), "{log}");
    assert!(!log.contains("/nonexistent"), "the path is not printed");

    assert_eq!(
        circuit_open().await,
        1.0,
        "a refused reload closed the circuit"
    );

    // The files as they are now, read on reload: the certificate is presented, and the
    // destination, reached with another identity, starts with a closed circuit.
    std::fs::write(&path, with_identity(&certs.file("client.key"))).unwrap();
    sighup(&running.proc.0);
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            reloads("ok").await == 1.0
        })
        .await,
        "the reload was not applied"
    );
    assert!(
        eventually_async(Duration::from_secs(5), || async {
            circuit_open().await == 0.0
        })
        .await,
        "the reload kept the circuit open"
    );
    let after = bodies("after", "acme", 3);
    broker.publish(&after).await;
    assert_eq!(
        receiver.wait_for_distinct(3, Duration::from_secs(10)).await,
        3
    );
    assert_eq!(
        receiver.delivered_ids().into_iter().collect::<HashSet<_>>(),
        after.iter().map(|b| event_id(b)).collect()
    );
}
