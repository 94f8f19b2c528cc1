//! Diagnostic, not part of CI: do consumers of the test broker ever see a partition's offsets
//! skip ahead? Several idempotent producers write to one partition at once (as the source
//! connector's per-shard producers do when shards share a partition) while a consumer tails it
//! and counts every jump past the next expected offset. A final read from the start counts what
//! the partition really holds.
//!
//!   cargo run --release -p harness --example broker_gaps [PRODUCERS] [SECONDS] [PACE]

use harness::broker::{random_topic, Broker, Storage};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let producers: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3);
    let seconds: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(20);
    // Messages each producer sends between 1 ms sleeps (0: as fast as it can): small paces make
    // many small produce requests, as a live command stream does.
    let pace: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    let broker = Broker::start(Storage::Memory)?;
    let topic = random_topic("gaps");
    broker.create_topic(&topic, 1)?;
    let done = Arc::new(AtomicBool::new(false));
    let produced = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = (0..producers)
        .map(|id| {
            let producer: BaseProducer = broker
                .client_config()
                .set("enable.idempotence", "true")
                .set("acks", "all")
                .set("linger.ms", "2")
                .create()
                .expect("producer");
            let (topic, done, produced) = (topic.clone(), Arc::clone(&done), Arc::clone(&produced));
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !done.load(SeqCst) {
                    let payload = format!("{id}:{n}");
                    match producer.send(
                        BaseRecord::<(), _>::to(&topic)
                            .partition(0)
                            .payload(&payload),
                    ) {
                        Ok(()) => {
                            n += 1;
                            produced.fetch_add(1, SeqCst);
                        }
                        Err(_) => {
                            producer.poll(Duration::from_millis(10));
                        }
                    }
                    producer.poll(Duration::ZERO);
                    if pace > 0 && n.is_multiple_of(pace) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
                producer.flush(Duration::from_secs(30)).expect("flush");
            })
        })
        .collect();

    let consumer: BaseConsumer = broker
        .client_config()
        .set("group.id", "gaps")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Beginning)?;
    consumer.assign(&tpl)?;
    let started = Instant::now();
    let (mut next, mut seen, mut gaps, mut skipped) = (0i64, 0u64, 0u64, 0i64);
    let mut quiet_since = None;
    loop {
        if started.elapsed() >= Duration::from_secs(seconds) && !done.load(SeqCst) {
            done.store(true, SeqCst);
        }
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                quiet_since = None;
                if m.offset() > next {
                    gaps += 1;
                    skipped += m.offset() - next;
                    eprintln!("gap: expected offset {next}, got {}", m.offset());
                }
                next = next.max(m.offset() + 1);
                seen += 1;
            }
            Some(Err(e)) => eprintln!("consumer: {e}"),
            None if done.load(SeqCst) => {
                let since = *quiet_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(3) {
                    break;
                }
            }
            None => {}
        }
    }
    for w in writers {
        w.join().expect("writer");
    }
    let (low, high) = consumer.fetch_watermarks(&topic, 0, Duration::from_secs(5))?;
    let held = broker
        .read_records(&topic)?
        .into_iter()
        .filter(|m| m.partition == 0)
        .count();
    println!(
        "{producers} producers, {} s: produced {}, partition holds {held} (offsets {low}..{high}); \
         the tailing consumer read {seen}, with {gaps} jumps skipping {skipped} offsets",
        seconds,
        produced.load(SeqCst)
    );
    Ok(())
}
