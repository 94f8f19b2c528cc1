//! The target Redis: one connection per lane, batches applied as one `MULTI/EXEC` together with
//! the lane's checkpoint, and every error classified as retryable or not.

use crate::config::Config;
use crate::convert::Args;
use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::Value;
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
}

impl ApplyError {
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
            ApplyError::Transient { code, .. } | ApplyError::Permanent { code, .. } => code,
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
    )
}

/// One write: its db (None: wherever the connection is) and arguments.
#[derive(Debug, Clone)]
pub struct Op {
    pub db: Option<u32>,
    pub args: Args,
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
    /// Set when a reconnection happened: `exec` refuses to write until the lane has compared
    /// the target's checkpoint with what it applied and cleared this (`verified`).
    unverified: bool,
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
        let client = redis::Client::open(cfg.redis.url.as_str()).map_err(|e| {
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
            unverified: false,
        })
    }

    pub fn address(&self) -> &str {
        &self.address
    }

    fn connection_error(&mut self, e: impl std::fmt::Display) -> ApplyError {
        self.conn = None;
        let text = e.to_string();
        // Authentication problems do not fix themselves.
        let lower = text.to_ascii_lowercase();
        if lower.contains("wrongpass") || lower.contains("noauth") || lower.contains("noperm") {
            return ApplyError::Permanent {
                code: "AUTH".into(),
                message: format!("target {}: {text}", self.address),
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
        let mut conn = match self
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
            .query_async(&mut conn)
            .await;
        if let Ok(info) = info {
            let field = |name: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(':')))
                    .map(|v| v.trim().to_owned())
            };
            let server = field("server_name").unwrap_or_else(|| "redis".into());
            let version = field("valkey_version")
                .or_else(|| field("redis_version"))
                .unwrap_or_default();
            self.restore_max_version = crate::convert::rdb_version_for(&server, &version);
        }
        let databases: Result<Vec<String>, _> = redis::cmd("CONFIG")
            .arg("GET")
            .arg("databases")
            .query_async(&mut conn)
            .await;
        self.databases = databases
            .ok()
            .and_then(|v| v.get(1).and_then(|n| n.parse().ok()));
        self.current_db = self.client.get_connection_info().redis.db.try_into().ok();
        self.conn = Some(conn.clone());
        self.connections += 1;
        if self.connections > 1 {
            self.unverified = true;
        }
        Ok(conn)
    }

    /// Runs one command outside a transaction (checkpoint reads, barrier markers).
    pub async fn query(&mut self, args: &[Bytes]) -> Result<Value, ApplyError> {
        let mut conn = self.conn().await?;
        let mut cmd = redis::Cmd::new();
        for a in args {
            cmd.arg(a.as_ref());
        }
        let mut pipe = redis::pipe();
        pipe.add_command(cmd);
        match conn.send_packed_commands(&pipe, 0, 1).await {
            Ok(mut v) => {
                let v = v.pop().unwrap_or(Value::Nil);
                if server_error(&v).is_none() && args[0].eq_ignore_ascii_case(b"select") {
                    self.current_db = std::str::from_utf8(&args[1])
                        .ok()
                        .and_then(|d| d.parse().ok());
                }
                if let Some((code, message)) = server_error(&v) {
                    return Err(ApplyError::refused(code, message, None));
                }
                Ok(v)
            }
            Err(e) => Err(self.connection_error(e)),
        }
    }

    /// Whether the connection is new and nothing was written on it yet: the target may have
    /// restarted or failed over and lost writes (see `Lane::verify_target`).
    pub fn unverified(&self) -> bool {
        self.unverified
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
        let mut pipe = redis::pipe();
        pipe.cmd("MULTI");
        // Index in the EXEC result of each op (SELECTs are results too).
        let mut result_index = Vec::with_capacity(ops.len());
        let mut queued = 0usize;
        let mut db = self.current_db;
        for op in ops {
            if self.select {
                if let Some(want) = op.db {
                    if db != Some(want) {
                        pipe.cmd("SELECT").arg(want);
                        queued += 1;
                        db = Some(want);
                    }
                }
            }
            let mut cmd = redis::Cmd::new();
            for a in &op.args {
                cmd.arg(a.as_ref());
            }
            pipe.add_command(cmd);
            result_index.push(queued);
            queued += 1;
        }
        pipe.cmd("EXEC");
        let n = queued + 2;
        let values = match conn.send_packed_commands(&pipe, 0, n).await {
            Ok(v) => v,
            Err(e) => return Err(self.connection_error(e)),
        };
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
        for (i, v) in results.iter().enumerate() {
            if result_index.contains(&i) {
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
        Ok(result_index
            .iter()
            .map(|&r| results.get(r).cloned().unwrap_or(Value::Nil))
            .collect())
    }

    async fn discard(&mut self, conn: &mut MultiplexedConnection) {
        let _: Result<Value, _> = redis::cmd("DISCARD").query_async(conn).await;
    }
}
