//! A Redis Cluster of N masters with replicas, formed with `redis-cli --cluster create`.

use crate::process::WorkDir;
use crate::redis::{cli_bin, RedisConfig, RedisServer};
use crate::wait_for;
use std::process::Command;
use std::time::Duration;

#[derive(Debug)]
pub struct RedisCluster {
    // Servers are dropped before the directory they live in.
    nodes: Vec<RedisServer>,
    /// Client ports nodes advertise instead of their own (`announce_port`): advertised → own.
    announced: std::sync::Mutex<std::collections::HashMap<u16, u16>>,
    /// How its nodes were started (for nodes added later).
    config: RedisConfig,
    dir: WorkDir,
}

impl RedisCluster {
    /// Starts `masters * (1 + replicas)` nodes and forms a cluster with all slots covered.
    pub fn start(
        masters: usize,
        replicas: usize,
        config: RedisConfig,
    ) -> anyhow::Result<RedisCluster> {
        anyhow::ensure!(masters >= 1, "a cluster needs at least one master");
        let dir = WorkDir::new("cluster")?;
        let mut nodes = Vec::new();
        for i in 0..masters * (1 + replicas) {
            let cfg = RedisConfig {
                cluster_enabled: true,
                ..config.clone()
            };
            nodes.push(RedisServer::start_in(
                cfg,
                dir.subdir(&format!("node-{i}"))?,
            )?);
        }
        if masters < 3 {
            // `redis-cli --cluster create` wants three masters; smaller clusters (a 3 → 2
            // migration target) are formed by hand.
            anyhow::ensure!(
                replicas == 0,
                "a cluster of fewer than 3 masters has no replicas here"
            );
            let per = 16384 / masters;
            for (i, node) in nodes.iter().enumerate() {
                let first = (i * per).to_string();
                let last = if i + 1 == masters {
                    16383
                } else {
                    (i + 1) * per - 1
                }
                .to_string();
                let _: () = node.cmd(&["CLUSTER", "SET-CONFIG-EPOCH", &(i + 1).to_string()])?;
                let _: () = node.cmd(&["CLUSTER", "ADDSLOTSRANGE", &first, &last])?;
            }
            for node in &nodes[1..] {
                let _: () =
                    node.cmd(&["CLUSTER", "MEET", "127.0.0.1", &nodes[0].port().to_string()])?;
            }
            let cluster = RedisCluster {
                nodes,
                announced: Default::default(),
                config,
                dir,
            };
            cluster.wait_stable()?;
            return Ok(cluster);
        }
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(nodes.iter().map(|n| n.addr()));
        args.extend([
            "--cluster-replicas".into(),
            replicas.to_string(),
            "--cluster-yes".into(),
        ]);
        if let Some(p) = &config.password {
            args.extend(["-a".into(), p.clone(), "--no-auth-warning".into()]);
        }
        let out = Command::new(cli_bin()).args(&args).output()?;
        anyhow::ensure!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = RedisCluster {
            nodes,
            announced: Default::default(),
            config,
            dir,
        };
        cluster.wait_stable()?;
        Ok(cluster)
    }

    /// Starts one more node, makes it a replica of the master on `master_port` and waits until
    /// it is in sync; returns its port.
    pub fn add_replica(&mut self, master_port: u16) -> anyhow::Result<u16> {
        let master = self
            .node(master_port)
            .ok_or_else(|| anyhow::anyhow!("no node on port {master_port}"))?;
        let master_id: String = master.cmd(&["CLUSTER", "MYID"])?;
        let cfg = RedisConfig {
            cluster_enabled: true,
            ..self.config.clone()
        };
        let i = self.nodes.len();
        let node = RedisServer::start_in(cfg, self.dir.subdir(&format!("node-{i}"))?)?;
        let _: () = node.cmd(&["CLUSTER", "MEET", "127.0.0.1", &master_port.to_string()])?;
        wait_for(
            "the new node to learn the master",
            Duration::from_secs(30),
            || {
                let nodes: String = node.cmd(&["CLUSTER", "NODES"]).ok()?;
                nodes
                    .lines()
                    .any(|l| l.starts_with(&master_id) && l.contains("master"))
                    .then_some(())
            },
        )?;
        until_masters_known(|| node.cmd::<String>(&["CLUSTER", "REPLICATE", &master_id]))?;
        let port = node.port();
        self.nodes.push(node);
        self.wait_stable()?;
        Ok(port)
    }

    /// Waits until every node reports `cluster_state:ok` and agrees on the number of masters.
    pub fn wait_stable(&self) -> anyhow::Result<()> {
        let n = self.nodes.len().to_string();
        wait_for(
            "cluster_state:ok, all nodes known and replicas in sync",
            Duration::from_secs(60),
            || {
                self.nodes
                    .iter()
                    .all(|node| {
                        node.info_cluster_field("cluster_state").as_deref() == Some("ok")
                            && node.info_cluster_field("cluster_known_nodes").as_deref()
                                == Some(n.as_str())
                            && (node.role().as_deref() != Some("slave")
                                || node
                                    .info_field("replication", "master_link_status")
                                    .as_deref()
                                    == Some("up"))
                    })
                    .then_some(())
            },
        )
    }

    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    pub fn nodes_mut(&mut self) -> &mut [RedisServer] {
        &mut self.nodes
    }

    /// Nodes that are masters now (by `ROLE`).
    pub fn masters(&self) -> Vec<&RedisServer> {
        self.nodes
            .iter()
            .filter(|n| n.role().as_deref() == Some("master"))
            .collect()
    }

    /// Nodes that are replicas now.
    pub fn replicas(&self) -> Vec<&RedisServer> {
        self.nodes
            .iter()
            .filter(|n| n.role().as_deref() == Some("slave"))
            .collect()
    }

    /// The master that owns `slot`, by asking any node.
    pub fn master_of_slot(&self, slot: u16) -> Option<&RedisServer> {
        self.node(self.slot_owner_port(slot)?)
    }

    /// Makes the node on `port` advertise `advertised` as its client port
    /// (`cluster-announce-port`), so whoever follows the cluster's topology (the source
    /// connector) reaches it there, through a [`FaultProxy`](crate::proxy::FaultProxy) say,
    /// and waits until every node sees it. The harness keeps talking to the node directly.
    pub fn announce_port(&self, port: u16, advertised: u16) -> anyhow::Result<()> {
        let node = self
            .node(port)
            .ok_or_else(|| anyhow::anyhow!("no node on port {port}"))?;
        let _: () = node.cmd(&[
            "CONFIG",
            "SET",
            "cluster-announce-port",
            &advertised.to_string(),
        ])?;
        if let Ok(mut a) = self.announced.lock() {
            a.insert(advertised, port);
        }
        let id: String = node.cmd(&["CLUSTER", "MYID"])?;
        let address = format!(" 127.0.0.1:{advertised}@");
        self.wait_all_see("every node to see the advertised port", &id, |l| {
            l.contains(&address)
        })
    }

    fn slot_owner_port(&self, slot: u16) -> Option<u16> {
        let shards: redis::Value = self.nodes[0].cmd(&["CLUSTER", "SLOTS"]).ok()?;
        let redis::Value::Array(ranges) = shards else {
            return None;
        };
        for r in ranges {
            let redis::Value::Array(items) = r else {
                continue;
            };
            let (Some(redis::Value::Int(lo)), Some(redis::Value::Int(hi))) =
                (items.first(), items.get(1))
            else {
                continue;
            };
            if (*lo..=*hi).contains(&i64::from(slot)) {
                if let Some(redis::Value::Array(node)) = items.get(2) {
                    if let Some(redis::Value::Int(port)) = node.get(1) {
                        return Some(*port as u16);
                    }
                }
            }
        }
        None
    }

    /// Runs `CLUSTER FAILOVER` on `replica_port` and waits until it is a master and the cluster
    /// is stable again.
    pub fn failover(&self, replica_port: u16) -> anyhow::Result<()> {
        let node = self
            .nodes
            .iter()
            .find(|n| n.port() == replica_port)
            .ok_or_else(|| anyhow::anyhow!("no node on port {replica_port}"))?;
        // A manual failover times out (5 s in Redis) when the master has not yet heard of the
        // replica over the bus; asking again is what an operator would do.
        let mut promoted = Err(anyhow::anyhow!("not attempted"));
        for _ in 0..4 {
            let _: String = node.cmd(&["CLUSTER", "FAILOVER"])?;
            promoted = wait_for(
                "replica promoted by CLUSTER FAILOVER",
                Duration::from_secs(8),
                || (node.role().as_deref() == Some("master")).then_some(()),
            );
            if promoted.is_ok() {
                break;
            }
        }
        promoted?;
        let id: String = node.cmd(&["CLUSTER", "MYID"])?;
        self.wait_all_see("every node to see the promoted master", &id, |l| {
            l.contains("master")
        })?;
        self.wait_stable()
    }

    /// Moves `slot` and its keys to the master on `to_port`, the way `redis-cli --cluster reshard`
    /// does: IMPORTING/MIGRATING, MIGRATE in batches, then SETSLOT NODE everywhere.
    pub fn migrate_slot(&self, slot: u16, to_port: u16) -> anyhow::Result<()> {
        let from = self
            .master_of_slot(slot)
            .ok_or_else(|| anyhow::anyhow!("slot {slot} has no owner"))?;
        let to = self
            .nodes
            .iter()
            .find(|n| n.port() == to_port)
            .ok_or_else(|| anyhow::anyhow!("no node on port {to_port}"))?;
        if from.port() == to.port() {
            return Ok(());
        }
        let s = slot.to_string();
        let from_id: String = from.cmd(&["CLUSTER", "MYID"])?;
        let to_id: String = to.cmd(&["CLUSTER", "MYID"])?;
        until_masters_known(|| {
            to.cmd::<String>(&["CLUSTER", "SETSLOT", &s, "IMPORTING", &from_id])
        })?;
        until_masters_known(|| {
            from.cmd::<String>(&["CLUSTER", "SETSLOT", &s, "MIGRATING", &to_id])
        })?;
        loop {
            let keys: Vec<Vec<u8>> = from.cmd(&["CLUSTER", "GETKEYSINSLOT", &s, "100"])?;
            if keys.is_empty() {
                break;
            }
            let mut c = from.conn();
            let mut cmd = redis::cmd("MIGRATE");
            cmd.arg("127.0.0.1")
                .arg(to.port())
                .arg("")
                .arg(0)
                .arg(10000)
                .arg("REPLACE");
            if let Some(p) = from.password() {
                cmd.arg("AUTH").arg(p);
            }
            cmd.arg("KEYS");
            for k in &keys {
                cmd.arg(k.as_slice());
            }
            let _: String = cmd.query(&mut c)?;
        }
        for n in &self.nodes {
            if n.role().as_deref() == Some("master") {
                let _: redis::RedisResult<String> =
                    n.cmd(&["CLUSTER", "SETSLOT", &s, "NODE", &to_id]);
            }
        }
        wait_for(
            "every node to see the new slot owner",
            Duration::from_secs(20),
            || {
                self.nodes
                    .iter()
                    .all(|n| {
                        n.cmd::<redis::Value>(&["CLUSTER", "SLOTS"]).is_ok()
                            && self.slot_owner_port(slot) == Some(to.port())
                    })
                    .then_some(())
            },
        )
    }
}

impl RedisCluster {
    /// Moves every slot of the master on `from_port` to the master on `to_port`, leaving the
    /// first without slots: slots holding keys with [`migrate_slot`](Self::migrate_slot), empty
    /// ones by assignment alone.
    pub fn move_all_slots(&self, from_port: u16, to_port: u16) -> anyhow::Result<()> {
        let node = |port: u16| {
            self.node(port)
                .ok_or_else(|| anyhow::anyhow!("no node on port {port}"))
        };
        let (from, to) = (node(from_port)?, node(to_port)?);
        let to_id: String = to.cmd(&["CLUSTER", "MYID"])?;
        let mut owned = Vec::new();
        for range in from.cmd::<Vec<redis::Value>>(&["CLUSTER", "SLOTS"])? {
            let redis::Value::Array(r) = range else {
                continue;
            };
            let int = |v: Option<&redis::Value>| match v {
                Some(redis::Value::Int(i)) => Some(*i),
                _ => None,
            };
            let port = match r.get(2) {
                Some(redis::Value::Array(n)) => int(n.get(1)),
                _ => None,
            };
            if let (Some(a), Some(b), Some(p)) = (int(r.first()), int(r.get(1)), port) {
                if p == i64::from(from_port) {
                    owned.extend(a as u16..=b as u16);
                }
            }
        }
        let mut empty = Vec::new();
        for slot in owned {
            let keys: i64 = from.cmd(&["CLUSTER", "COUNTKEYSINSLOT", &slot.to_string()])?;
            if keys > 0 {
                self.migrate_slot(slot, to_port)?;
            } else {
                empty.push(slot);
            }
        }
        // The new owner first, as `redis-cli --cluster reshard` does.
        let mut masters = self.masters();
        masters.sort_by_key(|m| m.port() != to_port);
        for m in masters {
            let mut pipe = redis::pipe();
            for slot in &empty {
                pipe.cmd("CLUSTER")
                    .arg("SETSLOT")
                    .arg(*slot)
                    .arg("NODE")
                    .arg(&to_id)
                    .ignore();
            }
            match until_masters_known(|| pipe.query::<()>(&mut m.conn())) {
                // Redis 7 turns a master that lost its last slot into a replica of their new
                // owner (`cluster-allow-replica-migration`), which can happen, by gossip, before
                // its own SETSLOT comes: it then refuses it, and needs it no more.
                Err(_) if m.info_field("replication", "role").as_deref() == Some("slave") => {}
                r => r?,
            }
        }
        let from_id: String = from.cmd(&["CLUSTER", "MYID"])?;
        // A `CLUSTER NODES` line has 8 fields before its slot ranges.
        self.wait_all_see(
            "every node to see the emptied master without slots",
            &from_id,
            |l| l.split(' ').count() <= 8,
        )?;
        self.wait_stable()
    }

    /// Waits until every node's `CLUSTER NODES` has a line for node `id` that satisfies `ok`.
    fn wait_all_see(&self, what: &str, id: &str, ok: impl Fn(&str) -> bool) -> anyhow::Result<()> {
        wait_for(what, Duration::from_secs(30), || {
            self.nodes
                .iter()
                .all(|n| {
                    let nodes: String = n.cmd(&["CLUSTER", "NODES"]).unwrap_or_default();
                    nodes.lines().any(|l| l.starts_with(id) && ok(l))
                })
                .then_some(())
        })
    }

    /// Connections to the masters, for reading the whole dataset (`dataset::read`).
    pub fn master_conns(&self) -> Vec<redis::Connection> {
        self.masters().into_iter().map(|m| m.conn()).collect()
    }

    /// A client that sends each command to the master of its key's slot.
    pub fn client(&self) -> ClusterClient<'_> {
        ClusterClient {
            cluster: self,
            conns: std::collections::HashMap::new(),
            owners: Vec::new(),
        }
    }

    /// The node on `port`.
    pub fn node(&self, port: u16) -> Option<&RedisServer> {
        let port = self
            .announced
            .lock()
            .ok()
            .and_then(|a| a.get(&port).copied())
            .unwrap_or(port);
        self.nodes.iter().find(|n| n.port() == port)
    }

    /// The replica of the master on `master_port`.
    pub fn replica_of(&self, master_port: u16) -> Option<&RedisServer> {
        let port = master_port.to_string();
        self.replicas()
            .into_iter()
            .find(|r| r.info_field("replication", "master_port").as_deref() == Some(port.as_str()))
    }
}

/// Sends commands to the master owning the first key's slot, following `MOVED` (the topology is
/// read again) and waiting out `TRYAGAIN`/`CLUSTERDOWN` during failovers.
pub struct ClusterClient<'a> {
    cluster: &'a RedisCluster,
    conns: std::collections::HashMap<u16, redis::Connection>,
    /// Owner port of every slot.
    owners: Vec<u16>,
}

impl std::fmt::Debug for ClusterClient<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterClient").finish()
    }
}

impl ClusterClient<'_> {
    fn refresh(&mut self) {
        let mut owners = vec![0u16; 16384];
        for node in self.cluster.nodes() {
            let Ok(redis::Value::Array(ranges)) = node.cmd::<redis::Value>(&["CLUSTER", "SLOTS"])
            else {
                continue;
            };
            for r in ranges {
                let redis::Value::Array(items) = r else {
                    continue;
                };
                if let (
                    Some(redis::Value::Int(lo)),
                    Some(redis::Value::Int(hi)),
                    Some(redis::Value::Array(master)),
                ) = (items.first(), items.get(1), items.get(2))
                {
                    if let Some(redis::Value::Int(port)) = master.get(1) {
                        for s in *lo..=*hi {
                            owners[s as usize] = *port as u16;
                        }
                    }
                }
            }
            break;
        }
        self.owners = owners;
    }

    /// Runs a command whose first argument after the name is a key.
    pub fn exec(&mut self, args: &[&[u8]]) -> redis::Value {
        let slot = proto::key_slot(args[1]).get() as usize;
        for attempt in 0..200 {
            if self.owners.is_empty() || attempt > 0 {
                self.refresh();
            }
            let port = self.owners[slot];
            let Some(node) = self.cluster.node(port) else {
                std::thread::sleep(Duration::from_millis(50));
                continue;
            };
            let conn = self.conns.entry(port).or_insert_with(|| node.conn());
            let mut cmd = redis::Cmd::new();
            for a in args {
                cmd.arg(*a);
            }
            match cmd.query::<redis::Value>(conn) {
                Ok(v) => return v,
                Err(e) if matches!(e.code(), Some("MOVED" | "TRYAGAIN" | "CLUSTERDOWN")) => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) if e.is_io_error() || e.is_connection_dropped() => {
                    self.conns.remove(&port);
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("{:?} on the cluster: {e}", String::from_utf8_lossy(args[0])),
            }
        }
        panic!(
            "the cluster did not settle for {:?}",
            String::from_utf8_lossy(args[1])
        );
    }
}

impl RedisServer {
    /// `master` or `slave`, from `ROLE`.
    pub fn role(&self) -> Option<String> {
        let v: Vec<redis::Value> = self.cmd(&["ROLE"]).ok()?;
        match v.first()? {
            redis::Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
            redis::Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        }
    }

    /// A field of `CLUSTER INFO`.
    pub fn info_cluster_field(&self, field: &str) -> Option<String> {
        let info: String = self.cmd(&["CLUSTER", "INFO"]).ok()?;
        info.lines().find_map(|l| {
            l.strip_prefix(field)?
                .strip_prefix(':')
                .map(|v| v.trim().to_owned())
        })
    }
}

/// Runs a `CLUSTER SETSLOT` until the node knows the other node as a master: right after a
/// failover or under load, gossip may not have told it yet ("Please use SETSLOT only with
/// masters"), which an operator would also just retry.
fn until_masters_known<T>(mut f: impl FnMut() -> redis::RedisResult<T>) -> anyhow::Result<T> {
    let mut tries = 0;
    loop {
        match f() {
            Err(e) if e.to_string().contains("only with masters") && tries < 100 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            r => return Ok(r?),
        }
    }
}
