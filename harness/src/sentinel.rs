//! Redis Sentinels (`redis-server --sentinel`, the same Debian binary `redis-sentinel` runs)
//! watching one master, with a forced failover (`SENTINEL FAILOVER`).

use crate::ports::free_port;
use crate::process::{ManagedProcess, Spec, WorkDir};
use crate::redis::{server_bin, RedisServer};
use std::time::Duration;

/// The name the Sentinels monitor the master under.
pub const MASTER_NAME: &str = "pipeline-master";

#[derive(Debug)]
struct Sentinel {
    _process: ManagedProcess,
    port: u16,
}

/// Several Sentinels monitoring one master (quorum: a majority); stopped when dropped.
#[derive(Debug)]
pub struct Sentinels {
    sentinels: Vec<Sentinel>,
    _dir: WorkDir,
}

impl Sentinels {
    /// Starts `n` Sentinels monitoring `master` and waits until each knows it and its replicas
    /// (`replicas` of them).
    pub fn start(master: &RedisServer, n: usize, replicas: usize) -> anyhow::Result<Sentinels> {
        let dir = WorkDir::new("sentinel")?;
        let quorum = n / 2 + 1;
        let mut sentinels = Vec::new();
        for i in 0..n {
            let port = free_port();
            let sub = dir.subdir(&format!("s{i}"))?;
            let conf = sub.join("sentinel.conf");
            let mut text = format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {}\nsentinel monitor {MASTER_NAME} 127.0.0.1 {} {quorum}\nsentinel down-after-milliseconds {MASTER_NAME} 2000\nsentinel failover-timeout {MASTER_NAME} 10000\nsentinel parallel-syncs {MASTER_NAME} 1\n",
                sub.display(),
                master.port()
            );
            if let Some(p) = master.password() {
                text.push_str(&format!("sentinel auth-pass {MASTER_NAME} {p}\n"));
            }
            // Sentinel rewrites its file: it must be writable.
            std::fs::write(&conf, text)?;
            let process = ManagedProcess::spawn(Spec {
                name: format!("sentinel-{port}"),
                program: server_bin(),
                args: vec![conf.display().to_string(), "--sentinel".into()],
                cwd: sub,
                env: vec![],
            })?;
            sentinels.push(Sentinel {
                _process: process,
                port,
            });
        }
        let s = Sentinels {
            sentinels,
            _dir: dir,
        };
        for sentinel in &s.sentinels {
            crate::wait_for(
                &format!(
                    "sentinel {} to see the master and {replicas} replicas",
                    sentinel.port
                ),
                Duration::from_secs(30),
                || {
                    let mut c = conn(sentinel.port)?;
                    let known: Vec<redis::Value> = redis::cmd("SENTINEL")
                        .arg("replicas")
                        .arg(MASTER_NAME)
                        .query(&mut c)
                        .ok()?;
                    (known.len() >= replicas).then_some(())
                },
            )?;
        }
        Ok(s)
    }

    /// `host:port` of every Sentinel.
    pub fn addresses(&self) -> Vec<String> {
        self.sentinels
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect()
    }

    /// The master's port as the first Sentinel sees it.
    pub fn master_port(&self) -> Option<u16> {
        master_port_seen_by(self.sentinels.first()?.port)
    }

    /// Forces a failover (`SENTINEL FAILOVER`, retried while no replica is ready to be
    /// promoted) and waits until every Sentinel names the new master. Returns its port.
    pub fn failover(&self) -> anyhow::Result<u16> {
        let before = self.master_port();
        crate::wait_for(
            "SENTINEL FAILOVER to start",
            Duration::from_secs(30),
            || {
                let mut c = conn(self.sentinels[0].port)?;
                redis::cmd("SENTINEL")
                    .arg("FAILOVER")
                    .arg(MASTER_NAME)
                    .query::<()>(&mut c)
                    .ok()
            },
        )?;
        crate::wait_for(
            "every Sentinel to name the new master",
            Duration::from_secs(60),
            || {
                let ports: Vec<Option<u16>> = self
                    .sentinels
                    .iter()
                    .map(|s| master_port_seen_by(s.port))
                    .collect();
                let first = ports[0]?;
                (Some(first) != before && ports.iter().all(|p| *p == Some(first))).then_some(first)
            },
        )
    }
}

fn conn(port: u16) -> Option<redis::Connection> {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .ok()?
        .get_connection_with_timeout(Duration::from_secs(2))
        .ok()
}

/// The master's port as the Sentinel on `port` sees it.
fn master_port_seen_by(port: u16) -> Option<u16> {
    let (_, master): (String, u16) = redis::cmd("SENTINEL")
        .arg("get-master-addr-by-name")
        .arg(MASTER_NAME)
        .query(&mut conn(port)?)
        .ok()?;
    Some(master)
}
