#!/usr/bin/env bash
# The whole test suite, from a fresh clone: builds the wasm plugins (adding the wasm32-wasip2
# target if needed), runs the plugins' native tests, then the host's unit and integration
# tests against the real compiled plugins.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

bash scripts/build-plugins.sh

echo "== plugin crates, natively (cargo test) =="
cargo test --manifest-path plugins/Cargo.toml --target-dir target --workspace --quiet

echo "== host: unit and integration tests =="
export PROJECTOR_PLUGINS_BUILT=1
if command -v cargo-nextest >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
