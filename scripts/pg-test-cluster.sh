#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for tests and benchmarks.
#
#   scripts/pg-test-cluster.sh start DIR [--durable]   # prints the admin URL
#   scripts/pg-test-cluster.sh stop DIR
#   scripts/pg-test-cluster.sh url DIR
#
# `start` initdb's DIR/data on first use (installing PostgreSQL with apt when no server binaries
# are found), picks a free port (kept in DIR/port, so a restart gets the same one), sets
# wal_level=logical and starts the server. Tests run it with fsync off (they kill the host, not
# the database); `--durable` keeps PostgreSQL's defaults, for benchmarks.
set -euo pipefail

cmd="${1:?usage: pg-test-cluster.sh start|stop|url DIR [--durable]}"
dir="${2:?usage: pg-test-cluster.sh start|stop|url DIR [--durable]}"
mode="${3:-}"
# postgresql.conf and pg_ctl need an absolute path.
mkdir -p "$dir"
dir="$(cd "$dir" && pwd)"

find_bindir() {
  local candidate
  for candidate in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5 -n -r); do
    if [[ -x "$candidate/initdb" && -x "$candidate/postgres" ]]; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

bindir="$(find_bindir || true)"
if [[ -z "$bindir" ]]; then
  echo "pg-test-cluster: no PostgreSQL server binaries found" >&2
  bash "$(dirname "${BASH_SOURCE[0]}")/apt-install.sh" pg-test-cluster postgresql
  bindir="$(find_bindir)"
fi

# initdb and postgres refuse to run as root: run them as the postgres user then.
as_owner() {
  if [[ "$(id -u)" -eq 0 ]]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

url() {
  echo "postgres://postgres@127.0.0.1:$(cat "$dir/port")/postgres"
}

case "$cmd" in
  start)
    mkdir -p "$dir"
    if [[ ! -f "$dir/data/PG_VERSION" ]]; then
      port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
      echo "$port" >"$dir/port"
      mkdir -p "$dir/data"
      [[ "$(id -u)" -eq 0 ]] && chown -R postgres "$dir"
      chmod 700 "$dir/data"
      as_owner "$bindir/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-sync >"$dir/initdb.log"
      {
        echo "listen_addresses = '127.0.0.1'"
        echo "port = $port"
        echo "unix_socket_directories = '$dir'"
        echo "wal_level = logical"
        echo "max_connections = 400"
        echo "shared_buffers = 256MB"
        echo "max_wal_size = 4GB"
        if [[ "$mode" != "--durable" ]]; then
          echo "fsync = off"
          echo "synchronous_commit = off"
          echo "full_page_writes = off"
        fi
      } >>"$dir/data/postgresql.conf"
    fi
    as_owner "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start >/dev/null
    url
    ;;
  stop)
    if [[ -f "$dir/data/postmaster.pid" ]]; then
      as_owner "$bindir/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
    fi
    ;;
  url)
    url
    ;;
  *)
    echo "unknown command $cmd" >&2
    exit 2
    ;;
esac
