#!/usr/bin/env bash
# Builds every guest plugin for wasm32-wasip2 (release) into target/plugins/:
#   target/plugins/*.wasm            example plugins (what `projector serve` loads by default)
#   target/plugins/fixtures/*.wasm   misbehaving test fixtures
#   target/plugins/fixtures/poison-fixed/poison.wasm
#                                    the `poison` fixture built with its feature `fixed`: the
#                                    fixed plugin of the same name and version, alone in its
#                                    folder (the host loads every *.wasm of a folder)
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
cp "$built/poison.wasm" "$out/fixtures/poison.wasm"

# The same package with another feature set gets a target dir of its own: sharing one, the
# two builds would overwrite each other's poison.wasm and rebuild it on every run.
fixed_dir="$target_dir/fixture-poison-fixed"
cargo build --release --quiet --target wasm32-wasip2 \
  --manifest-path "$root/plugins/Cargo.toml" --target-dir "$fixed_dir" \
  -p poison --features fixed
mkdir -p "$out/fixtures/poison-fixed"
cp "$fixed_dir/wasm32-wasip2/release/poison.wasm" "$out/fixtures/poison-fixed/poison.wasm"
echo "plugins built into $out: $(cd "$out" && ls *.wasm fixtures/*.wasm fixtures/*/*.wasm | tr '\n' ' ')"
