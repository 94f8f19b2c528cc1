//! One ordered lane per partition: read records in order, turn them into commands, and apply
//! them to the target together with the lane's checkpoint in one `MULTI/EXEC`.
//!
//! - [`consume`]: the partition's offsets against what the target holds;
//! - [`plan`]: what a record means for the lane (pure);
//! - [`apply`]: transactions, retries, dead letters;
//! - [`checkpoint`]: the lane's checkpoint in the target;
//! - [`barrier`]: records on several partitions, applied once;
//! - [`snapshot`]: clearing the target before a new snapshot.
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

mod apply;
mod barrier;
mod checkpoint;
mod consume;
mod plan;
mod snapshot;

pub use checkpoint::checkpoint_key;
pub use consume::{store_offset, Partitions};

use apply::Latency;
use apply::Stall;
use consume::STARVED_AFTER;
use plan::{Knowledge, Planned, Rules, SnapshotPart, Step};

use crate::config::Config;
use crate::filter::{Filter, RateLimit};
use crate::incoming::{Decoded, Incoming};
use crate::target::{ApplyError, Op, Target};
use bytes::Bytes;
use metrics::{counter, gauge, histogram};
use proto::Position;
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use redis::Value;
use service::http::Health;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Most bytes of messages a lane takes from its partition's queue at once (one message, however
/// big, is always taken): with the prefetch, what bounds the records a lane holds.
const INTAKE_BYTES: usize = 256 << 10;

/// A transaction is cut once its commands hold this many bytes (or `apply.batch_records`
/// records): it is copied twice more on its way to the socket, so big values must not pile up in
/// one. With 8 MiB intakes and no byte bound, a snapshot of 8 MB strings (512 KiB pieces) took
/// the sink to 146-162 MB; with these bounds 86-96 MB
/// (`pipeline.rs::sink_snapshot_of_big_values_stays_within_128_mb`).
const TRANSACTION_BYTES: usize = 256 << 10;

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
    /// What the target holds, as far as the lane knows.
    known: Knowledge,
    /// Cluster targets: the slot whose records are being flushed; their checkpoint goes to that
    /// slot's hash instead of the partition's.
    batch_slot: Option<u16>,
    /// A barrier leader about to apply: the connection ([`Target::generation`]) it read the
    /// other lanes' arrivals on.
    barrier_connection: Option<u64>,
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
    /// Metrics recorded per record or per transaction, registered once.
    hot: HotMetrics,
    latency: Latency,
}

/// A lane's metrics recorded per record or per transaction: registered once instead of looked
/// up (with a label allocated) each time.
#[derive(Debug)]
struct HotMetrics {
    skipped_duplicates: metrics::Counter,
    snapshot_keys: metrics::Counter,
    records_applied: metrics::Counter,
    commands_applied: metrics::Counter,
    apply_seconds: metrics::Histogram,
    applied_offset: metrics::Gauge,
    applied_repl_offset: metrics::Gauge,
    lag_seconds: metrics::Gauge,
    batch_records: metrics::Histogram,
    consumed_offset: metrics::Gauge,
}

impl HotMetrics {
    fn new(label: &str) -> HotMetrics {
        let p = || label.to_owned();
        HotMetrics {
            skipped_duplicates: counter!("sink_records_skipped_total", "partition" => p(), "reason" => "duplicate"),
            snapshot_keys: counter!("sink_snapshot_keys_total", "partition" => p()),
            records_applied: counter!("sink_records_applied_total", "partition" => p()),
            commands_applied: counter!("sink_commands_applied_total", "partition" => p()),
            apply_seconds: histogram!("sink_apply_seconds", "partition" => p()),
            applied_offset: gauge!("sink_applied_offset", "partition" => p()),
            applied_repl_offset: gauge!("sink_applied_repl_offset", "partition" => p()),
            lag_seconds: gauge!("sink_lag_seconds", "partition" => p()),
            batch_records: histogram!("sink_batch_records", "partition" => p()),
            consumed_offset: gauge!("sink_consumed_offset", "partition" => p()),
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
            hot: HotMetrics::new(&label),
            latency: Latency::new(),
            label,
            env,
            partition,
            target,
            key,
            known: Knowledge::default(),
            batch_slot: None,
            barrier_connection: None,
            expect_next: None,
            just_loaded: false,
            seeks: 0,
            starved_since: None,
            control,
        })
    }

    pub(super) fn active(&self) -> bool {
        *self.control.borrow()
    }

    pub(super) fn checkpoint_db(&self) -> Option<u32> {
        self.env.cfg.redis.select.then_some(0)
    }

    /// Sleeps unless the lane is revoked meanwhile.
    pub(super) async fn pause(&mut self, d: Duration) -> Result<(), Stop> {
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
    pub(super) async fn query(&mut self, args: &[Bytes]) -> Result<Value, Stop> {
        let mut stall = Stall::new(self, Duration::from_millis(20));
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

    /// Processes consecutive records of this partition (see [`Incoming::read_records`]),
    /// taking them out of `records`.
    pub async fn process(&mut self, records: &mut Vec<(Incoming, Decoded)>) -> Result<(), Stop> {
        let count = records.len();
        let mut batch: Vec<Pending> =
            Vec::with_capacity(count.min(self.env.cfg.apply.batch_records));
        // The bytes of the commands in `batch`.
        let mut batch_bytes = 0;
        let mut last_offset = None;
        // The last heartbeat per source shard: once everything before it is applied, this lane
        // holds every write of its slots up to the heartbeat's replication offset.
        let mut heartbeats: HashMap<String, (Position, i64)> = HashMap::new();
        // The highest position per shard put into a batch during this call (applied since, or
        // still pending): what a replayed record must exceed.
        let mut batched: HashMap<String, Position> = HashMap::new();
        // Snapshots whose end marker this call applies: (shard, epoch).
        let mut snapshots_ended: Vec<(String, u64)> = Vec::new();
        for (message, decoded) in records.drain(..) {
            if let Some(expected) = self.expect_next.filter(|e| message.offset() > *e) {
                if self.offsets_missing(expected, message.offset()).await? {
                    break;
                }
            }
            self.seeks = 0;
            // Past a batch's last record, the next message; before it, the rest of this one
            // (if processing stops here, the next message shows the gap and the lane reads
            // this one again).
            self.expect_next = Some(message.covers() + 1);
            self.just_loaded = false;
            last_offset = Some(message.covers());
            let record = match decoded {
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
            if let Some(through) = self.known.refill_through.filter(|t| message.offset() > *t) {
                tracing::info!(
                    partition = self.partition,
                    "the slots that lost writes are applied again up to offset {through}"
                );
                self.known.refill_through = None;
            }
            if let Some(slot) = self.known.slot_to_read(&self.rules(), &record) {
                self.read_slot(slot).await?;
            }
            let planned = self
                .known
                .plan(&self.rules(), &batched, record, message.offset());
            let Planned {
                shard,
                position,
                slot,
                capture_ms,
                db,
                step,
            } = planned;
            match step {
                Step::Nothing => {}
                Step::Heartbeat => {
                    heartbeats.insert(shard, (position, capture_ms));
                }
                Step::Filtered => {
                    counter!("sink_records_skipped_total", "partition" => self.label.clone(), "reason" => "filtered").increment(1);
                }
                Step::Duplicate => {
                    self.hot.skipped_duplicates.increment(1);
                    tracing::trace!(
                        partition = self.partition,
                        offset = message.offset(),
                        "skipping {position} of {shard}: already applied up to {:?}",
                        self.known.applied.get(&shard),
                    );
                }
                Step::AppliedBefore(cmds) => {
                    self.flush(&mut batch).await?;
                    let why = "this partition's checkpoint is past it";
                    return self
                        .barrier_applied_before(&shard, position, &message, why, &cmds)
                        .await;
                }
                Step::Reject(what) => {
                    self.flush(&mut batch).await?;
                    self.reject(&message, &what).await?;
                    self.checkpoint_only(&shard, position, message.covers())
                        .await?;
                }
                Step::Barrier(barrier) => {
                    self.flush(&mut batch).await?;
                    self.barrier(&shard, position, db, barrier, capture_ms, &message)
                        .await?;
                }
                Step::ClearForSnapshot(start) => {
                    self.flush(&mut batch).await?;
                    self.clear_for_snapshot(&shard, position, &start, message.covers())
                        .await?;
                }
                Step::Apply { ops, snapshot } => {
                    match snapshot {
                        Some(SnapshotPart::Key) => self.hot.snapshot_keys.increment(1),
                        Some(SnapshotPart::End) => {
                            snapshots_ended.push((shard.clone(), position.epoch))
                        }
                        None => {}
                    }
                    apply::note_position(&mut batched, &shard, position);
                    if batch.is_empty() {
                        batch_bytes = 0;
                    }
                    batch_bytes += ops
                        .iter()
                        .flat_map(|o| o.args.iter().map(Bytes::len))
                        .sum::<usize>();
                    batch.push(Pending {
                        offset: message.covers(),
                        slot,
                        shard,
                        position,
                        capture_ms,
                        ops,
                        message,
                    });
                    // One message may hold more records than a transaction takes.
                    if batch.len() >= self.env.cfg.apply.batch_records
                        || batch_bytes >= TRANSACTION_BYTES
                    {
                        self.flush(&mut batch).await?;
                    }
                }
            }
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
        self.hot.batch_records.record(count as f64);
        // Messages that applied nothing (heartbeats, replays, filtered records) move the
        // checkpoint's partition offset too (on an idle source about once a second): a restart
        // then does not go back over them, and once retention deletes them they are not taken
        // for records the target misses.
        if let Some(offset) = last_offset.filter(|o| self.known.kafka_applied < Some(*o)) {
            self.write_checkpoint(&[], offset).await?;
        }
        if let Some(offset) = last_offset {
            self.env.partitions.commit(self.partition, offset);
            self.hot.consumed_offset.set(offset as f64);
        }
        Ok(())
    }

    /// What planning needs of the configuration and the target (see [`plan`]).
    fn rules(&self) -> Rules<'_> {
        Rules {
            cfg: &self.env.cfg,
            filter: &self.env.filter,
            partition: self.partition,
            label: &self.label,
            slot_checkpoints: self.target.slot_checkpoints(),
            databases: self.target.databases,
            restore_max_version: self.target.restore_max_version,
        }
    }

    /// Publishes that this lane has applied everything of `shard` before a heartbeat: the
    /// cut-over signal (docs/runbook.md).
    pub(super) fn caught_up(&self, shard: &str, position: Position, capture_ms: i64) {
        let labels = [
            ("partition", self.label.clone()),
            ("shard", shard.to_string()),
        ];
        gauge!("sink_caught_up_repl_offset", &labels).set(position.offset as f64);
        gauge!("sink_caught_up_timestamp_seconds", &labels).set(capture_ms as f64 / 1000.0);
        let lag = (service::now_ms() - capture_ms).max(0) as f64 / 1000.0;
        self.hot.lag_seconds.set(lag);
    }

    pub(super) fn halt(&mut self, what: &str) -> Stop {
        tracing::error!(partition = self.partition, "lane halted: {what}");
        gauge!("sink_lane_halted", "partition" => self.label.clone()).set(1.0);
        self.env
            .health
            .fail(&format!("lane-{}", self.partition), what);
        Stop::Halted(what.to_owned())
    }
}

/// Runs a lane for one partition until the process stops. `busy` is true while the lane may
/// write to the target; a revocation waits until it is false.
pub async fn run<C: rdkafka::consumer::ConsumerContext + 'static>(
    mut lane: Lane,
    queue: rdkafka::consumer::stream_consumer::StreamPartitionQueue<C>,
    busy: Arc<std::sync::atomic::AtomicBool>,
    batch_records: usize,
) {
    use futures_util::FutureExt;
    use std::sync::atomic::Ordering::SeqCst;
    let mut rewound = false;
    // The records of one intake, kept across intakes with their capacity.
    let mut records = Vec::new();
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
            let mut bytes = match first {
                Ok(m) => {
                    records.clear();
                    Incoming::read_records(&m, taken_ms, &mut records);
                    m.payload().map_or(0, <[u8]>::len)
                }
                Err(e) => {
                    tracing::warn!(partition = lane.partition, "Kafka: {e}");
                    continue;
                }
            };
            while records.len() < batch_records && bytes < INTAKE_BYTES {
                match queue.recv().now_or_never() {
                    Some(Ok(m)) => {
                        bytes += m.payload().map_or(0, <[u8]>::len);
                        Incoming::read_records(&m, taken_ms, &mut records);
                    }
                    _ => break,
                }
            }
            result = lane.process(&mut records).await;
        }
        rewound = matches!(result, Err(Stop::Rewind));
        if let Err(Stop::Revoked) = result {
            // Another sink may hold the partition meanwhile: what this lane knew of the slot
            // checkpoints is void (a flush there erases them; a loss while no lane of this
            // partition ran is found from the partition checkpoint's records instead).
            lane.known.slot_applied.clear();
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
