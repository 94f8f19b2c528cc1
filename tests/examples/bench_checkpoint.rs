//! What the sink's checkpoint costs the target (issue 5: "measure the cost and keep it small").
//!
//! The sink writes each batch of records as `MULTI`, the commands, an `HSET` of its checkpoint
//! hash, `EXEC`. This sends the same SETs to one `redis-server` three ways, in batches of the
//! sink's size, and reports the target's CPU per SET (from `/proc`) and the rate for each:
//!
//! 1. plain pipelined SETs (what `redis-benchmark -P` does);
//! 2. each batch in `MULTI/EXEC`;
//! 3. each batch in `MULTI/EXEC` with the checkpoint `HSET` (what the sink sends).
//!
//! Run: `cargo run --release -p tests --example bench_checkpoint -- [SETS] [BATCH] [ROUNDS]`.

use harness::bench::cpu_seconds;
use harness::redis::{RedisConfig, RedisServer};
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let sets: u64 = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let batch: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(512);
    let rounds: u32 = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(3);
    let target = RedisServer::start(RedisConfig::default())?;
    let mut conn = target.conn();
    let ways = [
        "plain pipeline",
        "MULTI/EXEC",
        "MULTI/EXEC + checkpoint HSET",
    ];
    println!("{sets} SETs in batches of {batch}, {rounds} rounds (ways interleaved)");
    let mut results: Vec<Vec<(f64, f64)>> = vec![Vec::new(); ways.len()];
    let mut offset = 0u64;
    for _ in 0..rounds {
        for (way, result) in results.iter_mut().enumerate() {
            let cpu0 = cpu_seconds(target.pid());
            let started = Instant::now();
            let mut sent = 0u64;
            while sent < sets {
                let mut pipe = redis::pipe();
                if way > 0 {
                    pipe.atomic();
                }
                for i in sent..(sent + batch).min(sets) {
                    pipe.cmd("SET")
                        .arg(format!("key:{}", i % 100_000))
                        .arg("xxx")
                        .ignore();
                }
                sent = (sent + batch).min(sets);
                if way == 2 {
                    offset += batch;
                    pipe.cmd("HSET")
                        .arg("redis-repl:checkpoint:bench:0")
                        .arg("source")
                        .arg(format!("1:{offset}"))
                        .arg("kafka:offset")
                        .arg(offset)
                        .ignore();
                }
                pipe.query::<()>(&mut conn)?;
            }
            let wall = started.elapsed().as_secs_f64();
            let cpu = cpu_seconds(target.pid()) - cpu0;
            result.push((cpu * 1e6 / sets as f64, sets as f64 / wall));
        }
    }
    for (name, r) in ways.iter().zip(&results) {
        let cpu: Vec<String> = r.iter().map(|(c, _)| format!("{c:.2}")).collect();
        let rate: Vec<String> = r.iter().map(|(_, s)| format!("{:.0}k", s / 1e3)).collect();
        println!(
            "{name:>30}: target CPU per SET {} µs; {} SET/s",
            cpu.join(" / "),
            rate.join(" / ")
        );
    }
    Ok(())
}
