//! The `run` command: prepare the topics, load the checkpoint, and keep a replica session
//! going, reconnecting with capped backoff and jitter.

use crate::checkpoint;
use crate::cluster;
use crate::config::{Config, Endpoint};
use crate::publish::{self, Publisher};
use crate::replica::{self, LinkError, Next, Shared};
use crate::sentinel::Sentinels;
use metrics::counter;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use service::backoff::Backoff;
pub use service::kafka::partition_count;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::Instrument;

mod cluster_source;
mod sentinel_source;

use cluster_source::{resolve, run_cluster, topology, Follow};
use sentinel_source::{sentinel_master, sentinel_session};

/// Checks that `topic` exists with `partitions` partitions, creating it when allowed.
pub async fn prepare_topic(
    client: &rdkafka::ClientConfig,
    topic: &str,
    partitions: u32,
    create: bool,
    replication: i32,
    topic_config: &[(&str, &str)],
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
            for (k, v) in topic_config {
                new = new.set(k, v);
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

/// Runs the connector until shutdown or a fatal error: one replica link for a standalone
/// source, one per master shard for a cluster (found from any node, and followed through
/// failovers and new shards).
pub async fn run(config: Config, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
    let endpoint = Endpoint::parse(&config.redis.url)?;
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
        // The topic accepts the largest record the connector is configured to write.
        &[(
            "max.message.bytes",
            &config.kafka.max_message_bytes.to_string(),
        )],
    )
    .await?;
    prepare_topic(
        &client,
        &checkpoint_topic,
        1,
        config.kafka.create_topic,
        config.kafka.replication_factor,
        &[("cleanup.policy", "compact")],
    )
    .await?;
    // Fail early on bad Kafka settings; each session then gets a fresh producer, so a producer
    // that hit a fatal error (an idempotence failure after a broker lost state) is not reused.
    publish::check_settings(&config.kafka)?;
    let ctx = ShardContext {
        config: config.clone(),
        client,
        checkpoint_topic,
        shutdown,
    };
    // Behind Sentinel: the master is wherever the Sentinels say; the link asks again before
    // each connection (`shard_loop`).
    let endpoint = match Sentinels::of(&config) {
        Some(sentinels) => {
            let mut shutdown = ctx.shutdown.clone();
            let endpoint = tokio::select! {
                e = sentinel_master(&sentinels, &endpoint) => e?,
                _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
            };
            tracing::info!(
                "Sentinel: master {:?} is at {}",
                sentinels.master_name(),
                endpoint.address()
            );
            endpoint
        }
        None => endpoint,
    };
    match topology(&ctx, &endpoint).await? {
        None => {
            let shard = config.shard_name();
            let loaded = {
                let (client, topic, shard) = (
                    ctx.client.clone(),
                    ctx.checkpoint_topic.clone(),
                    shard.clone(),
                );
                tokio::task::spawn_blocking(move || checkpoint::load(&client, &topic, &shard))
                    .await??
            };
            let span = tracing::info_span!("replication", shard = %shard);
            shard_loop(ctx.clone(), shard, endpoint, loaded, None)
                .instrument(span)
                .await
        }
        Some(masters) => run_cluster(ctx, endpoint, masters).await,
    }
}

/// What every shard's loop shares.
#[derive(Clone)]
struct ShardContext {
    config: Config,
    client: rdkafka::ClientConfig,
    checkpoint_topic: String,
    shutdown: watch::Receiver<bool>,
}

/// One source shard: load its checkpoint and keep a replica session going, reconnecting with
/// capped backoff and jitter (and, for a cluster shard, to whichever node is its master now).
async fn shard_loop(
    ctx: ShardContext,
    shard: String,
    endpoint: Endpoint,
    loaded: Option<checkpoint::Checkpoint>,
    mut follow: Option<Follow>,
) -> anyhow::Result<()> {
    let config = ctx.config.clone();
    let mut shutdown = ctx.shutdown.clone();
    match &loaded {
        Some(c) => {
            tracing::info!(shard = %shard, "resuming from checkpoint: epoch {}, offset {}, snapshot {}", c.epoch, c.offset, if c.snapshot_done { "complete" } else { "incomplete (a full sync follows)" })
        }
        None => {
            tracing::info!(shard = %shard, "no checkpoint in {}: starting with a full sync", ctx.checkpoint_topic)
        }
    }
    if config.sync.mode == crate::config::SyncMode::Full {
        if let Some(c) = loaded.as_ref().filter(|c| c.snapshot_done) {
            tracing::info!(shard = %shard, "sync.mode = \"full\": the snapshot of epoch {} is already in Kafka; nothing left to do", c.epoch);
            return Ok(());
        }
    }
    let mut shared = Shared {
        config: config.clone(),
        shard: shard.clone(),
        checkpoint_topic: ctx.checkpoint_topic.clone(),
        endpoint,
        checkpoint: loaded,
        scope: follow
            .as_ref()
            .map_or_else(|| watch::channel(Vec::new()).1, |f| f.scope.clone()),
        migrations: follow.as_ref().map(|f| Arc::clone(&f.migrations)),
        nodes: Vec::new(),
    };
    let timeout = Duration::from_secs(config.redis.timeout_s);
    let mut backoff = link_backoff(&config);
    let sentinels = Sentinels::of(&config).filter(|_| follow.is_none());
    loop {
        let started = std::time::Instant::now();
        let result = match follow.as_mut() {
            None => match &sentinels {
                None => session(&config, &mut shared, &mut shutdown, None).await,
                Some(sentinels) => {
                    sentinel_session(sentinels, &config, &mut shared, &mut shutdown).await
                }
            },
            Some(f) => match resolve(&shard, f, timeout).await {
                Ok(m) => {
                    shared.endpoint = cluster::at(&shared.endpoint, &m.host, m.port);
                    shared.nodes = f.members.list();
                    f.relink.borrow_and_update();
                    session(&config, &mut shared, &mut shutdown, Some(f.relink.clone())).await
                }
                Err(e) => Err(e),
            },
        };
        if *shutdown.borrow() {
            tracing::info!(shard = %shard, "stopped");
            return Ok(());
        }
        let e = match result {
            Ok(()) => continue,
            Err(e) => e,
        };
        let reason = match e.next() {
            Next::Reconnect => "transient",
            Next::Exit => "fatal",
            Next::Finish => {
                tracing::info!(shard = %shard, "{e}");
                return Ok(());
            }
        };
        counter!("source_link_errors_total", "shard" => shard.clone(), "kind" => reason)
            .increment(1);
        if e.next() == Next::Exit {
            anyhow::bail!("{e}");
        }
        if started.elapsed() > Duration::from_secs(30) {
            backoff.reset();
        }
        let wait = backoff.next_wait();
        tracing::error!(shard = %shard, "{e}; retrying in {wait:?}");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return Ok(());
        }
    }
}

/// One replica session with a fresh producer. It ends cleanly (checkpointing what Kafka
/// acknowledged) on shutdown, or when `relink` fires.
async fn session(
    config: &Config,
    shared: &mut Shared,
    shutdown: &mut watch::Receiver<bool>,
    relink: Option<watch::Receiver<()>>,
) -> Result<(), LinkError> {
    let producer = publish::producer(&config.kafka, &shared.shard)
        .map_err(|e| LinkError::Fatal(e.to_string()))?;
    let mut publisher = Publisher::new(
        producer.clone(),
        config.kafka.topic.clone(),
        config.kafka.max_message_bytes,
    );
    let (stop_tx, mut stop) = watch::channel(false);
    let forward = {
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            match relink {
                Some(mut relink) => tokio::select! {
                    _ = shutdown.changed() => {}
                    _ = relink.changed() => {}
                },
                None => {
                    let _ = shutdown.changed().await;
                }
            }
            let _ = stop_tx.send(true);
        })
    };
    if *shutdown.borrow() {
        forward.abort();
        return Ok(());
    }
    let result = replica::session(shared, &mut publisher, &mut stop).await;
    forward.abort();
    drop(publisher);
    // The process is about to stop: deliver what was published before the end (dropping the
    // producer would purge it). A transient error starts a new session, which republishes from
    // the checkpoint instead.
    let stopping = *shutdown.borrow()
        || result
            .as_ref()
            .is_err_and(|e| matches!(e.next(), Next::Exit | Next::Finish));
    if stopping {
        let _ = rdkafka::producer::Producer::flush(&producer, Duration::from_secs(10));
    }
    result
}

/// Reconnecting to the source: from 250 ms up to `redis.max_backoff_s`.
fn link_backoff(config: &Config) -> Backoff {
    let max = Duration::from_secs(config.redis.max_backoff_s.max(1));
    Backoff::new(Duration::from_millis(250), max)
}
