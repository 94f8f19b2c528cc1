//! Diagnostic, not part of CI: how fast does a bare librdkafka consumer, with the sink's consumer
//! settings, read a topic of the test broker from the beginning? The ceiling the sink's lanes
//! can reach on that broker.
//!
//!   cargo run --release -p harness --example consume_rate BOOTSTRAP TOPIC PARTITIONS MESSAGES [KEY=VALUE...]
//!
//! With `RATE=N` it takes at most N messages a second (as a slower application would), to see
//! how much librdkafka holds meanwhile (peak RSS).

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::time::{Duration, Instant};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [bootstrap, topic, partitions, messages, extra @ ..] = args.as_slice() else {
        anyhow::bail!("usage: consume_rate BOOTSTRAP TOPIC PARTITIONS MESSAGES [KEY=VALUE...]");
    };
    let partitions: i32 = partitions.parse()?;
    let messages: u64 = messages.parse()?;
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap)
        .set("group.id", format!("rate-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("queued.max.messages.kbytes", "16384")
        .set("queued.min.messages", "20000")
        .set("fetch.wait.max.ms", "100");
    for kv in extra {
        let (k, v) = kv
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("not KEY=VALUE: {kv}"))?;
        c.set(k, v);
    }
    let consumer: BaseConsumer = c.create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let rate: Option<f64> = std::env::var("RATE").ok().and_then(|r| r.parse().ok());
    let mut n = 0u64;
    let mut started = None;
    while n < messages {
        if let Some(m) = consumer.poll(Duration::from_millis(100)) {
            m?;
            let t0 = *started.get_or_insert_with(Instant::now);
            n += 1;
            if let Some(rate) = rate {
                while (n as f64) / t0.elapsed().as_secs_f64() > rate {
                    std::hint::spin_loop();
                }
            }
        }
    }
    let s = started.map_or(0.0, |t| t.elapsed().as_secs_f64());
    println!("{n} messages in {s:.2} s: {:.0}/s", n as f64 / s);
    Ok(())
}
