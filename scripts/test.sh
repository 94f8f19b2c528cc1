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
# Short fault campaigns with fixed seeds (the long runs: make campaign). 20261206 replays the
# schedule that found the barrier and proxy bugs (docs/reliability.md); 1207 is the cluster
# target's seed of its 30-minute release run (3 minutes on this debug build: 283,850 writes,
# 0 differences, 2026-12-07).
CAMPAIGN_PROFILE=debug scripts/campaign.sh 3 20261206 standalone
CAMPAIGN_PROFILE=debug scripts/campaign.sh 3 1207 cluster
