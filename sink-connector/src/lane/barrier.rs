//! Barriers: a record on several partitions (a multi-slot command, a flush, a function load)
//! applied once, after every involved partition has applied everything before it, and before
//! any applies what follows. All state is in the checkpoint hashes of the target, so this works
//! across sink processes too.

use super::apply::ApplyFailure;
use super::checkpoint::{checkpoint_key, Checkpoint};
use super::snapshot::unlinks;
use super::{b, plan, Lane, Stop};
use crate::convert::{self, Args};
use crate::incoming::Incoming;
use crate::target::Op;
use bytes::Bytes;
use metrics::{counter, gauge, histogram};
use proto::v1;
use proto::Position;
use redis::Value;
use std::time::{Duration, Instant};

/// How long a follower sees its barrier's leader past the barrier, and its own checkpoint not,
/// before it concludes that its checkpoint lost the barrier.
const BARRIER_PAST_GRACE: Duration = Duration::from_secs(5);

fn marker_field(shard: &str) -> Bytes {
    Bytes::from(format!("barrier:{shard}"))
}

impl Lane {
    /// A barrier: applied once, after every involved partition has applied everything before
    /// it, and before any applies what follows. The lowest involved partition's lane leads: it
    /// waits until every other involved lane has written its arrival marker into its own
    /// checkpoint hash, then applies the commands and advances every involved checkpoint in the
    /// same transaction. The others wait until their checkpoint shows the barrier applied. All
    /// state is in the target, so this works across sink processes too.
    pub(super) async fn barrier(
        &mut self,
        shard: &str,
        position: Position,
        db: u32,
        barrier: v1::Barrier,
        capture_ms: i64,
        message: &Incoming,
    ) -> Result<(), Stop> {
        let started = Instant::now();
        let partitions: Vec<i32> = barrier.partitions.iter().map(|&p| p as i32).collect();
        let leader = partitions.iter().copied().min().unwrap_or(self.partition);
        let pos_text = Bytes::from(position.to_text());
        let cmds = plan::filtered(
            &self.rules(),
            convert::commands(&self.env.cfg, barrier.commands.clone()),
        );
        // A flush erases the checkpoint hashes and SWAPDB moves them to another db: such
        // barriers rewrite every involved hash after the command, in the same transaction.
        // A flush scoped to one cluster source shard's slots deletes only their keys.
        let scoped = !barrier.scope.is_empty();
        let flushes = !scoped && cmds.iter().any(convert::is_flush);
        let swapped_to: Vec<u32> = match self.checkpoint_db() {
            Some(ckpt_db) => cmds
                .iter()
                .filter_map(|c| convert::swapdb_other(c, ckpt_db))
                .collect(),
            None => Vec::new(),
        };
        let rewrites = flushes || !swapped_to.is_empty();
        counter!("sink_barriers_total", "partition" => self.label.clone()).increment(1);
        if self.partition != leader {
            let marker = vec![
                b("HSET"),
                self.key.clone(),
                marker_field(shard),
                pos_text.clone(),
            ];
            self.with_checkpoint_db().await?;
            self.still_there().await?;
            self.query(&marker).await?;
            gauge!("sink_barrier_waiting", "partition" => self.label.clone()).set(1.0);
            let leader_key = checkpoint_key(&self.env.cfg, &self.env.topic, leader);
            let mut waiting_logged = false;
            let mut past_since: Option<Instant> = None;
            loop {
                self.with_checkpoint_db().await?;
                // A target that restarted empty meanwhile lost the marker and what this lane
                // applied before it: the leader would wait for a marker that never comes.
                self.still_there().await?;
                let mine = self.stored_position(self.key.clone(), shard).await?;
                if mine.is_some_and(|p| p >= position) {
                    break;
                }
                let theirs = self.stored_position(leader_key.clone(), shard).await?;
                if let Some(p) = theirs.filter(|p| p.epoch == position.epoch && *p > position) {
                    // The leader's transaction moves this lane's checkpoint with its own, and the
                    // leader goes past the barrier only once both are written (on a cluster
                    // target one after the other: at the barrier itself, the leader's may be
                    // written and this one not yet). Past it, this lane's checkpoint lost it —
                    // unless the leader applied it and moved on between the two reads: look
                    // again first.
                    let mine = self.stored_position(self.key.clone(), shard).await?;
                    if mine.is_some_and(|m| m >= position) {
                        break;
                    }
                    // A cluster target's checkpoints live on several masters: a read may come
                    // from before a write the leader made on another. Only a state that lasts
                    // is taken for a lost checkpoint.
                    let since = *past_since.get_or_insert_with(Instant::now);
                    if since.elapsed() >= BARRIER_PAST_GRACE {
                        // The leader also goes past a barrier it gave up because an involved
                        // partition is in a newer epoch: this lane gives it up too.
                        if let Some((q, newer)) =
                            self.newer_epoch(&partitions, shard, position).await?
                        {
                            let why = format!(
                                "the leading partition {leader} went past it and partition {q} is already at {newer}"
                            );
                            return self.abandon_barrier(shard, position, message, &why).await;
                        }
                        let why = format!(
                            "the leading partition {leader} is at {p}, for {:?}",
                            since.elapsed()
                        );
                        return self
                            .barrier_applied_before(shard, position, message, &why, &cmds)
                            .await;
                    }
                } else {
                    past_since = None;
                }
                if let Some(p) = theirs.filter(|p| p.epoch > position.epoch) {
                    // The leader may have applied it and moved on just now: look again first.
                    let mine = self.stored_position(self.key.clone(), shard).await?;
                    if mine.is_some_and(|m| m >= position) {
                        break;
                    }
                    let why = format!("the leading partition {leader} is already at {p}");
                    return self.abandon_barrier(shard, position, message, &why).await;
                }
                if !waiting_logged && started.elapsed() > Duration::from_secs(10) {
                    waiting_logged = true;
                    tracing::warn!(partition = self.partition, "barrier {position} has waited {:?} for partition {leader}, which leads it, to apply it (is that partition assigned to a running sink, and is its lane receiving?)", started.elapsed());
                }
                self.pause(Duration::from_millis(5)).await?;
            }
            gauge!("sink_barrier_waiting", "partition" => self.label.clone()).set(0.0);
            self.known.applied.insert(shard.to_owned(), position);
            self.flushed(flushes);
            histogram!("sink_barrier_wait_seconds", "partition" => self.label.clone())
                .record(started.elapsed().as_secs_f64());
            return Ok(());
        }
        // Leader: wait for every other involved lane to arrive.
        gauge!("sink_barrier_waiting", "partition" => self.label.clone()).set(1.0);
        let others: Vec<i32> = partitions
            .iter()
            .copied()
            .filter(|&p| p != self.partition)
            .collect();
        let mut waiting_logged = false;
        loop {
            self.with_checkpoint_db().await?;
            self.still_there().await?;
            let mut all = true;
            // Whether every other involved partition's checkpoint is past the barrier.
            let mut all_past = true;
            for &q in &others {
                let key = checkpoint_key(&self.env.cfg, &self.env.topic, q);
                self.with_checkpoint_db().await?;
                let v = self
                    .query(&[
                        b("HMGET"),
                        key,
                        marker_field(shard),
                        Bytes::from(shard.to_owned()),
                    ])
                    .await?;
                let (arrived, applied) = match v {
                    Value::Array(items) => {
                        let text = |v: &Value| match v {
                            Value::BulkString(s) => Some(String::from_utf8_lossy(s).into_owned()),
                            _ => None,
                        };
                        let marker = items.first().and_then(text);
                        let applied = items
                            .get(1)
                            .and_then(text)
                            .and_then(|t| Position::parse(&t));
                        let arrived = marker.as_deref()
                            == Some(&*String::from_utf8_lossy(&pos_text))
                            || applied.is_some_and(|a| a >= position);
                        (arrived, applied)
                    }
                    _ => (false, None),
                };
                if let Some(p) = applied.filter(|p| p.epoch > position.epoch) {
                    let why = format!("partition {q} is already at {p}");
                    return self.abandon_barrier(shard, position, message, &why).await;
                }
                all_past &= applied.is_some_and(|a| a >= position);
                if !arrived {
                    all = false;
                    break;
                }
            }
            if all && all_past && !others.is_empty() {
                // Only this lane's own transaction moves the others past it: it was applied.
                let why = format!("partitions {others:?} are past it");
                return self
                    .barrier_applied_before(shard, position, message, &why, &cmds)
                    .await;
            }
            if all {
                break;
            }
            if !waiting_logged && started.elapsed() > Duration::from_secs(10) {
                waiting_logged = true;
                tracing::warn!(partition = self.partition, "barrier {position} has waited {:?} for partitions {others:?} (are they assigned to a running sink?)", started.elapsed());
            }
            self.pause(Duration::from_millis(5)).await?;
        }
        // Everyone is here: apply once, and move every involved checkpoint with it. A flush
        // would erase the checkpoint hashes, so they are rewritten after it. The arrivals were
        // read on this connection: should the barrier be applied on another one, the target may
        // have restarted in between and lost what the others applied before it (`apply` then
        // rewinds this lane, which comes back here and reads the arrivals again).
        self.barrier_connection = Some(self.target.generation());
        let cmds = if scoped {
            self.scoped_flushes(cmds, db, &barrier.scope).await?
        } else {
            cmds
        };
        let mut ops: Vec<Op> = cmds
            .into_iter()
            .map(|args| Op::data(Some(db), args))
            .collect();
        for &q in &partitions {
            let key = checkpoint_key(&self.env.cfg, &self.env.topic, q);
            let Checkpoint {
                positions: mut fields,
                kafka_offset,
                ..
            } = if rewrites {
                self.read_checkpoint(key.clone()).await?
            } else {
                Checkpoint::default()
            };
            fields.retain(|(s, _)| s != shard);
            fields.push((shard.to_owned(), position));
            let kafka_offset = if q == self.partition {
                Some(message.covers())
            } else {
                kafka_offset
            };
            for &other in &swapped_to {
                // The hash that SWAPDB carried away from the checkpoint db.
                ops.push(Op {
                    db: Some(other),
                    args: vec![b("DEL"), key.clone()],
                    checkpoint: true,
                });
            }
            ops.push(self.checkpoint_op(key, &fields, kafka_offset));
        }
        let applied = self.apply(&ops).await;
        self.barrier_connection = None;
        match applied {
            Ok(()) => {}
            Err(ApplyFailure::Stop(s)) => return Err(s),
            Err(ApplyFailure::Continue) => {}
            Err(ApplyFailure::Record { error, .. }) => {
                let what = format!("partition {} barrier {position} (shard {shard}): the target refused it: {error}", self.partition);
                self.reject(message, &what).await?;
                // Release the other lanes: the barrier is settled.
                let mut ops = Vec::new();
                for &q in &partitions {
                    let key = checkpoint_key(&self.env.cfg, &self.env.topic, q);
                    ops.push(self.checkpoint_op(key, &[(shard.to_owned(), position)], None));
                }
                self.apply(&ops).await.map_err(|_| self.halt(&what))?;
            }
        }
        gauge!("sink_barrier_waiting", "partition" => self.label.clone()).set(0.0);
        self.known.applied.insert(shard.to_owned(), position);
        self.flushed(flushes);
        histogram!("sink_barrier_wait_seconds", "partition" => self.label.clone())
            .record(started.elapsed().as_secs_f64());
        self.latency.record(capture_ms, message, service::now_ms());
        self.latency.publish();
        self.hot.records_applied.increment(1);
        Ok(())
    }

    /// `FLUSHALL`/`FLUSHDB` from one shard of a cluster source concern only the keys of the
    /// slots that shard served: they become `UNLINK`s of the target's keys in those slots (in the
    /// record's db; checkpoint hashes kept). Function loads replace (see `replace_loads`). Every involved lane waits at this barrier, so no
    /// write to these slots can slip in between the scan and the transaction.
    pub(super) async fn scoped_flushes(
        &mut self,
        cmds: Vec<Args>,
        db: u32,
        scope: &[v1::SlotRange],
    ) -> Result<Vec<Args>, Stop> {
        if !cmds.iter().any(convert::is_flush) {
            return Ok(cmds.into_iter().map(replace_loads).collect());
        }
        let in_scope = |key: &[u8]| {
            let slot = u32::from(proto::slot::key_slot(key).get());
            scope.iter().any(|r| (r.first..=r.last).contains(&slot))
        };
        let prefix = self.env.cfg.apply.checkpoint_prefix.clone();
        let keys: Vec<Bytes> = self
            .target_keys(Some(db))
            .await?
            .into_iter()
            .map(|(_, k)| k)
            .collect();
        let doomed: Vec<Bytes> = keys
            .into_iter()
            .filter(|k| !k.starts_with(prefix.as_bytes()) && in_scope(k))
            .collect();
        tracing::info!(
            partition = self.partition,
            "flush from one cluster source shard: deleting {} target keys in its slots",
            doomed.len()
        );
        let mut out = Vec::new();
        for cmd in cmds.into_iter().map(replace_loads) {
            if !convert::is_flush(&cmd) {
                out.push(cmd);
                continue;
            }
            out.extend(unlinks(&doomed));
        }
        Ok(out)
    }

    /// After a flush barrier: the flush erased the cluster target's slot checkpoints with the
    /// data (the partition checkpoints are written again in its transaction), so what this lane
    /// knew of them is void. Kept, a reconnection would take every slot it wrote to before the
    /// flush for a slot whose master lost writes, and apply the partition again from its start,
    /// bringing back keys the flush deleted.
    pub(super) fn flushed(&mut self, flushes: bool) {
        if flushes {
            self.known.slot_applied.clear();
        }
    }

    /// A barrier the other involved partitions are past, although this lane's checkpoint is
    /// not: it was applied, and this lane's checkpoint lost it (a target, or a cluster target's
    /// master, that lost writes, and the lane is applying the partition again). Applying its
    /// commands again would apply them twice where the target kept them; the lane records it as
    /// applied and goes on.
    ///
    /// On a cluster target that is exact only for a barrier that writes nothing: the master that
    /// lost writes may have lost this barrier's effect too, and the topic cannot bring it back
    /// (running it again would repeat it on the masters that kept it, and its keys' values at
    /// that point are not in the topic). The lane halts with what to do instead of going on
    /// with a target that differs.
    pub(super) async fn barrier_applied_before(
        &mut self,
        shard: &str,
        position: Position,
        message: &Incoming,
        why: &str,
        cmds: &[Args],
    ) -> Result<(), Stop> {
        if self.target.slot_checkpoints() && !cmds.is_empty() {
            let names: Vec<String> = cmds
                .iter()
                .map(|c| String::from_utf8_lossy(&c[0]).to_ascii_uppercase())
                .collect();
            return Err(self.halt(&format!(
                "partition {} offset {}: barrier {position} of shard {shard} ({}) was applied before ({why}), but a master of the cluster target {} lost writes since and this multi-slot command's effect on it cannot be restored from the topic: resynchronise the target (see the runbook, \"a cluster target master lost writes\")",
                self.partition,
                message.offset(),
                names.join(", "),
                self.target.address()
            )));
        }
        tracing::warn!(
            partition = self.partition,
            "barrier {position} of shard {shard} was applied before ({why}) but this partition's checkpoint does not hold it (the target lost writes since): not applied again"
        );
        counter!("sink_barriers_applied_before_total", "partition" => self.label.clone())
            .increment(1);
        gauge!("sink_barrier_waiting", "partition" => self.label.clone()).set(0.0);
        self.checkpoint_only(shard, position, message.covers())
            .await
    }

    /// An involved partition other than this one whose checkpoint holds `shard` in an epoch
    /// after `position`'s, and that position (the checkpoint db must be selected).
    async fn newer_epoch(
        &mut self,
        partitions: &[i32],
        shard: &str,
        position: Position,
    ) -> Result<Option<(i32, Position)>, Stop> {
        let me = self.partition;
        for &q in partitions.iter().filter(|&&q| q != me) {
            let key = checkpoint_key(&self.env.cfg, &self.env.topic, q);
            let held = self.stored_position(key, shard).await?;
            if let Some(p) = held.filter(|p| p.epoch > position.epoch) {
                return Ok(Some((q, p)));
            }
        }
        Ok(None)
    }

    /// A barrier some involved partition will never reach: the source connector stopped while
    /// publishing its copies, and the next sync was a full resync (a new epoch), so the copies
    /// that did arrive are orphans — the leader would wait for a partition that has moved on, or
    /// followers for a leader that never saw it. The new epoch's snapshot supersedes the barrier
    /// as it supersedes every write of the old epoch after the resync point; the lane records it
    /// as done and goes on.
    pub(super) async fn abandon_barrier(
        &mut self,
        shard: &str,
        position: Position,
        message: &Incoming,
        why: &str,
    ) -> Result<(), Stop> {
        tracing::warn!(
            partition = self.partition,
            "barrier {position} of shard {shard} abandoned: {why}, so this barrier's epoch was cut short by a full resync and its other copies will never arrive; the new snapshot supersedes it"
        );
        counter!("sink_barriers_abandoned_total", "partition" => self.label.clone()).increment(1);
        gauge!("sink_barrier_waiting", "partition" => self.label.clone()).set(0.0);
        self.checkpoint_only(shard, position, message.covers())
            .await
    }
}

/// `FUNCTION LOAD` from one shard of a cluster source: every shard loads the same library, so
/// the second load replaces it instead of failing.
fn replace_loads(mut cmd: Args) -> Args {
    let load = cmd.len() >= 3
        && cmd[0].eq_ignore_ascii_case(b"function")
        && cmd[1].eq_ignore_ascii_case(b"load")
        && !cmd[2..cmd.len() - 1]
            .iter()
            .any(|a| a.eq_ignore_ascii_case(b"replace"));
    if load {
        cmd.insert(2, b("REPLACE"));
    }
    cmd
}
