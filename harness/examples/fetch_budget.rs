//! Diagnostic, not part of CI: how long does a consumer near the end of a partition of the test
//! broker wait for its first message, as the partition grows in batches and by the consumer's
//! `fetch.wait.max.ms`? nisshi's memory storage lists every batch object of the partition on each
//! fetch, within a budget of about half of `fetch.wait.max.ms`: a partition with more batches
//! than it can list in that budget answers every fetch near its end with nothing.
//!
//!   cargo run --release -p harness --example fetch_budget [BATCHES] [WAIT_MS...]
//!
//! `FETCH_BUDGET_STORAGE=sqlite` uses the broker's sqlite storage instead of memory.

use harness::broker::{random_topic, Broker, Storage};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let batches: i64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let waits: Vec<u64> = args.filter_map(|a| a.parse().ok()).collect();
    let waits = if waits.is_empty() {
        vec![10, 100, 500]
    } else {
        waits
    };
    let storage = match std::env::var("FETCH_BUDGET_STORAGE").as_deref() {
        Ok("sqlite") => Storage::Sqlite,
        _ => Storage::Memory,
    };
    let broker = Broker::start(storage)?;
    let topic = random_topic("budget");
    broker.create_topic(&topic, 1)?;
    // One message per batch: the broker stores one object per batch.
    let producer: BaseProducer = broker
        .client_config()
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "0")
        .set("batch.num.messages", "1")
        .create()?;
    let started = Instant::now();
    for n in 0..batches {
        let payload = n.to_string();
        loop {
            match producer.send(
                BaseRecord::<(), _>::to(&topic)
                    .partition(0)
                    .payload(&payload),
            ) {
                Ok(()) => break,
                Err(_) => {
                    producer.poll(Duration::from_millis(10));
                }
            }
        }
        producer.poll(Duration::ZERO);
    }
    producer.flush(Duration::from_secs(60))?;
    let (_, high) = producer
        .client()
        .fetch_watermarks(&topic, 0, Duration::from_secs(5))?;
    println!(
        "produced {batches} messages in {:?}; high watermark {high}",
        started.elapsed()
    );
    for wait in waits {
        let consumer: BaseConsumer = broker
            .client_config()
            .set("group.id", "budget")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", wait.to_string())
            .create()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&topic, 0, Offset::Offset(high - 5))?;
        consumer.assign(&tpl)?;
        let asked = Instant::now();
        let mut got = None;
        while asked.elapsed() < Duration::from_secs(20) {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                got = Some(m.offset());
                break;
            }
        }
        match got {
            Some(offset) => println!(
                "fetch.wait.max.ms={wait}: offset {offset} after {:?}",
                asked.elapsed()
            ),
            None => println!("fetch.wait.max.ms={wait}: nothing in 20 s"),
        }
    }
    Ok(())
}
