#!/usr/bin/env bash
# Runs every test: installs the environment (scripts/dev-env.sh), then lints and the whole
# workspace's tests against real redis-server processes and a real Kafka-protocol broker.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/dev-env.sh
eval "$(scripts/dev-env.sh --print-env)"
export NISSHI_BIN
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --all-targets
# The fault campaign (scripts/campaign.sh) is not run here yet: its first runs found a loss it
# does not survive (docs/reliability.md, "Fault campaign"), which is to be fixed first.
