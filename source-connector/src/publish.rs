//! Publishing records to Kafka and tracking what Kafka has durably acknowledged.
//!
//! Records are produced in replication order through one idempotent producer (`acks=all`), so
//! each partition receives them in order. Consecutive records of a partition share one Kafka
//! message (a `RecordBatch`, ADR 0013): [`Publisher::publish`] adds a record to its partitions'
//! open batches, and [`Publisher::send`] — called by the reader whenever it has consumed what it
//! read, before it waits for more — produces them, so a batch never waits for input that has not
//! arrived. One send is one *round*: its messages carry the round's sequence number as
//! librdkafka's delivery opaque, and the producer's delivery callback counts the
//! acknowledgements in [`Deliveries`] and advances the acknowledged [`Mark`]: a mark moves only
//! when its round and every round before it are acknowledged on every partition. Memory is
//! bounded by `max_in_flight_bytes`: when Kafka is slow or down, [`Publisher::publish`] waits,
//! which stops the caller from reading Redis.

use crate::records::{Mark, Outgoing};
use metrics::{counter, gauge, histogram, Counter, Gauge, Histogram};
use proto::topic;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{oneshot, watch, Semaphore};

/// Settings every producer gets (the operator's `kafka.properties` may add to them, but not
/// weaken delivery: these are applied last).
pub const PRODUCER_GUARANTEES: &[(&str, &str)] = &[
    ("enable.idempotence", "true"),
    ("acks", "all"),
    // Never give up on a record: a broker outage stalls the connector instead of losing data.
    ("message.timeout.ms", "0"),
];

/// Defaults the operator may override.
pub const PRODUCER_DEFAULTS: &[(&str, &str)] = &[
    ("linger.ms", "5"),
    ("batch.size", "1000000"),
    ("queue.buffering.max.kbytes", "262144"),
    ("max.in.flight.requests.per.connection", "5"),
    ("socket.timeout.ms", "10000"),
];

/// The producer the connector uses: librdkafka's delivery reports go to [`Deliveries`].
pub type KafkaProducer = ThreadedProducer<Deliveries>;

fn producer_config(cfg: &crate::config::KafkaConfig) -> rdkafka::ClientConfig {
    let mut c =
        service::kafka::client_config(&cfg.bootstrap_servers, PRODUCER_DEFAULTS, &cfg.properties);
    c.set("compression.type", &cfg.compression);
    for (k, v) in PRODUCER_GUARANTEES {
        c.set(*k, *v);
    }
    c
}

fn creation_error(cfg: &crate::config::KafkaConfig, e: KafkaError) -> anyhow::Error {
    anyhow::anyhow!(
        "cannot create Kafka producer for {}: {e}",
        cfg.bootstrap_servers
    )
}

/// Creates one shard's producer.
pub fn producer(cfg: &crate::config::KafkaConfig, shard: &str) -> anyhow::Result<KafkaProducer> {
    producer_config(cfg)
        .create_with_context(Deliveries::new(shard, cfg.max_in_flight_bytes))
        .map_err(|e| creation_error(cfg, e))
}

/// Fails when librdkafka rejects the producer settings (an unknown or invalid property).
pub fn check_settings(cfg: &crate::config::KafkaConfig) -> anyhow::Result<()> {
    let _: rdkafka::producer::BaseProducer = producer_config(cfg)
        .create()
        .map_err(|e| creation_error(cfg, e))?;
    Ok(())
}

/// What one record costs in memory besides its payload, for the in-flight budget.
const MESSAGE_OVERHEAD: usize = 64;

/// A batch message is sent once it holds this many bytes (or less, when the topic's
/// `kafka.max_message_bytes` is smaller). Larger batches save little more per record and make
/// the sink's unit of re-reading after a crash bigger.
const BATCH_BYTES: usize = 256 << 10;

/// Opaques with this bit set belong to [`Publisher::send_and_wait`]; the others are record
/// sequence numbers.
const WAITER: usize = 1 << (usize::BITS - 1);

/// Delivery bookkeeping, shared by the publisher and librdkafka's polling thread.
pub struct Deliveries {
    shard: String,
    state: Mutex<Tracker>,
    next_waiter: AtomicUsize,
    /// Bytes that may be in flight; a record's cost returns when it and everything before it
    /// are delivered.
    budget: Arc<Semaphore>,
    max_in_flight: usize,
    acked: watch::Sender<Option<Mark>>,
    failed: watch::Sender<Option<String>>,
    latency: Histogram,
    offset_acked: Gauge,
}

#[derive(Default)]
struct Tracker {
    /// Sequence number of `pending[0]`.
    base: usize,
    pending: VecDeque<Pending>,
    waiters: HashMap<usize, oneshot::Sender<Result<(), String>>>,
}

struct Pending {
    /// Partitions that have not acknowledged the record yet.
    remaining: usize,
    mark: Option<Mark>,
    started: Instant,
    cost: usize,
}

impl Deliveries {
    fn new(shard: &str, max_in_flight: usize) -> Self {
        Deliveries {
            shard: shard.to_owned(),
            state: Mutex::default(),
            next_waiter: AtomicUsize::new(0),
            budget: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            acked: watch::channel(None).0,
            failed: watch::channel(None).0,
            latency: histogram!("source_produce_latency_seconds", "shard" => shard.to_owned()),
            offset_acked: gauge!("source_offset_acked", "shard" => shard.to_owned()),
        }
    }

    /// Registers a round of messages produced to `partitions` partitions; returns its opaque.
    fn begin(&self, partitions: usize, mark: Option<Mark>, cost: usize) -> usize {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let seq = state.base + state.pending.len();
        state.pending.push_back(Pending {
            remaining: partitions,
            mark,
            started: Instant::now(),
            cost,
        });
        seq
    }

    fn waiter(&self) -> (usize, oneshot::Receiver<Result<(), String>>) {
        let id = WAITER | self.next_waiter.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.waiters.insert(id, tx);
        (id, rx)
    }

    fn fail(&self, e: &KafkaError) {
        counter!("source_kafka_errors_total", "shard" => self.shard.clone(), "code" => error_code(e))
            .increment(1);
        if self.failed.borrow().is_none() {
            tracing::error!(shard = %self.shard, "Kafka delivery failed: {e}; restarting from the last checkpoint");
            self.failed.send_replace(Some(e.to_string()));
        }
    }
}

impl std::fmt::Debug for Deliveries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deliveries")
            .field("shard", &self.shard)
            .finish()
    }
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        self.delivered(opaque, result.as_ref().err().map(|(e, _)| e));
    }
}

impl Deliveries {
    /// One partition's delivery report for the round (or checkpoint write) `opaque`.
    fn delivered(&self, opaque: usize, error: Option<&KafkaError>) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if opaque & WAITER != 0 {
            if let Some(tx) = state.waiters.remove(&opaque) {
                let _ = tx.send(error.map_or(Ok(()), |e| Err(e.to_string())));
            }
            return;
        }
        if let Some(e) = error {
            // A failed record stops the mark for good: the session restarts from the
            // checkpoint and republishes everything after it.
            drop(state);
            self.fail(e);
            state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        }
        let Some(pending) = opaque
            .checked_sub(state.base)
            .and_then(|i| state.pending.get_mut(i))
        else {
            return;
        };
        pending.remaining = pending.remaining.saturating_sub(1);
        let mut mark = None;
        while state.pending.front().is_some_and(|p| p.remaining == 0) {
            let done = state.pending.pop_front().expect("checked above");
            state.base += 1;
            self.budget.add_permits(done.cost);
            self.latency.record(done.started.elapsed().as_secs_f64());
            mark = done.mark.or(mark);
        }
        drop(state);
        if let Some(mark) = mark.filter(|_| self.failed.borrow().is_none()) {
            self.offset_acked.set(mark.offset as f64);
            self.acked.send_replace(Some(mark));
        }
    }
}

/// Why publishing stopped.
#[derive(Debug, thiserror::Error)]
#[error("Kafka did not accept a record for topic {topic}: {error}")]
pub struct PublishError {
    pub topic: String,
    pub error: String,
    /// Retrying cannot help (a record larger than the topic accepts).
    pub fatal: bool,
}

pub struct Publisher {
    producer: KafkaProducer,
    deliveries: Arc<Deliveries>,
    topic: String,
    shard: String,
    max_in_flight: usize,
    acked: watch::Receiver<Option<Mark>>,
    failed: watch::Receiver<Option<String>>,
    /// The last mark handed to Kafka (what `flush` waits for).
    published: Option<Mark>,
    max_message_bytes: usize,
    /// Records published but not yet produced.
    open: Round,
    /// The same for every record of this shard: built once.
    headers: OwnedHeaders,
    records_produced: Counter,
    messages_produced: Counter,
    bytes_produced: Counter,
    offset_published: Gauge,
}

/// The records of the next send: one batch per partition.
#[derive(Default)]
struct Round {
    batches: BTreeMap<u32, Batch>,
    /// The mark of the round's last record that has one.
    mark: Option<Mark>,
    /// In-flight budget taken by the round's records.
    cost: usize,
}

struct Batch {
    /// The message key: that of the batch's first record.
    key: Vec<u8>,
    /// A `RecordBatch`: the records, each as field 1.
    value: Vec<u8>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("topic", &self.topic)
            .field("shard", &self.shard)
            .finish()
    }
}

impl Publisher {
    pub fn new(producer: KafkaProducer, topic: String, max_message_bytes: usize) -> Self {
        let deliveries = producer.context().clone();
        let shard = deliveries.shard.clone();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: topic::HEADER_CONTENT_TYPE,
                value: Some(topic::CONTENT_TYPE_BATCH),
            })
            .insert(Header {
                key: topic::HEADER_SCHEMA_VERSION,
                value: Some(&proto::SCHEMA_VERSION.to_string()),
            })
            .insert(Header {
                key: topic::HEADER_SOURCE_SHARD,
                value: Some(&shard),
            });
        Publisher {
            records_produced: counter!("source_records_produced_total", "shard" => shard.clone()),
            messages_produced: counter!("source_messages_produced_total", "shard" => shard.clone()),
            bytes_produced: counter!("source_bytes_produced_total", "shard" => shard.clone()),
            offset_published: gauge!("source_offset_published", "shard" => shard.clone()),
            acked: deliveries.acked.subscribe(),
            failed: deliveries.failed.subscribe(),
            max_in_flight: deliveries.max_in_flight,
            deliveries,
            producer,
            topic,
            shard,
            published: None,
            max_message_bytes,
            open: Round::default(),
            headers,
        }
    }

    /// The highest mark Kafka has acknowledged with everything before it.
    pub fn acked(&self) -> watch::Receiver<Option<Mark>> {
        self.acked.clone()
    }

    /// Adds one record to the open batch of each of its partitions (sending the open round
    /// first when a batch would grow past its size). Waits while too many bytes are in flight.
    /// Fails when a delivery failed: the session must then restart from the checkpoint.
    ///
    /// The record reaches Kafka with the next [`Publisher::send`] (or [`Publisher::flush`]).
    pub async fn publish(&mut self, out: Outgoing) -> Result<(), PublishError> {
        if let Some(error) = self.failed.borrow().clone() {
            return Err(self.error(error));
        }
        let payload = topic::encode(&out.record);
        let entry = topic::batch_entry_len(payload.len());
        if entry > self.max_message_bytes {
            let position = out.record.position.unwrap_or_default();
            counter!("source_oversized_records_total", "shard" => self.shard.clone()).increment(1);
            return Err(PublishError {
                topic: self.topic.clone(),
                error: format!(
                    "the record at position {}:{}:{} is {} bytes, above kafka.max_message_bytes = {} (a single command this big cannot be split); raise the topic's max.message.bytes and kafka.max_message_bytes",
                    position.epoch,
                    position.offset,
                    position.sequence,
                    entry,
                    self.max_message_bytes
                ),
                fatal: true,
            });
        }
        let limit = BATCH_BYTES.min(self.max_message_bytes);
        let full = out.partitions.iter().any(|p| {
            self.open
                .batches
                .get(p)
                .is_some_and(|b| b.value.len() + entry > limit)
        });
        if full {
            self.send().await?;
        }
        // librdkafka's bookkeeping is per message now, so a record costs little besides itself.
        let cost = ((entry + MESSAGE_OVERHEAD) * out.partitions.len()).clamp(1, self.max_in_flight);
        self.reserve(cost).await?;
        for &partition in &out.partitions {
            // Only a batch's first record names its key: no key bytes for the others.
            let batch = self.open.batches.entry(partition).or_insert_with(|| Batch {
                key: out.key.to_bytes(),
                value: Vec::with_capacity(limit.min(16 << 10)),
            });
            topic::push_to_batch(&mut batch.value, &payload);
        }
        self.open.cost += cost;
        self.open.mark = out.mark.or(self.open.mark);
        self.records_produced.increment(out.partitions.len() as u64);
        self.bytes_produced
            .increment((payload.len() * out.partitions.len()) as u64);
        Ok(())
    }

    /// Produces the open batches: one message per partition, all tracked as one round.
    pub async fn send(&mut self) -> Result<(), PublishError> {
        let round = std::mem::take(&mut self.open);
        if round.batches.is_empty() {
            return Ok(());
        }
        let opaque = self
            .deliveries
            .begin(round.batches.len(), round.mark, round.cost);
        for (partition, batch) in &round.batches {
            let mut record = BaseRecord::with_opaque_to(&self.topic, opaque)
                .partition(*partition as i32)
                .key(&batch.key)
                .payload(&batch.value)
                .headers(self.headers.clone());
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        counter!("source_kafka_queue_full_total", "shard" => self.shard.clone())
                            .increment(1);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => {
                        // The round never reaches the delivery callback: fail the session
                        // (its mark can no longer move past it).
                        self.deliveries.fail(&e);
                        return Err(self.error(e.to_string()));
                    }
                }
            }
            self.messages_produced.increment(1);
        }
        if let Some(mark) = round.mark {
            self.published = Some(mark);
            self.offset_published.set(mark.offset as f64);
        }
        Ok(())
    }

    /// Takes `cost` bytes of the in-flight budget, waiting (and saying so) while Kafka has not
    /// acknowledged enough. The open round is sent first: what it holds counts against the
    /// budget, and only Kafka's acknowledgements give it back.
    async fn reserve(&mut self, cost: usize) -> Result<(), PublishError> {
        let budget = self.deliveries.budget.clone();
        let permit = match budget.try_acquire_many(cost as u32) {
            Ok(p) => p,
            Err(_) => {
                self.send().await?;
                let waited = Instant::now();
                gauge!("source_backpressure", "shard" => self.shard.clone()).set(1.0);
                tracing::debug!(shard = %self.shard, "waiting on Kafka: {} bytes in flight", self.max_in_flight);
                let p = budget
                    .acquire_many(cost as u32)
                    .await
                    .expect("the semaphore is never closed");
                gauge!("source_backpressure", "shard" => self.shard.clone()).set(0.0);
                histogram!("source_backpressure_wait_seconds", "shard" => self.shard.clone())
                    .record(waited.elapsed().as_secs_f64());
                p
            }
        };
        // Returned by the delivery callback.
        permit.forget();
        Ok(())
    }

    /// Sends the open round and waits until everything produced so far is acknowledged (or a
    /// delivery failed).
    pub async fn flush(&mut self) -> Result<Option<Mark>, PublishError> {
        self.send().await?;
        let target = self.published;
        let mut acked = self.acked.clone();
        let mut failed = self.failed.clone();
        loop {
            if let Some(error) = failed.borrow().clone() {
                return Err(self.error(error));
            }
            if target.is_none() || *acked.borrow() == target {
                return Ok(*acked.borrow());
            }
            tokio::select! {
                r = acked.changed() => { if r.is_err() { return Ok(*acked.borrow()); } }
                _ = failed.changed() => {}
            }
        }
    }

    /// Produces a record to another topic (the checkpoint topic) and waits for its delivery.
    pub async fn send_and_wait(
        &self,
        topic: &str,
        key: &[u8],
        payload: &[u8],
    ) -> anyhow::Result<()> {
        self.send_all_and_wait(topic, &[(key, Some(payload))]).await
    }

    /// Produces records (a `None` payload is a tombstone) to partition 0 of another topic, all
    /// at once, and waits until every one is delivered.
    pub async fn send_all_and_wait(
        &self,
        topic: &str,
        records: &[(&[u8], Option<&[u8]>)],
    ) -> anyhow::Result<()> {
        let mut waiting = Vec::new();
        for &(key, payload) in records {
            let (opaque, delivered) = self.deliveries.waiter();
            let mut record = BaseRecord::<[u8], [u8], _>::with_opaque_to(topic, opaque)
                .key(key)
                .partition(0);
            record.payload = payload;
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match self.producer.send(record) {
                    Ok(()) => break,
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r))
                        if Instant::now() < deadline =>
                    {
                        record = r;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => anyhow::bail!("cannot write to {topic}: {e}"),
                }
            }
            waiting.push(delivered);
        }
        for delivered in waiting {
            match delivered.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => anyhow::bail!("cannot write to {topic}: {e}"),
                Err(_) => anyhow::bail!("cannot write to {topic}: the producer stopped"),
            }
        }
        Ok(())
    }

    fn error(&self, error: String) -> PublishError {
        PublishError {
            topic: self.topic.clone(),
            error,
            fatal: false,
        }
    }
}

fn error_code(e: &KafkaError) -> String {
    match e.rdkafka_error_code() {
        Some(code) => format!("{code:?}"),
        None => "other".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mark(offset: u64) -> Option<Mark> {
        Some(Mark {
            offset,
            snapshot_done: false,
        })
    }

    /// A mark moves only once its record and every record before it are acknowledged on every
    /// partition they went to; the in-flight budget comes back in the same order.
    #[test]
    fn marks_advance_in_order_across_partitions() {
        let d = Deliveries::new("t", 100);
        let acked = d.acked.subscribe();
        d.budget.try_acquire_many(30).unwrap().forget();
        let a = d.begin(2, mark(10), 10);
        let b = d.begin(1, None, 10);
        let c = d.begin(1, mark(30), 10);
        d.delivered(c, None);
        d.delivered(a, None);
        assert_eq!(
            *acked.borrow(),
            None,
            "a still waits for its second partition"
        );
        d.delivered(b, None);
        assert_eq!(*acked.borrow(), None);
        assert_eq!(d.budget.available_permits(), 70);
        d.delivered(a, None);
        assert_eq!(*acked.borrow(), mark(30), "a, b and c are all in");
        assert_eq!(d.budget.available_permits(), 100);
    }

    /// After a failed delivery the mark never moves again (the session restarts from the
    /// checkpoint), but the budget is still returned so nothing waits forever.
    #[test]
    fn a_failed_delivery_stops_the_mark() {
        let d = Deliveries::new("t", 100);
        let acked = d.acked.subscribe();
        let failed = d.failed.subscribe();
        d.budget.try_acquire_many(20).unwrap().forget();
        let a = d.begin(1, mark(1), 10);
        let b = d.begin(1, mark(2), 10);
        d.delivered(a, None);
        assert_eq!(*acked.borrow(), mark(1));
        d.delivered(b, Some(&KafkaError::Canceled));
        assert_eq!(*acked.borrow(), mark(1));
        assert!(failed.borrow().is_some());
        assert_eq!(d.budget.available_permits(), 100);
    }

    #[tokio::test]
    async fn checkpoint_writes_get_their_own_answer() {
        let d = Deliveries::new("t", 100);
        let (id, rx) = d.waiter();
        let r = d.begin(1, mark(5), 1);
        d.delivered(id, None);
        assert_eq!(rx.await.unwrap(), Ok(()));
        assert_eq!(
            *d.acked.borrow(),
            None,
            "a checkpoint write is not a record"
        );
        d.delivered(r, None);
        assert_eq!(*d.acked.borrow(), mark(5));
    }
}
