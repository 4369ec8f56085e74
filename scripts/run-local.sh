#!/usr/bin/env bash
# The local pipeline, end to end, on this machine:
#
#   courier receive (a demo receiver on 127.0.0.1:8787, verifies signatures)
#   courier setup   (declares the demo's own exchange "courier-demo" and its queues
#                    "courier-demo.*"; they stay afterwards, empty, and nothing else
#                    publishes to that exchange, so nothing piles up in them)
#   courier run     (the worker, config deploy/local/courier.toml)
#   courier publish (sample events from deploy/local/events.ndjson)
#
# then shows the requests as the receiver gets them, prints a summary and stops
# everything it started. Normally run through `make run`, which builds the
# release binary and makes sure RabbitMQ runs first.
#
# Environment:
#   COURIER_BIN      the binary (default target/release/courier)
#   WEBHOOK_SECRET   the demo signing secret (default "local-demo-secret")
#   COURIER_AMQP_URL another broker than amqp://guest:guest@127.0.0.1:5672/%2f
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

BIN="${COURIER_BIN:-target/release/courier}"
CONFIG=deploy/local/courier.toml
EVENTS=deploy/local/events.ndjson
RECEIVER_HOST=127.0.0.1
RECEIVER_PORT=8787
ADMIN_LISTEN="${COURIER_ADMIN_LISTEN:-127.0.0.1:9464}"
METRICS_URL="http://${ADMIN_LISTEN}/metrics"
OUT_DIR=target/local
RECEIVER_OUT="$OUT_DIR/receiver.out"   # receiver stdout: one line per request
RECEIVER_LOG="$OUT_DIR/receiver.log"   # receiver stderr
WORKER_LOG="$OUT_DIR/courier.log"      # worker stdout and stderr
FIRST_REQUEST_TIMEOUT=60   # seconds after publishing: fail if no request by then
WATCH_SECONDS=15           # seconds to show requests after the first one
IDLE_SECONDS=3             # ...or stop earlier once nothing new arrived for this long

export WEBHOOK_SECRET="${WEBHOOK_SECRET:-local-demo-secret}"
# The config is given explicitly; a COURIER_CONFIG from the caller must not win.
unset COURIER_CONFIG

say()  { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die()  { printf 'run-local: error: %s\n' "$*" >&2; exit 1; }

# True when a TCP connection to $1:$2 succeeds within 2 seconds.
port_answers() {
    timeout 2 bash -c "exec 3<>/dev/tcp/$1/$2" >/dev/null 2>&1
}

alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }

# Send SIGTERM to a process we started and wait for it (at most $2 seconds,
# then SIGKILL).
stop() {
    local pid="$1" grace="$2" name="$3" waited=0
    alive "$pid" || return 0
    kill -TERM "$pid" 2>/dev/null || return 0
    while alive "$pid" && [ "$waited" -lt $((grace * 10)) ]; do
        sleep 0.1
        waited=$((waited + 1))
    done
    if alive "$pid"; then
        printf 'run-local: %s did not stop within %ss; killing it\n' "$name" "$grace" >&2
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

RECEIVER_PID=""
WORKER_PID=""
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if alive "$WORKER_PID" || alive "$RECEIVER_PID"; then
        say "Stopping the worker and the receiver (SIGTERM)"
    fi
    # The worker first: on SIGTERM it flushes and delivers what it holds,
    # which needs the receiver still up.
    stop "$WORKER_PID" 40 "the worker"
    stop "$RECEIVER_PID" 10 "the receiver"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

show_worker_log() {
    if [ -s "$WORKER_LOG" ]; then
        printf -- '--- last lines of %s ---\n' "$WORKER_LOG" >&2
        tail -n 20 "$WORKER_LOG" >&2
    fi
}

# --- preflight ---------------------------------------------------------------
[ -x "$BIN" ] || die "$BIN not found. Build it first: cargo build --release (or use: make run)"
[ -f "$CONFIG" ] || die "$CONFIG not found"
[ -f "$EVENTS" ] || die "$EVENTS not found"
if [ -z "${COURIER_AMQP_URL:-}" ] && ! port_answers 127.0.0.1 5672; then
    die "RabbitMQ does not answer on 127.0.0.1:5672. Start it with: make ensure-rabbitmq"
fi
if port_answers "$RECEIVER_HOST" "$RECEIVER_PORT"; then
    die "something already listens on $RECEIVER_HOST:$RECEIVER_PORT (an earlier run still going?)"
fi
if port_answers "${ADMIN_LISTEN%:*}" "${ADMIN_LISTEN##*:}"; then
    die "something already listens on $ADMIN_LISTEN (another courier run?)"
fi

mkdir -p "$OUT_DIR"
: >"$RECEIVER_OUT"
: >"$RECEIVER_LOG"
: >"$WORKER_LOG"

# Events the receiver should get: all of them but globex's contacts (globex has
# no contacts_url, so those are skipped).
total_events=$(grep -c . "$EVENTS")
skipped_events=$(grep -cE '"account": *"globex".*"type": *"contact"' "$EVENTS" || true)
expected_events=$((total_events - skipped_events))

# --- 1. receiver -------------------------------------------------------------
say "Starting the demo receiver on $RECEIVER_HOST:$RECEIVER_PORT"
"$BIN" receive --listen "$RECEIVER_HOST:$RECEIVER_PORT" --secret "$WEBHOOK_SECRET" \
    </dev/null >"$RECEIVER_OUT" 2>"$RECEIVER_LOG" &
RECEIVER_PID=$!
for _ in $(seq 1 100); do
    port_answers "$RECEIVER_HOST" "$RECEIVER_PORT" && break
    alive "$RECEIVER_PID" || break
    sleep 0.1
done
if ! port_answers "$RECEIVER_HOST" "$RECEIVER_PORT"; then
    cat "$RECEIVER_LOG" >&2
    die "the receiver did not start (output above, also in $RECEIVER_LOG)"
fi

# --- 2. topology ---------------------------------------------------------------
say "Declaring the exchange and queues (courier setup)"
"$BIN" --config "$CONFIG" setup </dev/null || die "courier setup failed (exit $?)"

# --- 3. worker -----------------------------------------------------------------
say "Starting the worker (courier run), log: $WORKER_LOG"
"$BIN" --config "$CONFIG" run </dev/null >"$WORKER_LOG" 2>&1 &
WORKER_PID=$!
admin_host="${ADMIN_LISTEN%:*}"
admin_port="${ADMIN_LISTEN##*:}"
for _ in $(seq 1 150); do
    port_answers "$admin_host" "$admin_port" && break
    alive "$WORKER_PID" || break
    sleep 0.1
done
if ! alive "$WORKER_PID"; then
    show_worker_log
    die "the worker exited at start (log: $WORKER_LOG)"
fi

# --- 4. publish ----------------------------------------------------------------
say "Publishing $total_events sample events from $EVENTS"
"$BIN" --config "$CONFIG" publish "$EVENTS" </dev/null || die "courier publish failed"
note "expecting $expected_events events at the receiver ($skipped_events globex contacts are skipped: globex has no contacts_url)"

# --- 5. watch the receiver -----------------------------------------------------
say "Requests as the receiver gets them:"
shown=0
requests=0
first_at=""
last_new=$SECONDS
published_at=$SECONDS
while :; do
    lines=$(wc -l <"$RECEIVER_OUT")
    if [ "$lines" -gt "$shown" ]; then
        sed -n "$((shown + 1)),${lines}p" "$RECEIVER_OUT" | sed 's/^/    /'
        shown=$lines
        last_new=$SECONDS
    fi
    requests=$(grep -c 'sig=' "$RECEIVER_OUT" || true)
    if [ "$requests" -gt 0 ] && [ -z "$first_at" ]; then
        first_at=$SECONDS
    fi
    # Events counted from an "events=N" field of each line, when it has one.
    events=$(sed -nE 's/^/ /; s/.*[^A-Za-z0-9_](events|event[_-]count)=([0-9]+).*/\2/p' "$RECEIVER_OUT" \
        | awk '{ s += $1 } END { print s + 0 }')

    if [ -z "$first_at" ]; then
        if [ $((SECONDS - published_at)) -ge "$FIRST_REQUEST_TIMEOUT" ]; then
            show_worker_log
            die "no request reached the receiver within ${FIRST_REQUEST_TIMEOUT}s (worker log: $WORKER_LOG)"
        fi
    else
        [ "$events" -ge "$expected_events" ] && break
        [ $((SECONDS - last_new)) -ge "$IDLE_SECONDS" ] && break
        [ $((SECONDS - first_at)) -ge "$WATCH_SECONDS" ] && break
    fi
    if ! alive "$WORKER_PID"; then
        show_worker_log
        die "the worker stopped unexpectedly (log: $WORKER_LOG)"
    fi
    sleep 0.5
done

# --- 6. summary ----------------------------------------------------------------
ok=$(grep -c 'sig=ok' "$RECEIVER_OUT" || true)
bad=$(grep -c 'sig=bad' "$RECEIVER_OUT" || true)
echo
if [ "$events" -gt 0 ]; then
    summary="$requests requests carrying $events events (expected $expected_events)"
else
    summary="$requests requests"
fi
if [ "$bad" -eq 0 ] && [ "$ok" -eq "$requests" ]; then
    say "$summary, all signatures verified"
else
    say "$summary: $ok signatures verified, $bad bad"
fi

if command -v curl >/dev/null 2>&1; then
    counters=$(curl -fsS --max-time 3 "$METRICS_URL" 2>/dev/null \
        | grep -E '^courier_events_(consumed|delivered|skipped)_total' || true)
    if [ -n "$counters" ]; then
        note "worker counters:"
        printf '%s\n' "$counters" | sed 's/^/      /'
    fi
fi
note "worker log:        $WORKER_LOG"
note "receiver output:   $RECEIVER_OUT"
note "metrics (while the worker runs): $METRICS_URL"
note "the demo's exchange and queues (courier-demo, courier-demo.*) stay on the broker,"
note "  empty; remove them with: rabbitmqctl delete_queue courier-demo.deliver (and so on)"
note "to keep it running, start the two commands yourself:"
note "  WEBHOOK_SECRET=$WEBHOOK_SECRET $BIN receive --listen $RECEIVER_HOST:$RECEIVER_PORT --secret \"\$WEBHOOK_SECRET\""
note "  WEBHOOK_SECRET=$WEBHOOK_SECRET $BIN --config $CONFIG run"

if [ "$bad" -gt 0 ]; then
    die "$bad requests had a bad signature"
fi
