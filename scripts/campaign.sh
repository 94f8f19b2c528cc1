#!/usr/bin/env bash
# Randomized fault campaign (docs/reliability.md, "Fault campaign"): MINUTES of a checkable
# workload through the whole pipeline under a seeded schedule of overlapping faults, with the
# target compared against the source and the record of acknowledged writes at quiet points.
# Exits non-zero on any lost, doubled or reordered write; prints the seed to replay it.
#   scripts/campaign.sh [MINUTES] [SEED|random] [standalone|cluster]
#   CAMPAIGN_PROFILE=debug scripts/campaign.sh 3 20261206 standalone   (scripts/test.sh runs this
#   and a cluster one, on the test build)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/dev-env.sh
eval "$(scripts/dev-env.sh --print-env)"
export NISSHI_BIN
if [ "${CAMPAIGN_PROFILE:-release}" = "debug" ]; then
  cargo build --bins -q
  cargo run -q -p tests --example campaign -- "$@"
else
  cargo build --release --bins -q
  cargo run --release -q -p tests --example campaign -- "$@"
fi
