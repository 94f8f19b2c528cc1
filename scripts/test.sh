#!/usr/bin/env bash
# Runs every test: installs the environment (scripts/dev-env.sh), then lints and the whole
# workspace's tests against real redis-server processes and a real Kafka-protocol broker, then a
# short run of the randomized fault campaign with a fixed seed.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/dev-env.sh
eval "$(scripts/dev-env.sh --print-env)"
export NISSHI_BIN
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
cargo test --workspace --all-targets
# The fault campaign's short variant: 3 minutes, a fixed seed (docs/reliability.md).
CAMPAIGN_PROFILE=debug scripts/campaign.sh 3 20261206
