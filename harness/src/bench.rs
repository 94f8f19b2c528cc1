//! Helpers of the benchmark examples (`tests/examples/bench_*.rs`): a process's memory and CPU
//! time from `/proc`, and `redis-benchmark` as the reference writer.

use std::process::Command;

/// `machine: N cores, redis-server <version>`: the first line of every benchmark's output.
pub fn machine() -> anyhow::Result<String> {
    let version = Command::new(crate::redis::server_bin())
        .arg("--version")
        .output()?
        .stdout;
    Ok(format!(
        "machine: {} cores, {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        String::from_utf8_lossy(&version).trim()
    ))
}

/// A memory field of `/proc/PID/status` (`VmRSS`, `VmHWM`, …), in kB; `None` once the process is
/// gone.
pub fn status_kb(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Resident set size of a process, in MB (0 once it is gone).
pub fn rss_mb(pid: u32) -> u64 {
    status_kb(pid, "VmRSS").unwrap_or(0) / 1024
}

/// utime + stime of a process, in seconds (0 once it is gone).
pub fn cpu_seconds(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name, which is in parentheses.
            let rest = s.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        })
        .unwrap_or(0.0)
}

/// `redis-benchmark -t set -n SETS -P PIPELINE -r 100000` against `port`: SET/s.
pub fn redis_benchmark_set(port: u16, sets: u64, pipeline: u32) -> anyhow::Result<f64> {
    let out = Command::new("redis-benchmark")
        .args([
            "-p",
            &port.to_string(),
            "-t",
            "set",
            "-n",
            &sets.to_string(),
        ])
        .args(["-P", &pipeline.to_string(), "-r", "100000", "-q"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .find(|w| w[1] == "requests")
        .and_then(|w| w[0].parse().ok())
        .ok_or_else(|| anyhow::anyhow!("cannot read redis-benchmark output: {text}"))
}

/// `Some` once a source connector's snapshot is acknowledged by Kafka and checkpointed after it.
pub fn snapshot_acknowledged(source: &crate::connector::Connector) -> Option<()> {
    let done = source.metric("source_snapshot_progress_ratio", &[])? >= 1.0;
    let checkpointed = source.metric("source_checkpoints_total", &[])? >= 2.0;
    (done && checkpointed).then_some(())
}

/// A source connector with default options replicating `source` into `topic` on `broker`.
pub fn start_source(
    source: &crate::redis::RedisServer,
    broker: &crate::broker::Broker,
    topic: &str,
) -> anyhow::Result<crate::connector::Connector> {
    let config = crate::pipeline::source_config(
        &source.url(),
        &broker.bootstrap(),
        topic,
        &crate::pipeline::Options::default(),
    );
    crate::connector::Connector::start(crate::connector::Kind::Source, &config, &[])
}

/// Waits until a source connector has Kafka's acknowledgement up to replication offset `offset`.
pub fn wait_acked(source: &crate::connector::Connector, offset: f64) -> anyhow::Result<()> {
    crate::wait_for(
        "the writes to be in Kafka",
        std::time::Duration::from_secs(600),
        || {
            source
                .metric("source_offset_acked", &[])
                .is_some_and(|o| o >= offset)
                .then_some(())
        },
    )
}
