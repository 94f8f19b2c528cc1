#!/usr/bin/env bash
# Soak run (not part of CI): MINUTES of mixed workload through the whole pipeline with a random
# fault every 10-30 s, then an exact comparison and a report (docs/reliability.md).
#   scripts/soak.sh [MINUTES] [SEED]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/dev-env.sh
eval "$(scripts/dev-env.sh --print-env)"
export NISSHI_BIN
cargo build --release --bins -q
cargo run --release -q -p tests --example soak -- "$@"
