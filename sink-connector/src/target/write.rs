//! A batch written to one connection: in `MULTI/EXEC` with its checkpoint, or, for targets
//! without transactions, pipelined with the checkpoint after every write it covers.

use super::error::{interrupted, server_error};
use super::{ApplyError, Conn, Op, Packed, Target};
use bytes::Bytes;
use redis::Value;

impl Target {
    /// A target without transactions (`redis.transactions = false`): the data ops pipelined as
    /// they are, in order (with `SELECT` where the db changes), then, once every one of them
    /// has answered, the checkpoint ops (the trailing ops marked `checkpoint`). So a checkpoint
    /// never covers a write that did not happen; a crash or a lost connection in between can
    /// leave writes done that the checkpoint does not cover yet, which are applied again (at
    /// least once). Returns one result per op, runtime errors included, like `transaction`.
    pub(super) async fn write_plain(
        &mut self,
        conn: &Conn,
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
    pub(super) async fn pipelined(
        &mut self,
        conn: &Conn,
        ops: &[Op],
    ) -> Result<Vec<Value>, ApplyError> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = self.packed(ops);
        let mut selects = Vec::new();
        let mut db = self.current_db;
        for (i, op) in ops.iter().enumerate() {
            if let Some(want) = op.db.filter(|&want| self.select && db != Some(want)) {
                pipe.push(&["SELECT", &want.to_string()]);
                selects.push(i + selects.len());
                db = Some(want);
            }
            pipe.push(&op.args);
        }
        let sent = conn.send(&pipe).await;
        self.scratch = pipe;
        let values = match sent {
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
    pub(super) async fn transaction(
        &mut self,
        conn: &Conn,
        ops: &[Op],
        select: bool,
    ) -> Result<Vec<Value>, ApplyError> {
        let mut pipe = self.packed(ops);
        pipe.push(&["MULTI"]);
        // Index in the EXEC result of each op (SELECTs are results too).
        let mut result_index = Vec::with_capacity(ops.len());
        let mut queued = 0usize;
        let mut db = self.current_db;
        for op in ops {
            if select {
                if let Some(want) = op.db {
                    if db != Some(want) {
                        pipe.push(&["SELECT", &want.to_string()]);
                        queued += 1;
                        db = Some(want);
                    }
                }
            }
            pipe.push(&op.args);
            result_index.push(queued);
            queued += 1;
        }
        pipe.push(&["EXEC"]);
        let n = queued + 2;
        let sent = conn.send(&pipe).await;
        self.scratch = pipe;
        let values = match sent {
            Ok(v) => v,
            Err(e) => return Err(self.connection_error(e)),
        };
        // MULTI and the queued replies: an error there means nothing ran.
        for (i, v) in values.iter().take(n - 1).enumerate() {
            if let Some((code, message)) = server_error(v) {
                self.discard(conn).await;
                let op = (i > 0)
                    .then(|| result_index.iter().position(|&r| r == i - 1))
                    .flatten();
                return Err(ApplyError::refused(code, message, op));
            }
        }
        let exec = values.into_iter().last().unwrap_or(Value::Nil);
        if let Some((code, message)) = server_error(&exec) {
            self.discard(conn).await;
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

    pub(super) async fn discard(&mut self, conn: &Conn) {
        let _: Result<Value, _> = conn.query(&["DISCARD"]).await;
    }
}

impl Target {
    /// The lane's buffer for a request (kept between requests: a new one for each costs fresh
    /// pages), empty, with room for `ops`.
    fn packed(&mut self, ops: &[Op]) -> Packed {
        let mut pipe = std::mem::take(&mut self.scratch);
        pipe.reset(KEEP_PACKED);
        pipe.reserve(encoded_len(ops));
        pipe
    }
}

/// The largest request buffer kept for the next request.
const KEEP_PACKED: usize = 1 << 20;

/// About the bytes `ops` take in RESP, with `MULTI` and `EXEC`.
fn encoded_len(ops: &[Op]) -> usize {
    ops.iter()
        .flat_map(|op| op.args.iter().map(|a| Bytes::len(a) + 16))
        .sum::<usize>()
        + 8 * ops.len()
        + 32
}
