//! The sink connector's configuration (`--config FILE`, overridden by `SINK_*` variables; every
//! key is documented in docs/configuration.md).

use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub redis: RedisConfig,
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub apply: ApplyConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub log: service::LogConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Standalone unless the target says `cluster_enabled:1`.
    Auto,
    Standalone,
    Cluster,
    /// Looks standalone but may refuse SELECT and some commands (managed "DCS-style" services).
    Proxy,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// `redis://[user:password@]host:port`.
    pub url: String,
    #[serde(default = "default_mode")]
    pub mode: Mode,
    /// Map source db -> target db (as strings in TOML: `"1" = 0`). Unmapped dbs keep their number,
    /// except in proxy mode without SELECT, where everything goes to the endpoint's db.
    #[serde(default)]
    pub db_map: BTreeMap<String, u32>,
    /// Whether the target accepts SELECT (false for most proxies).
    #[serde(default = "yes")]
    pub select: bool,
    /// Whether the target accepts `MULTI/EXEC` (false for twemproxy, Envoy's Redis proxy and
    /// similar). Without, each batch is written as it comes and its checkpoint after it: at
    /// least once (docs/semantics.md).
    #[serde(default = "yes")]
    pub transactions: bool,
    /// Rename commands the target knows under another name (`"FLUSHALL" = "MYFLUSHALL"`).
    #[serde(default)]
    pub rename_commands: BTreeMap<String, String>,
    /// Seconds to wait for a connection or a reply.
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
    /// `rediss://`: the CA and client certificate files (`[redis.tls]`).
    #[serde(default)]
    pub tls: service::tls::TlsFiles,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub bootstrap_servers: String,
    pub topic: String,
    #[serde(default = "default_group")]
    pub group_id: String,
    /// Passed to librdkafka as is (`security.protocol`, `sasl.*`, ...).
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Conflict {
    /// Overwrite a key that already exists on the target (RESTORE ... REPLACE).
    Replace,
    /// Leave the existing key alone.
    Keep,
    /// Stop the lane.
    Fail,
}

/// What a new snapshot (a full resync) does to the target's existing data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NewSnapshot {
    /// Apply the snapshot over what is there: keys deleted on the source while the link was
    /// down stay on the target.
    Keep,
    /// First delete the target's keys in the snapshot's slots (each lane its own partition's
    /// slots, every db), so the target ends equal to the source.
    Flush,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlushPolicy {
    Apply,
    Ignore,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    /// Stop the lane, say why in logs, metrics and /health; other lanes go on.
    Halt,
    /// Send the record with the error to `dead_letter_topic` and continue.
    DeadLetter,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyConfig {
    /// Most records applied in one MULTI/EXEC with their checkpoint.
    #[serde(default = "default_batch_records")]
    pub batch_records: usize,
    /// Prefix of the checkpoint keys in the target (excluded from `verify`).
    #[serde(default = "default_prefix")]
    pub checkpoint_prefix: String,
    #[serde(default = "default_conflict")]
    pub snapshot_conflict: Conflict,
    #[serde(default = "default_flush")]
    pub flush: FlushPolicy,
    #[serde(default = "default_new_snapshot")]
    pub on_new_snapshot: NewSnapshot,
    #[serde(default = "default_on_error")]
    pub on_error: OnError,
    /// Required when `on_error = "dead-letter"`.
    #[serde(default)]
    pub dead_letter_topic: Option<String>,
    /// Longest wait between retries of a write the target refused for now (OOM, LOADING ...).
    #[serde(default = "default_max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// Most elements per command when a value is rebuilt with type commands.
    #[serde(default = "default_rebuild_elements")]
    pub rebuild_elements: usize,
    /// An expiry that is already past when applied is moved this far into the future instead of
    /// deleting the key at once (the source's DEL follows when the key really expired).
    #[serde(default = "default_expired_grace_ms")]
    pub expired_grace_ms: u64,
    /// Apply only keys matching one of these globs (empty: every key).
    #[serde(default)]
    pub include_keys: Vec<String>,
    /// Never apply keys matching these globs.
    #[serde(default)]
    pub exclude_keys: Vec<String>,
    /// Apply only records of these source dbs (empty: every db).
    #[serde(default)]
    pub include_dbs: Vec<u32>,
    /// Never apply these commands (names, any case).
    #[serde(default)]
    pub exclude_commands: Vec<String>,
    /// Most commands per second sent to the target by the whole process (0: no limit).
    #[serde(default)]
    pub max_ops_per_s: u64,
    /// Most argument bytes per second sent to the target by the whole process (0: no limit).
    #[serde(default)]
    pub max_bytes_per_s: u64,
}

impl Default for ApplyConfig {
    fn default() -> Self {
        ApplyConfig {
            batch_records: default_batch_records(),
            checkpoint_prefix: default_prefix(),
            snapshot_conflict: default_conflict(),
            flush: default_flush(),
            on_new_snapshot: default_new_snapshot(),
            on_error: default_on_error(),
            dead_letter_topic: None,
            max_backoff_ms: default_max_backoff_ms(),
            rebuild_elements: default_rebuild_elements(),
            expired_grace_ms: default_expired_grace_ms(),
            include_keys: Vec::new(),
            exclude_keys: Vec::new(),
            include_dbs: Vec::new(),
            exclude_commands: Vec::new(),
            max_ops_per_s: 0,
            max_bytes_per_s: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
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
fn default_mode() -> Mode {
    Mode::Auto
}
fn default_timeout_s() -> u64 {
    10
}
fn default_group() -> String {
    "redis-repl-sink".into()
}
fn default_batch_records() -> usize {
    512
}
fn default_prefix() -> String {
    "redis-repl:checkpoint".into()
}
fn default_conflict() -> Conflict {
    Conflict::Replace
}
fn default_new_snapshot() -> NewSnapshot {
    NewSnapshot::Keep
}
fn default_flush() -> FlushPolicy {
    FlushPolicy::Apply
}
fn default_on_error() -> OnError {
    OnError::Halt
}
fn default_max_backoff_ms() -> u64 {
    5000
}
fn default_rebuild_elements() -> usize {
    1000
}
fn default_expired_grace_ms() -> u64 {
    300_000
}
fn default_metrics_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9102))
}

impl Config {
    pub fn load(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
        let c: Config = service::config::load(path, "SINK")?;
        c.validate()?;
        Ok(c)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let endpoint = service::endpoint::Endpoint::parse(&self.redis.url)?;
        if endpoint.tls || self.redis.tls != service::tls::TlsFiles::default() {
            self.redis.tls.validate("redis")?;
        }
        anyhow::ensure!(!self.kafka.topic.is_empty(), "kafka.topic is empty");
        anyhow::ensure!(
            (1..=100_000).contains(&self.apply.batch_records),
            "apply.batch_records = {} is out of range 1-100000",
            self.apply.batch_records
        );
        for k in self.redis.db_map.keys() {
            anyhow::ensure!(
                k.parse::<u32>().is_ok(),
                "redis.db_map key {k:?} is not a db number"
            );
        }
        anyhow::ensure!(
            self.redis.transactions || self.redis.mode != Mode::Cluster,
            "redis.transactions = false is for proxies without transactions; a Redis Cluster takes them (redis.mode = \"cluster\")"
        );
        if self.apply.on_error == OnError::DeadLetter {
            anyhow::ensure!(
                self.apply.dead_letter_topic.is_some(),
                "apply.on_error = \"dead-letter\" needs apply.dead_letter_topic"
            );
        }
        Ok(())
    }

    /// The target db for a source db.
    pub fn map_db(&self, db: u32) -> u32 {
        if !self.redis.select {
            return 0;
        }
        self.redis
            .db_map
            .get(&db.to_string())
            .copied()
            .unwrap_or(db)
    }
}

/// A configuration for unit tests: the required keys, then `extra` (TOML).
#[cfg(test)]
pub(crate) fn for_tests(extra: &str) -> Config {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sink.toml");
    std::fs::write(
        &path,
        format!(
            "[redis]\nurl = \"redis://127.0.0.1:6379\"\n[kafka]\nbootstrap_servers = \"127.0.0.1:9092\"\ntopic = \"t\"\ngroup_id = \"g\"\n{extra}\n"
        ),
    )
    .unwrap();
    Config::load(Some(&path)).unwrap()
}
