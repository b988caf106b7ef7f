#!/usr/bin/env bash
# Installs the browser the UI test drives: Debian's chromium and its chromedriver (nothing
# downloads a browser of its own). Idempotent: does nothing when both are there.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
bash "$(dirname "${BASH_SOURCE[0]}")/apt-install.sh" browser chromium chromium-driver
command -v chromedriver >/dev/null 2>&1
