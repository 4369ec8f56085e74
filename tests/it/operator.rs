//! What an operator sees and does on the second day: the cause a dead letter keeps, the
//! log lines of deliveries and dead-letterings, `dlq show` and `dlq discard`, validated
//! replay filters, the circuit after a reload that fixes a destination.

use std::time::Duration;

use crate::helpers::*;

fn account(url: &str, batch_size: usize) -> String {
    format!(
        "[[account]]\nid = \"acme\"\ncompanies_url = \"{url}\"\nbatch_size = {batch_size}\nflush_interval = \"50ms\"\n"
    )
}

#[tokio::test]
async fn dead_letters_keep_the_real_status_and_error_after_the_circuit_opened() {
    let receiver = Receiver::start().await;
    receiver.set_status(500);
    let names = Names::new();
    let broker = Broker::connect(&names, &["100ms"]).await;
    let spec = ConfigSpec {
        retry: "immediate_attempts = 1\nschedule = [\"100ms\"]".into(),
        // Opens after two failures and stays open for the whole test.
        top: "[circuit]\nfailure_threshold = 2\ncooldown = \"60s\"\nmax_cooldown = \"60s\"".into(),
        accounts: account(&receiver.url("/hook"), 1),
        ..Default::default()
    };
    let worker = TestWorker::spawn(settings(&names, &spec)).await;
    let bodies: Vec<Vec<u8>> = (0..12)
        .map(|i| event(&format!("d{i}"), "acme", "company"))
        .collect();
    broker.publish(&bodies).await;
    assert_eq!(
        broker
            .wait_for_depth(&names.dead(), 12, Duration::from_secs(20))
            .await,
        12
    );
    let sizes = worker.metric("courier_batch_size_count", &[("account", "acme")]);
    worker.shutdown().await;
    assert_eq!(
        sizes,
        receiver.requests().len() as f64,
        "courier_batch_size counts requests, not batches parked by the circuit"
    );
    // Each event needed two attempts to be exhausted; the circuit refused most of them.
    assert!(
        receiver.requests().len() < 24,
        "{} requests: the circuit never refused",
        receiver.requests().len()
    );
    let letters = broker.drain(&names.dead()).await;
    assert_eq!(letters.len(), 12);
    let mut refused = 0;
    for (_, headers) in &letters {
        let h = |name| header_str(headers, name).unwrap_or_default();
        assert_eq!(h("x-courier-reason"), "retries_exhausted");
        assert_eq!(h("x-courier-last-status"), "500", "{headers:?}");
        let error = h("x-courier-last-error");
        assert!(
            error.starts_with("HTTP 500 Internal Server Error"),
            "{error}"
        );
        if error.contains("circuit open for http://127.0.0.1:") {
            refused += 1;
        }
        assert!(!error.contains("/hook"), "no path in {error}");
    }
    assert!(refused > 0, "no letter says the circuit was open");
}

/// The JSON log lines whose `message` starts with `message`.
fn log_lines(log: &str, message: &str) -> Vec<serde_json::Value> {
    log.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.starts_with(message))
        })
        .collect()
}

/// A `courier run` subprocess logging JSON at `level`, with one attempt, one 100 ms tier
/// and a circuit that does not open; returns it and its log file.
async fn json_logging_courier(
    names: &Names,
    level: &str,
    accounts: String,
) -> (Running, std::path::PathBuf) {
    let spec = ConfigSpec {
        retry: "immediate_attempts = 1\nschedule = [\"100ms\"]".into(),
        top: format!(
            "[log]\nlevel = \"{level}\"\nformat = \"json\"\n[circuit]\nfailure_threshold = 1000"
        ),
        accounts,
        ..Default::default()
    };
    let path = write_config(&config_text(names, &spec));
    let log = path.with_file_name("courier.log");
    (start_courier(&path, &log).await, log)
}

/// Stops `running` with SIGTERM, asserts a clean exit and returns its log.
async fn stop_for_log(mut running: Running, log: &std::path::Path) -> String {
    sigterm(&running.proc.0);
    assert_eq!(
        wait_exit(&mut running.proc.0, Duration::from_secs(20)).await,
        Some(0)
    );
    std::fs::read_to_string(log).unwrap()
}

#[tokio::test]
async fn deliveries_retries_and_dead_letterings_are_logged_at_their_levels() {
    let good = Receiver::start().await;
    good.reject_bodies_with("\"bad-1\"", 422);
    let down = Receiver::start().await;
    down.set_status(500);
    let names = Names::new();
    let broker = Broker::connect(&names, &["100ms"]).await;
    let accounts = format!(
        "{}[[account]]\nid = \"globex\"\ncompanies_url = \"{}\"\n",
        account(&good.url("/hook/secret-path"), 1),
        down.url("/down/secret-path")
    );
    let (running, log) = json_logging_courier(&names, "debug", accounts).await;
    broker
        .publish(&[
            event("ok-1", "acme", "company"),
            event("bad-1", "acme", "company"),
            event("down-1", "globex", "company"),
        ])
        .await;
    assert_eq!(
        broker
            .wait_for_depth(&names.dead(), 2, Duration::from_secs(20))
            .await,
        2
    );
    assert_eq!(good.wait_for_events(1, Duration::from_secs(5)).await, 1);
    let text = stop_for_log(running, &log).await;
    assert!(
        !text.contains("secret-path"),
        "a URL path was logged:\n{text}"
    );
    assert!(!text.contains("to scheduled retry"), "{text}");

    // Each request at debug: destination, events, status, duration, delivery id, attempt.
    let requests = log_lines(&text, "request");
    let delivered = requests
        .iter()
        .find(|l| l["status"] == 200)
        .unwrap_or_else(|| panic!("no delivered request logged:\n{text}"));
    assert_eq!(delivered["level"], "DEBUG");
    assert_eq!(delivered["destination"], format!("http://{}", good.addr));
    assert_eq!(delivered["type"], "company");
    assert_eq!(delivered["account"], "acme");
    assert_eq!(delivered["events"], 1);
    assert_eq!(delivered["attempt"], 1);
    assert_eq!(
        delivered["delivery_id"].as_str(),
        good.accepted()[0].header("x-courier-delivery-id")
    );
    assert!(delivered["duration"].is_string(), "{delivered}");

    // The scheduled retry at info, with its tier.
    let retried = log_lines(&text, "scheduled retry");
    assert_eq!(retried.len(), 1, "{text}");
    assert_eq!(retried[0]["level"], "INFO");
    assert_eq!(retried[0]["tier"], "100ms");
    assert_eq!(retried[0]["status"], 500);
    assert_eq!(retried[0]["account"], "globex");

    // Both dead-letterings at warn, with their reason and the last status.
    let dead = log_lines(&text, "dead-lettered");
    let of = |reason: &str| {
        dead.iter()
            .find(|l| l["reason"] == reason)
            .unwrap_or_else(|| panic!("no {reason} line:\n{text}"))
    };
    let rejected = of("rejected_422");
    assert_eq!(rejected["level"], "WARN");
    assert_eq!(rejected["status"], 422);
    assert_eq!(rejected["ids"], "bad-1");
    // The shutdown says what it flushed and what it left for redelivery.
    let shutdown = log_lines(&text, "shutdown:");
    assert_eq!(shutdown.len(), 1, "{text}");
    assert_eq!(shutdown[0]["events_left"], 0);
    assert!(shutdown[0]["batches_flushed"].is_u64(), "{}", shutdown[0]);
    let exhausted = of("retries_exhausted");
    assert_eq!(exhausted["level"], "WARN");
    assert_eq!(exhausted["status"], 500);
    assert_eq!(exhausted["destination"], format!("http://{}", down.addr));
    assert_eq!(exhausted["ids"], "down-1");
}

/// The warn lines of dead-letterings of `account` and `reason`: the first of each interval
/// (its `events`) and the summaries (their `count`), in the order logged.
fn dead_lines(text: &str, account: &str, reason: &str) -> Vec<(bool, u64, serde_json::Value)> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["account"] == account && v["reason"] == reason)
        .filter_map(|v| {
            let message = v["message"].as_str()?;
            if message.starts_with("dead-lettered;") {
                Some((true, v["events"].as_u64()?, v))
            } else if message.contains("more event(s) dead-lettered in the last 10s") {
                Some((false, v["count"].as_u64()?, v))
            } else {
                None
            }
        })
        .collect()
}

#[tokio::test]
async fn many_dead_letterings_are_summarised_per_account_type_and_reason() {
    // docs/operations.md, "Logging": the first dead-lettering of an account, type and
    // reason is logged with its cause, the rest of each 10 s counted in one line.
    // acme rejects every event (one a request); globex fails whole batches until their
    // schedule is used up.
    let rejecting = Receiver::start().await;
    rejecting.set_status(400);
    let down = Receiver::start().await;
    down.set_status(500);
    let names = Names::new();
    let broker = Broker::connect(&names, &["100ms"]).await;
    let accounts = format!(
        "{}[[account]]\nid = \"globex\"\ncompanies_url = \"{}\"\nbatch_size = 10\nflush_interval = \"200ms\"\n",
        account(&rejecting.url("/hook"), 1),
        down.url("/down")
    );
    let (running, log) = json_logging_courier(&names, "info", accounts).await;
    let (rejected, exhausted) = (30, 20);
    let mut bodies: Vec<Vec<u8>> = (0..rejected)
        .map(|i| event(&format!("r{i}"), "acme", "company"))
        .collect();
    bodies.extend((0..exhausted).map(|i| event(&format!("x{i}"), "globex", "company")));
    broker.publish(&bodies).await;
    assert_eq!(
        broker
            .wait_for_depth(&names.dead(), 50, Duration::from_secs(30))
            .await,
        50
    );
    // While the worker runs, the summaries of each 10 s interval account for the rest.
    let logged = |account: &str, reason: &str| {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        dead_lines(&text, account, reason)
            .iter()
            .map(|(_, n, _)| n)
            .sum::<u64>()
    };
    assert!(
        eventually(Duration::from_secs(25), || {
            logged("acme", "rejected_400") == rejected
                && logged("globex", "retries_exhausted") == exhausted
        })
        .await,
        "the summaries never accounted for every dead letter:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let text = stop_for_log(running, &log).await;
    for (account, reason, total, prefix) in [
        ("acme", "rejected_400", rejected, "r"),
        ("globex", "retries_exhausted", exhausted, "x"),
    ] {
        let lines = dead_lines(&text, account, reason);
        let counted: u64 = lines.iter().map(|(_, n, _)| n).sum();
        assert_eq!(
            counted, total,
            "{account}: every dead letter counted once:\n{text}"
        );
        // Not a line per event: the first at once, then one summary per interval.
        assert!(
            lines.len() <= 3,
            "{account}: {} lines for {total} dead letters:\n{text}",
            lines.len()
        );
        let (first, summaries) = lines.split_first().unwrap();
        assert!(
            first.0,
            "{account}: the first line gives the cause: {}",
            first.2
        );
        assert_eq!(
            first.2["status"],
            if reason == "rejected_400" { 400 } else { 500 }
        );
        assert!(!summaries.is_empty(), "{account}: no summary:\n{text}");
        for (is_first, count, line) in summaries {
            assert!(
                !is_first,
                "{account}: a second first line in a busy interval: {line}"
            );
            assert_eq!(line["level"], "WARN");
            assert_eq!(line["type"], "company");
            let message = line["message"].as_str().unwrap();
            assert!(
                message.starts_with(&format!("{count} more event(s)")),
                "{line}"
            );
            let samples: Vec<&str> = line["samples"].as_str().unwrap().split(", ").collect();
            assert!(
                (1..=3).contains(&samples.len()) && samples.iter().all(|id| id.starts_with(prefix)),
                "{line}"
            );
        }
    }
}

/// A metric of the courier subprocess with admin port `admin`, for account acme.
async fn acme_metric(admin: u16, name: &str) -> f64 {
    metric_value(
        &http_get(admin, "/metrics").await.1,
        name,
        &[("account", "acme")],
    )
}

/// Writes `text` to the config file of `running` and reloads it; waits until the
/// worker counted the `ok` reload.
async fn reload(running: &Running, path: &std::path::Path, text: &str) {
    std::fs::write(path, text).unwrap();
    sighup(&running.proc.0);
    let admin = running.admin;
    assert!(
        eventually_async(Duration::from_secs(5), || async move {
            let metrics = http_get(admin, "/metrics").await.1;
            metric_value(
                &metrics,
                "courier_config_reloads_total",
                &[("result", "ok")],
            ) == 1.0
        })
        .await,
        "the reload was not applied"
    );
}

#[tokio::test]
async fn a_reload_that_fixes_a_destination_closes_its_circuit() {
    let receiver = Receiver::start().await;
    let names = Names::new();
    let broker = Broker::connect(&names, &["1s", "5m"]).await;
    // A wrong port first: nothing listens on the discard port.
    let spec = ConfigSpec {
        retry: "immediate_attempts = 1\nschedule = [\"1s\", \"5m\"]".into(),
        top: "[circuit]\nfailure_threshold = 2\ncooldown = \"60s\"\nmax_cooldown = \"60s\"".into(),
        accounts: account("http://127.0.0.1:9/hook", 1),
        ..Default::default()
    };
    let text = config_text(&names, &spec);
    let path = write_config(&text);
    let mut running = start_courier(&path, &path.with_file_name("courier.log")).await;
    let admin = running.admin;
    let broken: Vec<Vec<u8>> = (0..3)
        .map(|i| event(&format!("b{i}"), "acme", "company"))
        .collect();
    broker.publish(&broken).await;
    assert!(
        eventually_async(Duration::from_secs(10), || async {
            acme_metric(admin, "courier_circuit_open").await == 1.0
        })
        .await,
        "the circuit never opened"
    );
    // The operator corrects the URL and reloads: the circuit closes at once.
    let fixed = text.replace("http://127.0.0.1:9/hook", &receiver.url("/hook"));
    reload(&running, &path, &fixed).await;
    assert_eq!(acme_metric(admin, "courier_circuit_open").await, 0.0);
    let fresh: Vec<Vec<u8>> = (0..10)
        .map(|i| event(&format!("f{i}"), "acme", "company"))
        .collect();
    broker.publish(&fresh).await;
    // The new events go through at once; the parked ones come back from the 1s tier.
    assert_eq!(
        receiver
            .wait_for_distinct(13, Duration::from_secs(10))
            .await,
        13
    );
    assert_eq!(broker.depth(&format!("{}.retry.5m", names.prefix)).await, 0);
    sigterm(&running.proc.0);
    assert_eq!(
        wait_exit(&mut running.proc.0, Duration::from_secs(20)).await,
        Some(0)
    );
}

/// A dead-letter queue holding 2 `invalid_event`, 1 `unknown_account` and 2
/// `rejected_422` letters, made by a real worker; returns the config path.
async fn dead_letters_of_every_kind(names: &Names, broker: &Broker) -> std::path::PathBuf {
    let receiver = Receiver::start().await;
    receiver.reject_bodies_with("\"id\":\"rej-", 422);
    let spec = ConfigSpec {
        accounts: account(&receiver.url("/hook"), 1),
        ..Default::default()
    };
    let path = write_config(&config_text(names, &spec));
    let worker = TestWorker::spawn(settings(names, &spec)).await;
    broker
        .publish(&[
            b"not json".to_vec(),
            br#"{"id":"half","account":"acme","type":"company"}"#.to_vec(),
            event("who-1", "nobody", "company"),
            event("rej-1", "acme", "company"),
            event("rej-2", "acme", "company"),
        ])
        .await;
    assert_eq!(
        broker
            .wait_for_depth(&names.dead(), 5, Duration::from_secs(20))
            .await,
        5
    );
    // Labels take configured values only: acme for the event that names it.
    let invalid = |account| {
        worker.metric(
            "courier_events_dead_lettered_total",
            &[("reason", "invalid_event"), ("account", account)],
        )
    };
    assert_eq!((invalid("(unknown)"), invalid("acme")), (1.0, 1.0));
    worker.shutdown().await;
    path
}

#[tokio::test]
async fn dlq_show_discard_and_replay_filters() {
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let path = dead_letters_of_every_kind(&names, &broker).await;
    let config = path.to_str().unwrap();
    let dlq = |args: &[&str]| {
        let mut all = vec!["dlq"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--config", config]);
        output(&mut courier(&all))
    };
    let depth = || async {
        broker
            .wait_for_depth(&names.dead(), 5, Duration::from_secs(5))
            .await
    };

    // show: every x-courier-* header, the body; nothing removed.
    let (code, out, err) = dlq(&["show", "--reason", "rejected_422"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("--- id rej-1 (account acme, type company, reason rejected_422)"),
        "{out}"
    );
    assert!(out.contains("--- id rej-2"), "{out}");
    for line in [
        "x-courier-reason: rejected_422",
        "x-courier-last-status: 422",
        "x-courier-retries: 0",
        "x-courier-destination: http://127.0.0.1:",
        "x-courier-dead-at: ",
        "x-courier-first-seen: ",
        r#""record_id":"rec-rej-1""#,
    ] {
        assert!(out.contains(line), "no {line:?} in:\n{out}");
    }
    assert!(!out.contains("/hook"), "{out}");
    assert!(
        out.contains("2 of 2 matching dead letter(s) shown (5 examined"),
        "{out}"
    );
    let (code, out, _) = dlq(&["show", "--limit", "1"]);
    assert_eq!(code, 0);
    assert_eq!(out.matches("--- id ").count(), 1, "{out}");
    assert!(out.contains("1 of 5 matching"), "{out}");
    assert_eq!(depth().await, 5, "show removed nothing");

    // Filters are checked: an unknown reason or type is a usage error naming it.
    for (flag, value) in [("--reason", "unknown-account"), ("--type", "companies")] {
        for command in ["replay", "show", "discard"] {
            let (code, _, err) = dlq(&[command, flag, value]);
            assert_eq!(code, 2, "{command} {flag} {value}: {err}");
            assert!(err.contains(value), "{err}");
        }
    }

    // replay --dry-run moves nothing; without --reason the invalid events stay.
    let (code, out, err) = dlq(&["replay", "--dry-run"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("would replay 3 of 5"), "{out}");
    assert!(out.contains("left 2 invalid_event"), "{out}");
    assert_eq!(depth().await, 5);
    assert_eq!(broker.depth(&names.deliver()).await, 0);

    // discard without --yes (and no terminal to ask) only says what it would remove.
    let (code, out, err) = dlq(&["discard", "--reason", "invalid_event"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("2 dead letter(s) in"), "{out}");
    assert!(out.contains("invalid_event"), "{out}");
    assert!(out.contains("nothing removed: pass --yes"), "{out}");
    let (code, out, _) = dlq(&["discard", "--reason", "invalid_event", "--dry-run", "--yes"]);
    assert_eq!(code, 0);
    assert!(out.contains("dry run: nothing removed"), "{out}");
    assert_eq!(depth().await, 5);
    let (code, out, err) = dlq(&["discard", "--reason", "invalid_event", "--yes"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("removed 2 dead letter(s)"), "{out}");

    // A replay without --reason now has nothing invalid to leave.
    let (code, out, err) = dlq(&["replay", "--account", "nobody"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("replayed 1 of 3"), "{out}");
    let left = broker.drain(&names.dead()).await;
    let reasons: Vec<String> = left
        .iter()
        .map(|(_, h)| header_str(h, "x-courier-reason").unwrap_or_default())
        .collect();
    assert_eq!(reasons, ["rejected_422", "rejected_422"], "{reasons:?}");
    assert_eq!(broker.depth(&names.deliver()).await, 1);
}

#[tokio::test]
async fn dlq_discard_asks_at_a_terminal_and_removes_only_on_yes() {
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let path = dead_letters_of_every_kind(&names, &broker).await;
    let config = path.to_str().unwrap();
    let prompt = "remove them? [y/N] ";
    let discard = |answer| {
        answer_on_terminal(
            &[
                "dlq",
                "discard",
                "--reason",
                "invalid_event",
                "--config",
                config,
            ],
            prompt,
            answer,
        )
    };

    // "n": what matches is shown, the question asked, nothing removed.
    let (code, out, err) = discard("n");
    assert_eq!(code, 0, "{err}");
    let asked = out
        .find(prompt)
        .unwrap_or_else(|| panic!("no prompt in:\n{out}"));
    assert!(out[..asked].contains("2 dead letter(s) in"), "{out}");
    assert!(out[..asked].contains("invalid_event"), "{out}");
    assert!(out[asked..].contains("nothing removed\n"), "{out}");
    assert!(
        !out.contains("pass --yes"),
        "a terminal was there to ask: {out}"
    );
    assert_eq!(
        broker
            .wait_for_depth(&names.dead(), 5, Duration::from_secs(5))
            .await,
        5,
        "\"n\" removed letters"
    );

    // "y": the matching letters go, the others stay.
    let (code, out, err) = discard("y");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(prompt), "{out}");
    assert!(out.contains("removed 2 dead letter(s)"), "{out}");
    let mut reasons: Vec<String> = broker
        .drain_settled(&names.dead())
        .await
        .iter()
        .map(|(_, h)| header_str(h, "x-courier-reason").unwrap_or_default())
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        ["rejected_422", "rejected_422", "unknown_account"],
        "only the invalid events were removed"
    );
}

#[tokio::test]
async fn check_warns_about_a_loopback_url_with_the_guard_on_and_about_old_tiers() {
    let names = Names::new();
    let broker = Broker::connect(&names, &["1m", "5m"]).await;
    let accounts = "[[account]]\nid = \"acme\"\ncompanies_url = \"http://127.0.0.1:8080/secret-path\"\n\
                    contacts_url = \"http://localhost:8080/other\"\n\
                    [[account]]\nid = \"globex\"\ncompanies_url = \"https://hooks.globex.example/x\"\n";
    let old = ConfigSpec {
        retry: "schedule = [\"1m\", \"5m\"]".into(),
        accounts: accounts.into(),
        ..Default::default()
    };
    let path = write_config(&config_text(&names, &old));
    let config = path.to_str().unwrap();
    let (code, _, err) = output(&mut courier(&["setup", "--config", config]));
    assert_eq!(code, 0, "{err}");
    // The schedule loses its 1m tier, and the guard is on.
    let new = ConfigSpec {
        retry: "schedule = [\"5m\"]".into(),
        ..old
    };
    let text = config_text(&names, &new).replace(
        "allow_private_networks = true",
        "allow_private_networks = false",
    );
    std::fs::write(&path, text).unwrap();
    let (code, out, err) = output(&mut courier(&["check", "--config", config]));
    assert_eq!(code, 0, "warnings do not fail the check: {err}");
    assert!(out.contains("is valid"), "{out}");
    let warning = |needle: &str| {
        err.lines()
            .find(|l| l.starts_with("warning: ") && l.contains(needle))
            .unwrap_or_else(|| panic!("no warning with {needle:?} in:\n{err}"))
            .to_owned()
    };
    let companies = warning("account.companies_url");
    assert!(companies.contains("account \"acme\""), "{companies}");
    assert!(companies.contains("http://127.0.0.1:8080"), "{companies}");
    assert!(companies.contains("loopback"), "{companies}");
    assert!(warning("account.contacts_url").contains("localhost"));
    assert!(
        !err.contains("globex"),
        "a public name is no warning: {err}"
    );
    assert!(
        !err.contains("secret-path") && !err.contains("/other"),
        "{err}"
    );
    let stale = warning(&format!("{}.retry.1m", names.prefix));
    assert!(stale.contains("not in retry.schedule"), "{stale}");
    assert!(!err.contains(".retry.5m"), "{err}");

    // --offline leaves the broker alone; allowing private networks silences the guard.
    let (code, _, err) = output(&mut courier(&["check", "--offline", "--config", config]));
    assert_eq!(code, 0);
    assert!(
        !err.contains("retry.1m") && err.contains("loopback"),
        "{err}"
    );
    let allowed = config_text(&names, &new);
    std::fs::write(&path, allowed).unwrap();
    let (code, _, err) = output(&mut courier(&["check", "--offline", "--config", config]));
    assert_eq!(code, 0);
    assert!(!err.contains("warning"), "{err}");
    drop(broker);
}

/// Runs a command; its exit code and its stderr, which must be exactly one line.
fn one_line_error(args: &[&str], stdin: &[u8]) -> String {
    use std::io::Write;
    let mut child = courier(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: not one line:\n{err}");
    assert!(err.starts_with("courier: "), "{err}");
    assert!(!err.contains("ERROR") && !err.contains("WARN"), "{err}");
    err
}

#[tokio::test]
async fn broker_errors_of_commands_are_one_clear_line() {
    let names = Names::new();
    let broker = Broker::connect(&names, &["30s"]).await;
    let spec = ConfigSpec {
        accounts: account("http://127.0.0.1:9/", 1),
        ..Default::default()
    };
    let text = config_text(&names, &spec);
    let path = write_config(&text);
    let config = path.to_str().unwrap();
    let line = event("one", "acme", "company");

    // No exchange at all; then an exchange with no queue bound to it.
    let err = one_line_error(&["publish", "--config", config], &line);
    assert!(
        err.contains(&format!("no exchange '{}'", names.exchange)),
        "{err}"
    );
    let channel = broker.conn.create_channel().await.unwrap();
    channel
        .exchange_declare(
            names.exchange.as_str().into(),
            lapin::ExchangeKind::Topic,
            lapin::options::ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .unwrap();
    let err = one_line_error(&["publish", "--config", config], &line);
    assert!(err.contains("no queue is bound to exchange"), "{err}");
    assert!(err.contains("run `courier setup` once"), "{err}");
    assert!(
        !err.contains("record_id"),
        "the message is not dumped: {err}"
    );

    // A missing dead-letter queue.
    let err = one_line_error(&["dlq", "list", "--config", config], b"");
    assert!(
        err.contains(&format!("no queue '{}'", names.dead())),
        "{err}"
    );

    // A wrong password, and nothing listening.
    let wrong = write_config(&text.replace("guest:guest@", "guest:n0t-the-password@"));
    let err = one_line_error(&["dlq", "list", "--config", wrong.to_str().unwrap()], b"");
    assert!(err.contains("refused the login"), "{err}");
    assert!(!err.contains("n0t-the-password"), "{err}");
    let refused = write_config(&text.replace("127.0.0.1:5672", "127.0.0.1:9"));
    let err = one_line_error(&["setup", "--config", refused.to_str().unwrap()], b"");
    assert_eq!(
        err.matches("cannot connect to the broker").count(),
        1,
        "{err}"
    );
}

#[tokio::test]
async fn requests_to_the_old_url_after_a_reload_do_not_open_the_new_circuit() {
    // The old receiver answers 500, slowly: its answers come after the reload.
    let old = Receiver::start().await;
    old.set_status(500);
    old.set_delay(Duration::from_millis(1500));
    let new = Receiver::start().await;
    let names = Names::new();
    let broker = Broker::connect(&names, &["1s", "5m"]).await;
    let spec = ConfigSpec {
        retry: "immediate_attempts = 1\nschedule = [\"1s\", \"5m\"]".into(),
        top: "[circuit]\nfailure_threshold = 2\ncooldown = \"60s\"\nmax_cooldown = \"60s\"".into(),
        accounts: account(&old.url("/hook"), 1),
        ..Default::default()
    };
    let text = config_text(&names, &spec);
    let path = write_config(&text);
    let mut running = start_courier(&path, &path.with_file_name("courier.log")).await;
    broker
        .publish(&[
            event("s1", "acme", "company"),
            event("s2", "acme", "company"),
        ])
        .await;
    assert!(
        eventually(Duration::from_secs(5), || old.in_flight().len() == 2).await,
        "the two requests never reached the old receiver"
    );
    reload(
        &running,
        &path,
        &text.replace(&old.url("/hook"), &new.url("/hook")),
    )
    .await;
    // The two old requests fail now: two failures, the threshold, but not the new URL's.
    assert!(
        eventually(Duration::from_secs(5), || old
            .requests()
            .iter()
            .all(|r| r.answered))
        .await
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        acme_metric(running.admin, "courier_circuit_open").await,
        0.0
    );
    let fresh: Vec<Vec<u8>> = (0..5)
        .map(|i| event(&format!("t{i}"), "acme", "company"))
        .collect();
    broker.publish(&fresh).await;
    assert_eq!(
        new.wait_for_distinct(7, Duration::from_secs(10)).await,
        7,
        "the fresh events and the two from the 1s tier"
    );
    assert_eq!(broker.depth(&format!("{}.retry.5m", names.prefix)).await, 0);
    sigterm(&running.proc.0);
    assert_eq!(
        wait_exit(&mut running.proc.0, Duration::from_secs(20)).await,
        Some(0)
    );
}
