//! Randomized fault campaign: the whole pipeline on 127.0.0.1 under a seeded schedule of faults,
//! several at once where they can overlap, with a workload whose every lost, doubled or
//! reordered write shows (`harness::history`). At quiet points (writes paused, faults ended) the
//! target is compared with the source and with the record of what the source acknowledged, and
//! each difference is classified. Prints the seed, the schedule and the first differences, so a
//! failing run can be replayed; exits non-zero on any difference.
//!
//!   scripts/campaign.sh [MINUTES] [SEED|random] [standalone|cluster]
//!
//! Faults: kill -9 and restart of either connector; broker kill -9, restarted 1-6 s later (its
//! sqlite storage keeps the log); the target full (`maxmemory` just above its use, under
//! `noeviction`) for 2-6 s; latency, cuts and half-open links through the TCP proxies between the
//! source connector and the source, the sink and the target, and both connectors and Kafka; the
//! target killed and restarted without persistence (the sink must find and apply the lost writes
//! again); a second sink joining the group for a while (rebalances). The source keeps a 64 KB
//! backlog, so an outage of the source connector of a second or two ends in a full resync.
//!
//! A cluster target (three masters with a replica each) is reached directly, so its link is not
//! proxied; it gets graceful failovers and slot migrations instead of restarts without
//! persistence, whose loss of multi-slot commands' effects the sink cannot repair from the topic
//! and halts on (docs/runbook.md, "A cluster target master lost writes").

use harness::broker::{random_topic, Broker, Storage};
use harness::cluster::RedisCluster;
use harness::connector::{Connector, Kind};
use harness::dataset::{self, Dataset};
use harness::history::{Damage, History};
use harness::pipeline::{self, Options, CHECKPOINT_PREFIX};
use harness::proxy::FaultProxy;
use harness::redis::{RedisConfig, RedisServer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The target: one server behind a fault proxy, or a Redis Cluster of three masters with a
/// replica each (the sink follows its topology itself, so no proxy sits in front of it).
#[derive(Debug)]
enum Target {
    Standalone {
        server: RedisServer,
        proxy: FaultProxy,
    },
    Cluster(RedisCluster),
}

impl Target {
    fn masters(&self) -> Vec<&RedisServer> {
        match self {
            Target::Standalone { server, .. } => vec![server],
            Target::Cluster(c) => c.masters(),
        }
    }

    fn dataset(&self) -> redis::RedisResult<Dataset> {
        let mut conns: Vec<redis::Connection> = self.masters().iter().map(|m| m.conn()).collect();
        dataset::read(&mut conns)
    }
}

/// The whole pipeline, every link that can be faulted behind a [`FaultProxy`].
#[derive(Debug)]
struct Rig {
    source: RedisServer,
    source_proxy: FaultProxy,
    broker: Broker,
    kafka_proxy: FaultProxy,
    target: Target,
    source_connector: Connector,
    sink: Connector,
    sink_config: String,
}

impl Rig {
    fn start(cluster: bool) -> anyhow::Result<Rig> {
        let options = Options {
            partitions: 4,
            // A full resync must leave the target equal to the source, deleted keys included.
            sink_apply: "on_new_snapshot = \"flush\"".into(),
            ..Options::default()
        };
        // A small backlog: an outage of the source connector of a second or two under the
        // workload's ~2k writes/s outlives it, and the next sync is a full resync.
        let source = RedisServer::start(RedisConfig::default().with("repl-backlog-size", "64kb"))?;
        let source_proxy = FaultProxy::start(&source.addr())?;
        let target = if cluster {
            Target::Cluster(RedisCluster::start(3, 1, options.target.clone())?)
        } else {
            let server = RedisServer::start(options.target.clone())?;
            let proxy = FaultProxy::start(&server.addr())?;
            Target::Standalone { server, proxy }
        };
        let target_url = match &target {
            Target::Standalone { proxy, .. } => format!("redis://{}", proxy.addr()),
            Target::Cluster(c) => c.nodes()[0].url(),
        };
        let (broker, kafka_proxy) = Broker::start_behind_proxy(Storage::Sqlite)?;
        let topic = random_topic("campaign");
        let source_config = pipeline::source_config(
            &format!("redis://{}", source_proxy.addr()),
            &broker.bootstrap(),
            &topic,
            &options,
        );
        let sink_config = pipeline::sink_config(&target_url, &broker.bootstrap(), &topic, &options);
        let source_connector = Connector::start(Kind::Source, &source_config, &[])?;
        let sink = Connector::start(Kind::Sink, &sink_config, &[])?;
        Ok(Rig {
            source,
            source_proxy,
            broker,
            kafka_proxy,
            target,
            source_connector,
            sink,
            sink_config,
        })
    }

    /// Waits until a first write went through the whole pipeline, then takes it back.
    fn wait_running(&self) -> anyhow::Result<()> {
        let _: () = self.source.cmd(&["SET", "campaign:ready", "1"])?;
        self.wait_equal(Duration::from_secs(120))?;
        let _: () = self.source.cmd(&["DEL", "campaign:ready"])?;
        self.wait_equal(Duration::from_secs(60))?;
        Ok(())
    }

    /// Another sink process in the same consumer group.
    fn extra_sink(&self) -> anyhow::Result<Connector> {
        Connector::start(Kind::Sink, &self.sink_config, &[])
    }

    fn proxy(&self, which: &str) -> &FaultProxy {
        match (which, &self.target) {
            ("source", _) => &self.source_proxy,
            ("target", Target::Standalone { proxy, .. }) => proxy,
            _ => &self.kafka_proxy,
        }
    }

    /// Waits until the target holds the source's dataset (checkpoint keys aside); how long it
    /// took, or the last differences and the connectors' last log lines.
    fn wait_equal(&self, timeout: Duration) -> anyhow::Result<f64> {
        let opts = pipeline::compare_options();
        let started = Instant::now();
        loop {
            let expected = dataset::read(&mut [self.source.conn()])?;
            let report = expected.compare(&self.target.dataset()?, &opts);
            if report.is_equal() {
                return Ok(started.elapsed().as_secs_f64());
            }
            if started.elapsed() > timeout {
                anyhow::bail!("target still differs from source after {timeout:?}:\n{report}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Makes every target master full: `maxmemory` just above its use, under `noeviction`.
    fn fill_target(&self) -> anyhow::Result<()> {
        for m in self.target.masters() {
            let used: u64 = m
                .info_field("memory", "used_memory")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let _: () = m.cmd(&[
                "CONFIG",
                "SET",
                "maxmemory",
                &(used + 256 * 1024).to_string(),
            ])?;
        }
        Ok(())
    }

    fn unfill_target(&self) -> anyhow::Result<()> {
        let nodes: Vec<&RedisServer> = match &self.target {
            Target::Standalone { server, .. } => vec![server],
            Target::Cluster(c) => c.nodes().iter().collect(),
        };
        for n in nodes {
            let _: () = n.cmd(&["CONFIG", "SET", "maxmemory", "0"])?;
        }
        Ok(())
    }

    /// kill -9 of the target (a cluster target: of one master) and a restart without
    /// persistence: it comes back empty (a cluster master keeps its slots, and its replica
    /// resynchronises from it, empty too).
    fn restart_target_empty(&mut self, rng: &mut StdRng) -> anyhow::Result<&'static str> {
        match &mut self.target {
            Target::Standalone { server, .. } => {
                server.kill9();
                server.restart()?;
                Ok("target restarted without persistence (empty)")
            }
            Target::Cluster(c) => {
                let masters: Vec<u16> = c.masters().iter().map(|m| m.port()).collect();
                let port = masters[rng.random_range(0..masters.len())];
                let node = c
                    .nodes_mut()
                    .iter_mut()
                    .find(|n| n.port() == port)
                    .expect("a master of the cluster");
                node.kill9();
                node.restart()?;
                c.wait_stable()?;
                Ok("target master restarted without persistence (empty)")
            }
        }
    }
}

/// A fault that lasts: undone at `until`.
#[derive(Debug)]
enum Lasting {
    BrokerDown,
    TargetFull,
    Proxy(&'static str, ProxyFault),
    ExtraSink(Box<Connector>),
}

#[derive(Debug, Clone, Copy)]
enum ProxyFault {
    Latency,
    HalfOpen,
}

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let minutes: f64 = args.next().and_then(|m| m.parse().ok()).unwrap_or(10.0);
    let seed: u64 = args
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let cluster = match args.next().as_deref() {
        None | Some("standalone") => false,
        Some("cluster") => true,
        Some(other) => anyhow::bail!("target kind {other:?}: expected standalone or cluster"),
    };
    let kind = if cluster { "cluster" } else { "standalone" };
    println!(
        "campaign: {minutes} min, seed {seed}, {kind} target (replay: scripts/campaign.sh {minutes} {seed} {kind})"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let mut p = Rig::start(cluster)?;
    p.wait_running()?;

    let history = Arc::new(Mutex::new(History::default()));
    let paused = Arc::new(AtomicBool::new(false));
    let idle = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let write_errors = Arc::new(AtomicU64::new(0));
    let writer = {
        let (history, paused, idle, stop, errors) = (
            Arc::clone(&history),
            Arc::clone(&paused),
            Arc::clone(&idle),
            Arc::clone(&stop),
            Arc::clone(&write_errors),
        );
        let mut conn = p.source.conn();
        let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
        std::thread::spawn(move || {
            let mut op = 0u64;
            while !stop.load(SeqCst) {
                if paused.load(SeqCst) {
                    idle.store(true, SeqCst);
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                idle.store(false, SeqCst);
                let now = service_now_ms();
                let mut h = history.lock().unwrap();
                if let Err(e) = h.write(&mut conn, &mut rng, &mut op, 50, now) {
                    // The source itself is never faulted: an error is a bug of the workload.
                    errors.fetch_add(1, SeqCst);
                    eprintln!("write failed: {e}");
                }
                drop(h);
                // About 2,000 writes a second.
                std::thread::sleep(Duration::from_millis(25));
            }
        })
    };

    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(minutes * 60.0);
    let mut schedule: Vec<(f64, String)> = Vec::new();
    let mut by_kind: BTreeMap<&'static str, u32> = BTreeMap::new();
    // Per kind: the slowest recovery of the quiet points that followed it.
    let mut recovery_by_kind: BTreeMap<&'static str, f64> = BTreeMap::new();
    let mut since_quiet: Vec<&'static str> = Vec::new();
    let mut active: Vec<(Instant, Lasting)> = Vec::new();
    let mut differences = Vec::new();
    let mut quiet_points = 0;
    let mut unequal_quiet_points = 0;
    let quiet_every = Duration::from_secs(45);
    let mut next_quiet = Instant::now() + quiet_every;
    let ended = |p: &mut Rig, fault: Lasting| -> anyhow::Result<()> {
        match fault {
            Lasting::BrokerDown => p.broker.restart()?,
            Lasting::TargetFull => p.unfill_target()?,
            Lasting::Proxy(which, f) => {
                let proxy = p.proxy(which);
                match f {
                    ProxyFault::Latency => proxy.set_latency(Duration::ZERO),
                    ProxyFault::HalfOpen => proxy.set_blackhole(false),
                }
            }
            Lasting::ExtraSink(mut sink) => {
                sink.stop();
            }
        }
        Ok(())
    };
    loop {
        let now = Instant::now();
        // End what is due.
        let mut i = 0;
        while i < active.len() {
            if active[i].0 <= now {
                let (_, fault) = active.remove(i);
                ended(&mut p, fault)?;
            } else {
                i += 1;
            }
        }
        if now >= next_quiet || now >= deadline {
            for (_, fault) in active.drain(..) {
                ended(&mut p, fault)?;
            }
            quiet_points += 1;
            paused.store(true, SeqCst);
            harness::wait_for("the writer to pause", Duration::from_secs(30), || {
                idle.load(SeqCst).then_some(())
            })?;
            let t = Instant::now();
            let equal = p.wait_equal(Duration::from_secs(300));
            let took = t.elapsed().as_secs_f64();
            let target = p.target.dataset()?;
            let found = history
                .lock()
                .unwrap()
                .check(&target, CHECKPOINT_PREFIX.as_bytes(), 2000);
            let writes = history.lock().unwrap().writes;
            println!(
                "{:>6.1} s: quiet point {quiet_points}: {} writes so far, target {} the source after {took:.1} s, {} differences from the record",
                started.elapsed().as_secs_f64(),
                writes,
                if equal.is_ok() { "equal to" } else { "NOT equal to" },
                found.len()
            );
            if let Err(e) = &equal {
                println!("  {e}");
            }
            for kind in since_quiet.drain(..) {
                let r = recovery_by_kind.entry(kind).or_default();
                *r = r.max(took);
            }
            if equal.is_err() {
                unequal_quiet_points += 1;
            }
            let failed = equal.is_err() || !found.is_empty();
            differences.extend(found);
            if failed || now >= deadline {
                break;
            }
            paused.store(false, SeqCst);
            next_quiet = Instant::now() + quiet_every;
            continue;
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(1_500..5_000)));
        let at = started.elapsed().as_secs_f64();
        // At most two lasting faults at once; instant ones may land during them.
        let lasting_room = active.len() < 2;
        let kind = rng.random_range(0..if cluster { 12 } else { 10 });
        let name: &'static str = match kind {
            0 => {
                p.source_connector.kill9();
                std::thread::sleep(Duration::from_millis(rng.random_range(0..3_000)));
                p.source_connector.restart()?;
                "kill -9 source connector"
            }
            1 => {
                p.sink.kill9();
                std::thread::sleep(Duration::from_millis(rng.random_range(0..3_000)));
                p.sink.restart()?;
                "kill -9 sink connector"
            }
            2 if lasting_room => {
                p.broker.kill9();
                let until = Instant::now() + Duration::from_millis(rng.random_range(1_000..6_000));
                active.push((until, Lasting::BrokerDown));
                "broker kill -9, restarted 1-6 s later"
            }
            3 if lasting_room => {
                p.fill_target()?;
                let until = Instant::now() + Duration::from_millis(rng.random_range(2_000..6_000));
                active.push((until, Lasting::TargetFull));
                "target full (OOM under noeviction) for 2-6 s"
            }
            4..=6 if lasting_room => {
                // A cluster target is reached directly (the sink follows its topology).
                let links: &[&'static str] = if cluster {
                    &["source", "kafka"]
                } else {
                    &["source", "target", "kafka"]
                };
                let which = links[rng.random_range(0..links.len())];
                let proxy = p.proxy(which);
                let until = Instant::now() + Duration::from_millis(rng.random_range(1_000..5_000));
                match rng.random_range(0..3) {
                    0 => {
                        proxy.drop_connections();
                        match which {
                            "source" => "cut: source connector - source",
                            "target" => "cut: sink - target",
                            _ => "cut: connectors - Kafka",
                        }
                    }
                    1 => {
                        proxy.set_latency(Duration::from_millis(rng.random_range(20..200)));
                        active.push((until, Lasting::Proxy(which, ProxyFault::Latency)));
                        match which {
                            "source" => "latency: source connector - source",
                            "target" => "latency: sink - target",
                            _ => "latency: connectors - Kafka",
                        }
                    }
                    _ => {
                        proxy.set_blackhole(true);
                        active.push((until, Lasting::Proxy(which, ProxyFault::HalfOpen)));
                        match which {
                            "source" => "half-open: source connector - source",
                            "target" => "half-open: sink - target",
                            _ => "half-open: connectors - Kafka",
                        }
                    }
                }
            }
            // A cluster target master that loses writes which multi-slot commands touched cannot
            // be restored from the topic: the sink halts with what to do (docs/runbook.md, "A
            // cluster target master lost writes"), which would end the run. Graceful failovers
            // and slot migrations (10, 11) stand in for it.
            7 if cluster => continue,
            7 => p.restart_target_empty(&mut rng)?,
            8 if lasting_room => {
                let extra = p.extra_sink()?;
                let until = Instant::now() + Duration::from_millis(rng.random_range(3_000..10_000));
                active.push((until, Lasting::ExtraSink(Box::new(extra))));
                "second sink joins the group for 3-10 s"
            }
            10 => {
                let Target::Cluster(c) = &p.target else {
                    unreachable!("a cluster target only")
                };
                let replicas: Vec<u16> = c.replicas().iter().map(|r| r.port()).collect();
                if replicas.is_empty() {
                    continue;
                }
                c.failover(replicas[rng.random_range(0..replicas.len())])?;
                "target failover (a replica promoted by CLUSTER FAILOVER)"
            }
            11 => {
                let Target::Cluster(c) = &p.target else {
                    unreachable!("a cluster target only")
                };
                // A slot holding keys of the workload, to a master that does not own it.
                let masters = c.masters();
                let from = masters[rng.random_range(0..masters.len())];
                let Ok(Some(key)) = from.cmd::<Option<String>>(&["RANDOMKEY"]) else {
                    continue;
                };
                let slot: u16 = from.cmd(&["CLUSTER", "KEYSLOT", &key])?;
                let others: Vec<u16> = masters
                    .iter()
                    .map(|m| m.port())
                    .filter(|&port| Some(port) != c.master_of_slot(slot).map(|m| m.port()))
                    .collect();
                if others.is_empty() {
                    continue;
                }
                c.migrate_slot(slot, others[rng.random_range(0..others.len())])?;
                "target slot migration (MIGRATING/IMPORTING, MIGRATE, SETSLOT NODE)"
            }
            _ => continue,
        };
        *by_kind.entry(name).or_default() += 1;
        since_quiet.push(name);
        schedule.push((at, name.to_owned()));
        println!("{at:>6.1} s: {name}");
    }
    stop.store(true, SeqCst);
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writer panicked"))?;
    let history = history.lock().unwrap();
    let injected: u32 = by_kind.values().sum();
    println!("\ncampaign report (seed {seed}, {minutes} min, {quiet_points} quiet points):");
    println!("  {injected} faults of {} kinds:", by_kind.len());
    for (kind, n) in &by_kind {
        println!(
            "    {n:>3} × {kind} (slowest recovery after it {:.1} s)",
            recovery_by_kind.get(kind).copied().unwrap_or(0.0)
        );
    }
    let full_syncs = p
        .source_connector
        .metric("source_full_syncs_total", &[])
        .unwrap_or(0.0);
    println!(
        "  full resyncs of the source connector's last run: {full_syncs} (the first sync included)"
    );
    let mut by_damage: BTreeMap<Damage, usize> = BTreeMap::new();
    for d in &differences {
        *by_damage.entry(d.damage).or_default() += 1;
    }
    println!(
        "  {} writes checked; {} write errors; differences: {}",
        history.writes,
        write_errors.load(SeqCst),
        if differences.is_empty() {
            "none (0 lost, 0 doubled, 0 reordered)".to_owned()
        } else {
            format!("{by_damage:?}")
        }
    );
    for d in differences.iter().take(20) {
        println!("    {d}");
    }
    let failed =
        !differences.is_empty() || write_errors.load(SeqCst) > 0 || unequal_quiet_points > 0;
    if failed {
        // The connectors' working directories go with them: keep their logs for the replay.
        let dir = std::env::temp_dir().join(format!("campaign-{seed}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("sink.log"), p.sink.log())?;
        std::fs::write(dir.join("source-connector.log"), p.source_connector.log())?;
        println!(
            "  the connectors' logs (last MB of each): {}",
            dir.display()
        );
    }
    anyhow::ensure!(
        !failed,
        "the campaign found differences (seed {seed}); schedule: {schedule:?}"
    );
    Ok(())
}

fn service_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
