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
# A short fault campaign with a fixed seed (the long runs: make campaign). 20261206 replays the
# schedule that found the barrier and proxy bugs (docs/reliability.md). The cluster target's
# campaign passed 30 minutes on a release build (`make campaign TARGET=cluster SEED=1207`) but has
# no record on the debug build this runs yet, so it is not run here.
CAMPAIGN_PROFILE=debug scripts/campaign.sh 3 20261206 standalone
