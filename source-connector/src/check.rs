//! `source-connector check`: everything that can be verified before (or while) replicating
//! without disturbing the source. It never sends `PSYNC`, which would start a snapshot.

use crate::checkpoint;
use crate::config::{Config, Endpoint};
use service::check::{info_field, Report};
use service::config::redact_url;
use std::time::Duration;
use wire::refusal::{Meaning, Refusal};

pub fn check(config: &Config) -> anyhow::Result<()> {
    let mut report = Report::default();
    let config = &check_sentinels(config, &mut report);
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

/// Behind Sentinel: what each Sentinel says, and the configuration with `redis.url` at the
/// master they name, for the checks that follow.
fn check_sentinels(config: &Config, report: &mut Report) -> Config {
    let Some(sentinels) = crate::sentinel::Sentinels::of(config) else {
        return config.clone();
    };
    let name = sentinels.master_name().to_owned();
    for view in sentinels.views() {
        let counts = format!(
            "{} replicas, {} other Sentinels",
            view.replicas.map_or("?".into(), |n| n.to_string()),
            view.other_sentinels.map_or("?".into(), |n| n.to_string())
        );
        match view.master {
            Ok(Some((host, port))) => report.ok(format!(
                "sentinel {}: master {name:?} at {host}:{port}, {counts}",
                view.sentinel
            )),
            Ok(None) => report.fail(format!(
                "sentinel {}: monitors no master named {name:?} (redis.sentinel.master_name)",
                view.sentinel
            )),
            Err(e) => report.warn(format!("sentinel {}: {e}", view.sentinel)),
        }
    }
    let mut config = config.clone();
    match Endpoint::parse(&config.redis.url).map(|e| sentinels.master_endpoint(&e)) {
        Ok(Ok(master)) => config.redis.url = crate::cluster::client_url(&master),
        Ok(Err(e)) => report.fail(e),
        Err(e) => report.fail(format!("redis.url: {e}")),
    }
    config
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
    if let Some(name) = config.command("REPLCONF") {
        let replconf: redis::RedisResult<()> = redis::cmd(name)
            .arg("listening-port")
            .arg(config.redis.listening_port)
            .query(&mut conn);
        match replconf {
            Ok(()) => report.ok(format!("source: REPLCONF allowed (as {name})")),
            Err(e) if refusal(&e).is_some_and(|r| r.meaning() == Meaning::UnknownCommand) => {
                report.fail(format!(
                    "source {url}: the master knows no command {name:?} ({e}); if it renames REPLCONF, set redis.rename_commands.REPLCONF to that name"
                ))
            }
            Err(e) => report.fail(format!(
                "source {url}: REPLCONF refused ({e}); the user needs +replconf +psync (docs/security.md)"
            )),
        }
    }
    // The replication commands under the names the connector will use: `COMMAND INFO` answers
    // nil for a name the master does not know (renamed or disabled there).
    let known = |conn: &mut redis::Connection, name: &str| -> Option<bool> {
        let v: redis::Value = redis::cmd("COMMAND")
            .arg("INFO")
            .arg(name)
            .query(conn)
            .ok()?;
        Some(
            matches!(v, redis::Value::Array(items) if items.iter().any(|i| *i != redis::Value::Nil)),
        )
    };
    let sync_known = config.command("SYNC").and_then(|n| known(&mut conn, n));
    let psync = config.command("PSYNC").map(|n| (n, known(&mut conn, n)));
    match psync {
        Some((name, Some(true))) => report.ok(format!("source: PSYNC known (as {name})")),
        Some((name, Some(false))) if sync_known != Some(true) => report.fail(format!(
            "source {url}: the master knows no command {name:?} for PSYNC, nor SYNC under the configured name; set redis.rename_commands.PSYNC to the name its rename-command gives PSYNC"
        )),
        Some((name, Some(false))) => report.warn(format!(
            "source: the master knows no command {name:?} (PSYNC renamed there? set redis.rename_commands.PSYNC); the connector falls back to SYNC, and every reconnection is a full sync"
        )),
        None if sync_known == Some(false) => report.fail(format!(
            "source {url}: PSYNC is disabled in redis.rename_commands and the master does not know SYNC under the configured name"
        )),
        _ => {}
    }
    let user: redis::RedisResult<String> = redis::cmd("ACL").arg("WHOAMI").query(&mut conn);
    // (A PSYNC the master does not know was reported above.)
    let psync_known = matches!(psync, Some((_, Some(true)) | (_, None)));
    if let Some(user) = user.ok().filter(|_| psync_known) {
        let dryrun: redis::RedisResult<String> = redis::cmd("ACL")
            .arg("DRYRUN")
            .arg(&user)
            .arg(config.command("PSYNC").unwrap_or("PSYNC"))
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
    let sizing = Sizing::from_info(&info);
    let wanted_backlog = sizing.backlog();
    if backlog < wanted_backlog {
        report.warn(format!(
            "source: repl-backlog-size is {backlog} bytes; at the current write rate ({:.0} KB/s) a connector restart of more than {:.0} s means a full resync; suggested: CONFIG SET repl-backlog-size {wanted_backlog} (5 minutes of writes, at least 64 MB; docs/runbook.md §1)",
            sizing.write_kbps,
            backlog as f64 / (sizing.write_kbps * 1024.0).max(1.0)
        ));
    } else {
        report.ok(format!("source: repl-backlog-size {backlog} bytes"));
    }
    let limit: redis::RedisResult<Vec<String>> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("client-output-buffer-limit")
        .query(&mut conn);
    match limit.ok().and_then(|v| v.get(1).and_then(|l| replica_hard_limit(l))) {
        Some(hard) => {
            let wanted = sizing.output_buffer();
            if hard != 0 && hard < wanted {
                report.warn(format!(
                    "source: client-output-buffer-limit replica hard limit is {hard} bytes, but the writes made while a {} MB snapshot transfers may need {wanted}: the master would drop the connector and start over; suggested: CONFIG SET client-output-buffer-limit \"replica {wanted} {wanted} 0\"",
                    sizing.dataset_bytes >> 20
                ));
            } else {
                report.ok(format!(
                    "source: client-output-buffer-limit replica hard limit {hard} bytes (0: none)"
                ));
            }
        }
        None => report.warn(
            "source: client-output-buffer-limit not readable (CONFIG GET refused): check that the replica limit holds the writes made during a snapshot (docs/runbook.md §1)",
        ),
    }
    Some(info)
}

/// What the source's size and write rate ask of its replication settings.
#[derive(Debug, Clone, Copy)]
struct Sizing {
    dataset_bytes: u64,
    write_kbps: f64,
}

impl Sizing {
    fn from_info(info: &str) -> Sizing {
        Sizing {
            dataset_bytes: info_field(info, "used_memory")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
            write_kbps: info_field(info, "instantaneous_input_kbps")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0),
        }
    }

    /// Five minutes of writes, at least 64 MB.
    fn backlog(&self) -> u64 {
        ((self.write_kbps * 1024.0 * 300.0) as u64).max(64 << 20)
    }

    /// The writes made while the snapshot transfers (at a conservative 50 MB/s, plus a minute),
    /// twice over, at least 256 MB (Redis's own default).
    fn output_buffer(&self) -> u64 {
        let transfer_s = self.dataset_bytes as f64 / (50.0 * 1024.0 * 1024.0) + 60.0;
        ((self.write_kbps * 1024.0 * transfer_s * 2.0) as u64).max(256 << 20)
    }
}

/// The hard limit of the replica class in a `client-output-buffer-limit` value
/// (`normal 0 0 0 slave 268435456 67108864 60 pubsub …`).
fn replica_hard_limit(value: &str) -> Option<u64> {
    let words: Vec<&str> = value.split_whitespace().collect();
    let i = words
        .iter()
        .position(|w| *w == "slave" || *w == "replica")?;
    words.get(i + 1)?.parse().ok()
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
        Ok(Some(n)) if n == wanted => {
            report.ok(format!("kafka: topic {topic} has {n} partitions"));
            check_message_size(config, &client, report);
        }
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

/// The topic must accept the largest record the connector may write
/// (`kafka.max_message_bytes`): a smaller `max.message.bytes` would stop it at the first big one.
fn check_message_size(config: &Config, client: &rdkafka::ClientConfig, report: &mut Report) {
    let topic = &config.kafka.topic;
    let wanted = config.kafka.max_message_bytes;
    match topic_max_message_bytes(client, topic) {
        Ok(Some(n)) if n >= wanted => report.ok(format!(
            "kafka: topic {topic} accepts records up to {n} bytes (max.message.bytes), kafka.max_message_bytes is {wanted}"
        )),
        Ok(Some(n)) => report.fail(format!(
            "kafka: topic {topic} accepts records up to {n} bytes (max.message.bytes) but kafka.max_message_bytes is {wanted}: a record between the two would stop the connector; lower kafka.max_message_bytes (and snapshot.piece_bytes) or raise the topic's max.message.bytes"
        )),
        Ok(None) => report.warn(format!(
            "kafka: the broker does not report topic {topic}'s max.message.bytes; make sure it is at least kafka.max_message_bytes = {wanted}"
        )),
        Err(e) => report.warn(format!(
            "kafka: cannot read topic {topic}'s max.message.bytes ({e}); make sure it is at least kafka.max_message_bytes = {wanted}"
        )),
    }
}

/// The topic's `max.message.bytes` as the broker describes it (`None`: not reported).
fn topic_max_message_bytes(
    client: &rdkafka::ClientConfig,
    topic: &str,
) -> anyhow::Result<Option<usize>> {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = client.create()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let results = runtime.block_on(admin.describe_configs(
        &[ResourceSpecifier::Topic(topic)],
        &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
    ))?;
    for result in results {
        let resource = result.map_err(|e| anyhow::anyhow!("{e}"))?;
        if let Some(value) = resource
            .get("max.message.bytes")
            .and_then(|e| e.value.as_ref())
        {
            return Ok(value.parse().ok());
        }
    }
    Ok(None)
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

/// A Redis client error as the server's refusal, when it is one.
fn refusal(e: &redis::RedisError) -> Option<Refusal> {
    Some(Refusal {
        code: e.code()?.to_owned(),
        message: e.detail().unwrap_or_default().to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizing_suggestions() {
        assert_eq!(
            replica_hard_limit(
                "normal 0 0 0 slave 268435456 67108864 60 pubsub 33554432 8388608 60"
            ),
            Some(268435456)
        );
        let s = Sizing {
            dataset_bytes: 10 << 30,
            write_kbps: 10_240.0,
        };
        // 10 MB/s of writes: 3 GB of backlog for five minutes.
        assert_eq!(s.backlog(), 10 * 1024 * 1024 * 300);
        // A 10 GB snapshot at 50 MB/s takes ~265 s: twice the writes meanwhile.
        assert!(s.output_buffer() > 5 << 30);
        let idle = Sizing {
            dataset_bytes: 1 << 20,
            write_kbps: 0.0,
        };
        assert_eq!(
            (idle.backlog(), idle.output_buffer()),
            (64 << 20, 256 << 20)
        );
    }
}
