#!/usr/bin/env bash
# The whole test suite, from a fresh clone: builds the wasm plugins (adding the wasm32-wasip2
# target if needed), runs the plugins' native tests, then the host's unit and integration
# tests against the real compiled plugins.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/host-deps.sh
bash scripts/build-plugins.sh

echo "== plugin crates, natively (cargo test) =="
cargo test --manifest-path plugins/Cargo.toml --target-dir target --workspace --quiet

echo "== PostgreSQL: a throwaway cluster for the tests =="
pg_dir="$(mktemp -d "${TMPDIR:-/tmp}/projector-pg.XXXXXX")"
export PROJECTOR_TEST_POSTGRES="$(bash scripts/pg-test-cluster.sh start "$pg_dir")"
echo "cluster at $PROJECTOR_TEST_POSTGRES ($pg_dir)"

echo "== Kafka: a throwaway broker (tansu) for the tests =="
kafka_dir="$(mktemp -d "${TMPDIR:-/tmp}/projector-kafka.XXXXXX")"
trap 'bash scripts/pg-test-cluster.sh stop "$pg_dir"; rm -rf "$pg_dir"; bash scripts/kafka-test-broker.sh stop "$kafka_dir"; rm -rf "$kafka_dir"' EXIT
export PROJECTOR_TEST_KAFKA="$(bash scripts/kafka-test-broker.sh start "$kafka_dir")"
echo "broker at $PROJECTOR_TEST_KAFKA ($kafka_dir)"

echo "== the browser for the UI test (Debian's chromium and chromedriver) =="
bash scripts/browser.sh

echo "== schemathesis for the API contract check (tests/all/api_contract.rs runs it) =="
bash scripts/schemathesis.sh install

echo "== host: unit and integration tests =="
export PROJECTOR_PLUGINS_BUILT=1
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
