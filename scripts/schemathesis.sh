#!/usr/bin/env bash
# The API contract check with schemathesis (pinned below, in a cached venv through
# scripts/python-tool.sh).
#   bash scripts/schemathesis.sh install           installs it (scripts/test.sh does)
#   bash scripts/schemathesis.sh run URL TOKEN     checks the server at URL against its own
#                                                  /openapi.json: no 5xx but a wait's 504, every
#                                                  status, content type, header and body as
#                                                  documented; TOKEN is the admin token
# Settings: tests/api/schemathesis.toml. Exits non-zero on any failure.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
version="4.32.5"
bin="$(bash "$root/scripts/python-tool.sh" schemathesis "$version")"
case "${1:-}" in
  install)
    "$bin/st" --version
    ;;
  run)
    url="${2:?usage: schemathesis.sh run URL TOKEN}"
    token="${3:?usage: schemathesis.sh run URL TOKEN}"
    reports="$(mktemp -d "${TMPDIR:-/tmp}/projector-schemathesis.XXXXXX")"
    trap 'rm -rf "$reports"' EXIT
    cd "$reports"
    exec "$bin/st" --config-file "$root/tests/api/schemathesis.toml" --no-color run "$url/openapi.json" \
      --header "Authorization: Bearer $token" \
      --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance \
      --max-examples "${SCHEMATHESIS_MAX_EXAMPLES:-40}" \
      --generation-database none \
      --workers 1
    ;;
  *)
    echo "usage: bash scripts/schemathesis.sh install | run URL TOKEN" >&2
    exit 2
    ;;
esac
