#!/usr/bin/env bash
# Pipeline benchmarks side by side with same-run references (native replica full sync;
# redis-benchmark on the target). Not part of CI. Figures go to docs/benchmarks.md.
#   scripts/bench-pipeline.sh [KEYS] [SETS]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/dev-env.sh
eval "$(scripts/dev-env.sh --print-env)"
export NISSHI_BIN
cargo build --release --bins -q
cargo run --release -q -p tests --example bench_pipeline -- "$@"
