#!/usr/bin/env bash
# The pipeline timed until the target holds a mixed dataset and bursts of writes, beside a native
# replica of the same source in the same run. Not part of CI. Figures go to docs/benchmarks.md.
#   scripts/bench-mixed.sh [SCALE] [SETS]   (SCALE 1: the mixed dataset of issue 21, ~850 MB)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/dev-env.sh
eval "$(scripts/dev-env.sh --print-env)"
export NISSHI_BIN
cargo build --release --bins -q
cargo run --release -q -p tests --example bench_mixed -- "$@"
