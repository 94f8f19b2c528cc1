#!/usr/bin/env bash
# Installs what the tests and the local pipeline need, outside the repository:
#   - redis-server and redis-cli from Debian's packages (7.0; redis-server also runs the
#     Sentinels of the Sentinel tests, with --sentinel);
#   - nutcracker (twemproxy) from Debian's packages, the proxy without transactions;
#   - the Kafka-protocol broker nisshi 0.8.1 (crates.io), built with the nightly toolchain into a
#     cache directory so later runs reuse it.
#   - the Compose specification's JSON schema, taken from the docker-compose 1.29.2 wheel on PyPI,
#     for the test that validates compose/compose.yaml.
# Idempotent: when everything is present it only checks versions and exits in well under a second.
# Prints nothing but progress on stderr; `scripts/dev-env.sh --print-env` prints the variables the
# harness reads (NISSHI_BIN).
set -euo pipefail

CACHE_DIR="${REDIS_REPL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/redis-repl}"
NISSHI_VERSION="0.8.1"
NISSHI_ROOT="$CACHE_DIR/nisshi-$NISSHI_VERSION"
NISSHI_BIN="$NISSHI_ROOT/bin/nisshi"

log() { echo "dev-env: $*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

install_redis() {
  if command -v redis-server >/dev/null && command -v redis-cli >/dev/null; then
    return
  fi
  log "installing redis-server and redis-tools from Debian packages"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq >&2
  as_root apt-get install -y -qq --no-install-recommends redis-server redis-tools >&2
  # The package may start a system instance on 6379; the tests never use that port.
}

install_build_deps() {
  # rdkafka builds librdkafka from source: it needs make, perl and a C compiler (present), and
  # zlib is vendored by libz-sys when missing.
  # curl: scripts/run-local.sh reads the connectors' /metrics with it.
  if ! command -v make >/dev/null || ! command -v perl >/dev/null || ! command -v curl >/dev/null; then
    log "installing make, perl and curl"
    as_root apt-get update -qq >&2
    as_root apt-get install -y -qq --no-install-recommends make perl curl >&2
  fi
  # librdkafka is built with OpenSSL (TLS and SASL SCRAM to Kafka): headers and pkg-config.
  if ! command -v pkg-config >/dev/null || ! pkg-config --exists openssl; then
    log "installing libssl-dev and pkg-config"
    as_root apt-get update -qq >&2
    as_root apt-get install -y -qq --no-install-recommends libssl-dev pkg-config >&2
  fi
}

install_nutcracker() {
  # twemproxy, a real proxy without transactions, for the tests of redis.transactions = false.
  if command -v nutcracker >/dev/null; then
    return
  fi
  log "installing nutcracker (twemproxy) from Debian packages"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq >&2
  as_root apt-get install -y -qq --no-install-recommends nutcracker >&2
}

install_nisshi() {
  if [ -x "$NISSHI_BIN" ]; then
    return
  fi
  log "building nisshi $NISSHI_VERSION with the nightly toolchain into $NISSHI_ROOT (about 15 min on 2 cores, once)"
  mkdir -p "$NISSHI_ROOT"
  local build_dir
  build_dir="$(mktemp -d)"
  # Run outside the repository so its rust-toolchain.toml does not pin the build to stable.
  (cd "$build_dir" && cargo +nightly install "nisshi@$NISSHI_VERSION" --locked --root "$NISSHI_ROOT.partial" >&2)
  rm -rf "$build_dir"
  mkdir -p "$NISSHI_ROOT/bin"
  mv "$NISSHI_ROOT.partial/bin/nisshi" "$NISSHI_BIN"
  rm -rf "$NISSHI_ROOT.partial"
}

install_compose_schema() {
  local schema="$CACHE_DIR/compose-spec.json"
  if [ -s "$schema" ]; then
    return
  fi
  log "fetching the Compose specification schema (docker-compose 1.29.2 wheel, PyPI)"
  mkdir -p "$CACHE_DIR"
  local dir
  dir="$(mktemp -d)"
  python3 -m pip download --quiet --no-deps --dest "$dir" docker-compose==1.29.2 >&2
  python3 - "$dir"/docker_compose-1.29.2-py2.py3-none-any.whl "$schema.partial" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    data = wheel.read("compose/config/compose_spec.json")
open(sys.argv[2], "wb").write(data)
PY
  mv "$schema.partial" "$schema"
  rm -rf "$dir"
}

install_build_deps
install_redis
install_nutcracker
install_nisshi
install_compose_schema

if [ "${1:-}" = "--print-env" ]; then
  echo "export NISSHI_BIN=$NISSHI_BIN"
fi
