//! One ordered lane per partition: read records in order, turn them into commands, and apply
//! them to the target together with the lane's checkpoint in one `MULTI/EXEC`.
//!
//! The checkpoint is a hash in the target, `<prefix>:<topic>:<partition>`, with one field per
//! source shard holding the last applied position. Records at or below it are skipped, so
//! replays after a crash or a rebalance apply nothing twice. Barrier records (on several
//! partitions) are coordinated through the same hashes: see [`Lane::barrier`].
//!
//! The hash also holds `kafka:offset`, the partition offset its data covers. A lane starts (and,
//! after the target came back from a restart or failover with older data, restarts) from there:
//! a target that lost writes gets them again, because the lane rewinds the partition to what the
//! target really holds instead of trusting the consumer group's committed offset.

use crate::config::{Config, Conflict, FlushPolicy, NewSnapshot, OnError};
use crate::convert::{self, Args};
use crate::filter::{Filter, RateLimit};
use crate::incoming::Incoming;
use crate::target::{self, ApplyError, Op, Target};
use bytes::Bytes;
use metrics::{counter, gauge, histogram};
use proto::topic::{self as wire};
use proto::v1::{self, record::Body};
use proto::Position;
use rdkafka::consumer::Consumer;
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use redis::Value;
use service::http::Health;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Why a lane stopped processing.
#[derive(Debug)]
pub enum Stop {
    /// The partition was revoked (or the process is stopping): not an error.
    Revoked,
    /// A permanent error under `on_error = "halt"`.
    Halted(String),
    /// The target lost writes this lane had applied: reload its checkpoint and rewind to it.
    Rewind,
}

/// What a lane needs from the consumer. The calls block; lanes run them on the blocking pool.
pub trait Partitions: Send + Sync {
    /// Marks `offset` of `partition` as applied, for the next offset commit.
    fn commit(&self, partition: i32, offset: i64);
    /// The oldest offset the partition still holds, and the offset after its newest.
    fn watermarks(&self, partition: i32) -> Result<(i64, i64), String>;
    /// Makes the partition's next message the one at `offset`.
    fn seek(&self, partition: i32, offset: i64) -> Result<(), String>;
}

/// Field of the checkpoint hash with the Kafka offset of the last message its data covers.
const KAFKA_OFFSET_FIELD: &str = "kafka:offset";

/// Seeks back to a missing offset after which the lane accepts that it holds no record.
const MAX_SEEKS: u32 = 5;

/// How long a follower sees its barrier's leader past the barrier, and its own checkpoint not,
/// before it concludes that its checkpoint lost the barrier.
const BARRIER_PAST_GRACE: Duration = Duration::from_secs(5);

/// How long a lane waits for a message before it asks whether the partition holds any.
const STARVED_AFTER: Duration = Duration::from_secs(30);

/// Cluster targets: prefix of the partition checkpoint's fields that record, per slot the lane
/// wrote to, the Kafka offset that slot's own checkpoint reached (`slot:<n>`). A slot whose
/// checkpoint holds less lost writes, even when that happened while no sink was running.
const SLOT_FIELD: &str = "slot:";

/// A lane's checkpoint hash as read from the target.
#[derive(Debug, Default)]
struct Checkpoint {
    exists: bool,
    positions: Vec<(String, Position)>,
    kafka_offset: Option<i64>,
    /// `slot:<n>` fields: (slot, Kafka offset its checkpoint reached).
    slots: Vec<(u16, i64)>,
}

/// What a lane needs from the rest of the process.
#[derive(Clone)]
pub struct LaneEnv {
    pub cfg: Arc<Config>,
    pub topic: String,
    pub health: Health,
    pub dead_letter: Option<FutureProducer>,
    pub partitions: Arc<dyn Partitions>,
    pub filter: Arc<Filter>,
    pub limit: Arc<RateLimit>,
}

impl std::fmt::Debug for LaneEnv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LaneEnv")
            .field("topic", &self.topic)
            .finish()
    }
}

/// Checkpoint key of a partition.
pub fn checkpoint_key(cfg: &Config, topic: &str, partition: i32) -> Bytes {
    Bytes::from(format!(
        "{}:{topic}:{partition}",
        cfg.apply.checkpoint_prefix
    ))
}

fn marker_field(shard: &str) -> Bytes {
    Bytes::from(format!("barrier:{shard}"))
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

#[derive(Debug)]
pub struct Lane {
    env: LaneEnv,
    partition: i32,
    label: String,
    target: Target,
    key: Bytes,
    applied: HashMap<String, Position>,
    /// Kafka offset of the last message whose effects the target's checkpoint covers.
    kafka_applied: Option<i64>,
    /// Cluster targets: the positions each slot's checkpoint holds (read when first needed).
    slot_applied: HashMap<u16, HashMap<String, Position>>,
    /// Cluster targets: the slot whose records are being flushed; their checkpoint goes to that
    /// slot's hash instead of the partition's.
    batch_slot: Option<u16>,
    /// A barrier leader about to apply: the connection ([`Target::generation`]) it read the
    /// other lanes' arrivals on.
    barrier_connection: Option<u64>,
    /// Cluster targets: while slots that lost writes are applied again, the partition offset
    /// the lane had reached before (barriers up to it were applied before the loss).
    refill_through: Option<i64>,
    /// The offset the next message must not exceed. Set at (re)load from what the target holds
    /// (messages past it were committed but the target does not hold them) and then advanced by
    /// every message (offsets of this topic are contiguous: a message past it means the consumer
    /// skipped some). Either way the lane seeks back; see [`Lane::offsets_missing`].
    expect_next: Option<i64>,
    /// Whether no message was processed since the last (re)load.
    just_loaded: bool,
    /// Seeks back to `expect_next` made since a message was last taken.
    seeks: u32,
    /// Since when the partition has held records past `expect_next` that the consumer does not
    /// deliver (see [`Lane::starved`]).
    starved_since: Option<Instant>,
    control: watch::Receiver<bool>,
    /// Per-record metrics, registered once.
    skipped_duplicates: metrics::Counter,
    snapshot_keys: metrics::Counter,
    latency: Latency,
}

/// A record's latency, capture → applied, whole and by stage.
#[derive(Debug)]
struct Latency {
    end_to_end: metrics::Histogram,
    /// Capture → the message's Kafka timestamp: the source connector's share.
    source: metrics::Histogram,
    /// Kafka timestamp → taken by the lane: the producer's batching, the broker and the fetch.
    kafka: metrics::Histogram,
    /// Taken by the lane → applied: decoding, batching, barriers, retries and the write.
    sink: metrics::Histogram,
}

impl Latency {
    fn new() -> Latency {
        let stage = |s: &'static str| histogram!("sink_stage_latency_seconds", "stage" => s);
        Latency {
            end_to_end: histogram!("sink_end_to_end_seconds"),
            source: stage("source"),
            kafka: stage("kafka"),
            sink: stage("sink"),
        }
    }

    /// A record captured at `capture_ms`, carried by `message`, applied at `applied_ms`.
    fn record(&self, capture_ms: i64, message: &Incoming, applied_ms: i64) {
        let secs = |from: i64, to: i64| (to - from).max(0) as f64 / 1000.0;
        self.end_to_end.record(secs(capture_ms, applied_ms));
        if let Some(kafka_ms) = message.kafka_ms() {
            self.source.record(secs(capture_ms, kafka_ms));
            self.kafka.record(secs(kafka_ms, message.taken_ms()));
        }
        self.sink.record(secs(message.taken_ms(), applied_ms));
    }
}

/// A lane retrying something the target refuses for now (`OOM`, `LOADING`, `READONLY`, a lost
/// connection…): capped exponential backoff with jitter, until it succeeds. The stall shows in
/// `sink_lane_stalled`, `sink_lane_stalled_seconds` and `sink_retries_total`, with a warning
/// when it begins, again every retry once it has lasted 10 s at the capped backoff, and a line
/// when it ends.
#[derive(Debug)]
struct Stall {
    since: Option<Instant>,
    backoff: Duration,
}

impl Stall {
    fn new(first: Duration) -> Stall {
        Stall {
            since: None,
            backoff: first,
        }
    }

    /// Counts a refused attempt at `what` and waits before the next one. A revoked lane stops
    /// waiting and leaves the stall.
    async fn retry(
        &mut self,
        lane: &mut Lane,
        what: &str,
        code: &str,
        message: &str,
    ) -> Result<(), Stop> {
        let partition = lane.partition;
        let since = *self.since.get_or_insert_with(|| {
            gauge!("sink_lane_stalled", "partition" => lane.label.clone()).set(1.0);
            tracing::warn!(
                partition,
                "target refused {what} ({code} {message}); retrying until it succeeds"
            );
            Instant::now()
        });
        counter!("sink_retries_total", "partition" => lane.label.clone(), "code" => code.to_owned())
            .increment(1);
        gauge!("sink_lane_stalled_seconds", "partition" => lane.label.clone())
            .set(since.elapsed().as_secs_f64());
        let max = Duration::from_millis(lane.env.cfg.apply.max_backoff_ms);
        if since.elapsed() > Duration::from_secs(10) && self.backoff >= max {
            tracing::warn!(
                partition,
                "still stalled after {:?}: {code} {message}",
                since.elapsed()
            );
        }
        let backoff = self.backoff;
        self.backoff = (backoff * 2).min(max);
        let jitter = rand::random::<u64>() % (backoff.as_millis() as u64 / 4 + 1);
        let paused = lane.pause(backoff + Duration::from_millis(jitter)).await;
        if paused.is_err() {
            self.clear(lane);
        }
        paused
    }

    /// The target took it: the stall, if any, is over.
    fn ended(&mut self, lane: &Lane) {
        if let Some(since) = self.since {
            tracing::info!(
                partition = lane.partition,
                "target accepts writes again after {:?}",
                since.elapsed()
            );
            self.clear(lane);
        }
    }

    fn clear(&mut self, lane: &Lane) {
        if self.since.take().is_some() {
            gauge!("sink_lane_stalled", "partition" => lane.label.clone()).set(0.0);
            gauge!("sink_lane_stalled_seconds", "partition" => lane.label.clone()).set(0.0);
        }
    }
}

/// A record being applied, with where it came from.
struct Pending {
    offset: i64,
    /// The record's slot (none for keyless records).
    slot: Option<u16>,
    shard: String,
    position: Position,
    capture_ms: i64,
    ops: Vec<Op>,
    message: Incoming,
}

impl Lane {
    pub fn new(
        env: LaneEnv,
        partition: i32,
        control: watch::Receiver<bool>,
    ) -> anyhow::Result<Lane> {
        let target = Target::new(&env.cfg)?;
        let key = checkpoint_key(&env.cfg, &env.topic, partition);
        let label = partition.to_string();
        Ok(Lane {
            skipped_duplicates: counter!("sink_records_skipped_total", "partition" => label.clone(), "reason" => "duplicate"),
            snapshot_keys: counter!("sink_snapshot_keys_total", "partition" => label.clone()),
            latency: Latency::new(),
            label,
            env,
            partition,
            target,
            key,
            applied: HashMap::new(),
            kafka_applied: None,
            slot_applied: HashMap::new(),
            batch_slot: None,
            barrier_connection: None,
            refill_through: None,
            expect_next: None,
            just_loaded: false,
            seeks: 0,
            starved_since: None,
            control,
        })
    }

    fn active(&self) -> bool {
        *self.control.borrow()
    }

    fn checkpoint_db(&self) -> Option<u32> {
        self.env.cfg.redis.select.then_some(0)
    }

    /// Sleeps unless the lane is revoked meanwhile.
    async fn pause(&mut self, d: Duration) -> Result<(), Stop> {
        tokio::select! {
            _ = tokio::time::sleep(d) => {}
            _ = self.control.changed() => {}
        }
        if self.active() {
            Ok(())
        } else {
            Err(Stop::Revoked)
        }
    }

    /// Runs a non-transactional command, retrying transient errors.
    async fn query(&mut self, args: &[Bytes]) -> Result<Value, Stop> {
        let mut stall = Stall::new(Duration::from_millis(20));
        loop {
            match self.target.query(args).await {
                Ok(v) => {
                    stall.ended(self);
                    return Ok(v);
                }
                Err(ApplyError::Transient { code, message }) => {
                    let what = String::from_utf8_lossy(&args[0]).into_owned();
                    stall.retry(self, &what, &code, &message).await?;
                }
                Err(e) => {
                    return Err(self.halt(&format!(
                        "partition {}: {} on the target failed: {e}",
                        self.partition,
                        String::from_utf8_lossy(&args[0])
                    )))
                }
            }
        }
    }

    /// A checkpoint hash: applied positions by source shard (barrier markers left out) and
    /// the Kafka offset they cover.
    async fn read_checkpoint(&mut self, key: Bytes) -> Result<Checkpoint, Stop> {
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
    async fn still_there(&mut self) -> Result<(), Stop> {
        if self.target.unverified() {
            self.verify_target().await?;
        }
        Ok(())
    }

    /// Loads the lane's checkpoint from the target: what it holds is where the lane goes on.
    pub async fn load(&mut self) -> Result<(), Stop> {
        let stored = self.read_checkpoint(self.key.clone()).await?;
        self.target.verified();
        self.applied = stored.positions.into_iter().collect();
        self.kafka_applied = stored.kafka_offset;
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
            self.slot_applied.clear();
            None
        };
        if let Some(from) = refill {
            self.expect_next = Some(self.expect_next.map_or(from, |e| e.min(from)));
        }
        self.refill_through = refill.and(stored.kafka_offset);
        tracing::info!(
            partition = self.partition,
            offset = ?self.kafka_applied,
            "lane starts; the target holds positions {:?} up to partition offset {:?}",
            self.applied
                .iter()
                .map(|(s, p)| format!("{s}={p}"))
                .collect::<Vec<_>>(),
            self.kafka_applied
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
    async fn verify_target(&mut self) -> Result<(), Stop> {
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
        let behind = match (self.kafka_applied, stored.kafka_offset) {
            (Some(applied), Some(held)) => held < applied,
            (Some(_), None) => true,
            (None, _) => false,
        } || self
            .applied
            .iter()
            .any(|(shard, p)| held.get(shard.as_str()).is_none_or(|h| h < p));
        let ahead = match (self.kafka_applied, stored.kafka_offset) {
            (applied, Some(held)) => applied.is_none_or(|a| held > a),
            (_, None) => false,
        } || held
            .iter()
            .any(|(shard, h)| self.applied.get(*shard).is_none_or(|p| h > p));
        if behind {
            tracing::error!(
                partition = self.partition,
                "target {} lost writes this lane had applied (it holds partition offset {:?}, positions {:?}; the lane applied up to offset {:?}): a restart without persistence or a failover to a lagging replica. Rewinding the partition to what the target holds.",
                self.target.address(),
                stored.kafka_offset,
                stored.positions,
                self.kafka_applied,
            );
        } else if ahead {
            tracing::warn!(
                partition = self.partition,
                "target {} holds partition offset {:?} but the lane only knew of {:?}: the last transaction ran although its reply was lost; going on after it",
                self.target.address(),
                stored.kafka_offset,
                self.kafka_applied,
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
    async fn lost_slots(&mut self, recorded: &[(u16, i64)]) -> Result<Option<i64>, Stop> {
        // Per slot: the positions applied since the last load, and the recorded offset.
        let mut knew: BTreeMap<u16, (HashMap<String, Position>, Option<i64>)> = BTreeMap::new();
        for (slot, applied) in std::mem::take(&mut self.slot_applied) {
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
            self.slot_applied.insert(slot, held);
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
    async fn refill_start(&mut self, slot: u16, held: Option<i64>) -> Result<i64, Stop> {
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
    async fn offsets_missing(&mut self, expected: i64, seen: i64) -> Result<bool, Stop> {
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
    async fn seek_to_checkpoint(&mut self) {
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
    async fn seek(&self, offset: i64) -> Result<(), String> {
        let partitions = Arc::clone(&self.env.partitions);
        let partition = self.partition;
        blocking(move || partitions.seek(partition, offset)).await
    }

    /// The partition's oldest offset and the offset after its newest (a consumer call, run on
    /// the blocking pool).
    async fn watermarks(&self) -> Result<(i64, i64), String> {
        let partitions = Arc::clone(&self.env.partitions);
        let partition = self.partition;
        blocking(move || partitions.watermarks(partition)).await
    }

    /// Called each time the lane has waited [`STARVED_AFTER`] for a message. Waiting is normal
    /// when the partition holds nothing past the lane's position; when it does, the consumer is
    /// not getting records the broker says it has (a broker that cannot answer a fetch within
    /// `fetch.wait.max.ms`, a network that drops fetch responses): warned once per episode, and
    /// `sink_fetch_starved` is 1 until a message arrives.
    async fn starved(&mut self) {
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
    fn fed(&mut self) {
        if let Some(since) = self.starved_since.take() {
            tracing::info!(
                partition = self.partition,
                "messages arrive again (none had come for {:?})",
                since.elapsed() + STARVED_AFTER
            );
            gauge!("sink_fetch_starved", "partition" => self.label.clone()).set(0.0);
        }
    }

    fn is_applied(&self, shard: &str, p: Position) -> bool {
        self.applied.get(shard).is_some_and(|a| p <= *a)
    }

    /// Cluster targets: whether `slot`'s checkpoint already covers `p` of `shard`.
    async fn slot_holds(
        &mut self,
        slot: Option<u16>,
        shard: &str,
        p: Position,
    ) -> Result<bool, Stop> {
        let Some(slot) = slot.filter(|_| self.target.slot_checkpoints()) else {
            return Ok(false);
        };
        if !self.slot_applied.contains_key(&slot) {
            let stored = self.read_checkpoint(self.slot_key(slot)).await?;
            self.slot_applied
                .insert(slot, stored.positions.into_iter().collect());
        }
        Ok(self.slot_applied[&slot].get(shard).is_some_and(|a| p <= *a))
    }

    /// Cluster targets: the checkpoint hash of `slot` for this lane.
    fn slot_key(&self, slot: u16) -> Bytes {
        Bytes::from(format!(
            "{}:{{{}}}",
            String::from_utf8_lossy(&self.key),
            crate::cluster::slot_tag(slot)
        ))
    }

    /// Where the checkpoint of what is being applied goes: the slot's hash on a cluster.
    fn batch_key(&self) -> Bytes {
        match self.batch_slot {
            Some(slot) => self.slot_key(slot),
            None => self.key.clone(),
        }
    }

    /// Records what a batch applied.
    fn note_applied(&mut self, positions: Vec<(String, Position)>) {
        if let Some(slot) = self.batch_slot {
            let held = self.slot_applied.entry(slot).or_default();
            for (shard, p) in &positions {
                held.insert(shard.clone(), *p);
            }
        }
        for (shard, p) in positions {
            self.applied.insert(shard, p);
        }
    }

    /// Processes a batch of consecutive messages of this partition.
    pub async fn process(&mut self, messages: Vec<Incoming>) -> Result<(), Stop> {
        let mut batch: Vec<Pending> = Vec::new();
        let mut last_offset = None;
        // The last heartbeat per source shard: once everything before it is applied, this lane
        // holds every write of its slots up to the heartbeat's replication offset.
        let mut heartbeats: HashMap<String, (Position, i64)> = HashMap::new();
        // The highest position per shard put into a batch during this call (applied since, or
        // still pending): what a replayed record must exceed.
        let mut batched: HashMap<String, Position> = HashMap::new();
        // Snapshots whose end marker this call applies: (shard, epoch).
        let mut snapshots_ended: Vec<(String, u64)> = Vec::new();
        let count = messages.len();
        for message in messages {
            if let Some(expected) = self.expect_next.filter(|e| message.offset() > *e) {
                if self.offsets_missing(expected, message.offset()).await? {
                    break;
                }
            }
            self.seeks = 0;
            self.expect_next = Some(message.offset() + 1);
            self.just_loaded = false;
            last_offset = Some(message.offset());
            let content_type = message.header(wire::HEADER_CONTENT_TYPE);
            let record = match wire::decode_buf(content_type, message.payload()) {
                Ok(r) => r,
                Err(e) => {
                    self.flush(&mut batch).await?;
                    let what = format!(
                        "topic {} partition {} offset {}: not a record this sink can read: {e}",
                        self.env.topic,
                        self.partition,
                        message.offset()
                    );
                    self.reject(&message, &what).await?;
                    continue;
                }
            };
            let shard = record.source_shard.clone();
            let position: Position = record.position.unwrap_or_default().into();
            let Some(body) = record.body else {
                continue;
            };
            if let Body::Heartbeat(_) = body {
                heartbeats.insert(shard, (position, record.capture_time_ms));
                continue;
            }
            let Some(body) = self.filter(record.db, body) else {
                counter!("sink_records_skipped_total", "partition" => self.label.clone(), "reason" => "filtered").increment(1);
                continue;
            };
            if let Some(through) = self.refill_through.filter(|t| message.offset() > *t) {
                tracing::info!(
                    partition = self.partition,
                    "the slots that lost writes are applied again up to offset {through}"
                );
                self.refill_through = None;
            }
            let slot = record.slot.and_then(|s| u16::try_from(s).ok());
            // On a cluster target a record of a slot is applied with that slot's checkpoint,
            // and the partition's follows: a record either covers is held (a crash between the
            // two leaves the slot's ahead). While slots that lost writes are applied again, the
            // partition's is ahead of them by design and the slot's alone decides. Barriers move
            // the partition checkpoints only: they are judged by those.
            let barrier = matches!(body, Body::Barrier(_));
            let by_slot = slot.filter(|_| self.target.slot_checkpoints() && !barrier);
            let held = match by_slot {
                Some(_) if self.refill_through.is_some() => {
                    self.slot_holds(slot, &shard, position).await?
                }
                Some(_) => {
                    self.is_applied(&shard, position)
                        || self.slot_holds(slot, &shard, position).await?
                }
                None => self.is_applied(&shard, position),
            };
            if let (true, Some(_), Body::Barrier(b)) = (held, self.refill_through, &body) {
                // Applied before the loss that is being repaired: an effect it had on the lost
                // slots cannot be restored from the topic.
                let cmds = self.filtered(convert::commands(&self.env.cfg, &b.commands));
                if !cmds.is_empty() {
                    self.flush(&mut batch).await?;
                    return self
                        .barrier_applied_before(
                            &shard,
                            position,
                            &message,
                            "this partition's checkpoint is past it",
                            &cmds,
                        )
                        .await;
                }
            }
            if held || batched.get(&shard).is_some_and(|b| position <= *b) {
                self.skipped_duplicates.increment(1);
                tracing::trace!(
                    partition = self.partition,
                    offset = message.offset(),
                    "skipping {position} of {shard}: already applied up to {:?}: {:?}",
                    self.applied.get(&shard),
                    body
                );
                continue;
            }
            let db = self.env.cfg.map_db(record.db);
            if let Some(n) = self
                .target
                .databases
                .filter(|&n| self.env.cfg.redis.select && db >= n)
            {
                self.flush(&mut batch).await?;
                let what = format!(
                    "partition {} offset {} position {position}: record for source db {} (target db {db}) but the target has {n} databases; map it with redis.db_map",
                    self.partition,
                    message.offset(),
                    record.db
                );
                self.reject(&message, &what).await?;
                self.checkpoint_only(&shard, position, message.offset())
                    .await?;
                continue;
            }
            let dbo = Some(db);
            let ops_of = |args: Vec<Args>| -> Vec<Op> {
                args.into_iter().map(|args| Op::data(dbo, args)).collect()
            };
            let ops = match body {
                Body::Barrier(barrier) => {
                    self.flush(&mut batch).await?;
                    self.barrier(
                        &shard,
                        position,
                        db,
                        barrier,
                        record.capture_time_ms,
                        &message,
                    )
                    .await?;
                    continue;
                }
                Body::SnapshotStart(s) => {
                    tracing::info!(partition = self.partition, shard = %shard, "snapshot of epoch {} begins (RDB version {}, source offset {})", position.epoch, s.rdb_version, s.repl_offset);
                    if self.env.cfg.apply.on_new_snapshot == NewSnapshot::Flush {
                        self.flush(&mut batch).await?;
                        self.clear_for_snapshot(&shard, position, &s, message.offset())
                            .await?;
                        continue;
                    }
                    Vec::new()
                }
                Body::SnapshotEnd(e) => {
                    snapshots_ended.push((shard.clone(), position.epoch));
                    tracing::info!(partition = self.partition, shard = %shard, "snapshot of epoch {} ends ({} keys in all partitions, {} function libraries)", position.epoch, e.keys, e.functions.len());
                    // Every lane loads the snapshot's libraries (REPLACE makes it idempotent),
                    // so a later FUNCTION barrier finds them whichever lane leads it.
                    ops_of(
                        e.functions
                            .iter()
                            .map(|f| vec![b("FUNCTION"), b("LOAD"), b("REPLACE"), f.code.clone()])
                            .collect(),
                    )
                }
                Body::KeyEntry(entry) => {
                    self.snapshot_keys.increment(1);
                    match convert::key_entry(&self.env.cfg, &entry, self.target.restore_max_version)
                    {
                        Ok(cmds) => ops_of(cmds),
                        Err(e) => {
                            self.flush(&mut batch).await?;
                            let what = format!(
                                "partition {} offset {}: {e}",
                                self.partition,
                                message.offset()
                            );
                            self.reject(&message, &what).await?;
                            self.checkpoint_only(&shard, position, message.offset())
                                .await?;
                            continue;
                        }
                    }
                }
                Body::KeyChunk(chunk) => ops_of(convert::key_chunk(&self.env.cfg, &chunk)),
                Body::Command(c) => ops_of(self.restorable(
                    self.filtered(convert::commands(&self.env.cfg, std::slice::from_ref(&c))),
                )),
                Body::Transaction(t) => ops_of(
                    self.restorable(self.filtered(convert::commands(&self.env.cfg, &t.commands))),
                ),
                Body::Heartbeat(_) => unreachable!("handled above"),
            };
            match batched.get_mut(&shard) {
                Some(b) => *b = position,
                None => {
                    batched.insert(shard.clone(), position);
                }
            }
            batch.push(Pending {
                offset: message.offset(),
                slot: record.slot.and_then(|s| u16::try_from(s).ok()),
                shard,
                position,
                capture_ms: record.capture_time_ms,
                ops,
                message,
            });
        }
        self.flush(&mut batch).await?;
        for (shard, epoch) in snapshots_ended {
            tracing::info!(partition = self.partition, shard = %shard, "snapshot of epoch {epoch} applied on this partition");
            gauge!("sink_snapshot_applied_epoch", "partition" => self.label.clone(), "shard" => shard)
                .set(epoch as f64);
        }
        for (shard, (position, capture_ms)) in heartbeats {
            self.caught_up(&shard, position, capture_ms);
        }
        histogram!("sink_batch_records", "partition" => self.label.clone()).record(count as f64);
        // Messages that applied nothing (heartbeats, replays, filtered records) move the
        // checkpoint's partition offset too (on an idle source about once a second): a restart
        // then does not go back over them, and once retention deletes them they are not taken
        // for records the target misses.
        if let Some(offset) = last_offset.filter(|o| self.kafka_applied < Some(*o)) {
            self.write_checkpoint(&[], offset).await?;
        }
        if let Some(offset) = last_offset {
            self.env.partitions.commit(self.partition, offset);
            gauge!("sink_consumed_offset", "partition" => self.label.clone()).set(offset as f64);
        }
        Ok(())
    }

    /// Publishes that this lane has applied everything of `shard` before a heartbeat: the
    /// cut-over signal (docs/runbook.md).
    fn caught_up(&self, shard: &str, position: Position, capture_ms: i64) {
        let labels = [
            ("partition", self.label.clone()),
            ("shard", shard.to_string()),
        ];
        gauge!("sink_caught_up_repl_offset", &labels).set(position.offset as f64);
        gauge!("sink_caught_up_timestamp_seconds", &labels).set(capture_ms as f64 / 1000.0);
        let lag = (service::now_ms() - capture_ms).max(0) as f64 / 1000.0;
        gauge!("sink_lag_seconds", "partition" => self.label.clone()).set(lag);
    }

    /// Rebuilds RESTOREs whose payload the target cannot read (a newer source version).
    fn restorable(&self, cmds: Vec<Args>) -> Vec<Args> {
        let mut out = Vec::with_capacity(cmds.len());
        for c in cmds {
            match convert::restore_fallback(&self.env.cfg, &c, self.target.restore_max_version) {
                Some(Ok(rebuilt)) => out.extend(rebuilt),
                Some(Err(e)) => {
                    // Leave it to the target, which will refuse it with its own error.
                    tracing::warn!(partition = self.partition, "cannot rebuild a RESTORE: {e}");
                    out.push(c);
                }
                None => out.push(c),
            }
        }
        out
    }

    /// The record as the filters leave it (`apply.include_keys`, …), or `None` when nothing of
    /// it is applied. Barriers and snapshot markers always go through (their coordination and
    /// positions matter), with their commands filtered.
    fn filter(&self, db: u32, body: Body) -> Option<Body> {
        let f = &self.env.filter;
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

    /// Drops FLUSHALL/FLUSHDB when the policy says so.
    fn filtered(&self, cmds: Vec<Args>) -> Vec<Args> {
        if self.env.cfg.apply.flush == FlushPolicy::Ignore {
            let before = cmds.len();
            let kept: Vec<Args> = cmds.into_iter().filter(|c| !convert::is_flush(c)).collect();
            if kept.len() < before {
                counter!("sink_records_skipped_total", "partition" => self.label.clone(), "reason" => "flush-ignored").increment(1);
            }
            return kept;
        }
        cmds
    }

    fn checkpoint_op(
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
    async fn checkpoint_only(
        &mut self,
        shard: &str,
        position: Position,
        kafka_offset: i64,
    ) -> Result<(), Stop> {
        self.write_checkpoint(&[(shard.to_owned(), position)], kafka_offset)
            .await
    }

    /// Writes `positions` and the partition offset they reach to the checkpoint, alone.
    async fn write_checkpoint(
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
        self.kafka_applied = Some(kafka_offset);
        Ok(())
    }

    /// Applies the pending records and their checkpoint in one transaction (on a cluster, one
    /// transaction per slot, then the partition's checkpoint).
    async fn flush(&mut self, batch: &mut Vec<Pending>) -> Result<(), Stop> {
        if self.target.slot_checkpoints() && !batch.is_empty() {
            return self.flush_slots(batch).await;
        }
        self.flush_one(batch).await
    }

    /// Cluster targets: the batch split by slot, each part applied with its slot's checkpoint;
    /// once all are in, the partition's checkpoint (where a restarted lane resumes) moves past
    /// the whole batch. Slots are independent, so applying them one after another keeps every
    /// slot's order.
    async fn flush_slots(&mut self, batch: &mut Vec<Pending>) -> Result<(), Stop> {
        let through = batch[batch.len() - 1].offset;
        let mut groups: Vec<(Option<u16>, Vec<Pending>)> = Vec::new();
        for p in batch.drain(..) {
            match groups.iter_mut().find(|(s, _)| *s == p.slot) {
                Some((_, g)) => g.push(p),
                None => groups.push((p.slot, vec![p])),
            }
        }
        let mut last: HashMap<String, Position> = HashMap::new();
        // The Kafka offset each slot's checkpoint reaches with this batch.
        let mut reached: Vec<(u16, i64)> = Vec::new();
        for (slot, mut group) in groups {
            for p in &group {
                let held = last.entry(p.shard.clone()).or_insert(p.position);
                *held = (*held).max(p.position);
            }
            if let Some(slot) = slot {
                reached.push((slot, group[group.len() - 1].offset));
            }
            self.batch_slot = slot;
            let result = self.flush_one(&mut group).await;
            self.batch_slot = None;
            result?;
        }
        let positions: Vec<(String, Position)> = last.into_iter().collect();
        let mut op = self.checkpoint_op(self.key.clone(), &positions, Some(through));
        for (slot, offset) in reached {
            op.args.push(Bytes::from(format!("{SLOT_FIELD}{slot}")));
            op.args.push(Bytes::from(offset.to_string()));
        }
        match self.apply(&[op]).await {
            Ok(()) | Err(ApplyFailure::Continue) => {}
            Err(ApplyFailure::Stop(s)) => return Err(s),
            Err(ApplyFailure::Record { error, .. }) => {
                return Err(self.halt(&format!("cannot write the checkpoint: {error}")))
            }
        }
        self.note_applied(positions);
        self.kafka_applied = Some(through);
        Ok(())
    }

    /// Applies records (all of one slot on a cluster) and their checkpoint in one transaction.
    async fn flush_one(&mut self, batch: &mut Vec<Pending>) -> Result<(), Stop> {
        while !batch.is_empty() {
            let mut ops: Vec<Op> = Vec::new();
            let mut owner: Vec<usize> = Vec::new();
            let mut last: HashMap<String, Position> = HashMap::new();
            for (i, p) in batch.iter().enumerate() {
                ops.extend(p.ops.iter().cloned());
                owner.extend(std::iter::repeat_n(i, p.ops.len()));
                last.insert(p.shard.clone(), p.position);
            }
            let positions: Vec<(String, Position)> = last.into_iter().collect();
            let through = batch[batch.len() - 1].offset;
            ops.push(self.checkpoint_op(self.batch_key(), &positions, Some(through)));
            let started = Instant::now();
            tracing::trace!(
                partition = self.partition,
                "applying offsets {}..={} positions {}..={}",
                batch[0].offset,
                batch[batch.len() - 1].offset,
                batch[0].position,
                batch[batch.len() - 1].position
            );
            match self.apply(&ops).await {
                Ok(()) | Err(ApplyFailure::Continue) => {
                    let now = service::now_ms();
                    for p in batch.iter() {
                        self.latency.record(p.capture_ms, &p.message, now);
                    }
                    let n_cmds: usize = batch.iter().map(|p| p.ops.len()).sum();
                    counter!("sink_records_applied_total", "partition" => self.label.clone())
                        .increment(batch.len() as u64);
                    counter!("sink_commands_applied_total", "partition" => self.label.clone())
                        .increment(n_cmds as u64);
                    histogram!("sink_apply_seconds", "partition" => self.label.clone())
                        .record(started.elapsed().as_secs_f64());
                    if let Some(p) = batch.last() {
                        gauge!("sink_applied_offset", "partition" => self.label.clone())
                            .set(p.offset as f64);
                        gauge!("sink_applied_repl_offset", "partition" => self.label.clone())
                            .set(p.position.offset as f64);
                        gauge!("sink_lag_seconds", "partition" => self.label.clone())
                            .set((now - p.capture_ms).max(0) as f64 / 1000.0);
                    }
                    self.note_applied(positions);
                    self.kafka_applied = Some(through);
                    batch.clear();
                }
                Err(ApplyFailure::Stop(s)) => return Err(s),
                Err(ApplyFailure::Record { op, error }) => {
                    // A permanent error that stopped the whole transaction: find its record.
                    let culprit = op.and_then(|i| owner.get(i).copied()).unwrap_or(0);
                    let p = batch.remove(culprit);
                    let what = format!(
                        "partition {} offset {} position {} (shard {}): the target refused the write: {error}",
                        self.partition, p.offset, p.position, p.shard
                    );
                    // Apply what came before it, then deal with it.
                    let mut before: Vec<Pending> = batch.drain(..culprit).collect();
                    Box::pin(self.flush_one(&mut before)).await?;
                    self.reject(&p.message, &what).await?;
                    self.checkpoint_only(&p.shard, p.position, p.offset).await?;
                }
            }
        }
        Ok(())
    }

    /// Applies ops atomically, retrying transient errors until they succeed.
    ///
    /// A target without transactions may run part of the ops before refusing one for now (OOM
    /// …): the retry starts at the refused op and goes on one op at a time, so the writes after
    /// it that had run already run again once, never more (at least once, docs/semantics.md).
    async fn apply(&mut self, ops: &[Op]) -> Result<(), ApplyFailure> {
        let mut stall = Stall::new(Duration::from_millis(10));
        let keep = self.env.cfg.apply.snapshot_conflict == Conflict::Keep;
        // Ops before `from` are done; after an interruption they are sent one at a time.
        let mut from = 0;
        let mut one_at_a_time = false;
        loop {
            if let Some(checked) = self
                .barrier_connection
                .filter(|c| *c != self.target.generation())
            {
                tracing::warn!(
                    partition = self.partition,
                    "the connection to the target {} changed (connection {} after {checked}) between reading the barrier's arrivals and applying it: reloading the checkpoint and reading them again",
                    self.target.address(),
                    self.target.generation()
                );
                self.barrier_connection = None;
                return Err(ApplyFailure::Stop(Stop::Rewind));
            }
            if self.target.unverified() {
                self.verify_target().await.map_err(ApplyFailure::Stop)?;
            }
            let to = if one_at_a_time { from + 1 } else { ops.len() };
            let part = &ops[from..to];
            let wait = self.env.limit.take(
                part.len(),
                part.iter()
                    .map(|o| o.args.iter().map(|a| a.len()).sum::<usize>())
                    .sum(),
            );
            if !wait.is_zero() {
                counter!("sink_rate_limited_milliseconds_total", "partition" => self.label.clone())
                    .increment(wait.as_millis() as u64);
                self.pause(wait).await.map_err(ApplyFailure::Stop)?;
            }
            let result = self.target.exec(part).await;
            let error = match result {
                Ok(results) => {
                    stall.ended(self);
                    if let Some(e) =
                        target::runtime_error(&results, |code| keep && code == "BUSYKEY")
                    {
                        // The transaction ran; one command failed inside it. Report it; the
                        // checkpoint moved with the rest of the batch.
                        return Err(ApplyFailure::Stop(self.halt_or_continue(&e).await?));
                    }
                    if to == ops.len() {
                        return Ok(());
                    }
                    from = to;
                    continue;
                }
                Err(e) => e,
            };
            match error {
                ApplyError::Transient { code, message } => {
                    stall
                        .retry(self, "the write", &code, &message)
                        .await
                        .map_err(ApplyFailure::Stop)?;
                }
                ApplyError::Interrupted {
                    done,
                    ran_after,
                    code,
                    message,
                } => {
                    if ran_after > 0 {
                        tracing::warn!(
                            partition = self.partition,
                            "the target (without transactions) refused a write for now ({code}) after which {ran_after} later writes of the batch ran: they run again after it (at least once)"
                        );
                        counter!("sink_writes_repeated_total", "partition" => self.label.clone())
                            .increment(ran_after as u64);
                    }
                    from += done;
                    one_at_a_time = true;
                    stall
                        .retry(self, "the write", &code, &message)
                        .await
                        .map_err(ApplyFailure::Stop)?;
                }
                e if e.is_authentication() => {
                    let what = format!("partition {}: {e}", self.partition);
                    return Err(ApplyFailure::Stop(self.halt(&what)));
                }
                ApplyError::Permanent {
                    code, message, op, ..
                } => {
                    return Err(ApplyFailure::Record {
                        op: op.map(|i| i + from),
                        error: format!("{code} {message}"),
                    });
                }
            }
        }
    }

    /// A command failed inside a transaction that ran: halt (default) or log and continue.
    async fn halt_or_continue(&mut self, e: &ApplyError) -> Result<Stop, ApplyFailure> {
        let what = format!(
            "partition {}: a command failed on the target inside an applied batch: {e}",
            self.partition
        );
        match self.env.cfg.apply.on_error {
            OnError::Halt => Ok(self.halt(&what)),
            OnError::DeadLetter => {
                tracing::error!(partition = self.partition, "{what}");
                counter!("sink_command_errors_total", "partition" => self.label.clone())
                    .increment(1);
                Err(ApplyFailure::Continue)
            }
        }
    }

    fn halt(&mut self, what: &str) -> Stop {
        tracing::error!(partition = self.partition, "lane halted: {what}");
        gauge!("sink_lane_halted", "partition" => self.label.clone()).set(1.0);
        self.env
            .health
            .fail(&format!("lane-{}", self.partition), what);
        Stop::Halted(what.to_owned())
    }

    /// A record that cannot be applied: dead-letter it or halt the lane.
    async fn reject(&mut self, message: &Incoming, what: &str) -> Result<(), Stop> {
        match (&self.env.cfg.apply.on_error, &self.env.dead_letter) {
            (OnError::DeadLetter, Some(producer)) => {
                let topic = self
                    .env
                    .cfg
                    .apply
                    .dead_letter_topic
                    .clone()
                    .unwrap_or_default();
                let headers = message
                    .headers()
                    .fold(OwnedHeaders::new(), |headers, (key, value)| {
                        headers.insert(rdkafka::message::Header { key, value })
                    })
                    .insert(rdkafka::message::Header {
                        key: "redis-repl-error",
                        value: Some(what),
                    })
                    .insert(rdkafka::message::Header {
                        key: "redis-repl-origin",
                        value: Some(&format!(
                            "{}/{}/{}",
                            self.env.topic,
                            self.partition,
                            message.offset()
                        )),
                    });
                let payload = message.payload();
                let mut record = FutureRecord::to(&topic)
                    .payload(&payload[..])
                    .headers(headers);
                if let Some(k) = message.key() {
                    record = record.key(k);
                }
                producer
                    .send(record, Duration::from_secs(30))
                    .await
                    .map_err(|(e, _)| {
                        self.halt(&format!(
                            "{what}; and the dead-letter topic {topic} refused it: {e}"
                        ))
                    })?;
                counter!("sink_dead_lettered_total", "partition" => self.label.clone())
                    .increment(1);
                tracing::error!(
                    partition = self.partition,
                    "dead-lettered to {topic}: {what}"
                );
                Ok(())
            }
            _ => Err(self.halt(what)),
        }
    }

    /// A barrier: applied once, after every involved partition has applied everything before
    /// it, and before any applies what follows. The lowest involved partition's lane leads: it
    /// waits until every other involved lane has written its arrival marker into its own
    /// checkpoint hash, then applies the commands and advances every involved checkpoint in the
    /// same transaction. The others wait until their checkpoint shows the barrier applied. All
    /// state is in the target, so this works across sink processes too.
    async fn barrier(
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
        let cmds = self.filtered(convert::commands(&self.env.cfg, &barrier.commands));
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
            self.applied.insert(shard.to_owned(), position);
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
                Some(message.offset())
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
        self.applied.insert(shard.to_owned(), position);
        self.flushed(flushes);
        histogram!("sink_barrier_wait_seconds", "partition" => self.label.clone())
            .record(started.elapsed().as_secs_f64());
        self.latency.record(capture_ms, message, service::now_ms());
        counter!("sink_records_applied_total", "partition" => self.label.clone()).increment(1);
        Ok(())
    }

    /// `FLUSHALL`/`FLUSHDB` from one shard of a cluster source concern only the keys of the
    /// slots that shard served: they become `UNLINK`s of the target's keys in those slots (in the
    /// record's db; checkpoint hashes kept). Function loads replace (see `replace_loads`). Every involved lane waits at this barrier, so no
    /// write to these slots can slip in between the scan and the transaction.
    async fn scoped_flushes(
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

    /// The target's keys with their db: of `db`, or of every db that holds keys (`None`),
    /// retrying transient errors.
    async fn target_keys(&mut self, db: Option<u32>) -> Result<Vec<(u32, Bytes)>, Stop> {
        let mut stall = Stall::new(Duration::from_millis(200));
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

    /// `apply.on_new_snapshot = "flush"`: before a snapshot, delete the target's keys in this
    /// partition's slots (within the shard's scope for a cluster source), in every db, so keys
    /// deleted on the source while the link was down do not survive the resync. Done once per
    /// snapshot: the deletes and the snapshot-start position go in one transaction.
    async fn clear_for_snapshot(
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
        self.kafka_applied = Some(offset);
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

    /// The position a checkpoint hash holds for `shard` (the checkpoint db must be selected).
    async fn stored_position(&mut self, key: Bytes, shard: &str) -> Result<Option<Position>, Stop> {
        let v = self
            .query(&[b("HGET"), key, Bytes::from(shard.to_owned())])
            .await?;
        Ok(match v {
            Value::BulkString(s) => Position::parse(&String::from_utf8_lossy(&s)),
            _ => None,
        })
    }

    /// After a flush barrier: the flush erased the cluster target's slot checkpoints with the
    /// data (the partition checkpoints are written again in its transaction), so what this lane
    /// knew of them is void. Kept, a reconnection would take every slot it wrote to before the
    /// flush for a slot whose master lost writes, and apply the partition again from its start,
    /// bringing back keys the flush deleted.
    fn flushed(&mut self, flushes: bool) {
        if flushes {
            self.slot_applied.clear();
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
    async fn barrier_applied_before(
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
        self.checkpoint_only(shard, position, message.offset())
            .await
    }

    /// A barrier some involved partition will never reach: the source connector stopped while
    /// publishing its copies, and the next sync was a full resync (a new epoch), so the copies
    /// that did arrive are orphans — the leader would wait for a partition that has moved on, or
    /// followers for a leader that never saw it. The new epoch's snapshot supersedes the barrier
    /// as it supersedes every write of the old epoch after the resync point; the lane records it
    /// as done and goes on.
    async fn abandon_barrier(
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
        self.checkpoint_only(shard, position, message.offset())
            .await
    }

    /// Non-transactional checkpoint reads and writes happen in db 0 when SELECT is allowed.
    async fn with_checkpoint_db(&mut self) -> Result<(), Stop> {
        if let Some(db) = self.checkpoint_db() {
            self.target_select(db).await?;
        }
        Ok(())
    }

    async fn target_select(&mut self, db: u32) -> Result<(), Stop> {
        self.query(&[b("SELECT"), Bytes::from(db.to_string())])
            .await?;
        Ok(())
    }
}

/// `UNLINK`s of `keys`, 512 keys per command.
fn unlinks(keys: &[Bytes]) -> impl Iterator<Item = Args> + '_ {
    keys.chunks(512).map(|chunk| {
        std::iter::once(b("UNLINK"))
            .chain(chunk.iter().cloned())
            .collect()
    })
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

/// Why a transaction did not go through.
enum ApplyFailure {
    Stop(Stop),
    /// A permanent error of one record, which stopped the whole transaction (`op` indexes the
    /// ops given to `apply`).
    Record {
        op: Option<usize>,
        error: String,
    },
    /// A command failed inside an applied transaction and the policy says go on.
    Continue,
}

impl From<Stop> for ApplyFailure {
    fn from(s: Stop) -> Self {
        ApplyFailure::Stop(s)
    }
}

/// Runs a lane for one partition until the process stops. `busy` is true while the lane may
/// write to the target; a revocation waits until it is false.
pub async fn run(
    mut lane: Lane,
    queue: rdkafka::consumer::stream_consumer::StreamPartitionQueue<crate::run::Context>,
    busy: Arc<std::sync::atomic::AtomicBool>,
    batch_records: usize,
) {
    use futures_util::FutureExt;
    use std::sync::atomic::Ordering::SeqCst;
    let mut rewound = false;
    loop {
        busy.store(true, SeqCst);
        if !lane.active() {
            busy.store(false, SeqCst);
            if lane.control.changed().await.is_err() {
                return;
            }
            continue;
        }
        gauge!("sink_lane_halted", "partition" => lane.label.clone()).set(0.0);
        lane.env
            .health
            .ok(&format!("lane-{}", lane.partition), "assigned");
        let mut result = lane.load().await;
        if rewound && result.is_ok() {
            lane.seek_to_checkpoint().await;
        }
        while result.is_ok() {
            let first = tokio::select! {
                m = queue.recv() => m,
                _ = lane.control.changed() => {
                    if lane.active() { continue; }
                    result = Err(Stop::Revoked);
                    break;
                }
                _ = tokio::time::sleep(STARVED_AFTER) => {
                    lane.starved().await;
                    continue;
                }
            };
            lane.fed();
            let taken_ms = service::now_ms();
            let mut messages = Vec::new();
            match first {
                Ok(m) => messages.push(Incoming::new(&m, taken_ms)),
                Err(e) => {
                    tracing::warn!(partition = lane.partition, "Kafka: {e}");
                    continue;
                }
            }
            let mut bytes = messages[0].payload().len();
            while messages.len() < batch_records && bytes < 8 << 20 {
                match queue.recv().now_or_never() {
                    Some(Ok(m)) => {
                        bytes += m.payload().map_or(0, <[u8]>::len);
                        messages.push(Incoming::new(&m, taken_ms));
                    }
                    _ => break,
                }
            }
            result = lane.process(messages).await;
        }
        rewound = matches!(result, Err(Stop::Rewind));
        if let Err(Stop::Revoked) = result {
            // Another sink may hold the partition meanwhile: what this lane knew of the slot
            // checkpoints is void (a flush there erases them; a loss while no lane of this
            // partition ran is found from the partition checkpoint's records instead).
            lane.slot_applied.clear();
        }
        if let Err(Stop::Halted(_)) = result {
            // Stay halted until the partition is revoked (a restart or rebalance retries).
            busy.store(false, SeqCst);
            while lane.active() {
                if lane.control.changed().await.is_err() {
                    return;
                }
            }
        }
        lane.env.health.remove(&format!("lane-{}", lane.partition));
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
