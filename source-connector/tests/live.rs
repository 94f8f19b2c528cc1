//! The source connector against a real redis-server and a real broker: snapshot and stream
//! records, durable acknowledgement, resume with PSYNC after kill -9, and clear errors.

use harness::broker::{random_topic, Broker, Storage, TopicMessage};
use harness::connector::{Connector, Kind};
use harness::redis::{RedisConfig, RedisServer};
use harness::wait_for;
use proto::v1::record::Body;
use std::collections::BTreeSet;
use std::time::Duration;

fn source_config(redis: &RedisServer, broker: &Broker, topic: &str, partitions: u32) -> String {
    format!(
        "[redis]\nurl = \"{}\"\nshard_name = \"src\"\n\n[kafka]\nbootstrap_servers = \"{}\"\ntopic = \"{topic}\"\npartitions = {partitions}\n",
        redis.url(),
        broker.bootstrap()
    )
}

/// The offset of the last durable checkpoint (everything before it is acknowledged by Kafka).
fn checkpointed(c: &Connector) -> Option<u64> {
    c.metric("source_checkpoint_offset", &[("shard", "src")])
        .map(|v| v as u64)
}

fn master_offset(redis: &RedisServer) -> u64 {
    redis
        .info_field("replication", "master_repl_offset")
        .unwrap()
        .parse()
        .unwrap()
}

/// Waits until the connector has durably published everything the master has.
fn wait_caught_up(c: &Connector, redis: &RedisServer) {
    wait_for(
        "the connector to ack the master's offset",
        Duration::from_secs(60),
        || {
            let m = master_offset(redis);
            (checkpointed(c)? >= m).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}; log:\n{}", c.log()));
}

fn records(messages: &[TopicMessage]) -> Vec<(u32, proto::v1::Record)> {
    messages
        .iter()
        .map(|m| {
            (
                m.partition,
                m.record.clone().expect("every message is a record"),
            )
        })
        .collect()
}

fn int(redis: &RedisServer, field: &str) -> u64 {
    redis.info_field("stats", field).unwrap().parse().unwrap()
}

#[test]
fn snapshot_stream_and_resume_after_kill9() {
    let redis = RedisServer::start(RedisConfig::default()).unwrap();
    let broker = Broker::start(Storage::Memory).unwrap();
    let topic = random_topic("src");
    let mut conn = redis.conn();
    for i in 0..200 {
        redis::cmd("SET")
            .arg(format!("k{i}"))
            .arg(i)
            .exec(&mut conn)
            .unwrap();
    }
    redis::cmd("RPUSH")
        .arg("list")
        .arg(&["a", "b", "c"])
        .exec(&mut conn)
        .unwrap();
    redis::cmd("HSET")
        .arg("hash")
        .arg(&["f", "v"])
        .exec(&mut conn)
        .unwrap();
    redis::cmd("SET")
        .arg("big")
        .arg(vec![b'x'; 3_000_000])
        .exec(&mut conn)
        .unwrap();
    redis::cmd("PEXPIRE")
        .arg("k1")
        .arg(600_000)
        .exec(&mut conn)
        .unwrap();

    let mut source = Connector::start(
        Kind::Source,
        &source_config(&redis, &broker, &topic, 4),
        &[],
    )
    .unwrap();
    wait_caught_up(&source, &redis);
    assert_eq!(int(&redis, "sync_full"), 1);

    // Streaming: single-slot, split, multi-slot and keyless commands.
    redis::cmd("INCR").arg("counter").exec(&mut conn).unwrap();
    redis::cmd("DEL")
        .arg(&["k2", "k3", "k4"])
        .exec(&mut conn)
        .unwrap();
    redis::cmd("RENAME")
        .arg("k5")
        .arg("k5-renamed")
        .exec(&mut conn)
        .unwrap();
    redis::cmd("MULTI").exec(&mut conn).unwrap();
    redis::cmd("INCR").arg("{t}a").exec(&mut conn).unwrap();
    redis::cmd("INCR").arg("{t}b").exec(&mut conn).unwrap();
    redis::cmd("EXEC").exec(&mut conn).unwrap();
    wait_caught_up(&source, &redis);

    // kill -9 while writes continue: the restart continues with PSYNC, and nothing is missing.
    let partial_before = int(&redis, "sync_partial_ok");
    source.kill9();
    for i in 0..100 {
        redis::cmd("INCR")
            .arg(format!("n{}", i % 7))
            .exec(&mut conn)
            .unwrap();
    }
    source.restart().unwrap();
    wait_caught_up(&source, &redis);
    assert_eq!(
        int(&redis, "sync_partial_ok"),
        partial_before + 1,
        "{}",
        source.log()
    );
    assert_eq!(int(&redis, "sync_full"), 1, "no second full sync");

    let all = records(&broker.read_records(&topic).unwrap());
    // Snapshot markers on every partition, and every key once in the partition of its slot.
    let starts: BTreeSet<u32> = all
        .iter()
        .filter(|(_, r)| matches!(r.body, Some(Body::SnapshotStart(_))))
        .map(|(p, _)| *p)
        .collect();
    assert_eq!(starts, (0..4).collect());
    let ends: Vec<&proto::v1::SnapshotEnd> = all
        .iter()
        .filter_map(|(_, r)| match &r.body {
            Some(Body::SnapshotEnd(e)) => Some(e),
            _ => None,
        })
        .collect();
    assert_eq!(ends.len(), 4);
    assert_eq!(ends[0].keys, 203);
    let mut keys = BTreeSet::new();
    let mut big_chunks = 0;
    for (p, r) in &all {
        match &r.body {
            Some(Body::KeyEntry(e)) => {
                let slot = proto::key_slot(&e.key);
                assert_eq!(*p, proto::topic::partition_for_slot(slot, 4).0);
                assert_eq!(r.slot, Some(u32::from(slot.get())));
                keys.insert(e.key.to_vec());
                if e.key.as_ref() == b"k1" {
                    assert!(e.expire_at_ms.is_some());
                }
            }
            Some(Body::KeyChunk(c)) if c.key.as_ref() == b"big" => big_chunks += 1,
            _ => {}
        }
    }
    assert_eq!(keys.len(), 203);
    assert!(
        big_chunks >= 5,
        "a 3 MB string is chunked (got {big_chunks} chunks)"
    );

    // Commands: every INCR n* appears (at least once; duplicates carry the same position).
    let mut incr_positions = BTreeSet::new();
    let mut total_incr_n = 0;
    for (_, r) in &all {
        if let Some(Body::Command(c)) = &r.body {
            if c.args[0].as_ref() == b"INCR" && c.args[1].starts_with(b"n") {
                total_incr_n += 1;
                let p = r.position.unwrap();
                incr_positions.insert((p.epoch, p.offset, p.sequence));
            }
        }
    }
    assert_eq!(
        incr_positions.len(),
        100,
        "every write after the kill is on the topic"
    );
    assert!(total_incr_n >= 100);
    // DEL over 3 slots is split, RENAME across slots is a barrier, the MULTI is one transaction.
    let barriers = all
        .iter()
        .filter(|(_, r)| matches!(&r.body, Some(Body::Barrier(b)) if b.commands[0].args[0].as_ref() == b"RENAME"))
        .count();
    assert!(barriers >= 1);
    let txs = all
        .iter()
        .filter(|(_, r)| matches!(&r.body, Some(Body::Transaction(t)) if t.commands.len() == 2))
        .count();
    assert_eq!(txs, 1);
    // Heartbeats keep coming when idle.
    assert!(all
        .iter()
        .any(|(_, r)| matches!(r.body, Some(Body::Heartbeat(_)))));
}

#[test]
fn wrong_password_is_a_clear_error() {
    let redis = RedisServer::start(RedisConfig {
        password: Some("right".into()),
        ..Default::default()
    })
    .unwrap();
    let broker = Broker::start(Storage::Memory).unwrap();
    let topic = random_topic("pw");
    let cfg = format!(
        "[redis]\nurl = \"redis://:wrong@{}\"\n\n[kafka]\nbootstrap_servers = \"{}\"\ntopic = \"{topic}\"\npartitions = 2\n",
        redis.addr(),
        broker.bootstrap()
    );
    let mut source = Connector::start(Kind::Source, &cfg, &[]).unwrap();
    let status = wait_for("the connector to exit", Duration::from_secs(30), || {
        source.process().exit_status()
    })
    .unwrap();
    assert!(!status.success());
    let log = source.log();
    assert!(log.contains("AUTH refused"), "{log}");
    assert!(!log.contains("wrong@"), "the password is not logged: {log}");
}

#[test]
fn partition_mismatch_is_refused() {
    let redis = RedisServer::start(RedisConfig::default()).unwrap();
    let broker = Broker::start(Storage::Memory).unwrap();
    let topic = random_topic("mismatch");
    broker.create_topic(&topic, 3).unwrap();
    let mut source = Connector::start(
        Kind::Source,
        &source_config(&redis, &broker, &topic, 4),
        &[],
    )
    .unwrap();
    let status = wait_for("the connector to exit", Duration::from_secs(30), || {
        source.process().exit_status()
    })
    .unwrap();
    assert!(!status.success());
    let log = source.log();
    assert!(
        log.contains("has 3 partitions but kafka.partitions = 4"),
        "{log}"
    );
}
