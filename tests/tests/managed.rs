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

/// A connector whose settings the endpoint refuses: `check` fails with a line naming `setting`,
/// and `run` exits non-zero. Returns the log of the run.
fn refused_at_start(kind: Kind, config: &str, setting: &str) -> String {
    let mut connector = Connector::start(kind, config, &[]).unwrap();
    let (ok, out) = check(kind, connector.config_path());
    assert!(!ok, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL") && l.contains(setting)),
        "{out}"
    );
    let status = harness::wait_for("the connector to exit", Duration::from_secs(60), || {
        connector.process().exit_status()
    })
    .unwrap();
    assert!(!status.success(), "{}", connector.log());
    connector.log()
}

/// A source connector with the harness's default settings.
fn source_connector(url: &str, broker: &Broker, topic: &str) -> Connector {
    let config = pipeline::source_config(url, &broker.bootstrap(), topic, &Options::default());
    Connector::start(Kind::Source, &config, &[]).unwrap()
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
    let source_connector = source_connector(&source.url(), &broker, &topic);
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
    let log = refused_at_start(Kind::Sink, &wrong, "redis.transactions = false");
    assert!(
        log.lines().any(|l| l.contains("refuses transactions") && l.contains("redis.transactions = false")),
        "{log}"
    );

    let mut conn = source.conn();
    twemproxy_writes(&mut conn, 0, 500);
    let source_connector = source_connector(&source.url(), &broker, &topic);
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

/// A source whose master renamed `PSYNC` and disabled `SYNC` (as some managed services do):
/// without `redis.rename_commands` the connector stops with one line naming the setting; with
/// it, the pipeline runs, also across a kill -9 of the connector. Open-source Redis serves a
/// renamed PSYNC as SYNC (no position), so each connection there is a full sync.
#[test]
fn source_with_renamed_replication_commands() {
    let source = RedisServer::start(
        RedisConfig::default()
            .rename_command("PSYNC", "MY-PSYNC-9f2")
            .rename_command("SYNC", "")
            .with("repl-backlog-size", "64mb"),
    )
    .unwrap();
    let target = RedisServer::start(target_config()).unwrap();
    let broker = Broker::start(Storage::Memory).unwrap();
    let topic = random_topic("renamed");
    let plain = pipeline::source_config(
        &source.url(),
        &broker.bootstrap(),
        &topic,
        &Options::default(),
    );

    let log = refused_at_start(Kind::Source, &plain, "redis.rename_commands.PSYNC");
    let line = log
        .lines()
        .find(|l| l.contains("rename_commands"))
        .unwrap_or_else(|| panic!("no line names redis.rename_commands:\n{log}"));
    assert!(line.contains("SYNC"), "{line}");

    let renamed = plain.replace(
        "[redis]\n",
        "[redis]\nrename_commands = { PSYNC = \"MY-PSYNC-9f2\", SYNC = \"\" }\n",
    );
    let mut source_connector = Connector::start(Kind::Source, &renamed, &[]).unwrap();
    let (ok, out) = check(Kind::Source, source_connector.config_path());
    assert!(ok, "{out}");
    assert!(out.contains("PSYNC known (as MY-PSYNC-9f2)"), "{out}");
    let sink = Connector::start(
        Kind::Sink,
        &sink_config(&target.url(), &broker, &topic, ""),
        &[],
    )
    .unwrap();
    let expected = || dataset::read(&mut [source.conn()]).unwrap();
    let actual = || dataset::read(&mut [target.conn()]).unwrap();
    writes(&source, 1, 300);
    wait_datasets_equal(
        expected,
        actual,
        Duration::from_secs(120),
        &[&source_connector, &sink],
    );
    assert!(
        source_connector
            .log()
            .contains("every reconnection will be a full sync"),
        "{}",
        source_connector.log()
    );
    source_connector.kill9();
    writes(&source, 2, 300);
    source_connector.restart().unwrap();
    writes(&source, 3, 300);
    wait_datasets_equal(
        expected,
        actual,
        Duration::from_secs(120),
        &[&source_connector, &sink],
    );
    assert_eq!(
        source.info_field("stats", "sync_full").as_deref(),
        Some("2"),
        "one sync per connection of the connector"
    );
}

/// A source behind three Sentinels, found by its master name (`redis.url`'s host is not used):
/// a name no Sentinel knows stops the connector with one line; a forced failover under writes
/// moves the link to the promoted replica, which continues with PSYNC (no second full sync),
/// and the target ends equal to the new master.
#[test]
fn sentinel_source_follows_a_forced_failover_with_psync() {
    use harness::redis::MasterReplica;
    use harness::sentinel::{Sentinels, MASTER_NAME};
    use std::sync::{Arc, Mutex};

    let mut pair =
        MasterReplica::start(RedisConfig::default().with("repl-backlog-size", "64mb")).unwrap();
    let sentinels = Sentinels::start(&pair.master, 3, 1).unwrap();
    let target = RedisServer::start(target_config()).unwrap();
    let broker = Broker::start(Storage::Memory).unwrap();
    let topic = random_topic("sentinel");
    let config = |name: &str| {
        let addresses: Vec<String> = sentinels
            .addresses()
            .iter()
            .map(|a| format!("\"{a}\""))
            .collect();
        format!(
            "{}\n[redis.sentinel]\naddresses = [{}]\nmaster_name = \"{name}\"\n",
            pipeline::source_config(
                "redis://found-by-sentinel:6379",
                &broker.bootstrap(),
                &topic,
                &Options::default()
            ),
            addresses.join(", ")
        )
    };

    let log = refused_at_start(
        Kind::Source,
        &config("no-such-master"),
        "redis.sentinel.master_name",
    );
    assert!(
        log.contains("monitors a master named \"no-such-master\""),
        "{log}"
    );

    writes(&pair.master, 0, 300);
    let source_connector = Connector::start(Kind::Source, &config(MASTER_NAME), &[]).unwrap();
    let (ok, out) = check(Kind::Source, source_connector.config_path());
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!(
            "master \"{MASTER_NAME}\" at 127.0.0.1:{}",
            pair.master.port()
        )),
        "{out}"
    );
    let sink = Connector::start(
        Kind::Sink,
        &sink_config(&target.url(), &broker, &topic, ""),
        &[],
    )
    .unwrap();
    let logs = [&source_connector, &sink];
    wait_datasets_equal(
        || dataset::read(&mut [pair.master.conn()]).unwrap(),
        || dataset::read(&mut [target.conn()]).unwrap(),
        Duration::from_secs(120),
        &logs,
    );

    // Writes go to whichever node is the master; the failover happens between two of them
    // (writes a demoted master takes after the promotion are lost by Redis itself, not by the
    // pipeline: the writer holds off while the Sentinels switch).
    let master_url = Arc::new(Mutex::new(pair.master.url()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Rounds of writes done, so the test waits for writes instead of for time.
    let rounds = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let writer = {
        let (master_url, stop, rounds) = (
            Arc::clone(&master_url),
            Arc::clone(&stop),
            Arc::clone(&rounds),
        );
        std::thread::spawn(move || {
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let url = master_url.lock().unwrap();
                let mut conn = redis::Client::open(url.as_str())
                    .unwrap()
                    .get_connection()
                    .unwrap();
                for _ in 0..20 {
                    let item = format!("w:{i}");
                    exec(&mut conn, &[b"INCR", format!("c:{}", i % 40).as_bytes()]);
                    exec(
                        &mut conn,
                        &[
                            b"RPUSH",
                            format!("l:{}", i % 10).as_bytes(),
                            item.as_bytes(),
                        ],
                    );
                    exec(&mut conn, &[b"APPEND", b"log:0", item.as_bytes()]);
                    i += 1;
                }
                drop(url);
                rounds.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
            i
        })
    };
    let rounds_past = |n: u32| {
        harness::wait_for(
            &format!("{n} rounds of writes"),
            Duration::from_secs(60),
            || (rounds.load(std::sync::atomic::Ordering::SeqCst) >= n).then_some(()),
        )
        .unwrap()
    };
    rounds_past(20);
    {
        let mut url = master_url.lock().unwrap();
        // Everything written so far is on the replica before it is promoted, and nothing more
        // reaches the old master's stream meanwhile (the Sentinels' hello PUBLISHes would: a
        // link that received one would be ahead of the new master, which cannot continue it).
        let _: i64 = pair.master.cmd(&["WAIT", "1", "5000"]).unwrap();
        let _: () = pair
            .master
            .cmd(&["CLIENT", "PAUSE", "10000", "WRITE"])
            .unwrap();
        let new_port = sentinels.failover().unwrap();
        assert_eq!(new_port, pair.replica.port());
        std::mem::swap(&mut pair.master, &mut pair.replica);
        let demoted = &pair.replica;
        harness::wait_for(
            "the old master to follow the new one",
            Duration::from_secs(30),
            || (demoted.info_field("replication", "master_link_status")? == "up").then_some(()),
        )
        .unwrap();
        *url = pair.master.url();
    }
    let _: () = pair.replica.cmd(&["CLIENT", "UNPAUSE"]).unwrap();
    rounds_past(rounds.load(std::sync::atomic::Ordering::SeqCst) + 20);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let written = writer.join().unwrap();
    assert!(written > 100, "{written} writes");
    wait_datasets_equal(
        || dataset::read(&mut [pair.master.conn()]).unwrap(),
        || dataset::read(&mut [target.conn()]).unwrap(),
        Duration::from_secs(120),
        &logs,
    );
    let shard = [("shard", "source")];
    let metrics = source_connector.http_get("/metrics").unwrap().1;
    let syncs: Vec<&str> = metrics.lines().filter(|l| l.contains("syncs")).collect();
    assert_eq!(
        source_connector.metric("source_full_syncs_total", &shard),
        Some(1.0),
        "{syncs:?}"
    );
    assert!(source_connector.metric("source_partial_syncs_total", &shard) >= Some(1.0));
    assert!(source_connector.metric("source_sentinel_switches_total", &shard) >= Some(1.0));
}

/// Logs for collectors: no colour codes when stderr is a file, and `log.format = "json"` gives
/// one JSON object per line with the lane's partition and the link's shard as fields.
#[test]
fn logs_are_plain_text_or_json_lines_with_fields() {
    let p = harness::pipeline::Pipeline::start(Options {
        source_env: vec![("SOURCE_LOG__FORMAT".into(), "json".into())],
        ..Options::default()
    })
    .unwrap();
    p.wait_running().unwrap();
    let sink_log = p.sink.log();
    assert!(
        !sink_log.contains('\u{1b}'),
        "escape sequences in {sink_log}"
    );
    assert!(sink_log.contains("lane starts"), "{sink_log}");
    let source_log = p.source_connector.log();
    let lines: Vec<serde_json::Value> = source_log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let streaming = lines
        .iter()
        .find(|l| {
            l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("streaming from offset"))
        })
        .unwrap_or_else(|| panic!("no streaming line in {source_log}"));
    assert_eq!(streaming["fields"]["shard"], "source", "{streaming}");
    assert!(streaming["fields"]["offset"].is_string(), "{streaming}");
    assert_eq!(streaming["spans"][0]["name"], "replication", "{streaming}");
    assert_eq!(streaming["level"], "INFO");

    // A second sink in the group, in JSON: its lanes' lines carry their partition.
    let config = std::fs::read_to_string(p.sink.config_path()).unwrap();
    let config = config.split("\n[metrics]").next().unwrap();
    let json_sink = Connector::start(Kind::Sink, config, &[("SINK_LOG__FORMAT", "json")]).unwrap();
    let lane = harness::wait_for(
        "a lane of the JSON sink to start",
        Duration::from_secs(60),
        || {
            json_sink.log().lines().find_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                v["fields"]["message"]
                    .as_str()?
                    .starts_with("lane starts")
                    .then_some(v)
            })
        },
    )
    .unwrap();
    assert!(lane["fields"]["partition"].is_i64(), "{lane}");
    assert_eq!(lane["spans"][0]["name"], "lane", "{lane}");
    assert_eq!(
        lane["spans"][0]["partition"], lane["fields"]["partition"],
        "{lane}"
    );
    assert!(json_sink
        .log()
        .lines()
        .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok()));
}
