//! Managed Redis endpoints: a proxy that takes single-slot transactions only (in front of a
//! cluster), twemproxy (no transactions at all), a source whose replication commands are
//! renamed, a source behind Sentinel, and logs for collectors.

use harness::broker::{random_topic, Broker, Storage};
use harness::cluster::RedisCluster;
use harness::connector::{binary, Connector, Kind};
use harness::dataset::{self, Dataset};
use harness::pipeline::{self, Options};
use harness::redis::{exec, RedisConfig, RedisServer};
use harness::slot_proxy::SlotProxy;
use harness::twemproxy::Twemproxy;
use std::path::Path;
use std::time::Duration;
use tests::wait_datasets_equal;

fn target_config() -> RedisConfig {
    RedisConfig::default().with("maxmemory-policy", "noeviction")
}

/// Runs `<connector> check --config <file>`: (succeeded, stdout).
fn check(kind: Kind, config: &Path) -> (bool, String) {
    let out = std::process::Command::new(binary(kind))
        .args(["check", "--config"])
        .arg(config)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    (out.status.success(), stdout)
}

/// The sink's config for `url`, with `redis_lines` added to its `[redis]` table.
fn sink_config(url: &str, broker: &Broker, topic: &str, redis_lines: &str) -> String {
    pipeline::sink_config(url, &broker.bootstrap(), topic, &Options::default())
        .replace("[redis]\n", &format!("[redis]\n{redis_lines}\n"))
}

/// Counters, lists and appends over many slots (each loss or doubling shows), and multi-slot
/// commands (RENAME, SMOVE, a cross-slot MULTI) that the sink must run outside one transaction.
fn writes(source: &RedisServer, round: u32, n: u32) {
    let mut conn = source.conn();
    for i in 0..n {
        let item = format!("{round}:{i}");
        exec(&mut conn, &[b"INCR", format!("c:{}", i % 40).as_bytes()]);
        exec(
            &mut conn,
            &[
                b"RPUSH",
                format!("l:{}", i % 10).as_bytes(),
                item.as_bytes(),
            ],
        );
        exec(
            &mut conn,
            &[
                b"APPEND",
                format!("log:{}", i % 5).as_bytes(),
                item.as_bytes(),
            ],
        );
        if i % 50 == 0 {
            exec(&mut conn, &[b"SET", b"from", item.as_bytes()]);
            exec(
                &mut conn,
                &[b"RENAME", b"from", format!("to:{round}").as_bytes()],
            );
            exec(&mut conn, &[b"SADD", b"set-a", item.as_bytes()]);
            exec(&mut conn, &[b"SMOVE", b"set-a", b"set-b", item.as_bytes()]);
            exec(&mut conn, &[b"MULTI"]);
            exec(&mut conn, &[b"INCR", b"cross-a"]);
            exec(&mut conn, &[b"INCR", b"cross-b"]);
            exec(&mut conn, &[b"EXEC"]);
        }
    }
}

/// A target behind a proxy that takes a transaction only when all its keys are in one slot and
/// refuses SELECT inside one (DCS Proxy Cluster, Tair proxy): every batch goes in as one
/// transaction per slot with that slot's checkpoint, and kill -9 of the sink applies nothing
/// twice and loses nothing.
#[test]
fn proxy_target_takes_single_slot_transactions_through_sink_kill9() {
    let source = RedisServer::start(RedisConfig::default()).unwrap();
    writes(&source, 0, 500);
    let cluster = RedisCluster::start(3, 0, target_config()).unwrap();
    let proxy = SlotProxy::start(&cluster.nodes()[0].addr()).unwrap();
    let broker = Broker::start(Storage::Memory).unwrap();
    let topic = random_topic("to-proxy");
    let source_connector = Connector::start(
        Kind::Source,
        &pipeline::source_config(
            &source.url(),
            &broker.bootstrap(),
            &topic,
            &Options::default(),
        ),
        &[],
    )
    .unwrap();
    let config = sink_config(&proxy.url(), &broker, &topic, "mode = \"proxy\"");
    let mut sink = Connector::start(Kind::Sink, &config, &[]).unwrap();
    let (ok, out) = check(Kind::Sink, sink.config_path());
    assert!(ok, "{out}");
    let expected = || dataset::read(&mut [source.conn()]).unwrap();
    let actual = || dataset::read(&mut cluster.master_conns()).unwrap();
    let logs = [&source_connector, &sink];
    wait_datasets_equal(expected, actual, Duration::from_secs(120), &logs);
    writes(&source, 1, 600);
    for round in 2..5 {
        std::thread::sleep(Duration::from_millis(300));
        sink.kill9();
        writes(&source, round, 300);
        sink.restart().unwrap();
    }
    writes(&source, 5, 300);
    let logs = [&source_connector, &sink];
    wait_datasets_equal(expected, actual, Duration::from_secs(120), &logs);
    assert!(
        proxy.transactions() > 20,
        "{} transactions",
        proxy.transactions()
    );
    assert_eq!(
        proxy.refused_cross_slot(),
        0,
        "cross-slot transactions sent"
    );
    assert_eq!(
        proxy.refused_select(),
        0,
        "SELECT sent inside a transaction"
    );
    let sum: i64 = (0..40)
        .map(|i| source.cmd::<i64>(&["GET", &format!("c:{i}")]).unwrap())
        .sum();
    assert_eq!(
        sum,
        500 + 600 + 3 * 300 + 300,
        "every INCR once on the source"
    );
}

/// The same writes through twemproxy, which takes no transactions: `check` and `run` say so
/// and name `redis.transactions`; with `redis.transactions = false` idempotent data ends equal
/// through kill -9 of the sink, and counters are applied at least once, at most one batch per
/// lane and kill more.
#[test]
fn twemproxy_target_without_transactions_at_least_once() {
    let source = RedisServer::start(RedisConfig::default()).unwrap();
    let backends = [
        RedisServer::start(target_config()).unwrap(),
        RedisServer::start(target_config()).unwrap(),
    ];
    let proxy = Twemproxy::start(&[&backends[0], &backends[1]]).unwrap();
    let broker = Broker::start(Storage::Memory).unwrap();
    let topic = random_topic("to-twemproxy");
    let partitions = Options::default().partitions;
    let batch_records = 64;

    // Transactions assumed: refused at once, with the setting to use.
    let wrong = sink_config(
        &proxy.url(),
        &broker,
        &topic,
        "mode = \"proxy\"\nselect = false",
    );
    let mut sink = Connector::start(Kind::Sink, &wrong, &[]).unwrap();
    let (ok, out) = check(Kind::Sink, sink.config_path());
    assert!(!ok, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL") && l.contains("redis.transactions = false")),
        "{out}"
    );
    harness::wait_for("the sink to exit", Duration::from_secs(60), || {
        sink.process().exit_status()
    })
    .map(|status| assert!(!status.success()))
    .unwrap();
    let log = sink.log();
    assert!(
        log.lines().any(|l| l.contains("refuses transactions") && l.contains("redis.transactions = false")),
        "{log}"
    );
    drop(sink);

    let mut conn = source.conn();
    twemproxy_writes(&mut conn, 0, 500);
    let source_connector = Connector::start(
        Kind::Source,
        &pipeline::source_config(
            &source.url(),
            &broker.bootstrap(),
            &topic,
            &Options::default(),
        ),
        &[],
    )
    .unwrap();
    let config = sink_config(
        &proxy.url(),
        &broker,
        &topic,
        "mode = \"proxy\"\nselect = false\ntransactions = false",
    )
    .replace(
        "[apply]\n",
        &format!("[apply]\nbatch_records = {batch_records}\n"),
    );
    assert!(config.contains("batch_records"), "{config}");
    let mut sink = Connector::start(Kind::Sink, &config, &[]).unwrap();
    let (ok, out) = check(Kind::Sink, sink.config_path());
    assert!(ok, "{out}");
    assert!(out.contains("without transactions"), "{out}");
    let counters = |ds: Dataset| -> (Dataset, i64) {
        let mut sum = 0;
        let mut rest = Dataset::default();
        for ((db, k), e) in ds.keys {
            if k.starts_with(b"c:") {
                if let harness::dataset::Value::String(v) = &e.value {
                    sum += String::from_utf8_lossy(v).parse::<i64>().unwrap_or(0);
                }
            } else {
                rest.keys.insert((db, k), e);
            }
        }
        (rest, sum)
    };
    let expected = || counters(dataset::read(&mut [source.conn()]).unwrap()).0;
    let actual =
        || counters(dataset::read(&mut [backends[0].conn(), backends[1].conn()]).unwrap()).0;
    let logs = [&source_connector, &sink];
    wait_datasets_equal(expected, actual, Duration::from_secs(120), &logs);
    // Kill -9 the sink while writes flow, so batches are cut in the middle.
    let kills = 6;
    let writer = {
        let url = source.url();
        std::thread::spawn(move || {
            let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
            for round in 1..=40 {
                twemproxy_writes(&mut conn, round, 200);
            }
        })
    };
    for _ in 0..kills {
        std::thread::sleep(Duration::from_millis(400));
        sink.kill9();
        sink.restart().unwrap();
    }
    writer.join().unwrap();
    let logs = [&source_connector, &sink];
    wait_datasets_equal(expected, actual, Duration::from_secs(120), &logs);
    // Counters: wait until the target holds at least every increment, then measure the excess.
    let source_sum = counters(dataset::read(&mut [source.conn()]).unwrap()).1;
    let target_sum = harness::wait_for(
        "the counters on the target",
        Duration::from_secs(60),
        || {
            let sum =
                counters(dataset::read(&mut [backends[0].conn(), backends[1].conn()]).unwrap()).1;
            (sum >= source_sum).then_some(sum)
        },
    )
    .unwrap();
    let doubled = target_sum - source_sum;
    let bound = i64::from(kills) * i64::from(partitions) * batch_records;
    eprintln!("twemproxy: {source_sum} increments, {doubled} applied twice after {kills} kills (bound {bound})");
    assert!(
        doubled <= bound,
        "{doubled} increments applied twice, more than {bound}"
    );
}

/// Writes through twemproxy's rules: idempotent ones (SET, HSET, SADD, ZADD, DEL, PEXPIRE) that
/// end equal even when applied twice, and INCRs that show each doubling.
fn twemproxy_writes(conn: &mut redis::Connection, round: u32, n: u32) {
    for i in 0..n {
        let v = format!("{round}:{i}");
        exec(
            conn,
            &[b"SET", format!("s:{}", i % 300).as_bytes(), v.as_bytes()],
        );
        exec(
            conn,
            &[
                b"HSET",
                format!("h:{}", i % 30).as_bytes(),
                format!("f{}", i % 7).as_bytes(),
                v.as_bytes(),
            ],
        );
        exec(
            conn,
            &[b"SADD", format!("set:{}", i % 20).as_bytes(), v.as_bytes()],
        );
        exec(
            conn,
            &[b"ZADD", b"z", format!("{i}").as_bytes(), v.as_bytes()],
        );
        exec(conn, &[b"INCR", format!("c:{}", i % 40).as_bytes()]);
        if i % 10 == 0 {
            exec(conn, &[b"DEL", format!("s:{}", (i + 5) % 300).as_bytes()]);
            exec(
                conn,
                &[b"PEXPIRE", format!("h:{}", i % 30).as_bytes(), b"3600000"],
            );
        }
    }
}
