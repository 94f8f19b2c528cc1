//! `apply.on_new_snapshot = "flush"`: the target's keys of a partition deleted before a new
//! snapshot is applied.

use super::apply::{ApplyFailure, Stall};
use super::{b, Lane, Stop};
use crate::convert::Args;
use crate::target::{ApplyError, Op};
use bytes::Bytes;
use metrics::counter;
use proto::topic as wire;
use proto::v1;
use proto::Position;
use std::time::Duration;

impl Lane {
    /// `apply.on_new_snapshot = "flush"`: before a snapshot, delete the target's keys in this
    /// partition's slots (within the shard's scope for a cluster source), in every db, so keys
    /// deleted on the source while the link was down do not survive the resync. Done once per
    /// snapshot: the deletes and the snapshot-start position go in one transaction.
    pub(super) async fn clear_for_snapshot(
        &mut self,
        shard: &str,
        position: Position,
        start: &v1::SnapshotStart,
        offset: i64,
    ) -> Result<(), Stop> {
        let partitions = start.partitions.max(1);
        let prefix = self.env.cfg.apply.checkpoint_prefix.clone();
        let partition = self.partition as u32;
        let mine = |key: &[u8]| {
            let slot = proto::slot::key_slot(key);
            let s = u32::from(slot.get());
            wire::partition_for_slot(slot, partitions).0 == partition
                && (start.scope.is_empty()
                    || start.scope.iter().any(|r| (r.first..=r.last).contains(&s)))
        };
        let mut doomed: Vec<(u32, Bytes)> = self
            .target_keys(None)
            .await?
            .into_iter()
            .filter(|(_, k)| !k.starts_with(prefix.as_bytes()) && mine(k))
            .collect();
        doomed.sort_by_key(|(db, _)| *db);
        let deleted = doomed.len();
        let mut ops = Vec::new();
        for group in doomed.chunk_by(|a, b| a.0 == b.0) {
            let keys: Vec<Bytes> = group.iter().map(|(_, k)| k.clone()).collect();
            let db = Some(group[0].0);
            ops.extend(unlinks(&keys).map(|args| Op::data(db, args)));
        }
        ops.push(self.checkpoint_op(
            self.key.clone(),
            &[(shard.to_owned(), position)],
            Some(offset),
        ));
        match self.apply(&ops).await {
            Ok(()) | Err(ApplyFailure::Continue) => {}
            Err(ApplyFailure::Stop(s)) => return Err(s),
            Err(ApplyFailure::Record { error, .. }) => {
                return Err(self.halt(&format!(
                    "cannot clear the target before the snapshot of epoch {}: {error}",
                    position.epoch
                )))
            }
        }
        self.note_applied(vec![(shard.to_owned(), position)]);
        self.known.kafka_applied = Some(offset);
        counter!("sink_snapshot_flushed_keys_total", "partition" => self.label.clone())
            .increment(deleted as u64);
        tracing::warn!(
            partition = self.partition,
            shard,
            "apply.on_new_snapshot = \"flush\": deleted {deleted} target keys of this partition's slots before the snapshot of epoch {}",
            position.epoch
        );
        Ok(())
    }

    /// The target's keys with their db: of `db`, or of every db that holds keys (`None`),
    /// retrying transient errors.
    pub(super) async fn target_keys(&mut self, db: Option<u32>) -> Result<Vec<(u32, Bytes)>, Stop> {
        let mut stall = Stall::new(self, Duration::from_millis(200));
        loop {
            match self.target.keys(db).await {
                Ok(keys) => {
                    stall.ended(self);
                    return Ok(keys);
                }
                Err(ApplyError::Transient { code, message }) => {
                    stall.retry(self, "the key scan", &code, &message).await?;
                }
                Err(e) => return Err(self.halt(&format!("cannot list the target's keys: {e}"))),
            }
        }
    }
}

/// `UNLINK`s of `keys`, 512 keys per command.
pub(super) fn unlinks(keys: &[Bytes]) -> impl Iterator<Item = Args> + '_ {
    keys.chunks(512).map(|chunk| {
        std::iter::once(b("UNLINK"))
            .chain(chunk.iter().cloned())
            .collect()
    })
}
