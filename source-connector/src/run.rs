//! The `run` command: prepare the topics, load the checkpoint, and keep a replica session
//! going, reconnecting with capped backoff and jitter.

use crate::checkpoint;
use crate::cluster;
use crate::config::{Config, Endpoint};
use crate::migration;
use crate::publish::{self, Publisher};
use crate::replica::{self, LinkError, Next, Shared};
use crate::sentinel::{self, Sentinels};
use metrics::{counter, gauge};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use service::backoff::Backoff;
pub use service::kafka::partition_count;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tracing::Instrument;

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

/// Node ids of a cluster shard's master and replicas, shared by its loop and the topology
/// watcher: a replica either of them sees (one a failover may promote) is known to both. A
/// replica missing from the first `CLUSTER NODES` (a cluster just formed) once left a shard's
/// loop unable to follow the failover the watcher had seen.
#[derive(Debug, Clone, Default)]
struct Members(Arc<Mutex<Vec<String>>>);

impl Members {
    fn new(ids: Vec<String>) -> Members {
        Members(Arc::new(Mutex::new(ids)))
    }

    fn contains(&self, id: &str) -> bool {
        self.0.lock().is_ok_and(|m| m.iter().any(|n| n == id))
    }

    /// Adds the ids not known yet, and returns them.
    fn add(&self, ids: &[String]) -> Vec<String> {
        let Ok(mut m) = self.0.lock() else {
            return Vec::new();
        };
        let new: Vec<String> = ids.iter().filter(|id| !m.contains(id)).cloned().collect();
        m.extend(new.iter().cloned());
        new
    }

    fn list(&self) -> Vec<String> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// How a cluster shard finds its master again: the node ids that belong to it (the master and
/// its replicas, one of which a failover promotes) and the nodes to ask.
#[derive(Debug)]
struct Follow {
    members: Members,
    /// The nodes to ask, the configured one last (`node_endpoints`).
    seeds: Arc<Mutex<Vec<Endpoint>>>,
    /// Set by the topology watcher when the shard's master changed: the session ends cleanly
    /// (what Kafka acknowledged is checkpointed) and the loop reconnects to the new master.
    relink: watch::Receiver<()>,
    migrations: Arc<migration::Migrations>,
    tls: crate::tls::TlsFiles,
    /// The slots the shard serves, as the watcher sees them.
    scope: watch::Receiver<Vec<(u16, u16)>>,
}

/// Whether the source is a cluster, asking the seed until it answers.
async fn topology(
    ctx: &ShardContext,
    endpoint: &Endpoint,
) -> anyhow::Result<Option<Vec<cluster::Master>>> {
    let timeout = Duration::from_secs(ctx.config.redis.timeout_s);
    let mut backoff = link_backoff(&ctx.config);
    let mut shutdown = ctx.shutdown.clone();
    loop {
        let wait = backoff.next_wait();
        let seed = endpoint.clone();
        let tls = ctx.config.redis.tls.clone();
        let answer =
            tokio::task::spawn_blocking(move || cluster::discover(&seed, &tls, timeout)).await?;
        match answer {
            Ok(None) => return Ok(None),
            Ok(Some(masters)) if !masters.is_empty() => return Ok(Some(masters)),
            Ok(Some(_)) => tracing::error!(
                "source {}: cluster mode but no master serves slots yet; retrying",
                endpoint.address()
            ),
            Err(e) => tracing::error!("{e}; retrying in {wait:?}"),
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            return Ok(None);
        }
    }
}

/// A cluster source: a loop per master shard, and a watcher that notices failovers and new
/// shards every `redis.cluster_refresh_s`.
async fn run_cluster(
    ctx: ShardContext,
    seed: Endpoint,
    masters: Vec<cluster::Master>,
) -> anyhow::Result<()> {
    let base = ctx.config.shard_name();
    let existing = {
        let client = ctx.client.clone();
        let topic = ctx.checkpoint_topic.clone();
        tokio::task::spawn_blocking(move || checkpoint::load_all(&client, &topic)).await??
    };
    let checkpoint::Stored {
        checkpoints: existing,
        imports,
    } = existing;
    let seeds = Arc::new(Mutex::new(node_endpoints(&seed, &masters)));
    let migrations = Arc::new(migration::Migrations::default());
    if !imports.is_empty() {
        tracing::info!(
            "{} key(s) imported by a shard during a slot migration are remembered from {}: deletes of them replayed by their old shard are MIGRATE's own and will be dropped",
            imports.len(),
            ctx.checkpoint_topic
        );
        migrations.restore(imports);
    }
    let mut tasks = tokio::task::JoinSet::new();
    // Per shard: its name, its members, and how to tell its loop to relink.
    let mut shards: Vec<Watched> = Vec::new();
    let spawn = |master: &cluster::Master,
                 shards: &mut Vec<Watched>,
                 tasks: &mut tokio::task::JoinSet<anyhow::Result<()>>| {
        let members: Vec<String> = std::iter::once(master.id.clone())
            .chain(master.replicas.iter().cloned())
            .collect();
        let taken: Vec<&str> = shards.iter().map(|w| w.shard.as_str()).collect();
        let Some(shard) = shard_name(&base, master, &members, &existing, &taken) else {
            return;
        };
        let (tx, rx) = watch::channel(());
        let (scope_tx, scope_rx) = watch::channel(master.slots.clone());
        tracing::info!(shard = %shard, "cluster shard served by {} (slots {})", master.address(), ranges_text(&master.slots));
        gauge!("source_cluster_shards").increment(1.0);
        let members = Members::new(members);
        let follow = Follow {
            members: members.clone(),
            seeds: Arc::clone(&seeds),
            relink: rx,
            migrations: Arc::clone(&migrations),
            tls: ctx.config.redis.tls.clone(),
            scope: scope_rx,
        };
        let endpoint = cluster::at(&seed, &master.host, master.port);
        let loaded = existing.get(&shard).cloned();
        // The shard stops with the process, or alone when the watcher retires it.
        let (stop, stopped) = watch::channel(false);
        let mut process_stops = ctx.shutdown.clone();
        let forward = stop.clone();
        tokio::spawn(async move {
            if process_stops.wait_for(|stop| *stop).await.is_ok() {
                let _ = forward.send(true);
            }
        });
        let span = tracing::info_span!("replication", shard = %shard);
        tasks.spawn(
            shard_loop(
                ShardContext {
                    shutdown: stopped,
                    ..ctx.clone()
                },
                shard.clone(),
                endpoint,
                loaded,
                Some(follow),
            )
            .instrument(span),
        );
        shards.push(Watched {
            shard,
            members,
            relink: tx,
            scope: scope_tx,
            master: master.id.clone(),
            stop,
            absent: 0,
        });
    };
    for m in &masters {
        spawn(m, &mut shards, &mut tasks);
    }
    let refresh = Duration::from_secs(ctx.config.redis.cluster_refresh_s.max(1));
    let timeout = Duration::from_secs(ctx.config.redis.timeout_s);
    let mut shutdown = ctx.shutdown.clone();
    loop {
        tokio::select! {
            done = tasks.join_next() => {
                match done {
                    // A shard loop ends on shutdown, when its work is done (sync.mode = "full"),
                    // or on a fatal error, which ends the connector.
                    Some(Ok(Ok(()))) => continue,
                    None => return Ok(()),
                    Some(Ok(Err(e))) => return Err(e),
                    Some(Err(e)) => anyhow::bail!("a shard loop panicked: {e}"),
                }
            }
            _ = tokio::time::sleep(refresh) => {}
            _ = shutdown.changed() => {}
        }
        if *shutdown.borrow() {
            while tasks.join_next().await.is_some() {}
            return Ok(());
        }
        let known = seeds.lock().map(|s| s.clone()).unwrap_or_default();
        let tls = ctx.config.redis.tls.clone();
        let masters =
            match tokio::task::spawn_blocking(move || cluster::discover_any(&known, &tls, timeout))
                .await?
            {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!("cluster topology refresh: {e}");
                    continue;
                }
            };
        if let Ok(mut s) = seeds.lock() {
            *s = node_endpoints(&seed, &masters);
        }
        for m in &masters {
            match shards.iter_mut().find(|w| w.members.contains(&m.id)) {
                Some(w) => {
                    // Replicas added since: they may be promoted later.
                    let joined = w.members.add(&m.replicas);
                    if !joined.is_empty() {
                        tracing::info!(shard = %w.shard, "new replica(s) of the shard's master: {}", joined.join(", "));
                    }
                    if w.master != m.id {
                        tracing::warn!(shard = %w.shard, "the shard's master is now {} ({}): failover; relinking with the last checkpoint", m.address(), m.id);
                        counter!("source_cluster_failovers_total", "shard" => w.shard.clone())
                            .increment(1);
                        w.master = m.id.clone();
                        let _ = w.scope.send(m.slots.clone());
                        let _ = w.relink.send(());
                    } else if *w.scope.borrow() != m.slots {
                        tracing::info!(shard = %w.shard, "the shard now serves slots {}", ranges_text(&m.slots));
                        let _ = w.scope.send(m.slots.clone());
                    }
                }
                None => {
                    tracing::info!("new cluster shard: master {} ({})", m.address(), m.id);
                    spawn(m, &mut shards, &mut tasks);
                }
            }
        }
        // A shard none of whose nodes is a master with slots any more (its slots all moved to
        // other shards, or its nodes left the cluster) has nothing left to replicate: after a
        // few refreshes (a failover or a reshard in progress looks the same for a moment) its
        // link stops with a final checkpoint. Should its nodes serve slots again, it comes back
        // as a new shard under its old name.
        shards.retain_mut(|w| {
            if masters.iter().any(|m| w.members.contains(&m.id)) {
                w.absent = 0;
                return true;
            }
            w.absent += 1;
            if w.absent < RETIRE_AFTER_REFRESHES {
                return true;
            }
            tracing::info!(shard = %w.shard, "none of the shard's nodes ({}) is a master with slots any more (its slots moved to other shards, or it left the cluster): stopping its link after a final checkpoint", w.members.list().join(", "));
            gauge!("source_cluster_shards").decrement(1.0);
            counter!("source_cluster_shards_retired_total").increment(1);
            let _ = w.stop.send(true);
            false
        });
    }
}

/// Topology refreshes in a row without a master with slots before a shard's link stops.
const RETIRE_AFTER_REFRESHES: u32 = 3;

/// The name of the shard `master` leads: the one its checkpoint was saved under when one of its
/// nodes belonged to a shard before (so a restart after slots moved keeps the history), else
/// `<base>/<lowest slot>`.
fn shard_name(
    base: &str,
    master: &cluster::Master,
    members: &[String],
    existing: &std::collections::HashMap<String, checkpoint::Checkpoint>,
    taken: &[&str],
) -> Option<String> {
    let prefix = format!("{base}/");
    let mut known: Vec<&String> = existing
        .iter()
        .filter(|(name, c)| {
            name.starts_with(&prefix)
                && !taken.contains(&name.as_str())
                && c.nodes.iter().any(|n| members.contains(n))
        })
        .map(|(name, _)| name)
        .collect();
    known.sort();
    if let Some(name) = known.first() {
        return Some((*name).clone());
    }
    let name = format!("{base}/{}", master.anchor()?);
    if existing.contains_key(&name) || taken.contains(&name.as_str()) {
        // That name's history belongs to other nodes.
        return Some(format!("{name}-{}", &master.id[..master.id.len().min(8)]));
    }
    Some(name)
}

/// A cluster shard as the topology watcher last saw it.
struct Watched {
    shard: String,
    /// Node ids of the master and replicas that belong to it.
    members: Members,
    relink: watch::Sender<()>,
    scope: watch::Sender<Vec<(u16, u16)>>,
    /// Node id of its master.
    master: String,
    /// Stops this shard's loop alone.
    stop: watch::Sender<bool>,
    /// Refreshes in a row in which none of its nodes was a master with slots.
    absent: u32,
}

fn node_endpoints(seed: &Endpoint, masters: &[cluster::Master]) -> Vec<Endpoint> {
    let mut v: Vec<Endpoint> = masters
        .iter()
        .map(|m| cluster::at(seed, &m.host, m.port))
        .collect();
    v.push(seed.clone());
    v
}

fn ranges_text(ranges: &[(u16, u16)]) -> String {
    ranges
        .iter()
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}-{b}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Finds the shard's master now: the master among its member nodes.
async fn resolve(
    shard: &str,
    follow: &mut Follow,
    timeout: Duration,
) -> Result<cluster::Master, LinkError> {
    let known = follow.seeds.lock().map(|s| s.clone()).unwrap_or_default();
    let tls = follow.tls.clone();
    let masters = tokio::task::spawn_blocking(move || cluster::discover_any(&known, &tls, timeout))
        .await
        .map_err(|e| LinkError::Transient(e.to_string()))?
        .map_err(LinkError::Transient)?;
    let master = masters
        .into_iter()
        .find(|m| follow.members.contains(&m.id))
        .ok_or_else(|| {
            LinkError::Transient(format!(
                "cluster shard {shard}: none of its nodes ({}) is a master with slots now",
                follow.members.list().join(", ")
            ))
        })?;
    let _ = follow.members.add(&master.replicas);
    Ok(master)
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

/// The master's endpoint from the Sentinels, asking again (with backoff) while none answers; an
/// error when they answer but none knows the master's name.
async fn sentinel_master(sentinels: &Sentinels, endpoint: &Endpoint) -> anyhow::Result<Endpoint> {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
    loop {
        let (s, e) = (sentinels.clone(), endpoint.clone());
        match tokio::task::spawn_blocking(move || s.master_endpoint(&e)).await? {
            Ok(endpoint) => return Ok(endpoint),
            Err(e) if e.is_fatal() => anyhow::bail!("{e}"),
            Err(e) => {
                let wait = backoff.next_wait();
                tracing::warn!("{e}; asking again in {wait:?}");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// A session with the master the Sentinels name now, ended cleanly (what Kafka acknowledged
/// is checkpointed) as soon as they name another: the next session continues there with PSYNC.
async fn sentinel_session(
    sentinels: &Sentinels,
    config: &Config,
    shared: &mut Shared,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), LinkError> {
    let (s, e) = (sentinels.clone(), shared.endpoint.clone());
    let endpoint = tokio::task::spawn_blocking(move || s.master_endpoint(&e))
        .await
        .map_err(|e| LinkError::Transient(format!("Sentinel query failed: {e}")))?
        .map_err(|e| match e.is_fatal() {
            true => LinkError::Fatal(e.to_string()),
            false => LinkError::Transient(e.to_string()),
        })?;
    if endpoint.address() != shared.endpoint.address() {
        tracing::warn!(
            shard = %shared.shard,
            "Sentinel: master {:?} moved from {} to {}: continuing there (PSYNC from the checkpoint)",
            sentinels.master_name(),
            shared.endpoint.address(),
            endpoint.address()
        );
        counter!("source_sentinel_switches_total", "shard" => shared.shard.clone()).increment(1);
        shared.endpoint = endpoint;
    }
    let (moved, relink) = watch::channel(());
    let watcher = {
        let sentinels = sentinels.clone();
        let current = shared.endpoint.address();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(sentinel::POLL).await;
                let s = sentinels.clone();
                let now = tokio::task::spawn_blocking(move || s.master()).await;
                if let Ok(Ok((host, port))) = now {
                    if format!("{host}:{port}") != current {
                        let _ = moved.send(());
                        return;
                    }
                }
            }
        })
    };
    let result = session(config, shared, shutdown, Some(relink)).await;
    watcher.abort();
    result
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

#[cfg(test)]
mod tests {
    use super::*;
    use checkpoint::Checkpoint;

    fn master(id: &str, slots: Vec<(u16, u16)>) -> cluster::Master {
        cluster::Master {
            id: id.into(),
            host: "h".into(),
            port: 1,
            slots,
            replicas: Vec::new(),
        }
    }

    fn saved(nodes: &[&str]) -> Checkpoint {
        Checkpoint {
            replid: "r".into(),
            offset: 1,
            epoch: 1,
            snapshot_done: true,
            written_ms: 0,
            nodes: nodes.iter().map(|n| n.to_string()).collect(),
        }
    }

    #[test]
    fn a_shard_keeps_its_name_when_its_lowest_slot_moved() {
        let existing: std::collections::HashMap<String, Checkpoint> = [
            ("prod/0".to_string(), saved(&["aaaa", "bbbb"])),
            ("prod/5461".to_string(), saved(&["cccc"])),
        ]
        .into();
        let name = |m: &cluster::Master, members: &[&str], taken: &[&str]| {
            let members: Vec<String> = members.iter().map(|s| s.to_string()).collect();
            shard_name("prod", m, &members, &existing, taken)
        };
        // The promoted replica bbbb now serves 100-5460: still prod/0.
        let m = master("bbbb", vec![(100, 5460)]);
        assert_eq!(name(&m, &["bbbb"], &[]).as_deref(), Some("prod/0"));
        // A new master: named by its lowest slot.
        let m = master("dddd0000ffff", vec![(12000, 16383)]);
        assert_eq!(
            name(&m, &["dddd0000ffff"], &[]).as_deref(),
            Some("prod/12000")
        );
        // Its lowest slot's name belongs to other nodes' history.
        let m = master("eeee1111ffff", vec![(5461, 6000)]);
        assert_eq!(
            name(&m, &["eeee1111ffff"], &[]).as_deref(),
            Some("prod/5461-eeee1111")
        );
        // The history its node is in is already followed by a running shard.
        let m = master("cccc", vec![(0, 10)]);
        assert_eq!(
            name(&m, &["cccc"], &["prod/5461"]).as_deref(),
            Some("prod/0-cccc")
        );
    }
}
