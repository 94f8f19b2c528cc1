//! Self-tests of each harness piece against real processes.

use harness::broker::{random_topic, Broker, Storage};
use harness::cluster::RedisCluster;
use harness::dataset::{self, CompareOptions, Difference};
use harness::fake_master::{FakeMaster, Playback};
use harness::redis::{MasterReplica, RedisConfig, RedisServer};
use std::io::{Read, Write};
use std::time::Duration;

#[test]
fn standalone_with_password_acl_and_restart() {
    let mut s = RedisServer::start(RedisConfig {
        password: Some("s3cret".into()),
        acl_users: vec![("writer".into(), "wpass".into(), "~* &* +@all".into())],
        maxmemory: Some("10mb".into()),
        maxmemory_policy: Some("noeviction".into()),
        ..Default::default()
    })
    .unwrap();
    let _: () = s.cmd(&["SET", "k", "v"]).unwrap();
    assert_eq!(
        s.info_field("memory", "maxmemory_policy").as_deref(),
        Some("noeviction")
    );
    let acl = redis::Client::open(format!("redis://writer:wpass@127.0.0.1:{}", s.port())).unwrap();
    let mut c = acl.get_connection().unwrap();
    let v: String = redis::cmd("GET").arg("k").query(&mut c).unwrap();
    assert_eq!(v, "v");
    let no_auth = redis::Client::open(format!("redis://127.0.0.1:{}", s.port())).unwrap();
    let err = redis::cmd("GET")
        .arg("k")
        .query::<String>(&mut no_auth.get_connection().unwrap())
        .unwrap_err();
    assert_eq!(err.code(), Some("NOAUTH"));

    let pid = s.process().pid();
    s.kill9();
    s.restart().unwrap();
    assert_ne!(s.process().pid(), pid);
    let _: String = s.cmd(&["PING"]).unwrap();
}

#[test]
fn master_replica_replicates_and_fails_over() {
    let mut mr = MasterReplica::start(RedisConfig::default()).unwrap();
    let _: () = mr.master.cmd(&["SET", "a", "1"]).unwrap();
    harness::wait_for("replica has key", Duration::from_secs(10), || {
        mr.replica
            .cmd::<Option<String>>(&["GET", "a"])
            .ok()
            .flatten()
    })
    .unwrap();
    let old_master = mr.master.port();
    mr.failover().unwrap();
    assert_eq!(mr.replica.port(), old_master);
    assert_eq!(mr.master.role().as_deref(), Some("master"));
}

#[test]
fn three_master_cluster_forms_fails_over_and_migrates() {
    let cluster = RedisCluster::start(3, 1, RedisConfig::default()).unwrap();
    assert_eq!(cluster.masters().len(), 3);
    assert_eq!(cluster.replicas().len(), 3);

    let owner = cluster.master_of_slot(12182).unwrap(); // slot of "foo"
    let mut c = owner.conn();
    let _: () = redis::cmd("SET")
        .arg("foo")
        .arg("bar")
        .query(&mut c)
        .unwrap();

    // Move the slot to another master; the key must move with it.
    let target = cluster
        .masters()
        .into_iter()
        .find(|m| m.port() != owner.port())
        .unwrap()
        .port();
    cluster.migrate_slot(12182, target).unwrap();
    let new_owner = cluster.master_of_slot(12182).unwrap();
    assert_eq!(new_owner.port(), target);
    assert_eq!(new_owner.cmd::<String>(&["GET", "foo"]).unwrap(), "bar");

    // Fail over the master that now owns it.
    let replica = cluster
        .replicas()
        .into_iter()
        .find(|r| {
            r.info_field("replication", "master_port").as_deref() == Some(&target.to_string())
        })
        .unwrap()
        .port();
    cluster.failover(replica).unwrap();
    assert_eq!(cluster.master_of_slot(12182).unwrap().port(), replica);
}

#[test]
fn broker_memory_creates_topic_with_partitions() {
    let broker = Broker::start(Storage::Memory).unwrap();
    let topic = random_topic("selftest");
    broker.create_topic(&topic, 4).unwrap();
    assert_eq!(broker.partition_count(&topic), Some(4));
}

#[test]
fn broker_sqlite_keeps_topics_across_kill9() {
    let mut broker = Broker::start(Storage::Sqlite).unwrap();
    let topic = random_topic("selftest");
    broker.create_topic(&topic, 3).unwrap();
    broker.kill9();
    broker.restart().unwrap();
    assert_eq!(broker.partition_count(&topic), Some(3));
}

#[test]
fn comparison_finds_planted_differences() {
    let a = RedisServer::start(RedisConfig::default()).unwrap();
    let b = RedisServer::start(RedisConfig::default()).unwrap();
    for s in [&a, &b] {
        let _: () = s.cmd(&["SET", "same", "1"]).unwrap();
        let _: () = s.cmd(&["RPUSH", "list", "x", "y"]).unwrap();
        let _: () = s.cmd(&["SELECT", "0"]).unwrap();
        let _: () = s.cmd(&["XADD", "st", "1-1", "f", "v"]).unwrap();
        let _: () = s.cmd(&["XGROUP", "CREATE", "st", "g", "0"]).unwrap();
        let _: i64 = s.cmd(&["ZADD", "z", "1.5", "m"]).unwrap();
        let _: i64 = s.cmd(&["PEXPIREAT", "same", "4102444800000"]).unwrap();
    }
    let read = |s: &RedisServer| dataset::read(&mut [s.conn()]).unwrap();
    let opts = CompareOptions::default();
    let report = read(&a).compare(&read(&b), &opts);
    assert!(report.is_equal(), "{report}");
    assert_eq!(report.compared, 4);

    // Plant one of each kind of difference.
    let _: i64 = b.cmd(&["RPUSH", "list", "z"]).unwrap();
    let _: () = a.cmd(&["SET", "only-in-a", "1"]).unwrap();
    let _: () = b.cmd(&["SET", "only-in-b", "1"]).unwrap();
    let _: i64 = b.cmd(&["ZADD", "z", "1.25", "m"]).unwrap();
    let _: i64 = b.cmd(&["PEXPIREAT", "same", "4102444900000"]).unwrap();
    let report = read(&a).compare(&read(&b), &opts);
    let text = report.to_string();
    assert_eq!(report.differences.len(), 5, "{text}");
    assert!(report.differences.contains(&Difference::Missing {
        db: 0,
        key: b"only-in-a".to_vec()
    }));
    assert!(report.differences.contains(&Difference::Extra {
        db: 0,
        key: b"only-in-b".to_vec()
    }));
    assert!(text.contains("ttl"), "{text}");
    assert!(text.contains("zset score"), "{text}");
}

#[test]
fn fake_master_serves_a_capture_to_a_plain_tcp_client() {
    let (bin, _json) = harness::corpus::capture("7.0.15", "stream");
    let expected = std::fs::read(&bin).unwrap();
    let master = FakeMaster::start(Playback::from_file(&bin).unwrap()).unwrap();
    let mut s = std::net::TcpStream::connect(("127.0.0.1", master.port())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"PING\r\n").unwrap();
    let mut pong = [0u8; 7];
    s.read_exact(&mut pong).unwrap();
    assert_eq!(&pong, b"+PONG\r\n");
    s.write_all(b"*3\r\n$8\r\nREPLCONF\r\n$4\r\ncapa\r\n$3\r\neof\r\n")
        .unwrap();
    let mut ok = [0u8; 5];
    s.read_exact(&mut ok).unwrap();
    assert_eq!(&ok, b"+OK\r\n");
    s.write_all(b"PSYNC ? -1\r\n").unwrap();
    let mut got = vec![0u8; expected.len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, expected);
    s.write_all(b"*3\r\n$8\r\nREPLCONF\r\n$3\r\nACK\r\n$3\r\n123\r\n")
        .unwrap();
    harness::wait_for("ack recorded", Duration::from_secs(5), || {
        master.observed().last_ack.filter(|&a| a == 123)
    })
    .unwrap();
    assert!(master.observed().commands.iter().any(|c| c[0] == "PSYNC"));
}

/// The strict slot proxy: commands reach their slot's master, a transaction in one slot runs,
/// a cross-slot one and a SELECT inside one are refused, and nothing of them runs.
#[test]
fn slot_proxy_enforces_single_slot_transactions() {
    let cluster = RedisCluster::start(3, 0, RedisConfig::default()).unwrap();
    let proxy = harness::slot_proxy::SlotProxy::start(&cluster.nodes()[0].addr()).unwrap();
    let mut c = redis::Client::open(proxy.url())
        .unwrap()
        .get_connection()
        .unwrap();
    for i in 0..50 {
        let _: () = redis::cmd("SET")
            .arg(format!("k{i}"))
            .arg(i)
            .query(&mut c)
            .unwrap();
    }
    let mut client = cluster.client();
    assert_eq!(
        client.exec(&[b"GET", b"k42"]),
        redis::Value::BulkString(b"42".to_vec())
    );
    let one_slot: Vec<i64> = redis::pipe()
        .atomic()
        .cmd("INCR")
        .arg("{t}a")
        .cmd("INCR")
        .arg("{t}b")
        .query(&mut c)
        .unwrap();
    assert_eq!(one_slot, vec![1, 1]);
    // Each command on its own, as a client that checks every reply would send them.
    let mut transaction = |commands: &[&[&str]]| -> redis::RedisError {
        let _: () = redis::cmd("MULTI").query(&mut c).unwrap();
        for args in commands {
            let mut cmd = redis::cmd(args[0]);
            args[1..].iter().for_each(|a| {
                cmd.arg(*a);
            });
            let _ = cmd.query::<redis::Value>(&mut c);
        }
        redis::cmd("EXEC")
            .query::<redis::Value>(&mut c)
            .unwrap_err()
    };
    let cross = transaction(&[&["INCR", "a"], &["INCR", "b"]]);
    assert_eq!(cross.code(), Some("CROSSSLOT"), "{cross}");
    let select = transaction(&[&["SELECT", "0"], &["INCR", "{t}a"]]);
    assert_eq!(select.code(), Some("EXECABORT"), "{select}");
    assert_eq!(
        client.exec(&[b"GET", b"{t}a"]),
        redis::Value::BulkString(b"1".to_vec()),
        "nothing of a refused transaction ran"
    );
    assert_eq!(client.exec(&[b"EXISTS", b"a"]), redis::Value::Int(0));
    assert_eq!(
        (
            proxy.transactions(),
            proxy.refused_cross_slot(),
            proxy.refused_select()
        ),
        (1, 1, 1)
    );
}
