#!/usr/bin/env bash
# Builds every guest plugin for wasm32-wasip2 (release) into target/plugins/:
#   target/plugins/*.wasm            example plugins (what `projector serve` loads by default):
#                                    account-balance.wasm (a projection),
#                                    large-withdrawal-alert.wasm (an observer)
#   target/plugins/fixtures/*.wasm   test fixtures: relay.wasm (an observer whose every event is
#                                    a webhook, and on request an emit, a log line or a
#                                    failure), misbehaving projections, and components the host
#                                    must refuse to load: future-contract.wasm
#                                    (projector:plugin@0.9.0),
#                                    extra-import.wasm (an import the host lacks),
#                                    describe-panic.wasm, bad-descriptor.wasm
#   target/plugins/fixtures/poison-fixed/poison.wasm
#                                    the `poison` fixture built with its feature `fixed`: the
#                                    fixed plugin of the same name and version
#   target/plugins/variants/account-balance-same/account-balance.wasm
#                                    `account-balance` with its feature `same`: other code, same
#                                    name, version and output
#   target/plugins/variants/account-balance-v2/account-balance.wasm
#                                    `account-balance` with its feature `v2`: version 2.0.0, every
#                                    document with `"schema": 2`
#   target/plugins/variants/account-balance-fixed/account-balance.wasm
#                                    `account-balance` with its feature `fixed`: version 1.0.0,
#                                    every document written with `"fixed": true`
#   target/plugins/variants/account-balance-reshape/account-balance.wasm
#                                    `account-balance` with its feature `reshape`: the same
#                                    version with one more indexed field (a swap refuses it)
# A feature build is alone in its folder: the host loads every *.wasm of a folder.
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
for plugin in account-balance large-withdrawal-alert; do
  cp "$built/${plugin//-/_}.wasm" "$out/$plugin.wasm"
done
# The fixture `observer` (a bare wit-bindgen observer) gave way to `relay`: a copy left by an
# older build would still be picked up by anything loading the folder.
rm -f "$out/fixtures/observer.wasm"
for fixture in misbehave poison relay future-contract extra-import describe-panic \
  bad-descriptor; do
  cp "$built/${fixture//-/_}.wasm" "$out/fixtures/$fixture.wasm"
done

# build_feature PACKAGE FEATURE DEST: the package built with one feature, copied to DEST. Each
# feature set gets a target dir of its own: sharing one, the builds would overwrite each
# other's output and rebuild it on every run.
build_feature() {
  local package="$1" feature="$2" dest="$3"
  local dir="$target_dir/fixture-$package-$feature"
  cargo build --release --quiet --target wasm32-wasip2 \
    --manifest-path "$root/plugins/Cargo.toml" --target-dir "$dir" \
    -p "$package" --features "$feature"
  mkdir -p "$(dirname "$dest")"
  cp "$dir/wasm32-wasip2/release/${package//-/_}.wasm" "$dest"
}

build_feature poison fixed "$out/fixtures/poison-fixed/poison.wasm"
build_feature account-balance same "$out/variants/account-balance-same/account-balance.wasm"
build_feature account-balance v2 "$out/variants/account-balance-v2/account-balance.wasm"
build_feature account-balance reshape "$out/variants/account-balance-reshape/account-balance.wasm"
build_feature account-balance fixed "$out/variants/account-balance-fixed/account-balance.wasm"
echo "plugins built into $out: $(cd "$out" && ls *.wasm fixtures/*.wasm fixtures/*/*.wasm variants/*/*.wasm | tr '\n' ' ')"
bash "$root/scripts/python-plugins.sh"
