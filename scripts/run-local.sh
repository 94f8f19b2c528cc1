#!/usr/bin/env bash
# Runs the whole pipeline locally on 127.0.0.1: a source redis-server with sample data of every
# type and a light live workload, the Kafka-protocol broker, a target redis-server (noeviction),
# and both connectors. Shows progress until Ctrl-C, which stops everything it started.
#
#   scripts/run-local.sh                     everything local
#   scripts/run-local.sh --source URL        replicate your own source instead (no sample data)
#   scripts/run-local.sh --target URL        apply to your own target instead
#   scripts/run-local.sh --partitions N      topic partitions (default 4)
set -euo pipefail
cd "$(dirname "$0")/.."

SOURCE_URL=""
TARGET_URL=""
PARTITIONS=4
while [ $# -gt 0 ]; do
  case "$1" in
    --source) SOURCE_URL="$2"; shift 2 ;;
    --target) TARGET_URL="$2"; shift 2 ;;
    --partitions) PARTITIONS="$2"; shift 2 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) echo "unknown option $1 (try --help)" >&2; exit 2 ;;
  esac
done

scripts/dev-env.sh
eval "$(scripts/dev-env.sh --print-env)"
echo "building the connectors..."
cargo build --bins -q

SOURCE_PORT="${SOURCE_PORT:-16379}"
TARGET_PORT="${TARGET_PORT:-16380}"
BROKER_PORT="${BROKER_PORT:-19092}"
SOURCE_METRICS="${SOURCE_METRICS:-127.0.0.1:19101}"
SINK_METRICS="${SINK_METRICS:-127.0.0.1:19102}"
TOPIC="${TOPIC:-redis-repl-local}"
RUN_DIR="$(mktemp -d -t redis-repl-run-XXXXXX)"
pids=()

cleanup() {
  trap - EXIT INT TERM
  echo
  echo "stopping..."
  # Newest first: the workload and the connectors stop while the broker and Redis still answer
  # (a consumer leaving its group needs the broker); then the servers. Anything still running
  # after 20 s is killed.
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    p="${pids[$i]}"
    kill "$p" 2>/dev/null || continue
    for _ in $(seq 1 200); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$p" 2>/dev/null || true
  done
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

if [ -z "$SOURCE_URL" ]; then
  start_redis source "$SOURCE_PORT" --enable-debug-command local
  SOURCE_URL="redis://127.0.0.1:$SOURCE_PORT"
  echo "loading sample data of every type into the source..."
  redis-cli -p "$SOURCE_PORT" >/dev/null <<'CMDS'
SET sample:string hello
SET sample:ttl v EX 3600
RPUSH sample:list a b c
SADD sample:set x y z
ZADD sample:zset 1 one 2 two
HSET sample:hash f1 v1 f2 v2
XADD sample:stream 1-1 field value
XGROUP CREATE sample:stream group 0
SELECT 1
SET sample:db1 "in db 1"
CMDS
  redis-cli -p "$SOURCE_PORT" DEBUG POPULATE 100000 sample:bulk 100 >/dev/null
  LOCAL_SOURCE=1
fi
if [ -z "$TARGET_URL" ]; then
  start_redis target "$TARGET_PORT" --maxmemory 1gb --maxmemory-policy noeviction
  TARGET_URL="redis://127.0.0.1:$TARGET_PORT"
fi

mkdir -p "$RUN_DIR/broker"
(cd "$RUN_DIR/broker" && exec "$NISSHI_BIN" broker --listener-url "tcp://127.0.0.1:$BROKER_PORT" \
  --advertised-listener-url "tcp://127.0.0.1:$BROKER_PORT" --storage-engine sqlite://broker.db) \
  >"$RUN_DIR/broker.log" 2>&1 &
pids+=($!)
sleep 1

cat >"$RUN_DIR/source.toml" <<TOML
[redis]
url = "$SOURCE_URL"
shard_name = "local"

[kafka]
bootstrap_servers = "127.0.0.1:$BROKER_PORT"
topic = "$TOPIC"
partitions = $PARTITIONS

[metrics]
listen = "$SOURCE_METRICS"
TOML
cat >"$RUN_DIR/sink.toml" <<TOML
[redis]
url = "$TARGET_URL"

[kafka]
bootstrap_servers = "127.0.0.1:$BROKER_PORT"
topic = "$TOPIC"
group_id = "redis-repl-local"

[metrics]
listen = "$SINK_METRICS"
TOML

target/debug/source-connector run --config "$RUN_DIR/source.toml" >"$RUN_DIR/source-connector.log" 2>&1 &
pids+=($!)
target/debug/sink-connector run --config "$RUN_DIR/sink.toml" >"$RUN_DIR/sink-connector.log" 2>&1 &
pids+=($!)

if [ -n "${LOCAL_SOURCE:-}" ]; then
  # A light live workload: counters, lists and a stream, 20 writes a second.
  ( i=0; while sleep 0.05; do
      i=$((i+1))
      redis-cli -p "$SOURCE_PORT" INCR live:counter >/dev/null 2>&1
      redis-cli -p "$SOURCE_PORT" RPUSH live:list "$i" >/dev/null 2>&1
      [ $((i % 10)) -eq 0 ] && redis-cli -p "$SOURCE_PORT" XADD live:stream '*' n "$i" >/dev/null 2>&1
    done ) &
  pids+=($!)
fi

cat <<INFO
source redis      $(echo "$SOURCE_URL" | sed -E 's#://([^:@/]*):[^@]*@#://\1:***@#')
target redis      $(echo "$TARGET_URL" | sed -E 's#://([^:@/]*):[^@]*@#://\1:***@#')
broker            127.0.0.1:$BROKER_PORT, topic $TOPIC ($PARTITIONS partitions)
metrics           http://$SOURCE_METRICS/metrics   http://$SINK_METRICS/metrics
health            http://$SOURCE_METRICS/health    http://$SINK_METRICS/health
logs              $RUN_DIR
compare           target/debug/sink-connector verify --config $RUN_DIR/sink.toml --source $(echo "$SOURCE_URL" | sed -E 's#://([^:@/]*):[^@]*@#://\1:***@#')   (checkpoint keys excluded)
Press Ctrl-C to stop.
INFO

metric() { # url name -> sum of samples
  curl -s "http://$1/metrics" 2>/dev/null | awk -v n="$2" '$1 ~ "^"n"({|$)" {s+=$NF} END {if (s=="") s=0; printf "%.0f", s}'
}
metric_max() {
  curl -s "http://$1/metrics" 2>/dev/null | awk -v n="$2" '$1 ~ "^"n"({|$)" {if ($NF>m) m=$NF} END {printf "%.2f", m+0}'
}
prev_applied=0
while sleep 2; do
  snap=$(curl -s "http://$SOURCE_METRICS/metrics" 2>/dev/null | awk '$1 ~ /^source_snapshot_progress_ratio/ {printf "%.0f", $NF*100}')
  acked=$(metric "$SOURCE_METRICS" source_offset_acked)
  applied=$(metric "$SINK_METRICS" sink_commands_applied_total)
  lag=$(metric_max "$SINK_METRICS" sink_lag_seconds)
  stalled=$(metric "$SINK_METRICS" sink_lane_stalled)
  ops=$(( (applied - prev_applied) / 2 ))
  prev_applied=$applied
  printf '%s snapshot %s%%  source acked offset %s  sink: %s ops/s, lag %ss, stalled lanes %s\n' \
    "$(date +%H:%M:%S)" "${snap:-0}" "$acked" "$ops" "$lag" "$stalled"
done
