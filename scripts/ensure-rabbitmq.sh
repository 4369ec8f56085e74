#!/usr/bin/env bash
# Make a RabbitMQ broker available at 127.0.0.1:5672 for courier's tests and
# the local pipeline (and the openssl command, for the TLS tests).
#
#   1. something already answers on 127.0.0.1:5672  -> done;
#   2. rabbitmq-server not installed                  -> install it (root only);
#   3. installed but stopped                          -> start it (root only);
#   4. wait (default 120 s) until the port answers and the node has booted.
#
# Runs non-interactively (CI=true, no stdin). Exit 0 when the broker is up,
# 1 otherwise, with a message saying why.
#
# Environment:
#   RABBITMQ_WAIT_SECONDS  how long to wait for the broker (default 120)
set -euo pipefail

HOST=127.0.0.1
PORT=5672
WAIT_SECONDS="${RABBITMQ_WAIT_SECONDS:-120}"
finish_dpkg=0

# rabbitmq-server and rabbitmqctl live in /usr/sbin, which is not on every
# user's PATH.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

log() { printf 'ensure-rabbitmq: %s\n' "$*"; }
die() { printf 'ensure-rabbitmq: error: %s\n' "$*" >&2; exit 1; }

is_root() { [ "$(id -u)" -eq 0 ]; }

# The TLS tests generate their certificates with the openssl command.
if ! command -v openssl >/dev/null 2>&1; then
    is_root || die "openssl is not installed; the TLS tests need it (sudo apt-get install openssl)"
    log "installing openssl (the TLS tests generate their certificates with it)"
    apt-get install -y -q openssl </dev/null || die "apt-get install openssl failed"
fi

# True when a TCP connection to HOST:PORT succeeds within 2 seconds.
port_answers() {
    timeout 2 bash -c "exec 3<>/dev/tcp/${HOST}/${PORT}" >/dev/null 2>&1
}

# True when the local node answers (it may still be booting).
node_pings() {
    command -v rabbitmq-diagnostics >/dev/null 2>&1 || return 1
    timeout 15 rabbitmq-diagnostics -q -t 5 ping </dev/null >/dev/null 2>&1
}

# True when the local node has finished booting. Without rabbitmqctl (or
# without the rights to use it) an answering port is all we can check.
node_started() {
    if command -v rabbitmqctl >/dev/null 2>&1 && is_root; then
        timeout 15 rabbitmqctl -q -t 5 await_startup </dev/null >/dev/null 2>&1
    else
        return 0
    fi
}

if port_answers; then
    log "RabbitMQ answers on ${HOST}:${PORT}"
    exit 0
fi

# --- install -----------------------------------------------------------------
if ! command -v rabbitmq-server >/dev/null 2>&1; then
    if ! is_root; then
        die "nothing answers on ${HOST}:${PORT} and rabbitmq-server is not installed.
  Install it (e.g. 'sudo apt-get install rabbitmq-server') or run this script with sudo:
    sudo $0"
    fi
    log "installing rabbitmq-server (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q </dev/null
    if ! apt-get install -y -q rabbitmq-server </dev/null; then
        # Without an init system (containers) the package's post-install step can
        # fail to start the service although the files are in place: start it
        # ourselves below and let dpkg finish its configuration afterwards.
        command -v rabbitmq-server >/dev/null 2>&1 \
            || die "apt-get install rabbitmq-server failed"
        log "the package's post-install step failed; starting RabbitMQ directly"
        finish_dpkg=1
    fi
    command -v rabbitmq-server >/dev/null 2>&1 \
        || die "apt-get installed rabbitmq-server, but the command is still not found"
fi

# --- start -------------------------------------------------------------------
# The package's post-install step may already have started it (or it may be
# booting): only start a node that does not answer at all.
if ! port_answers && ! node_pings; then
    if ! is_root; then
        die "RabbitMQ is installed but not running, and only root can start it.
  Start it with:  sudo rabbitmq-server -detached
  (or: sudo service rabbitmq-server start), or run this script with sudo."
    fi
    log "starting RabbitMQ (rabbitmq-server -detached)"
    if ! rabbitmq-server -detached </dev/null; then
        log "rabbitmq-server -detached failed; trying 'service rabbitmq-server start'"
        service rabbitmq-server start </dev/null \
            || die "could not start RabbitMQ (see /var/log/rabbitmq/)"
    fi
fi

# --- wait --------------------------------------------------------------------
printf 'ensure-rabbitmq: waiting for RabbitMQ on %s:%s (up to %ss) ' "$HOST" "$PORT" "$WAIT_SECONDS"
deadline=$((SECONDS + WAIT_SECONDS))
while :; do
    if port_answers && node_started; then
        printf ' up\n'
        if [ "$finish_dpkg" -eq 1 ]; then
            dpkg --configure -a </dev/null || log "warning: 'dpkg --configure -a' failed; RabbitMQ runs anyway"
        fi
        log "RabbitMQ answers on ${HOST}:${PORT}"
        exit 0
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        printf ' timed out\n'
        die "RabbitMQ did not answer on ${HOST}:${PORT} within ${WAIT_SECONDS}s.
  Look at /var/log/rabbitmq/ (startup_log, startup_err, rabbit@*.log)."
    fi
    printf '.'
    sleep 1
done
