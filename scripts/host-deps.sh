#!/usr/bin/env bash
# What building the host needs beyond Rust: OpenSSL's headers and pkg-config, for librdkafka's
# TLS and SASL (the Kafka source). Installed with apt when missing; idempotent.
set -euo pipefail
if pkg-config --exists openssl 2>/dev/null; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "host-deps: OpenSSL's headers (libssl-dev) or pkg-config are missing and there is no apt-get: install them" >&2
  exit 1
fi
sudo_cmd=""
if [[ "$(id -u)" != 0 ]]; then sudo_cmd="sudo"; fi
echo "host-deps: installing libssl-dev and pkg-config with apt" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo_cmd apt-get install -y -qq libssl-dev pkg-config >/dev/null 2>&1 ||
  { $sudo_cmd apt-get update -qq >&2 && $sudo_cmd apt-get install -y -qq libssl-dev pkg-config >&2; }
pkg-config --exists openssl
