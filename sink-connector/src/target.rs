//! The target Redis: one connection per lane, batches applied as one `MULTI/EXEC` together with
//! the lane's checkpoint, and every error classified as retryable or not.

use crate::cluster::{self, Routing};
use crate::config::{Config, Mode};
use crate::convert::Args;
use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::Value;
use service::endpoint::Endpoint;
use std::time::Duration;

/// Why a batch was not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApplyError {
    /// Retry the same batch later (OOM, LOADING, BUSY, TRYAGAIN, CLUSTERDOWN, MASTERDOWN,
    /// connection lost). Nothing of the batch was applied.
    #[error("{code}: {message}")]
    Transient { code: String, message: String },
    /// Retrying cannot help. `applied` says whether the transaction ran (a runtime error of one
    /// command inside EXEC) or was refused whole; `op` is the failing operation's index.
    #[error("{code}: {message}")]
    Permanent {
        code: String,
        message: String,
        op: Option<usize>,
        applied: bool,
    },
    /// A target without transactions refused op `done` for now (OOM, LOADING …): the ops
    /// before it ran, in order; `ran_after` of the ops after it ran as well. Retry from `done`
    /// (those that ran after it run again: at least once).
    #[error("{code}: {message}")]
    Interrupted {
        done: usize,
        ran_after: usize,
        code: String,
        message: String,
    },
}

impl ApplyError {
    /// Whether the error is the target refusing this connection (authentication), not one
    /// record's write: no record is to blame, so none is rejected or dead-lettered for it.
    pub fn is_authentication(&self) -> bool {
        matches!(self, ApplyError::Permanent { code, .. } if matches!(code.as_str(), "AUTH" | "NOAUTH" | "WRONGPASS"))
    }

    /// A command refused before it ran: transient or permanent by its code.
    fn refused(code: String, message: String, op: Option<usize>) -> ApplyError {
        if is_transient(&code) {
            ApplyError::Transient { code, message }
        } else {
            ApplyError::Permanent {
                code,
                message,
                op,
                applied: false,
            }
        }
    }

    pub fn code(&self) -> &str {
        match self {
            ApplyError::Transient { code, .. }
            | ApplyError::Permanent { code, .. }
            | ApplyError::Interrupted { code, .. } => code,
        }
    }
}

/// Error codes worth retrying until they go away.
pub fn is_transient(code: &str) -> bool {
    matches!(
        code,
        "OOM"
            | "LOADING"
            | "BUSY"
            | "TRYAGAIN"
            | "CLUSTERDOWN"
            | "MASTERDOWN"
            | "NOREPLICAS"
            | "READONLY"
            | "NOMASTERLINK"
            | "MISCONF"
            // Cluster targets: the slot moved (the map is read again) or is moving.
            | "MOVED"
            | "ASK"
    )
}

/// A command a cluster target cannot run: its keys are in several slots.
fn cross_slot(args: &[Bytes], op: Option<usize>) -> ApplyError {
    ApplyError::Permanent {
        code: "CROSSSLOT".into(),
        message: format!(
            "{} touches keys in several slots, which a cluster target cannot run in one command",
            String::from_utf8_lossy(&args[0]).to_ascii_uppercase()
        ),
        op,
        applied: op.is_some_and(|i| i > 0),
    }
}

/// A redis-rs command of `args`, sized up front.
fn command(args: &[Bytes]) -> redis::Cmd {
    let mut cmd = redis::Cmd::with_capacity(args.len(), args.iter().map(Bytes::len).sum());
    for a in args {
        cmd.arg(a.as_ref());
    }
    cmd
}

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
    client: redis::Client,
    conn: Option<MultiplexedConnection>,
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
    nodes: Vec<(String, Option<MultiplexedConnection>)>,
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

fn server_error(v: &Value) -> Option<(String, String)> {
    match v {
        Value::ServerError(e) => {
            let code = e.code().to_owned();
            let message = e.details().unwrap_or_default().to_owned();
            Some((code, message))
        }
        _ => None,
    }
}

/// Replies of pipelined ops (outside a transaction) that refused one for now: where to go on
/// from. `first` is the index of `results[0]` among the ops given to `exec`.
fn interrupted(results: &[Value], first: usize) -> Option<ApplyError> {
    let (k, code, message) = results.iter().enumerate().find_map(|(k, v)| {
        let (code, message) = server_error(v)?;
        is_transient(&code).then_some((k, code, message))
    })?;
    let ran_after = results[k + 1..]
        .iter()
        .filter(|v| server_error(v).is_none())
        .count();
    Some(ApplyError::Interrupted {
        done: first + k,
        ran_after,
        code,
        message,
    })
}

/// The first runtime error in EXEC results that `ignore` does not excuse.
pub fn runtime_error(results: &[Value], ignore: impl Fn(&str) -> bool) -> Option<ApplyError> {
    results.iter().enumerate().find_map(|(i, v)| {
        let (code, message) = server_error(v)?;
        (!ignore(&code)).then_some(ApplyError::Permanent {
            code,
            message,
            op: Some(i),
            applied: true,
        })
    })
}

impl Target {
    pub fn new(cfg: &Config) -> anyhow::Result<Target> {
        let client = cfg
            .redis
            .tls
            .redis_client(cfg.redis.url.as_str())
            .map_err(|e| {
                anyhow::anyhow!(
                    "redis.url {}: {e}",
                    service::config::redact_url(&cfg.redis.url)
                )
            })?;
        Ok(Target {
            client,
            conn: None,
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
            seed: Endpoint::parse(&cfg.redis.url)?,
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

    fn connection_error(&mut self, e: redis::RedisError) -> ApplyError {
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

    async fn conn(&mut self) -> Result<MultiplexedConnection, ApplyError> {
        if let Some(c) = &self.conn {
            return Ok(c.clone());
        }
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout * 6);
        let conn = match self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(c) => c,
            Err(e) => return Err(self.connection_error(e)),
        };
        // The questions below go over a connection of their own: some proxies (twemproxy)
        // close a connection that sends a command they do not know, such as INFO or CONFIG.
        let mut probe = match self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await
        {
            Ok(c) => c,
            Err(e) => return Err(self.connection_error(e)),
        };
        // Learn which RDB versions RESTORE accepts (proxies may hide INFO: then rebuild always).
        let info: Result<String, _> = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut probe)
            .await;
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
        let databases: Result<Vec<String>, _> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("databases")
            .query_async(&mut probe)
            .await;
        self.databases = databases
            .ok()
            .and_then(|v| v.get(1).and_then(|n| n.parse().ok()));
        self.current_db = self.client.get_connection_info().redis.db.try_into().ok();
        let cluster = match self.mode {
            Mode::Cluster => true,
            Mode::Auto => {
                let info: Result<String, _> = redis::cmd("INFO")
                    .arg("cluster")
                    .query_async(&mut probe)
                    .await;
                info.is_ok_and(|i| i.lines().any(|l| l.trim() == "cluster_enabled:1"))
            }
            // A proxy that takes transactions takes them in one slot only (DCS Proxy Cluster,
            // Tair proxy); one without (twemproxy) is written like a standalone server.
            Mode::Proxy => self.transactions,
            Mode::Standalone => false,
        };
        if let Some(run_id) = run_id.filter(|_| !cluster) {
            self.fence(&mut probe, conn.clone(), run_id).await;
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
    async fn fence(
        &mut self,
        probe: &mut MultiplexedConnection,
        mut conn: MultiplexedConnection,
        run_id: String,
    ) {
        let same_server = self.client_id.as_ref().is_some_and(|(r, _)| *r == run_id);
        if let Some((_, old)) = self.client_id.take().filter(|_| same_server) {
            let killed: Result<i64, _> = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(old)
                .query_async(probe)
                .await;
            if killed == Ok(1) {
                tracing::warn!(
                    "target {}: the previous connection (client id {old}) was still open on the target; closed it, so that a write it may still carry cannot run after this reconnection",
                    self.address
                );
                metrics::counter!("sink_target_stale_connections_closed_total").increment(1);
            }
        }
        self.client_id = redis::cmd("CLIENT")
            .arg("ID")
            .query_async(&mut conn)
            .await
            .ok()
            .map(|id: i64| (run_id, id));
    }

    /// Runs one command outside a transaction (checkpoint reads, barrier markers).
    pub async fn query(&mut self, args: &[Bytes]) -> Result<Value, ApplyError> {
        let mut conn = self.conn().await?;
        if self.cluster.is_some() {
            if args[0].eq_ignore_ascii_case(b"select") {
                return Ok(Value::Okay);
            }
            return self.query_routed(args).await;
        }
        let v = self.one(&mut conn, args).await?;
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
        let mut conn = self.conn().await?;
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
            return self.write_plain(&mut conn, ops).await;
        }
        self.transaction(&mut conn, ops, self.select).await
    }

    /// A target without transactions (`redis.transactions = false`): the data ops pipelined as
    /// they are, in order (with `SELECT` where the db changes), then, once every one of them
    /// has answered, the checkpoint ops (the trailing ops marked `checkpoint`). So a checkpoint
    /// never covers a write that did not happen; a crash or a lost connection in between can
    /// leave writes done that the checkpoint does not cover yet, which are applied again (at
    /// least once). Returns one result per op, runtime errors included, like `transaction`.
    async fn write_plain(
        &mut self,
        conn: &mut MultiplexedConnection,
        ops: &[Op],
    ) -> Result<Vec<Value>, ApplyError> {
        let data = ops
            .iter()
            .rposition(|op| !op.checkpoint)
            .map_or(0, |i| i + 1);
        let mut results = self.pipelined(conn, &ops[..data]).await?;
        if let Some(e) = interrupted(&results, 0) {
            return Err(e);
        }
        let checkpoints = self.pipelined(conn, &ops[data..]).await?;
        if let Some(e) = interrupted(&checkpoints, data) {
            return Err(e);
        }
        results.extend(checkpoints);
        Ok(results)
    }

    /// `ops` as one pipeline outside a transaction; one reply per op.
    async fn pipelined(
        &mut self,
        conn: &mut MultiplexedConnection,
        ops: &[Op],
    ) -> Result<Vec<Value>, ApplyError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::Pipeline::with_capacity(ops.len());
        let mut selects = Vec::new();
        let mut db = self.current_db;
        for (i, op) in ops.iter().enumerate() {
            if let Some(want) = op.db.filter(|&want| self.select && db != Some(want)) {
                pipe.cmd("SELECT").arg(want);
                selects.push(i + selects.len());
                db = Some(want);
            }
            pipe.add_command(command(&op.args));
        }
        let n = ops.len() + selects.len();
        let values = match conn.send_packed_commands(&pipe, 0, n).await {
            Ok(v) => v,
            Err(e) => return Err(self.connection_error(e)),
        };
        let mut results = Vec::with_capacity(ops.len());
        for (i, v) in values.into_iter().enumerate() {
            if selects.contains(&i) {
                if let Some((code, message)) = server_error(&v) {
                    // The writes after it went to the wrong db: never acceptable.
                    return Err(ApplyError::Permanent {
                        code,
                        message: format!("SELECT failed before a write: {message}"),
                        op: Some(results.len()),
                        applied: true,
                    });
                }
                continue;
            }
            results.push(v);
        }
        self.current_db = db;
        results.resize(ops.len(), Value::Nil);
        Ok(results)
    }

    /// `MULTI`, the ops (with `SELECT` where the db changes when `select`), `EXEC` on `conn`.
    async fn transaction(
        &mut self,
        conn: &mut MultiplexedConnection,
        ops: &[Op],
        select: bool,
    ) -> Result<Vec<Value>, ApplyError> {
        let mut pipe = redis::Pipeline::with_capacity(ops.len() + 2);
        pipe.cmd("MULTI");
        // Index in the EXEC result of each op (SELECTs are results too).
        let mut result_index = Vec::with_capacity(ops.len());
        let mut queued = 0usize;
        let mut db = self.current_db;
        for op in ops {
            if select {
                if let Some(want) = op.db {
                    if db != Some(want) {
                        pipe.cmd("SELECT").arg(want);
                        queued += 1;
                        db = Some(want);
                    }
                }
            }
            pipe.add_command(command(&op.args));
            result_index.push(queued);
            queued += 1;
        }
        pipe.cmd("EXEC");
        let n = queued + 2;
        let values = match conn.send_packed_commands(&pipe, 0, n).await {
            Ok(v) => v,
            Err(e) => return Err(self.connection_error(e)),
        };
        let mut conn = conn.clone();
        // MULTI and the queued replies: an error there means nothing ran.
        for (i, v) in values.iter().take(n - 1).enumerate() {
            if let Some((code, message)) = server_error(v) {
                self.discard(&mut conn).await;
                let op = (i > 0)
                    .then(|| result_index.iter().position(|&r| r == i - 1))
                    .flatten();
                return Err(ApplyError::refused(code, message, op));
            }
        }
        let exec = values.into_iter().last().unwrap_or(Value::Nil);
        if let Some((code, message)) = server_error(&exec) {
            self.discard(&mut conn).await;
            // EXECABORT without a refused queued command: the transaction was dropped whole.
            if code == "EXECABORT" {
                return Err(ApplyError::Transient { code, message });
            }
            return Err(ApplyError::refused(code, message, None));
        }
        let Value::Array(results) = exec else {
            return Err(ApplyError::Transient {
                code: "EXEC".into(),
                message: format!("unexpected EXEC reply {exec:?}"),
            });
        };
        self.current_db = db;
        // A SELECT that failed at run time sent the commands after it to the wrong db: that is
        // never acceptable, whatever the caller's policy.
        let mut ops_at = result_index.iter().peekable();
        for (i, v) in results.iter().enumerate() {
            if ops_at.next_if_eq(&&i).is_some() {
                continue;
            }
            if let Some((code, message)) = server_error(v) {
                return Err(ApplyError::Permanent {
                    code,
                    message: format!("SELECT failed inside the transaction: {message}"),
                    op: result_index.iter().position(|&r| r > i),
                    applied: true,
                });
            }
        }
        // Runtime errors of single commands (the transaction ran) are left in the results for
        // the caller to judge: see `runtime_error`.
        let mut ops_at = result_index.iter().peekable();
        let mut of_ops: Vec<Value> = results
            .into_iter()
            .enumerate()
            .filter_map(|(i, v)| ops_at.next_if_eq(&&i).map(|_| v))
            .collect();
        of_ops.resize(ops.len(), Value::Nil);
        Ok(of_ops)
    }

    /// Reads the slot map (`CLUSTER SLOTS`) from the seed node. A proxy's one endpoint serves
    /// every slot.
    async fn refresh(&mut self) -> Result<(), ApplyError> {
        let mut conn = self.conn().await?;
        if let Some(state) = self.cluster.as_mut().filter(|c| c.single_endpoint) {
            state.owners = vec![0; 16384];
            state.nodes = vec![(self.address.clone(), None)];
            state.stale = false;
            return Ok(());
        }
        let reply: Value = match redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn)
            .await
        {
            Ok(v) => v,
            Err(e) => return Err(self.connection_error(e)),
        };
        let ranges = cluster::parse_slots(&reply, &self.seed.host);
        let Some(state) = self.cluster.as_mut() else {
            return Ok(());
        };
        let mut owners = vec![usize::MAX; 16384];
        for (first, last, host, port) in ranges {
            let addr = format!("{host}:{port}");
            let i = match state.nodes.iter().position(|n| n.0 == addr) {
                Some(i) => i,
                None => {
                    state.nodes.push((addr, None));
                    state.nodes.len() - 1
                }
            };
            for slot in first..=last.min(16383) {
                owners[usize::from(slot)] = i;
            }
        }
        let uncovered = owners.iter().filter(|&&o| o == usize::MAX).count();
        state.owners = owners;
        if uncovered > 0 {
            return Err(ApplyError::Transient {
                code: "CLUSTERDOWN".into(),
                message: format!("target {}: {uncovered} slots have no master", self.address),
            });
        }
        state.stale = false;
        Ok(())
    }

    /// The connection to node `i` of the cluster (a proxy's: the one connection).
    async fn node(&mut self, i: usize) -> Result<MultiplexedConnection, ApplyError> {
        let state = self.cluster.as_ref().expect("cluster target");
        if state.single_endpoint {
            return self.conn().await;
        }
        let (addr, conn) = &state.nodes[i];
        if let Some(c) = conn {
            return Ok(c.clone());
        }
        let (host, port) = addr.rsplit_once(':').unwrap_or((addr.as_str(), "6379"));
        let endpoint = service::endpoint::at(&self.seed, host, port.parse().unwrap_or(6379));
        let url = service::endpoint::client_url(&endpoint);
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout * 6);
        let conn = self
            .tls
            .redis_client(&url)
            .map_err(|e| self.connection_error(e))?
            .get_multiplexed_async_connection_with_config(&config)
            .await;
        let conn = match conn {
            Ok(c) => c,
            Err(e) => return Err(self.connection_error(e)),
        };
        if let Some(state) = self.cluster.as_mut() {
            state.nodes[i].1 = Some(conn.clone());
        }
        Ok(conn)
    }

    /// The connection to the master of `slot`.
    async fn slot_conn(&mut self, slot: u16) -> Result<MultiplexedConnection, ApplyError> {
        if self
            .cluster
            .as_ref()
            .is_some_and(|c| c.stale || c.owners.is_empty())
        {
            self.refresh().await?;
        }
        let i = self
            .cluster
            .as_ref()
            .map_or(usize::MAX, |c| c.owners[usize::from(slot)]);
        self.node(i).await
    }

    /// Connections to every master.
    async fn masters(&mut self) -> Result<Vec<MultiplexedConnection>, ApplyError> {
        if self
            .cluster
            .as_ref()
            .is_some_and(|c| c.stale || c.owners.is_empty())
        {
            self.refresh().await?;
        }
        let mut owners: Vec<usize> = self
            .cluster
            .as_ref()
            .map(|c| c.owners.clone())
            .unwrap_or_default();
        owners.sort_unstable();
        owners.dedup();
        let mut conns = Vec::new();
        for i in owners {
            conns.push(self.node(i).await?);
        }
        Ok(conns)
    }

    /// A cluster error code means the slot map is out of date.
    fn note_cluster_error(&mut self, e: &ApplyError) {
        if matches!(e.code(), "MOVED" | "ASK" | "CLUSTERDOWN" | "TRYAGAIN") {
            if let Some(c) = self.cluster.as_mut() {
                c.stale = true;
            }
        }
    }

    /// One command on one node, outside a transaction.
    async fn one(
        &mut self,
        conn: &mut MultiplexedConnection,
        args: &[Bytes],
    ) -> Result<Value, ApplyError> {
        let mut pipe = redis::pipe();
        pipe.add_command(command(args));
        match conn.send_packed_commands(&pipe, 0, 1).await {
            Ok(mut v) => Ok(v.pop().unwrap_or(Value::Nil)),
            Err(e) => Err(self.connection_error(e)),
        }
    }

    /// A non-transactional command on a cluster target, where its keys live.
    async fn query_routed(&mut self, args: &[Bytes]) -> Result<Value, ApplyError> {
        match cluster::routing(args) {
            Routing::Slot(slot) => {
                let mut conn = self.slot_conn(slot).await?;
                self.checked(&mut conn, args).await
            }
            Routing::AllMasters | Routing::Anywhere => {
                let mut last = Value::Nil;
                for mut conn in self.masters().await? {
                    last = self.checked(&mut conn, args).await?;
                }
                Ok(last)
            }
            Routing::CrossSlot => Err(cross_slot(args, None)),
        }
    }

    /// Applies ops on a cluster target: one `MULTI/EXEC` on the slot's master when they are all
    /// in one slot (the lane's batches, with their slot checkpoint); otherwise one by one where
    /// each belongs (barriers and keyless records), which is not atomic.
    async fn exec_cluster(&mut self, ops: &[Op]) -> Result<Vec<Value>, ApplyError> {
        if let Some(slot) = cluster::single_slot(ops.iter().map(|o| &o.args)) {
            let mut conn = self.slot_conn(slot).await?;
            let result = self.transaction(&mut conn, ops, false).await;
            if let Err(e) = &result {
                self.note_cluster_error(e);
            }
            return result;
        }
        // Ops run one after the other here, not atomically: should one be refused for now
        // (`MOVED` during a failover …), those before it ran and must not run again. The lane
        // resumes at the refused one (`Interrupted`), as for a target without transactions.
        let mut results = Vec::with_capacity(ops.len());
        for (i, op) in ops.iter().enumerate() {
            match self.cluster_op(op, i).await {
                Ok(v) => results.push(v),
                Err(ApplyError::Transient { code, message }) if i > 0 => {
                    return Err(ApplyError::Interrupted {
                        done: i,
                        ran_after: 0,
                        code,
                        message,
                    })
                }
                Err(e) => return Err(e),
            }
        }
        Ok(results)
    }

    /// One op of [`Target::exec_cluster`] where it belongs; a transient refusal is an error.
    async fn cluster_op(&mut self, op: &Op, i: usize) -> Result<Value, ApplyError> {
        let v = match cluster::routing(&op.args) {
            Routing::Slot(slot) => {
                let mut conn = self.slot_conn(slot).await?;
                self.one(&mut conn, &op.args).await?
            }
            Routing::AllMasters => {
                let mut last = Value::Okay;
                for mut conn in self.masters().await? {
                    last = self.one(&mut conn, &op.args).await?;
                    if server_error(&last).is_some() {
                        break;
                    }
                }
                last
            }
            Routing::Anywhere => {
                let mut conn = self.slot_conn(0).await?;
                self.one(&mut conn, &op.args).await?
            }
            Routing::CrossSlot => match wire::commands::route(&op.args) {
                // DEL, UNLINK, MSET, TOUCH …: one command per slot has the same effect.
                wire::commands::Route::Split(pieces) => {
                    let mut last = Value::Okay;
                    for (slot, args) in pieces {
                        let mut conn = self.slot_conn(slot.get()).await?;
                        last = self.one(&mut conn, &args).await?;
                        if server_error(&last).is_some() {
                            break;
                        }
                    }
                    last
                }
                _ => self.emulate(&op.args, i).await?,
            },
        };
        if let Some((code, message)) = server_error(&v) {
            if is_transient(&code) {
                let e = ApplyError::Transient { code, message };
                self.note_cluster_error(&e);
                return Err(e);
            }
        }
        Ok(v)
    }

    /// A command whose keys are in several slots, run the way Redis would have run it: its keys
    /// are copied (`DUMP`/`RESTORE`, with their TTLs) to temporary keys that share one hash tag,
    /// the command runs there on one node, and the results are copied back (or deleted where
    /// the command deleted them). Not atomic across nodes: the lane's barrier keeps every other
    /// write to these keys out meanwhile (ADR 0008).
    async fn emulate(&mut self, args: &[Bytes], op: usize) -> Result<Value, ApplyError> {
        let Some(mut indexes) = wire::commands::key_indexes(args) else {
            return Err(cross_slot(args, Some(op)));
        };
        indexes.sort_unstable();
        let tmp = |k: &Bytes| {
            let mut t = b"{redis-repl-tmp}:".to_vec();
            t.extend_from_slice(k);
            Bytes::from(t)
        };
        let tmp_slot = proto::key_slot(b"redis-repl-tmp").get();
        let mut keys: Vec<Bytes> = indexes.iter().map(|&i| args[i].clone()).collect();
        keys.dedup();
        let mut tmp_conn = self.slot_conn(tmp_slot).await?;
        // Copy in.
        for k in &keys {
            let mut conn = self.slot_conn(proto::key_slot(k).get()).await?;
            let (dump, ttl) = self.dump(&mut conn, k).await?;
            self.checked(&mut tmp_conn, &[cluster::b("DEL"), tmp(k)])
                .await?;
            if let Some(dump) = dump {
                self.checked(
                    &mut tmp_conn,
                    &[
                        cluster::b("RESTORE"),
                        tmp(k),
                        Bytes::from(ttl.to_string()),
                        dump,
                        cluster::b("REPLACE"),
                    ],
                )
                .await?;
            }
        }
        // Run.
        let mut rewritten = args.to_vec();
        for &i in &indexes {
            rewritten[i] = tmp(&args[i]);
        }
        let result = self.one(&mut tmp_conn, &rewritten).await?;
        // Copy out.
        for k in &keys {
            let (dump, ttl) = self.dump(&mut tmp_conn, &tmp(k)).await?;
            let mut conn = self.slot_conn(proto::key_slot(k).get()).await?;
            match dump {
                Some(dump) => {
                    self.checked(
                        &mut conn,
                        &[
                            cluster::b("RESTORE"),
                            k.clone(),
                            Bytes::from(ttl.to_string()),
                            dump,
                            cluster::b("REPLACE"),
                        ],
                    )
                    .await?
                }
                None => {
                    self.checked(&mut conn, &[cluster::b("DEL"), k.clone()])
                        .await?
                }
            };
            self.checked(&mut tmp_conn, &[cluster::b("DEL"), tmp(k)])
                .await?;
        }
        Ok(result)
    }

    /// `DUMP` and remaining TTL in ms (0: none) of a key; `None` when it does not exist.
    async fn dump(
        &mut self,
        conn: &mut MultiplexedConnection,
        key: &Bytes,
    ) -> Result<(Option<Bytes>, i64), ApplyError> {
        let dump = match self
            .checked(conn, &[cluster::b("DUMP"), key.clone()])
            .await?
        {
            Value::BulkString(d) => Bytes::from(d),
            _ => return Ok((None, 0)),
        };
        let ttl = match self
            .checked(conn, &[cluster::b("PTTL"), key.clone()])
            .await?
        {
            Value::Int(ms) if ms > 0 => ms,
            _ => 0,
        };
        Ok((Some(dump), ttl))
    }

    /// One command whose error reply is an error of the write.
    async fn checked(
        &mut self,
        conn: &mut MultiplexedConnection,
        args: &[Bytes],
    ) -> Result<Value, ApplyError> {
        let v = self.one(conn, args).await?;
        match server_error(&v) {
            Some((code, message)) => {
                let e = ApplyError::refused(code, message, None);
                self.note_cluster_error(&e);
                Err(e)
            }
            None => Ok(v),
        }
    }

    /// The target's keys with their db: of `db`, or of every db that holds keys (`None`).
    pub async fn keys(&mut self, db: Option<u32>) -> Result<Vec<(u32, Bytes)>, ApplyError> {
        let dbs = match db {
            Some(db) => vec![db],
            None => self.keyspace_dbs().await?,
        };
        let mut all = Vec::new();
        for db in dbs {
            all.extend(self.scan_keys(db).await?.into_iter().map(|k| (db, k)));
        }
        Ok(all)
    }

    /// The dbs that hold keys (`INFO keyspace`; db 0 only on a cluster).
    async fn keyspace_dbs(&mut self) -> Result<Vec<u32>, ApplyError> {
        let mut conn = self.conn().await?;
        if self.cluster.is_some() {
            return Ok(vec![0]);
        }
        let v = self
            .one(&mut conn, &[cluster::b("INFO"), cluster::b("keyspace")])
            .await?;
        let text = match &v {
            Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
            Value::VerbatimString { text, .. } => text.clone(),
            // INFO refused (a least-privilege user): every db the target has.
            _ => return Ok((0..self.databases.unwrap_or(16)).collect()),
        };
        Ok(text
            .lines()
            .filter_map(|l| l.strip_prefix("db")?.split(':').next()?.parse().ok())
            .collect())
    }

    /// Every key of `db` (db 0 on a cluster: every master's keys).
    async fn scan_keys(&mut self, db: u32) -> Result<Vec<Bytes>, ApplyError> {
        let conns = if self.cluster.is_some() {
            self.masters().await?
        } else {
            if self.select {
                self.query(&[cluster::b("SELECT"), Bytes::from(db.to_string())])
                    .await?;
            }
            vec![self.conn().await?]
        };
        let mut keys = Vec::new();
        for mut conn in conns {
            let mut cursor = cluster::b("0");
            loop {
                let v = self
                    .one(
                        &mut conn,
                        &[
                            cluster::b("SCAN"),
                            cursor,
                            cluster::b("COUNT"),
                            cluster::b("1000"),
                        ],
                    )
                    .await?;
                let Value::Array(reply) = v else {
                    return Err(ApplyError::Permanent {
                        code: "SCAN".into(),
                        message: format!("unexpected SCAN reply {v:?}"),
                        op: None,
                        applied: false,
                    });
                };
                let mut reply = reply.into_iter();
                cursor = match reply.next() {
                    Some(Value::BulkString(c)) => Bytes::from(c),
                    _ => cluster::b("0"),
                };
                if let Some(Value::Array(found)) = reply.next() {
                    keys.extend(found.into_iter().filter_map(|k| match k {
                        Value::BulkString(k) => Some(Bytes::from(k)),
                        _ => None,
                    }));
                }
                if cursor.as_ref() == b"0" {
                    break;
                }
            }
        }
        Ok(keys)
    }

    async fn discard(&mut self, conn: &mut MultiplexedConnection) {
        let _: Result<Value, _> = redis::cmd("DISCARD").query_async(conn).await;
    }
}

/// What the target refuses of what `redis.transactions` and `redis.select` say it takes, asked
/// on fresh connections (a proxy such as twemproxy closes a connection that sends a command it
/// does not know): one line per refusal, naming the setting to change. `Err` when the target
/// cannot be reached at all (the lanes then wait for it as for any lost connection).
pub fn refusals(cfg: &Config) -> Result<Vec<String>, String> {
    let address = service::config::redact_url(&cfg.redis.url);
    let client = cfg
        .redis
        .tls
        .redis_client(&cfg.redis.url)
        .map_err(|e| format!("target {address}: {e}"))?;
    let timeout = Duration::from_secs(cfg.redis.timeout_s);
    // A connection that answers PING: one closed before that is a target that cannot be
    // reached (yet), not one refusing a command.
    let connect = || {
        let mut conn = client.get_connection_with_timeout(timeout)?;
        conn.set_read_timeout(Some(timeout * 3))?;
        match redis::cmd("PING").query::<Value>(&mut conn) {
            Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() => Err(e),
            // Answered, even if with an error (an ACL without PING): reachable.
            _ => Ok(conn),
        }
    };
    // Whether `first` then `then` (when `first` is accepted) are answered without an error.
    let refused = |first: &[&str], then: &[&str]| -> Result<Option<String>, String> {
        let mut conn = connect().map_err(|e| format!("target {address}: {e}"))?;
        let ask = |conn: &mut redis::Connection, args: &[&str]| {
            let mut cmd = redis::cmd(args[0]);
            for a in &args[1..] {
                cmd.arg(*a);
            }
            cmd.query::<Value>(conn)
        };
        let answer = ask(&mut conn, first).and_then(|v| match then.is_empty() {
            true => Ok(v),
            false => ask(&mut conn, then),
        });
        Ok(match answer {
            Ok(_) => None,
            Err(e) if e.is_io_error() || e.is_connection_dropped() || e.is_timeout() => {
                Some("the target closed the connection".to_owned())
            }
            Err(e) => Some(e.to_string()),
        })
    };
    let mut lines = Vec::new();
    if cfg.redis.transactions {
        if let Some(why) = refused(&["MULTI"], &["DISCARD"])? {
            lines.push(format!(
                "target {address} refuses transactions (MULTI: {why}): a proxy without them such as twemproxy; set redis.transactions = false (writes are then applied at least once, docs/semantics.md)"
            ));
        }
    }
    if cfg.redis.select && cfg.redis.mode != Mode::Cluster {
        if let Some(why) = refused(&["SELECT", "0"], &[])? {
            lines.push(format!(
                "target {address} refuses SELECT ({why}): set redis.select = false (every source db is then written to the endpoint's db)"
            ));
        }
    }
    Ok(lines)
}
