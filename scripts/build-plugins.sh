#!/usr/bin/env bash
# Builds every guest plugin for wasm32-wasip2 (release) into target/plugins/:
#   target/plugins/*.wasm            example plugins (what `projector serve` loads by default)
#   target/plugins/fixtures/*.wasm   misbehaving test fixtures
# Idempotent; cargo makes repeat runs cheap.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
target_dir="${CARGO_TARGET_DIR:-$root/target}"

rustup target add wasm32-wasip2 >/dev/null 2>&1 || rustup target add wasm32-wasip2

cargo build --release --quiet --target wasm32-wasip2 \
  --manifest-path "$root/plugins/Cargo.toml" --target-dir "$target_dir"

out="$root/target/plugins"
mkdir -p "$out/fixtures"
built="$target_dir/wasm32-wasip2/release"
cp "$built/account_balance.wasm" "$out/account-balance.wasm"
cp "$built/misbehave.wasm" "$out/fixtures/misbehave.wasm"
echo "plugins built into $out: $(cd "$out" && ls *.wasm fixtures/*.wasm | tr '\n' ' ')"
