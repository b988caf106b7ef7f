#!/usr/bin/env bash
# Installs Debian packages for the project's scripts: `apt-install.sh WHO PACKAGE...`. WHO names
# the caller in the messages. Tries without refreshing the package lists first, then with. Runs
# apt through sudo when not root. Fails, saying what to install, where there is no apt-get.
set -euo pipefail
who="$1"
shift
if ! command -v apt-get >/dev/null 2>&1; then
  echo "$who: $* missing and there is no apt-get: install them" >&2
  exit 1
fi
sudo_cmd=""
if [[ "$(id -u)" != 0 ]]; then sudo_cmd="sudo"; fi
echo "$who: installing $* with apt" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo_cmd apt-get install -y -qq "$@" >/dev/null 2>&1 ||
  { $sudo_cmd apt-get update -qq >&2 && $sudo_cmd apt-get install -y -qq "$@" >&2; }
