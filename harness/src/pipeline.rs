//! A whole pipeline on loopback: source Redis, broker, target Redis, and both connectors as
//! real processes, plus a wait-until-equal helper built on the dataset comparison.

use crate::broker::{random_topic, Broker, Storage};
use crate::connector::{Connector, Kind};
use crate::dataset::{self, CompareOptions, Report};
use crate::proxy::FaultProxy;
use crate::redis::{RedisConfig, RedisServer};
use std::time::{Duration, Instant};

/// The sink's default checkpoint key prefix (excluded from comparisons).
pub const CHECKPOINT_PREFIX: &str = "redis-repl:checkpoint";

#[derive(Debug, Clone)]
pub struct Options {
    pub partitions: u32,
    pub source: RedisConfig,
    pub target: RedisConfig,
    pub storage: Storage,
    /// Extra TOML lines for the sink's `[apply]` table.
    pub sink_apply: String,
    /// Extra TOML lines for the source's `[snapshot]` table.
    pub source_snapshot: String,
    /// ACL user and password the source connector authenticates with (default: the server's
    /// default user).
    pub source_user: Option<(String, String)>,
    /// ACL user and password the sink connector authenticates with on the target.
    pub target_user: Option<(String, String)>,
    /// Put a fault-injecting proxy between the source connector and the source Redis
    /// (`Pipeline::source_proxy`), and between the sink and the target (`target_proxy`).
    pub proxies: bool,
    /// Put the broker behind a fault-injecting proxy it advertises as its address
    /// (`Pipeline::kafka_proxy`): every Kafka connection of both connectors goes through it.
    pub kafka_proxy: bool,
    /// Environment overrides for the source connector (`SOURCE_…`) and the sink (`SINK_…`).
    pub source_env: Vec<(String, String)>,
    pub sink_env: Vec<(String, String)>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            partitions: 4,
            source: RedisConfig::default(),
            target: RedisConfig::default().with("maxmemory-policy", "noeviction"),
            storage: Storage::Memory,
            sink_apply: String::new(),
            source_snapshot: String::new(),
            source_user: None,
            target_user: None,
            proxies: false,
            kafka_proxy: false,
            source_env: Vec::new(),
            sink_env: Vec::new(),
        }
    }
}

/// How the pipeline came back from a fault.
#[derive(Debug, Clone, Copy)]
pub struct Recovery {
    /// From the call to `recover` (right after the fault ended) until source and target were
    /// equal.
    pub seconds: f64,
    /// The largest `sink_lag_seconds` of any lane seen while waiting.
    pub worst_lag_s: f64,
}

/// Appends one fault scenario's outcome to `target/reliability.jsonl`, which
/// `scripts/reliability-report.sh` turns into the table of docs/reliability.md. Lost and
/// duplicated writes are 0 by construction: the caller only records after an exact comparison.
pub fn record_reliability(scenario: &str, trials: u32, writes: u64, recovery: Recovery) {
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> -> target/
    let Some(target) = exe.ancestors().nth(3) else {
        return;
    };
    let line = serde_json::json!({
        "scenario": scenario,
        "trials": trials,
        "writes": writes,
        "lost": 0,
        "duplicated": 0,
        "worst_lag_s": (recovery.worst_lag_s * 10.0).round() / 10.0,
        "recovery_s": (recovery.seconds * 10.0).round() / 10.0,
        "at_unix_s": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    });
    use std::io::Write;
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(target.join("reliability.jsonl"))
    {
        let _ = writeln!(f, "{line}");
    }
}

#[derive(Debug)]
pub struct Pipeline {
    pub source: RedisServer,
    pub target: RedisServer,
    pub broker: Broker,
    pub topic: String,
    pub source_connector: Connector,
    pub sink: Connector,
    pub options: Options,
    /// With `Options::proxies`: the source connector reaches the source through this.
    pub source_proxy: Option<FaultProxy>,
    /// With `Options::proxies`: the sink reaches the target through this.
    pub target_proxy: Option<FaultProxy>,
    /// With `Options::kafka_proxy`: both connectors reach the broker through this.
    pub kafka_proxy: Option<FaultProxy>,
}

impl Pipeline {
    /// Starts everything; the source may already hold data or get it later.
    pub fn start(options: Options) -> anyhow::Result<Pipeline> {
        let source = RedisServer::start(options.source.clone())?;
        let target = RedisServer::start(options.target.clone())?;
        Pipeline::start_with(source, target, options)
    }

    /// Starts the broker and both connectors between existing servers.
    pub fn start_with(
        source: RedisServer,
        target: RedisServer,
        options: Options,
    ) -> anyhow::Result<Pipeline> {
        let (broker, kafka_proxy) = match options.kafka_proxy {
            true => {
                let (b, p) = Broker::start_behind_proxy(options.storage)?;
                (b, Some(p))
            }
            false => (Broker::start(options.storage)?, None),
        };
        let topic = random_topic("pipeline");
        let proxy = |server: &RedisServer| -> anyhow::Result<Option<FaultProxy>> {
            Ok(match options.proxies {
                true => Some(FaultProxy::start(&server.addr())?),
                false => None,
            })
        };
        let source_proxy = proxy(&source)?;
        let target_proxy = proxy(&target)?;
        let source_connector = Connector::start(
            Kind::Source,
            &source_config(
                &connector_url(&source, &options.source_user, &source_proxy),
                &broker.bootstrap(),
                &topic,
                &options,
            ),
            &env_pairs(&options.source_env),
        )?;
        let sink = Connector::start(
            Kind::Sink,
            &sink_config(
                &connector_url(&target, &options.target_user, &target_proxy),
                &broker.bootstrap(),
                &topic,
                &options,
            ),
            &env_pairs(&options.sink_env),
        )?;
        Ok(Pipeline {
            source,
            target,
            broker,
            topic,
            source_connector,
            sink,
            options,
            source_proxy,
            target_proxy,
            kafka_proxy,
        })
    }

    /// Another sink process in the same consumer group.
    pub fn extra_sink(&self) -> anyhow::Result<Connector> {
        Connector::start(
            Kind::Sink,
            &sink_config(
                &connector_url(&self.target, &self.options.target_user, &self.target_proxy),
                &self.broker.bootstrap(),
                &self.topic,
                &self.options,
            ),
            &[],
        )
    }

    /// Writes a marker key to the source and waits until the sink applied it: the snapshot is
    /// done and the command stream flows end to end.
    pub fn wait_running(&self) -> anyhow::Result<()> {
        self.source.cmd::<()>(&["SET", "ready", "1"])?;
        crate::wait_for(
            "the pipeline to apply a first write",
            Duration::from_secs(60),
            || {
                self.target
                    .cmd::<Option<String>>(&["GET", "ready"])
                    .ok()
                    .flatten()
            },
        )
        .map_err(|e| anyhow::anyhow!("{e}\n---- sink ----\n{}", tail(&self.sink.log(), 6000)))?;
        Ok(())
    }

    /// Source and target datasets compared (checkpoint keys ignored).
    pub fn compare(&self) -> anyhow::Result<Report> {
        let expected = dataset::read(&mut [self.source.conn()])?;
        let actual = dataset::read(&mut [self.target.conn()])?;
        Ok(expected.compare(&actual, &compare_options()))
    }

    /// Waits until the target equals the source, or fails with the last differences and logs.
    pub fn wait_equal(&self, timeout: Duration) -> anyhow::Result<Report> {
        self.wait_equal_measured(timeout).map(|(report, _)| report)
    }

    /// Waits until the target equals the source after a fault: how long that took, and the
    /// worst lane lag (`sink_lag_seconds`) seen meanwhile.
    pub fn recover(&self, timeout: Duration) -> anyhow::Result<Recovery> {
        self.wait_equal_measured(timeout)
            .map(|(_, recovery)| recovery)
    }

    fn wait_equal_measured(&self, timeout: Duration) -> anyhow::Result<(Report, Recovery)> {
        let started = Instant::now();
        let mut worst_lag_s: f64 = 0.0;
        loop {
            for p in 0..self.options.partitions {
                let lag = self
                    .sink
                    .metric("sink_lag_seconds", &[("partition", &p.to_string())]);
                worst_lag_s = worst_lag_s.max(lag.unwrap_or(0.0));
            }
            let report = self.compare()?;
            if report.is_equal() {
                let recovery = Recovery {
                    seconds: started.elapsed().as_secs_f64(),
                    worst_lag_s,
                };
                return Ok((report, recovery));
            }
            if started.elapsed() > timeout {
                anyhow::bail!(
                    "target still differs from source after {timeout:?}:\n{report}\n---- source connector ----\n{}\n---- sink ----\n{}",
                    tail(&self.source_connector.log(), 6000),
                    tail(&self.sink.log(), 6000)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// How a pipeline's target is compared with its source: checkpoint keys left out, and a
/// consumer group's `entries_read` not compared (Redis 7.0 propagates XREADGROUP as
/// XCLAIM ... LASTID, which leaves it unset on whatever applies it: a native replica shows
/// `entries-read` empty too, checked with redis-server 7.0.15 master and replica).
pub fn compare_options() -> CompareOptions {
    CompareOptions {
        ignore_prefix: Some(CHECKPOINT_PREFIX.as_bytes().to_vec()),
        stream_entries_read: false,
        ..CompareOptions::default()
    }
}

fn tail(s: &str, n: usize) -> &str {
    let mut start = s.len().saturating_sub(n);
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

fn env_pairs(vars: &[(String, String)]) -> Vec<(&str, &str)> {
    vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// The URL a connector uses: the server's (or its proxy's) address, with an ACL user's
/// credentials or the server's password.
fn connector_url(
    server: &RedisServer,
    user: &Option<(String, String)>,
    proxy: &Option<FaultProxy>,
) -> String {
    let addr = proxy
        .as_ref()
        .map_or_else(|| server.addr(), FaultProxy::addr);
    match (user, server.password()) {
        (Some((name, password)), _) => format!("redis://{name}:{password}@{addr}"),
        (None, Some(password)) => format!("redis://:{password}@{addr}"),
        (None, None) => format!("redis://{addr}"),
    }
}

pub fn source_config(redis_url: &str, bootstrap: &str, topic: &str, o: &Options) -> String {
    format!(
        "[redis]\nurl = \"{redis_url}\"\nshard_name = \"source\"\n\n[kafka]\nbootstrap_servers = \"{bootstrap}\"\ntopic = \"{topic}\"\npartitions = {}\n\n[snapshot]\n{}\n",
        o.partitions, o.source_snapshot
    )
}

pub fn sink_config(redis_url: &str, bootstrap: &str, topic: &str, o: &Options) -> String {
    format!(
        "[redis]\nurl = \"{redis_url}\"\n\n[kafka]\nbootstrap_servers = \"{bootstrap}\"\ntopic = \"{topic}\"\ngroup_id = \"sink-{topic}\"\n\n[apply]\n{}\n",
        o.sink_apply
    )
}
