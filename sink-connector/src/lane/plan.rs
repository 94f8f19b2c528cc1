//! What a record means for a lane: apply these writes, skip it (already applied, filtered),
//! coordinate it as a barrier, reject it… decided from what the lane knows and the record
//! alone, without the target or Kafka ([`Knowledge::plan`]). The lane's task carries out the
//! [`Step`] (`super::Lane::process`).

use crate::config::{Config, FlushPolicy, NewSnapshot};
use crate::convert::{self, Args};
use crate::filter::Filter;
use crate::target::Op;
use bytes::Bytes;
use metrics::counter;
use proto::v1::{self, record::Body};
use proto::Position;
use std::collections::HashMap;

/// What the lane knows the target holds.
#[derive(Debug, Default)]
pub(super) struct Knowledge {
    /// Per source shard, the last position the partition's checkpoint holds.
    pub(super) applied: HashMap<String, Position>,
    /// Kafka offset of the last message whose effects the target's checkpoint covers.
    pub(super) kafka_applied: Option<i64>,
    /// Cluster targets: the positions each slot's checkpoint holds (read when first needed:
    /// [`Knowledge::slot_to_read`]).
    pub(super) slot_applied: HashMap<u16, HashMap<String, Position>>,
    /// Cluster targets: while slots that lost writes are applied again, the partition offset
    /// the lane had reached before (barriers up to it were applied before the loss).
    pub(super) refill_through: Option<i64>,
}

/// What planning needs from the configuration and the target.
pub(super) struct Rules<'a> {
    pub(super) cfg: &'a Config,
    pub(super) filter: &'a Filter,
    pub(super) partition: i32,
    /// The partition as a metric label.
    pub(super) label: &'a str,
    /// Cluster targets: records of a slot are applied with that slot's checkpoint.
    pub(super) slot_checkpoints: bool,
    /// How many databases the target has, when known.
    pub(super) databases: Option<u32>,
    /// The newest RDB version the target's `RESTORE` reads.
    pub(super) restore_max_version: u32,
}

/// A record and what it means for the lane.
#[derive(Debug)]
pub(super) struct Planned {
    pub(super) shard: String,
    pub(super) position: Position,
    /// The record's slot (none for keyless records).
    pub(super) slot: Option<u16>,
    pub(super) capture_ms: i64,
    /// The target db its writes go to.
    pub(super) db: u32,
    pub(super) step: Step,
}

/// What the lane does with a record.
#[derive(Debug)]
pub(super) enum Step {
    /// A record without a body this sink knows: nothing to do.
    Nothing,
    /// A heartbeat: once what precedes it is applied, the lane holds every write of its slots up
    /// to the heartbeat's position.
    Heartbeat,
    /// Nothing of it passes the filters (`apply.include_keys`, …).
    Filtered,
    /// The target's checkpoint, or an earlier record of this batch, is at or past it.
    Duplicate,
    /// A barrier with commands that this partition's checkpoint is past while slots that lost
    /// writes are applied again: it was applied before the loss, and its effect on the lost
    /// slots cannot be restored from the topic (these are its commands).
    AppliedBefore(Vec<Args>),
    /// It cannot be applied (why): dead-letter it or halt, and checkpoint it.
    Reject(String),
    /// Coordinate with the other involved lanes and apply it once.
    Barrier(v1::Barrier),
    /// `apply.on_new_snapshot = "flush"`: clear this partition's keys before the snapshot.
    ClearForSnapshot(v1::SnapshotStart),
    /// Batch these writes, applied with the checkpoint.
    Apply {
        ops: Vec<Op>,
        snapshot: Option<SnapshotPart>,
    },
}

/// The part of a snapshot an applied record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SnapshotPart {
    Key,
    End,
}

impl Knowledge {
    /// Whether the partition's checkpoint holds `p` of `shard`.
    pub(super) fn is_applied(&self, shard: &str, p: Position) -> bool {
        self.applied.get(shard).is_some_and(|a| p <= *a)
    }

    /// Cluster targets: whether `slot`'s checkpoint holds `p` of `shard`.
    fn slot_holds(&self, slot: u16, shard: &str, p: Position) -> bool {
        self.slot_applied
            .get(&slot)
            .and_then(|held| held.get(shard))
            .is_some_and(|a| p <= *a)
    }

    /// Cluster targets: the slot whose checkpoint the lane must read (into `slot_applied`)
    /// before [`Knowledge::plan`] can judge `record`.
    pub(super) fn slot_to_read(&self, rules: &Rules, record: &v1::Record) -> Option<u16> {
        let slot = by_slot(rules, record)?;
        if self.slot_applied.contains_key(&slot) {
            return None;
        }
        let position: Position = record.position.unwrap_or_default().into();
        let needed =
            self.refill_through.is_some() || !self.is_applied(&record.source_shard, position);
        needed.then_some(slot)
    }

    /// What `record`, at `offset` of the partition, means for the lane. `batched`: the highest
    /// position per shard already put into the batch being built.
    pub(super) fn plan(
        &self,
        rules: &Rules,
        batched: &HashMap<String, Position>,
        mut record: v1::Record,
        offset: i64,
    ) -> Planned {
        let shard = std::mem::take(&mut record.source_shard);
        let position: Position = record.position.unwrap_or_default().into();
        let db = rules.cfg.map_db(record.db);
        let slot = record.slot.and_then(|s| u16::try_from(s).ok());
        let capture_ms = record.capture_time_ms;
        let step = self.step(rules, batched, record, &shard, position, db, offset);
        Planned {
            shard,
            position,
            slot,
            capture_ms,
            db,
            step,
        }
    }

    /// [`Knowledge::plan`]'s step for `record` (its shard taken out) of `shard` at `position`,
    /// for target db `db`.
    #[allow(clippy::too_many_arguments)]
    fn step(
        &self,
        rules: &Rules,
        batched: &HashMap<String, Position>,
        record: v1::Record,
        shard: &str,
        position: Position,
        db: u32,
        offset: i64,
    ) -> Step {
        let by_slot = by_slot(rules, &record);
        let Some(body) = record.body else {
            return Step::Nothing;
        };
        if let Body::Heartbeat(_) = body {
            return Step::Heartbeat;
        }
        let Some(body) = filter(rules.filter, record.db, body) else {
            return Step::Filtered;
        };
        // On a cluster target a record of a slot is applied with that slot's checkpoint, and
        // the partition's follows: a record either covers is held (a crash between the two
        // leaves the slot's ahead). While slots that lost writes are applied again, the
        // partition's is ahead of them by design and the slot's alone decides. Barriers move the
        // partition checkpoints only: they are judged by those.
        let held = match by_slot {
            Some(slot) if self.refill_through.is_some() => self.slot_holds(slot, shard, position),
            Some(slot) => {
                self.is_applied(shard, position) || self.slot_holds(slot, shard, position)
            }
            None => self.is_applied(shard, position),
        };
        if let (true, Some(_), Body::Barrier(b)) = (held, self.refill_through, &body) {
            let cmds = filtered(rules, convert::commands(rules.cfg, b.commands.clone()));
            if !cmds.is_empty() {
                return Step::AppliedBefore(cmds);
            }
        }
        if held || batched.get(shard).is_some_and(|b| position <= *b) {
            return Step::Duplicate;
        }
        if let Some(n) = rules
            .databases
            .filter(|&n| rules.cfg.redis.select && db >= n)
        {
            return Step::Reject(format!(
                "partition {} offset {offset} position {position}: record for source db {} (target db {db}) but the target has {n} databases; map it with redis.db_map",
                rules.partition, record.db
            ));
        }
        let apply = |cmds: Vec<Args>, snapshot| Step::Apply {
            ops: cmds.into_iter().map(|c| Op::data(Some(db), c)).collect(),
            snapshot,
        };
        match body {
            Body::Barrier(barrier) => Step::Barrier(barrier),
            Body::SnapshotStart(s) => {
                tracing::info!(partition = rules.partition, shard = %shard, "snapshot of epoch {} begins (RDB version {}, source offset {})", position.epoch, s.rdb_version, s.repl_offset);
                if rules.cfg.apply.on_new_snapshot == NewSnapshot::Flush {
                    Step::ClearForSnapshot(s)
                } else {
                    apply(Vec::new(), None)
                }
            }
            Body::SnapshotEnd(e) => {
                tracing::info!(partition = rules.partition, shard = %shard, "snapshot of epoch {} ends ({} keys in all partitions, {} function libraries)", position.epoch, e.keys, e.functions.len());
                // Every lane loads the snapshot's libraries (REPLACE makes it idempotent), so a
                // later FUNCTION barrier finds them whichever lane leads it.
                let load = |code: &Bytes| {
                    let verb = |s: &'static str| Bytes::from_static(s.as_bytes());
                    vec![
                        verb("FUNCTION"),
                        verb("LOAD"),
                        verb("REPLACE"),
                        code.clone(),
                    ]
                };
                let loads = e.functions.iter().map(|f| load(&f.code)).collect();
                apply(loads, Some(SnapshotPart::End))
            }
            Body::KeyEntry(entry) => {
                match convert::key_entry(rules.cfg, &entry, rules.restore_max_version) {
                    Ok(cmds) => apply(cmds, Some(SnapshotPart::Key)),
                    Err(e) => Step::Reject(format!(
                        "partition {} offset {offset}: {e}",
                        rules.partition
                    )),
                }
            }
            Body::KeyChunk(chunk) => apply(convert::key_chunk(rules.cfg, &chunk), None),
            Body::Command(c) => {
                let cmds = convert::commands(rules.cfg, [c]);
                apply(restorable(rules, filtered(rules, cmds)), None)
            }
            Body::Transaction(t) => {
                let cmds = convert::commands(rules.cfg, t.commands);
                apply(restorable(rules, filtered(rules, cmds)), None)
            }
            Body::Heartbeat(_) => unreachable!("handled above"),
        }
    }
}

/// Cluster targets: the slot whose checkpoint judges `record` (none for barriers, which move
/// the partition checkpoints only, and keyless records).
fn by_slot(rules: &Rules, record: &v1::Record) -> Option<u16> {
    let barrier = matches!(record.body, Some(Body::Barrier(_)));
    record
        .slot
        .and_then(|s| u16::try_from(s).ok())
        .filter(|_| rules.slot_checkpoints && !barrier)
}

/// Rebuilds RESTOREs whose payload the target cannot read (a newer source version).
fn restorable(rules: &Rules, cmds: Vec<Args>) -> Vec<Args> {
    let mut out = Vec::with_capacity(cmds.len());
    for c in cmds {
        match convert::restore_fallback(rules.cfg, &c, rules.restore_max_version) {
            Some(Ok(rebuilt)) => out.extend(rebuilt),
            Some(Err(e)) => {
                // Leave it to the target, which will refuse it with its own error.
                tracing::warn!(partition = rules.partition, "cannot rebuild a RESTORE: {e}");
                out.push(c);
            }
            None => out.push(c),
        }
    }
    out
}

/// The record as the filters leave it (`apply.include_keys`, …), or `None` when nothing of it
/// is applied. Barriers and snapshot markers always go through (their coordination and
/// positions matter), with their commands filtered.
fn filter(f: &Filter, db: u32, body: Body) -> Option<Body> {
    match body {
        Body::KeyEntry(e) => (f.db(db) && f.key(&e.key)).then_some(Body::KeyEntry(e)),
        Body::KeyChunk(c) => (f.db(db) && f.key(&c.key)).then_some(Body::KeyChunk(c)),
        Body::Command(c) => (f.db(db) && f.command(&c.args)).then_some(Body::Command(c)),
        Body::Transaction(mut t) => {
            t.commands = f.commands(db, t.commands);
            (!t.commands.is_empty()).then_some(Body::Transaction(t))
        }
        Body::Barrier(mut b) => {
            b.commands = f.commands(db, b.commands);
            Some(Body::Barrier(b))
        }
        other => Some(other),
    }
}

/// Drops FLUSHALL/FLUSHDB when the policy says so (`apply.flush = "ignore"`).
pub(super) fn filtered(rules: &Rules, cmds: Vec<Args>) -> Vec<Args> {
    if rules.cfg.apply.flush != FlushPolicy::Ignore {
        return cmds;
    }
    let before = cmds.len();
    let kept: Vec<Args> = cmds.into_iter().filter(|c| !convert::is_flush(c)).collect();
    if kept.len() < before {
        counter!("sink_records_skipped_total", "partition" => rules.label.to_owned(), "reason" => "flush-ignored").increment(1);
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{self, Config};

    const SHARD: &str = "src";

    fn pos(offset: u64) -> Position {
        Position {
            epoch: 1,
            offset,
            sequence: 0,
        }
    }

    fn args(words: &[&str]) -> Vec<Bytes> {
        words
            .iter()
            .map(|w| Bytes::copy_from_slice(w.as_bytes()))
            .collect()
    }

    fn record(offset: u64, slot: Option<u32>, body: Body) -> v1::Record {
        v1::Record {
            source_shard: SHARD.to_owned(),
            position: Some(pos(offset).into()),
            capture_time_ms: 7,
            slot,
            body: Some(body),
            ..v1::Record::default()
        }
    }

    fn command(words: &[&str]) -> Body {
        Body::Command(v1::Command { args: args(words) })
    }

    fn barrier(words: &[&str]) -> Body {
        Body::Barrier(v1::Barrier {
            partitions: vec![0, 1],
            commands: if words.is_empty() {
                Vec::new()
            } else {
                vec![v1::Command { args: args(words) }]
            },
            ..v1::Barrier::default()
        })
    }

    /// Plans `record` for a lane that knows `known`, on a target with slot checkpoints
    /// (a cluster) or not.
    fn plan_with(
        cfg: &Config,
        known: &Knowledge,
        cluster: bool,
        batched: &HashMap<String, Position>,
        record: v1::Record,
    ) -> Planned {
        let filter = Filter::new(&cfg.apply);
        let rules = Rules {
            cfg,
            filter: &filter,
            partition: 3,
            label: "3",
            slot_checkpoints: cluster,
            databases: Some(16),
            restore_max_version: 11,
        };
        known.plan(&rules, batched, record, 42)
    }

    fn plan(known: &Knowledge, record: v1::Record) -> Step {
        plan_with(
            &config::for_tests(""),
            known,
            false,
            &HashMap::new(),
            record,
        )
        .step
    }

    fn applied_at(offset: u64) -> Knowledge {
        Knowledge {
            applied: HashMap::from([(SHARD.to_owned(), pos(offset))]),
            ..Knowledge::default()
        }
    }

    fn ops_of(step: &Step) -> Vec<Vec<Bytes>> {
        match step {
            Step::Apply { ops, .. } => ops.iter().map(|o| o.args.clone()).collect(),
            other => panic!("expected writes, got {other:?}"),
        }
    }

    #[test]
    fn a_command_past_the_checkpoint_is_applied_in_its_mapped_db() {
        let cfg = config::for_tests("[redis.db_map]\n\"2\" = 5");
        let mut r = record(11, Some(100), command(&["SET", "k", "v"]));
        r.db = 2;
        let planned = plan_with(&cfg, &applied_at(10), false, &HashMap::new(), r);
        assert_eq!(ops_of(&planned.step), vec![args(&["SET", "k", "v"])]);
        let Step::Apply { ops, snapshot } = &planned.step else {
            unreachable!()
        };
        assert_eq!(ops[0].db, Some(5));
        assert_eq!(*snapshot, None);
        assert_eq!(
            (planned.shard.as_str(), planned.position, planned.slot),
            (SHARD, pos(11), Some(100))
        );
        assert_eq!((planned.db, planned.capture_ms), (5, 7));
    }

    #[test]
    fn records_the_checkpoint_or_the_batch_holds_are_duplicates() {
        let known = applied_at(10);
        for offset in [9, 10] {
            let r = record(offset, None, command(&["INCR", "n"]));
            assert!(matches!(plan(&known, r), Step::Duplicate), "{offset}");
        }
        let batched = HashMap::from([(SHARD.to_owned(), pos(12))]);
        let cfg = config::for_tests("");
        let r = record(12, None, command(&["INCR", "n"]));
        let step = plan_with(&cfg, &known, false, &batched, r).step;
        assert!(matches!(step, Step::Duplicate));
        let r = record(13, None, command(&["INCR", "n"]));
        let step = plan_with(&cfg, &known, false, &batched, r).step;
        assert_eq!(ops_of(&step), vec![args(&["INCR", "n"])]);
    }

    #[test]
    fn heartbeats_and_records_without_a_body_apply_nothing() {
        let known = Knowledge::default();
        let hb = record(5, None, Body::Heartbeat(v1::Heartbeat::default()));
        assert!(matches!(plan(&known, hb), Step::Heartbeat));
        let mut empty = record(6, None, command(&["SET", "k", "v"]));
        empty.body = None;
        assert!(matches!(plan(&known, empty), Step::Nothing));
    }

    #[test]
    fn filters_drop_records_but_barriers_keep_their_place() {
        let cfg = config::for_tests("[apply]\ninclude_keys = [\"keep:*\"]");
        let known = Knowledge::default();
        let plan = |r| plan_with(&cfg, &known, false, &HashMap::new(), r).step;
        let dropped = record(5, None, command(&["SET", "other", "v"]));
        assert!(matches!(plan(dropped), Step::Filtered));
        let kept = record(6, None, command(&["SET", "keep:1", "v"]));
        assert_eq!(ops_of(&plan(kept)), vec![args(&["SET", "keep:1", "v"])]);
        let b = record(7, None, barrier(&["DEL", "other", "x"]));
        assert!(matches!(plan(b), Step::Barrier(_)));
    }

    #[test]
    fn ignored_flushes_leave_the_record_with_nothing_to_write() {
        let cfg = config::for_tests("[apply]\nflush = \"ignore\"");
        let r = record(5, None, command(&["FLUSHALL"]));
        let step = plan_with(&cfg, &Knowledge::default(), false, &HashMap::new(), r).step;
        assert!(ops_of(&step).is_empty());
    }

    #[test]
    fn a_record_for_a_db_the_target_lacks_is_rejected() {
        let mut r = record(5, None, command(&["SET", "k", "v"]));
        r.db = 20;
        match plan(&Knowledge::default(), r) {
            Step::Reject(why) => {
                assert!(why.contains("target has 16 databases"), "{why}");
                assert!(why.contains("partition 3 offset 42"), "{why}");
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn snapshot_markers() {
        let known = Knowledge::default();
        let end = Body::SnapshotEnd(v1::SnapshotEnd {
            functions: vec![v1::FunctionLibrary {
                name: "lib".into(),
                code: Bytes::from_static(b"#!lua name=lib"),
            }],
            ..v1::SnapshotEnd::default()
        });
        let step = plan(&known, record(5, None, end));
        assert_eq!(
            ops_of(&step),
            vec![args(&["FUNCTION", "LOAD", "REPLACE", "#!lua name=lib"])]
        );
        assert!(matches!(
            step,
            Step::Apply {
                snapshot: Some(SnapshotPart::End),
                ..
            }
        ));
        let start = || Body::SnapshotStart(v1::SnapshotStart::default());
        assert!(ops_of(&plan(&known, record(1, None, start()))).is_empty());
        let cfg = config::for_tests("[apply]\non_new_snapshot = \"flush\"");
        let step = plan_with(
            &cfg,
            &known,
            false,
            &HashMap::new(),
            record(1, None, start()),
        );
        assert!(matches!(step.step, Step::ClearForSnapshot(_)));
    }

    /// Cluster targets: a record of a slot counts as applied when the partition's checkpoint or
    /// the slot's holds it; while lost slots are applied again, only the slot's.
    #[test]
    fn cluster_records_are_judged_by_their_slot_checkpoint_too() {
        let cfg = config::for_tests("");
        let mut known = applied_at(10);
        known.slot_applied = HashMap::from([
            (1, HashMap::from([(SHARD.to_owned(), pos(20))])),
            (2, HashMap::new()),
        ]);
        let step = |known: &Knowledge, offset, slot| {
            let r = record(offset, Some(slot), command(&["SET", "k", "v"]));
            plan_with(&cfg, known, true, &HashMap::new(), r).step
        };
        assert!(matches!(step(&known, 15, 1), Step::Duplicate));
        assert!(matches!(step(&known, 15, 2), Step::Apply { .. }));
        assert!(matches!(step(&known, 5, 2), Step::Duplicate));
        known.refill_through = Some(100);
        assert!(matches!(step(&known, 5, 2), Step::Apply { .. }));
        assert!(matches!(step(&known, 15, 1), Step::Duplicate));
    }

    #[test]
    fn the_slot_checkpoint_to_read_first() {
        let cfg = config::for_tests("");
        let filter = Filter::new(&cfg.apply);
        let rules = |cluster| Rules {
            cfg: &cfg,
            filter: &filter,
            partition: 3,
            label: "3",
            slot_checkpoints: cluster,
            databases: None,
            restore_max_version: 11,
        };
        let mut known = applied_at(10);
        let set = |offset| record(offset, Some(7), command(&["SET", "k", "v"]));
        assert_eq!(known.slot_to_read(&rules(true), &set(11)), Some(7));
        assert_eq!(known.slot_to_read(&rules(false), &set(11)), None);
        // The partition's checkpoint holds it: no need to ask the slot's.
        assert_eq!(known.slot_to_read(&rules(true), &set(9)), None);
        let mut b = record(11, Some(7), barrier(&["DEL", "a", "b"]));
        assert_eq!(known.slot_to_read(&rules(true), &b), None);
        known.refill_through = Some(50);
        assert_eq!(known.slot_to_read(&rules(true), &set(9)), Some(7));
        known.slot_applied.insert(7, HashMap::new());
        assert_eq!(known.slot_to_read(&rules(true), &set(11)), None);
        b.slot = None;
        assert_eq!(known.slot_to_read(&rules(true), &b), None);
    }

    /// A barrier the partition's checkpoint is past while lost slots are applied again: one that
    /// writes cannot be restored; one without commands is just a duplicate.
    #[test]
    fn barriers_applied_before_a_loss() {
        let mut known = applied_at(10);
        known.refill_through = Some(100);
        let step = plan(&known, record(8, Some(1), barrier(&["DEL", "a", "b"])));
        match step {
            Step::AppliedBefore(cmds) => assert_eq!(cmds, vec![args(&["DEL", "a", "b"])]),
            other => panic!("expected applied-before, got {other:?}"),
        }
        let step = plan(&known, record(8, Some(1), barrier(&[])));
        assert!(matches!(step, Step::Duplicate));
        known.refill_through = None;
        let step = plan(&known, record(8, Some(1), barrier(&["DEL", "a", "b"])));
        assert!(matches!(step, Step::Duplicate));
        let step = plan(&known, record(11, Some(1), barrier(&["DEL", "a", "b"])));
        assert!(matches!(step, Step::Barrier(_)));
    }
}
