#!/usr/bin/env bash
# Quick start: builds everything (wasm target, example plugins, the host in release mode) and
# runs `projector serve` on the embedded default: SQLite in ./projector-data/, the plugins in
# ./target/plugins/, http://127.0.0.1:8080. Extra arguments go to `projector serve`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/host-deps.sh
bash scripts/build-plugins.sh
exec cargo run --release --quiet -p projector -- serve "$@"
