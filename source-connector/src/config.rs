//! The source connector's configuration (`--config FILE`, overridden by `SOURCE_*` variables;
//! every key is documented in docs/configuration.md).

use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub redis: RedisConfig,
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub snapshot: SnapshotConfig,
    #[serde(default)]
    pub sync: SyncConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub log: service::LogConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port`.
    pub url: String,
    /// Name of this source shard on the topic and in checkpoints. Default: `host:port` of the URL.
    #[serde(default)]
    pub shard_name: Option<String>,
    /// Port announced with `REPLCONF listening-port` (shown in the source's `INFO replication`).
    #[serde(default = "default_listening_port")]
    pub listening_port: u16,
    /// Seconds to wait for a connection or a handshake reply.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// Longest wait between reconnection attempts, in seconds.
    #[serde(default = "default_max_backoff_s")]
    pub max_backoff_s: u64,
    /// Seconds without a byte from the master (which pings every `repl-ping-replica-period`,
    /// 10 s by default) before the link counts as dead and is reconnected: Redis's own
    /// `repl-timeout`. Also bounds silences during the RDB transfer.
    #[serde(default = "default_repl_timeout_s")]
    pub repl_timeout_s: u64,
    /// Cluster sources: seconds between topology checks (failovers, new shards).
    #[serde(default = "default_cluster_refresh_s")]
    pub cluster_refresh_s: u64,
    /// `rediss://`: the CA and client certificate files (`[redis.tls]`).
    #[serde(default)]
    pub tls: crate::tls::TlsFiles,
    /// Replication commands the master knows under another name (its `rename-command`, as
    /// some managed services do): `{ PSYNC = "X_PSYNC", SYNC = "", REPLCONF = "X_REPLCONF" }`.
    /// An empty name: the command is disabled there.
    #[serde(default)]
    pub rename_commands: BTreeMap<String, String>,
    /// A master found through Sentinel (`[redis.sentinel]`) instead of `redis.url`'s host.
    #[serde(default)]
    pub sentinel: Option<SentinelConfig>,
}

/// Sentinels that know the master: asked for its address before each connection, and watched
/// for a failover (`+switch-master`), after which the link continues on the promoted replica.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SentinelConfig {
    /// `host:port` of each Sentinel; asked in turn until one answers.
    pub addresses: Vec<String>,
    /// The name the Sentinels monitor the master under (`sentinel monitor <name> …`).
    pub master_name: String,
    /// Password of the Sentinels themselves (`requirepass` in sentinel.conf), when they have one.
    #[serde(default)]
    pub password: Option<String>,
}

/// The replication commands the source connector sends.
pub const REPLICATION_COMMANDS: [&str; 3] = ["PSYNC", "SYNC", "REPLCONF"];

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub bootstrap_servers: String,
    pub topic: String,
    pub partitions: u32,
    /// Create the topic (and the checkpoint topic) when missing.
    #[serde(default = "yes")]
    pub create_topic: bool,
    /// Replication factor for topics the connector creates.
    #[serde(default = "one")]
    pub replication_factor: i32,
    /// Where positions are stored. Default: `<topic>.checkpoints`.
    #[serde(default)]
    pub checkpoint_topic: Option<String>,
    /// `none`, `gzip`, `snappy`, `lz4` or `zstd`.
    #[serde(default = "default_compression")]
    pub compression: String,
    /// Most bytes of records produced but not yet acknowledged before reading from Redis pauses.
    #[serde(default = "default_max_in_flight_bytes")]
    pub max_in_flight_bytes: usize,
    /// Largest record the topic accepts (Kafka's `max.message.bytes`, 1 MiB by default).
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Passed to librdkafka as is (for example `security.protocol`, `sasl.*`, `linger.ms`).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

/// What the connector copies, like the sync types of managed migration services.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SyncMode {
    /// The snapshot, then every write after it (the default).
    #[default]
    FullAndIncremental,
    /// The snapshot only: the connector exits once Kafka holds all of it.
    Full,
    /// Writes from now on only: the snapshot's keys are not published. Unsafe for consistency:
    /// keys written before are missing or stale on the target.
    Incremental,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    #[serde(default)]
    pub mode: SyncMode,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    /// Largest value bytes in one record; bigger keys are split into chunks.
    #[serde(default = "default_piece_bytes")]
    pub piece_bytes: usize,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        SnapshotConfig {
            piece_bytes: default_piece_bytes(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address of the `/metrics` and `/health` endpoint.
    #[serde(default = "default_metrics_listen")]
    pub listen: SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: default_metrics_listen(),
        }
    }
}

fn yes() -> bool {
    true
}
fn one() -> i32 {
    1
}
fn default_listening_port() -> u16 {
    6380
}
fn default_timeout_s() -> u64 {
    10
}
fn default_cluster_refresh_s() -> u64 {
    5
}
fn default_max_backoff_s() -> u64 {
    30
}
fn default_repl_timeout_s() -> u64 {
    60
}
fn default_compression() -> String {
    "lz4".into()
}
fn default_max_in_flight_bytes() -> usize {
    32 * 1024 * 1024
}
fn default_max_message_bytes() -> usize {
    1_000_000
}
fn default_piece_bytes() -> usize {
    proto::chunk::DEFAULT_PIECE_BYTES
}
fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9101))
}

pub use service::endpoint::Endpoint;

impl Config {
    pub fn load(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
        let c: Config = service::config::load(path, "SOURCE")?;
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let endpoint = Endpoint::parse(&self.redis.url)?;
        if endpoint.tls || self.redis.tls != crate::tls::TlsFiles::default() {
            self.redis.tls.validate("redis")?;
        }
        anyhow::ensure!(
            (1..=16384).contains(&self.kafka.partitions),
            "kafka.partitions = {} is out of range 1-16384",
            self.kafka.partitions
        );
        anyhow::ensure!(!self.kafka.topic.is_empty(), "kafka.topic is empty");
        anyhow::ensure!(
            matches!(
                self.kafka.compression.as_str(),
                "none" | "gzip" | "snappy" | "lz4" | "zstd"
            ),
            "kafka.compression = {:?}: use none, gzip, snappy, lz4 or zstd",
            self.kafka.compression
        );
        anyhow::ensure!(
            self.snapshot.piece_bytes + 64 * 1024 <= self.kafka.max_message_bytes,
            "snapshot.piece_bytes = {} must stay at least 64 KiB below kafka.max_message_bytes = {}",
            self.snapshot.piece_bytes,
            self.kafka.max_message_bytes
        );
        anyhow::ensure!(
            (1024..=64 * 1024 * 1024).contains(&self.snapshot.piece_bytes),
            "snapshot.piece_bytes = {} is out of range 1024-67108864",
            self.snapshot.piece_bytes
        );
        for (command, name) in &self.redis.rename_commands {
            anyhow::ensure!(
                REPLICATION_COMMANDS
                    .iter()
                    .any(|c| c.eq_ignore_ascii_case(command)),
                "redis.rename_commands: {command:?} is not one the connector sends (PSYNC, SYNC, REPLCONF)"
            );
            anyhow::ensure!(
                !name.contains(char::is_whitespace),
                "redis.rename_commands.{command} = {name:?}: a command name has no spaces"
            );
        }
        if self.command("PSYNC").is_none() && self.command("SYNC").is_none() {
            anyhow::bail!("redis.rename_commands disables both PSYNC and SYNC: the connector cannot replicate");
        }
        if let Some(s) = &self.redis.sentinel {
            anyhow::ensure!(!s.addresses.is_empty(), "redis.sentinel.addresses is empty");
            for a in &s.addresses {
                anyhow::ensure!(
                    a.rsplit_once(':')
                        .is_some_and(|(_, p)| p.parse::<u16>().is_ok()),
                    "redis.sentinel.addresses: {a:?} is not host:port"
                );
            }
            anyhow::ensure!(
                !s.master_name.is_empty(),
                "redis.sentinel.master_name is empty"
            );
        }
        let shard = self.shard_name();
        anyhow::ensure!(
            !shard.is_empty()
                && shard != "kafka:offset"
                && !shard.starts_with("barrier:")
                && !shard.starts_with("slot:"),
            "redis.shard_name = {shard:?} is reserved (the sink's checkpoint hashes use \"kafka:offset\", \"barrier:…\" and \"slot:…\" fields)"
        );
        Ok(())
    }

    /// The name the master knows a replication command by (`PSYNC`, `SYNC`, `REPLCONF`), or
    /// `None` when it is disabled there.
    pub fn command<'a>(&'a self, command: &'a str) -> Option<&'a str> {
        // Any case: environment overrides arrive in lowercase.
        let renamed = self
            .redis
            .rename_commands
            .iter()
            .find(|(c, _)| c.eq_ignore_ascii_case(command));
        match renamed {
            Some((_, name)) if name.is_empty() => None,
            Some((_, name)) => Some(name),
            None => Some(command),
        }
    }

    pub fn shard_name(&self) -> String {
        match &self.redis.shard_name {
            Some(n) => n.clone(),
            // The master moves on failover; the name Sentinel knows it by does not.
            None if self.redis.sentinel.is_some() => self
                .redis
                .sentinel
                .as_ref()
                .map(|s| s.master_name.clone())
                .unwrap_or_default(),
            None => Endpoint::parse(&self.redis.url)
                .map(|e| e.address())
                .unwrap_or_default(),
        }
    }

    pub fn checkpoint_topic(&self) -> String {
        self.kafka
            .checkpoint_topic
            .clone()
            .unwrap_or_else(|| format!("{}.checkpoints", self.kafka.topic))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let e = Endpoint::parse("redis://u:p%40ss@h:7000").unwrap();
        assert_eq!(e.user.as_deref(), Some("u"));
        assert_eq!(e.password.as_deref(), Some("p@ss"));
        assert_eq!(e.address(), "h:7000");
        let e = Endpoint::parse("redis://:pw@127.0.0.1:1").unwrap();
        assert_eq!((e.user, e.password.as_deref()), (None, Some("pw")));
        assert!(Endpoint::parse("rediss://h").unwrap().tls);
        for bad in [
            "h:1",
            "http://h:1",
            "redis://h:70000",
            "redis://h:x",
            "redis://:1",
        ] {
            let err = Endpoint::parse(bad).unwrap_err().to_string();
            assert!(err.starts_with("redis.url"), "{bad}: {err}");
        }
        let err = Endpoint::parse("redis://u:secret@h:99999")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("secret"), "{err}");
    }
}
