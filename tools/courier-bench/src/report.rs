//! `report`: the runs collected by scripts/bench.sh (one JSON line each) turned into the
//! results table: median, min–max and spread of every figure, ratios taken run by run, the
//! targets of docs/performance.md, and where the CPU went.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Value, json};

use crate::Result;
use crate::cli::ReportArgs;

/// The scenarios of the CPU table, in the order of the benchmark.
const SCENARIOS: [&str; 10] = [
    "drain",
    "drain_multi",
    "batch200",
    "batch1",
    "flood",
    "many",
    "latency",
    "small",
    "slow",
    "slowsmall",
];

/// The scaling scenarios (docs/scaling.md), after those of [`SCENARIOS`] in the CPU table.
const SCALING_SCENARIOS: [&str; 3] = ["replicas2", "cluster", "cluster2"];

/// `report`: writes the JSON and Markdown results and prints the table.
pub fn report(args: ReportArgs) -> Result<()> {
    let runs = Runs::load(&args.input)?;
    let rows = rows(&runs);
    let meta: BTreeMap<String, String> = args
        .meta
        .iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect();
    // Problems a reader must see next to the numbers.
    let warnings = runs.warnings();
    let (mut md, rows_json) = figures_table(&rows);
    let (cores_md, cores_json) = cores_table(&runs);
    md.push_str(&cores_md);
    if !warnings.is_empty() {
        md.push_str("\nWarnings:\n");
        for w in &warnings {
            md.push_str(&format!("- {w}\n"));
        }
    }
    let raw: BTreeMap<&String, Vec<&Value>> = runs
        .0
        .iter()
        .map(|(k, runs)| (k, runs.values().collect()))
        .collect();
    let out = json!({
        "meta": meta,
        "figures": rows_json,
        "cores": cores_json,
        "warnings": warnings,
        "runs": raw,
    });
    write_file(&args.json, &serde_json::to_string_pretty(&out)?)?;
    let mut header = String::new();
    for (k, v) in &meta {
        header.push_str(&format!("- {k}: {v}\n"));
    }
    write_file(&args.md, &format!("{header}\n{md}"))?;
    print!("{header}\n{md}");
    Ok(())
}

/// The collected lines: scenario → run → record.
struct Runs(BTreeMap<String, BTreeMap<u64, Value>>);

impl Runs {
    fn load(input: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(input)?;
        let mut by: BTreeMap<String, BTreeMap<u64, Value>> = BTreeMap::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line)
                .map_err(|e| format!("{}: bad line {line:?}: {e}", input.display()))?;
            let scenario = v["scenario"].as_str().unwrap_or("?").to_owned();
            let run = v["run"].as_u64().unwrap_or(0);
            by.entry(scenario).or_default().insert(run, v);
        }
        Ok(Self(by))
    }

    /// The number at `path` in each run of `scenario`, by run.
    fn get(&self, scenario: &str, path: &[&str]) -> BTreeMap<u64, f64> {
        self.0
            .get(scenario)
            .map(|runs| {
                runs.iter()
                    .filter_map(|(r, v)| {
                        let mut x = v;
                        for p in path {
                            x = &x[*p];
                        }
                        x.as_f64().map(|f| (*r, f))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// courier's CPU seconds per 100k events received, by run.
    fn per_100k(&self, scenario: &str) -> BTreeMap<u64, f64> {
        let cpu = self.get(scenario, &["proc", "cpu_s"]);
        let events = self.get(scenario, &["data", "distinct"]);
        cpu.iter()
            .filter_map(|(r, c)| {
                events
                    .get(r)
                    .filter(|e| **e > 0.0)
                    .map(|e| (*r, c / e * 1e5))
            })
            .collect()
    }

    /// The drain's own CPU per 100k events: what the broker client costs with nothing
    /// else to do.
    fn drain_cpu(&self, scenario: &str) -> BTreeMap<u64, f64> {
        let events = self.get(scenario, &["data", "events"]);
        self.get(scenario, &["data", "cpu_s"])
            .into_iter()
            .filter_map(|(r, c)| events.get(&r).map(|e| (r, c / e * 1e5)))
            .collect()
    }

    /// The broker's CPU seconds per 100k events of a scenario, by run: a faster courier
    /// that makes the broker work harder is not faster for the user.
    fn broker_per_100k(&self, scenario: &str) -> BTreeMap<u64, f64> {
        let mut events = self.get(scenario, &["data", "distinct"]);
        if events.is_empty() {
            events = self.get(scenario, &["data", "events"]);
        }
        self.get(scenario, &["proc", "broker_cpu_s"])
            .into_iter()
            .filter_map(|(r, c)| {
                events
                    .get(&r)
                    .filter(|e| **e > 0.0)
                    .map(|e| (r, c / e * 1e5))
            })
            .collect()
    }

    /// CPU seconds at `cpu` over the measured phase's wall time: cores, by run.
    fn cores(&self, scenario: &str, cpu: &[&str]) -> BTreeMap<u64, f64> {
        let wall = self.get(scenario, &["proc", "wall_s"]);
        self.get(scenario, cpu)
            .into_iter()
            .filter_map(|(r, c)| wall.get(&r).filter(|w| **w > 0.0).map(|w| (r, c / w)))
            .collect()
    }

    /// Incomplete runs, signature failures, duplicates, retries and failed requests.
    fn warnings(&self) -> Vec<String> {
        let mut warnings = Vec::new();
        for (scenario, runs) in &self.0 {
            for (run, v) in runs {
                let d = &v["data"];
                if d["complete"] == Value::Bool(false) {
                    warnings.push(format!(
                        "{scenario} run {run}: incomplete ({} of {} events)",
                        d["distinct"], d["expect"]
                    ));
                }
                for k in ["sig_failures", "duplicates", "retried_requests"] {
                    if d[k].as_u64().unwrap_or(0) > 0 {
                        warnings.push(format!("{scenario} run {run}: {k} = {}", d[k]));
                    }
                }
                if v["extra"]["failures"].as_u64().unwrap_or(0) > 0 {
                    let n = &v["extra"]["failures"];
                    warnings.push(format!("{scenario} run {run}: {n} failed requests"));
                }
            }
        }
        warnings
    }
}

/// One figure's runs.
struct Figure {
    values: Vec<f64>,
}

impl Figure {
    fn median(&self) -> f64 {
        median(&self.values)
    }
    fn min(&self) -> f64 {
        self.values.iter().copied().fold(f64::INFINITY, f64::min)
    }
    fn max(&self) -> f64 {
        self.values
            .iter()
            .copied()
            .fold(f64::NEG_INFINITY, f64::max)
    }
    /// (max − min) / median, in percent.
    fn spread_pct(&self) -> f64 {
        let m = self.median();
        if self.values.len() < 2 || m == 0.0 {
            0.0
        } else {
            (self.max() - self.min()) / m.abs() * 100.0
        }
    }
}

fn median(values: &[f64]) -> f64 {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// A row of the table: a figure, and how it compares with its target.
struct Row {
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    figure: Figure,
    target: Goal,
}

/// A target's text and its test of the median.
type Goal = Option<(&'static str, fn(f64) -> bool)>;

fn row(
    key: &'static str,
    label: &'static str,
    unit: &'static str,
    figure: Figure,
    target: Goal,
) -> Row {
    Row {
        key,
        label,
        unit,
        figure,
        target,
    }
}

fn fig(m: BTreeMap<u64, f64>) -> Figure {
    Figure {
        values: m.into_values().collect(),
    }
}

/// Ratios are taken run by run (the same run, the same machine state), then summarised.
fn ratio(a: &BTreeMap<u64, f64>, b: &BTreeMap<u64, f64>) -> Figure {
    Figure {
        values: a
            .iter()
            .filter_map(|(r, x)| b.get(r).filter(|y| **y > 0.0).map(|y| x / y))
            .collect(),
    }
}

fn mib(m: BTreeMap<u64, f64>) -> BTreeMap<u64, f64> {
    m.into_iter().map(|(r, k)| (r, k / 1024.0)).collect()
}

/// The figures of the table, with the targets of docs/performance.md.
fn rows(runs: &Runs) -> Vec<Row> {
    let get = |scenario: &str, path: &[&str]| runs.get(scenario, path);
    let per_100k = |scenario: &str| runs.per_100k(scenario);
    let drain_cpu = |scenario: &str| runs.drain_cpu(scenario);
    let broker = |scenario: &str| fig(runs.broker_per_100k(scenario));
    let rss = |scenario: &str| fig(mib(get(scenario, &["proc", "hwm_kib"])));
    let drain = get("drain", &["data", "events_per_s"]);
    let drain_multi = get("drain_multi", &["data", "events_per_s"]);
    let b200 = get("batch200", &["data", "events_per_s"]);
    let b1 = get("batch1", &["data", "requests_per_s"]);
    let flood = get("flood", &["data", "requests_per_s"]);
    let many = get("many", &["data", "events_per_s"]);
    let b200_steady = get("batch200", &["data", "steady_events_per_s"]);
    let many_steady = get("many", &["data", "steady_events_per_s"]);
    #[rustfmt::skip]
    let rows = vec![
        row("drain_events_per_s", "1. broker limit: bare drain, one ack per message, in order (same prefetch)", "events/s", fig(drain.clone()), None),
        row("drain_cpu_s_per_100k", "   bare drain: the consumer's CPU per 100k events", "CPU s", fig(drain_cpu("drain")), None),
        row("drain_multi_events_per_s", "1b. bare drain, one `multiple` ack every 100", "events/s", fig(drain_multi.clone()), None),
        row("drain_multi_cpu_s_per_100k", "   bare drain (1b): the consumer's CPU per 100k events", "CPU s", fig(drain_cpu("drain_multi")), None),
        row("batch200_events_per_s", "2. courier batch 200, 20 accounts", "events/s", fig(b200.clone()), None),
        row("batch200_ratio", "   ratio to (1), per run", "×", ratio(&b200, &drain), Some(("≥ 0.9", |x| x >= 0.9))),
        row("batch200_ratio_multi", "   ratio to (1b), per run", "×", ratio(&b200, &drain_multi), Some(("≥ 0.75", |x| x >= 0.75))),
        row("batch200_steady_events_per_s", "   sustained: events before the backlog's last partial batches wait for flush_interval", "events/s", fig(b200_steady.clone()), None),
        row("batch200_steady_ratio", "   sustained, ratio to (1), per run", "×", ratio(&b200_steady, &drain), None),
        row("batch200_steady_ratio_multi", "   sustained, ratio to (1b), per run", "×", ratio(&b200_steady, &drain_multi), None),
        row("batch200_after_quiet", "   events in those last batches", "events", fig(get("batch200", &["data", "events_after_quiet"])), None),
        row("batch200_mean_batch", "   mean batch size", "events", fig(get("batch200", &["data", "mean_batch"])), Some(("≥ 150", |x| x >= 150.0))),
        row("batch1_requests_per_s", "3. courier batch 1", "requests/s", fig(b1.clone()), None),
        row("flood_requests_per_s", "   bare reqwest loop, same receiver and concurrency", "requests/s", fig(flood.clone()), None),
        row("batch1_ratio", "   ratio courier / bare HTTP, per run", "×", ratio(&b1, &flood), Some(("≥ 0.85", |x| x >= 0.85))),
        row("batch1_connections", "   TCP connections the receiver accepted: courier batch 1", "connections", fig(get("batch1", &["data", "connections"])), None),
        row("flood_connections", "   TCP connections the receiver accepted: bare loop", "connections", fig(get("flood", &["data", "connections"])), None),
        row("many_events_per_s", "4. courier batch 200, 2,000 accounts", "events/s", fig(many.clone()), None),
        row("many_ratio", "   ratio to (1), per run", "×", ratio(&many, &drain), Some(("≥ 0.5", |x| x >= 0.5))),
        row("many_steady_events_per_s", "   sustained, as in (2)", "events/s", fig(many_steady.clone()), None),
        row("many_steady_ratio", "   sustained, ratio to (1), per run", "×", ratio(&many_steady, &drain), None),
        row("many_mean_batch", "   mean batch size", "events", fig(get("many", &["data", "mean_batch"])), None),
        row("many_connections", "   TCP connections the receiver accepted", "connections", fig(get("many", &["data", "connections"])), None),
        row("latency_p50_ms", "5. latency publish→receipt, p50", "ms", fig(get("latency", &["data", "latency", "p50_ms"])), None),
        row("latency_p99_ms", "   p99", "ms", fig(get("latency", &["data", "latency", "p99_ms"])), Some(("≤ 120 (flush_interval + 20)", |x| x <= 120.0))),
        row("latency_max_ms", "   max", "ms", fig(get("latency", &["data", "latency", "max_ms"])), None),
        row("cpu_per_100k_large", "6. courier CPU per 100k events, large backlog (2)", "CPU s", fig(per_100k("batch200")), None),
        row("cpu_ratio_multi", "   ratio to the bare drain's (1b), per run", "×", ratio(&per_100k("batch200"), &drain_cpu("drain_multi")), Some(("≤ 1.1", |x| x <= 1.1))),
        row("cpu_per_100k_small", "   courier CPU per 100k events, 10k backlog", "CPU s", fig(per_100k("small")), None),
        row("cpu_per_100k_many", "   courier CPU per 100k events, 2,000 accounts (4)", "CPU s", fig(per_100k("many")), None),
        row("cpu_per_100k_batch1", "   courier CPU per 100k events, batch 1 (3)", "CPU s", fig(per_100k("batch1")), None),
        row("cpu_per_100k_latency", "   courier CPU per 100k events, 2,000/s (5)", "CPU s", fig(per_100k("latency")), None),
        row("rss_large_mib", "   courier peak RSS, large backlog (2)", "MiB", rss("batch200"), Some(("≤ 64", |x| x <= 64.0))),
        row("rss_small_mib", "   courier peak RSS, 10k backlog", "MiB", rss("small"), Some(("≤ 64", |x| x <= 64.0))),
        row("rss_many_mib", "   courier peak RSS, 2,000 accounts (4)", "MiB", rss("many"), Some(("≤ 64", |x| x <= 64.0))),
        row("rss_batch1_mib", "   courier peak RSS, batch 1 (3)", "MiB", rss("batch1"), Some(("≤ 64", |x| x <= 64.0))),
        row("rss_slow_mib", "8. a slow receiver: courier peak RSS, large backlog", "MiB", rss("slow"), None),
        row("rss_slowsmall_mib", "   the same, 10k backlog", "MiB", rss("slowsmall"), None),
        row("rss_slow_bound", "   large ÷ (1.2 × small + 8 MiB), per run", "×", ratio(&mib(get("slow", &["proc", "hwm_kib"])), &mib(get("slowsmall", &["proc", "hwm_kib"])).into_iter().map(|(r, m)| (r, 1.2 * m + 8.0)).collect()), Some(("≤ 1", |x| x <= 1.0))),
        row("broker_cpu_per_100k_drain", "7. the broker's CPU per 100k events: bare drain (1)", "CPU s", broker("drain"), None),
        row("broker_cpu_per_100k_drain_multi", "   bare drain, `multiple` acks (1b)", "CPU s", broker("drain_multi"), None),
        row("broker_cpu_per_100k_large", "   courier batch 200 (2)", "CPU s", broker("batch200"), None),
        row("broker_cpu_per_100k_batch1", "   courier batch 1 (3)", "CPU s", broker("batch1"), None),
        row("broker_cpu_per_100k_many", "   courier, 2,000 accounts (4)", "CPU s", broker("many"), None),
        row("ordered_off_events_per_s", "9. courier batch 200, ordering off (ordered_off)", "events/s", fig(get("ordered_off", &["data", "events_per_s"])), None),
        row("ordered_on_events_per_s", "   the same, ordering = \"per_record\" (ordered_on)", "events/s", fig(get("ordered_on", &["data", "events_per_s"])), None),
        row("ordered_ratio", "   ratio on ÷ off, per run", "×", ratio(&get("ordered_on", &["data", "events_per_s"]), &get("ordered_off", &["data", "events_per_s"])), None),
    ];
    rows.into_iter().chain(scaling_rows(runs)).collect()
}

/// Replicas and the cluster against one replica on one node (docs/scaling.md).
fn scaling_rows(runs: &Runs) -> Vec<Row> {
    let get = |scenario: &str| runs.get(scenario, &["data", "events_per_s"]);
    let cpu = |scenario: &str| fig(runs.per_100k(scenario));
    let broker = |scenario: &str| fig(runs.broker_per_100k(scenario));
    let (one, two) = (get("batch200"), get("replicas2"));
    let (cluster, cluster2) = (get("cluster"), get("cluster2"));
    #[rustfmt::skip]
    let rows = vec![
        row("replicas2_events_per_s", "10. two courier replicas, one broker node (batch 200, 20 accounts)", "events/s", fig(two.clone()), None),
        row("replicas2_ratio", "   ratio to one replica (2), per run", "×", ratio(&two, &one), None),
        row("cluster_events_per_s", "   one replica on a three-node cluster", "events/s", fig(cluster.clone()), None),
        row("cluster_ratio", "   ratio to one replica on one node (2), per run", "×", ratio(&cluster, &one), None),
        row("cluster2_events_per_s", "   two replicas on the cluster (on nodes 1 and 2)", "events/s", fig(cluster2.clone()), None),
        row("cluster2_ratio", "   ratio to one replica on the cluster, per run", "×", ratio(&cluster2, &cluster), None),
        row("cpu_per_100k_replicas2", "   courier CPU per 100k events: two replicas, one node", "CPU s", cpu("replicas2"), None),
        row("cpu_per_100k_cluster", "   courier CPU per 100k events: one replica, cluster", "CPU s", cpu("cluster"), None),
        row("cpu_per_100k_cluster2", "   courier CPU per 100k events: two replicas, cluster", "CPU s", cpu("cluster2"), None),
        row("broker_cpu_per_100k_replicas2", "   broker CPU per 100k events: two replicas, one node", "CPU s", broker("replicas2"), None),
        row("broker_cpu_per_100k_cluster", "   broker CPU per 100k events (three nodes together): one replica, cluster", "CPU s", broker("cluster"), None),
        row("broker_cpu_per_100k_cluster2", "   broker CPU per 100k events (three nodes together): two replicas, cluster", "CPU s", broker("cluster2"), None),
    ];
    rows
}

/// A figure as the table shows it: three significant digits or so.
fn fmt(x: f64) -> String {
    if !x.is_finite() {
        "–".into()
    } else if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

/// The Markdown table of the figures, and each figure as JSON.
fn figures_table(rows: &[Row]) -> (String, Vec<Value>) {
    let mut md = String::new();
    md.push_str("| figure | unit | median | min – max | spread | runs | target |\n");
    md.push_str("|---|---|---:|---:|---:|---:|---|\n");
    let mut rows_json = Vec::new();
    for row in rows {
        let f = &row.figure;
        let n = f.values.len();
        let target = match row.target {
            Some((text, ok)) if n > 0 => {
                format!(
                    "{text}: {}",
                    if ok(f.median()) { "met" } else { "**not met**" }
                )
            }
            Some((text, _)) => text.to_owned(),
            None => String::new(),
        };
        if n == 0 {
            md.push_str(&format!(
                "| {} | {} | – | – | – | 0 | {target} |\n",
                row.label, row.unit
            ));
        } else {
            md.push_str(&format!(
                "| {} | {} | {} | {} – {} | {:.0}% | {n} | {target} |\n",
                row.label,
                row.unit,
                fmt(f.median()),
                fmt(f.min()),
                fmt(f.max()),
                f.spread_pct(),
            ));
        }
        rows_json.push(json!({
            "key": row.key,
            "label": row.label.trim(),
            "unit": row.unit,
            "values": f.values,
            "median": if n > 0 { json!(f.median()) } else { Value::Null },
            "min": if n > 0 { json!(f.min()) } else { Value::Null },
            "max": if n > 0 { json!(f.max()) } else { Value::Null },
            "spread_pct": f.spread_pct(),
            "target": row.target.map(|(t, _)| t),
            "met": row.target.filter(|_| n > 0).map(|(_, ok)| ok(f.median())),
        }));
    }
    (md, rows_json)
}

/// Where the two cores went: CPU seconds of each process over the measured phase's wall
/// time, median over the runs; as Markdown and JSON.
fn cores_table(runs: &Runs) -> (String, BTreeMap<&'static str, Value>) {
    let mut md = String::from(
        "\nCPU over each measured phase, in cores (CPU s ÷ wall s, median of the runs):\n\n\
         | scenario | courier (or the bare client) | broker | receiver | total |\n\
         |---|---:|---:|---:|---:|\n",
    );
    let mut cores_json = BTreeMap::new();
    for &scenario in SCENARIOS.iter().chain(&SCALING_SCENARIOS) {
        if !runs.0.contains_key(scenario) {
            continue;
        }
        let client = match scenario {
            "drain" | "drain_multi" => runs.cores(scenario, &["data", "cpu_s"]),
            "flood" => runs.cores(scenario, &["extra", "cpu_s"]),
            _ => runs.cores(scenario, &["proc", "cpu_s"]),
        };
        let broker = runs.cores(scenario, &["proc", "broker_cpu_s"]);
        let receiver = runs.cores(scenario, &["proc", "receiver_cpu_s"]);
        let total: BTreeMap<u64, f64> = client
            .iter()
            .map(|(r, c)| {
                (
                    *r,
                    c + broker.get(r).unwrap_or(&0.0) + receiver.get(r).unwrap_or(&0.0),
                )
            })
            .collect();
        let [c, b, rcv, t] = [&client, &broker, &receiver, &total]
            .map(|m| median(&m.values().copied().collect::<Vec<_>>()));
        md.push_str(&format!(
            "| {scenario} | {} | {} | {} | {} |\n",
            fmt(c),
            fmt(b),
            if scenario.starts_with("drain") {
                "–".into()
            } else {
                fmt(rcv)
            },
            fmt(t)
        ));
        cores_json.insert(
            scenario,
            json!({ "client": c, "broker": b, "receiver": rcv, "total": t }),
        );
    }
    (md, cores_json)
}

fn write_file(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, text)?;
    Ok(())
}
