#!/usr/bin/env bash
# Installs the Python and Node packages some tests use, in the project's own place:
#
#   target/tools/venv   a Python venv with tools/pytools/requirements.txt
#                       (plus plot-requirements.txt with --plot)
#   target/tools/node   node_modules from tools/pytools/package.json
#
# Idempotent and quick once done (a stamp per requirements file); safe to run from
# several tests at once (flock). Missing python3-venv or npm are installed with
# apt-get when run as root, as scripts/ensure-rabbitmq.sh does for RabbitMQ.
# Runs non-interactively (CI=true, no stdin). Exit 0 when everything is in place.
#
#   scripts/ensure-tools.sh [--python] [--node] [--plot]   (no option: python and node)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD
TOOLS="$ROOT/target/tools"
REQ="$ROOT/tools/pytools"
mkdir -p "$TOOLS"

want_python=0 want_node=0 want_plot=0
for arg in "$@"; do
    case "$arg" in
        --python) want_python=1 ;;
        --node) want_node=1 ;;
        --plot) want_python=1 want_plot=1 ;;
        *) echo "ensure-tools: unknown option $arg" >&2; exit 2 ;;
    esac
done
if [ $# -eq 0 ]; then want_python=1 want_node=1; fi

log() { printf 'ensure-tools: %s\n' "$*" >&2; }
die() { printf 'ensure-tools: error: %s\n' "$*" >&2; exit 1; }

apt_install() {
    [ "$(id -u)" -eq 0 ] || die "$* missing and only root can install it (apt-get install $*)"
    log "installing $* (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq </dev/null >&2
    apt-get install -y -qq --no-install-recommends "$@" </dev/null >&2
}

exec 9>"$TOOLS/.lock"
flock 9

# A stamp holds the hash of the requirements it was made from.
fresh() { [ -f "$2" ] && [ "$(cat "$2")" = "$(sha256sum "$1" | cut -d' ' -f1)" ]; }
stamp() { sha256sum "$1" | cut -d' ' -f1 >"$2"; }

if [ "$want_python" -eq 1 ]; then
    if [ ! -x "$TOOLS/venv/bin/python" ]; then
        command -v python3 >/dev/null 2>&1 || apt_install python3 python3-venv
        if ! python3 -m venv "$TOOLS/venv" >&2; then
            rm -rf "$TOOLS/venv"
            apt_install python3-venv
            python3 -m venv "$TOOLS/venv" >&2
        fi
    fi
    for file in requirements.txt $([ "$want_plot" -eq 1 ] && echo plot-requirements.txt); do
        if ! fresh "$REQ/$file" "$TOOLS/venv/.$file.stamp"; then
            log "pip install -r tools/pytools/$file"
            "$TOOLS/venv/bin/python" -m pip install -q --disable-pip-version-check \
                -r "$REQ/$file" </dev/null >&2 || die "pip install -r tools/pytools/$file failed"
            stamp "$REQ/$file" "$TOOLS/venv/.$file.stamp"
        fi
    done
fi

if [ "$want_node" -eq 1 ]; then
    command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1 || apt_install nodejs npm
    mkdir -p "$TOOLS/node"
    if ! fresh "$REQ/package.json" "$TOOLS/node/.stamp"; then
        cp "$REQ/package.json" "$TOOLS/node/package.json"
        log "npm install (tools/pytools/package.json)"
        (cd "$TOOLS/node" && npm install --no-audit --no-fund --loglevel=error </dev/null >&2) \
            || die "npm install failed"
        stamp "$REQ/package.json" "$TOOLS/node/.stamp"
    fi
fi
