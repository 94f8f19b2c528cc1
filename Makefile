# Command index. Each target is one line so it reads as a list of what you can do.
.PHONY: env build test e2e bench bench-pipeline bench-mixed fuzz soak campaign reliability lint fmt schema run

env:    ## install redis-server and the test broker (idempotent)
	scripts/dev-env.sh
build:  ## build everything
	cargo build --workspace --all-targets
test:   ## every test, as CI runs it
	scripts/test.sh
e2e:    ## whole-pipeline scenarios only (builds the connector binaries first)
	cargo build --bins && cargo test -p tests
bench:  ## decoder benchmark script (figures go to docs/benchmarks.md)
	scripts/bench-rdb.sh
bench-pipeline: ## snapshot and apply against a native replica and redis-benchmark
	scripts/bench-pipeline.sh
bench-mixed: ## a mixed dataset and write bursts, timed until the target holds them, beside a native replica
	scripts/bench-mixed.sh
soak:   ## 10 minutes of mixed workload with random faults, then an exact comparison
	scripts/soak.sh 10
campaign: ## 30 minutes of randomized overlapping faults with a history checker (SEED=... to replay, TARGET=cluster)
	scripts/campaign.sh 30 $(or $(SEED),random) $(or $(TARGET),standalone)
reliability: ## the table of docs/reliability.md from the last fault-test runs
	scripts/reliability-report.sh
fuzz:   ## fuzz the rdb and resp decoders (needs cargo-fuzz and nightly)
	cd source-connector && mkdir -p fuzz/corpus/rdb fuzz/corpus/resp && \
	  cargo +nightly fuzz run -s none rdb fuzz/corpus/rdb fuzz/seeds/rdb -- -runs=10000000 && \
	  cargo +nightly fuzz run -s none resp fuzz/corpus/resp fuzz/seeds/resp -- -runs=10000000
lint:   ## formatting and clippy, as CI checks them
	cargo fmt --all -- --check && cargo clippy --workspace --all-targets -- -D warnings
fmt:
	cargo fmt --all
schema: ## refresh the committed descriptor set after adding fields
	cargo run -q -p proto --example write_descriptor -- schemas/redis_repl_v1.binpb
run:    ## the local pipeline
	scripts/run-local.sh
