//! Pipeline benchmarks, each side by side with a reference measured in the same run:
//!
//! 1. snapshot: a native `redis-server` replica's full sync of the same dataset, versus the
//!    source connector's time from PSYNC to every snapshot record acknowledged by the broker;
//!    then, incremental: while `redis-benchmark -P 16 -t set` writes into the source as fast as
//!    it can, how far the acknowledged offset falls behind `master_repl_offset`, and the share of
//!    what was written that Kafka had acknowledged when the writer finished;
//! 2. apply: `redis-benchmark -t set -P 64` straight against a target, versus the sink applying
//!    the same SETs from the topic (source → source-connector → broker → sink-connector → target).
//!
//! Run: `cargo run --release -p tests --example bench_pipeline -- [KEYS] [SETS]`
//! (scripts/bench-pipeline.sh builds the connectors in release mode first).

use harness::bench::{redis_benchmark_set, rss_mb};
use harness::broker::{random_topic, Broker, Storage};
use harness::connector::{Connector, Kind};
use harness::pipeline::{sink_config, Options};
use harness::redis::{RedisConfig, RedisServer};
use std::time::{Duration, Instant};

fn info_u64(r: &RedisServer, section: &str, field: &str) -> u64 {
    r.info_field(section, field)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let keys: u64 = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let sets: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(500_000);
    println!("{}", harness::bench::machine()?);

    // ---- 1. snapshot ----
    let source = RedisServer::start(RedisConfig::default().with("enable-debug-command", "yes"))?;
    source.cmd::<()>(&["DEBUG", "POPULATE", &keys.to_string(), "key", "100"])?;
    let used = source
        .info_field("memory", "used_memory_human")
        .unwrap_or_default();
    println!("\nsnapshot: {keys} keys of 100 bytes (source used_memory {used})");

    let started = Instant::now();
    let replica = RedisServer::start(
        RedisConfig::default().with("replicaof", &format!("127.0.0.1 {}", source.port())),
    )?;
    harness::wait_for(
        "the native replica to sync",
        Duration::from_secs(600),
        || {
            (replica
                .info_field("replication", "master_link_status")
                .as_deref()
                == Some("up")
                && info_u64(&replica, "replication", "master_sync_in_progress") == 0)
                .then_some(())
        },
    )?;
    let native = started.elapsed();
    println!(
        "  native replica full sync:            {:>8.2} s",
        native.as_secs_f64()
    );
    drop(replica);

    let broker = Broker::start(Storage::Memory)?;
    let topic = random_topic("bench");
    let options = Options::default();
    let started = Instant::now();
    let mut connector = harness::bench::start_source(&source, &broker, &topic)?;
    let pid = connector.process().pid().unwrap_or(0);
    let mut max_rss = 0;
    harness::wait_for(
        "the snapshot to be acknowledged",
        Duration::from_secs(1200),
        || {
            max_rss = max_rss.max(rss_mb(pid));
            harness::bench::snapshot_acknowledged(&connector)
        },
    )?;
    let ours = started.elapsed();
    println!(
        "  source-connector to all acknowledged: {:>8.2} s  (ratio {:.2}, max RSS {max_rss} MB)",
        ours.as_secs_f64(),
        ours.as_secs_f64() / native.as_secs_f64()
    );

    // ---- 1, continued. incremental: redis-benchmark -P 16 writing into the source as fast as it can ----
    // The replication stream's bytes stand for commands (every SET has the same size).
    let start_offset = source_offset(&source);
    let port = source.port();
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || done.send(redis_benchmark_set(port, sets, 16)));
    let mut max_behind = 0.0f64;
    let acked = || connector.metric("source_offset_acked", &[]).unwrap_or(0.0);
    // Sampled every 50 ms until the writer finishes.
    let writer_rps = loop {
        match finished.recv_timeout(Duration::from_millis(50)) {
            Ok(result) => break result?,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                max_behind = max_behind.max(source_offset(&source) - acked());
            }
            Err(e) => anyhow::bail!("redis-benchmark thread: {e}"),
        }
    };
    let written = source_offset(&source) - start_offset;
    let captured = acked() - start_offset;
    println!(
        "\nincremental: {sets} SETs by redis-benchmark -P 16 at {writer_rps:.0} SET/s; when it finished, {:.3} of the written replication stream was acknowledged by Kafka; the acked offset was at most {:.1} MB behind master_repl_offset",
        captured / written,
        max_behind / 1e6
    );
    connector.stop();
    drop(connector);
    drop(broker);
    drop(source);

    // ---- 2. apply ----
    println!("\napply: {sets} SETs, 100k distinct keys, 3-byte values");
    let target = RedisServer::start(RedisConfig::default().with("maxmemory-policy", "noeviction"))?;
    let bench = |port: u16| redis_benchmark_set(port, sets, 64);
    let reference = bench(target.port())?;
    println!("  redis-benchmark -P 64 on the target:  {reference:>10.0} SET/s");
    target.cmd::<()>(&["FLUSHALL"])?;

    let source = RedisServer::start(RedisConfig::default())?;
    let broker = Broker::start(Storage::Memory)?;
    let topic = random_topic("bench");
    let source_connector = harness::bench::start_source(&source, &broker, &topic)?;
    let mut sink = Connector::start(
        Kind::Sink,
        &sink_config(&target.url(), &broker.bootstrap(), &topic, &options),
        &[],
    )?;
    // Wait until the sink is applying (snapshot markers applied).
    source.cmd::<()>(&["SET", "ready", "1"])?;
    harness::wait_for("the pipeline to run", Duration::from_secs(60), || {
        target
            .cmd::<Option<String>>(&["GET", "ready"])
            .ok()
            .flatten()
    })?;
    let sink_pid = sink.process().pid().unwrap_or(0);
    let processes = [
        ("source redis", source.pid()),
        ("source-connector", source_connector.pid()),
        ("broker", broker.pid()),
        ("sink-connector", sink_pid),
        ("target redis", target.pid()),
    ];

    // 2a. End-to-end latency at a steady 20k writes/s (the figure).
    paced_latency(&source, &target, &sink, "the sink's defaults")?;

    // 2b. Throughput through the whole pipeline.
    let before = sink
        .metric("sink_commands_applied_total", &[])
        .unwrap_or(0.0);
    let cpu_before = cpu_seconds(&processes);
    let started = Instant::now();
    let source_rps = bench(source.port())?;
    let mut max_sink_rss = 0;
    // Which stage is the bottleneck: when Kafka had acknowledged everything the source wrote,
    // and when the target had applied it.
    let written = source_offset(&source);
    let mut published_at = None;
    harness::wait_for(
        "the sink to apply every SET",
        Duration::from_secs(600),
        || {
            max_sink_rss = max_sink_rss.max(rss_mb(sink_pid));
            if published_at.is_none()
                && source_connector
                    .metric("source_offset_acked", &[])
                    .is_some_and(|o| o >= written)
            {
                published_at = Some(started.elapsed());
            }
            let applied = sink.metric("sink_commands_applied_total", &[])? - before;
            (applied >= sets as f64).then_some(())
        },
    )?;
    let elapsed = started.elapsed();
    let cpu = cpu_seconds(&processes)
        .iter()
        .zip(&cpu_before)
        .map(|(a, b)| a - b)
        .collect::<Vec<_>>();
    if let Some(at) = published_at {
        println!(
            "  source connector: every SET durable in Kafka after {:.2} s ({:.0} SET/s)",
            at.as_secs_f64(),
            sets as f64 / at.as_secs_f64()
        );
    }
    let ours = sets as f64 / elapsed.as_secs_f64();
    println!("  (source written at {source_rps:.0} SET/s by the same redis-benchmark)");
    println!(
        "  through the pipeline, applied:       {ours:>10.0} SET/s  (ratio {:.2}; {:.2} s for all; sink max RSS {max_sink_rss} MB)",
        ours / reference,
        elapsed.as_secs_f64()
    );
    println!(
        "  CPU seconds during the burst (2 cores, {:.2} s wall): {}",
        elapsed.as_secs_f64(),
        processes
            .iter()
            .zip(&cpu)
            .map(|((name, _), s)| format!("{name} {s:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // 2c. The sink alone: stopped while the source connector publishes the burst, then
    // restarted; its rate is taken from its first applied record to its last.
    sink.stop();
    let written_before = source_offset(&source);
    bench(source.port())?;
    let written = source_offset(&source);
    harness::bench::wait_acked(&source_connector, written)?;
    anyhow::ensure!(
        written > written_before,
        "the burst did not reach the source"
    );
    sink.restart()?;
    let sink_pid = sink.process().pid().unwrap_or(0);
    let mut first: Option<(Instant, f64)> = None;
    let mut max_sink_rss = 0;
    harness::wait_for("the sink to catch up", Duration::from_secs(600), || {
        max_sink_rss = max_sink_rss.max(rss_mb(sink_pid));
        let applied = sink.metric("sink_commands_applied_total", &[])?;
        if applied > 0.0 && first.is_none() {
            first = Some((Instant::now(), applied));
        }
        (applied >= sets as f64).then_some(())
    })?;
    let (t0, a0) = first.expect("set when progress was seen");
    let alone = (sets as f64 - a0) / t0.elapsed().as_secs_f64();
    println!(
        "  sink alone, catching up on the burst: {alone:>10.0} SET/s  (ratio {:.2}; sink max RSS {max_sink_rss} MB)",
        alone / reference
    );

    // 2d. The same latency with the sink fetching with `fetch.wait.max.ms` 10 ms (or
    // `$BENCH_FETCH_WAIT_MS`) instead of its default: the share of the test broker's fetch wait
    // (it reads a partition again only after half the remaining wait; docs/benchmarks.md).
    let wait_ms = std::env::var("BENCH_FETCH_WAIT_MS").unwrap_or_else(|_| "10".into());
    sink.stop();
    let mut config = std::fs::read_to_string(sink.config_path())?;
    config.push_str(&format!(
        "\n[kafka.properties]\n\"fetch.wait.max.ms\" = \"{wait_ms}\"\n"
    ));
    std::fs::write(sink.config_path(), config)?;
    sink.restart()?;
    paced_latency(
        &source,
        &target,
        &sink,
        &format!("fetch.wait.max.ms {wait_ms}"),
    )?;
    drop(source_connector);
    Ok(())
}

/// Writes 100 SETs every 5 ms for 10 s, each batch as one pipeline, and prints the quantiles of
/// their latency, capture to applied, whole and by stage.
fn paced_latency(
    source: &RedisServer,
    target: &RedisServer,
    sink: &Connector,
    setting: &str,
) -> anyhow::Result<()> {
    let latencies = |sink: &Connector| {
        let stage = |s: &str| {
            histogram_counts(
                sink,
                "sink_stage_latency_seconds",
                &format!("stage=\"{s}\""),
            )
        };
        [
            (
                "capture -> applied",
                histogram_counts(sink, "sink_end_to_end_seconds", ""),
            ),
            ("  of which source", stage("source")),
            ("  of which kafka", stage("kafka")),
            ("  of which sink", stage("sink")),
        ]
    };
    // Each run's values are its own, so that its last write is told apart from an earlier run's.
    let run = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let value = |n: u64| format!("{n}/{run}");
    // Measure only once the sink applies (a restarted one first rejoins its group).
    source.cmd::<()>(&["SET", "paced:ready", &value(0)])?;
    harness::wait_for("the sink to apply", Duration::from_secs(60), || {
        target
            .cmd::<Option<String>>(&["GET", "paced:ready"])
            .ok()
            .flatten()
            .filter(|v| *v == value(0))
    })?;
    let before = latencies(sink);
    let mut conn = source.conn();
    let paced = Instant::now();
    let mut sent = 0u64;
    while paced.elapsed() < Duration::from_secs(10) {
        let due = (paced.elapsed().as_millis() as u64 / 5 + 1) * 100;
        let mut pipe = redis::pipe();
        while sent < due {
            pipe.cmd("SET")
                .arg(format!("paced:{}", sent % 100_000))
                .arg(value(sent))
                .ignore();
            sent += 1;
        }
        pipe.query::<()>(&mut conn)?;
        std::thread::sleep(
            Duration::from_millis(5).saturating_sub(Duration::from_micros(
                paced.elapsed().as_micros() as u64 % 5000,
            )),
        );
    }
    let rate = sent as f64 / paced.elapsed().as_secs_f64();
    harness::wait_for(
        "the paced writes to be applied",
        Duration::from_secs(60),
        || {
            target
                .cmd::<Option<String>>(&["GET", &format!("paced:{}", (sent - 1) % 100_000)])
                .ok()
                .flatten()
                .filter(|v| *v == value(sent - 1))
        },
    )?;
    println!("  latency at {rate:.0} writes/s for 10 s, {setting} (upper bounds of the quantiles' buckets):");
    for ((what, before), (_, after)) in before.iter().zip(latencies(sink)) {
        let delta = histogram_delta(before, &after);
        println!(
            "    {what}: p50 <= {}, p99 <= {}",
            quantile(&delta, 0.5),
            quantile(&delta, 0.99)
        );
    }
    Ok(())
}

fn source_offset(source: &RedisServer) -> f64 {
    source.repl_offset().unwrap_or(0.0)
}

/// utime + stime of each process, in seconds.
fn cpu_seconds(processes: &[(&str, u32)]) -> Vec<f64> {
    processes
        .iter()
        .map(|(_, pid)| harness::bench::cpu_seconds(*pid))
        .collect()
}

/// Cumulative bucket counts `(le, count)` of a histogram on a connector's `/metrics`, of the
/// series whose labels include `label` (`stage="sink"`, say; "" for any).
fn histogram_counts(connector: &Connector, name: &str, label: &str) -> Vec<(f64, f64)> {
    let body = connector
        .http_get("/metrics")
        .map(|(_, b)| b)
        .unwrap_or_default();
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for line in body.lines() {
        if let Some(rest) = line
            .strip_prefix(&format!("{name}_bucket{{"))
            .filter(|rest| rest.contains(label))
        {
            let le = rest.split("le=\"").nth(1).and_then(|r| r.split('"').next());
            let v = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
            if let (Some(le), Some(v)) = (le, v) {
                let le = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap_or(0.0)
                };
                buckets.push((le, v));
            }
        }
    }
    buckets
}

fn histogram_delta(before: &[(f64, f64)], after: &[(f64, f64)]) -> Vec<(f64, f64)> {
    after
        .iter()
        .map(|&(le, n)| {
            let was = before.iter().find(|b| b.0 == le).map_or(0.0, |b| b.1);
            (le, n - was)
        })
        .collect()
}

/// The upper bound of the bucket holding quantile `q`.
fn quantile(buckets: &[(f64, f64)], q: f64) -> String {
    let total = buckets.iter().map(|b| b.1).fold(0.0, f64::max);
    buckets
        .iter()
        .find(|(_, c)| *c >= q * total)
        .map(|(le, _)| format!("{} ms", (le * 10_000.0).round() / 10.0))
        .unwrap_or_else(|| "n/a".into())
}
