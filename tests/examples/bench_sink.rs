//! The sink alone, against `redis-benchmark -P 64 -t set` on the same target in the same run.
//!
//! The source connector publishes a burst of SETs once and is stopped; then the sink applies the
//! whole topic RUNS times, each time into an emptied target under a new consumer group, and its
//! rate is taken from its first applied record to its last. Between the runs the reference is
//! measured again, so every ratio compares figures taken a few seconds apart.
//!
//! Run: `cargo run --release -p tests --example bench_sink -- [SETS] [RUNS]` after
//! `cargo build --release --bins` (a release example runs the connectors of `target/release`).
//! With `BENCH_PERF=FILE` the sink of the last run is recorded by
//! `perf record --call-graph dwarf` into FILE; `BENCH_SINK_PROPERTIES="key=value,…"` passes
//! librdkafka properties to the sink; `BENCH_METRICS=1` prints the sink's histogram sums;
//! `BENCH_LOG=1` prints the sink's log after each run; `BENCH_HOLD=1` keeps the broker and topic
//! at the end, until Enter, for `harness/examples/consume_rate.rs`.

use harness::bench::{cpu_seconds, redis_benchmark_set, rss_mb};
use harness::broker::{random_topic, Broker, Storage};
use harness::connector::{Connector, Kind};
use harness::pipeline::{sink_config, Options};
use harness::redis::{RedisConfig, RedisServer};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let sets: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(500_000);
    let runs: u32 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(3);
    let target = RedisServer::start(RedisConfig::default().with("maxmemory-policy", "noeviction"))?;
    let source = RedisServer::start(RedisConfig::default())?;
    let broker = Broker::start(Storage::Memory)?;
    let topic = random_topic("bench");
    let options = Options::default();
    let mut source_connector = harness::bench::start_source(&source, &broker, &topic)?;
    // Streaming before the burst: its SETs are commands on the topic, not snapshot keys.
    harness::wait_for(
        "the snapshot to be acknowledged",
        Duration::from_secs(60),
        || harness::bench::snapshot_acknowledged(&source_connector),
    )?;
    let publishers = [source.pid(), source_connector.pid(), broker.pid()];
    let before = cpu_of(&publishers);
    redis_benchmark_set(source.port(), sets, 64)?;
    let written = source.repl_offset()?;
    harness::bench::wait_acked(&source_connector, written)?;
    let used: Vec<f64> = cpu_of(&publishers)
        .iter()
        .zip(&before)
        .map(|(after, before)| (after - before) / sets as f64 * 1e6)
        .collect();
    source_connector.stop();
    println!("{sets} SETs (100k distinct keys, 3-byte values) on topic {topic}");
    println!(
        "  publishing them, CPU per SET: source redis {:.2} µs, source connector {:.2} µs, broker {:.2} µs",
        used[0], used[1], used[2]
    );

    let mut ratios = Vec::new();
    for run in 1..=runs {
        let reference = redis_benchmark_set(target.port(), sets, 64)?;
        target.cmd::<()>(&["FLUSHALL"])?;
        let mut config = sink_config(&target.url(), &broker.bootstrap(), &topic, &options)
            .replace(&format!("sink-{topic}"), &format!("sink-{topic}-{run}"));
        // BENCH_SINK_PROPERTIES="key=value,…": librdkafka properties for the sink.
        if let Ok(props) = std::env::var("BENCH_SINK_PROPERTIES") {
            config.push_str("\n[kafka.properties]\n");
            for (k, v) in props.split(',').filter_map(|kv| kv.split_once('=')) {
                config.push_str(&format!("\"{k}\" = \"{v}\"\n"));
            }
        }
        let sink = Connector::start(Kind::Sink, &config, &[])?;
        let pid = sink.pid();
        let perf = (run == runs)
            .then(|| std::env::var("BENCH_PERF").ok())
            .flatten()
            .map(|file| {
                Command::new("perf")
                    .args(["record", "-F", "499", "--call-graph", "dwarf,16384", "-o"])
                    .arg(&file)
                    .args(["-p", &pid.to_string()])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
            })
            .transpose()?;
        let mut first: Option<(Instant, f64, Vec<f64>)> = None;
        let mut max_rss = 0;
        harness::wait_for(
            "the sink to apply the burst",
            Duration::from_secs(600),
            || {
                max_rss = max_rss.max(rss_mb(pid));
                let applied = sink.metric("sink_commands_applied_total", &[])?;
                if applied > 0.0 && first.is_none() {
                    first = Some((
                        Instant::now(),
                        applied,
                        cpu_of(&[pid, broker.pid(), target.pid()]),
                    ));
                }
                (applied >= sets as f64).then_some(())
            },
        )?;
        let (t0, a0, cpu0) = first.expect("set when progress was seen");
        let elapsed = t0.elapsed().as_secs_f64();
        let cpu: Vec<f64> = cpu_of(&[pid, broker.pid(), target.pid()])
            .iter()
            .zip(&cpu0)
            .map(|(a, b)| a - b)
            .collect();
        if let Some(mut p) = perf {
            Command::new("kill")
                .args(["-INT", &p.id().to_string()])
                .status()?;
            p.wait()?;
        }
        // Measured from the first applied record on.
        let measured = sets as f64 - a0;
        let rate = measured / elapsed;
        let per_set = |seconds: f64| seconds * 1e6 / measured;
        println!(
            "run {run}: redis-benchmark -P 64 {reference:>9.0} SET/s; sink {rate:>9.0} SET/s \
             (ratio {:.2}; max RSS {max_rss} MB)\n  CPU per SET: sink {:.2} µs, broker {:.2} µs, target {:.2} µs over {elapsed:.2} s",
            rate / reference,
            per_set(cpu[0]),
            per_set(cpu[1]),
            per_set(cpu[2]),
        );
        if std::env::var_os("BENCH_METRICS").is_some() {
            let body = sink
                .http_get("/metrics")
                .map(|(_, b)| b)
                .unwrap_or_default();
            for line in body
                .lines()
                .filter(|l| l.contains("_sum") || l.contains("_count"))
            {
                println!("  {line}");
            }
        }
        ratios.push(rate / reference);
        if std::env::var_os("BENCH_LOG").is_some() {
            let mut sink = sink;
            sink.stop();
            println!("{}", sink.log());
        }
    }
    if std::env::var_os("BENCH_HOLD").is_some() {
        println!(
            "holding broker {} topic {topic} (for consume_rate); press Enter to end",
            broker.bootstrap()
        );
        std::io::stdin().read_line(&mut String::new())?;
    }
    ratios.sort_by(f64::total_cmp);
    println!("median ratio {:.2}", ratios[ratios.len() / 2]);
    Ok(())
}

/// utime + stime of each process, in seconds.
fn cpu_of(pids: &[u32]) -> Vec<f64> {
    pids.iter().map(|&p| cpu_seconds(p)).collect()
}
