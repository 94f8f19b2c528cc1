//! Test harness: real processes on 127.0.0.1 with free ports, cleaned up with the test.
//!
//! - [`bench`]: `/proc` readings and `redis-benchmark` for the benchmark examples.
//! - [`process`]: a spawned server that dies with the test (even on panic or kill), keeps its log
//!   and prints it when the test fails; kill -9 and restart helpers.
//! - [`redis`]: a standalone `redis-server` with auth, ACL users, maxmemory, and a binary
//!   override (`REDIS_SERVER_BIN`); a master with a replica.
//! - [`cluster`]: a Redis Cluster of N masters with replicas, with failover and slot migration.
//! - [`broker`]: the Kafka-protocol broker (nisshi) with memory or sqlite storage, and topics.
//! - [`fake_master`]: plays a recorded replication capture from the corpus to a replica.
//! - [`history`]: a workload whose damage shows, the record of what the source acknowledged,
//!   and a checker that classifies each difference (the fault campaign's).
//! - [`dataset`]: reads a deployment (or a corpus JSON) into canonical form and compares two.
//! - [`corpus`]: where `../shared/corpus` is.
//! - [`pipeline`]: source, broker, target and both connectors together, and wait-until-equal.
//! - [`slot_proxy`]: a strict proxy in front of a cluster that takes single-slot transactions
//!   only and no `SELECT` inside them (the rules of managed proxy services).
//! - [`twemproxy`]: Debian's `nutcracker`, a real proxy without transactions.
//! - [`sentinel`]: Redis Sentinels watching a master and its replica.
//! - [`connector`]: the built `source-connector` and `sink-connector` binaries as processes,
//!   with their metrics.

pub mod bench;
pub mod broker;
pub mod cluster;
pub mod connector;
pub mod corpus;
pub mod dataset;
pub mod fake_master;
pub mod history;
pub mod pipeline;
pub mod ports;
pub mod process;
pub mod proxy;
pub mod redis;
pub mod sentinel;
pub mod slot_proxy;
pub mod twemproxy;

use std::time::{Duration, Instant};

/// Polls `f` until it returns `Some`, or fails with `what` after `timeout`.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(10);
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// Where `scripts/dev-env.sh` installs what the tests need: `$REDIS_REPL_CACHE`, else
/// `$XDG_CACHE_HOME/redis-repl`, else `~/.cache/redis-repl`.
pub fn cache_dir() -> std::path::PathBuf {
    use std::path::PathBuf;
    if let Some(dir) = std::env::var_os("REDIS_REPL_CACHE") {
        return dir.into();
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache")
        })
        .join("redis-repl")
}
