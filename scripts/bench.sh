#!/usr/bin/env bash
# courier's benchmark (docs/performance.md): how close courier gets to the
# broker's and the HTTP stack's own limits, on this machine, in one run.
#
# Scenarios, each run BENCH_RUNS times, interleaved so that the ratios compare figures
# taken minutes apart, not hours:
#   drain        1.  broker limit: preload, then a bare lapin consumer that only acks
#                    (one ack per message, in order, same prefetch as courier)
#   drain_multi  1b. the same with one `multiple` ack every 100 messages
#   batch200     2.  courier, batch 200, 20 accounts, HMAC on: events/s at the receiver;
#                    also 6. CPU and peak RSS over the large backlog
#   batch1       3.  courier, batch 1, max_concurrency = BENCH_CONCURRENCY: requests/s
#   flood        3.  the bare reqwest loop at the same concurrency, same receiver
#   many         4.  courier, batch 200, 2,000 accounts (sparse batches)
#   latency      5.  2,000 events/s for 20 s, flush_interval 100ms: publish→receipt
#   small        6.  courier, batch 200, 10k backlog: CPU and peak RSS
#   slow         8.  courier, batch 200, a receiver that answers BENCH_SLOW_MS late, a
#                    backlog of BENCH_EVENTS_SLOW: peak RSS
#   slowsmall    8.  the same with a 10k backlog: memory follows the window, not the backlog
#   ordered      9.  courier, batch 200, BENCH_EVENTS_ORDERED events, delivery.ordering off
#                    (ordered_off) then "per_record" (ordered_on, 4 shards): the price of
#                    per-record ordering (docs/ordering.md)
#   replicas2    10. batch200 with two courier replicas (competing consumers) on the same
#                    broker node (docs/scaling.md)
#   cluster      10. batch200, one replica, on a three-node cluster of the benchmark's own
#                    (deploy/local/cluster.sh; quorum queues on all three nodes)
#   cluster2     10. the same with two replicas, the second connected to the second node
# Every courier run gets its own queue prefix and exchange (deleted afterwards), its own
# admin port and receiver port, and a generated config in target/bench/.
#
# The load tools are tools/courier-bench, a workspace member apart from the shipped crate,
# built into the same target/release.
#
# Output: a table (median, min–max, spread, ratios per run) on stdout and in
# target/bench/results.md; target/bench/results.json holds it with every raw run.
#
# Environment (defaults in brackets):
#   BENCH_RUNS [3]              runs of each scenario
#   BENCH_EVENTS [200000]       backlog of drain, batch200 and many
#   BENCH_EVENTS_BATCH1 [BENCH_EVENTS/4]  events of batch1 and requests of flood
#   BENCH_EVENTS_SMALL [10000]  backlog of the small-backlog resource run
#   BENCH_ACCOUNTS [20]         accounts of batch200, batch1, latency, small
#   BENCH_MANY_ACCOUNTS [2000]  accounts of many
#   BENCH_CONCURRENCY [256]     courier's max_concurrency in batch1 = flood's concurrency
#   BENCH_LATENCY_RATE [2000]   events/s of the latency run
#   BENCH_LATENCY_SECONDS [20]  its duration
#   BENCH_EVENTS_SLOW [200000]  backlog of slow
#   BENCH_SLOW_MS [200]         the slow receiver's delay per request
#   BENCH_EVENTS_ORDERED [50000] backlog of each half of ordered
#   BENCH_PREFETCH []           broker.prefetch for courier and the drain; empty: courier's default
#   BENCH_SCENARIOS [all]       a subset, e.g. "drain batch200"
#   BENCH_BUILD [1]             0: use the binaries already in target/release
#   BENCH_SCRAPE_INTERVAL [5]   seconds between scrapes of courier's /metrics (0: none)
#   BENCH_COURIER               another courier binary (a before/after comparison)
#   BENCH_PERF []               scenarios to profile once more under `perf record` (not
#                               counted), e.g. "batch200 many batch1" (1 = batch200):
#                               target/bench/perf-<scenario>.data, BENCH_PERF_EVENTS events
#                               [50000], sampled at BENCH_PERF_FREQ Hz [999]
#   BENCH_AMQP_URL              the broker [amqp://guest:guest@127.0.0.1:5672/%2f]
#   BENCH_CLUSTER_PORT [5791]   first AMQP port of the cluster scenarios' nodes
#                               (courier-bench-c1..3@localhost, distribution ports
#                               BENCH_CLUSTER_PORT+2000..; brought up on first use, down at exit)
set -euo pipefail

# A relative BENCH_COURIER is taken from where the script was started.
if [ -n "${BENCH_COURIER:-}" ]; then BENCH_COURIER=$(realpath "$BENCH_COURIER"); fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

RUNS="${BENCH_RUNS:-3}"
EVENTS="${BENCH_EVENTS:-200000}"
EVENTS_BATCH1="${BENCH_EVENTS_BATCH1:-$((EVENTS / 4))}"
EVENTS_SMALL="${BENCH_EVENTS_SMALL:-10000}"
ACCOUNTS="${BENCH_ACCOUNTS:-20}"
MANY_ACCOUNTS="${BENCH_MANY_ACCOUNTS:-2000}"
CONCURRENCY="${BENCH_CONCURRENCY:-256}"
LAT_RATE="${BENCH_LATENCY_RATE:-2000}"
LAT_SECONDS="${BENCH_LATENCY_SECONDS:-20}"
PREFETCH="${BENCH_PREFETCH:-}"
EVENTS_SLOW="${BENCH_EVENTS_SLOW:-200000}"
SLOW_MS="${BENCH_SLOW_MS:-200}"
EVENTS_ORDERED="${BENCH_EVENTS_ORDERED:-50000}"
SCENARIOS="${BENCH_SCENARIOS:-drain drain_multi batch200 batch1 flood many latency small slow slowsmall ordered replicas2 cluster cluster2}"
BUILD="${BENCH_BUILD:-1}"
SCRAPE="${BENCH_SCRAPE_INTERVAL:-5}"
PERF="${BENCH_PERF:-}"
[ "$PERF" = 1 ] && PERF=batch200
[ "$PERF" = 0 ] && PERF=""
PERF_EVENTS="${BENCH_PERF_EVENTS:-50000}"
AMQP_URL="${BENCH_AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
export BENCH_AMQP_URL="$AMQP_URL"
# broker.url of the generated configs (TOML): one node, or the cluster's list.
BROKER_URL_TOML="\"$AMQP_URL\""
# Courier replicas of a courier_backlog run, and the broker.url of each replica after
# the first (index 2, 3, ...; default: the same as the first's).
REPLICAS=1
declare -A REPLICA_URL_TOML=()
# The cluster scenarios' nodes (deploy/local/cluster.sh).
CLUSTER_PORT="${BENCH_CLUSTER_PORT:-5791}"
export COURIER_CLUSTER_NAME=courier-bench-c COURIER_CLUSTER_PORT="$CLUSTER_PORT" \
    COURIER_CLUSTER_DIST_PORT=$((CLUSTER_PORT + 2000)) \
    COURIER_CLUSTER_DIR="${TMPDIR:-/tmp}/courier-bench-cluster"
CLUSTER_UP=0

OUT=target/bench
COURIER="${BENCH_COURIER:-$ROOT/target/release/courier}"
BENCH="$ROOT/target/release/courier-bench"
RESULTS="$OUT/runs.jsonl"
# The receiver verifies every signature with it; it is not a real secret.
SECRET="bench-secret-$RANDOM$RANDOM"
CLK_TCK=$(getconf CLK_TCK)
# Per-scenario ceiling: a stalled courier fails the run instead of hanging the benchmark.
RUN_TIMEOUT="${BENCH_RUN_TIMEOUT:-900}"

# courier's own variables must not leak into the generated configs.
unset COURIER_CONFIG COURIER_AMQP_URL COURIER_ADMIN_LISTEN

say() { printf '==> %s\n' "$*" >&2; }
note() { printf '    %s\n' "$*" >&2; }
die() { printf 'bench: error: %s\n' "$*" >&2; exit 1; }

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# SIGTERM, wait up to $2 seconds, then SIGKILL. Only for processes this script started.
stop() {
    local pid="$1" grace="${2:-10}" waited=0
    alive "$pid" || { wait "$pid" 2>/dev/null || true; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    while alive "$pid" && [ "$waited" -lt $((grace * 10)) ]; do
        sleep 0.1
        waited=$((waited + 1))
    done
    if alive "$pid"; then
        note "pid $pid did not stop within ${grace}s; killing it"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

port_answers() { timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" >/dev/null 2>&1; }

# True when GET http://$1:$2$3 answers 200.
http_ok() {
    local status
    status=$(timeout 3 bash -c "exec 3<>/dev/tcp/$1/$2 && printf 'GET $3 HTTP/1.0\r\nHost: $1\r\n\r\n' >&3 && head -n1 <&3" 2>/dev/null) || return 1
    [[ "$status" == *" 200"* ]]
}

STARTED=()        # pids of the processes this script started
CONFIGS=()        # configs whose topology still has to be deleted
cleanup() {
    local rc=$? pid cfg
    trap - EXIT INT TERM
    # Newest first: courier stops before the receiver it may still be sending to.
    local pids=("${STARTED[@]}") i
    for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
        stop "${pids[$i]}" 5
    done
    for cfg in "${CONFIGS[@]}"; do
        [ -n "$cfg" ] && "$BENCH" cleanup --config "$cfg" >/dev/null 2>&1 || true
    done
    if [ "$CLUSTER_UP" = 1 ]; then deploy/local/cluster.sh down >/dev/null 2>&1 || true; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

forget_pid() {
    local pid="$1" i
    for i in "${!STARTED[@]}"; do
        [ "${STARTED[$i]}" = "$pid" ] && unset 'STARTED[i]'
    done
    return 0
}

forget_config() {
    local cfg="$1" i
    for i in "${!CONFIGS[@]}"; do
        [ "${CONFIGS[$i]}" = "$cfg" ] && unset 'CONFIGS[i]'
    done
    return 0
}

# --- preflight -----------------------------------------------------------------
bash scripts/ensure-rabbitmq.sh
if [ "$BUILD" = 1 ]; then
    say "cargo build --release -p courier -p courier-bench"
    cargo build --release -p courier -p courier-bench
fi
[ -x "$COURIER" ] || die "$COURIER not found (cargo build --release)"
[ -x "$BENCH" ] || die "$BENCH not found (cargo build --release -p courier-bench)"
mkdir -p "$OUT"
: >"$RESULTS"

# --- pieces --------------------------------------------------------------------

# write_config FILE PREFIX EXCHANGE ADMIN_PORT RECEIVER_PORT ACCOUNTS BATCH FLUSH [MAX_CONCURRENCY]
write_config() {
    local file="$1" prefix="$2" exchange="$3" admin="$4" rport="$5" accounts="$6" batch="$7"
    local flush="$8" concurrency="${9:-}" i id
    {
        printf '# generated by scripts/bench.sh\n[broker]\nurl = %s\nexchange = "%s"\nqueue_prefix = "%s"\n' \
            "$BROKER_URL_TOML" "$exchange" "$prefix"
        if [ -n "$PREFETCH" ]; then printf 'prefetch = %s\n' "$PREFETCH"; fi
        printf '\n[delivery]\n# the receiver is on loopback\nallow_private_networks = true\n'
        if [ -n "$concurrency" ]; then printf 'max_concurrency = %s\n' "$concurrency"; fi
        if [ -n "${ORDERING:-}" ]; then printf 'ordering = "%s"\n' "$ORDERING"; fi
        printf '\n[admin]\nlisten = "127.0.0.1:%s"\n\n[log]\nlevel = "info"\n' "$admin"
        for ((i = 0; i < accounts; i++)); do
            printf -v id 'acct-%04d' "$i"
            printf '\n[[account]]\nid = "%s"\ncompanies_url = "http://127.0.0.1:%s/%s/companies"\ncontacts_url = "http://127.0.0.1:%s/%s/contacts"\nbatch_size = %s\nflush_interval = "%s"\nhmac_secret = "%s"\n' \
                "$id" "$rport" "$id" "$rport" "$id" "$batch" "$flush" "$SECRET"
        done
    } >"$file"
}

# Sets DIR, CFG, PREFIX, EXCHANGE, ADMIN_PORT, RPORT for a scenario run.
new_run() {
    local scenario="$1" run="$2" tag
    tag="$(date +%s)-$RANDOM$RANDOM"
    DIR="$OUT/$scenario-$run"
    rm -rf "$DIR"
    mkdir -p "$DIR"
    CFG="$DIR/courier.toml"
    PREFIX="bench-$tag"
    EXCHANGE="bench-$tag"
    ADMIN_PORT=$("$BENCH" free-port)
    RPORT=$("$BENCH" free-port)
    while [ "$RPORT" = "$ADMIN_PORT" ]; do RPORT=$("$BENCH" free-port); done
}

# setup_and_preload EVENTS ACCOUNTS: declare courier's topology, publish the backlog.
setup_and_preload() {
    CONFIGS+=("$CFG")
    "$COURIER" --config "$CFG" setup >"$DIR/setup.log" 2>&1 \
        || { cat "$DIR/setup.log" >&2; die "courier setup failed"; }
    "$BENCH" preload --config "$CFG" --events "$1" --accounts "$2" >"$DIR/preload.json" \
        || die "preload failed"
    note "preloaded $(cat "$DIR/preload.json")"
}

drop_topology() {
    "$BENCH" cleanup --config "$CFG" >"$DIR/cleanup.json" 2>&1 || note "cleanup failed: $(cat "$DIR/cleanup.json")"
    forget_config "$CFG"
}

# start_receiver EXPECT: sets RPID; the summary lands in $DIR/receive.json.
start_receiver() {
    "$BENCH" receive --listen "127.0.0.1:$RPORT" --expect "$1" --secret "$SECRET" --delay-ms "${RECEIVER_DELAY_MS:-0}" \
        --out "$DIR/receive.json" --timeout "$RUN_TIMEOUT" --idle-timeout 60 \
        </dev/null >"$DIR/receive.out" 2>"$DIR/receive.log" &
    RPID=$!
    STARTED+=("$RPID")
    local _
    for _ in $(seq 1 100); do
        port_answers 127.0.0.1 "$RPORT" && return 0
        alive "$RPID" || break
        sleep 0.1
    done
    cat "$DIR/receive.log" >&2
    die "the receiver did not start"
}

# start_courier: sets CPID.
start_courier() {
    "$COURIER" --config "$CFG" run </dev/null >"$DIR/courier.log" 2>&1 &
    CPID=$!
    STARTED+=("$CPID")
    # Scrape /metrics as Prometheus would, so peak RSS and CPU include the scrapes.
    if [ "$SCRAPE" != 0 ]; then
        scrape_loop "$CPID" "$ADMIN_PORT" >"$DIR/scrape.log" 2>&1 &
        SCRAPE_PID=$!
        STARTED+=("$SCRAPE_PID")
    fi
}

stop_scraper() {
    if [ -n "${SCRAPE_PID:-}" ]; then
        stop "$SCRAPE_PID" 5
        forget_pid "$SCRAPE_PID"
        SCRAPE_PID=""
    fi
}

# scrape_loop PID PORT: GET /metrics every $SCRAPE seconds while PID lives; logs the sizes.
scrape_loop() {
    while alive "$1"; do
        sleep "$SCRAPE"
        timeout 10 bash -c "exec 3<>/dev/tcp/127.0.0.1/$2 && printf 'GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3 && cat <&3" 2>/dev/null | wc -c || true
    done
}

# start_replicas ACCOUNTS BATCH FLUSH [MAX_CONCURRENCY]: replicas 2..REPLICAS, each with
# its own config (admin port, broker.url from REPLICA_URL_TOML) and log; sets EXTRA_PIDS.
EXTRA_PIDS=()
start_replicas() {
    local i admin cfg
    EXTRA_PIDS=()
    for ((i = 2; i <= REPLICAS; i++)); do
        admin=$("$BENCH" free-port)
        cfg="$DIR/courier-$i.toml"
        BROKER_URL_TOML="${REPLICA_URL_TOML[$i]:-$BROKER_URL_TOML}" \
            write_config "$cfg" "$PREFIX" "$EXCHANGE" "$admin" "$RPORT" "$1" "$2" "$3" "${4:-}"
        "$COURIER" --config "$cfg" run </dev/null >"$DIR/courier-$i.log" 2>&1 &
        EXTRA_PIDS+=($!)
        STARTED+=($!)
    done
}

stop_replicas() {
    local pid
    for pid in "${EXTRA_PIDS[@]}"; do
        stop "$pid" 40
        forget_pid "$pid"
    done
    EXTRA_PIDS=()
}

# The cluster scenarios' three nodes, up from their first use to the end of the benchmark.
cluster_up() {
    [ "$CLUSTER_UP" = 1 ] && return 0
    say "a three-node cluster (deploy/local/cluster.sh up $COURIER_CLUSTER_DIR)"
    CLUSTER_UP=1
    deploy/local/cluster.sh up >"$OUT/cluster.log" 2>&1 || { cat "$OUT/cluster.log" >&2; die "cluster.sh up failed"; }
    CLUSTER_URLS=$(deploy/local/cluster.sh urls | sed 's/^url = //')
    # The load tools take $BENCH_AMQP_URL over the config's broker.url.
    CLUSTER_URL_1=$(sed -E 's/^\["([^"]*)".*/\1/' <<<"$CLUSTER_URLS")
    # The same list, from the second node on: a second replica connects there.
    CLUSTER_URLS_2=$(sed -E 's/^\[("[^"]*"),(.*)\]$/[\2,\1]/' <<<"$CLUSTER_URLS")
    CLUSTER_PIDS=$(deploy/local/cluster.sh pids | tr '\n' ' ')
    note "cluster nodes' pids: $CLUSTER_PIDS"
}

# cluster_backlog SCENARIO RUN REPLICAS: batch200 on the cluster; a second replica
# connects to the second node.
cluster_backlog() {
    cluster_up
    REPLICA_URL_TOML=([2]="$CLUSTER_URLS_2")
    BENCH_AMQP_URL="$CLUSTER_URL_1" BROKER_URL_TOML="$CLUSTER_URLS" BROKER_PIDS="$CLUSTER_PIDS" \
        REPLICAS="$3" courier_backlog "$1" "$2" "$EVENTS" "$ACCOUNTS" 200 1s
    REPLICA_URL_TOML=()
}

wait_ready() {
    local _
    for _ in $(seq 1 300); do
        http_ok 127.0.0.1 "$ADMIN_PORT" /readyz && return 0
        alive "$CPID" || break
        sleep 0.1
    done
    tail -n 20 "$DIR/courier.log" >&2
    die "courier did not become ready"
}

# Waits for the receiver's summary while courier keeps running.
wait_summary() {
    while [ ! -s "$DIR/receive.json" ]; do
        if ! alive "$RPID"; then
            cat "$DIR/receive.log" >&2
            die "the receiver stopped without a summary ($DIR)"
        fi
        if [ -n "${CPID:-}" ] && ! alive "$CPID"; then
            tail -n 20 "$DIR/courier.log" >&2
            die "courier stopped unexpectedly ($DIR/courier.log)"
        fi
        sleep 0.1
    done
}

# CPU seconds (utime + stime of all threads, /proc/PID/stat) of a running process; 0 if gone.
cpu_of() {
    local stat rest
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    rest=${stat##*) }
    read -ra f <<<"$rest"
    awk -v u="${f[11]}" -v s="${f[12]}" -v t="$CLK_TCK" 'BEGIN { printf "%.3f", (u + s) / t }'
}

now_s() { date +%s.%N; }

# The broker's CPU: the Erlang VM listening on the benchmark's AMQP port, when we can see
# it (other nodes may run beside it, e.g. a test's private node); else the oldest one.
AMQP_PORT=$(sed -nE 's#^amqps?://([^@/]*@)?[^:/]+:([0-9]+).*#\2#p' <<<"$AMQP_URL")
BROKER_PID=$(ss -Hltnp "( sport = :${AMQP_PORT:-5672} )" 2>/dev/null | sed -nE 's/.*pid=([0-9]+).*/\1/p' | head -n1)
[ -n "$BROKER_PID" ] || BROKER_PID=$(pgrep -o beam.smp 2>/dev/null || true)
# BROKER_PIDS: the nodes whose CPU counts (the three of a cluster, in the cluster scenarios).
BROKER_PIDS="$BROKER_PID"
broker_cpu() { cpu_sum $BROKER_PIDS; }

# The CPU seconds of the processes PIDS, summed (0 for none).
cpu_sum() {
    local total=0 pid
    for pid in "$@"; do total=$(awk -v a="$total" -v b="$(cpu_of "$pid")" 'BEGIN { printf "%.3f", a + b }'); done
    echo "$total"
}

# mark_start: remembers the broker's CPU and the time when a measured phase starts.
mark_start() { B0=$(broker_cpu); T0=$(now_s); }

# Prints the resources of a measured phase as JSON: courier's CPU and peak RSS (VmHWM),
# the broker's and the receiver's CPU over the phase, and its wall time. With several
# courier replicas ("PID PID"), their CPU is summed and the peak RSS is the largest.
# usage COURIER_PIDS RECEIVER_PID
usage() {
    local cpu=0 hwm=0 rcpu=0 b1 t1 pid h
    b1=$(broker_cpu)
    t1=$(now_s)
    if [ -n "$1" ]; then
        # shellcheck disable=SC2086 # a list of pids
        cpu=$(cpu_sum $1)
        for pid in $1; do
            h=$(awk '/^VmHWM:/ { print $2 }' "/proc/$pid/status")
            [ "${h:-0}" -gt "$hwm" ] && hwm=$h
        done
    fi
    [ -n "$2" ] && rcpu=$(cpu_of "$2")
    awk -v c="$cpu" -v h="$hwm" -v r="$rcpu" -v b0="$B0" -v b1="$b1" -v t0="$T0" -v t1="$t1" \
        'BEGIN { printf "{\"cpu_s\":%.3f,\"hwm_kib\":%d,\"broker_cpu_s\":%.3f,\"receiver_cpu_s\":%.3f,\"wall_s\":%.3f}", c, h, b1 - b0, r, t1 - t0 }'
}

record() { # SCENARIO RUN DATA_JSON [PROC_JSON] [EXTRA_JSON]
    printf '{"scenario":"%s","run":%s,"data":%s,"proc":%s,"extra":%s}\n' \
        "$1" "$2" "$3" "${4:-null}" "${5:-null}" >>"$RESULTS"
}

summary_field() { # FILE KEY: a number from a one-line JSON summary
    sed -nE "s/.*\"$2\":(-?[0-9.eE+]+).*/\1/p" "$1"
}

# --- scenarios -----------------------------------------------------------------

scenario_drain() { # RUN [ACK_EVERY]
    local run="$1" every="${2:-1}" name=drain
    if [ "$every" != 1 ]; then name=drain_multi; fi
    new_run "$name" "$run"
    write_config "$CFG" "$PREFIX" "$EXCHANGE" "$ADMIN_PORT" "$RPORT" "$ACCOUNTS" 200 1s
    setup_and_preload "$EVENTS" "$ACCOUNTS"
    mark_start
    "$BENCH" drain --config "$CFG" --expect "$EVENTS" --ack-every "$every" >"$DIR/drain.json" \
        || die "drain failed"
    local res
    res=$(usage "" "")
    drop_topology
    record "$name" "$run" "$(cat "$DIR/drain.json")" "$res" "$(cat "$DIR/preload.json")"
    note "$name: $(summary_field "$DIR/drain.json" events_per_s) events/s"
}

# courier_backlog SCENARIO RUN EVENTS ACCOUNTS BATCH FLUSH [MAX_CONCURRENCY]: courier drains
# a preloaded backlog into the receiver; measured from the first to the last receipt.
courier_backlog() {
    local name="$1" run="$2" events="$3" accounts="$4" batch="$5" flush="$6" conc="${7:-}" res perf_pid=""
    new_run "$name" "$run"
    write_config "$CFG" "$PREFIX" "$EXCHANGE" "$ADMIN_PORT" "$RPORT" "$accounts" "$batch" "$flush" "$conc"
    setup_and_preload "$events" "$accounts"
    start_receiver "$events"
    mark_start
    start_courier
    start_replicas "$accounts" "$batch" "$flush" "$conc"
    if [[ "$name" == profile-* ]]; then
        # Attach once courier is connected: `perf record -p` sees only the threads that
        # exist then, and lapin starts an I/O thread per connection.
        wait_ready
        perf record -F "${BENCH_PERF_FREQ:-999}" --call-graph dwarf,16384 -p "$CPID" -o "$OUT/perf-${name#profile-}.data" \
            >"$DIR/perf.log" 2>&1 &
        perf_pid=$!
        STARTED+=("$perf_pid")
    fi
    wait_summary
    res=$(usage "$CPID ${EXTRA_PIDS[*]}" "$RPID")
    if [ -n "$perf_pid" ]; then
        kill -INT "$perf_pid" 2>/dev/null || true
        wait "$perf_pid" 2>/dev/null || true
        forget_pid "$perf_pid"
    fi
    stop "$CPID" 40
    forget_pid "$CPID"
    stop_replicas
    stop_scraper
    CPID=""
    stop "$RPID" 10
    forget_pid "$RPID"
    drop_topology
    record "$name" "$run" "$(cat "$DIR/receive.json")" "$res" "$(cat "$DIR/preload.json")"
    note "$name: $(summary_field "$DIR/receive.json" events_per_s) events/s," \
        "$(summary_field "$DIR/receive.json" requests_per_s) requests/s," \
        "mean batch $(summary_field "$DIR/receive.json" mean_batch), resources $res"
}

scenario_flood() { # RUN
    local run="$1" res
    new_run flood "$run"
    CPID=""
    start_receiver "$EVENTS_BATCH1"
    mark_start
    "$BENCH" http-flood --url "http://127.0.0.1:$RPORT/flood" --concurrency "$CONCURRENCY" \
        --requests "$EVENTS_BATCH1" --secret "$SECRET" >"$DIR/flood.json" || die "http-flood failed"
    wait_summary
    res=$(usage "" "$RPID")
    stop "$RPID" 10
    forget_pid "$RPID"
    record flood "$run" "$(cat "$DIR/receive.json")" "$res" "$(cat "$DIR/flood.json")"
    note "flood: $(summary_field "$DIR/receive.json" requests_per_s) requests/s at the receiver"
}

scenario_latency() { # RUN
    local run="$1" expect=$((LAT_RATE * LAT_SECONDS)) res
    new_run latency "$run"
    write_config "$CFG" "$PREFIX" "$EXCHANGE" "$ADMIN_PORT" "$RPORT" "$ACCOUNTS" 200 100ms
    CONFIGS+=("$CFG")
    "$COURIER" --config "$CFG" setup >"$DIR/setup.log" 2>&1 || die "courier setup failed"
    start_receiver "$expect"
    start_courier
    wait_ready
    mark_start
    "$BENCH" latency --config "$CFG" --rate "$LAT_RATE" --duration "$LAT_SECONDS" \
        --accounts "$ACCOUNTS" >"$DIR/latency.json" || die "latency publisher failed"
    wait_summary
    res=$(usage "$CPID" "$RPID")
    stop "$CPID" 40
    forget_pid "$CPID"
    stop_scraper
    CPID=""
    stop "$RPID" 10
    forget_pid "$RPID"
    drop_topology
    record latency "$run" "$(cat "$DIR/receive.json")" "$res" "$(cat "$DIR/latency.json")"
    note "latency: $(sed -nE 's/.*"latency":(\{[^}]*\}).*/\1/p' "$DIR/receive.json")"
}

# --- the runs ------------------------------------------------------------------
started_at=$SECONDS
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
say "courier benchmark: $RUNS run(s), backlog $EVENTS events; scenarios: $SCENARIOS"
for ((run = 1; run <= RUNS; run++)); do
    say "run $run of $RUNS"
    for s in $SCENARIOS; do
        case "$s" in
            drain) scenario_drain "$run" 1 ;;
            drain_multi) scenario_drain "$run" "${BENCH_ACK_EVERY:-100}" ;;
            batch200) courier_backlog batch200 "$run" "$EVENTS" "$ACCOUNTS" 200 1s ;;
            batch1) courier_backlog batch1 "$run" "$EVENTS_BATCH1" "$ACCOUNTS" 1 1s "$CONCURRENCY" ;;
            flood) scenario_flood "$run" ;;
            many) courier_backlog many "$run" "$EVENTS" "$MANY_ACCOUNTS" 200 1s ;;
            latency) scenario_latency "$run" ;;
            small) courier_backlog small "$run" "$EVENTS_SMALL" "$ACCOUNTS" 200 1s ;;
            slow) RECEIVER_DELAY_MS=$SLOW_MS courier_backlog slow "$run" "$EVENTS_SLOW" "$ACCOUNTS" 200 1s ;;
            slowsmall) RECEIVER_DELAY_MS=$SLOW_MS courier_backlog slowsmall "$run" "$EVENTS_SMALL" "$ACCOUNTS" 200 1s ;;
            ordered)
                courier_backlog ordered_off "$run" "$EVENTS_ORDERED" "$ACCOUNTS" 200 1s
                ORDERING=per_record courier_backlog ordered_on "$run" "$EVENTS_ORDERED" "$ACCOUNTS" 200 1s
                ;;
            replicas2) REPLICAS=2 courier_backlog replicas2 "$run" "$EVENTS" "$ACCOUNTS" 200 1s ;;
            cluster) cluster_backlog cluster "$run" 1 ;;
            cluster2) cluster_backlog cluster2 "$run" 2 ;;
            *) die "unknown scenario $s" ;;
        esac
    done
done
if [ -n "$PERF" ]; then
    command -v perf >/dev/null 2>&1 || die "BENCH_PERF needs perf (apt-get install linux-perf)"
    for s in $PERF; do
        say "profile: courier in one extra $s run under perf record (not counted)"
        case "$s" in
            batch200) courier_backlog profile-batch200 1 "$PERF_EVENTS" "$ACCOUNTS" 200 1s ;;
            batch1) courier_backlog profile-batch1 1 "$PERF_EVENTS" "$ACCOUNTS" 1 1s "$CONCURRENCY" ;;
            many) courier_backlog profile-many 1 "$PERF_EVENTS" "$MANY_ACCOUNTS" 200 1s ;;
            *) die "BENCH_PERF: no profile for scenario $s (batch200, batch1, many)" ;;
        esac
        note "perf report -i $OUT/perf-$s.data --no-children --percent-limit 1"
    done
fi

cpu_model=$(sed -nE 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n1)
rabbit=$(rabbitmqctl version 2>/dev/null || PATH="$PATH:/usr/sbin" rabbitmqctl version 2>/dev/null || echo unknown)
say "done in $(( (SECONDS - started_at) / 60 )) min $(( (SECONDS - started_at) % 60 )) s"
[ "$RUNS" -gt 0 ] || exit 0
"$BENCH" report --input "$RESULTS" --json "$OUT/results.json" --md "$OUT/results.md" \
    --meta "date=$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
    --meta "commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src Cargo.toml 2>/dev/null || echo '+changes')" \
    --meta "load=1/5/15-min load average $load_start before, $(cut -d' ' -f1-3 /proc/loadavg) after (other work on the machine skews the figures)" \
    --meta "machine=$(nproc) cores, ${cpu_model:-unknown CPU}, $(awk '/MemTotal/ { printf "%.0f GiB", $2 / 1048576 }' /proc/meminfo), RabbitMQ $rabbit on the same machine" \
    --meta "command=BENCH_RUNS=$RUNS BENCH_EVENTS=$EVENTS BENCH_EVENTS_BATCH1=$EVENTS_BATCH1 BENCH_EVENTS_SMALL=$EVENTS_SMALL bash scripts/bench.sh" \
    --meta "sizes=backlog $EVENTS events (~870 B each), batch1/flood $EVENTS_BATCH1, small $EVENTS_SMALL, accounts $ACCOUNTS / $MANY_ACCOUNTS, concurrency $CONCURRENCY, latency $LAT_RATE/s for ${LAT_SECONDS}s, prefetch ${PREFETCH:-courier default}"
note "machine-readable: $OUT/results.json, table: $OUT/results.md"
