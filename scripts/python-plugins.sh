#!/usr/bin/env bash
# Builds the Python example projection (plugins/account-balance-py, the job of account-balance
# in Python) with componentize-py into
#   target/plugins/variants/account-balance-py/account-balance-py.wasm
# a folder of its own: the host loads every *.wasm of target/plugins, and the quick start must
# not get a second projection.
#
# componentize-py (pinned below) is installed on first use into a cached venv of its own by
# scripts/python-tool.sh; nothing is installed system-wide.
# Idempotent: the install happens once per version, and the component is rebuilt only when
# the app, the contract, this script or the tool changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
componentize_py_version="0.25.1"

app_dir="$root/plugins/account-balance-py"
app_module="account_balance"
out_dir="$root/target/plugins/variants/account-balance-py"
out="$out_dir/account-balance-py.wasm"

tool="$(bash "$root/scripts/python-tool.sh" componentize-py "$componentize_py_version")/componentize-py"

# Rebuilt when anything it is made of is newer than the component.
stale=false
if [[ ! -f "$out" ]]; then
  stale=true
else
  for input in "$app_dir"/*.py "$root/wit/plugin.wit" "${BASH_SOURCE[0]}" "$tool"; do
    if [[ "$input" -nt "$out" ]]; then
      stale=true
      break
    fi
  done
fi
if [[ "$stale" == true ]]; then
  mkdir -p "$out_dir"
  # componentize-py writes its bindings beside the app only in memory; the app's folder is
  # its whole Python path (no site-packages: the app needs none).
  (cd "$app_dir" && "$tool" --quiet -d "$root/wit" -w projection componentize \
    -p "$app_dir" -o "$out.part" "$app_module")
  mv "$out.part" "$out"
fi
echo "python plugin built: $out ($(wc -c <"$out") bytes)"
