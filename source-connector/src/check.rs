//! `source-connector check`: everything that can be verified before (or while) replicating
//! without disturbing the source. It never sends `PSYNC`, which would start a snapshot.

use crate::checkpoint;
use crate::config::{Config, Endpoint};
use service::check::{info_field, Report};
use service::config::redact_url;
use std::time::Duration;

pub fn check(config: &Config) -> anyhow::Result<()> {
    let mut report = Report::default();
    let url = redact_url(&config.redis.url);
    let info = match Endpoint::parse(&config.redis.url) {
        Err(e) => {
            report.fail(format!("redis.url: {e}"));
            None
        }
        Ok(_) => check_redis(config, &url, &mut report),
    };
    check_kafka(config, info.as_deref(), &mut report);
    report.finish()
}

/// Connects and authenticates, checks the replication commands, and reads `INFO` when allowed.
fn check_redis(config: &Config, url: &str, report: &mut Report) -> Option<String> {
    let timeout = Duration::from_secs(config.redis.timeout_s);
    let mut conn = match config
        .redis
        .tls
        .redis_client(config.redis.url.as_str())
        .and_then(|c| c.get_connection_with_timeout(timeout))
    {
        Ok(c) => c,
        Err(e) => {
            report.fail(format!("source {url}: {e}"));
            return None;
        }
    };
    report.ok(format!("source {url}: reachable and authenticated"));
    let replconf: redis::RedisResult<()> = redis::cmd("REPLCONF")
        .arg("listening-port")
        .arg(config.redis.listening_port)
        .query(&mut conn);
    match replconf {
        Ok(()) => report.ok("source: REPLCONF allowed"),
        Err(e) => report.fail(format!(
            "source {url}: REPLCONF refused ({e}); the user needs +replconf +psync (docs/security.md)"
        )),
    }
    let user: redis::RedisResult<String> = redis::cmd("ACL").arg("WHOAMI").query(&mut conn);
    if let Ok(user) = user {
        let dryrun: redis::RedisResult<String> = redis::cmd("ACL")
            .arg("DRYRUN")
            .arg(&user)
            .arg("PSYNC")
            .arg("?")
            .arg("-1")
            .query(&mut conn);
        match dryrun {
            Ok(_) => report.ok(format!("source: user {user} may run PSYNC")),
            Err(e) if e.code() == Some("NOPERM") => report.warn(format!(
                "source: cannot check PSYNC for user {user} without ACL DRYRUN (an admin command); a refusal shows at start as NOPERM"
            )),
            Err(e) => report.fail(format!("source {url}: user {user} may not run PSYNC: {e}")),
        }
    }
    let info: redis::RedisResult<String> = redis::cmd("INFO").query(&mut conn);
    let info = match info {
        Ok(info) => info,
        Err(e) => {
            report.warn(format!(
                "source: INFO not allowed ({e}), as with the least-privilege user: version, role and backlog not checked"
            ));
            return None;
        }
    };
    let version = info_field(&info, "redis_version").unwrap_or("?");
    let server = info_field(&info, "server_name").unwrap_or("redis");
    report.ok(format!("source: {server} {version}"));
    match info_field(&info, "role") {
        Some("master") => report.ok("source: role master"),
        Some(role) => report.warn(format!(
            "source: role {role}: the connector replicates from this replica (chained replication); its data lags the master's"
        )),
        None => {}
    }
    if let Ok(endpoint) = Endpoint::parse(&config.redis.url) {
        match crate::cluster::discover(&endpoint, &config.redis.tls, timeout) {
            Ok(Some(masters)) => report.ok(format!(
                "source: Redis Cluster; one replica link per master: {}",
                masters
                    .iter()
                    .map(|m| format!(
                        "{} (slots from {}, {} replica(s))",
                        m.address(),
                        m.anchor().unwrap_or(0),
                        m.replicas.len()
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            Ok(None) => {}
            Err(e) => report.warn(format!("source: cluster topology not read: {e}")),
        }
    }
    let backlog: u64 = info_field(&info, "repl_backlog_size")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    if backlog <= 1 << 20 {
        report.warn(format!(
            "source: repl-backlog-size is {backlog} bytes (the default): a connector restart of more than a few seconds under load means a full resync; size it as docs/runbook.md §1 says"
        ));
    } else {
        report.ok(format!("source: repl-backlog-size {backlog} bytes"));
    }
    Some(info)
}

/// The topic (reachable, partition count) and the checkpoint a restart would resume from.
fn check_kafka(config: &Config, info: Option<&str>, report: &mut Report) {
    let client = service::kafka::client_config(
        &config.kafka.bootstrap_servers,
        &[],
        &config.kafka.properties,
    );
    let topic = &config.kafka.topic;
    let wanted = config.kafka.partitions;
    match crate::run::partition_count(&client, topic) {
        Err(e) => {
            report.fail(format!("kafka: {e}"));
            return;
        }
        Ok(Some(n)) if n == wanted => report.ok(format!("kafka: topic {topic} has {n} partitions")),
        Ok(Some(n)) => report.fail(format!(
            "kafka: topic {topic} has {n} partitions but kafka.partitions is {wanted}; the connector refuses to start"
        )),
        Ok(None) if config.kafka.create_topic => report.ok(format!(
            "kafka: topic {topic} does not exist yet; it will be created with {wanted} partitions"
        )),
        Ok(None) => report.fail(format!(
            "kafka: topic {topic} does not exist and kafka.create_topic is false"
        )),
    }
    let shard = config.shard_name();
    let checkpoints = config.checkpoint_topic();
    let stored = match crate::run::partition_count(&client, &checkpoints) {
        Ok(Some(_)) => checkpoint::load(&client, &checkpoints, &shard),
        Ok(None) => Ok(None),
        Err(e) => Err(e),
    };
    match stored {
        Err(e) => report.fail(format!("kafka: cannot read {checkpoints}: {e}")),
        Ok(None) => report.ok(format!(
            "checkpoint: none for shard {shard} in {checkpoints}; the first run makes a full sync"
        )),
        Ok(Some(c)) => {
            report.ok(format!(
                "checkpoint: shard {shard} at replid {} offset {} (epoch {}, snapshot {})",
                c.replid,
                c.offset,
                c.epoch,
                if c.snapshot_done {
                    "complete"
                } else {
                    "incomplete"
                }
            ));
            if let Some(info) = info {
                resume_outlook(&c, info, report);
            }
        }
    }
}

/// Whether `PSYNC` from the checkpoint would continue, by the source's replication info.
fn resume_outlook(c: &checkpoint::Checkpoint, info: &str, report: &mut Report) {
    let field = |name: &str| info_field(info, name).unwrap_or("");
    let number = |name: &str| field(name).parse::<u64>().ok();
    let next = c.offset + 1;
    let same_history = field("master_replid") == c.replid
        || (field("master_replid2") == c.replid
            && number("second_repl_offset").is_some_and(|o| next <= o));
    let first = number("repl_backlog_first_byte_offset").unwrap_or(u64::MAX);
    let last = number("master_repl_offset").unwrap_or(0);
    if !c.snapshot_done {
        report.warn("checkpoint: the last snapshot did not finish; the next run makes a full sync");
    } else if same_history && first <= next && next <= last + 1 {
        report.ok(format!(
            "checkpoint: the source still holds offset {next} (its backlog starts at {first}, it is at {last}): a restart continues with PSYNC"
        ));
    } else {
        report.warn(format!(
            "checkpoint: a restart makes a full resync: {}",
            if same_history {
                format!("the source no longer holds offset {next} (its backlog starts at {first}, it is at {last})")
            } else {
                "the source has another replication history (replid)".to_string()
            }
        ));
    }
}
