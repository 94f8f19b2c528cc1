//! The pipeline measured where its user looks: **on the target**, on a **mixed dataset**, next
//! to a native replica of the same source in the same run (issue 21).
//!
//! 1. Snapshot: the source holds strings, hashes, lists, sorted sets and a few 10 MB strings.
//!    A native replica's full sync (`REPLICAOF` → link up, sync done, loading done) is timed,
//!    then the pipeline's: from the start of `source-connector run` until every lane's
//!    `sink_caught_up_repl_offset` reaches the source's `master_repl_offset`, i.e. the target
//!    holds the snapshot.
//! 2. Incremental: a burst of SETs (`redis-benchmark -t set -P 16 -c 50 -d 100`) into the source,
//!    twice: once with the connectors stopped, timed until the native replica holds its last
//!    offset; once, the pipeline caught up again, timed until every lane's caught-up offset
//!    reaches it (the native replica stays attached: a second replica stream for the source).
//!    Measured one after the other, not at once: at once, the writer sharing the 2 cores with the
//!    pipeline would bound both and hide the difference.
//! 3. The same with a mixed write load: HSET, RPUSH, ZADD, INCR, EXPIRE and DEL.
//!
//! Printed for each phase: both times and their ratio, CPU seconds of every process (and per
//! write for the bursts), and each connector's peak RSS.
//!
//! Run: `scripts/bench-mixed.sh [SCALE] [SETS]` (SCALE 1 is the issue's 2.35M keys, ~850 MB).
//! With `BENCH_PERF=FILE` the sink is recorded by `perf record --call-graph dwarf` into FILE
//! during the pipeline's SET burst: its profile at the head of the stream.

use harness::bench::{cpu_seconds, rss_mb};
use harness::broker::{random_topic, Broker, Storage};
use harness::connector::{Connector, Kind};
use harness::pipeline::{sink_config, source_config, Options};
use harness::redis::{RedisConfig, RedisServer};
use std::process::Command;
use std::time::{Duration, Instant};

const PARTITIONS: u32 = 8;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let scale: f64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(1.0);
    let sets: u64 = args
        .get(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    println!("{}", harness::bench::machine()?);

    // A backlog that holds a burst: the connectors stopped during the native replica's burst
    // continue with PSYNC.
    let source = RedisServer::start(
        RedisConfig::default()
            .with("enable-debug-command", "yes")
            .with("repl-backlog-size", "1gb"),
    )?;
    let keys = populate(&source, scale)?;
    println!(
        "dataset: {keys} keys, used_memory {} (scale {scale})",
        source
            .info_field("memory", "used_memory_human")
            .unwrap_or_default()
    );

    // ---- 1. snapshot ----
    let started = Instant::now();
    let replica = RedisServer::start(
        RedisConfig::default().with("replicaof", &format!("127.0.0.1 {}", source.port())),
    )?;
    poll("the native replica to sync", || {
        let up = replica
            .info_field("replication", "master_link_status")
            .as_deref()
            == Some("up");
        let syncing = info_u64(&replica, "replication", "master_sync_in_progress") != 0;
        let loading = info_u64(&replica, "persistence", "loading") != 0;
        up && !syncing && !loading
    })?;
    let native = started.elapsed();

    // BENCH_STORAGE=sqlite: the broker's on-disk storage instead of its memory one.
    let storage = match std::env::var("BENCH_STORAGE").as_deref() {
        Ok("sqlite") => Storage::Sqlite,
        _ => Storage::Memory,
    };
    let broker = Broker::start(storage)?;
    let topic = random_topic("bench-mixed");
    let options = Options {
        partitions: PARTITIONS,
        ..Options::default()
    };
    let target = RedisServer::start(options.target.clone())?;
    let offset = source.repl_offset()?;
    let cpu_before = [source.pid(), broker.pid(), target.pid()].map(cpu_seconds);
    let started = Instant::now();
    let mut source_connector = Connector::start(
        Kind::Source,
        &source_config(&source.url(), &broker.bootstrap(), &topic, &options),
        &[],
    )?;
    let mut sink = Connector::start(
        Kind::Sink,
        &sink_config(&target.url(), &broker.bootstrap(), &topic, &options),
        &[],
    )?;
    let mut pids = Pids {
        source: source.pid(),
        source_connector: source_connector.pid(),
        broker: broker.pid(),
        sink: sink.pid(),
        target: target.pid(),
    };
    let mut peak = Peak::default();
    // When the source connector had read the whole RDB (and so published all but its last
    // in-flight bytes): the stage after it, the sink and the target, took the rest. (Not
    // `source_offset_acked`: every snapshot record carries the FULLRESYNC offset, so it reaches
    // it with the first one.)
    let mut rdb_read = None;
    // Each second: the CPU each process used in it and the keys the target holds, to see which
    // stage is busy when (the stage split the issue asks for).
    let timeline_pids = [pids.source_connector, pids.broker, pids.sink, pids.target];
    let mut timeline: Vec<(f64, [f64; 4], u64)> = Vec::new();
    let mut last_cpu = [0.0, cpu_before[1], 0.0, cpu_before[2]];
    poll("the target to hold the snapshot", || {
        peak.sample(&pids);
        let t = started.elapsed().as_secs_f64();
        if t >= timeline.len() as f64 + 1.0 {
            let now = timeline_pids.map(cpu_seconds);
            let used = std::array::from_fn(|i| now[i] - last_cpu[i]);
            last_cpu = now;
            let keys = target.cmd::<u64>(&["DBSIZE"]).unwrap_or(0);
            timeline.push((t, used, keys));
        }
        if rdb_read.is_none()
            && source_connector
                .metric("source_snapshot_progress_ratio", &[])
                .is_some_and(|ratio| ratio >= 1.0)
        {
            rdb_read = Some(started.elapsed());
        }
        caught_up(&sink, offset)
    })?;
    let ours = started.elapsed();
    let cpu = [
        cpu_seconds(pids.source) - cpu_before[0],
        cpu_seconds(pids.source_connector),
        cpu_seconds(pids.broker) - cpu_before[1],
        cpu_seconds(pids.sink),
        cpu_seconds(pids.target) - cpu_before[2],
    ];
    println!(
        "\nsnapshot, until the target holds it: native replica {:.2} s, pipeline {:.2} s: ratio {:.2} (goal <= 1.5)",
        native.as_secs_f64(),
        ours.as_secs_f64(),
        ours.as_secs_f64() / native.as_secs_f64()
    );
    if let Some(t) = rdb_read {
        println!(
            "  the source connector had read and published the whole RDB after {:.2} s",
            t.as_secs_f64()
        );
    }
    println!("  CPU s: {}", cpu_line(&cpu));
    println!(
        "  peak RSS: source-connector {} MB, sink-connector {} MB (goal <= 128)",
        peak.source_connector, peak.sink
    );
    println!("  each second: CPU s of source-connector / broker / sink-connector / target redis, keys the target holds");
    for (t, used, keys) in &timeline {
        println!(
            "    {t:5.1} s  {:.2} / {:.2} / {:.2} / {:.2}  {keys}",
            used[0], used[1], used[2], used[3]
        );
    }

    // ---- 2. incremental SETs ----
    let set_args = |n: u64| {
        vec![
            "-t".to_owned(),
            "set".to_owned(),
            "-n".to_owned(),
            n.to_string(),
            "-d".to_owned(),
            "100".to_owned(),
            "-r".to_owned(),
            "1000000".to_owned(),
        ]
    };
    burst(
        &format!("{sets} SETs (redis-benchmark -P 16 -c 50 -d 100)"),
        &source,
        &replica,
        (&mut source_connector, &mut sink),
        &mut pids,
        sets,
        &[set_args(sets)],
        std::env::var("BENCH_PERF").ok(),
    )?;

    // ---- 3. incremental, mixed ----
    let each = sets / 6;
    let command = |words: &[&str]| {
        let mut a = vec!["-n".to_owned(), each.to_string(), "-r".to_owned()];
        a.push("100000".to_owned());
        a.extend(words.iter().map(|w| (*w).to_owned()));
        a
    };
    burst(
        &format!("{} mixed writes (HSET, RPUSH, ZADD, INCR, EXPIRE, DEL; {each} of each, redis-benchmark -P 16 -c 50)", each * 6),
        &source,
        &replica,
        (&mut source_connector, &mut sink),
        &mut pids,
        each * 6,
        &[
            command(&["HSET", "mix:h:__rand_int__", "f:__rand_int__", "value"]),
            command(&["RPUSH", "mix:l:__rand_int__", "element"]),
            command(&["ZADD", "mix:z:__rand_int__", "__rand_int__", "m:__rand_int__"]),
            command(&["INCR", "mix:n:__rand_int__"]),
            command(&["EXPIRE", "mix:h:__rand_int__", "100000"]),
            command(&["DEL", "mix:n:__rand_int__"]),
        ],
        None,
    )?;
    drop(source_connector);
    Ok(())
}

/// Process ids of the pipeline.
struct Pids {
    source: u32,
    source_connector: u32,
    broker: u32,
    sink: u32,
    target: u32,
}

impl Pids {
    fn all(&self) -> [u32; 5] {
        [
            self.source,
            self.source_connector,
            self.broker,
            self.sink,
            self.target,
        ]
    }
}

#[derive(Default)]
struct Peak {
    source_connector: u64,
    sink: u64,
}

impl Peak {
    fn sample(&mut self, pids: &Pids) {
        self.source_connector = self.source_connector.max(rss_mb(pids.source_connector));
        self.sink = self.sink.max(rss_mb(pids.sink));
    }
}

/// Writes `writes` commands into the source with one or more `redis-benchmark` runs (`-P 16
/// -c 50` and each run's `args`), one after the other: first with the connectors stopped, timed
/// until the native replica holds them; then, once the restarted pipeline has caught up, again,
/// timed until the target holds them. With `perf` the sink is recorded into that file meanwhile.
#[allow(clippy::too_many_arguments)]
fn burst(
    what: &str,
    source: &RedisServer,
    replica: &RedisServer,
    (source_connector, sink): (&mut Connector, &mut Connector),
    pids: &mut Pids,
    writes: u64,
    runs: &[Vec<String>],
    perf: Option<String>,
) -> anyhow::Result<()> {
    // The native replica alone.
    source_connector.stop();
    sink.stop();
    let started = Instant::now();
    write(source.port(), runs)?;
    let end = source.repl_offset()?;
    poll("the native replica to hold the burst", || {
        replica_offset(replica) >= end
    })?;
    let native = started.elapsed();

    // The pipeline, caught up again first.
    source_connector.restart()?;
    sink.restart()?;
    pids.source_connector = source_connector.pid();
    pids.sink = sink.pid();
    poll("the pipeline to catch up", || caught_up(sink, end))?;
    let cpu_before = pids.all().map(cpu_seconds);
    let perf = perf
        .map(|file| {
            Command::new("perf")
                .args(["record", "-F", "499", "--call-graph", "dwarf,16384", "-o"])
                .arg(&file)
                .args(["-p", &pids.sink.to_string()])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
        })
        .transpose()?;
    let mut peak = Peak::default();
    let port = source.port();
    let runs = runs.to_vec();
    let started = Instant::now();
    let writer = std::thread::spawn(move || write(port, &runs));
    let mut end: Option<f64> = None;
    poll("the target to hold the burst", || {
        peak.sample(pids);
        if end.is_none() && writer.is_finished() {
            end = source.repl_offset().ok();
        }
        end.is_some_and(|end| caught_up(sink, end))
    })?;
    let ours = started.elapsed();
    if let Some(mut p) = perf {
        Command::new("kill")
            .args(["-INT", &p.id().to_string()])
            .status()?;
        p.wait()?;
    }
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("the writer panicked"))??;
    let cpu: Vec<f64> = pids
        .all()
        .map(cpu_seconds)
        .iter()
        .zip(cpu_before)
        .map(|(a, b)| a - b)
        .collect();
    let rate = |d: Duration| writes as f64 / d.as_secs_f64();
    println!("\nincremental: {what}");
    println!(
        "  held after: native replica {:.2} s ({:.0}/s), target through the pipeline {:.2} s ({:.0}/s): ratio {:.2} (goal >= 0.8)",
        native.as_secs_f64(),
        rate(native),
        ours.as_secs_f64(),
        rate(ours),
        rate(ours) / rate(native)
    );
    println!("  CPU s during the pipeline's burst: {}", cpu_line(&cpu));
    let per_write = |s: f64| s / writes as f64 * 1e6;
    println!(
        "  CPU per write: source redis {:.2} µs, source-connector {:.2} µs ({:.2} of source redis), sink-connector {:.2} µs ({:.2}), target redis {:.2} µs (goal: each connector <= 0.5 of source redis)",
        per_write(cpu[0]),
        per_write(cpu[1]),
        cpu[1] / cpu[0],
        per_write(cpu[3]),
        cpu[3] / cpu[0],
        per_write(cpu[4])
    );
    println!(
        "  peak RSS: source-connector {} MB, sink-connector {} MB (goal <= 128)",
        peak.source_connector, peak.sink
    );
    Ok(())
}

/// Runs `redis-benchmark -P 16 -c 50 -q` with each of `runs`' arguments against `port`, one after
/// the other.
fn write(port: u16, runs: &[Vec<String>]) -> anyhow::Result<()> {
    for args in runs {
        let out = Command::new("redis-benchmark")
            .args(["-p", &port.to_string(), "-P", "16", "-c", "50", "-q"])
            .args(args)
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "redis-benchmark {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn cpu_line(cpu: &[f64]) -> String {
    [
        "source redis",
        "source-connector",
        "broker",
        "sink-connector",
        "target redis",
    ]
    .iter()
    .zip(cpu)
    .map(|(name, s)| format!("{name} {s:.2}"))
    .collect::<Vec<_>>()
    .join(", ")
}

/// Whether every lane has applied everything of the source up to replication offset `offset`.
fn caught_up(sink: &Connector, offset: f64) -> bool {
    let Some((_, body)) = sink.http_get("/metrics") else {
        return false;
    };
    (0..PARTITIONS).all(|p| {
        let p = p.to_string();
        harness::connector::parse_metric(
            &body,
            "sink_caught_up_repl_offset",
            &[("partition", p.as_str())],
        )
        .is_some_and(|o| o >= offset)
    })
}

/// The replication offset a replica has processed.
fn replica_offset(replica: &RedisServer) -> f64 {
    replica
        .info_field("replication", "slave_repl_offset")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn info_u64(r: &RedisServer, section: &str, field: &str) -> u64 {
    r.info_field(section, field)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Polls `done` every 20 ms (a timing resolution well below the phases measured), for at most
/// 30 minutes.
fn poll(what: &str, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(1800);
    while !done() {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The issue's mixed dataset, times `scale`: 2M strings of 100 B, 200k hashes of 20 fields,
/// 100k lists of 50 elements, 50k sorted sets of 50 members and 10 strings of 10 MB. Returns
/// the number of keys.
fn populate(source: &RedisServer, scale: f64) -> anyhow::Result<u64> {
    let n = |count: f64| (count * scale).round().max(1.0) as u64;
    source.cmd::<()>(&["DEBUG", "POPULATE", &n(2e6).to_string(), "str", "100"])?;
    // Server-side loops, 10k keys per script call.
    let fill = |script: &str, count: u64| -> anyhow::Result<()> {
        let mut from = 1;
        while from <= count {
            let to = (from + 9_999).min(count);
            source.cmd::<()>(&["EVAL", script, "0", &from.to_string(), &to.to_string()])?;
            from = to + 1;
        }
        Ok(())
    };
    fill(
        "for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do local a = {} for f = 1, 20 do a[#a+1] = 'field:' .. f a[#a+1] = 'value-' .. i .. '-' .. f end redis.call('HSET', 'hash:' .. i, unpack(a)) end",
        n(2e5),
    )?;
    fill(
        "for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do local a = {} for e = 1, 50 do a[#a+1] = 'element-' .. e end redis.call('RPUSH', 'list:' .. i, unpack(a)) end",
        n(1e5),
    )?;
    fill(
        "for i = tonumber(ARGV[1]), tonumber(ARGV[2]) do local a = {} for m = 1, 50 do a[#a+1] = m * 1.5 a[#a+1] = 'member-' .. m end redis.call('ZADD', 'zset:' .. i, unpack(a)) end",
        n(5e4),
    )?;
    for i in 0..10 {
        source.cmd::<()>(&["SETRANGE", &format!("big:{i}"), "10485759", "x"])?;
    }
    let keys: u64 = source.cmd(&["DBSIZE"])?;
    Ok(keys)
}
