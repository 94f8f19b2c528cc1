//! The `run` command: prepare the topics, load the checkpoint, and keep a replica session
//! going, reconnecting with capped backoff and jitter.

use crate::checkpoint;
use crate::config::{Config, Endpoint};
use crate::publish::{self, Publisher};
use crate::replica::{self, LinkError, Shared};
use metrics::counter;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;
use std::time::Duration;
use tokio::sync::watch;

/// Checks that `topic` exists with `partitions` partitions, creating it when allowed.
pub async fn prepare_topic(
    client: &rdkafka::ClientConfig,
    topic: &str,
    partitions: u32,
    create: bool,
    replication: i32,
    compact: bool,
) -> anyhow::Result<()> {
    let current = partition_count(client, topic)?;
    match current {
        Some(n) if n == partitions => Ok(()),
        Some(n) => anyhow::bail!(
            "topic {topic} has {n} partitions but kafka.partitions = {partitions}: the slot-to-partition mapping would change; use a new topic or fix the setting"
        ),
        None if !create => anyhow::bail!(
            "topic {topic} does not exist and kafka.create_topic = false"
        ),
        None => {
            let admin: AdminClient<DefaultClientContext> = client
                .create()
                .map_err(|e| anyhow::anyhow!("cannot create a Kafka admin client: {e}"))?;
            let mut new = NewTopic::new(topic, partitions as i32, TopicReplication::Fixed(replication));
            if compact {
                new = new.set("cleanup.policy", "compact");
            }
            let results = admin
                .create_topics([&new], &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))))
                .await
                .map_err(|e| anyhow::anyhow!("cannot create topic {topic}: {e}"))?;
            for r in results {
                match r {
                    Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                    Err((name, code)) => anyhow::bail!("cannot create topic {name}: {code}"),
                }
            }
            tracing::info!("created topic {topic} with {partitions} partitions");
            // Wait until metadata shows it.
            for _ in 0..100 {
                if partition_count(client, topic)? == Some(partitions) {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::bail!("topic {topic} was created but does not show {partitions} partitions")
        }
    }
}

/// Partitions of `topic`, or `None` when it does not exist.
pub fn partition_count(client: &rdkafka::ClientConfig, topic: &str) -> anyhow::Result<Option<u32>> {
    let consumer: BaseConsumer = client
        .create()
        .map_err(|e| anyhow::anyhow!("cannot create a Kafka client: {e}"))?;
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot reach Kafka at {}: {e}",
                client.get("bootstrap.servers").unwrap_or("?")
            )
        })?;
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    if t.error().is_some() || t.partitions().is_empty() {
        return Ok(None);
    }
    Ok(Some(t.partitions().len() as u32))
}

/// Runs the connector until shutdown or a fatal error.
pub async fn run(config: Config, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let endpoint = Endpoint::parse(&config.redis.url)?;
    let shard = config.shard_name();
    let checkpoint_topic = config.checkpoint_topic();
    let client = service::kafka::client_config(
        &config.kafka.bootstrap_servers,
        &[],
        &config.kafka.properties,
    );
    prepare_topic(
        &client,
        &config.kafka.topic,
        config.kafka.partitions,
        config.kafka.create_topic,
        config.kafka.replication_factor,
        false,
    )
    .await?;
    prepare_topic(
        &client,
        &checkpoint_topic,
        1,
        config.kafka.create_topic,
        config.kafka.replication_factor,
        true,
    )
    .await?;
    let loaded = {
        let client = client.clone();
        let topic = checkpoint_topic.clone();
        let shard = shard.clone();
        tokio::task::spawn_blocking(move || checkpoint::load(&client, &topic, &shard)).await??
    };
    match &loaded {
        Some(c) => {
            tracing::info!(shard = %shard, "resuming from checkpoint: epoch {}, offset {}, snapshot {}", c.epoch, c.offset, if c.snapshot_done { "complete" } else { "incomplete (a full sync follows)" })
        }
        None => {
            tracing::info!(shard = %shard, "no checkpoint in {checkpoint_topic}: starting with a full sync")
        }
    }
    // Fail early on bad Kafka settings; each session then gets a fresh producer, so a producer
    // that hit a fatal error (an idempotence failure after a broker lost state) is not reused.
    drop(publish::producer(&config.kafka)?);
    let mut shared = Shared {
        config: config.clone(),
        shard: shard.clone(),
        checkpoint_topic,
        endpoint,
        checkpoint: loaded,
    };
    let max_backoff = Duration::from_secs(config.redis.max_backoff_s.max(1));
    let mut backoff = Duration::from_millis(250);
    loop {
        let producer = publish::producer(&config.kafka)?;
        let mut publisher = Publisher::new(
            producer.clone(),
            config.kafka.topic.clone(),
            shard.clone(),
            config.kafka.max_in_flight_bytes,
            config.kafka.max_message_bytes,
        );
        let started = std::time::Instant::now();
        let result = replica::session(&mut shared, &mut publisher, &mut shutdown).await;
        drop(publisher);
        if *shutdown.borrow() {
            let _ = rdkafka::producer::Producer::flush(&producer, Duration::from_secs(10));
            tracing::info!(shard = %shard, "stopped");
            return Ok(());
        }
        let e = match result {
            Ok(()) => continue,
            Err(e) => e,
        };
        let reason = match &e {
            LinkError::Transient(_) => "transient",
            LinkError::Fatal(_) => "fatal",
        };
        if let LinkError::Fatal(message) = e {
            counter!("source_link_errors_total", "shard" => shard.clone(), "kind" => reason)
                .increment(1);
            anyhow::bail!("{message}");
        }
        counter!("source_link_errors_total", "shard" => shard.clone(), "kind" => reason)
            .increment(1);
        if started.elapsed() > Duration::from_secs(30) {
            backoff = Duration::from_millis(250);
        }
        let wait = backoff;
        let jitter = Duration::from_millis(rand_ms(wait.as_millis() as u64 / 4 + 1));
        tracing::error!(shard = %shard, "{e}; retrying in {:?}", wait + jitter);
        tokio::select! {
            _ = tokio::time::sleep(wait + jitter) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return Ok(());
        }
        backoff = (backoff * 2).min(max_backoff);
    }
}

fn rand_ms(max: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    nanos % max.max(1)
}
