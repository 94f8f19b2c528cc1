//! Faults through the whole pipeline: a full target (OOM under noeviction), the target restarted
//! during the stall, and kill -9 of the source connector during the snapshot and the stream.

use harness::pipeline::{Options, Pipeline};
use harness::redis::{exec, RedisConfig, RedisServer};
use rand::{Rng, SeedableRng};
use std::time::{Duration, Instant};

fn seed() -> u64 {
    let seed = std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (rerun with SEED={seed})");
    seed
}

fn oom_pipeline(persistent_target: bool) -> Pipeline {
    let mut target = RedisConfig::default()
        .with("maxmemory-policy", "noeviction")
        .with("maxmemory", "12mb");
    if persistent_target {
        target = target
            .with("appendonly", "yes")
            .with("appendfsync", "always");
    }
    Pipeline::start(Options {
        target,
        ..Options::default()
    })
    .unwrap()
}

/// Writes ~40 MB (more than the target's maxmemory) of ordered, non-idempotent data.
fn write_more_than_maxmemory(source: &RedisServer) {
    let mut conn = source.conn();
    let value = vec![b'v'; 10_000];
    for i in 0..4000 {
        exec(&mut conn, &[b"SET", format!("blob:{i}").as_bytes(), &value]);
        exec(&mut conn, &[b"INCR", b"counter"]);
        exec(&mut conn, &[b"RPUSH", b"order", i.to_string().as_bytes()]);
    }
}

fn wait_stalled(p: &Pipeline) {
    harness::wait_for("a lane to stall on OOM", Duration::from_secs(60), || {
        let stalled = p.sink.metric("sink_lane_stalled", &[])?;
        let retries = p.sink.metric("sink_retries_total", &[("code", "OOM")])?;
        (stalled >= 1.0 && retries > 0.0).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", p.sink.log()));
}

#[test]
fn full_target_stalls_then_everything_arrives_in_order() {
    let p = oom_pipeline(false);
    write_more_than_maxmemory(&p.source);
    wait_stalled(&p);
    // The stall holds: nothing is skipped while the target is full.
    harness::wait_for("the stall to last 3 s", Duration::from_secs(30), || {
        let held = ["0", "1", "2", "3"]
            .iter()
            .filter_map(|q| {
                p.sink
                    .metric("sink_lane_stalled_seconds", &[("partition", q)])
            })
            .fold(0.0, f64::max);
        (held >= 3.0).then_some(())
    })
    .unwrap();
    assert!(p.compare().unwrap().differences.len() > 100);
    let health = p.sink.http_get("/health").unwrap();
    assert_eq!(health.0, 200, "a stall is not a failure: {health:?}");
    p.target
        .cmd::<()>(&["CONFIG", "SET", "maxmemory", "0"])
        .unwrap();
    let recovery = p.recover(Duration::from_secs(120)).unwrap();
    harness::pipeline::record_reliability(
        "target full (OOM under noeviction) until maxmemory is raised",
        1,
        12_000,
        recovery,
    );
    assert_eq!(p.sink.metric("sink_lane_stalled", &[]), Some(0.0));
}

#[test]
fn target_restart_during_an_oom_stall() {
    let mut p = oom_pipeline(true);
    write_more_than_maxmemory(&p.source);
    wait_stalled(&p);
    p.target.kill9();
    std::thread::sleep(Duration::from_secs(2));
    p.target.restart().unwrap();
    // Still full after the restart (the AOF brought the data back): still stalled.
    wait_stalled(&p);
    p.target
        .cmd::<()>(&["CONFIG", "SET", "maxmemory", "0"])
        .unwrap();
    let recovery = p.recover(Duration::from_secs(120)).unwrap();
    harness::pipeline::record_reliability(
        "target killed and restarted during an OOM stall",
        1,
        12_000,
        recovery,
    );
}

/// A source Redis holding `thousands` × 1000 string keys `snap:<chunk>:<i>`.
fn source_with_keys(thousands: u32) -> RedisServer {
    let source = RedisServer::start(RedisConfig::default()).unwrap();
    let mut conn = source.conn();
    for chunk in 0..thousands {
        let mut cmd = redis::cmd("MSET");
        for i in 0..1000 {
            cmd.arg(format!("snap:{chunk}:{i}"))
                .arg(format!("value-{chunk}-{i}"));
        }
        cmd.exec(&mut conn).unwrap();
    }
    drop(conn);
    source
}

/// kill -9 of the source connector at random points of a large snapshot and of the stream:
/// the target ends equal, and kills during streaming resume with PSYNC (no new full sync).
#[test]
fn source_kill9_during_snapshot_and_streaming() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    // ~100k keys: a snapshot that takes a few seconds to publish.
    let source = source_with_keys(100);
    let target =
        RedisServer::start(RedisConfig::default().with("maxmemory-policy", "noeviction")).unwrap();
    let mut p = Pipeline::start_with(source, target, Options::default()).unwrap();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(rng.random_range(200..1500)));
        p.source_connector.kill9();
        p.source_connector.restart().unwrap();
    }
    let recovery = p.recover(Duration::from_secs(180)).unwrap();
    harness::pipeline::record_reliability(
        "kill -9 of the source connector during a 100k-key snapshot",
        3,
        100_000,
        recovery,
    );
    let full_syncs = |p: &Pipeline| -> u64 {
        p.source
            .info_field("stats", "sync_full")
            .unwrap()
            .parse()
            .unwrap()
    };
    let partial = |p: &Pipeline| -> u64 {
        p.source
            .info_field("stats", "sync_partial_ok")
            .unwrap()
            .parse()
            .unwrap()
    };
    let full_before = full_syncs(&p);
    let partial_before = partial(&p);
    let mut conn = p.source.conn();
    let mut issued = 0u64;
    for round in 0..5 {
        let writes = rng.random_range(100..1000);
        issued += writes as u64 * 3;
        let started = Instant::now();
        for i in 0..writes {
            let k = i % 11;
            exec(&mut conn, &[b"INCR", format!("c:{k}").as_bytes()]);
            exec(&mut conn, &[b"APPEND", format!("a:{k}").as_bytes(), b"y"]);
            exec(
                &mut conn,
                &[
                    b"LPUSH",
                    format!("l:{k}").as_bytes(),
                    format!("{round}-{i}").as_bytes(),
                ],
            );
        }
        eprintln!("round {round}: {writes} writes in {:?}", started.elapsed());
        std::thread::sleep(Duration::from_millis(rng.random_range(0..1000)));
        let resumed = partial(&p);
        p.source_connector.kill9();
        p.source_connector.restart().unwrap();
        // The next kill comes only once this restart has reconnected; otherwise two kills can
        // fall on one connection attempt and the count below would say nothing.
        harness::wait_for(
            "the restarted connector to resume",
            Duration::from_secs(60),
            || (partial(&p) > resumed || full_syncs(&p) > full_before).then_some(()),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", p.source_connector.log()));
    }
    let recovery = p.recover(Duration::from_secs(120)).unwrap();
    harness::pipeline::record_reliability(
        "kill -9 of the source connector while streaming",
        5,
        issued,
        recovery,
    );
    assert_eq!(
        full_syncs(&p),
        full_before,
        "kills during streaming cause no full sync"
    );
    assert!(
        partial(&p) >= partial_before + 5,
        "each restart continued with PSYNC"
    );
}

/// The broker is down for 30 s while writes continue: nothing is lost, the source connector's
/// memory stays bounded, and both connectors resume on their own.
#[test]
fn broker_outage_loses_nothing() {
    let mut p = Pipeline::start(Options {
        storage: harness::broker::Storage::Sqlite,
        ..Options::default()
    })
    .unwrap();
    p.wait_running().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = std::sync::Arc::clone(&stop);
        let mut conn = p.source.conn();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let k = n % 17;
                exec(&mut conn, &[b"INCR", format!("c:{k}").as_bytes()]);
                exec(
                    &mut conn,
                    &[
                        b"RPUSH",
                        format!("l:{k}").as_bytes(),
                        n.to_string().as_bytes(),
                    ],
                );
                exec(&mut conn, &[b"APPEND", format!("a:{k}").as_bytes(), b"z"]);
                n += 1;
                if n.is_multiple_of(20) {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            n
        })
    };
    harness::wait_for(
        "writes to flow to the target",
        Duration::from_secs(30),
        || {
            p.target
                .cmd::<Option<String>>(&["GET", "c:0"])
                .ok()
                .flatten()
        },
    )
    .unwrap();
    p.broker.kill9();
    let pid = p.source_connector.process().pid().unwrap();
    let mut max_rss = 0;
    let outage = Instant::now();
    while outage.elapsed() < Duration::from_secs(30) {
        max_rss = max_rss.max(harness::bench::status_kb(pid, "VmRSS").unwrap_or(0));
        std::thread::sleep(Duration::from_secs(1));
    }
    let checkpoints = p
        .source_connector
        .metric("source_checkpoints_total", &[])
        .unwrap_or(0.0);
    p.broker.restart().unwrap();
    // Keep writing until the source connector checkpoints again after the outage.
    harness::wait_for(
        "the source connector to resume",
        Duration::from_secs(60),
        || {
            let now = p.source_connector.metric("source_checkpoints_total", &[])?;
            (now > checkpoints).then_some(())
        },
    )
    .unwrap();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let rounds = writer.join().unwrap();
    let recovery = p.recover(Duration::from_secs(180)).unwrap();
    harness::pipeline::record_reliability(
        "broker killed for 30 s (sqlite storage) while writes continue",
        1,
        rounds * 3,
        recovery,
    );
    eprintln!(
        "{} writes during a 30 s broker outage; source connector max RSS {} MB",
        rounds * 3,
        max_rss / 1024
    );
    assert!(max_rss < 128 * 1024, "RSS {max_rss} kB during the outage");
}

/// Counters, lists and appends: applied twice or skipped, they show it.
fn ordered_writes(source: &RedisServer, round: u32, n: u32) {
    let mut conn = source.conn();
    for i in 0..n {
        counting_round(&mut conn, u64::from(i), &format!("{round}:{i}"));
    }
}

/// One round of the counting workload: `INCR` of one of 50 counters, `RPUSH` of `item` to one
/// of 20 lists, `APPEND` of `item` to `log`.
fn counting_round(conn: &mut redis::Connection, i: u64, item: &str) {
    exec(conn, &[b"INCR", format!("c:{}", i % 50).as_bytes()]);
    exec(
        conn,
        &[
            b"RPUSH",
            format!("l:{}", i % 20).as_bytes(),
            item.as_bytes(),
        ],
    );
    exec(conn, &[b"APPEND", b"log", item.as_bytes()]);
}

/// The target loses writes the sink had applied: first the tail (it restarts from an older RDB
/// file, as after a failover to a lagging replica), then everything (it restarts empty). The
/// sink notices on reconnecting that the target's checkpoints went back, rewinds the partitions
/// to them, and the target ends equal to the source: nothing lost, nothing applied twice.
#[test]
fn target_losing_applied_writes_is_replayed_from_its_checkpoints() {
    let p = Pipeline::start(Options::default()).unwrap();
    let mut p = p;
    ordered_writes(&p.source, 1, 3000);
    p.wait_equal(Duration::from_secs(60)).unwrap();
    // The target's state at this point is what it will come back with.
    p.target.cmd::<()>(&["SAVE"]).unwrap();
    ordered_writes(&p.source, 2, 3000);
    p.wait_equal(Duration::from_secs(60)).unwrap();
    p.target.kill9();
    p.target.restart().unwrap();
    assert!(
        !p.compare().unwrap().is_equal(),
        "the restart lost the second round"
    );
    ordered_writes(&p.source, 3, 1000);
    let recovery = p.recover(Duration::from_secs(120)).unwrap();
    harness::pipeline::record_reliability(
        "target restarts from an older RDB (lost its last applied writes)",
        1,
        3 * 7000,
        recovery,
    );
    let rewinds = p.sink.metric("sink_rewinds_total", &[]).unwrap_or(0.0);
    assert!(rewinds >= 1.0, "rewinds {rewinds}");

    // Now it comes back with nothing at all.
    let dir: Vec<String> = p.target.cmd(&["CONFIG", "GET", "dir"]).unwrap();
    p.target.kill9();
    std::fs::remove_file(std::path::Path::new(&dir[1]).join("dump.rdb")).unwrap();
    p.target.restart().unwrap();
    assert_eq!(p.target.cmd::<i64>(&["DBSIZE"]).unwrap(), 0);
    ordered_writes(&p.source, 4, 1000);
    let recovery = p.recover(Duration::from_secs(120)).unwrap();
    harness::pipeline::record_reliability(
        "target restarts empty (lost everything)",
        1,
        3 * 1000,
        recovery,
    );
    let again = p.sink.metric("sink_rewinds_total", &[]).unwrap_or(0.0);
    assert!(again > rewinds, "rewinds {again}");
}

/// A target that lost everything except a barrier marker, which a lane writes outside its
/// transactions (it can land on a target that restarted empty before the lane noticed): the
/// partition's checkpoint hash exists but holds no position and no `kafka:offset`. It must be
/// read as no checkpoint (replay the partition from its start), not as one written by a version
/// without `kafka:offset` (trust the group's committed offset, which skips every lost write).
/// Suspected after the fault campaign's seed 20261206 (docs/reliability.md).
#[test]
fn a_checkpoint_holding_only_a_barrier_marker_replays_the_partition() {
    let mut p = Pipeline::start(Options::default()).unwrap();
    ordered_writes(&p.source, 1, 500);
    p.wait_equal(Duration::from_secs(60)).unwrap();
    // A clean stop commits the group's offsets past everything.
    p.sink.stop();
    let _: () = p.target.cmd(&["FLUSHALL"]).unwrap();
    let key = format!("{}:{}:0", harness::pipeline::CHECKPOINT_PREFIX, p.topic);
    let _: () = p
        .target
        .cmd(&["HSET", &key, "barrier:source", "1:1:0"])
        .unwrap();
    p.sink.restart().unwrap();
    ordered_writes(&p.source, 2, 100);
    p.wait_equal(Duration::from_secs(60)).unwrap();
}

/// Network faults between each connector and Redis, through the harness's fault-injecting TCP
/// proxy, while counters, lists and appends are written: added latency, connections cut at random
/// moments, and half-open links that stop answering without a reset. The target ends equal
/// (nothing lost, nothing applied twice); the source resumes every time with PSYNC.
#[test]
fn network_faults_between_connectors_and_redis() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let env = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
    let p = Pipeline::start(Options {
        proxies: true,
        // The master pings its replicas every second, so 5 s of silence means a dead link.
        source: RedisConfig::default().with("repl-ping-replica-period", "1"),
        source_env: env("SOURCE_REDIS__REPL_TIMEOUT_S", "5"),
        // Replies may take 6 × timeout_s: a silent target is noticed after 6 s.
        sink_env: env("SINK_REDIS__TIMEOUT_S", "1"),
        ..Options::default()
    })
    .unwrap();
    p.wait_running().unwrap();
    let source_proxy = p.source_proxy.as_ref().unwrap();
    let target_proxy = p.target_proxy.as_ref().unwrap();

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = counting_writer(&p.source, &stop);

    eprintln!("latency 50 ms on both links");
    source_proxy.set_latency(Duration::from_millis(50));
    target_proxy.set_latency(Duration::from_millis(50));
    std::thread::sleep(Duration::from_secs(3));
    source_proxy.set_latency(Duration::ZERO);
    target_proxy.set_latency(Duration::ZERO);

    for round in 0..3 {
        let wait = Duration::from_millis(rng.random_range(500..2500));
        std::thread::sleep(wait);
        eprintln!("round {round}: cutting both links after {wait:?}");
        source_proxy.drop_connections();
        target_proxy.drop_connections();
    }
    // The source must be streaming again before its link goes half-open: the writes go on,
    // so once Kafka acknowledged data written after the last cut, a new session is streaming.
    let after_cuts = p.source.repl_offset().unwrap();
    harness::wait_for(
        "the source link to stream again",
        Duration::from_secs(60),
        || {
            let c = &p.source_connector;
            let acked = c.metric("source_offset_acked", &[])?;
            let up = c.metric("source_link_up", &[])?;
            (acked > after_cuts && up == 1.0).then_some(())
        },
    )
    .unwrap();
    let partial_before = p
        .source_connector
        .metric("source_partial_syncs_total", &[])
        .unwrap_or(0.0);

    eprintln!("half-open source link for 9 s");
    source_proxy.set_blackhole(true);
    std::thread::sleep(Duration::from_secs(9));
    source_proxy.set_blackhole(false);
    harness::wait_for("the source link to resume", Duration::from_secs(60), || {
        let partial = p
            .source_connector
            .metric("source_partial_syncs_total", &[])?;
        (partial > partial_before).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", p.source_connector.log()));

    eprintln!("half-open target link for 10 s");
    half_open(target_proxy, Duration::from_secs(10));
    let (writes, recovery) = stop_writer_and_recover(&p, &stop, writer, Duration::from_secs(120));
    harness::pipeline::record_reliability(
        "network: 50 ms latency, 3 cuts of both Redis links, half-open source (9 s) and target (10 s) links",
        1,
        writes * 3,
        recovery,
    );
    let metric = |c: &harness::connector::Connector, name: &str| c.metric(name, &[]).unwrap_or(0.0);
    assert_eq!(metric(&p.source_connector, "source_full_syncs_total"), 1.0);
    assert!(metric(&p.source_connector, "source_partial_syncs_total") >= 2.0);
    assert!(
        p.source_connector.log().contains("the link is dead"),
        "the half-open source link was not detected as such:\n{}",
        p.source_connector.log()
    );
    let retries = p
        .sink
        .metric("sink_retries_total", &[("code", "CONNECTION")])
        .unwrap_or(0.0);
    assert!(retries > 0.0, "the sink never saw its link fail");
    assert!(writes > 500, "the workload ran ({writes} rounds)");
}

/// The source master fails over to its replica (promotion, the old master follows the new one)
/// behind a stable address: the connector continues with PSYNC on the new master, without a full
/// resync, and the target ends equal.
#[test]
fn source_failover_to_its_replica_continues_with_psync() {
    let harness::redis::MasterReplica { master, replica } =
        harness::redis::MasterReplica::start(RedisConfig::default()).unwrap();
    let target =
        RedisServer::start(RedisConfig::default().with("maxmemory-policy", "noeviction")).unwrap();
    let p = Pipeline::start_with(
        master,
        target,
        Options {
            proxies: true,
            ..Options::default()
        },
    )
    .unwrap();
    ordered_writes(&p.source, 1, 2000);
    p.wait_equal(Duration::from_secs(60)).unwrap();
    let offset = |s: &RedisServer| s.info_field("replication", "master_repl_offset");
    harness::wait_for("the replica to catch up", Duration::from_secs(30), || {
        (offset(&replica) == offset(&p.source)).then_some(())
    })
    .unwrap();

    // Promote the replica; the connector's address now leads there.
    let _: String = replica.cmd(&["REPLICAOF", "NO", "ONE"]).unwrap();
    let proxy = p.source_proxy.as_ref().unwrap();
    proxy.set_upstream(&replica.addr());
    proxy.drop_connections();
    let new_master = replica.port().to_string();
    let _: String = p
        .source
        .cmd(&["REPLICAOF", "127.0.0.1", &new_master])
        .unwrap();
    ordered_writes(&replica, 2, 2000);

    // The old master follows the new one, so comparing it with the target compares the new one.
    harness::wait_for("the old master to follow", Duration::from_secs(30), || {
        (p.source.info_field("replication", "master_link_status")? == "up").then_some(())
    })
    .unwrap();
    let recovery = p.recover(Duration::from_secs(120)).unwrap();
    harness::pipeline::record_reliability(
        "source master fails over to its replica",
        1,
        3 * 4000,
        recovery,
    );
    let metric = |name: &str| p.source_connector.metric(name, &[]).unwrap_or(0.0);
    assert_eq!(
        metric("source_full_syncs_total"),
        1.0,
        "{}",
        p.source_connector.log()
    );
    assert!(metric("source_partial_syncs_total") >= 1.0);
    assert_eq!(
        replica
            .info_field("replication", "connected_slaves")
            .as_deref(),
        Some("2"),
        "the new master serves the old one and the connector"
    );
}

/// The source's replica output buffer overflows under a write burst while the connector's link
/// is slow: Redis drops the link, the backlog no longer holds the connector's offset, the next
/// sync is a full resync under a new epoch, and the target still ends equal.
#[test]
fn replica_buffer_overflow_forces_a_full_resync_and_the_target_ends_equal() {
    let p = Pipeline::start(Options {
        proxies: true,
        ..Options::default()
    })
    .unwrap();
    ordered_writes(&p.source, 1, 1000);
    p.wait_equal(Duration::from_secs(60)).unwrap();
    p.source
        .cmd::<()>(&[
            "CONFIG",
            "SET",
            "client-output-buffer-limit",
            "replica 512kb 256kb 1",
        ])
        .unwrap();
    p.source
        .cmd::<()>(&["CONFIG", "SET", "repl-backlog-size", "16384"])
        .unwrap();
    let proxy = p.source_proxy.as_ref().unwrap();
    proxy.set_latency(Duration::from_millis(300));
    {
        // 60 MB: more than the kernel's socket buffers on the slow path can absorb.
        let mut conn = p.source.conn();
        let value = vec![b'x'; 4096];
        for batch in 0..150 {
            let mut pipe = redis::pipe();
            for i in 0..100 {
                pipe.cmd("SET")
                    .arg(format!("burst:{batch}:{i}"))
                    .arg(&value)
                    .ignore();
            }
            pipe.query::<()>(&mut conn).unwrap();
        }
    }
    ordered_writes(&p.source, 2, 1000);
    harness::wait_for(
        "the master to drop the slow link",
        Duration::from_secs(60),
        || {
            let errors = p
                .source_connector
                .metric("source_link_errors_total", &[("kind", "transient")])?;
            (errors >= 1.0).then_some(())
        },
    )
    .unwrap();
    proxy.set_latency(Duration::ZERO);
    let recovery = p.recover(Duration::from_secs(120)).unwrap();
    harness::pipeline::record_reliability(
        "replica output buffer overflow forces a full resync",
        1,
        15_000 + 3 * 2000,
        recovery,
    );
    let metric = |name: &str| p.source_connector.metric(name, &[]).unwrap_or(0.0);
    assert!(
        metric("source_full_syncs_total") >= 2.0,
        "{}",
        p.source_connector.log()
    );
    assert!(metric("source_epoch") >= 2.0);
}

/// The target applies a transaction but its reply never comes back (the link dies between EXEC
/// and its answer): the sink cannot tell whether the batch ran. After reconnecting it must read
/// the checkpoint written with the batch and go on after it, not apply the batch a second time.
/// XADD with the source's explicit IDs and INCR make a second apply visible.
#[test]
fn lost_exec_replies_are_not_applied_twice() {
    let env = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
    let p = Pipeline::start(Options {
        proxies: true,
        // Replies may take 6 × timeout_s: a lost reply is given up after 6 s.
        sink_env: env("SINK_REDIS__TIMEOUT_S", "1"),
        ..Options::default()
    })
    .unwrap();
    p.wait_running().unwrap();
    let proxy = p.target_proxy.as_ref().unwrap();
    let mut written = 0u64;
    let mut recovery = harness::pipeline::Recovery {
        seconds: 0.0,
        worst_lag_s: 0.0,
    };
    for round in 0..3 {
        let mut conn = p.source.conn();
        for i in 0..300 {
            let n = format!("{round}-{i}");
            exec(&mut conn, &[b"INCR", format!("c:{}", i % 7).as_bytes()]);
            exec(
                &mut conn,
                &[
                    b"XADD",
                    format!("s:{}", i % 5).as_bytes(),
                    b"*",
                    b"n",
                    n.as_bytes(),
                ],
            );
            exec(
                &mut conn,
                &[b"RPUSH", format!("l:{}", i % 3).as_bytes(), n.as_bytes()],
            );
            written += 3;
            if i == 100 {
                proxy.set_drop_replies(true);
            }
        }
        // Replies stay lost long enough for the sink to give up on them.
        std::thread::sleep(Duration::from_secs(7));
        proxy.set_drop_replies(false);
        let r = p
            .recover(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        recovery.seconds = recovery.seconds.max(r.seconds);
        recovery.worst_lag_s = recovery.worst_lag_s.max(r.worst_lag_s);
    }
    assert_eq!(
        p.sink.metric("sink_lane_halted", &[]),
        Some(0.0),
        "{}",
        p.sink.log()
    );
    let retries = p
        .sink
        .metric("sink_retries_total", &[("code", "CONNECTION")])
        .unwrap_or(0.0);
    assert!(retries > 0.0, "no reply was lost: the test proved nothing");
    harness::pipeline::record_reliability(
        "target replies lost after EXEC ran (3 times)",
        3,
        written,
        recovery,
    );
}

/// The path to the target dies while a transaction is on its way; the sink gives up on it (6 s),
/// reconnects over a path that works and applies the batch there. Then the first path heals, and
/// TCP delivers what it held: the old transaction. Had it run, its writes would be applied twice
/// and the checkpoint moved back. The sink closes its previous connection on the target before
/// reading its checkpoint on the new one (`CLIENT KILL ID`), so the held transaction never runs.
#[test]
fn a_write_held_on_an_abandoned_connection_does_not_run_when_its_path_heals() {
    let env = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
    let p = Pipeline::start(Options {
        proxies: true,
        // Replies may take 6 × timeout_s: a held transaction is given up after 6 s.
        sink_env: env("SINK_REDIS__TIMEOUT_S", "1"),
        ..Options::default()
    })
    .unwrap();
    p.wait_running().unwrap();
    let proxy = p.target_proxy.as_ref().unwrap();
    let mut conn = p.source.conn();
    let mut written = 0u64;
    let mut recovery = harness::pipeline::Recovery {
        seconds: 0.0,
        worst_lag_s: 0.0,
    };
    for round in 0..3 {
        for i in 0..300 {
            exec(&mut conn, &[b"INCR", format!("c:{}", i % 7).as_bytes()]);
            exec(
                &mut conn,
                &[
                    b"RPUSH",
                    format!("l:{}", i % 3).as_bytes(),
                    format!("{round}-{i}").as_bytes(),
                ],
            );
            written += 2;
            if i == 100 {
                proxy.set_hold_existing(true);
            }
        }
        // Held long enough for the sink to give up and apply the batches over a new connection.
        harness::wait_for(
            "the sink to reconnect over a new path",
            Duration::from_secs(60),
            || {
                let r = p
                    .sink
                    .metric("sink_retries_total", &[("code", "CONNECTION")])?;
                (r > 0.0 && p.compare().ok()?.is_equal()).then_some(())
            },
        )
        .unwrap_or_else(|e| panic!("round {round}: {e}\n{}", p.sink.log()));
        // The old path heals: what it held reaches the target now.
        proxy.set_hold_existing(false);
        harness::wait_for(
            "the released connections to deliver what they held and close",
            Duration::from_secs(30),
            || (proxy.released_still_open() == 0).then_some(()),
        )
        .unwrap();
        let r = p
            .recover(Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("round {round}: {e}"));
        recovery.seconds = recovery.seconds.max(r.seconds);
        recovery.worst_lag_s = recovery.worst_lag_s.max(r.worst_lag_s);
    }
    let closed = p
        .sink
        .metric("sink_target_stale_connections_closed_total", &[])
        .unwrap_or(0.0);
    assert!(
        closed >= 3.0,
        "each round leaves a held connection open on the target: {closed}\n{}",
        p.sink.log()
    );
    assert_eq!(p.sink.metric("sink_lane_halted", &[]), Some(0.0));
    harness::pipeline::record_reliability(
        "target path dead with a transaction in flight, healed after the reconnection (3 times)",
        3,
        written,
        recovery,
    );
}

/// Asked to stop while the broker is gone, both connectors exit on their own within 20 s
/// instead of waiting for Kafka (the sink's consumer would wait to leave its group, the source's
/// producer to deliver what it holds), and nothing is lost: once the broker is back, restarted
/// connectors bring the target level with the source.
#[test]
fn connectors_stop_promptly_when_the_broker_is_gone() {
    let mut p = Pipeline::start(Options {
        storage: harness::broker::Storage::Sqlite,
        ..Options::default()
    })
    .unwrap();
    p.wait_running().unwrap();
    let mut conn = p.source.conn();
    for i in 0..200 {
        exec(&mut conn, &[b"RPUSH", b"before", i.to_string().as_bytes()]);
    }
    p.wait_equal(Duration::from_secs(60)).unwrap();
    p.broker.kill9();
    // Written while Kafka is unreachable: the source connector holds them unacknowledged.
    for i in 0..200 {
        exec(&mut conn, &[b"RPUSH", b"during", i.to_string().as_bytes()]);
    }
    let written = p.source.repl_offset().unwrap();
    harness::wait_for(
        "the source connector to read the writes made without a broker",
        Duration::from_secs(30),
        || {
            p.source_connector
                .metric("source_offset_received", &[])
                .filter(|&o| o >= written)
        },
    )
    .unwrap();
    let sink = p.sink.stop();
    let source = p.source_connector.stop();
    assert!(
        sink.is_some(),
        "the sink did not exit within 20 s of SIGTERM:\n{}",
        p.sink.log()
    );
    assert!(
        source.is_some(),
        "the source connector did not exit within 20 s of SIGTERM:\n{}",
        p.source_connector.log()
    );
    eprintln!("stopped without a broker: sink in {sink:?}, source connector in {source:?}");
    p.broker.restart().unwrap();
    p.source_connector.restart().unwrap();
    p.sink.restart().unwrap();
    let report = p.wait_equal(Duration::from_secs(120)).unwrap();
    assert!(report.is_equal(), "{report}");
}

/// Writes rounds of `INCR`, `RPUSH` and `APPEND` (each applied twice or skipped would show) until
/// `stop`; returns the number of rounds.
fn counting_writer(
    source: &RedisServer,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    let stop = std::sync::Arc::clone(stop);
    let url = source.url();
    std::thread::spawn(move || {
        let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
        let mut writes = 0u64;
        while !stop.load(std::sync::atomic::Ordering::SeqCst) {
            counting_round(&mut conn, writes, &writes.to_string());
            writes += 1;
            std::thread::sleep(Duration::from_millis(2));
        }
        writes
    })
}

/// Connections through `proxy` stay up but carry nothing for `period`, then 2 s to notice.
fn half_open(proxy: &harness::proxy::FaultProxy, period: Duration) {
    proxy.set_blackhole(true);
    std::thread::sleep(period);
    proxy.set_blackhole(false);
    std::thread::sleep(Duration::from_secs(2));
}

/// Stops a [`counting_writer`] and waits for the target to equal the source: the rounds written
/// and how the pipeline recovered.
fn stop_writer_and_recover(
    p: &Pipeline,
    stop: &std::sync::atomic::AtomicBool,
    writer: std::thread::JoinHandle<u64>,
    timeout: Duration,
) -> (u64, harness::pipeline::Recovery) {
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let writes = writer.join().unwrap();
    eprintln!("{writes} rounds of writes");
    let recovery = p.recover(timeout).unwrap();
    eprintln!("recovered in {:.1} s", recovery.seconds);
    (writes, recovery)
}

/// Network faults between both connectors and Kafka: the broker advertises a fault-injecting
/// proxy, so every Kafka connection (the source's producer and checkpoint reads, the sink's
/// consumer and group coordination) goes through it. Added latency, every connection cut at
/// random moments, then a half-open period where connections stay up but nothing gets through
/// (the sink's group session expires meanwhile). Nothing is lost or applied twice, and the
/// source link to Redis never needs a full resync: the connector waits on Kafka instead.
#[test]
fn network_faults_between_connectors_and_kafka() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let p = Pipeline::start(Options {
        kafka_proxy: true,
        ..Options::default()
    })
    .unwrap();
    p.wait_running().unwrap();
    let proxy = p.kafka_proxy.as_ref().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = counting_writer(&p.source, &stop);

    eprintln!("latency 100 ms on every Kafka connection");
    proxy.set_latency(Duration::from_millis(100));
    std::thread::sleep(Duration::from_secs(4));
    proxy.set_latency(Duration::ZERO);

    let connections = proxy.connections();
    for round in 0..3 {
        let wait = Duration::from_millis(rng.random_range(500..2500));
        std::thread::sleep(wait);
        eprintln!("round {round}: cutting every Kafka connection after {wait:?}");
        proxy.drop_connections();
    }
    harness::wait_for(
        "the connectors to reconnect to Kafka",
        Duration::from_secs(30),
        || (proxy.connections() > connections).then_some(()),
    )
    .unwrap();

    eprintln!("half-open Kafka connections for 12 s");
    half_open(proxy, Duration::from_secs(12));
    let (writes, recovery) = stop_writer_and_recover(&p, &stop, writer, Duration::from_secs(180));
    harness::pipeline::record_reliability(
        "network: 100 ms latency, 3 cuts of every Kafka connection, 12 s half-open Kafka connections",
        1,
        writes * 3,
        recovery,
    );
    assert_eq!(
        p.source_connector
            .metric("source_full_syncs_total", &[])
            .unwrap_or(0.0),
        1.0,
        "a Kafka fault must not cost a full resync:\n{}",
        p.source_connector.log()
    );
    assert!(writes > 500, "the workload ran ({writes} rounds)");
}

/// Records deleted from the topic before the target applied them (retention shorter than the
/// sink's downtime). Deleted records that applied nothing (the heartbeats of an idle source the
/// sink had read) change nothing: the sink goes on. Deleted records it never applied halt every
/// lane that misses some, with an error naming the offsets, instead of going on without them
/// (before, such a lane sought back forever and dropped everything it read).
#[test]
fn records_deleted_before_the_sink_applied_them_halt_the_lane() {
    let mut p = Pipeline::start(Options::default()).unwrap();
    ordered_writes(&p.source, 1, 500);
    p.wait_equal(Duration::from_secs(60)).unwrap();

    // Idle: the sink reads the last heartbeats, then everything the topic holds is deleted.
    p.source_connector.stop();
    let highs = p.broker.high_watermarks(&p.topic).unwrap();
    harness::wait_for(
        "the sink to read every message",
        Duration::from_secs(30),
        || {
            highs
                .iter()
                .enumerate()
                .all(|(partition, high)| {
                    let label = partition.to_string();
                    p.sink
                        .metric("sink_consumed_offset", &[("partition", &label)])
                        == Some(*high as f64 - 1.0)
                })
                .then_some(())
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}
{}",
            p.sink.log()
        )
    });
    p.sink.stop();
    p.broker.delete_all_records(&p.topic).unwrap();
    p.sink.restart().unwrap();
    p.source_connector.restart().unwrap();
    ordered_writes(&p.source, 2, 500);
    p.wait_equal(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", p.sink.log()));
    let (status, body) = p.sink.http_get("/health").unwrap();
    assert_eq!(status, 200, "{body}");

    // Writes the sink never read, deleted.
    p.sink.stop();
    ordered_writes(&p.source, 3, 500);
    let written = p.source.repl_offset().unwrap();
    harness::wait_for("Kafka to hold the writes", Duration::from_secs(60), || {
        let acked = p.source_connector.metric("source_offset_acked", &[])?;
        (acked >= written).then_some(())
    })
    .unwrap();
    let lows = p.broker.delete_all_records(&p.topic).unwrap();
    p.sink.restart().unwrap();
    // 71 keys spread over the 4 partitions: every partition had writes deleted.
    for partition in 0..4 {
        harness::wait_for("the lane to halt", Duration::from_secs(30), || {
            let halted = p
                .sink
                .metric("sink_lane_halted", &[("partition", &partition.to_string())])?;
            (halted == 1.0).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", p.sink.log()));
    }
    let log = p.sink.log();
    for (partition, low) in lows.iter().enumerate() {
        let what = format!("partition {partition}: offsets ");
        let line = log
            .lines()
            .find(|l| l.contains(&what) && l.contains("were deleted"))
            .unwrap_or_else(|| panic!("no error for partition {partition}\n{log}"));
        assert!(
            line.contains(&format!("(the partition now starts at {low})")),
            "{line}"
        );
    }
    let (status, body) = p.sink.http_get("/health").unwrap();
    assert_eq!(status, 503, "{body}");
    // The target holds rounds 1 and 2 whole and nothing of round 3.
    for list in 0..20 {
        let len: i64 = p.target.cmd(&["LLEN", &format!("l:{list}")]).unwrap();
        assert_eq!(len, 50, "l:{list}");
    }
}

#[test]
fn a_lane_the_broker_does_not_feed_is_reported() {
    let mut p = Pipeline::start(Options::default()).unwrap();
    ordered_writes(&p.source, 1, 500);
    p.wait_equal(Duration::from_secs(60)).unwrap();

    // The test broker answers every fetch with nothing when told not to wait at all (it reads
    // storage only within the fetch's wait): the consumer gets no message while the partitions
    // hold records past the lanes' positions.
    p.sink.stop();
    let config = std::fs::read_to_string(p.sink.config_path()).unwrap();
    let starving = format!("{config}\n[kafka.properties]\n\"fetch.wait.max.ms\" = \"0\"\n");
    std::fs::write(p.sink.config_path(), starving).unwrap();
    ordered_writes(&p.source, 2, 500);
    p.sink.restart().unwrap();
    for partition in 0..4 {
        harness::wait_for(
            "the lane to report starvation",
            Duration::from_secs(90),
            || {
                let starved = p.sink.metric(
                    "sink_fetch_starved",
                    &[("partition", &partition.to_string())],
                )?;
                (starved == 1.0).then_some(())
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", p.sink.log()));
    }
    let log = p.sink.log();
    for partition in 0..4 {
        let what = format!("partition {partition}: no message for 30s although");
        assert!(
            log.lines().any(|l| l.contains(&what)),
            "no warning for partition {partition}\n{log}"
        );
    }
    let (status, body) = p.sink.http_get("/health").unwrap();
    assert_eq!(status, 200, "starving is not a failure of the sink: {body}");

    // With the setting back, everything arrives.
    p.sink.stop();
    std::fs::write(p.sink.config_path(), config).unwrap();
    p.sink.restart().unwrap();
    p.wait_equal(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("{e}\n{}", p.sink.log()));
}

/// kill -9 of the sink at random points of a snapshot it applies slowly (rate-limited), while
/// counters, lists and strings are written on the source: the target ends equal.
#[test]
fn sink_kill9_during_the_snapshot() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let source = source_with_keys(200);
    let target =
        RedisServer::start(RedisConfig::default().with("maxmemory-policy", "noeviction")).unwrap();
    // 200k keys at 10k commands/s: about 20 s of applying, longer than the kills below leave it.
    let options = Options {
        sink_apply: "max_ops_per_s = 10000".into(),
        ..Options::default()
    };
    let mut p = Pipeline::start_with(source, target, options).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = counting_writer(&p.source, &stop);
    let kills: u32 = 5;
    let mut during_snapshot = 0;
    for _ in 0..kills {
        harness::wait_for(
            "the sink to apply snapshot keys",
            Duration::from_secs(60),
            || {
                let keys = p.sink.metric("sink_snapshot_keys_total", &[])?;
                (keys > 0.0).then_some(())
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", p.sink.log()));
        std::thread::sleep(Duration::from_millis(rng.random_range(0..1500)));
        if p.sink.metric("sink_snapshot_applied_epoch", &[]).is_none() {
            during_snapshot += 1;
        }
        p.sink.kill9();
        p.sink.restart().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let rounds = writer.join().unwrap();
    // The rate limit makes the rest of the snapshot slow: 88 s alone on the 2-core VM.
    let recovery = p
        .recover(Duration::from_secs(300))
        .unwrap_or_else(|e| panic!("{e}\n{}", p.sink.log()));
    eprintln!("{during_snapshot} of {kills} kills before any lane had applied the whole snapshot; {rounds} write rounds");
    assert!(
        during_snapshot > 0,
        "no kill fell in the snapshot: the test proved nothing about it"
    );
    harness::pipeline::record_reliability(
        "kill -9 of the sink during a 200k-key snapshot, with writes",
        kills,
        200_000 + rounds * 3,
        recovery,
    );
}

/// A wrong password for the target: every lane halts with one line naming the target and the
/// refusal, `/health` says so, and nothing is applied or committed. With the password corrected
/// and the sink restarted, the target ends equal: nothing was lost.
#[test]
fn a_wrong_target_password_halts_the_lanes_and_loses_nothing() {
    let sink_user = ("redis-repl-sink".to_string(), "right".to_string());
    let mut p = Pipeline::start(Options {
        target: RedisConfig {
            acl_users: vec![(
                sink_user.0.clone(),
                sink_user.1.clone(),
                "~* &* +@all".into(),
            )],
            ..RedisConfig::default().with("maxmemory-policy", "noeviction")
        },
        target_user: Some((sink_user.0.clone(), "wrong".into())),
        ..Options::default()
    })
    .unwrap();
    exec(&mut p.source.conn(), &[b"SET", b"k", b"1"]);
    exec(&mut p.source.conn(), &[b"INCR", b"n"]);
    let partitions = p.options.partitions;
    harness::wait_for("every lane to halt", Duration::from_secs(60), || {
        let halted = p.sink.metric("sink_lane_halted", &[])?;
        (halted == f64::from(partitions)).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", p.sink.log()));
    let (status, body) = p.sink.http_get("/health").unwrap();
    assert_eq!(status, 503, "{body}");
    let log = p.sink.log();
    let line = log
        .lines()
        .find(|l| l.contains("lane halted"))
        .unwrap_or_else(|| panic!("no halt line:\n{log}"));
    assert!(
        line.contains(&p.target.addr())
            && line.contains("authentication failed")
            && line.contains("redis.url"),
        "{line}"
    );
    assert_eq!(p.target.cmd::<u64>(&["DBSIZE"]).unwrap(), 0);

    // The password corrected: everything arrives.
    p.sink.stop();
    let config = std::fs::read_to_string(p.sink.config_path())
        .unwrap()
        .replace(":wrong@", ":right@");
    std::fs::write(p.sink.config_path(), config).unwrap();
    p.sink.restart().unwrap();
    p.wait_equal(Duration::from_secs(120)).unwrap();
}

/// The target unreachable when the sink starts: the lanes retry their first checkpoint read and
/// show it (`sink_lane_stalled`, `sink_retries_total{code="CONNECTION"}`) instead of waiting
/// silently; once the target answers, the stall ends and the target ends equal.
#[test]
fn a_target_unreachable_at_start_shows_as_stalled_lanes() {
    let p = Pipeline::start(Options {
        proxies: true,
        ..Options::default()
    })
    .unwrap();
    // The sink joins its group for a few seconds before a lane reads its checkpoint.
    let proxy = p.target_proxy.as_ref().unwrap();
    proxy.set_refuse(true);
    exec(&mut p.source.conn(), &[b"INCR", b"n"]);
    let partitions = f64::from(p.options.partitions);
    harness::wait_for(
        "every lane to show its stall",
        Duration::from_secs(60),
        || {
            let stalled = p.sink.metric("sink_lane_stalled", &[])?;
            (stalled == partitions).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", p.sink.log()));
    let retries = p
        .sink
        .metric("sink_retries_total", &[("code", "CONNECTION")])
        .unwrap();
    assert!(retries >= partitions, "{retries} retries");
    assert!(
        p.sink.log().contains("retrying until it succeeds"),
        "{}",
        p.sink.log()
    );

    proxy.set_refuse(false);
    p.wait_equal(Duration::from_secs(120)).unwrap();
    harness::wait_for("the stall to end", Duration::from_secs(30), || {
        (p.sink.metric("sink_lane_stalled", &[])? == 0.0).then_some(())
    })
    .unwrap();
    assert!(p.sink.log().contains("target accepts writes again"));
}
