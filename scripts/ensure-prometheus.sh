#!/usr/bin/env bash
# What `make test-prometheus` (and so the prometheus_proof test of `make test`) needs:
#
#   1. prometheus and promtool: installed from Debian's packages when missing (root only;
#      the package's own service is not used: the test starts a Prometheus of its own on
#      a loopback port with its own data directory);
#   2. the broker's rabbitmq_prometheus plugin answering on 127.0.0.1:15692: enabled
#      with rabbitmq-plugins when it does not (root only; enabling a plugin does not
#      restart or disturb the node).
#
# Not root and something missing: says so and exits 0, and the test skips loudly
# (it fails in CI, which runs as root). Runs non-interactively (CI=true, no stdin).
set -euo pipefail
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

log() { printf 'ensure-prometheus: %s\n' "$*"; }
is_root() { [ "$(id -u)" -eq 0 ]; }
plugin_answers() { timeout 2 bash -c 'exec 3<>/dev/tcp/127.0.0.1/15692' >/dev/null 2>&1; }

if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    if is_root; then
        log "installing prometheus (apt-get)"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq </dev/null
        apt-get install -y -qq --no-install-recommends prometheus </dev/null
        # The package may start its own service on :9090; the test does not use it.
    else
        log "prometheus is not installed and only root can install it: the proof is skipped"
        exit 0
    fi
fi

if ! plugin_answers; then
    if is_root && command -v rabbitmq-plugins >/dev/null 2>&1; then
        log "enabling rabbitmq_prometheus on the local broker"
        rabbitmq-plugins enable rabbitmq_prometheus </dev/null >/dev/null
        for _ in $(seq 1 30); do plugin_answers && break; sleep 1; done
        plugin_answers || log "warning: rabbitmq_prometheus still does not answer on 127.0.0.1:15692"
    else
        log "rabbitmq_prometheus does not answer on 127.0.0.1:15692 (as root: rabbitmq-plugins enable rabbitmq_prometheus)"
    fi
fi
