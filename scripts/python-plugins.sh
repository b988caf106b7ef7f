#!/usr/bin/env bash
# Builds the Python example projection (plugins/account-balance-py, the job of account-balance
# in Python) with componentize-py into
#   target/plugins/variants/account-balance-py/account-balance-py.wasm
# a folder of its own: the host loads every *.wasm of target/plugins, and the quick start must
# not get a second projection.
#
# componentize-py (pinned below) is installed on first use into a venv of its own in
# ${XDG_CACHE_HOME:-~/.cache}/projector (or $PROJECTOR_CACHE), from PyPI with pip; nothing is
# installed system-wide. It needs python3 with the venv module ($PYTHON picks another).
# Idempotent: the install happens once per version, and the component is rebuilt only when
# the app, the contract, this script or the tool changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
componentize_py_version="0.25.1"
cache="${PROJECTOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/projector}"
venv="$cache/componentize-py-$componentize_py_version"
tool="$venv/bin/componentize-py"
python="${PYTHON:-python3}"

app_dir="$root/plugins/account-balance-py"
app_module="account_balance"
out_dir="$root/target/plugins/variants/account-balance-py"
out="$out_dir/account-balance-py.wasm"

mkdir -p "$cache"
# One install at a time (parallel test processes may all run the build).
exec 9>"$cache/.componentize-py.lock"
if command -v flock >/dev/null 2>&1; then
  flock 9
fi

if ! "$tool" --version 2>/dev/null | grep -qx "componentize-py $componentize_py_version"; then
  echo "python-plugins: installing componentize-py $componentize_py_version into $venv" >&2
  # A venv records its own path in its scripts: it is built where it will live, and a half
  # installed one fails the version check above next time, so it is made anew.
  rm -rf "$venv"
  # A fresh Debian has python3 without its venv module (or no python3 at all): install them
  # as the PostgreSQL script installs postgresql.
  if ! "$python" -m venv --help >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    echo "python-plugins: installing python3-venv with apt-get" >&2
    sudo_cmd=""
    if [[ "$(id -u)" != 0 ]] && command -v sudo >/dev/null 2>&1; then sudo_cmd="sudo"; fi
    $sudo_cmd apt-get install -y -qq python3 python3-venv >/dev/null 2>&1 ||
      { $sudo_cmd apt-get update -qq >/dev/null 2>&1 &&
        $sudo_cmd apt-get install -y -qq python3 python3-venv >/dev/null 2>&1; } || true
  fi
  if ! "$python" -m venv "$venv"; then
    rm -rf "$venv"
    echo "python-plugins: \`$python -m venv\` failed: install Python 3 with its venv module" \
      "(Debian: apt-get install python3-venv), or point \$PYTHON at one" >&2
    exit 1
  fi
  if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
    "componentize-py==$componentize_py_version" >&2; then
    rm -rf "$venv"
    echo "python-plugins: pip could not install componentize-py $componentize_py_version" >&2
    exit 1
  fi
  "$tool" --version >&2
fi

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
