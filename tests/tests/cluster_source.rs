//! A Redis Cluster as the source: one replica link per master shard, found from one node,
//! followed through a `CLUSTER FAILOVER` with a PSYNC continuation, and a `FLUSHALL` on one
//! master that empties only that shard's slots on the target, a slot migration, and kill -9 of
//! the connector.

use harness::broker::{random_topic, Broker, Storage};
use harness::cluster::RedisCluster;
use harness::connector::{Connector, Kind};
use harness::dataset;
use harness::pipeline::{self, Options};
use harness::redis::{RedisConfig, RedisServer};
use std::time::Duration;
use tests::cluster_writes;

fn wait_equal(
    cluster: &RedisCluster,
    target: &RedisServer,
    logs: &[&Connector],
) -> harness::pipeline::Recovery {
    tests::wait_datasets_equal(
        || dataset::read(&mut cluster.master_conns()).unwrap(),
        || dataset::read(&mut [target.conn()]).unwrap(),
        Duration::from_secs(120),
        logs,
    )
}

/// A broker, the source connector seeded with `seed` (topology reread every second) and the
/// sink into `target`.
fn connectors(seed: &str, target: &RedisServer) -> (Broker, Connector, Connector) {
    let broker = Broker::start(Storage::Memory).unwrap();
    let topic = random_topic("cluster-source");
    let options = Options::default();
    let source = Connector::start(
        Kind::Source,
        &pipeline::source_config(seed, &broker.bootstrap(), &topic, &options)
            .replace("[redis]\n", "[redis]\ncluster_refresh_s = 1\n"),
        &[],
    )
    .unwrap();
    let sink = Connector::start(
        Kind::Sink,
        &pipeline::sink_config(&target.url(), &broker.bootstrap(), &topic, &options),
        &[],
    )
    .unwrap();
    (broker, source, sink)
}

/// The port of the master that owns `slot`, and of another master.
fn owner_and_another(cluster: &RedisCluster, slot: u16) -> (u16, u16) {
    let from = cluster.master_of_slot(slot).unwrap().port();
    let to = cluster
        .masters()
        .into_iter()
        .map(|m| m.port())
        .find(|&p| p != from)
        .unwrap();
    (from, to)
}

#[test]
fn cluster_source_to_standalone_target_through_failover_and_flush() {
    let cluster = RedisCluster::start(3, 1, RedisConfig::default()).unwrap();
    let target =
        RedisServer::start(RedisConfig::default().with("maxmemory-policy", "noeviction")).unwrap();
    let mut client = cluster.client();
    cluster_writes(&mut client, 1, 1500);

    // Any node will do: the connector finds the masters. A replica is the hardest case.
    let (_broker, source, sink) = connectors(&cluster.replicas()[0].url(), &target);
    wait_equal(&cluster, &target, &[&source, &sink]);
    cluster_writes(&mut client, 2, 1500);
    wait_equal(&cluster, &target, &[&source, &sink]);

    let shards: Vec<String> = ["0", "5461", "10923"]
        .iter()
        .map(|a| format!("source/{a}"))
        .collect();
    let metric = |name: &str, shard: &str| source.metric(name, &[("shard", shard)]).unwrap_or(0.0);
    for shard in &shards {
        assert_eq!(
            metric("source_full_syncs_total", shard),
            1.0,
            "{shard}: {}",
            source.log()
        );
    }

    // The master of slot 0 hands over to its replica; the shard's link follows with PSYNC.
    let old = cluster.master_of_slot(0).unwrap().port();
    let promoted = cluster.replica_of(old).unwrap().port();
    cluster.failover(promoted).unwrap();
    cluster_writes(&mut client, 3, 1500);
    let recovery = wait_equal(&cluster, &target, &[&source, &sink]);
    harness::pipeline::record_reliability(
        "cluster source master fails over (CLUSTER FAILOVER)",
        1,
        3 * 1500 + 150,
        recovery,
    );
    // Shards share partitions here, so the test broker sometimes hands the sink a later batch
    // first (docs/reliability.md); the lanes seek back. Shown, not asserted: it is a race.
    eprintln!(
        "offset gaps the sink sought back over: {}",
        (0..16)
            .filter_map(|p| sink.metric("sink_offset_gaps_total", &[("partition", &p.to_string())]))
            .fold(0.0, |a, b| a + b)
    );
    harness::wait_for(
        "the shard's link to move to the promoted master",
        Duration::from_secs(30),
        || {
            let promoted = cluster.node(promoted)?;
            (promoted.info_field("replication", "connected_slaves")? == "2").then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", source.log()));
    assert_eq!(
        metric("source_full_syncs_total", "source/0"),
        1.0,
        "the failover must not cost a full resync: {}",
        source.log()
    );
    assert!(metric("source_partial_syncs_total", "source/0") >= 1.0);
    cluster_writes(&mut client, 4, 500);
    wait_equal(&cluster, &target, &[&source, &sink]);

    // A slot with keys moves to another shard: MIGRATE's RESTORE-ASKING arrives on one link and
    // its DEL on another, and the target must keep the key (ADR 0007).
    let slot = proto::key_slot(b"c:0").get();
    let (_, to) = owner_and_another(&cluster, slot);
    cluster.migrate_slot(slot, to).unwrap();
    cluster_writes(&mut client, 5, 300);
    wait_equal(&cluster, &target, &[&source, &sink]);
    harness::wait_for(
        "the connector to see the shard's new slots",
        Duration::from_secs(30),
        || {
            source
                .log()
                .contains("the shard now serves slots")
                .then_some(())
        },
    )
    .unwrap();

    // FLUSHALL on one master (the one that received the slot) empties that shard's slots only,
    // here and on the target.
    let flushed = cluster.node(to).unwrap();
    let before: usize = target.cmd::<Vec<String>>(&["KEYS", "*"]).unwrap().len();
    let _: () = flushed.cmd(&["FLUSHALL"]).unwrap();
    // Equal again means the other shards' keys are still on the target, and the moved slot's
    // keys are gone.
    wait_equal(&cluster, &target, &[&source, &sink]);
    let after: usize = target.cmd::<Vec<String>>(&["KEYS", "*"]).unwrap().len();
    assert!(
        after > 0 && after < before,
        "one shard's keys were flushed: {before} keys before, {after} after"
    );
    cluster_writes(&mut client, 6, 300);
    wait_equal(&cluster, &target, &[&source, &sink]);

    // kill -9 of the connector while the cluster takes writes: every shard resumes from its own
    // checkpoint with a partial resync.
    let mut source = source;
    source.kill9();
    cluster_writes(&mut client, 7, 300);
    source.restart().unwrap();
    cluster_writes(&mut client, 8, 300);
    let recovery = wait_equal(&cluster, &target, &[&source, &sink]);
    harness::pipeline::record_reliability(
        "kill -9 of the source connector, cluster source",
        1,
        2 * (3 * 300 + 30),
        recovery,
    );
    for shard in &shards {
        let metric = |name: &str| source.metric(name, &[("shard", shard)]).unwrap_or(0.0);
        assert_eq!(
            metric("source_full_syncs_total"),
            0.0,
            "{shard}: {}",
            source.log()
        );
        assert_eq!(metric("source_partial_syncs_total"), 1.0, "{shard}");
    }
}

/// A source master whose slots all move to another master (as when a node is drained before it
/// is removed): its shard's link stops after a final checkpoint instead of idling (or retrying
/// a departed node) forever, and the writes that now land on the other shards still arrive.
#[test]
fn a_shard_whose_slots_all_moved_is_retired() {
    let cluster = RedisCluster::start(3, 0, RedisConfig::default()).unwrap();
    let target =
        RedisServer::start(RedisConfig::default().with("maxmemory-policy", "noeviction")).unwrap();
    let mut client = cluster.client();
    cluster_writes(&mut client, 1, 500);
    let (_broker, source, sink) = connectors(&cluster.nodes()[0].url(), &target);
    wait_equal(&cluster, &target, &[&source, &sink]);
    assert_eq!(source.metric("source_cluster_shards", &[]), Some(3.0));

    let masters: Vec<u16> = cluster.masters().iter().map(|m| m.port()).collect();
    cluster.move_all_slots(masters[2], masters[0]).unwrap();
    cluster_writes(&mut client, 2, 500);
    harness::wait_for(
        "the drained shard to retire",
        Duration::from_secs(30),
        || (source.metric("source_cluster_shards_retired_total", &[])? == 1.0).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", source.log()));
    assert_eq!(source.metric("source_cluster_shards", &[]), Some(2.0));
    assert!(
        source
            .log()
            .contains("stopping its link after a final checkpoint"),
        "{}",
        source.log()
    );
    cluster_writes(&mut client, 3, 500);
    wait_equal(&cluster, &target, &[&source, &sink]);
    // `verify` reads the source cluster master by master.
    let (ok, out) = tests::verify(&sink, &cluster.nodes()[0].url());
    assert!(ok && out.contains("source and target match"), "{out}");
}

/// kill -9 of the connector while the old owner's link lags behind a slot migration: the new
/// owner's imports are published and checkpointed, the old owner's deletes are not yet read.
/// After the restart only those deletes are replayed; they are MIGRATE's own and must be
/// dropped, which takes the memory of the imports kept in the checkpoint topic (ADR 0007).
/// Published, they would delete the migrated keys on the target.
/// A 3-master cluster with writes, the connectors, and the shard of key `c:0` (the old owner)
/// reached through a proxy that can hold its stream back: its node advertises the proxy's port.
struct LaggingOldOwner {
    cluster: RedisCluster,
    target: RedisServer,
    proxy: harness::proxy::FaultProxy,
    slot: u16,
    /// Port and shard name of the old owner and of the new one.
    from: (u16, String),
    to: (u16, String),
    broker: Broker,
    source: Connector,
    sink: Connector,
}

impl LaggingOldOwner {
    fn start() -> LaggingOldOwner {
        let cluster = RedisCluster::start(3, 0, RedisConfig::default()).unwrap();
        let target =
            RedisServer::start(RedisConfig::default().with("maxmemory-policy", "noeviction"))
                .unwrap();
        cluster_writes(&mut cluster.client(), 1, 500);
        let slot = proto::key_slot(b"c:0").get();
        let shard_of = |port: u16| {
            [0u16, 5461, 10923]
                .into_iter()
                .find(|&a| cluster.master_of_slot(a).map(|m| m.port()) == Some(port))
                .map(|a| format!("source/{a}"))
                .unwrap()
        };
        let (from, to) = owner_and_another(&cluster, slot);
        let (from, to) = ((from, shard_of(from)), (to, shard_of(to)));
        let proxy = harness::proxy::FaultProxy::start(&format!("127.0.0.1:{}", from.0)).unwrap();
        cluster.announce_port(from.0, proxy.port()).unwrap();
        let (broker, source, sink) = connectors(&cluster.node(from.0).unwrap().url(), &target);
        wait_equal(&cluster, &target, &[&source, &sink]);
        LaggingOldOwner {
            cluster,
            target,
            proxy,
            slot,
            from,
            to,
            broker,
            source,
            sink,
        }
    }

    fn keys_in_slot(&self) -> i64 {
        self.cluster
            .node(self.from.0)
            .unwrap()
            .cmd(&["CLUSTER", "COUNTKEYSINSLOT", &self.slot.to_string()])
            .unwrap()
    }

    fn wait_equal(&self) {
        wait_equal(&self.cluster, &self.target, &[&self.source, &self.sink]);
    }
}

/// A slot migrates while the old owner's link lags (the proxy delays it by 1.5 s) right after
/// the migrated counter was incremented there: the new owner's import must reach the topic
/// after those increments and the old owner's delete, or the target applies them on top of the
/// migrated value (ADR 0007, the order rule).
#[test]
fn an_import_waits_for_the_lagging_old_owners_writes_and_delete() {
    let t = LaggingOldOwner::start();
    t.proxy.set_latency(Duration::from_millis(1500));
    let old = t.cluster.node(t.from.0).unwrap();
    for _ in 0..5 {
        let _: i64 = old.cmd(&["INCR", "c:0"]).unwrap();
    }
    let keys = t.keys_in_slot() as f64;
    t.cluster.migrate_slot(t.slot, t.to.0).unwrap();
    t.wait_equal();
    t.proxy.set_latency(Duration::ZERO);
    cluster_writes(&mut t.cluster.client(), 2, 300);
    t.wait_equal();
    let metric = |name: &str, shard: &str| t.source.metric(name, &[("shard", shard)]);
    assert!(
        metric("source_migration_import_waits_total", &t.to.1).unwrap_or(0.0) >= 1.0,
        "{}",
        t.source.log()
    );
    assert_eq!(
        metric("source_migration_import_wait_timeouts_total", &t.to.1),
        None
    );
    // The old owner's link was 1.5 s behind: the first import held its link about that long.
    let held = metric("source_migration_import_wait_seconds_sum", &t.to.1).unwrap_or(0.0);
    assert!(held >= 1.0, "held {held} s: {}", t.source.log());
    // Ordered after the delete, nothing to drop; the imports' records settle.
    assert_eq!(
        metric("source_migrated_deletes_dropped_total", &t.from.1),
        None
    );
    harness::wait_for("the imports to settle", Duration::from_secs(30), || {
        (metric("source_migration_imports_settled_total", &t.from.1)? == keys).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", t.source.log()));
}

/// kill -9 of the connector while the old owner's link is held back entirely during a slot
/// migration: the new owner's imports wait 10 s for the old owner's delete, give up, and are
/// published and checkpointed; the old owner's deletes are not read yet. After the restart only
/// those deletes are replayed; they are MIGRATE's own and must be dropped, which takes the
/// memory of the imports kept in the checkpoint topic (ADR 0007). Published, they would delete
/// the migrated keys on the target.
#[test]
fn a_migration_survives_a_restart_while_the_old_owners_link_lags() {
    let t = LaggingOldOwner::start();
    t.proxy.set_blackhole(true);
    let keys = t.keys_in_slot();
    assert!(keys > 0, "the slot holds keys");
    t.cluster.migrate_slot(t.slot, t.to.0).unwrap();
    let written: u64 = t
        .cluster
        .node(t.to.0)
        .unwrap()
        .info_field("replication", "master_repl_offset")
        .unwrap()
        .parse()
        .unwrap();
    let metric =
        |source: &Connector, name: &str, shard: &str| source.metric(name, &[("shard", shard)]);
    harness::wait_for(
        "the new owner's imports to be checkpointed",
        Duration::from_secs(60),
        || {
            let at = metric(&t.source, "source_checkpoint_offset", &t.to.1)?;
            (at >= written as f64).then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", t.source.log()));
    assert_eq!(
        metric(
            &t.source,
            "source_migration_imports_remembered_total",
            &t.to.1
        ),
        Some(keys as f64),
        "{}",
        t.source.log()
    );
    assert_eq!(
        metric(
            &t.source,
            "source_migration_import_wait_timeouts_total",
            &t.to.1
        ),
        Some(1.0),
        "{}",
        t.source.log()
    );
    assert_eq!(
        metric(
            &t.source,
            "source_migrated_deletes_dropped_total",
            &t.from.1
        ),
        None,
        "the old owner's link read nothing since the blackhole"
    );

    let LaggingOldOwner {
        cluster,
        target,
        proxy,
        from,
        broker: _broker,
        mut source,
        sink,
        ..
    } = t;
    source.kill9();
    proxy.set_blackhole(false);
    source.restart().unwrap();
    cluster_writes(&mut cluster.client(), 2, 300);
    wait_equal(&cluster, &target, &[&source, &sink]);
    assert_eq!(
        metric(&source, "source_migrated_deletes_dropped_total", &from.1),
        Some(keys as f64),
        "the replayed deletes were MIGRATE's: {}",
        source.log()
    );
    assert!(
        source
            .log()
            .contains("key(s) imported by a shard during a slot migration are remembered"),
        "{}",
        source.log()
    );
    // Once the old owner checkpointed past the dropped deletes, their imports are forgotten.
    harness::wait_for("the imports to settle", Duration::from_secs(30), || {
        let settled = metric(&source, "source_migration_imports_settled_total", &from.1)?;
        (settled == keys as f64).then_some(())
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", source.log()));
    assert_eq!(
        metric(&source, "source_partial_syncs_total", &from.1),
        Some(1.0),
        "{}",
        source.log()
    );
}

/// A replica added after the connector started, then promoted by `CLUSTER FAILOVER`: the
/// shard's link follows it with a partial resync. The topology watcher sees the new replica;
/// the shard's own loop, which looks for its new master among the shard's nodes, must know it
/// too (a replica missing from the first `CLUSTER NODES` once left a shard unable to follow a
/// failover, about one run in ten of the failover test).
#[test]
fn a_replica_added_later_is_followed_through_its_promotion() {
    let mut cluster = RedisCluster::start(3, 0, RedisConfig::default()).unwrap();
    let target =
        RedisServer::start(RedisConfig::default().with("maxmemory-policy", "noeviction")).unwrap();
    cluster_writes(&mut cluster.client(), 1, 300);
    let (_broker, source, sink) = connectors(&cluster.nodes()[0].url(), &target);
    wait_equal(&cluster, &target, &[&source, &sink]);

    let old = cluster.master_of_slot(0).unwrap().port();
    let replica = cluster.add_replica(old).unwrap();
    harness::wait_for(
        "the connector to see the new replica",
        Duration::from_secs(30),
        || {
            source
                .log()
                .contains("new replica(s) of the shard's master")
                .then_some(())
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", source.log()));
    cluster.failover(replica).unwrap();
    cluster_writes(&mut cluster.client(), 2, 300);
    wait_equal(&cluster, &target, &[&source, &sink]);
    let metric = |name: &str| source.metric(name, &[("shard", "source/0")]);
    // The shard's loop may follow the promotion (its link closed by the demoted master) before
    // the watcher's next refresh counts it.
    harness::wait_for(
        "the watcher to count the failover",
        Duration::from_secs(30),
        || (metric("source_cluster_failovers_total")? == 1.0).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", source.log()));
    assert_eq!(
        metric("source_full_syncs_total"),
        Some(1.0),
        "{}",
        source.log()
    );
    assert!(
        metric("source_partial_syncs_total").unwrap_or(0.0) >= 1.0,
        "{}",
        source.log()
    );
    assert_eq!(source.metric("source_cluster_shards", &[]), Some(3.0));
}
