//! The `run` command: a consumer group over the topic, one lane per partition.
//!
//! Every partition's queue is split off the consumer up front, so a partition's messages only
//! ever reach its lane. Rebalances switch lanes on and off: a revocation waits until the lane
//! has finished its current transaction, so two sinks never write the same partition at once,
//! and a newly assigned lane reloads its checkpoint from the target before applying anything.

use crate::config::Config;
use crate::lane::{self, Lane, LaneEnv};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientConfig, ClientContext, Message};
use service::http::Health;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::Instrument;

/// Largest fetch response the consumer asks for (`fetch.max.bytes`): what bounds its memory
/// while it catches up (see `consumer_config`).
const FETCH_BYTES: u64 = 256 * 1024;

struct LaneHandle {
    active: watch::Sender<bool>,
    busy: Arc<AtomicBool>,
}

/// The consumer context: turns rebalances into lane switches.
pub struct Context {
    topic: String,
    lanes: std::sync::Mutex<HashMap<i32, LaneHandle>>,
}

impl ClientContext for Context {}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("topic", &self.topic)
            .finish()
    }
}

impl Context {
    fn partitions_of(&self, rebalance: &Rebalance<'_>) -> Vec<i32> {
        let tpl = match rebalance {
            Rebalance::Assign(t) | Rebalance::Revoke(t) => t,
            Rebalance::Error(_) => return Vec::new(),
        };
        tpl.elements()
            .iter()
            .filter(|e| e.topic() == self.topic)
            .map(|e| e.partition())
            .collect()
    }

    /// Switches lanes off and waits until none of them is writing.
    fn stop_lanes(&self, partitions: &[i32]) {
        let busy: Vec<(i32, Arc<AtomicBool>)> = {
            let lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
            partitions
                .iter()
                .filter_map(|p| {
                    let h = lanes.get(p)?;
                    let _ = h.active.send(false);
                    Some((*p, Arc::clone(&h.busy)))
                })
                .collect()
        };
        let started = Instant::now();
        for (p, flag) in busy {
            while flag.load(SeqCst) {
                if started.elapsed() > Duration::from_secs(120) {
                    tracing::error!(
                        partition = p,
                        "lane did not stop within 120 s of its revocation"
                    );
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    fn start_lanes(&self, partitions: &[i32]) {
        let lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        for p in partitions {
            if let Some(h) = lanes.get(p) {
                let _ = h.active.send(true);
            }
        }
    }
}

impl ConsumerContext for Context {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(_) = rebalance {
            let partitions = self.partitions_of(rebalance);
            tracing::info!("partitions revoked: {partitions:?}; stopping their lanes");
            self.stop_lanes(&partitions);
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(_) => {
                let partitions = self.partitions_of(rebalance);
                tracing::info!("partitions assigned: {partitions:?}");
                metrics::gauge!("sink_assigned_partitions").set(partitions.len() as f64);
                self.start_lanes(&partitions);
            }
            Rebalance::Error(e) => tracing::error!("rebalance error: {e}"),
            Rebalance::Revoke(_) => {}
        }
    }
}

/// The lanes' view of the consumer: offsets to commit, watermarks and seeks.
struct ConsumerPartitions {
    consumer: Arc<StreamConsumer<Context>>,
    topic: String,
}

impl lane::Partitions for ConsumerPartitions {
    fn commit(&self, partition: i32, offset: i64) {
        lane::store_offset(&*self.consumer, &self.topic, partition, offset)
    }

    fn watermarks(&self, partition: i32) -> Result<(i64, i64), String> {
        self.consumer
            .fetch_watermarks(&self.topic, partition, Duration::from_secs(10))
            .map_err(|e| e.to_string())
    }

    fn seek(&self, partition: i32, offset: i64) -> Result<(), String> {
        self.consumer
            .seek(
                &self.topic,
                partition,
                rdkafka::Offset::Offset(offset),
                Duration::from_secs(10),
            )
            .map_err(|e| e.to_string())
    }
}

/// Partitions of `topic`, waiting (with a log line every 10 s) until it exists.
fn wait_for_topic(
    client: &rdkafka::ClientConfig,
    topic: &str,
    shutdown: &watch::Receiver<bool>,
) -> anyhow::Result<u32> {
    let started = Instant::now();
    let mut logged = Instant::now() - Duration::from_secs(60);
    loop {
        match service::kafka::partition_count(client, topic) {
            Ok(Some(n)) => return Ok(n),
            Ok(None) => {
                if logged.elapsed() > Duration::from_secs(10) {
                    tracing::info!(
                        "waiting for topic {topic} to exist ({:?} so far)",
                        started.elapsed()
                    );
                    logged = Instant::now();
                }
            }
            Err(e) => {
                if logged.elapsed() > Duration::from_secs(10) {
                    tracing::warn!("{e}; retrying");
                    logged = Instant::now();
                }
            }
        }
        if *shutdown.borrow() {
            anyhow::bail!("stopped while waiting for topic {topic}");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The consumer's librdkafka settings: the sink's defaults, then `kafka.properties`, then what
/// the sink's delivery semantics need whatever the properties say.
fn consumer_config(cfg: &Config, partitions: u32) -> ClientConfig {
    let fetch_bytes = cfg
        .kafka
        .properties
        .get("message.max.bytes")
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        .max(FETCH_BYTES)
        .to_string();
    // The prefetch queue is per partition: its bounds are shared out so that the whole consumer
    // stays within about 16 MiB of records however many partitions it owns, while each
    // partition still gets enough to keep its lane busy. `queued.min.messages` counts messages,
    // which hold hundreds of records each since ADR 0013: the bytes bound is the one that acts
    // (with 64 MiB the sink held 239 MB in the mixed snapshot, docs/benchmarks.md).
    let queue_kbytes = (16384 / partitions.max(1)).clamp(1024, 4096).to_string();
    let mut c = service::kafka::client_config(
        &cfg.kafka.bootstrap_servers,
        &[
            ("auto.offset.reset", "earliest"),
            ("queued.max.messages.kbytes", &queue_kbytes),
            ("queued.min.messages", "2000"),
            // One fetch response at a time is what bounds the consumer's memory: librdkafka
            // parses a whole response into messages (a few hundred bytes of bookkeeping each)
            // before the queue bounds above are checked, and the test broker lets one partition
            // fill the request's whole `fetch.max.bytes`. With librdkafka's 50 MB the sink
            // catching up on 1M SETs peaked at 477-521 MB RSS; with 1 MiB, 117-133 MB; with
            // 256 KiB, 63-65 MB at the same speed (docs/benchmarks.md, ADR 0010). librdkafka
            // refuses a `fetch.max.bytes` below `message.max.bytes`, which a consumer uses for
            // nothing else: a bigger record is still fetched whole (Kafka returns the first
            // batch of a fetch whatever its size, and librdkafka grows its partition fetch size
            // until a message fits). `kafka.properties` is shared with the dead-letter producer,
            // which may need a bigger `message.max.bytes`: the fetch size follows it.
            ("fetch.max.bytes", &fetch_bytes),
            ("message.max.bytes", &FETCH_BYTES.to_string()),
            ("max.partition.fetch.bytes", &fetch_bytes),
            ("fetch.wait.max.ms", "100"),
            // librdkafka waits this long before fetching again once a partition's queue was
            // over the bounds above (default 1 s): a lane that drains its queue meanwhile
            // starves. 10 ms: the bare consumer read 121k messages/s from the test broker with
            // the default, 2M/s with this (harness/examples/consume_rate.rs).
            ("fetch.queue.backoff.ms", "10"),
            ("socket.timeout.ms", "10000"),
            ("session.timeout.ms", "6000"),
            ("heartbeat.interval.ms", "1000"),
            // Offsets are only a restart hint; committing every second keeps replays short.
            ("auto.commit.interval.ms", "1000"),
        ],
        &cfg.kafka.properties,
    );
    // Offsets are stored only after the records are applied (the target's checkpoint is the
    // real position; Kafka offsets are the restart hint).
    c.set("group.id", &cfg.kafka.group_id)
        .set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false");
    c
}

pub async fn run(
    cfg: Config,
    health: Health,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let topic = cfg.kafka.topic.clone();
    let base =
        service::kafka::client_config(&cfg.kafka.bootstrap_servers, &[], &cfg.kafka.properties);
    // A target that refuses what the settings say it takes would stall every lane for good:
    // say so once, naming the setting, and stop.
    let probed = {
        let cfg = Arc::clone(&cfg);
        tokio::task::spawn_blocking(move || crate::target::refusals(&cfg)).await?
    };
    match probed {
        Ok(refused) if !refused.is_empty() => anyhow::bail!("{}", refused.join("; ")),
        Ok(_) => {}
        Err(e) => {
            tracing::warn!("cannot ask the target what it accepts ({e}); the lanes wait for it")
        }
    }
    let partitions = {
        let base = base.clone();
        let topic = topic.clone();
        let shutdown = shutdown.clone();
        tokio::task::spawn_blocking(move || wait_for_topic(&base, &topic, &shutdown)).await??
    };
    let c = consumer_config(&cfg, partitions);
    let context = Context {
        topic: topic.clone(),
        lanes: std::sync::Mutex::new(HashMap::new()),
    };
    let consumer: Arc<StreamConsumer<Context>> = Arc::new(
        c.create_with_context(context)
            .map_err(|e| anyhow::anyhow!("cannot create the Kafka consumer: {e}"))?,
    );
    let dead_letter: Option<FutureProducer> = match &cfg.apply.dead_letter_topic {
        Some(_) => Some(
            service::kafka::client_config(
                &cfg.kafka.bootstrap_servers,
                &[("enable.idempotence", "true"), ("acks", "all")],
                &cfg.kafka.properties,
            )
            .create()
            .map_err(|e| anyhow::anyhow!("cannot create the dead-letter producer: {e}"))?,
        ),
        None => None,
    };
    let env = LaneEnv {
        cfg: Arc::clone(&cfg),
        topic: topic.clone(),
        health: health.clone(),
        dead_letter,
        filter: Arc::new(crate::filter::Filter::new(&cfg.apply)),
        limit: Arc::new(crate::filter::RateLimit::new(&cfg.apply)),
        partitions: Arc::new(ConsumerPartitions {
            consumer: Arc::clone(&consumer),
            topic: topic.clone(),
        }),
    };
    let mut tasks = Vec::new();
    for p in 0..partitions as i32 {
        let queue = consumer
            .split_partition_queue(&topic, p)
            .ok_or_else(|| anyhow::anyhow!("cannot split the queue of partition {p}"))?;
        let (active, control) = watch::channel(false);
        let busy = Arc::new(AtomicBool::new(false));
        consumer
            .context()
            .lanes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                p,
                LaneHandle {
                    active,
                    busy: Arc::clone(&busy),
                },
            );
        let lane = Lane::new(env.clone(), p, control)?;
        // Every line a lane logs carries its partition (a field of the JSON log format).
        let span = tracing::info_span!("lane", topic = %topic, partition = p);
        tasks.push(tokio::spawn(
            lane::run(lane, queue, busy, cfg.apply.batch_records).instrument(span),
        ));
    }
    consumer
        .subscribe(&[&topic])
        .map_err(|e| anyhow::anyhow!("cannot subscribe to {topic}: {e}"))?;
    tracing::info!(
        "consuming {topic} ({partitions} partitions) as group {}",
        cfg.kafka.group_id
    );
    health.ok("consumer", "subscribed");

    // The main queue carries rebalances and errors; its callbacks block while lanes stop, so it
    // gets a thread of its own.
    let main_consumer = Arc::clone(&consumer);
    let (stop_main, mut main_stopped) = watch::channel(false);
    let main_health = health.clone();
    let main = std::thread::Builder::new().name("consumer".into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            loop {
                tokio::select! {
                    m = main_consumer.recv() => match m {
                        Ok(m) => tracing::error!(partition = m.partition(), "message outside a lane (the topic grew partitions?); restart the sink"),
                        Err(e) => {
                            tracing::warn!("Kafka consumer: {e}");
                            main_health.ok("consumer", format!("last error: {e}"));
                        }
                    },
                    _ = main_stopped.changed() => break,
                }
            }
        });
    })?;

    // Lag in records, from the partitions' high watermarks.
    let lag_consumer = Arc::clone(&consumer);
    let lag_topic = topic.clone();
    // A plain thread: it must not keep the runtime from shutting down.
    let _lag_thread = std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(5));
        let Ok(assignment) = lag_consumer.assignment() else {
            continue;
        };
        let positions = lag_consumer.position().unwrap_or_default();
        for e in assignment.elements() {
            if e.topic() != lag_topic {
                continue;
            }
            let Ok((_, high)) =
                lag_consumer.fetch_watermarks(&lag_topic, e.partition(), Duration::from_secs(5))
            else {
                continue;
            };
            let at = positions
                .find_partition(&lag_topic, e.partition())
                .and_then(|p| p.offset().to_raw())
                .filter(|o| *o >= 0);
            if let Some(at) = at {
                metrics::gauge!("sink_lag_records", "partition" => e.partition().to_string())
                    .set((high - at).max(0) as f64);
            }
        }
    });

    let _ = shutdown.changed().await;
    tracing::info!("stopping: finishing the lanes' current transactions");
    let all: Vec<i32> = (0..partitions as i32).collect();
    {
        let ctx = consumer.context();
        let ctx_ptr: &Context = ctx;
        ctx_ptr.stop_lanes(&all);
    }
    if let Err(e) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
        tracing::debug!("final offset commit: {e}");
    }
    let _ = stop_main.send(true);
    let _ = main.join();
    for t in tasks {
        t.abort();
    }
    tracing::info!("stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::consumer::BaseConsumer;

    fn config(properties: &str) -> Config {
        crate::config::for_tests(&format!("[kafka.properties]\n{properties}"))
    }

    /// librdkafka accepts the consumer's settings (it checks `fetch.max.bytes` against
    /// `message.max.bytes` when the client is created), also when `kafka.properties` raises
    /// `message.max.bytes` for the dead-letter producer.
    #[test]
    fn consumer_settings_are_accepted_and_the_fetch_size_follows_message_max_bytes() {
        for (properties, fetch) in [
            ("", "262144"),
            ("\"message.max.bytes\" = \"2000000\"", "2000000"),
            ("\"message.max.bytes\" = \"1000\"", "262144"),
            (
                "\"fetch.max.bytes\" = \"1048576\"\n\"message.max.bytes\" = \"1048576\"",
                "1048576",
            ),
        ] {
            let c = consumer_config(&config(properties), 4);
            assert_eq!(c.get("fetch.max.bytes"), Some(fetch), "{properties}");
            c.create::<BaseConsumer>()
                .unwrap_or_else(|e| panic!("{properties}: {e}"));
        }
    }
}
