//! Soak run, not part of CI: a mixed workload through the whole pipeline for some minutes with a
//! random fault every 10–30 s — kill -9 of the source connector, of the sink, of the broker
//! (sqlite storage, so the log survives), or both Redis links cut — then an exact comparison and
//! a report of the totals (also appended to target/reliability.jsonl).
//!
//!   scripts/soak.sh [MINUTES] [SEED]     (builds the release binaries first)

use harness::pipeline::{record_reliability, Options, Pipeline};
use harness::redis::exec;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let minutes: u64 = args.next().and_then(|m| m.parse().ok()).unwrap_or(10);
    let seed: u64 = args
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    println!("soak: {minutes} min, seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut p = Pipeline::start(Options {
        storage: harness::broker::Storage::Sqlite,
        proxies: true,
        partitions: 8,
        ..Options::default()
    })?;
    p.wait_running()?;

    let stop = Arc::new(AtomicBool::new(false));
    let writes = Arc::new(AtomicU64::new(0));
    let writer = {
        let (stop, writes) = (Arc::clone(&stop), Arc::clone(&writes));
        let mut conn = p.source.conn();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(SeqCst) {
                let k = n % 101;
                let v = n.to_string();
                let key = |kind: &str| format!("{kind}:{k}");
                exec(&mut conn, &[b"INCR", key("counter").as_bytes()]);
                exec(&mut conn, &[b"RPUSH", key("list").as_bytes(), v.as_bytes()]);
                exec(&mut conn, &[b"APPEND", key("append").as_bytes(), b"."]);
                exec(
                    &mut conn,
                    &[b"XADD", key("stream").as_bytes(), b"*", b"n", v.as_bytes()],
                );
                exec(
                    &mut conn,
                    &[b"HSET", key("hash").as_bytes(), v.as_bytes(), b"1"],
                );
                exec(
                    &mut conn,
                    &[b"SET", key("ttl").as_bytes(), v.as_bytes(), b"EX", b"3600"],
                );
                let mut issued = 6;
                if n.is_multiple_of(50) {
                    // A transaction on one slot and a cross-slot barrier.
                    exec(&mut conn, &[b"MULTI"]);
                    exec(&mut conn, &[b"INCR", b"{tx}a"]);
                    exec(&mut conn, &[b"LPUSH", b"{tx}b", v.as_bytes()]);
                    exec(&mut conn, &[b"EXEC"]);
                    exec(&mut conn, &[b"SADD", b"set-a", v.as_bytes()]);
                    exec(&mut conn, &[b"SUNIONSTORE", b"union", b"set-a", b"set-b"]);
                    issued += 4;
                }
                writes.fetch_add(issued, SeqCst);
                n += 1;
                if n.is_multiple_of(10) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        })
    };

    let mut faults: std::collections::BTreeMap<&str, u32> = Default::default();
    let deadline = Instant::now() + Duration::from_secs(minutes * 60);
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(rng.random_range(10_000..30_000)));
        let fault = match rng.random_range(0..4) {
            0 => {
                p.source_connector.kill9();
                p.source_connector.restart()?;
                "kill -9 source connector"
            }
            1 => {
                p.sink.kill9();
                p.sink.restart()?;
                "kill -9 sink connector"
            }
            2 => {
                p.broker.kill9();
                std::thread::sleep(Duration::from_millis(rng.random_range(1_000..10_000)));
                p.broker.restart()?;
                "kill -9 broker, restart after 1-10 s"
            }
            _ => {
                p.source_proxy.as_ref().unwrap().drop_connections();
                p.target_proxy.as_ref().unwrap().drop_connections();
                "cut both Redis links"
            }
        };
        *faults.entry(fault).or_default() += 1;
        println!(
            "{:>4} s: {fault} ({} writes so far)",
            (minutes * 60)
                .saturating_sub(deadline.saturating_duration_since(Instant::now()).as_secs()),
            writes.load(SeqCst)
        );
    }
    stop.store(true, SeqCst);
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))?;
    let total = writes.load(SeqCst);
    let recovery = p.recover(Duration::from_secs(600))?;
    let injected: u32 = faults.values().sum();
    println!("\nsoak report (seed {seed}, {minutes} min):");
    for (fault, n) in &faults {
        println!("  {n:>3} × {fault}");
    }
    println!(
        "  {total} writes issued; target equal to source: 0 lost, 0 duplicated; recovered {:.1} s after the last write; worst lane lag {:.1} s",
        recovery.seconds, recovery.worst_lag_s
    );
    record_reliability(
        &format!("soak: {minutes} min mixed workload, a random fault every 10-30 s"),
        injected,
        total,
        recovery,
    );
    Ok(())
}
