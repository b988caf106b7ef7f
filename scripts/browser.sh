#!/usr/bin/env bash
# Installs the browser the UI test drives: Debian's chromium and its chromedriver (nothing
# downloads a browser of its own). Idempotent: does nothing when both are there.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "browser: chromium and chromedriver are missing and there is no apt-get: install them" >&2
  exit 1
fi
sudo_cmd=""
if [[ "$(id -u)" != 0 ]]; then sudo_cmd="sudo"; fi
echo "browser: installing chromium and chromium-driver with apt" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo_cmd apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 ||
  { $sudo_cmd apt-get update -qq >&2 && $sudo_cmd apt-get install -y -qq chromium chromium-driver >&2; }
command -v chromedriver >/dev/null 2>&1
