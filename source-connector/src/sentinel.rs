//! Masters found through Redis Sentinel (`[redis.sentinel]`): which node is the master now, and
//! whether that changed. The link asks before every connection, and a watcher asks every
//! second while a session runs, so a failover moves the link to the promoted replica, where
//! `PSYNC` with the checkpoint continues when the backlog still holds it (PSYNC2 keeps the old
//! replication id as the new master's second one).

use crate::config::{Config, Endpoint, SentinelConfig};
use std::time::Duration;

/// How often a running session asks the Sentinels whether the master moved.
pub const POLL: Duration = Duration::from_secs(1);

/// Why no master address came back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SentinelError {
    /// Sentinels answered, and none monitors a master by that name: a setting to fix.
    #[error(
        "no Sentinel of {addresses} monitors a master named {name:?} (redis.sentinel.master_name)"
    )]
    UnknownMaster { addresses: String, name: String },
    /// No Sentinel answered (down, unreachable, refused the password): may come back.
    #[error("no Sentinel answered for master {name:?}: {errors}")]
    Unreachable { name: String, errors: String },
}

impl SentinelError {
    /// Retrying cannot help: the settings name a master the Sentinels do not know.
    pub fn is_fatal(&self) -> bool {
        matches!(self, SentinelError::UnknownMaster { .. })
    }
}

/// The Sentinels of one master.
#[derive(Debug, Clone)]
pub struct Sentinels {
    config: SentinelConfig,
    timeout: Duration,
}

/// What one Sentinel says about the master (for `check`).
#[derive(Debug, Clone)]
pub struct View {
    pub sentinel: String,
    pub master: Result<Option<(String, u16)>, String>,
    pub replicas: Option<usize>,
    pub other_sentinels: Option<usize>,
}

impl Sentinels {
    pub fn of(config: &Config) -> Option<Sentinels> {
        config.redis.sentinel.clone().map(|s| Sentinels {
            config: s,
            timeout: Duration::from_secs(config.redis.timeout_s),
        })
    }

    pub fn master_name(&self) -> &str {
        &self.config.master_name
    }

    fn connect(&self, address: &str) -> redis::RedisResult<redis::Connection> {
        let (host, port) = address.rsplit_once(':').unwrap_or((address, "26379"));
        let url = crate::cluster::client_url(&Endpoint {
            host: host.to_owned(),
            port: port.parse().unwrap_or(26379),
            user: None,
            password: self.config.password.clone(),
            tls: false,
        });
        let conn = redis::Client::open(url)?.get_connection_with_timeout(self.timeout)?;
        conn.set_read_timeout(Some(self.timeout))?;
        Ok(conn)
    }

    /// `SENTINEL get-master-addr-by-name` on one Sentinel: `None` when it does not know the name.
    fn ask(&self, address: &str) -> redis::RedisResult<Option<(String, u16)>> {
        let mut conn = self.connect(address)?;
        let reply: Option<(String, u16)> = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.config.master_name)
            .query(&mut conn)?;
        Ok(reply)
    }

    /// The master's address as the first Sentinel that answers sees it. Blocking.
    pub fn master(&self) -> Result<(String, u16), SentinelError> {
        let mut errors = Vec::new();
        let mut answered = false;
        for address in &self.config.addresses {
            match self.ask(address) {
                Ok(Some(master)) => return Ok(master),
                Ok(None) => answered = true,
                Err(e) => errors.push(format!("{address}: {e}")),
            }
        }
        if answered {
            return Err(SentinelError::UnknownMaster {
                addresses: self.config.addresses.join(", "),
                name: self.config.master_name.clone(),
            });
        }
        Err(SentinelError::Unreachable {
            name: self.config.master_name.clone(),
            errors: errors.join("; "),
        })
    }

    /// `endpoint` (credentials, TLS) at the master's address. Blocking.
    pub fn master_endpoint(&self, endpoint: &Endpoint) -> Result<Endpoint, SentinelError> {
        let (host, port) = self.master()?;
        Ok(crate::cluster::at(endpoint, &host, port))
    }

    /// What each Sentinel says: the master, and how many replicas and other Sentinels it knows.
    pub fn views(&self) -> Vec<View> {
        self.config
            .addresses
            .iter()
            .map(|address| {
                let count = |what: &str| -> Option<usize> {
                    let mut conn = self.connect(address).ok()?;
                    let v: Vec<redis::Value> = redis::cmd("SENTINEL")
                        .arg(what)
                        .arg(&self.config.master_name)
                        .query(&mut conn)
                        .ok()?;
                    Some(v.len())
                };
                View {
                    sentinel: address.clone(),
                    master: self.ask(address).map_err(|e| e.to_string()),
                    replicas: count("replicas"),
                    other_sentinels: count("sentinels"),
                }
            })
            .collect()
    }
}
