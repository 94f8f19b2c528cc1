//! Cluster sources: the topology watcher and a replica link per master shard, each shard named
//! and found again after failovers and slot moves (ADR 0007).

use super::{link_backoff, shard_loop, ShardContext};
use crate::checkpoint;
use crate::cluster;
use crate::config::Endpoint;
use crate::migration;
use crate::replica::LinkError;
use metrics::{counter, gauge};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;
use tracing::Instrument;

/// Node ids of a cluster shard's master and replicas, shared by its loop and the topology
/// watcher: a replica either of them sees (one a failover may promote) is known to both. A
/// replica missing from the first `CLUSTER NODES` (a cluster just formed) once left a shard's
/// loop unable to follow the failover the watcher had seen.
#[derive(Debug, Clone, Default)]
pub(super) struct Members(Arc<Mutex<Vec<String>>>);

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

    pub(super) fn list(&self) -> Vec<String> {
        self.0.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

/// How a cluster shard finds its master again: the node ids that belong to it (the master and
/// its replicas, one of which a failover promotes) and the nodes to ask.
#[derive(Debug)]
pub(super) struct Follow {
    pub(super) members: Members,
    /// The nodes to ask, the configured one last (`node_endpoints`).
    pub(super) seeds: Arc<Mutex<Vec<Endpoint>>>,
    /// Set by the topology watcher when the shard's master changed: the session ends cleanly
    /// (what Kafka acknowledged is checkpointed) and the loop reconnects to the new master.
    pub(super) relink: watch::Receiver<()>,
    pub(super) migrations: Arc<migration::Migrations>,
    pub(super) tls: crate::tls::TlsFiles,
    /// The slots the shard serves, as the watcher sees them.
    pub(super) scope: watch::Receiver<Vec<(u16, u16)>>,
}

/// Whether the source is a cluster, asking the seed until it answers.
pub(super) async fn topology(
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
pub(super) async fn run_cluster(
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
pub(super) const RETIRE_AFTER_REFRESHES: u32 = 3;

/// The name of the shard `master` leads: the one its checkpoint was saved under when one of its
/// nodes belonged to a shard before (so a restart after slots moved keeps the history), else
/// `<base>/<lowest slot>`.
pub(super) fn shard_name(
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
pub(super) struct Watched {
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

pub(super) fn node_endpoints(seed: &Endpoint, masters: &[cluster::Master]) -> Vec<Endpoint> {
    let mut v: Vec<Endpoint> = masters
        .iter()
        .map(|m| cluster::at(seed, &m.host, m.port))
        .collect();
    v.push(seed.clone());
    v
}

pub(super) fn ranges_text(ranges: &[(u16, u16)]) -> String {
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
pub(super) async fn resolve(
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
