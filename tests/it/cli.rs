//! The binary: exit codes, config errors, SIGTERM, admin endpoints, the private-network
//! guard, `publish` and `receive`.

use std::collections::HashSet;
use std::process::Stdio;
use std::time::Duration;

use crate::helpers::*;

const GOOD: &str = r#"
[broker]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
[[account]]
id = "acme"
companies_url = "https://hooks.example.com/companies"
"#;

#[test]
fn check_accepts_a_good_config_and_hides_secrets() {
    let path = write_config(&format!(
        "{GOOD}hmac_secret = \"${{IT_SECRET}}\"\nheaders = {{ Authorization = \"Bearer zzz-token\" }}\n"
    ));
    let (code, stdout, stderr) = output(
        courier(&["check", "--config", path.to_str().unwrap()]).env("IT_SECRET", "s3cr3t-value"),
    );
    assert!(
        !stderr.contains("private-network guard"),
        "a documentation name: {stderr}"
    );
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("acme"), "{stdout}");
    assert!(stdout.contains("https://hooks.example.com:443"), "{stdout}");
    for secret in ["s3cr3t-value", "zzz-token", "/companies", "guest:guest"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{secret} printed"
        );
    }
    // The global option works before the command too, and so does $COURIER_CONFIG.
    let (code, _, _) =
        output(courier(&["--config", path.to_str().unwrap(), "check"]).env("IT_SECRET", "x"));
    assert_eq!(code, 0);
    let (code, _, _) = output(
        courier(&["check"])
            .env("COURIER_CONFIG", &path)
            .env("IT_SECRET", "x"),
    );
    assert_eq!(code, 0);
}

#[test]
fn config_errors_exit_2_naming_the_key() {
    let cases: Vec<(String, &str)> = vec![
        (format!("{GOOD}batch_size = 0\n"), "account.batch_size"),
        (format!("{GOOD}batch_size = 201\n"), "account.batch_size"),
        (
            format!("{GOOD}hmac_secret = \"${{COURIER_IT_SURELY_UNSET}}\"\n"),
            "COURIER_IT_SURELY_UNSET",
        ),
        (
            GOOD.replace(
                "https://hooks.example.com/companies",
                "ftp://hooks.example.com/",
            ),
            "account.companies_url",
        ),
        (
            format!(
                "{GOOD}\n[[account]]\nid = \"acme\"\ncompanies_url = \"https://b.example.com/\"\n"
            ),
            "account.id",
        ),
        (format!("{GOOD}colour = \"blue\"\n"), "colour"),
        (
            format!("{GOOD}flush_interval = 2\n"),
            "account.flush_interval",
        ),
        (
            format!("{GOOD}[broker]\nprefetch = 5\n"),
            "the table [broker] appears twice",
        ),
        (
            format!("{GOOD}shutdown_timeout = \"5s\"\n"),
            "shutdown_timeout is a top-level key",
        ),
        (
            format!(
                "{GOOD}hmac_secret = \"${{IT_UNSET_1}}\"\nheaders = {{ A = \"${{IT_UNSET_2}}\" }}\n"
            ),
            "2 environment variables are not set",
        ),
        (
            format!("{GOOD}standard_webhooks_secret = \"MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\"\n"),
            "standard_webhooks_secret",
        ),
        (
            format!("{GOOD}client_cert = \"/etc/courier/a.crt\"\n"),
            "account.client_key",
        ),
        (
            format!(
                "{GOOD}client_cert = \"/nonexistent/a.crt\"\nclient_key = \"/nonexistent/a.key\"\n"
            ),
            "account.client_cert",
        ),
        (
            GOOD.replace("[broker]", "[delivery]\nordering = \"sorted\"\n[broker]"),
            "delivery.ordering",
        ),
        (
            GOOD.replace(
                "[broker]",
                "[delivery]\nca_file = \"/etc/ca.pem\"\n[broker]",
            ),
            "delivery.ca_file",
        ),
        (
            GOOD.replace(
                "[broker]",
                "[retry]\nschedule = [\"30s\", \"30s\"]\n[broker]",
            ),
            "retry.schedule",
        ),
    ];
    for (text, key) in cases {
        let path = write_config(&text);
        let (code, _, stderr) =
            output(&mut courier(&["check", "--config", path.to_str().unwrap()]));
        assert_eq!(code, 2, "config should be refused: {text}");
        assert!(stderr.contains(key), "stderr does not name {key}: {stderr}");
        assert!(!stderr.contains("MfKQ9r8G"), "a secret was shown: {stderr}");
        assert!(
            stderr.contains("courier.toml"),
            "stderr does not name the file: {stderr}"
        );
    }
    // Per-record ordering is accepted, and `check` says what it sets up.
    let ordered = write_config(&GOOD.replace(
        "[broker]",
        "[delivery]\nordering = \"per_record\"\n[broker]\nshards = 8",
    ));
    let (code, stdout, stderr) = output(&mut courier(&[
        "check",
        "--offline",
        "--config",
        ordered.to_str().unwrap(),
    ]));
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("ordering: per_record"), "{stdout}");
    assert!(stdout.contains("8 shard queues"), "{stdout}");
    let (code, _, stderr) = output(&mut courier(&[
        "check",
        "--config",
        "/nonexistent/courier.toml",
    ]));
    assert_eq!(code, 2);
    assert!(stderr.contains("/nonexistent/courier.toml"), "{stderr}");
    let (code, _, _) = output(&mut courier(&["frobnicate"]));
    assert_eq!(code, 2, "usage errors exit 2");
}

/// The value of `${IT_TOKEN}` in the leak tests: letters only, so that it also passes for a
/// URL scheme or a duration unit, where the old messages quoted it.
const IT_TOKEN: &str = "itTokenSecretValue";

/// Whether `text` shows the token or the number that the leak tests write into the file.
fn leaks(text: &str) -> bool {
    text.to_lowercase().contains(&IT_TOKEN.to_lowercase()) || text.contains("1234567890")
}

#[test]
fn config_errors_name_file_key_and_account_but_never_the_value() {
    let cases = [
        (
            "headers = { X-Api-Key = 1234567890 }",
            "account.headers.X-Api-Key",
            "expected a string",
        ),
        (
            "headers = \"${IT_TOKEN}\"",
            "account.headers",
            "expected a table",
        ),
        (
            "batch_size = \"${IT_TOKEN}\"",
            "account.batch_size",
            "expected an integer",
        ),
        (
            "flush_interval = \"5 ${IT_TOKEN}\"",
            "account.flush_interval",
            "duration",
        ),
        (
            "contacts_url = \"${IT_TOKEN}:x\"",
            "account.contacts_url",
            "http or https",
        ),
    ];
    for (line, key, expected) in cases {
        let path = write_config(&format!("{GOOD}{line}\n"));
        let (code, stdout, stderr) = output(
            courier(&["check", "--config", path.to_str().unwrap()]).env("IT_TOKEN", IT_TOKEN),
        );
        assert_eq!(code, 2, "config should be refused: {line}");
        for named in [path.to_str().unwrap(), key, "account \"acme\"", expected] {
            assert!(stderr.contains(named), "{line}: {named} not in {stderr}");
        }
        assert!(!leaks(&stderr) && !leaks(&stdout), "{line}: {stderr}");
    }
}

#[tokio::test]
async fn a_refused_reload_logs_the_key_but_never_the_value() {
    let names = Names::new();
    let _broker = Broker::connect(&names, &["30s"]).await;
    let spec = ConfigSpec {
        accounts: "[[account]]\nid = \"acme\"\ncompanies_url = \"http://127.0.0.1:9/\"\n".into(),
        ..Default::default()
    };
    let text = config_text(&names, &spec);
    let path = write_config(&text);
    let log = path.with_file_name("courier.log");
    let Running {
        proc: mut child,
        admin,
    } = start_run(
        courier(&["run", "--config", path.to_str().unwrap()]).env("IT_TOKEN", IT_TOKEN),
        &log,
    )
    .await;
    for line in [
        "headers = { X-Api-Key = 1234567890 }",
        "headers = \"${IT_TOKEN}\"",
    ] {
        std::fs::write(&path, format!("{text}{line}\n")).unwrap();
        let before = reloads_refused(admin).await;
        sighup(&child.0);
        assert!(
            eventually_async(Duration::from_secs(10), || async {
                reloads_refused(admin).await > before
            })
            .await,
            "{line}: the reload was not refused"
        );
    }
    sigterm(&child.0);
    assert_eq!(
        wait_exit(&mut child.0, Duration::from_secs(20)).await,
        Some(0)
    );
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("account.headers.X-Api-Key"), "{logged}");
    assert!(logged.contains("expected a table"), "{logged}");
    assert!(!leaks(&logged), "{logged}");
}

/// `courier_config_reloads_total{result="error"}` of the worker on `admin`.
async fn reloads_refused(admin: u16) -> f64 {
    metric_value(
        &http_get(admin, "/metrics").await.1,
        "courier_config_reloads_total",
        &[("result", "error")],
    )
}

#[tokio::test]
async fn an_existing_queue_with_other_arguments_exits_1_naming_it() {
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    // Everything as courier declares it, but another delivery limit.
    let settings = settings(
        &names,
        &ConfigSpec {
            accounts: "[[account]]\nid = \"a\"\ncompanies_url = \"http://127.0.0.1:9/\"\n".into(),
            ..Default::default()
        },
    );
    let spec = courier::broker::topology::queues(&settings.broker, &settings.retry.schedule, None)
        .into_iter()
        .find(|q| q.name == names.deliver())
        .unwrap();
    broker.declare_with_limit(&spec, 99).await;
    let path = write_config(&config_text(
        &names,
        &ConfigSpec {
            accounts: "[[account]]\nid = \"a\"\ncompanies_url = \"http://127.0.0.1:9/\"\n".into(),
            ..Default::default()
        },
    ));
    let (code, _, stderr) = output(&mut courier(&["setup", "--config", path.to_str().unwrap()]));
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains(&names.deliver()),
        "queue not named: {stderr}"
    );
    assert!(
        stderr.contains("x-delivery-limit"),
        "argument not named: {stderr}"
    );
    let (code, _, stderr) = output(&mut courier(&["run", "--config", path.to_str().unwrap()]));
    assert_eq!(code, 1, "run refuses too: {stderr}");
    assert!(stderr.contains("x-delivery-limit"), "{stderr}");
}

#[tokio::test]
async fn sigterm_delivers_buffered_events_then_exits_0() {
    let receiver = Receiver::start().await;
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let spec = ConfigSpec {
        accounts: format!(
            "[[account]]\nid = \"acme\"\ncompanies_url = \"{}\"\nbatch_size = 200\nflush_interval = \"5m\"\nhmac_secret = \"hush-hush\"\n",
            receiver.url("/hook")
        ),
        ..Default::default()
    };
    let path = write_config(
        &format!("{}\n", config_text(&names, &spec))
            .replace("[admin]", "[log]\nlevel = \"trace\"\n\n[admin]"),
    );
    let log = path.with_file_name("courier.log");
    let Running {
        proc: mut child,
        admin: port,
        ..
    } = start_courier(&path, &log).await;
    assert_eq!(http_get(port, "/healthz").await.0, 200);
    let bodies: Vec<Vec<u8>> = (0..25)
        .map(|i| event(&format!("t{i}"), "acme", "company"))
        .collect();
    broker.publish(&bodies).await;
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            metric_value(
                &http_get(port, "/metrics").await.1,
                "courier_buffered_events",
                &[],
            ) == 25.0
        })
        .await,
        "events not buffered"
    );
    assert!(
        receiver.requests().is_empty(),
        "nothing sent before the 5m interval"
    );
    sigterm(&child.0);
    assert_eq!(
        wait_exit(&mut child.0, Duration::from_secs(20)).await,
        Some(0),
        "exit code after SIGTERM"
    );
    let ids: HashSet<_> = receiver.delivered_ids().into_iter().collect();
    assert_eq!(ids.len(), 25, "buffered events delivered before exit");
    assert_eq!(broker.settled_depth(&names.deliver()).await, 0);
    // Even at trace level, no secret or broker password reaches the log.
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("consuming"), "{logged}");
    for secret in ["hush-hush", "guest:guest", "/hook"] {
        assert!(!logged.contains(secret), "{secret} in the log");
    }
}

/// A TCP listener that counts connections: the proxy a misconfigured client would use.
async fn proxy_trap() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = hits.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            drop(socket);
        }
    });
    (port, hits)
}

#[tokio::test]
async fn the_private_network_guard_refuses_loopback_in_every_spelling() {
    let v4 = Receiver::start().await;
    let v6 = Receiver::start_on("[::1]:0").await;
    let (proxy_port, proxy_hits) = proxy_trap().await;
    let port = v4.addr.port();
    let urls = [
        ("ip", format!("http://127.0.0.1:{port}/a")),
        ("ipv6", format!("http://[::1]:{}/b", v6.addr.port())),
        ("name", format!("http://localhost:{port}/c")),
        ("decimal", format!("http://2130706433:{port}/d")),
        ("mapped", format!("http://[::ffff:127.0.0.1]:{port}/e")),
    ];
    for guard_on in [true, false] {
        let names = Names::new();
        let broker = Broker::connect(&names, &["100ms"]).await;
        let mut accounts = String::new();
        for (id, url) in &urls {
            accounts.push_str(&format!(
                "[[account]]\nid = \"{id}\"\ncompanies_url = \"{url}\"\n\n"
            ));
        }
        let spec = ConfigSpec {
            retry: "immediate_attempts = 1\nschedule = [\"100ms\"]".into(),
            accounts,
            ..Default::default()
        };
        let text = config_text(&names, &spec).replace(
            "allow_private_networks = true",
            &format!("allow_private_networks = {}", !guard_on),
        );
        let path = write_config(&text);
        let Running {
            proc: mut child, ..
        } = start_run(
            courier(&["run", "--config", path.to_str().unwrap()])
                .env("HTTP_PROXY", format!("http://127.0.0.1:{proxy_port}"))
                .env("http_proxy", format!("http://127.0.0.1:{proxy_port}"))
                .env("ALL_PROXY", format!("http://127.0.0.1:{proxy_port}")),
            &path.with_file_name("courier.log"),
        )
        .await;
        let bodies: Vec<Vec<u8>> = urls
            .iter()
            .map(|(id, _)| event(&format!("g-{id}"), id, "company"))
            .collect();
        broker.publish(&bodies).await;
        if guard_on {
            assert_eq!(
                broker
                    .wait_for_depth(&names.dead(), 5, Duration::from_secs(20))
                    .await,
                5,
                "all refused"
            );
            let dead = broker.drain(&names.dead()).await;
            for (body, headers) in dead {
                let error = header_str(&headers, "x-courier-last-error").unwrap();
                assert!(
                    error.contains("private-network guard"),
                    "{}: {error}",
                    event_id(&body)
                );
            }
            assert!(
                v4.requests().is_empty() && v6.requests().is_empty(),
                "a refused destination was contacted"
            );
        } else {
            let both = || v4.delivered_ids().len() + v6.delivered_ids().len();
            assert!(
                eventually(Duration::from_secs(20), || both() == 5).await,
                "only {} delivered",
                both()
            );
            assert_eq!(v6.delivered_ids(), vec!["g-ipv6"]);
        }
        sigterm(&child.0);
        assert_eq!(
            wait_exit(&mut child.0, Duration::from_secs(20)).await,
            Some(0)
        );
    }
    assert_eq!(
        proxy_hits.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the proxy from the environment was used"
    );
}

#[tokio::test]
async fn publish_validates_the_whole_file_first() {
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let path = write_config(&config_text(
        &names,
        &ConfigSpec {
            accounts: "[[account]]\nid = \"acme\"\ncompanies_url = \"http://127.0.0.1:9/\"\n"
                .into(),
            ..Default::default()
        },
    ));
    let config = path.to_str().unwrap();
    let (code, _, stderr) = output(&mut courier(&["setup", "--config", config]));
    assert_eq!(code, 0, "{stderr}");
    let events = path.with_file_name("events.ndjson");
    let good: Vec<String> = (0..5)
        .map(|i| String::from_utf8(event(&format!("p{i}"), "acme", "company")).unwrap())
        .collect();
    std::fs::write(
        &events,
        format!(
            "{}\n{}\n{{\"id\":\"broken\"\n{}\n",
            good[0],
            good[1],
            good[2..].join("\n")
        ),
    )
    .unwrap();
    let (code, _, stderr) = output(&mut courier(&[
        "publish",
        "--config",
        config,
        events.to_str().unwrap(),
    ]));
    assert_eq!(code, 1);
    assert!(stderr.contains("line 3"), "{stderr}");
    assert_eq!(broker.depth(&names.deliver()).await, 0, "nothing published");
    let (code, stdout, stderr) = output(&mut courier(&[
        "publish",
        "--skip-invalid",
        "--config",
        config,
        events.to_str().unwrap(),
    ]));
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("published 5") && stdout.contains("skipped 1"),
        "{stdout}"
    );
    let queued = broker.drain(&names.deliver()).await;
    let ids: Vec<String> = queued.iter().map(|(b, _)| event_id(b)).collect();
    assert_eq!(ids, vec!["p0", "p1", "p2", "p3", "p4"], "file order");
}

/// A `courier receive --listen 127.0.0.1:0 ARGS` subprocess and the address it bound.
struct Receive {
    child: Proc,
    stdout: std::io::BufReader<std::process::ChildStdout>,
    addr: String,
}

impl Receive {
    fn start(args: &[&str]) -> Self {
        let mut cmd = courier(&["receive", "--listen", "127.0.0.1:0"]);
        let mut child = Proc(
            cmd.args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        // The first line names the address it bound.
        let mut stdout = std::io::BufReader::new(child.0.stdout.take().unwrap());
        let mut first = String::new();
        std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
        let addr = first
            .split("http://")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("no address in {first:?}"))
            .to_owned();
        Self {
            child,
            stdout,
            addr,
        }
    }

    /// POSTs `len` bytes to `path`; the status of the answer.
    async fn post(&self, path: &str, len: usize) -> u16 {
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        let url = format!("http://{}{path}", self.addr);
        let answer = client.post(url).body(vec![b'x'; len]).send().await;
        answer.unwrap().status().as_u16()
    }

    /// Stops the receiver and returns the lines it printed after the first.
    fn stop(mut self) -> String {
        sigterm(&self.child.0);
        let _ = self.child.0.wait();
        let mut out = String::new();
        std::io::Read::read_to_string(&mut self.stdout, &mut out).unwrap();
        out
    }
}

#[tokio::test]
async fn receive_accepts_what_courier_sends_and_answers_413_over_max_body() {
    // 3 MB: more than the old fixed limit, less than the default max_body_bytes.
    let receive = Receive::start(&[]);
    assert_eq!(receive.post("/big", 3_000_000).await, 200);
    let out = receive.stop();
    assert!(
        out.contains("POST /big 200") && out.contains("bytes=3000000"),
        "{out}"
    );

    let receive = Receive::start(&["--max-body", "1000"]);
    assert_eq!(receive.post("/small", 2000).await, 413);
    assert_eq!(receive.post("/small", 1000).await, 200);
    let out = receive.stop();
    assert!(
        out.contains("POST /small 413 over the --max-body limit of 1000 bytes"),
        "{out}"
    );
    assert!(out.contains("POST /small 200"), "{out}");
}

#[tokio::test]
async fn receive_verifies_signatures() {
    let receive = Receive::start(&["--secret", "abc"]);
    let addr = receive.addr.clone();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let body = br#"[{"id":"1"},{"id":"2"}]"#;
    let url = format!("http://{addr}/any/path");
    let good = client
        .post(&url)
        .header(
            "x-goodfit-hmac-sha256",
            courier::sign::signature(b"abc", body),
        )
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(good.status().as_u16(), 200);
    let bad = client
        .post(&url)
        .header("x-goodfit-hmac-sha256", "sha256=00")
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 401);
    let out = receive.stop();
    assert!(
        out.contains("POST /any/path 200 events=2") && out.contains("sig=ok"),
        "{out}"
    );
    assert!(out.contains("401") && out.contains("sig=bad"), "{out}");
}

#[tokio::test]
async fn receive_takes_a_secret_per_path_and_saves_each_request() {
    let dir = temp_dir().join("saved");
    let receive = Receive::start(&[
        "--secret",
        "S1",
        "--secret",
        "/globex/=S2",
        "--save",
        dir.to_str().unwrap(),
    ]);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let body = br#"{"id":"1"}"#;
    let post = |path: &str, secret: &[u8]| {
        client
            .post(format!("http://{}{path}", receive.addr))
            .header(
                "x-goodfit-hmac-sha256",
                courier::sign::signature(secret, body),
            )
            .header("x-courier-delivery-id", "d-1")
            .body(body.to_vec())
            .send()
    };
    assert_eq!(post("/acme/companies", b"S1").await.unwrap().status(), 200);
    assert_eq!(
        post("/globex/companies", b"S2").await.unwrap().status(),
        200
    );
    assert_eq!(
        post("/globex/companies", b"S1").await.unwrap().status(),
        401
    );
    assert_eq!(post("/acme/companies", b"S2").await.unwrap().status(), 401);
    let out = receive.stop();
    assert!(
        out.contains("POST /globex/companies 200") && out.contains("saved=000002"),
        "{out}"
    );
    // Each request's body, byte for byte, and its headers.
    assert_eq!(std::fs::read(dir.join("000001.body")).unwrap(), body);
    let headers = std::fs::read_to_string(dir.join("000002.headers")).unwrap();
    assert!(headers.starts_with("POST /globex/companies\n"), "{headers}");
    assert!(
        headers.contains("x-courier-delivery-id: d-1\n"),
        "{headers}"
    );
    assert!(
        headers.contains(&format!(
            "x-goodfit-hmac-sha256: {}\n",
            courier::sign::signature(b"S2", body)
        )),
        "{headers}"
    );
    assert_eq!(
        std::fs::read_dir(&dir).unwrap().count(),
        8,
        "4 requests, 2 files each"
    );

    // Two secrets without a path is a usage error.
    let (code, _, err) = output(&mut courier(&[
        "receive",
        "--listen",
        "127.0.0.1:0",
        "--secret",
        "s3cr3t-a",
        "--secret",
        "s3cr3t-b",
    ]));
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("more than one secret without a path"), "{err}");
    assert!(!err.contains("s3cr3t"), "{err}");
}

#[tokio::test]
async fn kill_9_mid_delivery_loses_nothing() {
    let receiver = Receiver::start().await;
    receiver.set_delay(Duration::from_millis(300));
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let spec = ConfigSpec {
        accounts: format!(
            "[[account]]\nid = \"acme\"\ncompanies_url = \"{}\"\nbatch_size = 10\nflush_interval = \"100ms\"\n",
            receiver.url("/hook")
        ),
        delivery: "max_inflight_per_destination = 2".into(),
        ..Default::default()
    };
    let path = write_config(&config_text(&names, &spec));
    let mut first = start_courier(&path, &path.with_file_name("first.log")).await;
    let bodies: Vec<Vec<u8>> = (0..400)
        .map(|i| event(&format!("k{i}"), "acme", "company"))
        .collect();
    broker.publish(&bodies).await;
    receiver.wait_for_events(60, Duration::from_secs(20)).await;
    // Kill while requests wait for their answer: those events were sent but not acked.
    receiver.hold();
    assert!(
        eventually(Duration::from_secs(10), || !receiver.in_flight().is_empty()).await,
        "nothing in flight to kill"
    );
    first.proc.0.kill().unwrap(); // SIGKILL: no flush, no goodbye
    let _ = first.proc.0.wait();
    let in_flight: HashSet<String> = receiver
        .in_flight()
        .iter()
        .flat_map(Recorded::ids)
        .collect();
    let before: HashSet<String> = receiver.delivered_ids().into_iter().collect();
    assert!(!in_flight.is_empty(), "nothing was in flight at the kill");
    assert!(
        before.len() < 400,
        "the kill came too late to test anything ({} delivered)",
        before.len()
    );
    receiver.set_delay(Duration::ZERO);
    let restarted = std::time::Instant::now();
    receiver.release();
    let mut second = start_courier(&path, &path.with_file_name("second.log")).await;
    let all: HashSet<String> = bodies.iter().map(|b| event_id(b)).collect();
    // What the receiver accepted before the kill, and what the second run delivers.
    let delivered = || {
        let mut ids = before.clone();
        ids.extend(
            receiver
                .accepted()
                .iter()
                .filter(|r| r.at >= restarted)
                .flat_map(Recorded::ids),
        );
        ids
    };
    assert!(
        eventually(Duration::from_secs(30), || delivered().is_superset(&all)).await,
        "lost {:?}",
        all.difference(&delivered()).collect::<Vec<_>>()
    );
    let recovered = restarted.elapsed();
    let again: HashSet<String> = receiver
        .accepted()
        .iter()
        .filter(|r| r.at >= restarted)
        .flat_map(Recorded::ids)
        .collect();
    assert!(
        again.is_superset(&in_flight),
        "events in flight at the kill not delivered again: {:?}",
        in_flight.difference(&again).collect::<Vec<_>>()
    );
    sigterm(&second.proc.0);
    assert_eq!(
        wait_exit(&mut second.proc.0, Duration::from_secs(20)).await,
        Some(0)
    );
    assert_eq!(broker.settled_depth(&names.deliver()).await, 0);
    assert_eq!(broker.depth(&names.dead()).await, 0);
    print_figures(
        "kill -9",
        all.len(),
        &receiver.delivered_ids(),
        0,
        recovered,
    );
}
