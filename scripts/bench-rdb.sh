#!/usr/bin/env bash
# Decoder benchmark: generates RDB files with a real redis-server, then measures decode
# throughput and peak RSS of the streaming decoder on each. Figures go to docs/benchmarks.md.
#   scripts/bench-rdb.sh [small_keys] [big_string_mb]
# (36000000 small keys make a file of about 1 GB.)
set -euo pipefail
cd "$(dirname "$0")/.."
SMALL_KEYS="${1:-3000000}"
BIG_MB="${2:-1024}"
DATA="target/bench-data"
mkdir -p "$DATA"
PORT=26399

gen() { # name, then redis-cli commands on stdin
  local name=$1 dir
  if [ -f "$DATA/$name.rdb" ]; then cat >/dev/null; return; fi
  dir="$(mktemp -d)"
  redis-server --port $PORT --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" \
    --proto-max-bulk-len 2gb --client-query-buffer-limit 2gb --enable-debug-command yes >/dev/null 2>&1 &
  local pid=$!
  for _ in $(seq 100); do redis-cli -p $PORT ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis-cli -p $PORT >/dev/null
  redis-cli -p $PORT save >/dev/null
  kill $pid; wait $pid 2>/dev/null || true
  mv "$dir/dump.rdb" "$DATA/$name.rdb"
  rm -rf "$dir"
}

echo "generating data (once; cached in $DATA)" >&2
gen "small-keys-$SMALL_KEYS" <<<"DEBUG POPULATE $SMALL_KEYS key 16"
# One big string, written in 64 MB appends (rdbcompression off: incompressible-looking data is
# stored raw anyway; this keeps generation fast).
{
  echo "CONFIG SET rdbcompression no"
  for i in $(seq 1 $((BIG_MB / 64))); do echo "SETRANGE big $(( (i - 1) * 64 * 1024 * 1024 )) x"; echo "SETRANGE big $(( i * 64 * 1024 * 1024 - 1 )) y"; done
} | gen "big-string-${BIG_MB}mb"
gen listpack-hashes <<<"EVAL \"for i=1,200000 do local k='h:'..i for j=1,60 do redis.call('HSET', k, 'field:'..j, 'value-'..j..'-'..i) end end return 1\" 0"

cargo build -q --release -p source-connector --example decode_stats
echo
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
for f in "$DATA/small-keys-$SMALL_KEYS.rdb" "$DATA/big-string-${BIG_MB}mb.rdb" "$DATA/listpack-hashes.rdb"; do
  # Three runs each: on a shared machine the fastest is the one least disturbed.
  for _ in 1 2 3; do
    /usr/bin/time -f "  peak RSS %M KB" target/release/examples/decode_stats "$f" 2>&1
  done
done
