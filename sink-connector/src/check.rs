//! `sink-connector check`: the target and the topic, verified before (or while) applying. The
//! only write is a probe key under the checkpoint prefix that expires after ten seconds.

use crate::config::Config;
use crate::lane::checkpoint_key;
use service::check::{info_field, Report};
use service::config::redact_url;
use std::time::Duration;

pub fn check(config: &Config) -> anyhow::Result<()> {
    let mut report = Report::default();
    let partitions = check_kafka(config, &mut report);
    check_target(config, partitions, &mut report);
    report.finish()
}

fn check_kafka(config: &Config, report: &mut Report) -> Option<u32> {
    let client = service::kafka::client_config(
        &config.kafka.bootstrap_servers,
        &[],
        &config.kafka.properties,
    );
    let topic = &config.kafka.topic;
    match service::kafka::partition_count(&client, topic) {
        Err(e) => {
            report.fail(format!("kafka: {e}"));
            None
        }
        Ok(Some(n)) => {
            report.ok(format!("kafka: topic {topic} has {n} partitions"));
            Some(n)
        }
        Ok(None) => {
            report.warn(format!(
                "kafka: topic {topic} does not exist yet; the sink waits for the source connector to create it"
            ));
            None
        }
    }
}

fn check_target(config: &Config, partitions: Option<u32>, report: &mut Report) {
    let url = redact_url(&config.redis.url);
    let timeout = Duration::from_secs(config.redis.timeout_s);
    let connect = || {
        config
            .redis
            .tls
            .redis_client(config.redis.url.as_str())
            .and_then(|c| c.get_connection_with_timeout(timeout))
    };
    let mut conn = match connect() {
        Ok(c) => c,
        Err(e) => {
            report.fail(format!("target {url}: {e}"));
            return;
        }
    };
    report.ok(format!("target {url}: reachable and authenticated"));
    let refused = match crate::target::refusals(config) {
        Ok(refused) => refused,
        Err(e) => vec![e],
    };
    let refused_any = !refused.is_empty();
    refused.into_iter().for_each(|line| report.fail(line));
    // A proxy that closes the connection on a command it does not know (twemproxy and INFO or
    // CONFIG): go on with a new one.
    let reconnect = |conn: &mut redis::Connection, e: &redis::RedisError| {
        if e.is_io_error() || e.is_connection_dropped() {
            if let Ok(c) = connect() {
                *conn = c;
            }
        }
    };

    let info: redis::RedisResult<String> = redis::cmd("INFO").query(&mut conn);
    match &info {
        Ok(info) => {
            let server = info_field(info, "server_name").unwrap_or("redis");
            let version = info_field(info, "valkey_version")
                .or_else(|| info_field(info, "redis_version"))
                .unwrap_or("?");
            let rdb = crate::convert::rdb_version_for(server, version);
            report.ok(format!(
                "target: {server} {version}; RESTORE accepts RDB version {rdb} and older (newer values are rebuilt with commands)"
            ));
            match info_field(info, "role") {
                Some("master") | None => {}
                Some(role) => report.fail(format!(
                    "target {url}: role {role}: it refuses writes (READONLY); point redis.url at the master"
                )),
            }
            if info_field(info, "cluster_enabled") == Some("1") {
                let masters = redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query::<redis::Value>(&mut conn)
                    .map(|v| crate::cluster::parse_slots(&v, "").len());
                report.ok(format!(
                    "target: Redis Cluster ({} slot ranges); writes go to each slot's master, checkpoints are kept per slot; the other checks below ran on this node only",
                    masters.map_or_else(|e| format!("CLUSTER SLOTS failed: {e}"), |n| n.to_string())
                ));
            }
        }
        Err(e) => {
            report.warn(format!(
                "target: INFO not allowed ({e}): every value will be rebuilt with commands instead of RESTORE"
            ));
            reconnect(&mut conn, e);
        }
    }

    let policy: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("maxmemory-policy")
        .query(&mut conn);
    match policy.as_deref() {
        Ok([_, policy]) if policy == "noeviction" => {
            report.ok("target: maxmemory-policy noeviction")
        }
        Ok([_, policy]) => report.fail(format!(
            "target {url}: maxmemory-policy is {policy}: a full target would silently evict keys the source still has; set noeviction"
        )),
        Ok(_) => report.warn(
            "target: cannot read maxmemory-policy (CONFIG GET not allowed); make sure it is noeviction",
        ),
        Err(e) => {
            report.warn(format!(
                "target: cannot read maxmemory-policy ({e}); make sure it is noeviction"
            ));
            reconnect(&mut conn, e);
        }
    }
    if config.redis.select {
        let databases: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("databases")
            .query(&mut conn);
        if let Ok([_, n]) = databases.as_deref() {
            let n: u32 = n.parse().unwrap_or(16);
            let unreachable: Vec<String> = config
                .redis
                .db_map
                .iter()
                .filter(|(_, &to)| to >= n)
                .map(|(from, to)| format!("{from}->{to}"))
                .collect();
            if unreachable.is_empty() {
                report.ok(format!(
                    "target: {n} databases; source dbs without a mapping must be below {n}"
                ));
            } else {
                report.fail(format!(
                    "redis.db_map maps to databases the target does not have ({n}): {}",
                    unreachable.join(", ")
                ));
            }
        }
    }

    // A write like the lanes' (the probe expires by itself): in a transaction unless the
    // target takes none.
    let probe = format!(
        "{}:check:{}",
        config.apply.checkpoint_prefix,
        std::process::id()
    );
    let mut pipe = redis::pipe();
    if config.redis.transactions {
        pipe.atomic();
    }
    let written: redis::RedisResult<()> = pipe
        .cmd("SET")
        .arg(&probe)
        .arg("1")
        .arg("PX")
        .arg(10_000)
        .ignore()
        .query(&mut conn);
    match written {
        // Said above, with the setting to change.
        Err(_) if refused_any => {}
        Ok(()) if config.redis.transactions => report.ok("target: MULTI/EXEC writes accepted"),
        Ok(()) => report.warn(
            "target: writes accepted without transactions (redis.transactions = false): applied at least once, a crash can apply the last batch of non-idempotent commands twice",
        ),
        Err(e) if e.code() == Some("OOM") => report.warn(format!(
            "target {url}: full right now ({e}); lanes will stall and retry until it has room"
        )),
        Err(e) => report.fail(format!("target {url}: a transactional write failed: {e}")),
    }

    if let Some(n) = partitions {
        if config.redis.select && config.redis.mode != crate::config::Mode::Cluster {
            // The lanes keep their checkpoints in db 0.
            let _: redis::RedisResult<()> = redis::cmd("SELECT").arg(0).query(&mut conn);
        }
        let mut held = 0;
        for p in 0..n as i32 {
            let key = checkpoint_key(config, &config.kafka.topic, p);
            let exists: redis::RedisResult<bool> =
                redis::cmd("EXISTS").arg(key.as_ref()).query(&mut conn);
            if exists.unwrap_or(false) {
                held += 1;
            }
        }
        if held == 0 {
            report.ok(format!(
                "checkpoints: none in the target for topic {}; the sink applies the topic from its start",
                config.kafka.topic
            ));
        } else {
            report.ok(format!(
                "checkpoints: {held} of {n} partitions have applied records in the target; the sink resumes from them"
            ));
        }
    }
}
