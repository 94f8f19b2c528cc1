//! The target's keys (for a scoped flush or a flush before a snapshot), and the preflight of
//! what the target refuses.

use super::{ApplyError, Target};
use crate::cluster;
use crate::config::{Config, Mode};
use bytes::Bytes;
use redis::Value;
use std::time::Duration;

impl Target {
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
    pub(super) async fn keyspace_dbs(&mut self) -> Result<Vec<u32>, ApplyError> {
        let conn = self.conn().await?;
        if self.cluster.is_some() {
            return Ok(vec![0]);
        }
        let v = self
            .one(&conn, &[cluster::b("INFO"), cluster::b("keyspace")])
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
    pub(super) async fn scan_keys(&mut self, db: u32) -> Result<Vec<Bytes>, ApplyError> {
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
        for conn in conns {
            let mut cursor = cluster::b("0");
            loop {
                let v = self
                    .one(
                        &conn,
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
