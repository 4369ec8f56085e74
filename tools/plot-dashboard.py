"""Draws the dashboard's main panels from a prometheus_proof run (make dashboard-png).

Input: target/prometheus-proof/ranges.json, written by tests/it/observe.rs: the load it
ran and the query_range result of every dashboard expression over the run.
Output: a PNG (docs/img/dashboard.png in the README). Grafana is not needed: the same
queries, plotted with matplotlib.
"""

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [
    "Events per second",
    "Delivery lag percentiles",
    "Requests by outcome",
    "Dead letters by account and reason",
    "Open circuits",
    "Broker connection",
    "Retry and dead-letter queue depth",
    "Batch size",
]


def legend(fmt, metric):
    out = fmt
    for key, value in metric.items():
        out = out.replace("{{" + key + "}}", value)
    return out


def main(src, dst):
    run = json.load(open(src))
    by_panel = {}
    for entry in run["panels"]:
        title, _, fmt = entry["panel"].partition(" / ")
        by_panel.setdefault(json.loads(title), []).append((json.loads(fmt), entry["result"]))
    t0 = min(
        float(v[0])
        for entries in by_panel.values()
        for _, result in entries
        for s in result
        for v in s["values"]
    )
    fig, axes = plt.subplots(4, 2, figsize=(13, 13), constrained_layout=True)
    for ax, title in zip(axes.flat, PANELS):
        for fmt, result in by_panel.get(title, []):
            for series in result:
                xs = [float(t) - t0 for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                ax.plot(xs, ys, label=legend(fmt, series["metric"]), linewidth=1.2)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("seconds", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.suptitle("courier dashboard, from Prometheus query_range — load: " + run["load"], fontsize=9, wrap=True)
    fig.savefig(dst, dpi=80)


main(sys.argv[1], sys.argv[2])
