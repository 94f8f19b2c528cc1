# Both connectors in one small runtime image (compose/compose.yaml runs it twice).
#   docker build -t redis-repl .
# Build stage: the pinned toolchain (rust-toolchain.toml) and what librdkafka's bundled build needs.
FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake libsasl2-dev libssl-dev zlib1g-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p source-connector -p sink-connector \
 && mkdir -p /out \
 && cp target/release/source-connector target/release/sink-connector /out/ \
 && strip /out/*

# Runtime stage: glibc, CA certificates, an unprivileged user, nothing else.
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl libssl3 \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home redis-repl
COPY --from=build /out/ /usr/local/bin/
USER 10001
# Metrics and health: source 9101, sink 9102 (metrics.listen in the mounted config).
EXPOSE 9101 9102
ENTRYPOINT []
CMD ["source-connector", "--help"]
