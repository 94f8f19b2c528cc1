//! The target Redis: one connection per lane, batches applied as one `MULTI/EXEC` together with
//! the lane's checkpoint, and every error classified as retryable or not.

use crate::config::{Config, Mode};
use crate::convert::Args;
use bytes::Bytes;
use conn::{Conn, Packed};
use redis::Value;
use service::endpoint::Endpoint;
use std::time::Duration;

mod conn;
mod error;
mod keys;
mod routed;
mod write;

use error::server_error;
pub use error::{is_transient, runtime_error, ApplyError};
pub use keys::refusals;

/// One write: its db (None: wherever the connection is) and arguments.
#[derive(Debug, Clone)]
pub struct Op {
    pub db: Option<u32>,
    pub args: Args,
    /// A write of a lane's checkpoint. On a target without transactions it is sent only once
    /// every other write of the batch has been confirmed, so it never covers a write that did
    /// not happen.
    pub checkpoint: bool,
}

impl Op {
    /// A write of data.
    pub fn data(db: Option<u32>, args: Args) -> Op {
        Op {
            db,
            args,
            checkpoint: false,
        }
    }
}

pub struct Target {
    conn: Option<Conn>,
    /// The buffer requests are encoded into, kept between them.
    scratch: Packed,
    current_db: Option<u32>,
    select: bool,
    timeout: Duration,
    address: String,
    /// Newest RDB version the target can RESTORE.
    pub restore_max_version: u32,
    /// The target's `databases` setting, when it lets us read it.
    pub databases: Option<u32>,
    /// Connections made so far; a new one after the first may reach a target that lost writes.
    connections: u64,
    /// The server instance (`run_id`) and its id of the current connection (`CLIENT ID`), to
    /// close it from the next one.
    client_id: Option<(String, i64)>,
    /// Set when a reconnection happened: `exec` refuses to write until the lane has compared
    /// the target's checkpoint with what it applied and cleared this (`verified`).
    unverified: bool,
    mode: Mode,
    seed: Endpoint,
    tls: service::tls::TlsFiles,
    /// A Redis Cluster target, or a proxy that takes single-slot transactions only: the slot
    /// map and a connection per master (one endpoint for a proxy).
    cluster: Option<ClusterState>,
    /// Whether the target accepts `MULTI/EXEC` (`redis.transactions`).
    transactions: bool,
}

/// A cluster target's slot map and node connections.
#[derive(Default)]
struct ClusterState {
    /// Index into `nodes` of every slot's master.
    owners: Vec<usize>,
    nodes: Vec<(String, Option<Conn>)>,
    /// Read the slot map again before the next write (MOVED, a lost node).
    stale: bool,
    /// A proxy (`redis.mode = "proxy"`): every slot is reached through the one endpoint, which
    /// routes the commands itself and accepts a transaction whose keys are all in one slot.
    single_endpoint: bool,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("address", &self.address)
            .finish()
    }
}

impl Target {
    pub fn new(cfg: &Config) -> anyhow::Result<Target> {
        let seed = Endpoint::parse(&cfg.redis.url)?;
        if seed.tls {
            // Unreadable or invalid TLS files are a configuration error, not one to retry.
            cfg.redis.tls.client_config().map_err(|e| {
                anyhow::anyhow!(
                    "redis.url {}: {e}",
                    service::config::redact_url(&cfg.redis.url)
                )
            })?;
        }
        Ok(Target {
            conn: None,
            scratch: Packed::default(),
            current_db: None,
            select: cfg.redis.select,
            timeout: Duration::from_secs(cfg.redis.timeout_s),
            address: service::config::redact_url(&cfg.redis.url),
            restore_max_version: 0,
            databases: None,
            connections: 0,
            client_id: None,
            unverified: false,
            mode: cfg.redis.mode,
            tls: cfg.redis.tls.clone(),
            seed,
            cluster: None,
            transactions: cfg.redis.transactions,
        })
    }

    /// Whether checkpoints are kept per slot, each written in its slot's transaction: a Redis
    /// Cluster, or a proxy that takes single-slot transactions (known once connected).
    pub fn slot_checkpoints(&self) -> bool {
        self.cluster.is_some()
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    pub(super) fn connection_error(&mut self, e: redis::RedisError) -> ApplyError {
        self.conn = None;
        if let Some(c) = self.cluster.as_mut() {
            // A node went away (failover?): read the map again; the lane verifies its
            // checkpoints before writing, since a reply may have been lost.
            c.nodes.iter_mut().for_each(|n| n.1 = None);
            c.stale = true;
        }
        let text = e.to_string();
        // Authentication problems do not fix themselves.
        if service::endpoint::refused_credentials(&e) {
            return ApplyError::Permanent {
                code: "AUTH".into(),
                message: format!(
                    "target {}: {text} (check the user and password of redis.url and its ACL rules)",
                    self.address
                ),
                op: None,
                applied: false,
            };
        }
        ApplyError::Transient {
            code: "CONNECTION".into(),
            message: format!("target {}: {text}", self.address),
        }
    }

    /// A new connection to `endpoint`.
    pub(super) async fn connect(&mut self, endpoint: &Endpoint) -> Result<Conn, ApplyError> {
        match Conn::connect(endpoint, &self.tls, self.timeout, self.timeout * 6).await {
            Ok(c) => Ok(c),
            Err(e) => Err(self.connection_error(e)),
        }
    }

    pub(super) async fn conn(&mut self) -> Result<Conn, ApplyError> {
        if let Some(c) = &self.conn {
            return Ok(c.clone());
        }
        let seed = self.seed.clone();
        let conn = self.connect(&seed).await?;
        // The questions below go over a connection of their own: some proxies (twemproxy)
        // close a connection that sends a command they do not know, such as INFO or CONFIG.
        let probe = self.connect(&seed).await?;
        // Learn which RDB versions RESTORE accepts (proxies may hide INFO: then rebuild always).
        let info: Result<String, _> = probe.query(&["INFO", "server"]).await;
        let mut run_id = None;
        if let Ok(info) = info {
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
                    .map(|v| v.trim().to_owned())
            };
            run_id = field("run_id");
            let server = field("server_name").unwrap_or_else(|| "redis".into());
            let version = field("valkey_version")
                .or_else(|| field("redis_version"))
                .unwrap_or_default();
            self.restore_max_version = crate::convert::rdb_version_for(&server, &version);
        }
        let databases: Result<Vec<String>, _> = probe.query(&["CONFIG", "GET", "databases"]).await;
        self.databases = databases
            .ok()
            .and_then(|v| v.get(1).and_then(|n| n.parse().ok()));
        // A new connection is in db 0 (`redis.url` names no db).
        self.current_db = Some(0);
        let cluster = match self.mode {
            Mode::Cluster => true,
            Mode::Auto => {
                let info: Result<String, _> = probe.query(&["INFO", "cluster"]).await;
                info.is_ok_and(|i| i.lines().any(|l| l.trim() == "cluster_enabled:1"))
            }
            // A proxy that takes transactions takes them in one slot only (DCS Proxy Cluster,
            // Tair proxy); one without (twemproxy) is written like a standalone server.
            Mode::Proxy => self.transactions,
            Mode::Standalone => false,
        };
        if let Some(run_id) = run_id.filter(|_| !cluster) {
            self.fence(&probe, &conn, run_id).await;
        }
        drop(probe);
        if cluster && self.cluster.is_none() {
            let single_endpoint = self.mode == Mode::Proxy;
            if single_endpoint {
                tracing::info!("target {} is a proxy: each batch is applied as one transaction per slot, with that slot's checkpoint, and SELECT is never sent inside a transaction", self.address);
            } else {
                tracing::info!("target {} is a Redis Cluster: writes go to each slot's master, checkpoints are kept per slot", self.address);
            }
            self.cluster = Some(ClusterState {
                stale: true,
                single_endpoint,
                ..ClusterState::default()
            });
        }
        if cluster {
            // A cluster node has db 0 only, whatever `databases` says.
            self.databases = Some(1);
            self.current_db = Some(0);
        }
        self.conn = Some(conn.clone());
        self.connections += 1;
        if self.connections > 1 {
            self.unverified = true;
        }
        Ok(conn)
    }

    /// Closes the previous connection on the server's side, and learns the new one's client id.
    ///
    /// A connection the sink gave up on (no reply within the response timeout: a network path
    /// that died without a reset) may still carry a transaction: should the path heal, TCP
    /// delivers it and the target runs it, after the lane reconnected, read its checkpoint and
    /// applied that batch again — applying it twice and moving the checkpoint back. Killed here,
    /// before the lane reads its checkpoint on the new connection, it can no longer run: either
    /// it ran before (the checkpoint shows it) or never will. Targets that do not answer
    /// `CLIENT` (some proxies) go without.
    ///
    /// Client ids count from 1 again when the server restarts: the old id is only closed on the
    /// server instance (`run_id`) that gave it, never on another, where it may be anyone's.
    pub(super) async fn fence(&mut self, probe: &Conn, conn: &Conn, run_id: String) {
        let same_server = self.client_id.as_ref().is_some_and(|(r, _)| *r == run_id);
        if let Some((_, old)) = self.client_id.take().filter(|_| same_server) {
            let old_id = old.to_string();
            let killed: Result<i64, _> = probe.query(&["CLIENT", "KILL", "ID", &old_id]).await;
            if killed == Ok(1) {
                tracing::warn!(
                    "target {}: the previous connection (client id {old}) was still open on the target; closed it, so that a write it may still carry cannot run after this reconnection",
                    self.address
                );
                metrics::counter!("sink_target_stale_connections_closed_total").increment(1);
            }
        }
        self.client_id = conn
            .query(&["CLIENT", "ID"])
            .await
            .ok()
            .map(|id: i64| (run_id, id));
    }

    /// Runs one command outside a transaction (checkpoint reads, barrier markers).
    pub async fn query(&mut self, args: &[Bytes]) -> Result<Value, ApplyError> {
        let conn = self.conn().await?;
        if self.cluster.is_some() {
            if args[0].eq_ignore_ascii_case(b"select") {
                return Ok(Value::Okay);
            }
            return self.query_routed(args).await;
        }
        let v = self.one(&conn, args).await?;
        if let Some((code, message)) = server_error(&v) {
            return Err(ApplyError::refused(code, message, None));
        }
        if args[0].eq_ignore_ascii_case(b"select") {
            self.current_db = std::str::from_utf8(&args[1])
                .ok()
                .and_then(|d| d.parse().ok());
        }
        Ok(v)
    }

    /// Whether the connection is new and nothing was written on it yet: the target may have
    /// restarted or failed over and lost writes (see `Lane::verify_target`).
    pub fn unverified(&self) -> bool {
        self.unverified
    }

    /// How many connections to the target this lane has opened. Two reads or writes made with
    /// the same count ran on one connection, so the target did not restart in between.
    pub fn generation(&self) -> u64 {
        self.connections
    }

    /// The lane checked the target's checkpoint on this connection: writes may go on.
    pub fn verified(&mut self) {
        self.unverified = false;
    }

    /// Applies `ops` atomically: `MULTI`, each op (with `SELECT` where its db changes), `EXEC`.
    /// Returns the EXEC results, one per op (runtime errors of single commands included).
    /// Refused (transient `RECONNECTED`) on a new connection that the lane has not verified.
    pub async fn exec(&mut self, ops: &[Op]) -> Result<Vec<Value>, ApplyError> {
        let conn = self.conn().await?;
        if self.unverified {
            return Err(ApplyError::Transient {
                code: "RECONNECTED".into(),
                message: format!("target {}: new connection not verified yet", self.address),
            });
        }
        if self.cluster.is_some() {
            return self.exec_cluster(ops).await;
        }
        if !self.transactions {
            return self.write_plain(&conn, ops).await;
        }
        self.transaction(&conn, ops, self.select).await
    }
}
