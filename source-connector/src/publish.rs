//! Publishing records to Kafka and tracking what Kafka has durably acknowledged.
//!
//! Records are produced in replication order through one idempotent producer (`acks=all`), so
//! each partition receives them in order. A tracker task awaits the deliveries in the same order
//! and advances the acknowledged [`Mark`]: a mark moves only when its record and every record
//! before it are acknowledged. Memory is bounded by `max_in_flight_bytes`: when Kafka is slow or
//! down, [`Publisher::publish`] waits, which stops the caller from reading Redis.

use crate::records::{Mark, Outgoing};
use metrics::{counter, gauge, histogram, Counter, Gauge};
use proto::topic;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};

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
];

/// Creates the producer from the connector's Kafka settings.
pub fn producer(cfg: &crate::config::KafkaConfig) -> anyhow::Result<FutureProducer> {
    let mut c =
        service::kafka::client_config(&cfg.bootstrap_servers, PRODUCER_DEFAULTS, &cfg.properties);
    c.set("compression.type", &cfg.compression);
    for (k, v) in PRODUCER_GUARANTEES {
        c.set(*k, *v);
    }
    c.create().map_err(|e| {
        anyhow::anyhow!(
            "cannot create Kafka producer for {}: {e}",
            cfg.bootstrap_servers
        )
    })
}

struct InFlight {
    deliveries: Vec<DeliveryFuture>,
    mark: Option<Mark>,
    started: Instant,
    _permit: OwnedSemaphorePermit,
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
    producer: FutureProducer,
    topic: String,
    shard: String,
    budget: Arc<Semaphore>,
    max_in_flight: usize,
    queue: mpsc::UnboundedSender<InFlight>,
    acked: watch::Receiver<Option<Mark>>,
    failed: watch::Receiver<Option<String>>,
    /// The last mark handed to Kafka (what `flush` waits for).
    published: Option<Mark>,
    max_message_bytes: usize,
    /// The same for every record of this shard: built once.
    headers: OwnedHeaders,
    records_produced: Counter,
    bytes_produced: Counter,
    offset_published: Gauge,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("topic", &self.topic)
            .field("shard", &self.shard)
            .finish()
    }
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight")
            .field("mark", &self.mark)
            .finish()
    }
}

impl Publisher {
    pub fn new(
        producer: FutureProducer,
        topic: String,
        shard: String,
        max_in_flight: usize,
        max_message_bytes: usize,
    ) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        let (acked_tx, acked) = watch::channel(None);
        let (failed_tx, failed) = watch::channel(None);
        tokio::spawn(track(rx, acked_tx, failed_tx, shard.clone()));
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: topic::HEADER_CONTENT_TYPE,
                value: Some(topic::CONTENT_TYPE),
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
            bytes_produced: counter!("source_bytes_produced_total", "shard" => shard.clone()),
            offset_published: gauge!("source_offset_published", "shard" => shard.clone()),
            producer,
            topic,
            shard,
            budget: Arc::new(Semaphore::new(max_in_flight)),
            max_in_flight,
            queue,
            acked,
            failed,
            published: None,
            max_message_bytes,
            headers,
        }
    }

    /// The highest mark Kafka has acknowledged with everything before it.
    pub fn acked(&self) -> watch::Receiver<Option<Mark>> {
        self.acked.clone()
    }

    /// Produces one record (to each of its partitions). Waits while too many bytes are in
    /// flight. Fails when a delivery failed: the session must then restart from the checkpoint.
    pub async fn publish(&mut self, out: Outgoing) -> Result<(), PublishError> {
        if let Some(error) = self.failed.borrow().clone() {
            return Err(self.error(error));
        }
        let payload = topic::encode(&out.record);
        if payload.len() > self.max_message_bytes {
            let position = out.record.position.unwrap_or_default();
            counter!("source_oversized_records_total", "shard" => self.shard.clone()).increment(1);
            return Err(PublishError {
                topic: self.topic.clone(),
                error: format!(
                    "the record at position {}:{}:{} is {} bytes, above kafka.max_message_bytes = {} (a single command this big cannot be split); raise the topic's max.message.bytes and kafka.max_message_bytes",
                    position.epoch,
                    position.offset,
                    position.sequence,
                    payload.len(),
                    self.max_message_bytes
                ),
                fatal: true,
            });
        }
        let cost = (payload.len() * out.partitions.len()).clamp(1, self.max_in_flight);
        let permit = match Arc::clone(&self.budget).try_acquire_many_owned(cost as u32) {
            Ok(p) => p,
            Err(_) => {
                let waited = Instant::now();
                gauge!("source_backpressure", "shard" => self.shard.clone()).set(1.0);
                tracing::debug!(shard = %self.shard, "waiting on Kafka: {} bytes in flight", self.max_in_flight);
                let p = Arc::clone(&self.budget)
                    .acquire_many_owned(cost as u32)
                    .await
                    .expect("the semaphore is never closed");
                gauge!("source_backpressure", "shard" => self.shard.clone()).set(0.0);
                histogram!("source_backpressure_wait_seconds", "shard" => self.shard.clone())
                    .record(waited.elapsed().as_secs_f64());
                p
            }
        };
        let key = out.key.to_bytes();
        let mut deliveries = Vec::with_capacity(out.partitions.len());
        for &partition in &out.partitions {
            let mut record = FutureRecord::to(&self.topic)
                .partition(partition as i32)
                .key(&key)
                .payload(&payload)
                .headers(self.headers.clone());
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        deliveries.push(delivery);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        counter!("source_kafka_queue_full_total", "shard" => self.shard.clone())
                            .increment(1);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((e, _)) => {
                        counter!("source_kafka_errors_total", "shard" => self.shard.clone(), "code" => error_code(&e)).increment(1);
                        return Err(self.error(e.to_string()));
                    }
                }
            }
            self.records_produced.increment(1);
            self.bytes_produced.increment(payload.len() as u64);
        }
        if let Some(mark) = out.mark {
            self.published = Some(mark);
            self.offset_published.set(mark.offset as f64);
        }
        let _ = self.queue.send(InFlight {
            deliveries,
            mark: out.mark,
            started: Instant::now(),
            _permit: permit,
        });
        Ok(())
    }

    /// Waits until everything produced so far is acknowledged (or a delivery failed).
    pub async fn flush(&mut self) -> Result<Option<Mark>, PublishError> {
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
        let record = FutureRecord::to(topic)
            .key(key)
            .payload(payload)
            .partition(0);
        self.producer
            .send(record, Duration::from_secs(30))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("cannot write to {topic}: {e}"))?;
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

async fn track(
    mut rx: mpsc::UnboundedReceiver<InFlight>,
    acked: watch::Sender<Option<Mark>>,
    failed: watch::Sender<Option<String>>,
    shard: String,
) {
    let latency = histogram!("source_produce_latency_seconds", "shard" => shard.clone());
    let offset_acked = gauge!("source_offset_acked", "shard" => shard.clone());
    while let Some(item) = rx.recv().await {
        for delivery in item.deliveries {
            let result = match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((e, _))) => Err(e),
                Err(_) => Err(KafkaError::Canceled),
            };
            if let Err(e) = result {
                counter!("source_kafka_errors_total", "shard" => shard.clone(), "code" => error_code(&e)).increment(1);
                tracing::error!(shard = %shard, "Kafka delivery failed: {e}; restarting from the last checkpoint");
                let _ = failed.send(Some(e.to_string()));
                return;
            }
        }
        latency.record(item.started.elapsed().as_secs_f64());
        if let Some(mark) = item.mark {
            offset_acked.set(mark.offset as f64);
            let _ = acked.send(Some(mark));
        }
    }
}
