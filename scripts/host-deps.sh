#!/usr/bin/env bash
# What building the host needs beyond Rust: OpenSSL's headers and pkg-config, for librdkafka's
# TLS and SASL (the Kafka source). Installed with apt when missing; idempotent.
set -euo pipefail
if pkg-config --exists openssl 2>/dev/null; then
  exit 0
fi
bash "$(dirname "${BASH_SOURCE[0]}")/apt-install.sh" host-deps libssl-dev pkg-config
pkg-config --exists openssl
