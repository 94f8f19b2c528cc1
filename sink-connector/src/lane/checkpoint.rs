//! The lane's checkpoint in the target: reading it, finding out whether the target still
//! holds what the lane applied (or more), the per-slot checkpoints of a cluster target, and
//! the `HSET` that goes with every write.
//!
//! The checkpoint is a hash in the target, `<prefix>:<topic>:<partition>`, with one field per
//! source shard holding the last applied position, and `kafka:offset`, the partition offset its
//! data covers. A lane starts (and, after the target came back from a restart or failover with
//! older data, restarts) from there.

use super::apply::ApplyFailure;
use super::{b, Lane, Stop};
use crate::config::Config;
use crate::target::Op;
use bytes::Bytes;
use metrics::counter;
use proto::Position;
use redis::Value;
use std::collections::{BTreeMap, HashMap};

/// Field of the checkpoint hash with the Kafka offset of the last message its data covers.
const KAFKA_OFFSET_FIELD: &str = "kafka:offset";

/// Cluster targets: prefix of the partition checkpoint's fields that record, per slot the lane
/// wrote to, the Kafka offset that slot's own checkpoint reached (`slot:<n>`). A slot whose
/// checkpoint holds less lost writes, even when that happened while no sink was running.
pub(super) const SLOT_FIELD: &str = "slot:";

/// A lane's checkpoint hash as read from the target.
#[derive(Debug, Default)]
pub(super) struct Checkpoint {
    pub(super) exists: bool,
    pub(super) positions: Vec<(String, Position)>,
    pub(super) kafka_offset: Option<i64>,
    /// `slot:<n>` fields: (slot, Kafka offset its checkpoint reached).
    pub(super) slots: Vec<(u16, i64)>,
}

/// Checkpoint key of a partition.
pub fn checkpoint_key(cfg: &Config, topic: &str, partition: i32) -> Bytes {
    Bytes::from(format!(
        "{}:{topic}:{partition}",
        cfg.apply.checkpoint_prefix
    ))
}

impl Lane {
    /// A checkpoint hash: applied positions by source shard (barrier markers left out) and
    /// the Kafka offset they cover.
    pub(super) async fn read_checkpoint(&mut self, key: Bytes) -> Result<Checkpoint, Stop> {
        self.with_checkpoint_db().await?;
        let v = self.query(&[b("HGETALL"), key]).await?;
        let pairs: Vec<(Value, Value)> = match v {
            Value::Array(items) => items
                .chunks_exact(2)
                .map(|c| (c[0].clone(), c[1].clone()))
                .collect(),
            Value::Map(items) => items,
            _ => Vec::new(),
        };
        // Barrier arrival markers are written outside transactions, so they can land on a
        // target that lost everything: a hash holding only markers is no checkpoint (the lane
        // replays the partition from its start), not one of a version before `kafka:offset`.
        let mut checkpoint = Checkpoint {
            exists: pairs
                .iter()
                .any(|(f, _)| !matches!(f, Value::BulkString(f) if f.starts_with(b"barrier:"))),
            ..Checkpoint::default()
        };
        for pair in pairs {
            let (Value::BulkString(f), Value::BulkString(v)) = pair else {
                continue;
            };
            let field = String::from_utf8_lossy(&f).into_owned();
            let value = String::from_utf8_lossy(&v);
            if field == KAFKA_OFFSET_FIELD {
                checkpoint.kafka_offset = value.parse().ok();
            } else if let Some(slot) = field.strip_prefix(SLOT_FIELD) {
                if let (Ok(slot), Ok(offset)) = (slot.parse(), value.parse()) {
                    checkpoint.slots.push((slot, offset));
                }
            } else if !field.starts_with("barrier:") {
                if let Some(position) = Position::parse(&value) {
                    checkpoint.positions.push((field, position));
                }
            }
        }
        Ok(checkpoint)
    }

    /// On a new connection, whether the target still holds what this lane applied
    /// ([`Lane::verify_target`]); reads and markers between writes go through here too.
    pub(super) async fn still_there(&mut self) -> Result<(), Stop> {
        if self.target.unverified() {
            self.verify_target().await?;
        }
        Ok(())
    }

    /// Loads the lane's checkpoint from the target: what it holds is where the lane goes on.
    pub async fn load(&mut self) -> Result<(), Stop> {
        let stored = self.read_checkpoint(self.key.clone()).await?;
        self.target.verified();
        self.known.applied = stored.positions.into_iter().collect();
        self.known.kafka_applied = stored.kafka_offset;
        self.just_loaded = true;
        self.seeks = 0;
        self.expect_next = match stored.kafka_offset {
            Some(offset) => Some(offset + 1),
            // Nothing of this partition in the target: it must see the partition from its start
            // (a target that lost everything, while the group's offsets moved on).
            None if !stored.exists => match self.watermarks().await {
                Ok((low, _)) => Some(low),
                Err(e) => {
                    tracing::warn!(partition = self.partition, "cannot read the partition's oldest offset ({e}); starting from the committed offset");
                    None
                }
            },
            // Written by a version without `kafka:offset`: trust the committed offset.
            None => None,
        };
        let refill = if self.target.slot_checkpoints() {
            self.lost_slots(&stored.slots).await?
        } else {
            self.known.slot_applied.clear();
            None
        };
        if let Some(from) = refill {
            self.expect_next = Some(self.expect_next.map_or(from, |e| e.min(from)));
        }
        self.known.refill_through = refill.and(stored.kafka_offset);
        tracing::info!(
            partition = self.partition,
            offset = ?self.known.kafka_applied,
            "lane starts; the target holds positions {:?} up to partition offset {:?}",
            self.known.applied
                .iter()
                .map(|(s, p)| format!("{s}={p}"))
                .collect::<Vec<_>>(),
            self.known.kafka_applied
        );
        Ok(())
    }

    /// Called before writing on a new connection to the target: is the target where this lane
    /// thinks it is? Two ways it may not be, both resolved by reloading the checkpoint the target
    /// holds (the target is the truth) and going on from there:
    /// - it holds *more*: the connection died after a transaction ran but before its reply came
    ///   back, so the lane does not know that batch was applied. Retrying it would apply it twice.
    /// - it holds *less*: it restarted without persistence, or failed over to a replica that had
    ///   not received the last writes. The lane rewinds and applies them again.
    pub(super) async fn verify_target(&mut self) -> Result<(), Stop> {
        if self.target.slot_checkpoints() {
            // Checkpoints are per slot on a cluster: reload them all and go on from the
            // partition's checkpoint, or from further back when a slot lost writes; records
            // each slot already holds are skipped.
            self.target.verified();
            tracing::warn!(
                partition = self.partition,
                "reconnected to the cluster target {}: reloading the checkpoints it holds",
                self.target.address()
            );
            // The reload finds the slots that lost writes (`lost_slots`).
            return Err(Stop::Rewind);
        }
        let stored = self.read_checkpoint(self.key.clone()).await?;
        self.target.verified();
        let held: HashMap<&str, Position> = stored
            .positions
            .iter()
            .map(|(s, p)| (s.as_str(), *p))
            .collect();
        let behind = match (self.known.kafka_applied, stored.kafka_offset) {
            (Some(applied), Some(held)) => held < applied,
            (Some(_), None) => true,
            (None, _) => false,
        } || self
            .known
            .applied
            .iter()
            .any(|(shard, p)| held.get(shard.as_str()).is_none_or(|h| h < p));
        let ahead = match (self.known.kafka_applied, stored.kafka_offset) {
            (applied, Some(held)) => applied.is_none_or(|a| held > a),
            (_, None) => false,
        } || held
            .iter()
            .any(|(shard, h)| self.known.applied.get(*shard).is_none_or(|p| h > p));
        if behind {
            tracing::error!(
                partition = self.partition,
                "target {} lost writes this lane had applied (it holds partition offset {:?}, positions {:?}; the lane applied up to offset {:?}): a restart without persistence or a failover to a lagging replica. Rewinding the partition to what the target holds.",
                self.target.address(),
                stored.kafka_offset,
                stored.positions,
                self.known.kafka_applied,
            );
        } else if ahead {
            tracing::warn!(
                partition = self.partition,
                "target {} holds partition offset {:?} but the lane only knew of {:?}: the last transaction ran although its reply was lost; going on after it",
                self.target.address(),
                stored.kafka_offset,
                self.known.kafka_applied,
            );
        } else {
            return Ok(());
        }
        Err(Stop::Rewind)
    }

    /// Cluster targets, when the lane (re)loads: the slots that hold less than this lane applied
    /// to them (a master restarted without persistence, or a replica promoted before it had the
    /// last writes). The lane knows it from what it applied since it last loaded
    /// (`slot_applied`), and from the `slot:<n>` fields of the partition checkpoint (`recorded`:
    /// the Kafka offset each slot's checkpoint reached), which also reveal a loss while no lane
    /// was connected. Returns the Kafka offset to apply them again from: after the oldest of
    /// their checkpoints, or the partition's start for a slot whose checkpoint is gone. Leaves
    /// `slot_applied` as the target holds it for the slots read.
    pub(super) async fn lost_slots(
        &mut self,
        recorded: &[(u16, i64)],
    ) -> Result<Option<i64>, Stop> {
        // Per slot: the positions applied since the last load, and the recorded offset.
        let mut knew: BTreeMap<u16, (HashMap<String, Position>, Option<i64>)> = BTreeMap::new();
        for (slot, applied) in std::mem::take(&mut self.known.slot_applied) {
            if !applied.is_empty() {
                knew.entry(slot).or_default().0 = applied;
            }
        }
        for &(slot, reached) in recorded {
            knew.entry(slot).or_default().1 = Some(reached);
        }
        let mut from: Option<i64> = None;
        let mut lost = Vec::new();
        for (slot, (applied, reached)) in knew {
            let stored = self.read_checkpoint(self.slot_key(slot)).await?;
            let held: HashMap<String, Position> = stored.positions.into_iter().collect();
            let behind = applied
                .iter()
                .any(|(shard, p)| held.get(shard).is_none_or(|h| h < p))
                || reached.is_some_and(|r| stored.kafka_offset.is_none_or(|h| h < r));
            self.known.slot_applied.insert(slot, held);
            if !behind {
                continue;
            }
            let start = self.refill_start(slot, stored.kafka_offset).await?;
            from = Some(from.map_or(start, |f: i64| f.min(start)));
            lost.push(slot);
        }
        if let Some(offset) = from {
            tracing::error!(
                partition = self.partition,
                "target {} lost writes this lane had applied to {} slots {:?} (a master restarted without persistence or a replica was promoted before it had them, maybe while no sink was connected): applying them again from partition offset {offset}",
                self.target.address(),
                lost.len(),
                &lost[..lost.len().min(10)],
            );
            counter!("sink_target_slots_lost_total", "partition" => self.label.clone())
                .increment(lost.len() as u64);
        }
        Ok(from)
    }

    /// Where to apply a slot's lost writes again from: after the Kafka offset its checkpoint
    /// still holds, or the partition's oldest offset when its checkpoint is gone.
    pub(super) async fn refill_start(&mut self, slot: u16, held: Option<i64>) -> Result<i64, Stop> {
        if let Some(offset) = held {
            return Ok(offset + 1);
        }
        self.watermarks()
            .await
            .map(|(low, _)| low)
            .map_err(|e| {
                self.halt(&format!(
                    "slot {slot} of the target lost its writes and the partition's oldest offset cannot be read: {e}"
                ))
            })
    }

    /// Cluster targets: reads what `slot`'s checkpoint holds into `known.slot_applied`.
    pub(super) async fn read_slot(&mut self, slot: u16) -> Result<(), Stop> {
        let stored = self.read_checkpoint(self.slot_key(slot)).await?;
        self.known
            .slot_applied
            .insert(slot, stored.positions.into_iter().collect());
        Ok(())
    }

    /// Cluster targets: the checkpoint hash of `slot` for this lane.
    pub(super) fn slot_key(&self, slot: u16) -> Bytes {
        Bytes::from(format!(
            "{}:{{{}}}",
            String::from_utf8_lossy(&self.key),
            crate::cluster::slot_tag(slot)
        ))
    }

    /// Where the checkpoint of what is being applied goes: the slot's hash on a cluster.
    pub(super) fn batch_key(&self) -> Bytes {
        match self.batch_slot {
            Some(slot) => self.slot_key(slot),
            None => self.key.clone(),
        }
    }

    /// Records what a batch applied.
    pub(super) fn note_applied(&mut self, positions: Vec<(String, Position)>) {
        if let Some(slot) = self.batch_slot {
            let held = self.known.slot_applied.entry(slot).or_default();
            for (shard, p) in &positions {
                held.insert(shard.clone(), *p);
            }
        }
        for (shard, p) in positions {
            self.known.applied.insert(shard, p);
        }
    }

    pub(super) fn checkpoint_op(
        &self,
        key: Bytes,
        positions: &[(String, Position)],
        kafka_offset: Option<i64>,
    ) -> Op {
        let mut args = vec![b("HSET"), key];
        for (shard, p) in positions {
            args.push(Bytes::from(shard.clone()));
            args.push(Bytes::from(p.to_text()));
        }
        if let Some(offset) = kafka_offset {
            args.push(b(KAFKA_OFFSET_FIELD));
            args.push(Bytes::from(offset.to_string()));
        }
        Op {
            db: self.checkpoint_db(),
            args,
            checkpoint: true,
        }
    }

    /// Records a position as applied without data (a record that was dead-lettered).
    pub(super) async fn checkpoint_only(
        &mut self,
        shard: &str,
        position: Position,
        kafka_offset: i64,
    ) -> Result<(), Stop> {
        self.write_checkpoint(&[(shard.to_owned(), position)], kafka_offset)
            .await
    }

    /// Writes `positions` and the partition offset they reach to the checkpoint, alone.
    pub(super) async fn write_checkpoint(
        &mut self,
        positions: &[(String, Position)],
        kafka_offset: i64,
    ) -> Result<(), Stop> {
        let op = self.checkpoint_op(self.batch_key(), positions, Some(kafka_offset));
        match self.apply(&[op]).await {
            Ok(()) | Err(ApplyFailure::Continue) => {}
            Err(ApplyFailure::Stop(s)) => return Err(s),
            Err(ApplyFailure::Record { error, .. }) => {
                return Err(self.halt(&format!("cannot write the checkpoint: {error}")))
            }
        }
        self.note_applied(positions.to_vec());
        self.known.kafka_applied = Some(kafka_offset);
        Ok(())
    }

    /// The position a checkpoint hash holds for `shard` (the checkpoint db must be selected).
    pub(super) async fn stored_position(
        &mut self,
        key: Bytes,
        shard: &str,
    ) -> Result<Option<Position>, Stop> {
        let v = self
            .query(&[b("HGET"), key, Bytes::from(shard.to_owned())])
            .await?;
        Ok(match v {
            Value::BulkString(s) => Position::parse(&String::from_utf8_lossy(&s)),
            _ => None,
        })
    }

    /// Non-transactional checkpoint reads and writes happen in db 0 when SELECT is allowed.
    pub(super) async fn with_checkpoint_db(&mut self) -> Result<(), Stop> {
        if let Some(db) = self.checkpoint_db() {
            self.target_select(db).await?;
        }
        Ok(())
    }

    pub(super) async fn target_select(&mut self, db: u32) -> Result<(), Stop> {
        self.query(&[b("SELECT"), Bytes::from(db.to_string())])
            .await?;
        Ok(())
    }
}
