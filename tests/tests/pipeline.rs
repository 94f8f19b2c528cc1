//! The whole pipeline through real processes: source Redis → source-connector → broker →
//! sink-connector → target Redis, compared key by key with the harness.

use harness::bench::status_kb;
use harness::pipeline::{Options, Pipeline};
use harness::redis::{exec, RedisConfig};
use rand::{Rng, SeedableRng};
use std::time::Duration;

/// Every data type, TTLs, a chunked string and a big hash, in dbs 0 and 3.
fn load_sample(conn: &mut redis::Connection) {
    for i in 0..300 {
        exec(
            conn,
            &[
                b"SET",
                format!("str:{i}").as_bytes(),
                format!("value {i}").as_bytes(),
            ],
        );
    }
    exec(conn, &[b"SET", b"int", b"12345"]);
    exec(conn, &[b"SET", b"ttl", b"v", b"PX", b"3600000"]);
    exec(conn, &[b"RPUSH", b"list", b"a", b"b", b"c", b"a"]);
    exec(conn, &[b"SADD", b"set", b"x", b"y", b"z"]);
    exec(conn, &[b"SADD", b"intset", b"1", b"2", b"3"]);
    exec(
        conn,
        &[b"ZADD", b"zset", b"1.5", b"m1", b"-2", b"m2", b"inf", b"m3"],
    );
    exec(conn, &[b"HSET", b"hash", b"f1", b"v1", b"f2", b"v2"]);
    exec(conn, &[b"XADD", b"stream", b"1-1", b"f", b"v"]);
    exec(conn, &[b"XADD", b"stream", b"2-1", b"f", b"w"]);
    exec(conn, &[b"XGROUP", b"CREATE", b"stream", b"g1", b"0"]);
    exec(
        conn,
        &[
            b"XREADGROUP",
            b"GROUP",
            b"g1",
            b"alice",
            b"COUNT",
            b"1",
            b"STREAMS",
            b"stream",
            b">",
        ],
    );
    // Big values: chunked on the topic.
    exec(conn, &[b"SET", b"big-string", &vec![b'q'; 2_500_000]]);
    let mut hset: Vec<Vec<u8>> = vec![b"HSET".to_vec(), b"big-hash".to_vec()];
    for i in 0..60_000 {
        hset.push(format!("field-{i}").into_bytes());
        hset.push(format!("value-{i}-{}", "x".repeat(20)).into_bytes());
    }
    let refs: Vec<&[u8]> = hset.iter().map(Vec::as_slice).collect();
    exec(conn, &refs);
    exec(conn, &[b"SELECT", b"3"]);
    exec(conn, &[b"SET", b"in-db3", b"yes"]);
    exec(conn, &[b"RPUSH", b"list-db3", b"1"]);
    exec(conn, &[b"SELECT", b"0"]);
}

/// Live writes of every kind: single-slot, split multi-key, multi-slot barriers, transactions,
/// a script, functions and a flush of one db.
fn live_writes(conn: &mut redis::Connection) {
    exec(conn, &[b"INCR", b"counter"]);
    exec(conn, &[b"APPEND", b"str:1", b"-appended"]);
    exec(conn, &[b"LPUSH", b"list", b"new"]);
    exec(conn, &[b"DEL", b"str:2", b"str:3", b"str:4"]);
    exec(conn, &[b"MSET", b"m1", b"1", b"m2", b"2", b"m3", b"3"]);
    exec(conn, &[b"RENAME", b"str:5", b"renamed"]);
    exec(conn, &[b"SMOVE", b"set", b"other-set", b"x"]);
    exec(conn, &[b"LMOVE", b"list", b"other-list", b"LEFT", b"RIGHT"]);
    exec(conn, &[b"SUNIONSTORE", b"union", b"set", b"intset"]);
    exec(conn, &[b"MULTI"]);
    exec(conn, &[b"INCR", b"{tx}a"]);
    exec(conn, &[b"INCR", b"{tx}b"]);
    exec(conn, &[b"EXEC"]);
    exec(conn, &[b"MULTI"]);
    exec(conn, &[b"INCR", b"cross-a"]);
    exec(conn, &[b"INCR", b"cross-b"]);
    exec(conn, &[b"EXEC"]);
    exec(
        conn,
        &[
            b"EVAL",
            b"redis.call('SET', KEYS[1], ARGV[1]); return redis.call('INCR', KEYS[2])",
            b"2",
            b"{s}x",
            b"{s}y",
            b"hello",
        ],
    );
    exec(conn, &[b"FUNCTION", b"LOAD", b"#!lua name=mylib\nredis.register_function('myset', function(keys, args) return redis.call('SET', keys[1], args[1]) end)"]);
    exec(conn, &[b"FCALL", b"myset", b"1", b"via-function", b"ok"]);
    exec(conn, &[b"XADD", b"stream", b"3-1", b"f", b"z"]);
    exec(conn, &[b"HINCRBY", b"hash", b"n", b"5"]);
    exec(conn, &[b"EXPIRE", b"hash", b"7200"]);
    exec(conn, &[b"SELECT", b"3"]);
    exec(conn, &[b"FLUSHDB"]);
    exec(conn, &[b"SET", b"after-flush", b"1"]);
    exec(conn, &[b"SELECT", b"0"]);
    exec(conn, &[b"SWAPDB", b"5", b"6"]);
}

#[test]
fn standalone_to_standalone_every_type() {
    let source = harness::redis::RedisServer::start(RedisConfig::default()).unwrap();
    load_sample(&mut source.conn());
    let target = harness::redis::RedisServer::start(
        RedisConfig::default().with("maxmemory-policy", "noeviction"),
    )
    .unwrap();
    let p = Pipeline::start_with(source, target, Options::default()).unwrap();
    let report = p.wait_equal(Duration::from_secs(120)).unwrap();
    assert!(report.compared > 300);
    live_writes(&mut p.source.conn());
    // The runbook's cut-over check: once every lane reports a caught-up offset at or past the
    // source's offset after the last write, the target holds everything, with no further wait.
    let cut_over = p.source.repl_offset().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for partition in 0..p.options.partitions {
        let partition = partition.to_string();
        loop {
            let caught_up = p
                .sink
                .metric("sink_caught_up_repl_offset", &[("partition", &partition)]);
            if caught_up.is_some_and(|o| o >= cut_over) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "partition {partition} caught up only to {caught_up:?}, not {cut_over}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let report = p.compare().unwrap();
    assert!(report.is_equal(), "caught up but not equal:\n{report}");
    // Every record's end-to-end latency splits into the source's, Kafka's and the sink's shares,
    // which add up to it (one host, one clock, whole milliseconds).
    let (_, metrics) = p.sink.http_get("/metrics").unwrap();
    let metric = |name: &str, labels: &[(&str, &str)]| {
        harness::connector::parse_metric(&metrics, name, labels).unwrap_or(0.0)
    };
    let records = metric("sink_end_to_end_seconds_count", &[]);
    let mut stages_sum = 0.0;
    for stage in ["source", "kafka", "sink"] {
        let count = metric("sink_stage_latency_seconds_count", &[("stage", stage)]);
        assert_eq!(count, records, "records timed in stage {stage}");
        stages_sum += metric("sink_stage_latency_seconds_sum", &[("stage", stage)]);
    }
    let total = metric("sink_end_to_end_seconds_sum", &[]);
    // Each metric carries its docs/metrics.md meaning as its help text.
    let (_, source_metrics) = p.source_connector.http_get("/metrics").unwrap();
    for (text, help) in [
        (
            &metrics,
            "# HELP sink_records_applied_total Records applied (barriers count once",
        ),
        (&metrics, "# HELP sink_end_to_end_seconds "),
        (
            &source_metrics,
            "# HELP source_link_up 1 while the replica link is streaming",
        ),
    ] {
        assert!(
            text.contains(help),
            "{help:?} missing from /metrics:\n{text}"
        );
    }
    assert!(records > 300.0, "{records} records timed");
    assert!(
        (stages_sum - total).abs() < 1e-6 * records,
        "stages add up to {stages_sum} s, end to end {total} s"
    );
    // The function arrived too.
    let libs: redis::Value = redis::cmd("FUNCTION")
        .arg("LIST")
        .query(&mut p.target.conn())
        .unwrap();
    assert!(format!("{libs:?}").contains("mylib"), "{libs:?}");

    // `verify` agrees, then finds a planted difference and an extra key.
    let (ok, stdout) = tests::verify(&p.sink, &p.source.url());
    assert!(ok, "{stdout}");
    assert!(stdout.contains("source and target match"), "{stdout}");
    exec(
        &mut p.target.conn(),
        &[b"SET", b"str:7", b"changed on the target"],
    );
    exec(&mut p.target.conn(), &[b"SET", b"only-on-target", b"x"]);
    let (ok, stdout) = tests::verify(&p.sink, &p.source.url());
    assert!(!ok);
    assert!(
        stdout.contains("1 extra on the target, 1 different"),
        "{stdout}"
    );
    assert!(
        stdout.contains("str:7") && stdout.contains("only-on-target"),
        "{stdout}"
    );
}

/// A random generator from `SEED`, or from a random seed it prints, so a failure can be replayed.
fn seeded_rng() -> rand::rngs::StdRng {
    let seed: u64 = std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("seed {seed} (rerun with SEED={seed})");
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// kill -9 of the sink at random points while counters, lists, appends and streams are written:
/// the final values are exact (nothing lost, nothing applied twice).
#[test]
fn sink_kill9_applies_everything_exactly_once() {
    let mut rng = seeded_rng();
    let mut p = Pipeline::start(Options::default()).unwrap();
    // Start writing only after the (empty) snapshot is applied: the workload's keys then exist
    // only in the command stream, so applying any command twice shows in the final values.
    p.wait_running().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = std::sync::Arc::clone(&stop);
        let mut conn = p.source.conn();
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let k = n % 13;
                exec(&mut conn, &[b"INCR", format!("counter:{k}").as_bytes()]);
                exec(
                    &mut conn,
                    &[
                        b"RPUSH",
                        format!("list:{k}").as_bytes(),
                        n.to_string().as_bytes(),
                    ],
                );
                exec(
                    &mut conn,
                    &[b"APPEND", format!("append:{k}").as_bytes(), b"x"],
                );
                exec(
                    &mut conn,
                    &[
                        b"XADD",
                        format!("stream:{k}").as_bytes(),
                        b"*",
                        b"n",
                        n.to_string().as_bytes(),
                    ],
                );
                if n.is_multiple_of(97) {
                    // A cross-slot barrier now and then.
                    exec(&mut conn, &[b"SUNIONSTORE", b"union", b"set-a", b"set-b"]);
                    exec(&mut conn, &[b"SADD", b"set-a", n.to_string().as_bytes()]);
                }
                n += 1;
                if n.is_multiple_of(50) {
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
            n
        })
    };
    let mut skipped = 0.0;
    let kills: usize = std::env::var("KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(10);
    for _ in 0..kills {
        // Kill only a sink that is applying (a kill before the group assigns it proves nothing).
        let _ = &mut p;
        harness::wait_for("the sink to apply records", Duration::from_secs(60), || {
            let applied = p.sink.metric("sink_records_applied_total", &[])?;
            (applied > 0.0).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", p.sink.log()));
        std::thread::sleep(Duration::from_millis(rng.random_range(0..1500)));
        skipped += p
            .sink
            .metric("sink_records_skipped_total", &[("reason", "duplicate")])
            .unwrap_or(0.0);
        p.sink.kill9();
        p.sink.restart().unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let writes = writer.join().unwrap();
    let recovery = p.recover(Duration::from_secs(120)).unwrap();
    // Each round: INCR, RPUSH, APPEND, XADD (and a barrier pair every 97th).
    harness::pipeline::record_reliability(
        "kill -9 of the sink while streaming, with barriers",
        kills as u32,
        writes * 4 + writes / 97 * 2,
        recovery,
    );
    skipped += p
        .sink
        .metric("sink_records_skipped_total", &[("reason", "duplicate")])
        .unwrap_or(0.0);
    if std::env::var("PRINT_SINK_LOG").is_ok() {
        eprintln!("{}", p.sink.log());
    }
    eprintln!("{kills} kills during {writes} write rounds; {skipped} replayed records skipped; all values exact");
    // The kills must have made the sink see records it had already applied, or this test
    // proves nothing about exactly-once.
    assert!(
        skipped > 0.0,
        "no replay happened: the test did not exercise deduplication"
    );
}

/// A Kafka message holds a batch of records (ADR 0013) and the sink applies them a few per
/// transaction here (`apply.batch_records = 5`), so a kill -9 while it catches up lands inside a
/// message. The group's committed offsets are then moved past everything (as an operator's reset
/// would), so the restarted sink must go back to what the target's checkpoint covers: the message
/// it was inside, not the one after. It applies the rest of that message once — nothing skipped,
/// and the part already applied skipped by position.
#[test]
fn sink_kill9_inside_a_batch_message_applies_the_rest_of_it_once() {
    let mut rng = seeded_rng();
    let mut p = Pipeline::start(Options {
        partitions: 2,
        sink_apply: "batch_records = 5".into(),
        ..Options::default()
    })
    .unwrap();
    p.wait_running().unwrap();
    let mut conn = p.source.conn();
    let mut n = 0u64;
    let rounds = 3;
    for _ in 0..rounds {
        p.sink.stop();
        // Pipelined writes: the source reads hundreds of commands at once, so batches are big.
        for _ in 0..60 {
            let mut pipe = redis::pipe();
            for _ in 0..200 {
                let k = n % 29;
                pipe.cmd("INCR").arg(format!("counter:{k}")).ignore();
                pipe.cmd("RPUSH").arg(format!("list:{k}")).arg(n).ignore();
                n += 1;
            }
            pipe.exec(&mut conn).expect("pipelined writes");
        }
        let written = p.source.repl_offset().unwrap();
        harness::wait_for("Kafka to hold the writes", Duration::from_secs(60), || {
            let acked = p.source_connector.metric("source_offset_acked", &[])?;
            (acked >= written).then_some(())
        })
        .unwrap();
        p.sink.restart().unwrap();
        // Kill while it catches up: it has applied some of the burst, not all.
        let some = rng.random_range(500.0..5000.0);
        harness::wait_for(
            "the sink to apply part of the burst",
            Duration::from_secs(60),
            || {
                let applied = p.sink.metric("sink_records_applied_total", &[])?;
                (applied >= some).then_some(())
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", p.sink.log()));
        p.sink.kill9();
        let highs = p.broker.high_watermarks(&p.topic).unwrap();
        p.broker
            .commit_group_offsets(&format!("sink-{}", p.topic), &p.topic, &highs)
            .unwrap();
        p.sink.restart().unwrap();
        p.recover(Duration::from_secs(120))
            .unwrap_or_else(|e| panic!("{e}\n{}", p.sink.log()));
    }
    // The kill can only have landed inside a message if messages span several transactions.
    let records = p.broker.read_records(&p.topic).unwrap();
    let mut per_message = std::collections::HashMap::new();
    for m in &records {
        *per_message.entry((m.partition, m.offset)).or_insert(0usize) += 1;
    }
    let biggest = per_message.values().copied().max().unwrap_or(0);
    eprintln!(
        "{rounds} kills while catching up on {n} pipelined writes; {} records in {} messages (up to {biggest} in one); all values exact",
        records.len(),
        per_message.len()
    );
    assert!(
        biggest > 5 * 4,
        "messages held at most {biggest} records: the kills did not land inside batches"
    );
}

fn record_bytes(db: u32, key: &str, offset: u64) -> (u32, Vec<u8>) {
    use proto::v1;
    let slot = proto::key_slot(key.as_bytes());
    let record = v1::Record {
        schema_version: proto::SCHEMA_VERSION,
        source_shard: "source".into(),
        position: Some(proto::Position::new(1, offset, 0).into()),
        capture_time_ms: 0,
        db,
        slot: Some(u32::from(slot.get())),
        body: Some(v1::record::Body::Command(v1::Command {
            args: vec!["SET".into(), key.to_owned().into(), "x".into()],
        })),
    };
    (
        proto::topic::partition_for_slot(slot, 4).0,
        proto::topic::encode(&record),
    )
}

/// Foreign bytes and a record for a db the target does not have: the lane halts with a clear
/// error (log, metric, /health), and the other lanes keep going.
#[test]
fn bad_records_halt_their_lane_only() {
    let p = Pipeline::start(Options::default()).unwrap();
    p.wait_running().unwrap();
    // Garbage without a content type on partition 0.
    p.broker
        .produce_raw(&p.topic, 0, b"junk", b"\x00\x01 not a record", &[])
        .unwrap();
    // A well-formed record for db 99 on another partition (Redis has 16 dbs).
    let (partition, bytes) = record_bytes(99, "in-db-99", u64::MAX / 2);
    assert_ne!(partition, 0);
    p.broker
        .produce_record(&p.topic, partition as i32, &bytes)
        .unwrap();
    for part in ["0", &partition.to_string()] {
        harness::wait_for("the lane to halt", Duration::from_secs(30), || {
            let halted = p.sink.metric("sink_lane_halted", &[("partition", part)])?;
            (halted == 1.0).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", p.sink.log()));
    }
    let (status, body) = p.sink.http_get("/health").unwrap();
    assert_eq!(status, 503, "{body}");
    let log = p.sink.log();
    assert!(
        log.contains("partition 0 offset") && log.contains("not a record this sink can read"),
        "{log}"
    );
    assert!(
        log.contains("record for source db 99 (target db 99) but the target has 16 databases"),
        "{log}"
    );
    // Nothing was written to another db instead.
    assert_eq!(
        p.target
            .cmd::<Option<String>>(&["GET", "in-db-99"])
            .unwrap(),
        None
    );
    // Lanes not involved keep applying.
    let free: Vec<u32> = (0..4).filter(|q| *q != 0 && *q != partition).collect();
    let key = (0..)
        .map(|i| format!("still-flowing-{i}"))
        .find(|k| {
            free.contains(&proto::topic::partition_for_slot(proto::key_slot(k.as_bytes()), 4).0)
        })
        .unwrap();
    exec(&mut p.source.conn(), &[b"SET", key.as_bytes(), b"yes"]);
    harness::wait_for(
        "other lanes to keep applying",
        Duration::from_secs(30),
        || {
            p.target
                .cmd::<Option<String>>(&["GET", &key])
                .ok()
                .flatten()
        },
    )
    .unwrap();
}

/// With `on_error = "dead-letter"`, bad messages go to the dead-letter topic and the lane
/// continues: everything else still arrives.
#[test]
fn dead_letter_policy_keeps_the_lane_going() {
    let dlq = harness::broker::random_topic("dlq");
    let p = Pipeline::start(Options {
        sink_apply: format!("on_error = \"dead-letter\"\ndead_letter_topic = \"{dlq}\""),
        ..Options::default()
    })
    .unwrap();
    p.broker.create_topic(&dlq, 1).unwrap();
    p.wait_running().unwrap();
    for partition in 0..4 {
        p.broker
            .produce_raw(&p.topic, partition, b"junk", b"garbage", &[])
            .unwrap();
    }
    // A newer schema version than this sink reads.
    p.broker
        .produce_raw(
            &p.topic,
            1,
            b"*",
            b"\x08\x02",
            &[
                (
                    proto::topic::HEADER_CONTENT_TYPE,
                    proto::topic::CONTENT_TYPE.as_bytes(),
                ),
                (proto::topic::HEADER_SCHEMA_VERSION, b"99"),
            ],
        )
        .unwrap();
    load_sample(&mut p.source.conn());
    live_writes(&mut p.source.conn());
    p.wait_equal(Duration::from_secs(60)).unwrap();
    harness::wait_for("5 dead-lettered messages", Duration::from_secs(30), || {
        let n = p.broker.read_records(&dlq).ok()?.len();
        (n == 5).then_some(())
    })
    .unwrap();
    assert_eq!(p.sink.metric("sink_dead_lettered_total", &[]), Some(5.0));
    assert_eq!(p.sink.http_get("/health").unwrap().0, 200);
}

/// FLUSHALL, SWAPDB and cross-slot RENAME/SMOVE with 16 partitions and two sink processes in
/// the group: barriers are coordinated across processes through the target.
#[test]
fn barriers_across_two_sink_processes() {
    let p = Pipeline::start(Options {
        partitions: 16,
        ..Options::default()
    })
    .unwrap();
    let second = p.extra_sink().unwrap();
    harness::wait_for(
        "both sinks to own partitions",
        Duration::from_secs(60),
        || {
            let a = p.sink.metric("sink_assigned_partitions", &[])?;
            let b = second.metric("sink_assigned_partitions", &[])?;
            (a > 0.0 && b > 0.0 && a + b == 16.0).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", p.sink.log(), second.log()));
    let mut conn = p.source.conn();
    for i in 0..200 {
        exec(&mut conn, &[b"SET", format!("k{i}").as_bytes(), b"v"]);
        exec(
            &mut conn,
            &[
                b"SADD",
                format!("s{}", i % 7).as_bytes(),
                format!("{i}").as_bytes(),
            ],
        );
    }
    exec(&mut conn, &[b"RENAME", b"k1", b"k1-renamed"]);
    exec(&mut conn, &[b"SMOVE", b"s1", b"s2", b"8"]);
    exec(&mut conn, &[b"FLUSHALL"]);
    for i in 0..100 {
        exec(&mut conn, &[b"INCR", format!("after-flush-{i}").as_bytes()]);
    }
    exec(&mut conn, &[b"SELECT", b"1"]);
    exec(&mut conn, &[b"SET", b"in-db1", b"1"]);
    exec(&mut conn, &[b"SELECT", b"0"]);
    exec(&mut conn, &[b"SWAPDB", b"0", b"1"]);
    for i in 0..100 {
        exec(&mut conn, &[b"INCR", format!("after-swap-{i}").as_bytes()]);
    }
    exec(
        &mut conn,
        &[b"RENAME", b"after-swap-1", b"after-swap-1-renamed"],
    );
    p.wait_equal(Duration::from_secs(90)).unwrap();
    let barriers = p.sink.metric("sink_barriers_total", &[]).unwrap_or(0.0)
        + second.metric("sink_barriers_total", &[]).unwrap_or(0.0);
    assert!(
        barriers >= 16.0,
        "every partition saw the broadcast barriers: {barriers}"
    );
}

/// The rules of an ACL user in docs/security.md (`ACL SETUSER <user> on >PASSWORD <rules…>`).
fn documented_acl(user: &str) -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/security.md");
    let doc = std::fs::read_to_string(path).unwrap();
    let prefix = format!("ACL SETUSER {user} on >");
    let line = doc
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("docs/security.md has no `{prefix}` line"));
    line.split_whitespace()
        .skip(5)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Both connectors run as the least-privilege ACL users docs/security.md documents, through every
/// data type, transactions, scripts, functions, flushes and SWAPDB.
#[test]
fn least_privilege_acl_users_on_both_sides() {
    let user = |name: &str, password: &str| (name.to_string(), password.to_string());
    let source = harness::redis::RedisServer::start(RedisConfig {
        acl_users: vec![(
            "redis-repl-source".into(),
            "source-secret".into(),
            documented_acl("redis-repl-source"),
        )],
        ..RedisConfig::default()
    })
    .unwrap();
    load_sample(&mut source.conn());
    let target = harness::redis::RedisServer::start(RedisConfig {
        acl_users: vec![(
            "redis-repl-sink".into(),
            "sink-secret".into(),
            documented_acl("redis-repl-sink"),
        )],
        ..RedisConfig::default().with("maxmemory-policy", "noeviction")
    })
    .unwrap();
    let p = Pipeline::start_with(
        source,
        target,
        Options {
            source_user: Some(user("redis-repl-source", "source-secret")),
            target_user: Some(user("redis-repl-sink", "sink-secret")),
            ..Options::default()
        },
    )
    .unwrap();
    p.wait_equal(Duration::from_secs(120)).unwrap();
    live_writes(&mut p.source.conn());
    exec(&mut p.source.conn(), &[b"PUBLISH", b"news", b"hello"]);
    exec(&mut p.source.conn(), &[b"SET", b"after-publish", b"1"]);
    p.wait_equal(Duration::from_secs(60)).unwrap();
    assert_eq!(p.sink.metric("sink_lane_halted", &[]), Some(0.0));

    // The source user really cannot touch data.
    let url = format!(
        "redis://redis-repl-source:source-secret@{}",
        p.source.addr()
    );
    let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
    let denied: redis::RedisResult<Option<String>> = redis::cmd("GET").arg("int").query(&mut conn);
    let error = denied.unwrap_err();
    assert_eq!(error.code(), Some("NOPERM"), "{error}");
    // Secrets never reach the logs.
    for log in [p.source_connector.log(), p.sink.log()] {
        assert!(!log.contains("source-secret") && !log.contains("sink-secret"));
    }
}

/// A single command bigger than the topic accepts (and that cannot be split, like APPEND): the
/// source connector stops with an error naming its position instead of dropping it or looping.
#[test]
fn oversized_command_stops_the_source_with_its_position() {
    let env = |k: &str, v: &str| (k.to_string(), v.to_string());
    let mut p = Pipeline::start(Options {
        source_env: vec![
            env("SOURCE_KAFKA__MAX_MESSAGE_BYTES", "200000"),
            env("SOURCE_SNAPSHOT__PIECE_BYTES", "131072"),
        ],
        ..Options::default()
    })
    .unwrap();
    p.wait_running().unwrap();
    exec(&mut p.source.conn(), &[b"SET", b"before", b"1"]);
    exec(
        &mut p.source.conn(),
        &[b"APPEND", b"huge", &vec![b'h'; 300_000]],
    );
    harness::wait_for(
        "the source connector to stop",
        Duration::from_secs(30),
        || p.source_connector.process().exit_status(),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", p.source_connector.log()));
    let status = p.source_connector.process().exit_status().unwrap();
    assert!(!status.success());
    let log = p.source_connector.log();
    let line = log
        .lines()
        .find(|l| l.contains("above kafka.max_message_bytes"))
        .unwrap_or_else(|| panic!("no error naming the limit:\n{log}"));
    assert!(line.contains("the record at position"), "{line}");
    // Everything before it went through.
    harness::wait_for("the write before it", Duration::from_secs(30), || {
        p.target
            .cmd::<Option<String>>(&["GET", "before"])
            .ok()
            .flatten()
    })
    .unwrap();
}

/// Big keys through the whole pipeline: two 100 MB strings (one compressible), a hash of 1M fields, a sorted set of
/// 200k members and a list of 500k elements in the snapshot (chunked on the topic and rebuilt in
/// bounded batches), then live writes to them; the target ends equal, and the source connector's
/// peak memory stays under 128 MB.
#[test]
fn big_keys_through_the_pipeline() {
    let source = harness::redis::RedisServer::start(
        RedisConfig::default().with("proto-max-bulk-len", "1gb"),
    )
    .unwrap();
    {
        let mut conn = source.conn();
        // One incompressible (the RDB holds it raw) and one compressible (the RDB holds it
        // LZF-compressed, about 1 MB): both must stream in pieces.
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..10 {
            let mut piece = vec![0u8; 10 << 20];
            rng.fill(&mut piece[..]);
            exec(&mut conn, &[b"APPEND", b"big:string", &piece]);
            exec(
                &mut conn,
                &[b"APPEND", b"big:compressible", &vec![b'c'; 10 << 20]],
            );
        }
        for batch in 0..100 {
            let mut hset = redis::cmd("HSET");
            hset.arg("big:hash");
            for i in 0..10_000 {
                let n = batch * 10_000 + i;
                hset.arg(format!("field:{n}")).arg(format!("value:{n}"));
            }
            hset.exec(&mut conn).unwrap();
        }
        for batch in 0..20 {
            let mut zadd = redis::cmd("ZADD");
            zadd.arg("big:zset");
            for i in 0..10_000 {
                let n = batch * 10_000 + i;
                zadd.arg(n as f64 / 7.0).arg(format!("member:{n}"));
            }
            zadd.exec(&mut conn).unwrap();
        }
        for batch in 0..50 {
            let mut rpush = redis::cmd("RPUSH");
            rpush.arg("big:list");
            for i in 0..10_000 {
                rpush.arg(batch * 10_000 + i);
            }
            rpush.exec(&mut conn).unwrap();
        }
    }
    let target = harness::redis::RedisServer::start(
        RedisConfig::default().with("maxmemory-policy", "noeviction"),
    )
    .unwrap();
    let mut p = Pipeline::start_with(source, target, Options::default()).unwrap();
    let pid = p.source_connector.process().pid().unwrap();
    let report = p.wait_equal(Duration::from_secs(300)).unwrap();
    assert!(report.compared >= 4);
    // Live writes to the big keys, some big themselves (split below the piece size).
    {
        let mut conn = p.source.conn();
        exec(&mut conn, &[b"APPEND", b"big:string", &vec![b't'; 400_000]]);
        let mut hset = redis::cmd("HSET");
        hset.arg("big:hash");
        for i in 0..50_000 {
            hset.arg(format!("new:{i}")).arg("x".repeat(40));
        }
        hset.exec(&mut conn).unwrap();
        exec(&mut conn, &[b"ZADD", b"big:zset", b"-1", b"first"]);
        exec(&mut conn, &[b"LPUSH", b"big:list", b"head"]);
    }
    p.wait_equal(Duration::from_secs(120)).unwrap();
    let rss_kb = status_kb(pid, "VmHWM").unwrap();
    eprintln!("source connector peak RSS: {} MB", rss_kb / 1024);
    assert!(rss_kb < 128 * 1024, "source connector peak RSS {rss_kb} kB");
}

/// The sink catching up on a backlog stays within the 128 MB RSS: its memory is bounded
/// by the size of one fetch response and the prefetch bounds, not by the backlog (ADR 0010). It
/// peaked at 62-67 MB with 256 KiB fetch responses and at 117-133 MB with 1 MiB; the test holds
/// it to three quarters of the bound so that creeping back towards it fails here first.
#[test]
fn sink_catching_up_on_a_backlog_stays_well_within_128_mb() {
    let mut p = Pipeline::start(Options::default()).unwrap();
    p.wait_running().unwrap();
    p.sink.stop();
    harness::bench::redis_benchmark_set(p.source.port(), 500_000, 64).unwrap();
    let written: f64 = p
        .source
        .info_field("replication", "master_repl_offset")
        .and_then(|o| o.parse().ok())
        .unwrap();
    harness::bench::wait_acked(&p.source_connector, written).unwrap();
    p.sink.restart().unwrap();
    let report = p.wait_equal(Duration::from_secs(300)).unwrap();
    assert!(report.compared >= 100_000 * 95 / 100, "{report:?}");
    let peak_kb = status_kb(p.sink.pid(), "VmHWM").unwrap();
    eprintln!(
        "sink peak RSS catching up on 500k SETs: {} MB",
        peak_kb / 1024
    );
    assert!(peak_kb < 96 * 1024, "sink peak RSS {peak_kb} kB");
}

/// The sink applying a snapshot of big values stays within the 128 MB RSS: a lane
/// takes at most 256 KiB of messages at once and cuts its transactions at 256 KiB of commands,
/// whatever the size of the records (an 8 MB string arrives as 16 pieces of 512 KiB). With 8 MiB
/// intakes and transactions cut only by their record count the sink peaked at 146-162 MB here,
/// with the byte bounds at 86-96 MB (debug builds).
#[test]
fn sink_snapshot_of_big_values_stays_within_128_mb() {
    let source = harness::redis::RedisServer::start(RedisConfig::default()).unwrap();
    for i in 0..16 {
        let key = format!("big:{i}");
        source
            .cmd::<()>(&["SETRANGE", &key, "8388607", "x"])
            .unwrap();
    }
    let target = harness::redis::RedisServer::start(
        RedisConfig::default().with("maxmemory-policy", "noeviction"),
    )
    .unwrap();
    // Uncompressed: what one fetch response of zeros decompresses into is librdkafka's
    // (docs/benchmarks.md); the lanes' bounds are what this guards.
    let options = Options {
        source_env: vec![("SOURCE_KAFKA__COMPRESSION".into(), "none".into())],
        ..Options::default()
    };
    let p = Pipeline::start_with(source, target, options).unwrap();
    let report = p.wait_equal(Duration::from_secs(300)).unwrap();
    assert_eq!(report.compared, 16, "{report:?}");
    let peak_kb = status_kb(p.sink.pid(), "VmHWM").unwrap();
    eprintln!(
        "sink peak RSS applying a snapshot of 16 strings of 8 MB: {} MB",
        peak_kb / 1024
    );
    assert!(peak_kb < 128 * 1024, "sink peak RSS {peak_kb} kB");
}
