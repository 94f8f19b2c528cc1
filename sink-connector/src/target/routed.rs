//! Cluster targets (and proxies that take single-slot transactions): the slot map, a
//! connection per master, and each op sent where its slot lives, following `MOVED` and `ASK`.

use super::error::{cross_slot, is_transient, server_error};
use super::{ApplyError, Conn, Op, Packed, Target};
use crate::cluster::{self, Routing};
use bytes::Bytes;
use metrics::counter;
use redis::Value;
use service::backoff::Backoff;
use std::time::{Duration, Instant};

impl Target {
    /// Reads the slot map (`CLUSTER SLOTS`) from the seed node. A proxy's one endpoint serves
    /// every slot.
    pub(super) async fn refresh(&mut self) -> Result<(), ApplyError> {
        let conn = self.conn().await?;
        if let Some(state) = self.cluster.as_mut().filter(|c| c.single_endpoint) {
            state.owners = vec![0; 16384];
            state.nodes = vec![(self.address.clone(), None)];
            state.stale = false;
            return Ok(());
        }
        let reply: Value = match conn.query(&["CLUSTER", "SLOTS"]).await {
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
    pub(super) async fn node(&mut self, i: usize) -> Result<Conn, ApplyError> {
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
        let conn = self.connect(&endpoint).await?;
        if let Some(state) = self.cluster.as_mut() {
            state.nodes[i].1 = Some(conn.clone());
        }
        Ok(conn)
    }

    /// The connection to the master of `slot`.
    pub(super) async fn slot_conn(&mut self, slot: u16) -> Result<Conn, ApplyError> {
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
    pub(super) async fn masters(&mut self) -> Result<Vec<Conn>, ApplyError> {
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
    pub(super) fn note_cluster_error(&mut self, e: &ApplyError) {
        if matches!(e.code(), "MOVED" | "ASK" | "CLUSTERDOWN" | "TRYAGAIN") {
            if let Some(c) = self.cluster.as_mut() {
                c.stale = true;
            }
        }
    }

    /// One command on one node, outside a transaction.
    pub(super) async fn one(&mut self, conn: &Conn, args: &[Bytes]) -> Result<Value, ApplyError> {
        match conn.send(Packed::default().push(args)).await {
            Ok(mut v) => Ok(v.pop().unwrap_or(Value::Nil)),
            Err(e) => Err(self.connection_error(e)),
        }
    }

    /// A non-transactional command on a cluster target, where its keys live.
    pub(super) async fn query_routed(&mut self, args: &[Bytes]) -> Result<Value, ApplyError> {
        match cluster::routing(args) {
            Routing::Slot(slot) => {
                let conn = self.slot_conn(slot).await?;
                self.checked(&conn, args).await
            }
            Routing::AllMasters | Routing::Anywhere => {
                let mut last = Value::Nil;
                for conn in self.masters().await? {
                    last = self.checked(&conn, args).await?;
                }
                Ok(last)
            }
            Routing::CrossSlot => Err(cross_slot(args, None)),
        }
    }

    /// Applies ops on a cluster target: one `MULTI/EXEC` on the slot's master when they are all
    /// in one slot (the lane's batches, with their slot checkpoint); otherwise one by one where
    /// each belongs (barriers and keyless records), which is not atomic.
    pub(super) async fn exec_cluster(&mut self, ops: &[Op]) -> Result<Vec<Value>, ApplyError> {
        if let Some(slot) = cluster::single_slot(ops.iter().map(|o| &o.args)) {
            let conn = self.slot_conn(slot).await?;
            let result = self.transaction(&conn, ops, false).await;
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
    pub(super) async fn cluster_op(&mut self, op: &Op, i: usize) -> Result<Value, ApplyError> {
        let v = match cluster::routing(&op.args) {
            Routing::Slot(slot) => {
                let conn = self.slot_conn(slot).await?;
                self.one(&conn, &op.args).await?
            }
            Routing::AllMasters => {
                let mut last = Value::Okay;
                for conn in self.masters().await? {
                    last = self.one(&conn, &op.args).await?;
                    if server_error(&last).is_some() {
                        break;
                    }
                }
                last
            }
            Routing::Anywhere => {
                let conn = self.slot_conn(0).await?;
                self.one(&conn, &op.args).await?
            }
            Routing::CrossSlot => match wire::commands::route(&op.args) {
                // DEL, UNLINK, MSET, TOUCH …: one command per slot has the same effect.
                wire::commands::Route::Split(pieces) => {
                    let mut last = Value::Okay;
                    for (slot, args) in pieces {
                        let conn = self.slot_conn(slot.get()).await?;
                        last = self.one(&conn, &args).await?;
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
    pub(super) async fn emulate(&mut self, args: &[Bytes], op: usize) -> Result<Value, ApplyError> {
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
        let tmp_conn = self.slot_conn(tmp_slot).await?;
        // Copy in.
        for k in &keys {
            let conn = self.slot_conn(proto::key_slot(k).get()).await?;
            let (dump, ttl) = self.dump(&conn, k).await?;
            self.checked(&tmp_conn, &[cluster::b("DEL"), tmp(k)])
                .await?;
            if let Some(dump) = dump {
                self.checked(
                    &tmp_conn,
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
        let result = self.one(&tmp_conn, &rewritten).await?;
        // Copy out. The command has run: from here on the copies must be finished, whatever the
        // cluster does meanwhile. Started over, it would find its keys moved already (a RENAME's
        // source gone: `ERR no such key`). So a refusal for now (OOM on a key's master, MOVED
        // during a failover …) is retried here, in place, until it succeeds. Every key is
        // written back from its temporary copy before any copy is deleted, so a step retried
        // after a lost reply does the same again.
        let name = String::from_utf8_lossy(&args[0]).to_ascii_uppercase();
        for k in &keys {
            let back = CopyStep::Back {
                key: k.clone(),
                tmp: tmp(k),
            };
            self.until_done(&name, &back, tmp_slot).await?;
        }
        for k in &keys {
            self.until_done(&name, &CopyStep::DropTmp(tmp(k)), tmp_slot)
                .await?;
        }
        Ok(result)
    }

    /// One step of copying an emulated command's results back. Doing it again does the same.
    async fn copy_step(&mut self, step: &CopyStep, tmp_slot: u16) -> Result<(), ApplyError> {
        let (key, write) = match step {
            CopyStep::Back { key, tmp } => {
                let tmp_conn = self.slot_conn(tmp_slot).await?;
                let (dump, ttl) = self.dump(&tmp_conn, tmp).await?;
                let write = match dump {
                    Some(dump) => vec![
                        cluster::b("RESTORE"),
                        key.clone(),
                        Bytes::from(ttl.to_string()),
                        dump,
                        cluster::b("REPLACE"),
                    ],
                    None => vec![cluster::b("DEL"), key.clone()],
                };
                (key, write)
            }
            CopyStep::DropTmp(tmp) => (tmp, vec![cluster::b("DEL"), tmp.clone()]),
        };
        let conn = self.slot_conn(proto::key_slot(key).get()).await?;
        self.checked(&conn, &write).await.map(|_| ())
    }

    /// Runs `step` until it succeeds or fails for good, retrying refusals for now with backoff
    /// (counted in `sink_emulation_retries_total`, a warning when they begin and an info line
    /// when they end).
    async fn until_done(
        &mut self,
        command: &str,
        step: &CopyStep,
        tmp_slot: u16,
    ) -> Result<(), ApplyError> {
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
        let mut since: Option<Instant> = None;
        loop {
            match self.copy_step(step, tmp_slot).await {
                Ok(()) => {
                    if let Some(since) = since {
                        tracing::info!(
                            "the emulated {command} finished after {:?}",
                            since.elapsed()
                        );
                    }
                    return Ok(());
                }
                Err(ApplyError::Transient { code, message }) => {
                    if since.is_none() {
                        tracing::warn!(
                            "the target refused copying back the result of an emulated {command} ({code} {message}): the command ran, so the copy is retried until it succeeds"
                        );
                        since = Some(Instant::now());
                    }
                    counter!("sink_emulation_retries_total", "code" => code).increment(1);
                    tokio::time::sleep(backoff.next_wait()).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `DUMP` and remaining TTL in ms (0: none) of a key; `None` when it does not exist.
    pub(super) async fn dump(
        &mut self,
        conn: &Conn,
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
    pub(super) async fn checked(
        &mut self,
        conn: &Conn,
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
}

/// A step of copying an emulated command's results back ([`Target::emulate`]).
pub(super) enum CopyStep {
    /// `key` written from its temporary copy `tmp` (deleted where the copy is gone).
    Back { key: Bytes, tmp: Bytes },
    /// A temporary copy deleted.
    DropTmp(Bytes),
}
