//! Orphaned barrier copies. A barrier is published as one copy per involved partition; when the
//! source connector dies between copies and its next sync is a full resync (a new epoch), some
//! partitions hold a copy that the others never get. A 10-minute soak found lanes waiting on such
//! a barrier forever. The topic is written by hand here so the situation is exact: the lanes must
//! give the orphan up once another involved partition is in the newer epoch, never apply it, and
//! go on with the new epoch's records.

use harness::broker::{random_topic, Broker, Storage};
use harness::connector::{Connector, Kind};
use harness::pipeline::{sink_config, Options};
use harness::redis::{RedisConfig, RedisServer};
use proto::v1::{self, record::Body};
use std::time::Duration;

fn record(epoch: u64, offset: u64, body: Body) -> Vec<u8> {
    proto::topic::encode(&v1::Record {
        schema_version: proto::SCHEMA_VERSION,
        source_shard: "source".into(),
        position: Some(proto::Position::new(epoch, offset, 0).into()),
        capture_time_ms: 0,
        db: 0,
        slot: None,
        body: Some(body),
    })
}

fn set(key: &str) -> Body {
    Body::Command(v1::Command {
        args: vec!["SET".into(), key.to_owned().into(), "v".into()],
    })
}

fn barrier(partitions: &[u32], key: &str) -> Body {
    Body::Barrier(v1::Barrier {
        partitions: partitions.to_vec(),
        commands: vec![v1::Command {
            args: vec!["SET".into(), key.to_owned().into(), "applied".into()],
        }],
        ..v1::Barrier::default()
    })
}

/// A sink with the default settings applying `topic` to `target`.
fn start_sink(broker: &Broker, topic: &str, target: &RedisServer) -> Connector {
    let config = sink_config(
        &target.url(),
        &broker.bootstrap(),
        topic,
        &Options::default(),
    );
    Connector::start(Kind::Sink, &config, &[]).unwrap()
}

#[test]
fn orphaned_barrier_copies_are_given_up_once_a_partition_is_in_a_newer_epoch() {
    let broker = Broker::start(Storage::Memory).unwrap();
    let topic = random_topic("orphans");
    broker.create_topic(&topic, 4).unwrap();
    let produce = |partition: i32, bytes: Vec<u8>| {
        broker.produce_record(&topic, partition, &bytes).unwrap();
    };
    // Epoch 1: every partition applies something.
    for p in 0..4 {
        produce(p, record(1, 10 + p as u64, set(&format!("e1:{p}"))));
    }
    // A barrier over partitions 0, 1, 2 whose copy never reached partition 0 (the leader):
    // followers 1 and 2 hold orphans.
    for p in [1, 2] {
        produce(p, record(1, 100, barrier(&[0, 1, 2], "orphan-followers")));
    }
    // A barrier over partitions 2 and 3 that only the leader (2) got.
    produce(2, record(1, 200, barrier(&[2, 3], "orphan-leader")));
    // Then a full resync: epoch 2 on every partition.
    for p in 0..4 {
        produce(p, record(2, 1000 + p as u64, set(&format!("e2:{p}"))));
    }

    let target =
        RedisServer::start(RedisConfig::default().with("maxmemory-policy", "noeviction")).unwrap();
    let sink = start_sink(&broker, &topic, &target);
    harness::wait_for(
        "every lane to reach epoch 2",
        Duration::from_secs(60),
        || {
            let all = (0..4).all(|p| {
                target
                    .cmd::<Option<String>>(&["GET", &format!("e2:{p}")])
                    .ok()
                    .flatten()
                    .is_some()
            });
            all.then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", sink.log()));
    for key in ["orphan-followers", "orphan-leader"] {
        let value: Option<String> = target.cmd(&["GET", key]).unwrap();
        assert_eq!(value, None, "{key}: an orphaned barrier was applied");
    }
    let abandoned = sink
        .metric("sink_barriers_abandoned_total", &[])
        .unwrap_or(0.0);
    assert_eq!(
        abandoned,
        3.0,
        "two followers and one leader give up:\n{}",
        sink.log()
    );
    assert_eq!(sink.metric("sink_lane_halted", &[]), Some(0.0));
    assert!(sink.log().contains("abandoned"), "{}", sink.log());
}

/// The target restarted empty while a follower lane waited at a barrier for its leader: the
/// restart took the follower's arrival marker and everything it had applied before the barrier.
/// The follower must notice (its next connection is checked like a write's), apply its records
/// again and arrive again; otherwise it polls its empty checkpoint forever and the leader, once
/// its copy comes, waits forever for a marker that is gone.
#[test]
fn a_target_restarted_empty_while_a_follower_waits_at_a_barrier() {
    let broker = Broker::start(Storage::Memory).unwrap();
    let topic = random_topic("barrier-restart");
    broker.create_topic(&topic, 2).unwrap();
    let produce = |partition: i32, bytes: Vec<u8>| {
        broker.produce_record(&topic, partition, &bytes).unwrap();
    };
    // Partition 1 (a follower) gets its records and its copy of the barrier first.
    produce(1, record(1, 10, set("p1:before")));
    produce(1, record(1, 100, barrier(&[0, 1], "together")));
    produce(1, record(1, 110, set("p1:after")));

    let mut target =
        RedisServer::start(RedisConfig::default().with("maxmemory-policy", "noeviction")).unwrap();
    let sink = start_sink(&broker, &topic, &target);
    harness::wait_for(
        "partition 1 to wait at the barrier",
        Duration::from_secs(60),
        || {
            let waiting = sink.metric("sink_barrier_waiting", &[("partition", "1")]);
            let before: Option<String> = target.cmd(&["GET", "p1:before"]).ok().flatten();
            (waiting == Some(1.0) && before.is_some()).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", sink.log()));

    target.kill9();
    target.restart().unwrap();
    // Now the leader's records and its copy of the barrier.
    produce(0, record(1, 20, set("p0:before")));
    produce(0, record(1, 100, barrier(&[0, 1], "together")));

    harness::wait_for(
        "every record applied on the restarted target",
        Duration::from_secs(60),
        || {
            let all = ["p1:before", "p0:before", "together", "p1:after"]
                .iter()
                .all(|k| {
                    target
                        .cmd::<Option<String>>(&["GET", k])
                        .ok()
                        .flatten()
                        .is_some()
                });
            all.then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", sink.log()));
    assert_eq!(
        target.cmd::<String>(&["GET", "together"]).unwrap(),
        "applied"
    );
    assert_eq!(sink.metric("sink_lane_halted", &[]), Some(0.0));
    assert_eq!(
        sink.metric("sink_barriers_abandoned_total", &[])
            .unwrap_or(0.0),
        0.0,
        "the barrier is applied, not given up:\n{}",
        sink.log()
    );
}

/// A barrier's epoch cut short where the leader has its copy and goes on past it in the same
/// epoch: Kafka purged the copy for partition 1 in flight, the other partitions' records after
/// it were delivered, and the next sync was a full resync. The leader gives the barrier up once
/// partition 1 is in the new epoch; the followers then see the leader past the barrier while
/// their own checkpoint is not. On a cluster target that looked like a barrier applied before a
/// master lost writes, and the followers halted (the 30-minute cluster campaign, seed 1207):
/// they must give it up too, as the leader did.
#[test]
fn followers_give_up_a_barrier_the_leader_gave_up_and_went_past_on_a_cluster_target() {
    let broker = Broker::start(Storage::Memory).unwrap();
    let topic = random_topic("abandoned-past");
    broker.create_topic(&topic, 4).unwrap();
    let produce = |partition: i32, bytes: Vec<u8>| {
        broker.produce_record(&topic, partition, &bytes).unwrap();
    };
    for p in 0..4 {
        produce(p, record(1, 10 + p as u64, set(&format!("e1:{p}"))));
    }
    // Every partition but 1 got the barrier's copy; the leader (0) has a record after it.
    for p in [0, 2, 3] {
        produce(p, record(1, 100, barrier(&[0, 1, 2, 3], "given-up")));
    }
    produce(0, record(1, 150, set("after-the-barrier")));
    // The full resync: partition 1 first, then the followers (the leader's partition has
    // nothing newer, so its checkpoint stays past the barrier in epoch 1).
    for p in [1, 2, 3] {
        produce(p, record(2, 1000 + p as u64, set(&format!("e2:{p}"))));
    }

    let target = harness::cluster::RedisCluster::start(
        3,
        0,
        RedisConfig::default().with("maxmemory-policy", "noeviction"),
    )
    .unwrap();
    let config = sink_config(
        &target.nodes()[0].url(),
        &broker.bootstrap(),
        &topic,
        &Options::default(),
    );
    let sink = Connector::start(Kind::Sink, &config, &[]).unwrap();
    let mut client = target.client();
    let mut get = |key: &str| match client.exec(&[b"GET", key.as_bytes()]) {
        redis::Value::BulkString(v) => Some(v),
        _ => None,
    };
    harness::wait_for(
        "every follower to reach epoch 2",
        Duration::from_secs(60),
        || {
            let all = ["e2:1", "e2:2", "e2:3", "after-the-barrier"]
                .iter()
                .all(|k| get(k).is_some());
            all.then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", sink.log()));
    assert_eq!(get("given-up"), None, "the given-up barrier was applied");
    assert_eq!(
        sink.metric("sink_lane_halted", &[]),
        Some(0.0),
        "{}",
        sink.log()
    );
    assert_eq!(
        sink.metric("sink_barriers_abandoned_total", &[]),
        Some(3.0),
        "the leader and both followers give it up:\n{}",
        sink.log()
    );
}
