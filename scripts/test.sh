#!/usr/bin/env bash
# Runs the whole test suite against the real services of this machine:
# MariaDB, Redis and a Kafka-protocol broker (started when missing).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
bash scripts/services.sh
cargo test --locked --all-targets "$@"
