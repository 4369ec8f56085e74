#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, for trying courier against a cluster by
# hand and for the benchmark (docs/scaling.md). Never touches the broker on 5672.
#
#   deploy/local/cluster.sh up [DIR]          start three nodes, form the cluster, print broker.url
#   deploy/local/cluster.sh down [DIR]        stop the three nodes and remove DIR
#   deploy/local/cluster.sh status [DIR]      cluster members, and courier's queues with leader and members
#   deploy/local/cluster.sh stop-node N [DIR]   stop node N (1..3), keeping its data
#   deploy/local/cluster.sh start-node N [DIR]  start node N again; it rejoins the cluster
#   deploy/local/cluster.sh urls              the broker.url list, one URL per node
#   deploy/local/cluster.sh pids [DIR]        the nodes' operating-system pids (the benchmark's CPU figures)
#
# Nodes ${COURIER_CLUSTER_NAME}1..3@localhost [courier-c], AMQP on 127.0.0.1 ports
# COURIER_CLUSTER_PORT..+2 [5781], Erlang distribution ports COURIER_CLUSTER_DIST_PORT..+2
# [7781], data in DIR (or COURIER_CLUSTER_DIR) [/tmp/courier-cluster], one directory a
# node. The nodes share the Erlang cookie of the user that runs them (as root: the
# rabbitmq user, whose servers the rabbitmq-server script starts, as for the broker on
# 5672). Each node has its own config file: the machine's /etc/rabbitmq/rabbitmq.conf
# pins the listener to 5672.
set -euo pipefail

NAME="${COURIER_CLUSTER_NAME:-courier-c}"
PORT="${COURIER_CLUSTER_PORT:-5781}"
DIST="${COURIER_CLUSTER_DIST_PORT:-7781}"
NODES=(1 2 3)

usage() {
	sed -n 's/^#   deploy/deploy/p' "${BASH_SOURCE[0]}" >&2
	exit 2
}

node() { echo "${NAME}$1@localhost"; }
port() { echo $((PORT + $1 - 1)); }
url() { echo "amqp://guest:guest@127.0.0.1:$(port "$1")/%2f"; }
ctl() {
	local n=$1
	shift
	rabbitmqctl -q -n "$(node "$n")" "$@"
}

# ctl, its output shown only when it fails.
quiet() {
	local out
	out=$(ctl "$@" 2>&1) || { echo "$out" >&2; exit 1; }
}

# The broker.url line for courier.toml.
urls() {
	local list=() n
	for n in "${NODES[@]}"; do list+=("\"$(url "$n")\""); done
	local IFS=,
	echo "url = [${list[*]}]"
}

prepare() {
	local n=$1 d="$DIR/n$1"
	mkdir -p "$d/mnesia" "$d/log"
	echo '[].' >"$d/enabled_plugins"
	printf 'listeners.tcp.local = 127.0.0.1:%s\nloopback_users = none\n' "$(port "$n")" >"$d/rabbitmq.conf"
	# A quorum queue's dead-letter worker sends again the forwards that failed after 15 s
	# instead of RabbitMQ's 3 min (docs/scaling.md, "Retries held after a node loss").
	echo '[{rabbit, [{dead_letter_worker_publisher_confirm_timeout, 15000}]}].' >"$d/advanced.config"
}

start() {
	local n=$1 d="$DIR/n$1"
	[ -f "$d/rabbitmq.conf" ] || prepare "$n"
	if [ "$(id -u)" = 0 ]; then
		# The server script runs the node as the rabbitmq user.
		chown -R rabbitmq:rabbitmq "$DIR"
		chmod 755 "$DIR"
	fi
	RABBITMQ_NODENAME="$(node "$n")" RABBITMQ_NODE_PORT="$(port "$n")" \
		RABBITMQ_DIST_PORT=$((DIST + n - 1)) \
		RABBITMQ_MNESIA_BASE="$d/mnesia" RABBITMQ_LOG_BASE="$d/log" RABBITMQ_PID_FILE="$d/pid" \
		RABBITMQ_ENABLED_PLUGINS_FILE="$d/enabled_plugins" RABBITMQ_CONFIG_FILE="$d/rabbitmq.conf" \
		RABBITMQ_ADVANCED_CONFIG_FILE="$d/advanced.config" \
		rabbitmq-server -detached >/dev/null
}

wait_node() {
	ctl "$1" wait "$DIR/n$1/pid" --timeout 120 >/dev/null ||
		{ echo "cluster.sh: node $(node "$1") did not start; see $DIR/n$1/log" >&2; exit 1; }
}

running() { ctl "$1" ping >/dev/null 2>&1; }

# How many nodes node 1 sees running in its cluster.
running_members() {
	ctl 1 cluster_status --formatter json 2>/dev/null |
		python3 -c 'import json,sys; print(len(json.load(sys.stdin)["running_nodes"]))' 2>/dev/null || echo 0
}

up() {
	mkdir -p "$DIR"
	local n
	for n in "${NODES[@]}"; do
		if running "$n"; then echo "node $(node "$n") already running"; else start "$n"; fi
	done
	for n in "${NODES[@]}"; do wait_node "$n"; done
	for n in 2 3; do
		if ! ctl "$n" cluster_status 2>/dev/null | grep -q "$(node 1)"; then
			# start_app logs the peers it has not met yet as errors: only a failure counts.
			quiet "$n" stop_app
			quiet "$n" join_cluster "$(node 1)"
			quiet "$n" start_app
		fi
	done
	ctl 1 await_online_nodes "${#NODES[@]}" --timeout 120
	echo "cluster up: $(node 1), $(node 2), $(node 3) (data in $DIR)"
	echo "broker.url for courier.toml:"
	echo "  $(urls)"
}

down() {
	local n
	# In reverse, so that node 1 stops last and could start first.
	for n in 3 2 1; do
		if running "$n"; then ctl "$n" stop >/dev/null && echo "stopped $(node "$n")"; fi
	done
	rm -rf "$DIR"
}

status() {
	local n
	for n in "${NODES[@]}"; do
		if running "$n"; then echo "$(node "$n") running, AMQP $(port "$n")"; else echo "$(node "$n") stopped"; fi
	done
	for n in "${NODES[@]}"; do
		if running "$n"; then
			echo "running members seen by $(node "$n"):" \
				"$(ctl "$n" cluster_status --formatter json |
					python3 -c 'import json,sys; print(" ".join(json.load(sys.stdin)["running_nodes"]))')"
			echo "queues (name, type, leader, members):"
			ctl "$n" list_queues --no-table-headers name type leader members
			return 0
		fi
	done
}

node_arg() {
	case "${1:-}" in
	1 | 2 | 3) ;;
	*) usage ;;
	esac
}

# Sets DIR from the argument, else COURIER_CLUSTER_DIR, else the default.
dir_arg() { DIR="$(realpath -m "${1:-${COURIER_CLUSTER_DIR:-${TMPDIR:-/tmp}/courier-cluster}}")"; }

cmd="${1:-}"
case "$cmd" in
up | down | status)
	dir_arg "${2:-}"
	"$cmd"
	;;
stop-node)
	node_arg "${2:-}"
	ctl "$2" stop >/dev/null
	echo "stopped $(node "$2")"
	;;
start-node)
	node_arg "${2:-}"
	dir_arg "${3:-}"
	start "$2"
	wait_node "$2"
	echo "started $(node "$2")"
	;;
urls) urls ;;
pids)
	dir_arg "${2:-}"
	for n in "${NODES[@]}"; do tr -d '\n' <"$DIR/n$n/pid"; echo; done
	;;
*) usage ;;
esac
