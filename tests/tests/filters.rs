//! Key, db and command filters, and the rate limit, through the whole pipeline.

use harness::dataset;
use harness::pipeline::{Options, Pipeline};
use harness::redis::{exec, RedisConfig, RedisServer};
use std::time::{Duration, Instant};

#[test]
fn only_matching_keys_dbs_and_commands_are_applied() {
    let source = RedisServer::start(RedisConfig::default()).unwrap();
    let mut conn = source.conn();
    for db in [b"0".as_slice(), b"1"] {
        exec(&mut conn, &[b"SELECT", db]);
        for i in 0..50 {
            exec(&mut conn, &[b"SET", format!("keep:{i}").as_bytes(), b"v"]);
            exec(&mut conn, &[b"SET", format!("drop:{i}").as_bytes(), b"v"]);
            exec(
                &mut conn,
                &[b"SET", format!("keep:tmp:{i}").as_bytes(), b"v"],
            );
        }
    }
    exec(&mut conn, &[b"SELECT", b"0"]);
    let target = RedisServer::start(Options::default().target).unwrap();
    let p = Pipeline::start_with(
        source,
        target,
        Options {
            sink_apply: "include_keys = [\"keep:*\", \"ready\"]\nexclude_keys = [\"keep:tmp:*\"]\ninclude_dbs = [0]\nexclude_commands = [\"APPEND\"]".into(),
            ..Options::default()
        },
    )
    .unwrap();
    p.wait_running().unwrap();
    // Live writes: a kept INCR, a dropped key, an excluded command.
    for _ in 0..10 {
        exec(&mut conn, &[b"INCR", b"keep:counter"]);
        exec(&mut conn, &[b"INCR", b"drop:counter"]);
        exec(&mut conn, &[b"APPEND", b"keep:log", b"x"]);
    }
    exec(&mut conn, &[b"SET", b"keep:last", b"1"]);
    harness::wait_for("the last write", Duration::from_secs(30), || {
        p.target
            .cmd::<Option<String>>(&["GET", "keep:last"])
            .ok()
            .flatten()
    })
    .unwrap();
    // The target holds exactly the source's db 0 keys that pass the filters.
    let mut expected = dataset::read(&mut [p.source.conn()]).unwrap();
    expected.keys.retain(|(db, key), _| {
        *db == 0
            && (key.starts_with(b"keep:") || key == b"ready")
            && !key.starts_with(b"keep:tmp:")
            && key != b"keep:log"
    });
    let actual = dataset::read(&mut [p.target.conn()]).unwrap();
    let report = expected.compare(
        &actual,
        &dataset::CompareOptions {
            ignore_prefix: Some(harness::pipeline::CHECKPOINT_PREFIX.as_bytes().to_vec()),
            ..dataset::CompareOptions::default()
        },
    );
    assert!(report.is_equal(), "{report}");
    assert_eq!(
        p.target.cmd::<String>(&["GET", "keep:counter"]).unwrap(),
        "10"
    );
    let filtered: f64 = (0..p.options.partitions)
        .filter_map(|q| {
            p.sink.metric(
                "sink_records_skipped_total",
                &[("partition", &q.to_string()), ("reason", "filtered")],
            )
        })
        .sum();
    assert!(filtered >= 200.0, "{filtered} records filtered");
}

#[test]
fn the_rate_limit_holds_the_apply_rate() {
    let source = RedisServer::start(RedisConfig::default()).unwrap();
    let target = RedisServer::start(Options::default().target).unwrap();
    let p = Pipeline::start_with(
        source,
        target,
        Options {
            sink_apply: "max_ops_per_s = 200".into(),
            ..Options::default()
        },
    )
    .unwrap();
    p.wait_running().unwrap();
    let mut conn = p.source.conn();
    let started = Instant::now();
    for i in 0..1000 {
        exec(&mut conn, &[b"SET", format!("k:{i}").as_bytes(), b"v"]);
    }
    p.wait_equal(Duration::from_secs(60)).unwrap();
    // 1000 commands (plus their checkpoints) at 200/s with a one-second burst: at least 4 s.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(4),
        "applied 1000 writes in {took:?}"
    );
    let limited: f64 = (0..p.options.partitions)
        .filter_map(|q| {
            p.sink.metric(
                "sink_rate_limited_milliseconds_total",
                &[("partition", &q.to_string())],
            )
        })
        .sum();
    assert!(limited > 1000.0, "lanes waited {limited} ms");
}
