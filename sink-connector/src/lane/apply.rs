//! Writing to the target: pending records and their checkpoint in one transaction (one per
//! slot on a cluster), retried while the target refuses for now, and a record the target
//! refuses for good dead-lettered or halting the lane.

use super::checkpoint::SLOT_FIELD;
use super::{Lane, Pending, Stop};
use crate::config::{Conflict, OnError};
use crate::incoming::Incoming;
use crate::target::{self, ApplyError, Op};
use bytes::Bytes;
use metrics::{counter, gauge};
use proto::Position;
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::FutureRecord;
use service::backoff::Backoff;
use service::latency;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Records' latencies, capture → applied, whole and by stage: counted per record, added to the
/// histograms once per transaction ([`service::latency`]).
#[derive(Debug)]
pub(super) struct Latency {
    end_to_end: Stage,
    /// Capture → the message's Kafka timestamp: the source connector's share.
    source: Stage,
    /// Kafka timestamp → taken by the lane: the producer's batching, the broker and the fetch.
    kafka: Stage,
    /// Taken by the lane → applied: decoding, batching, barriers, retries and the write.
    sink: Stage,
}

#[derive(Debug)]
struct Stage {
    histogram: latency::Histogram,
    tally: latency::Tally,
}

impl Stage {
    fn new(histogram: latency::Histogram) -> Stage {
        Stage {
            histogram,
            tally: latency::Tally::default(),
        }
    }
}

impl Latency {
    pub(super) fn new() -> Latency {
        let stage = |s: &str| {
            Stage::new(latency::Histogram::register(
                "sink_stage_latency_seconds",
                &[("stage", s)],
            ))
        };
        Latency {
            end_to_end: Stage::new(latency::Histogram::register("sink_end_to_end_seconds", &[])),
            source: stage("source"),
            kafka: stage("kafka"),
            sink: stage("sink"),
        }
    }

    /// A record captured at `capture_ms`, carried by `message`, applied at `applied_ms`.
    pub(super) fn record(&mut self, capture_ms: i64, message: &Incoming, applied_ms: i64) {
        self.end_to_end.tally.record_ms(applied_ms - capture_ms);
        if let Some(kafka_ms) = message.kafka_ms() {
            self.source.tally.record_ms(kafka_ms - capture_ms);
            self.kafka.tally.record_ms(message.taken_ms() - kafka_ms);
        }
        self.sink.tally.record_ms(applied_ms - message.taken_ms());
    }

    /// Adds what [`Latency::record`] counted to the histograms.
    pub(super) fn publish(&mut self) {
        for s in [
            &mut self.end_to_end,
            &mut self.source,
            &mut self.kafka,
            &mut self.sink,
        ] {
            s.histogram.add(&mut s.tally);
        }
    }
}

/// A lane retrying something the target refuses for now (`OOM`, `LOADING`, `READONLY`, a lost
/// connection…): capped exponential backoff with jitter, until it succeeds. The stall shows in
/// `sink_lane_stalled`, `sink_lane_stalled_seconds` and `sink_retries_total`, with a warning
/// when it begins, again every retry once it has lasted 10 s at the capped backoff, and a line
/// when it ends.
#[derive(Debug)]
pub(super) struct Stall {
    since: Option<Instant>,
    backoff: Backoff,
}

impl Stall {
    /// Waits `first` after the first refusal, up to `apply.max_backoff_ms`.
    pub(super) fn new(lane: &Lane, first: Duration) -> Stall {
        let max = Duration::from_millis(lane.env.cfg.apply.max_backoff_ms);
        Stall {
            since: None,
            backoff: Backoff::new(first, max),
        }
    }

    /// Counts a refused attempt at `what` and waits before the next one. A revoked lane stops
    /// waiting and leaves the stall.
    pub(super) async fn retry(
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
        if since.elapsed() > Duration::from_secs(10) && self.backoff.capped() {
            tracing::warn!(
                partition,
                "still stalled after {:?}: {code} {message}",
                since.elapsed()
            );
        }
        let paused = lane.pause(self.backoff.next_wait()).await;
        if paused.is_err() {
            self.clear(lane);
        }
        paused
    }

    /// The target took it: the stall, if any, is over.
    pub(super) fn ended(&mut self, lane: &Lane) {
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

/// Why a transaction did not go through.
pub(super) enum ApplyFailure {
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

impl Lane {
    /// Applies the pending records and their checkpoint in one transaction (on a cluster, one
    /// transaction per slot, then the partition's checkpoint).
    pub(super) async fn flush(&mut self, batch: &mut Vec<Pending>) -> Result<(), Stop> {
        if self.target.slot_checkpoints() && !batch.is_empty() {
            return self.flush_slots(batch).await;
        }
        self.flush_one(batch).await
    }

    /// Cluster targets: the batch split by slot, each part applied with its slot's checkpoint;
    /// once all are in, the partition's checkpoint (where a restarted lane resumes) moves past
    /// the whole batch. Slots are independent, so applying them one after another keeps every
    /// slot's order.
    pub(super) async fn flush_slots(&mut self, batch: &mut Vec<Pending>) -> Result<(), Stop> {
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
        self.known.kafka_applied = Some(through);
        Ok(())
    }

    /// Applies records (all of one slot on a cluster) and their checkpoint in one transaction.
    pub(super) async fn flush_one(&mut self, batch: &mut Vec<Pending>) -> Result<(), Stop> {
        while !batch.is_empty() {
            // The records' ops are moved into the transaction (and back if it fails for one).
            let mut ops: Vec<Op> = Vec::new();
            let mut owner: Vec<usize> = Vec::new();
            let mut last: HashMap<String, Position> = HashMap::new();
            for (i, p) in batch.iter_mut().enumerate() {
                owner.extend(std::iter::repeat_n(i, p.ops.len()));
                ops.append(&mut p.ops);
                note_position(&mut last, &p.shard, p.position);
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
                    self.latency.publish();
                    let n_cmds = owner.len();
                    self.hot.records_applied.increment(batch.len() as u64);
                    self.hot.commands_applied.increment(n_cmds as u64);
                    self.hot
                        .apply_seconds
                        .record(started.elapsed().as_secs_f64());
                    if let Some(p) = batch.last() {
                        self.hot.applied_offset.set(p.offset as f64);
                        self.hot.applied_repl_offset.set(p.position.offset as f64);
                        self.hot
                            .lag_seconds
                            .set((now - p.capture_ms).max(0) as f64 / 1000.0);
                    }
                    self.note_applied(positions);
                    self.known.kafka_applied = Some(through);
                    batch.clear();
                }
                Err(ApplyFailure::Stop(s)) => return Err(s),
                Err(ApplyFailure::Record { op, error }) => {
                    for (op, &i) in ops.into_iter().zip(&owner) {
                        batch[i].ops.push(op);
                    }
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
    pub(super) async fn apply(&mut self, ops: &[Op]) -> Result<(), ApplyFailure> {
        let mut stall = Stall::new(self, Duration::from_millis(10));
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
    pub(super) async fn halt_or_continue(&mut self, e: &ApplyError) -> Result<Stop, ApplyFailure> {
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

    /// A record that cannot be applied: dead-letter it or halt the lane.
    pub(super) async fn reject(&mut self, message: &Incoming, what: &str) -> Result<(), Stop> {
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
}

/// Notes `position` as `shard`'s latest, allocating the shard's name only the first time.
pub(super) fn note_position(last: &mut HashMap<String, Position>, shard: &str, position: Position) {
    match last.get_mut(shard) {
        Some(held) => *held = position,
        None => {
            last.insert(shard.to_owned(), position);
        }
    }
}
