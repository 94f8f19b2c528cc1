//! Sync modes (`sync.mode`): a one-off full copy that stops by itself, and incremental only
//! from now, which skips the snapshot.

use harness::pipeline::{Options, Pipeline};
use harness::redis::{exec, RedisConfig, RedisServer};
use std::time::Duration;

fn sample(source: &RedisServer, prefix: &str, n: u32) {
    let mut conn = source.conn();
    for i in 0..n {
        exec(
            &mut conn,
            &[b"SET", format!("{prefix}:{i}").as_bytes(), b"v"],
        );
        exec(
            &mut conn,
            &[b"RPUSH", format!("{prefix}:list").as_bytes(), b"x"],
        );
    }
}

fn options(mode: &str) -> Options {
    Options {
        source_env: vec![("SOURCE_SYNC__MODE".into(), mode.into())],
        ..Options::default()
    }
}

#[test]
fn full_only_copies_the_snapshot_and_stops() {
    let source = RedisServer::start(RedisConfig::default()).unwrap();
    sample(&source, "before", 500);
    let target = RedisServer::start(Options::default().target).unwrap();
    let mut p = Pipeline::start_with(source, target, options("full")).unwrap();
    // The connector exits by itself, successfully, once Kafka holds the snapshot.
    let status = harness::wait_for(
        "the source connector to finish",
        Duration::from_secs(60),
        || p.source_connector.process().exit_status(),
    )
    .unwrap();
    assert!(status.success(), "{}", p.source_connector.log());
    assert!(p.source_connector.log().contains("sync.mode = \"full\""));
    p.wait_equal(Duration::from_secs(60)).unwrap();
    // The sink reports the snapshot applied on every partition.
    harness::wait_for(
        "every partition to report the snapshot",
        Duration::from_secs(30),
        || {
            (0..p.options.partitions)
                .all(|q| {
                    p.sink.metric(
                        "sink_snapshot_applied_epoch",
                        &[("partition", &q.to_string())],
                    ) == Some(1.0)
                })
                .then_some(())
        },
    )
    .unwrap();
    // Later writes are not copied; a restart has nothing left to do.
    sample(&p.source, "after", 10);
    p.source_connector.restart().unwrap();
    let status = harness::wait_for(
        "the restarted connector to finish",
        Duration::from_secs(60),
        || p.source_connector.process().exit_status(),
    )
    .unwrap();
    assert!(status.success());
    assert!(
        p.source_connector.log().contains("nothing left to do"),
        "{}",
        p.source_connector.log()
    );
    // Both connector runs have exited, so nothing after the snapshot was ever published.
    assert_eq!(
        p.target.cmd::<Option<String>>(&["GET", "after:0"]).unwrap(),
        None
    );
    assert_eq!(
        p.target
            .cmd::<Option<String>>(&["GET", "before:0"])
            .unwrap()
            .as_deref(),
        Some("v")
    );
}

#[test]
fn incremental_only_skips_the_snapshot() {
    let source = RedisServer::start(RedisConfig::default()).unwrap();
    sample(&source, "before", 300);
    exec(&mut source.conn(), &[b"SET", b"counter", b"100"]);
    let target = RedisServer::start(Options::default().target).unwrap();
    let p = Pipeline::start_with(source, target, options("incremental")).unwrap();
    // Writes made before the connector streams are part of the skipped snapshot: wait for it.
    harness::wait_for(
        "the source connector to stream",
        Duration::from_secs(60),
        || {
            (p.source_connector
                .metric("source_link_up", &[("shard", "source")])?
                == 1.0)
                .then_some(())
        },
    )
    .unwrap();
    sample(&p.source, "after", 200);
    exec(&mut p.source.conn(), &[b"INCR", b"counter"]);
    harness::wait_for("the new writes to arrive", Duration::from_secs(60), || {
        p.target
            .cmd::<Option<String>>(&["GET", "counter"])
            .ok()
            .flatten()
    })
    .unwrap();
    // Keys from before are absent; the counter only saw the INCR: the documented inconsistency.
    assert_eq!(
        p.target
            .cmd::<Option<String>>(&["GET", "before:0"])
            .unwrap(),
        None
    );
    assert_eq!(p.target.cmd::<String>(&["GET", "counter"]).unwrap(), "1");
    assert_eq!(p.target.cmd::<i64>(&["LLEN", "after:list"]).unwrap(), 200);
    assert_eq!(
        p.source_connector
            .metric("source_snapshots_skipped_total", &[("shard", "source")]),
        Some(1.0)
    );
}

/// A full resync with `apply.on_new_snapshot = "flush"`: keys deleted on the source while the
/// connector was away (the writes in between no longer fit in the backlog) are gone from the
/// target too. With the default `keep` they would stay.
#[test]
fn a_full_resync_with_the_flush_policy_removes_keys_deleted_meanwhile() {
    let source = RedisServer::start(RedisConfig::default()).unwrap();
    sample(&source, "gone", 100);
    sample(&source, "stay", 100);
    let target = RedisServer::start(Options::default().target).unwrap();
    let mut p = Pipeline::start_with(
        source,
        target,
        Options {
            sink_apply: "on_new_snapshot = \"flush\"".into(),
            ..Options::default()
        },
    )
    .unwrap();
    p.wait_equal(Duration::from_secs(60)).unwrap();
    p.source_connector.kill9();
    let mut conn = p.source.conn();
    for i in 0..100 {
        exec(&mut conn, &[b"DEL", format!("gone:{i}").as_bytes()]);
    }
    // More than the 1 MB backlog: the next PSYNC cannot continue.
    let filler = vec![b'x'; 100_000];
    for i in 0..30 {
        exec(
            &mut conn,
            &[b"SET", format!("filler:{}", i % 3).as_bytes(), &filler],
        );
    }
    p.source_connector.restart().unwrap();
    p.wait_equal(Duration::from_secs(60)).unwrap();
    assert_eq!(
        p.source_connector
            .metric("source_full_syncs_total", &[("shard", "source")]),
        Some(1.0),
        "the restart had to resync fully: {}",
        p.source_connector.log()
    );
    let flushed: f64 = (0..p.options.partitions)
        .filter_map(|q| {
            p.sink.metric(
                "sink_snapshot_flushed_keys_total",
                &[("partition", &q.to_string())],
            )
        })
        .sum();
    assert!(flushed >= 100.0, "{flushed} keys flushed");
}
