# courier — developer tasks. GNU make.
#
#   make run              build, then run the local pipeline (scripts/run-local.sh)
#   make test             run the test suite but the cluster tests (needs RabbitMQ on 127.0.0.1:5672)
#   make test-cluster     only the three-node cluster failover tests (docs/scaling.md; 3-5 min)
#   make test-prometheus  only the dashboard/alerts proof against a real Prometheus (docs/operations.md)
#   make dashboard-png    redraw docs/img/dashboard.png from the last proof's query_range results
#   make check            rustfmt and clippy, warnings are errors (alias: lint)
#   make ensure-rabbitmq  install/start RabbitMQ on 127.0.0.1:5672 if needed
#   make bench            benchmarks: courier beside the broker and HTTP limits (docs/performance.md)
#   make clean            remove build output

SHELL := /bin/bash
CARGO ?= cargo
TEST_THREADS ?= 4

.PHONY: all help run build test bench check lint fmt clippy ensure-rabbitmq ensure-test-tools \
	test-cluster test-prometheus dashboard-png clean

all: check test

help:
	@sed -n 's/^#   //p' $(firstword $(MAKEFILE_LIST))

ensure-rabbitmq:
	@bash scripts/ensure-rabbitmq.sh

# Python/Node packages of some tests (target/tools), Prometheus and the broker's
# rabbitmq_prometheus plugin (installed or enabled as root; otherwise those tests say
# SKIPPED, and fail in CI).
ensure-test-tools:
	@bash scripts/ensure-tools.sh || echo "make: the tests that need target/tools will say SKIPPED"
	@bash scripts/ensure-prometheus.sh

build:
	$(CARGO) build --release

run: ensure-rabbitmq build
	@bash scripts/run-local.sh

# nextest stops any one test after 2 min (.config/nextest.toml). cargo test has no
# per-test limit: each of its two passes, built first, gets TEST_TIMEOUT seconds.
TEST_TIMEOUT ?= 900

# The tests that start a private RabbitMQ node run one at a time (each boot takes a few
# seconds of both cores): nextest's test group does it (.config/nextest.toml, keep the
# two lists alike); without nextest they run in a second, serial pass.
PRIVATE_NODE_TESTS := alarm:: restarts:: broker_tls:: \
	paths::the_worker_moves_to_the_next_node_when_its_node_stops observe::prometheus_proof
PRIVATE_NODE_SKIP := $(addprefix --skip ,$(PRIVATE_NODE_TESTS))

# The cluster tests boot three RabbitMQ nodes each (three to five minutes together): they
# run in `make test-cluster`, not in `make test`.
test: ensure-rabbitmq ensure-test-tools
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		echo "+ $(CARGO) nextest run --workspace --no-fail-fast --test-threads $(TEST_THREADS) -E 'not test(/^cluster::/)'"; \
		$(CARGO) nextest run --workspace --no-fail-fast --test-threads $(TEST_THREADS) -E 'not test(/^cluster::/)'; \
	else \
		$(CARGO) test --workspace --no-run && \
		echo "+ timeout $(TEST_TIMEOUT) $(CARGO) test --workspace --no-fail-fast -- --test-threads $(TEST_THREADS) --skip cluster:: $(PRIVATE_NODE_SKIP)" && \
		{ timeout --kill-after=30 $(TEST_TIMEOUT) $(CARGO) test --workspace --no-fail-fast -- --test-threads $(TEST_THREADS) --skip cluster:: $(PRIVATE_NODE_SKIP); failed=$$?; \
		echo "+ timeout $(TEST_TIMEOUT) $(CARGO) test --test it -- --test-threads 1 $(PRIVATE_NODE_TESTS)"; \
		timeout --kill-after=30 $(TEST_TIMEOUT) $(CARGO) test --test it -- --test-threads 1 $(PRIVATE_NODE_TESTS) || failed=1; \
		exit $$failed; }; \
	fi

# Two courier replicas on a three-node cluster of the tests' own, a node stopped under
# them (tests/it/cluster.rs, docs/scaling.md).
test-cluster: ensure-rabbitmq
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --test it --no-fail-fast -E 'test(/^cluster::/)'; \
	else \
		$(CARGO) test --test it -- --test-threads 1 cluster::; \
	fi

# The dashboard and alert rules against a real Prometheus, a real courier and the
# broker's plugin (tests/it/observe.rs; ~1 min). PROOF_LOAD_SECONDS sets the load's length.
test-prometheus: ensure-rabbitmq ensure-test-tools
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run --workspace -E 'test(prometheus_proof)'; \
	else \
		$(CARGO) test --test it -- --exact observe::prometheus_proof; \
	fi

dashboard-png:
	@test -f target/prometheus-proof/ranges.json || { echo "run make test-prometheus first"; exit 1; }
	@bash scripts/ensure-tools.sh --plot
	target/tools/venv/bin/python tools/plot-dashboard.py target/prometheus-proof/ranges.json docs/img/dashboard.png

bench: ensure-rabbitmq
	@bash scripts/bench.sh
	$(CARGO) bench --bench pipeline
	$(CARGO) bench --bench hostile

check lint: fmt clippy

fmt:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets -- -D warnings

clean:
	$(CARGO) clean
