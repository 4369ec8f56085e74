//! The Grafana dashboard and the alert rules against a real Prometheus scraping a real
//! courier and the real broker's rabbitmq_prometheus plugin, under a small load
//! (docs/operations.md, "Dashboard and alerts"). `make test-prometheus` runs only this.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::helpers::*;

/// The broker's rabbitmq_prometheus plugin.
const RABBITMQ_METRICS: &str = "127.0.0.1:15692";

/// The load, named in the README with the picture it produced: every 100 ms, one
/// company and one contact event for acme (batch_size 10), for globex (batch 1, no
/// contacts_url: its contacts are skipped), one company event for strict (its receiver
/// answers 400: splits, then rejected_400 dead letters) and for flaky (503: retries,
/// then an open circuit): 60 events/s.
fn load_tick(tick: usize) -> Vec<Vec<u8>> {
    let mut bodies = Vec::new();
    for (account, kind) in [
        ("acme", "company"),
        ("acme", "contact"),
        ("globex", "company"),
        ("globex", "contact"),
        ("strict", "company"),
        ("flaky", "company"),
    ] {
        // occurred_at now, so the lag panels show courier's own lag.
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        bodies.push(
            format!(
                r#"{{"id":"{account}-{kind}-{tick}","account":"{account}","type":"{kind}","action":"updated","record_id":"r{tick}","occurred_at":"{now}","record":{{"n":{tick}}}}}"#
            )
            .into_bytes(),
        );
    }
    bodies
}

/// `prometheus`, or `None` after saying loudly why the test is skipped (it fails in CI,
/// where `make test` installs it).
fn prometheus_binary() -> Option<PathBuf> {
    let found = Command::new("sh")
        .args(["-c", "command -v prometheus"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "prometheus is not installed (make test installs it as root)"
        );
        eprintln!(
            "SKIPPED prometheus_proof: prometheus is not installed (as root: make test-prometheus installs it)"
        );
    }
    found
}

/// A Prometheus of the test's own: its own loopback port and data directory.
struct Prometheus {
    proc: Proc,
    port: u16,
    dir: PathBuf,
}

impl Prometheus {
    async fn start(binary: &Path, dir: &Path, config: &str) -> Self {
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let proc = Proc(
            Command::new(binary)
                .arg(format!(
                    "--config.file={}",
                    dir.join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
                .spawn()
                .expect("prometheus starts"),
        );
        let ready = eventually_async(Duration::from_secs(30), || async {
            http_get(port, "/-/ready").await.0 == 200
        })
        .await;
        assert!(
            ready,
            "prometheus not ready:\n{}",
            std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default()
        );
        Self {
            proc,
            port,
            dir: dir.to_owned(),
        }
    }

    /// Writes a new configuration file and has Prometheus read it (and the rule files)
    /// again; `targets_of` shows when it took effect.
    fn reload(&self, config: &str) {
        std::fs::write(self.dir.join("prometheus.yml"), config).unwrap();
        sighup(&self.proc.0);
    }

    /// The active scrape targets of `job`.
    async fn targets_of(&self, job: &str) -> usize {
        let data = self.api("targets", &[("state", "active")]).await.unwrap();
        data["activeTargets"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["labels"]["job"] == job)
            .count()
    }

    /// The alerts firing now, as (alert name, `instance` label or "").
    async fn firing(&self) -> HashSet<(String, String)> {
        let alerts = self.api("alerts", &[]).await.unwrap();
        alerts["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["state"] == "firing")
            .map(|a| {
                let label = |name: &str| a["labels"][name].as_str().unwrap_or("").to_owned();
                (label("alertname"), label("instance"))
            })
            .collect()
    }

    /// Polls the alerts until each of `wanted` (alert name, and `instance` where given:
    /// "" for an alert without one) has been seen firing, or `timeout` passes. Returns
    /// whether all were seen, and everything seen firing.
    async fn await_firing(
        &self,
        wanted: &[(&str, Option<&str>)],
        timeout: Duration,
    ) -> (bool, HashSet<(String, String)>) {
        let mut seen = HashSet::new();
        let deadline = std::time::Instant::now() + timeout;
        loop {
            seen.extend(self.firing().await);
            let all = wanted.iter().all(|(name, instance)| {
                seen.iter()
                    .any(|(n, i)| n == name && instance.is_none_or(|want| want == i))
            });
            if all || std::time::Instant::now() > deadline {
                return (all, seen);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// GET `/api/v1/<path>` with `params`; the `data` of a successful answer.
    async fn api(&self, path: &str, params: &[(&str, &str)]) -> Result<Value, String> {
        let query: String = url::form_urlencoded::Serializer::new(String::new())
            .extend_pairs(params)
            .finish();
        let (status, body) = http_get(self.port, &format!("/api/v1/{path}?{query}")).await;
        let v: Value = serde_json::from_str(&body).map_err(|_| format!("HTTP {status}: {body}"))?;
        if v["status"] != "success" {
            return Err(format!("HTTP {status}: {}", v["error"]));
        }
        Ok(v["data"].clone())
    }

    /// The series an instant query returns now.
    async fn series(&self, expr: &str) -> Result<Vec<Value>, String> {
        let data = self.api("query", &[("query", expr)]).await?;
        Ok(data["result"].as_array().cloned().unwrap_or_default())
    }
}

/// Every PromQL expression of the dashboard, its template variables replaced by values
/// of this run.
fn dashboard_exprs(dashboard: &Value, prefix: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            out.push((
                format!("{} / {}", panel["title"], target["legendFormat"]),
                substitute(expr, prefix),
            ));
        }
    }
    out
}

fn substitute(expr: &str, prefix: &str) -> String {
    expr.replace("$__rate_interval", "15s")
        .replace("$instance", ".*")
        .replace("$account", ".*")
        .replace("$prefix", prefix)
}

/// An alert's expression without its threshold: each operand of a top-level `and on()`,
/// `unless on()` or `or`, its trailing comparison with a number removed, and the selector
/// inside an `absent(...)` (which returns nothing while that selector finds series).
fn without_threshold(expr: &str) -> Vec<String> {
    // Prometheus's rules API prints `on ()`, the file says `on()`.
    let expr = expr.replace("on ()", "on()");
    expr.split("and on()")
        .flat_map(|part| part.split("unless on()"))
        .flat_map(|part| part.split(" or "))
        .map(|part| {
            let part = part.trim();
            let part = part
                .strip_prefix('(')
                .and_then(|p| p.strip_suffix(')'))
                .or_else(|| {
                    part.strip_prefix("absent(")
                        .and_then(|p| p.strip_suffix(')'))
                })
                .unwrap_or(part);
            let cut = part
                .rfind(['>', '<', '='])
                .filter(|i| part[i + 1..].trim().parse::<f64>().is_ok())
                .map(|i| part[..i].trim_end_matches(['>', '<', '=', '!']).trim())
                .unwrap_or(part);
            cut.to_owned()
        })
        .collect()
}

/// The rule file with every `for:` cut to 1 s and every range (`[10m]`) to 10 s, so a
/// test run can see alerts fire, and see "nothing delivered lately" a few seconds after
/// the last delivery.
fn test_rules(rules: &str) -> String {
    rules
        .lines()
        .map(|line| match line.trim_start().strip_prefix("for:") {
            Some(_) => format!("{}for: 1s", &line[..line.len() - line.trim_start().len()]),
            None => short_ranges(line),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `line` with every range such as `[10m]` or `[1h]` made `[10s]`; other brackets (a
/// regex's `[0-9]`) stay.
fn short_ranges(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        rest = &rest[open..];
        let Some(close) = rest.find(']') else {
            break;
        };
        let inner = &rest[1..close];
        let is_range = inner.len() > 1
            && inner.ends_with(['s', 'm', 'h', 'd'])
            && inner[..inner.len() - 1].bytes().all(|b| b.is_ascii_digit());
        if is_range {
            out.push_str("[10s]");
        } else {
            out.push_str(&rest[..=close]);
        }
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out
}

fn promtool_check(rules: &Path) {
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(rules)
        .output()
        .expect("promtool runs");
    assert!(
        out.status.success(),
        "promtool check rules {}:\n{}{}",
        rules.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn prometheus_proof() {
    let Some(binary) = prometheus_binary() else {
        return;
    };
    let root = repo_root();
    let dashboard: Value =
        serde_json::from_slice(&std::fs::read(root.join("deploy/grafana/courier.json")).unwrap())
            .expect("the dashboard is JSON");
    let rules_path = root.join("deploy/prometheus/alerts.yml");
    promtool_check(&rules_path);
    assert_eq!(
        http_get(15692, "/metrics/per-object").await.0,
        200,
        "the broker's rabbitmq_prometheus plugin does not answer on {RABBITMQ_METRICS} \
         (as root: rabbitmq-plugins enable rabbitmq_prometheus; scripts/ensure-prometheus.sh does it)"
    );
    let seconds: u64 = std::env::var("PROOF_LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(25);

    // Receivers: one that accepts, one that rejects the content, one that is down.
    let ok = Receiver::start().await;
    let strict = Receiver::start().await;
    strict.set_status(400);
    let down = Receiver::start().await;
    down.set_status(503);

    // Courier A on the shared broker, under load.
    let names = Names::new();
    let broker = Arc::new(Broker::connect(&names, &["30s"]).await);
    let spec = ConfigSpec {
        top: "shutdown_timeout = \"2s\"\n[circuit]\nfailure_threshold = 2\ncooldown = \"5s\"\n"
            .into(),
        accounts: format!(
            r#"
[[account]]
id = "acme"
companies_url = "{}"
contacts_url = "{}"
batch_size = 10
flush_interval = "200ms"

[[account]]
id = "globex"
companies_url = "{}"

[[account]]
id = "strict"
companies_url = "{}"
batch_size = 4
flush_interval = "200ms"

[[account]]
id = "flaky"
companies_url = "{}"
"#,
            ok.url("/acme/companies"),
            ok.url("/acme/contacts"),
            ok.url("/globex/companies"),
            strict.url("/strict"),
            down.url("/flaky"),
        ),
        ..Default::default()
    };
    let dir = temp_dir();
    let config = dir.join("courier.toml");
    std::fs::write(&config, config_text(&names, &spec)).unwrap();
    let a = start_courier(&config, &dir.join("courier-a.log")).await;

    // Courier B on a private node that the test stops: "broker disconnected".
    let node = PrivateNode::start().await;
    let names_b = Names::new();
    let config_b = dir.join("courier-b.toml");
    std::fs::write(
        &config_b,
        config_text(
            &names_b,
            &ConfigSpec {
                accounts: format!(
                    "[[account]]\nid = \"acme\"\ncompanies_url = \"{}\"\n",
                    ok.url("/b")
                ),
                ..Default::default()
            },
        )
        .replace(&amqp_url(), &node.url()),
    )
    .unwrap();
    let b = start_courier(&config_b, &dir.join("courier-b.log")).await;

    // Prometheus: both couriers, and the broker's per-object metrics of this test's
    // queues only (the shared broker holds other tests' queues too).
    std::fs::write(
        dir.join("rules.yml"),
        test_rules(&std::fs::read_to_string(&rules_path).unwrap()),
    )
    .unwrap();
    promtool_check(&dir.join("rules.yml"));
    // The courier job is named as in deploy/ (the alerts select job="courier").
    let prom_config = |couriers: &[u16]| {
        let targets: Vec<String> = couriers
            .iter()
            .map(|port| format!("\"127.0.0.1:{port}\""))
            .collect();
        format!(
            r#"
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["{rules}"]
scrape_configs:
  - job_name: courier
    static_configs:
      - targets: [{targets}]
  - job_name: rabbitmq
    scrape_interval: 2s
    metrics_path: /metrics/per-object
    static_configs:
      - targets: ["{RABBITMQ_METRICS}"]
    metric_relabel_configs:
      - source_labels: [queue]
        regex: "({prefix}\\..*)?"
        action: keep
"#,
            rules = dir.join("rules.yml").display(),
            targets = targets.join(", "),
            prefix = names.prefix,
        )
    };
    let prom = Prometheus::start(&binary, &dir, &prom_config(&[a.admin, b.admin])).await;

    // The load runs until the end of the test.
    let loading = Arc::new(AtomicBool::new(true));
    let sent = Arc::new(AtomicUsize::new(0));
    let load = tokio::spawn({
        let (broker, loading, sent) = (broker.clone(), loading.clone(), sent.clone());
        async move {
            let mut tick = 0;
            while loading.load(Ordering::SeqCst) {
                broker.publish(&load_tick(tick)).await;
                tick += 1;
                sent.store(tick, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let started = std::time::SystemTime::now();
    tokio::time::sleep(Duration::from_secs(seconds / 3)).await;
    sighup(&a.proc.0);
    node.stop().await;
    tokio::time::sleep(Duration::from_secs(seconds - seconds / 3)).await;

    // The two induced alerts fire.
    let wanted = [
        ("CourierBrokerDisconnected", None),
        ("CourierDeadLettersGrowing", None),
    ];
    let (fired, firing) = prom.await_firing(&wanted, Duration::from_secs(40)).await;
    assert!(fired, "firing: {firing:?}; wanted {wanted:?}");

    // Every dashboard expression parses and returns series.
    let mut failures = Vec::new();
    let exprs = dashboard_exprs(&dashboard, &names.prefix);
    assert!(exprs.len() >= 25, "{} expressions", exprs.len());
    for (panel, expr) in &exprs {
        match prom.series(expr).await {
            Ok(series) if series.is_empty() => failures.push(format!("{panel}: no series: {expr}")),
            Ok(_) => {}
            Err(e) => failures.push(format!("{panel}: {e}: {expr}")),
        }
    }
    // The template variables' label_values(metric, label) find values.
    for var in dashboard["templating"]["list"].as_array().unwrap() {
        let Some(def) = var["definition"].as_str() else {
            continue;
        };
        let inner = def
            .strip_prefix("label_values(")
            .unwrap()
            .strip_suffix(')')
            .unwrap();
        let (metric, label) = inner.rsplit_once(',').unwrap();
        let series = prom
            .series(&substitute(metric, &names.prefix))
            .await
            .unwrap_or_default();
        if !series.iter().any(|s| s["metric"][label.trim()].is_string()) {
            failures.push(format!("variable {}: no {label} values", var["name"]));
        }
    }
    // Every alert's expression, without its threshold, returns series.
    let groups = prom.api("rules", &[]).await.unwrap();
    let mut alerts = 0;
    for group in groups["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            alerts += 1;
            for part in without_threshold(rule["query"].as_str().unwrap()) {
                match prom.series(&part).await {
                    Ok(series) if series.is_empty() => {
                        failures.push(format!("alert {}: no series: {part}", rule["name"]))
                    }
                    Ok(_) => {}
                    Err(e) => failures.push(format!("alert {}: {e}: {part}", rule["name"])),
                }
            }
        }
    }
    assert_eq!(alerts, 7, "every alert of alerts.yml is loaded");
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The main panels over the run, for the README picture (tools/plot-dashboard.py).
    let end = std::time::SystemTime::now();
    let secs = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            .to_string()
    };
    let mut ranges = Vec::new();
    for (panel, expr) in &exprs {
        let data = prom
            .api(
                "query_range",
                &[
                    ("query", expr),
                    ("start", &secs(started)),
                    ("end", &secs(end)),
                    ("step", "1"),
                ],
            )
            .await
            .unwrap();
        ranges.push(serde_json::json!({"panel": panel, "expr": expr, "result": data["result"]}));
    }
    let ticks = sent.load(Ordering::SeqCst);
    let out = root.join("target/prometheus-proof");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(
        out.join("ranges.json"),
        serde_json::json!({
            "load": format!("60 events/s for {}s ({} events): acme batch 10 (200), globex batch 1 with contacts skipped, strict (400: rejected), flaky (503: retries, circuit)", secs(end).parse::<u64>().unwrap() - secs(started).parse::<u64>().unwrap(), ticks * 6),
            "panels": ranges,
        })
        .to_string(),
    )
    .unwrap();

    // Courier gone. First, while both couriers answer their scrapes and A delivers,
    // neither CourierDown nor CourierDeliveryStalled fires.
    let now = prom.firing().await;
    assert!(
        !now.iter()
            .any(|(name, _)| name == "CourierDown" || name == "CourierDeliveryStalled"),
        "firing while every courier is up and delivering: {now:?}"
    );
    // Courier B stops: its target fails its scrapes (up == 0).
    let b_target = format!("127.0.0.1:{}", b.admin);
    drop(b);
    let wanted = [("CourierDown", Some(b_target.as_str()))];
    let (fired, firing) = prom.await_firing(&wanted, Duration::from_secs(30)).await;
    assert!(fired, "firing: {firing:?}; wanted {wanted:?}");
    // Courier A stops too while events keep coming, and Prometheus loses every courier
    // target (as when service discovery finds none): no courier series at all. The
    // delivery queue fills; both alerts must fire without courier's series.
    drop(a);
    prom.reload(&prom_config(&[]));
    let reloaded = eventually_async(Duration::from_secs(20), || async {
        prom.targets_of("courier").await == 0
    })
    .await;
    assert!(
        reloaded,
        "prometheus still scrapes courier after the reload"
    );
    let wanted = [("CourierDown", Some("")), ("CourierDeliveryStalled", None)];
    let (fired, firing) = prom.await_firing(&wanted, Duration::from_secs(40)).await;
    assert!(fired, "firing: {firing:?}; wanted {wanted:?}");
    loading.store(false, Ordering::SeqCst);
    load.await.unwrap();
}

#[test]
fn thresholds_are_cut_from_alert_expressions() {
    assert_eq!(
        without_threshold("courier_broker_connected == 0"),
        ["courier_broker_connected"]
    );
    assert_eq!(
        without_threshold("(sum(a{q=~\"x\"}) > 0) and on () (sum(rate(b[5m])) == 0)"),
        ["sum(a{q=~\"x\"})", "sum(rate(b[5m]))"]
    );
    assert_eq!(without_threshold("x / y\n  > 0.5"), ["x / y"]);
    assert_eq!(
        without_threshold("(sum(a{q=~\"x\"}) > 0) unless on () (sum(rate(b[5m])) > 0)"),
        ["sum(a{q=~\"x\"})", "sum(rate(b[5m]))"]
    );
    assert_eq!(
        without_threshold("up{job=\"courier\"} == 0 or absent(up{job=\"courier\"})"),
        ["up{job=\"courier\"}", "up{job=\"courier\"}"]
    );
    assert_eq!(
        test_rules(
            "  - alert: A\n    for: 10m\n    expr: rate(a{q=~\"x(\\\\.[0-9]+)?\"}[10m]) + b[1h]"
        ),
        "  - alert: A\n    for: 1s\n    expr: rate(a{q=~\"x(\\\\.[0-9]+)?\"}[10s]) + b[10s]"
    );
}
