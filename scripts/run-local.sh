#!/usr/bin/env bash
# Runs the pipeline locally on 127.0.0.1: a source redis-server, the Kafka-protocol broker and a
# target redis-server (noeviction), with sample data in the source.
# Ctrl-C stops everything it started.
#
# The connectors are added to this script as they land (see the issues); until then it starts the
# services and tells you where they are.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/dev-env.sh
eval "$(scripts/dev-env.sh --print-env)"

SOURCE_PORT="${SOURCE_PORT:-16379}"
TARGET_PORT="${TARGET_PORT:-16380}"
BROKER_PORT="${BROKER_PORT:-19092}"
RUN_DIR="$(mktemp -d -t redis-repl-run-XXXXXX)"
pids=()

cleanup() {
  trap - EXIT INT TERM
  echo
  echo "stopping..."
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "stopped; logs are in $RUN_DIR"
}
trap cleanup EXIT INT TERM

start_redis() { # name port extra-args...
  local name=$1 port=$2; shift 2
  mkdir -p "$RUN_DIR/$name"
  redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$RUN_DIR/$name" \
    --repl-diskless-sync-delay 0 "$@" >"$RUN_DIR/$name.log" 2>&1 &
  pids+=($!)
  for _ in $(seq 100); do redis-cli -p "$port" ping >/dev/null 2>&1 && return; sleep 0.1; done
  echo "redis $name did not start; see $RUN_DIR/$name.log" >&2; exit 1
}

start_redis source "$SOURCE_PORT"
start_redis target "$TARGET_PORT" --maxmemory 1gb --maxmemory-policy noeviction

mkdir -p "$RUN_DIR/broker"
(cd "$RUN_DIR/broker" && exec "$NISSHI_BIN" broker --listener-url "tcp://127.0.0.1:$BROKER_PORT" \
  --advertised-listener-url "tcp://127.0.0.1:$BROKER_PORT" --storage-engine memory://nisshi/) \
  >"$RUN_DIR/broker.log" 2>&1 &
pids+=($!)

echo "loading sample data into the source..."
redis-cli -p "$SOURCE_PORT" >/dev/null <<'CMDS'
SET sample:string hello
RPUSH sample:list a b c
SADD sample:set x y z
ZADD sample:zset 1 one 2 two
HSET sample:hash f1 v1 f2 v2
XADD sample:stream 1-1 field value
SET sample:ttl v EX 3600
CMDS

cat <<INFO
source redis   127.0.0.1:$SOURCE_PORT
target redis   127.0.0.1:$TARGET_PORT (maxmemory-policy noeviction)
broker         127.0.0.1:$BROKER_PORT
logs           $RUN_DIR
Press Ctrl-C to stop.
INFO
wait
