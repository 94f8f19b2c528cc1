//! `sink-connector verify`: compares the source and the target key by key (or a random sample)
//! and reports missing, extra and different keys, with counts and examples.

use crate::config::Config;
use redis::{Connection, Value};
use std::collections::BTreeMap;
use std::time::Instant;

/// Outcome of a verification.
#[derive(Debug, Default)]
pub struct Report {
    pub compared: u64,
    pub missing: Vec<String>,
    pub extra: Vec<String>,
    pub different: Vec<String>,
    pub missing_count: u64,
    pub extra_count: u64,
    pub different_count: u64,
}

impl Report {
    pub fn is_equal(&self) -> bool {
        self.missing_count + self.extra_count + self.different_count == 0
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "compared {} keys: {} missing on the target, {} extra on the target, {} different",
            self.compared, self.missing_count, self.extra_count, self.different_count
        )?;
        for (what, list) in [
            ("missing", &self.missing),
            ("extra", &self.extra),
            ("different", &self.different),
        ] {
            for k in list {
                writeln!(f, "  {what}: {k}")?;
            }
        }
        Ok(())
    }
}

const EXAMPLES: usize = 10;

fn open(url: &str, what: &str) -> anyhow::Result<Connection> {
    let shown = service::config::redact_url(url);
    let client =
        redis::Client::open(url).map_err(|e| anyhow::anyhow!("{what} url {shown}: {e}"))?;
    client
        .get_connection_with_timeout(std::time::Duration::from_secs(10))
        .map_err(|e| anyhow::anyhow!("cannot connect to the {what} at {shown}: {e}"))
}

fn dbs(conn: &mut Connection) -> anyhow::Result<Vec<(u32, u64)>> {
    let info: String = redis::cmd("INFO").arg("keyspace").query(conn)?;
    Ok(info
        .lines()
        .filter_map(|l| {
            let (db, rest) = l.split_once(':')?;
            let db: u32 = db.strip_prefix("db")?.parse().ok()?;
            let keys: u64 = rest
                .split(',')
                .next()?
                .strip_prefix("keys=")?
                .parse()
                .ok()?;
            Some((db, keys))
        })
        .collect())
}

fn show(key: &[u8]) -> String {
    let s = String::from_utf8_lossy(key);
    if s.len() > 80 {
        format!(
            "{:?}... ({} bytes)",
            &s[..s.char_indices().nth(60).map_or(s.len(), |c| c.0)],
            key.len()
        )
    } else {
        format!("{s:?}")
    }
}

/// One side of the comparison: a standalone server, or every master of a cluster with the slot
/// map, each key read from the master that owns it.
struct Side {
    conns: Vec<Connection>,
    /// Cluster: (first slot, last slot, index in `conns`); empty for a standalone server.
    slots: Vec<(u16, u16, usize)>,
}

impl Side {
    fn open(url: &str, what: &str) -> anyhow::Result<Side> {
        let mut first = open(url, what)?;
        let info: String = redis::cmd("INFO").arg("cluster").query(&mut first)?;
        if !info.contains("cluster_enabled:1") {
            return Ok(Side {
                conns: vec![first],
                slots: Vec::new(),
            });
        }
        let seed = service::endpoint::Endpoint::parse(url)?;
        let reply: Value = redis::cmd("CLUSTER").arg("SLOTS").query(&mut first)?;
        let mut nodes: Vec<(String, u16)> = Vec::new();
        let mut slots = Vec::new();
        for (a, b, host, port) in crate::cluster::parse_slots(&reply, &seed.host) {
            let i = match nodes.iter().position(|n| *n == (host.clone(), port)) {
                Some(i) => i,
                None => {
                    nodes.push((host, port));
                    nodes.len() - 1
                }
            };
            slots.push((a, b, i));
        }
        let mut conns = Vec::new();
        for (host, port) in &nodes {
            let node = service::endpoint::at(&seed, host, *port);
            conns.push(open(
                &service::endpoint::client_url(&node),
                &format!("{what} cluster node"),
            )?);
        }
        Ok(Side { conns, slots })
    }

    fn is_cluster(&self) -> bool {
        !self.slots.is_empty()
    }

    /// The connection that holds `key`.
    fn at(&mut self, key: &[u8]) -> &mut Connection {
        let slot = proto::key_slot(key).get();
        let i = self
            .slots
            .iter()
            .find(|(a, b, _)| (*a..=*b).contains(&slot))
            .map_or(0, |s| s.2);
        &mut self.conns[i]
    }

    /// Keys per db, summed over the masters.
    fn dbs(&mut self) -> anyhow::Result<Vec<(u32, u64)>> {
        let mut all: BTreeMap<u32, u64> = BTreeMap::new();
        for c in &mut self.conns {
            for (db, n) in dbs(c)? {
                *all.entry(db).or_default() += n;
            }
        }
        Ok(all.into_iter().collect())
    }

    /// Selects `db` (a cluster has only db 0).
    fn select(&mut self, db: u32) -> anyhow::Result<()> {
        if !self.is_cluster() {
            select(&mut self.conns[0], db)?;
        }
        Ok(())
    }

    /// Every key of the selected db, on every master.
    fn scan(
        &mut self,
        mut each: impl FnMut(Vec<Vec<u8>>) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        for c in &mut self.conns {
            scan(c, &mut each)?;
        }
        Ok(())
    }

    /// A random key (of the `n`-th master, in turn, on a cluster).
    fn random_key(&mut self, n: u64) -> anyhow::Result<Option<Vec<u8>>> {
        let i = (n % self.conns.len() as u64) as usize;
        Ok(redis::cmd("RANDOMKEY").query(&mut self.conns[i])?)
    }
}

/// A canonical form of a key's value for comparison.
fn value(conn: &mut Connection, key: &[u8]) -> anyhow::Result<(String, Value, i64)> {
    let kind: String = redis::cmd("TYPE").arg(key).query(conn)?;
    let ttl: i64 = redis::cmd("PTTL").arg(key).query(conn)?;
    let v: Value = match kind.as_str() {
        "string" => redis::cmd("GET").arg(key).query(conn)?,
        "list" => redis::cmd("LRANGE").arg(key).arg(0).arg(-1).query(conn)?,
        "set" => {
            let mut m: Vec<Vec<u8>> = redis::cmd("SMEMBERS").arg(key).query(conn)?;
            m.sort();
            Value::Array(m.into_iter().map(Value::BulkString).collect())
        }
        "zset" => redis::cmd("ZRANGE")
            .arg(key)
            .arg(0)
            .arg(-1)
            .arg("WITHSCORES")
            .query(conn)?,
        "hash" => {
            let m: BTreeMap<Vec<u8>, Vec<u8>> = redis::cmd("HGETALL").arg(key).query(conn)?;
            Value::Array(
                m.into_iter()
                    .flat_map(|(k, v)| [Value::BulkString(k), Value::BulkString(v)])
                    .collect(),
            )
        }
        "stream" => {
            let entries: Value = redis::cmd("XRANGE")
                .arg(key)
                .arg("-")
                .arg("+")
                .query(conn)?;
            let groups: Value = redis::cmd("XINFO").arg("GROUPS").arg(key).query(conn)?;
            Value::Array(vec![entries, groups])
        }
        "none" => Value::Nil,
        _ => redis::cmd("DUMP").arg(key).query(conn)?,
    };
    Ok((kind, v, ttl))
}

/// Every key of the selected db, in SCAN batches.
fn scan(
    conn: &mut Connection,
    mut each: impl FnMut(Vec<Vec<u8>>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut cursor = 0u64;
    loop {
        let (next, batch): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("COUNT")
            .arg(1000)
            .query(conn)?;
        each(batch)?;
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

fn select(conn: &mut Connection, db: u32) -> anyhow::Result<()> {
    redis::cmd("SELECT").arg(db).exec(conn)?;
    Ok(())
}

/// Compares everything (or `sample` random keys per db) of `source_url` with the target. Either
/// side may be a Redis Cluster: its masters are scanned and each key is read where it lives.
pub fn verify(
    cfg: &Config,
    source_url: &str,
    sample: Option<u64>,
    ttl_tolerance_ms: i64,
) -> anyhow::Result<Report> {
    let mut src = Side::open(source_url, "source")?;
    let mut dst = Side::open(&cfg.redis.url, "target")?;
    let prefix = cfg.apply.checkpoint_prefix.as_bytes().to_vec();
    let mut report = Report::default();
    let started = Instant::now();
    let source_dbs = src.dbs()?;
    let total: u64 = source_dbs
        .iter()
        .map(|(_, n)| sample.map_or(*n, |s| s.min(*n)))
        .sum();
    let mut last_progress = Instant::now();
    for &(db, keys) in &source_dbs {
        let tdb = cfg.map_db(db);
        src.select(db)?;
        if cfg.redis.select {
            dst.select(tdb)?;
        }
        let mut candidates: Vec<Vec<u8>> = Vec::new();
        match sample {
            Some(n) => {
                for i in 0..n.min(keys) {
                    if let Some(k) = src.random_key(i)? {
                        candidates.push(k);
                    }
                }
                candidates.sort();
                candidates.dedup();
            }
            None => {
                src.scan(|batch| {
                    candidates.extend(batch);
                    Ok(())
                })?;
            }
        }
        for key in candidates {
            if key.starts_with(&prefix) {
                continue;
            }
            report.compared += 1;
            let (skind, sval, sttl) = value(src.at(&key), &key)?;
            if skind == "none" {
                continue; // expired or deleted meanwhile
            }
            let (dkind, dval, dttl) = value(dst.at(&key), &key)?;
            let name = format!("db {db} key {}", show(&key));
            if dkind == "none" {
                report.missing_count += 1;
                if report.missing.len() < EXAMPLES {
                    report.missing.push(name);
                }
            } else if skind != dkind || sval != dval {
                report.different_count += 1;
                if report.different.len() < EXAMPLES {
                    report
                        .different
                        .push(format!("{name}: value differs ({skind} vs {dkind})"));
                }
            } else if (sttl < 0) != (dttl < 0)
                || (sttl >= 0 && (sttl - dttl).abs() > ttl_tolerance_ms)
            {
                report.different_count += 1;
                if report.different.len() < EXAMPLES {
                    report
                        .different
                        .push(format!("{name}: TTL {sttl} ms vs {dttl} ms"));
                }
            }
            if last_progress.elapsed().as_secs() >= 2 {
                last_progress = Instant::now();
                eprintln!(
                    "verified {} of {total} keys ({:.0}%) in {:?}",
                    report.compared,
                    100.0 * report.compared as f64 / total.max(1) as f64,
                    started.elapsed()
                );
            }
        }
    }
    // Extra keys on the target (only for full comparisons): keys found in none of the source
    // dbs the sink writes into that target db (`redis.db_map` may fold several into one).
    if sample.is_none() {
        for (tdb, _) in dst.dbs()? {
            if cfg.redis.select {
                dst.select(tdb)?;
            }
            let from: Vec<u32> = source_dbs
                .iter()
                .map(|(d, _)| *d)
                .filter(|d| cfg.map_db(*d) == tdb)
                .collect();
            dst.scan(|batch| {
                let mut unseen: Vec<Vec<u8>> = batch
                    .into_iter()
                    .filter(|k| !k.starts_with(&prefix))
                    .collect();
                for &db in &from {
                    if unseen.is_empty() {
                        break;
                    }
                    src.select(db)?;
                    let mut still = Vec::with_capacity(unseen.len());
                    for key in unseen {
                        let exists: i64 = redis::cmd("EXISTS").arg(&key).query(src.at(&key))?;
                        if exists == 0 {
                            still.push(key);
                        }
                    }
                    unseen = still;
                }
                for key in unseen {
                    report.extra_count += 1;
                    if report.extra.len() < EXAMPLES {
                        report.extra.push(format!("db {tdb} key {}", show(&key)));
                    }
                }
                Ok(())
            })?;
        }
    }
    Ok(report)
}
