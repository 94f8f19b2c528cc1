//! The Kafka side of a lane: the partition's offsets policed against what the target holds
//! (gaps, rewinds, records deleted before they were applied), seeks and watermarks, and a
//! consumer that stops delivering.

use super::{Lane, Stop};
use metrics::{counter, gauge};
use rdkafka::consumer::Consumer;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a lane needs from the consumer. The calls block; lanes run them on the blocking pool.
pub trait Partitions: Send + Sync {
    /// Marks `offset` of `partition` as applied, for the next offset commit.
    fn commit(&self, partition: i32, offset: i64);
    /// The oldest offset the partition still holds, and the offset after its newest.
    fn watermarks(&self, partition: i32) -> Result<(i64, i64), String>;
    /// Makes the partition's next message the one at `offset`.
    fn seek(&self, partition: i32, offset: i64) -> Result<(), String>;
}

/// Seeks back to a missing offset after which the lane accepts that it holds no record.
const MAX_SEEKS: u32 = 5;

/// How long a lane waits for a message before it asks whether the partition holds any.
pub(super) const STARVED_AFTER: Duration = Duration::from_secs(30);

impl Lane {
    /// A message at `seen` arrived where the lane expected `expected` or less. Returns whether
    /// the lane sought back (the rest of the batch was fetched before the seek and is dropped),
    /// or `false` when offsets `expected..seen` hold nothing and the lane goes on from `seen`.
    ///
    /// Right after a (re)load this means the consumer group committed past what the target
    /// holds (it restarted without persistence, or failed over to a lagging replica). Later it
    /// means the consumer skipped offsets. Seeking back is right in both cases unless the
    /// offsets are gone: deleted by retention before the target got them (the target cannot be
    /// made whole from this topic: the lane halts), or never held a record (transaction markers,
    /// compaction; nothing to apply: the lane goes on once seeks keep landing past them).
    pub(super) async fn offsets_missing(&mut self, expected: i64, seen: i64) -> Result<bool, Stop> {
        let partition = self.partition;
        match self.watermarks().await {
            Ok((low, _)) if low > expected => {
                return Err(self.halt(&format!(
                    "topic {} partition {partition}: offsets {expected}..{} were deleted (the partition now starts at {low}) before the target applied them, so the target misses their writes; retention is too short for this sink's downtime: resynchronise (see the runbook, \"records deleted before the sink applied them\")",
                    self.env.topic,
                    low - 1
                )));
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(
                    partition,
                    "cannot read the partition's oldest offset ({e}); retrying"
                );
                self.pause(Duration::from_secs(1)).await?;
                return Ok(true);
            }
        }
        if self.seeks >= MAX_SEEKS {
            tracing::warn!(
                partition,
                "offsets {expected}..{} hold no record ({MAX_SEEKS} seeks back to {expected} landed at {seen}: transaction markers or compaction); going on from {seen}",
                seen - 1
            );
            counter!("sink_offsets_absent_total", "partition" => self.label.clone())
                .increment(u64::try_from(seen - expected).unwrap_or(0));
            self.seeks = 0;
            return Ok(false);
        }
        if self.seeks == 0 {
            if self.just_loaded {
                tracing::warn!(
                    partition,
                    "the consumer is at offset {seen} but the target holds this partition only up to offset {}: seeking back to {expected}",
                    expected - 1
                );
                counter!("sink_rewinds_total", "partition" => self.label.clone()).increment(1);
            } else {
                tracing::error!(
                    partition,
                    "the consumer delivered offset {seen} after {}: seeking back to {expected} to apply what it skipped",
                    expected - 1
                );
                counter!("sink_offset_gaps_total", "partition" => self.label.clone()).increment(1);
            }
        }
        match self.seek(expected).await {
            Ok(()) => self.seeks += 1,
            Err(e) => {
                tracing::warn!(
                    partition,
                    "seek to offset {expected} failed ({e}); retrying"
                );
                self.pause(Duration::from_secs(1)).await?;
            }
        }
        Ok(true)
    }

    /// After a rewind: the consumer goes back to where the target's checkpoint ends now. Waiting
    /// for the next message to show the gap is not enough: on a quiet partition none may come,
    /// and the records the target lost (a barrier's follower waiting for its leader, say) would
    /// never be applied again.
    pub(super) async fn seek_to_checkpoint(&mut self) {
        let Some(offset) = self.expect_next else {
            return;
        };
        let partition = self.partition;
        match self.seek(offset).await {
            Ok(()) => {
                tracing::warn!(
                    partition,
                    "reading the partition again from offset {offset}, after what the target holds"
                );
                counter!("sink_rewinds_total", "partition" => self.label.clone()).increment(1);
            }
            Err(e) => tracing::warn!(
                partition,
                "seek to offset {offset} after a rewind failed ({e}); the next message will show the gap"
            ),
        }
    }

    /// Makes the partition's next message the one at `offset` (a consumer call, run on the
    /// blocking pool).
    pub(super) async fn seek(&self, offset: i64) -> Result<(), String> {
        let partitions = Arc::clone(&self.env.partitions);
        let partition = self.partition;
        blocking(move || partitions.seek(partition, offset)).await
    }

    /// The partition's oldest offset and the offset after its newest (a consumer call, run on
    /// the blocking pool).
    pub(super) async fn watermarks(&self) -> Result<(i64, i64), String> {
        let partitions = Arc::clone(&self.env.partitions);
        let partition = self.partition;
        blocking(move || partitions.watermarks(partition)).await
    }

    /// Called each time the lane has waited [`STARVED_AFTER`] for a message. Waiting is normal
    /// when the partition holds nothing past the lane's position; when it does, the consumer is
    /// not getting records the broker says it has (a broker that cannot answer a fetch within
    /// `fetch.wait.max.ms`, a network that drops fetch responses): warned once per episode, and
    /// `sink_fetch_starved` is 1 until a message arrives.
    pub(super) async fn starved(&mut self) {
        let Some(next) = self.expect_next else {
            return;
        };
        let partition = self.partition;
        let high = match self.watermarks().await {
            Ok((_, high)) => high,
            Err(e) => {
                tracing::debug!(partition, "cannot read the partition's watermarks: {e}");
                return;
            }
        };
        if high <= next || self.starved_since.is_some() {
            return;
        }
        self.starved_since = Some(Instant::now());
        tracing::warn!(
            partition,
            "partition {partition}: no message for {STARVED_AFTER:?} although the partition holds offsets {next}..{}: the broker is not delivering them (a fetch it cannot answer within fetch.wait.max.ms? see the runbook, \"a lane receives nothing\")",
            high - 1
        );
        gauge!("sink_fetch_starved", "partition" => self.label.clone()).set(1.0);
    }

    /// A message arrived: ends a starvation episode.
    pub(super) fn fed(&mut self) {
        if let Some(since) = self.starved_since.take() {
            tracing::info!(
                partition = self.partition,
                "messages arrive again (none had come for {:?})",
                since.elapsed() + STARVED_AFTER
            );
            gauge!("sink_fetch_starved", "partition" => self.label.clone()).set(0.0);
        }
    }
}

/// Runs a blocking consumer call on the blocking pool.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, String> + Send + 'static,
) -> Result<T, String> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| e.to_string())?
}

/// Marks a committed offset (used by `Partitions::commit`).
pub fn store_offset<C: Consumer<X>, X: rdkafka::consumer::ConsumerContext>(
    consumer: &C,
    topic: &str,
    partition: i32,
    offset: i64,
) {
    if let Err(e) = consumer.store_offset(topic, partition, offset) {
        tracing::debug!(partition, "cannot store offset {offset}: {e}");
    }
}
