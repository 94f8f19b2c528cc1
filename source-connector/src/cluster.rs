//! Cluster sources: find the master of every shard from any node, and find it again after a
//! failover.
//!
//! A shard is named after the lowest slot its master served when the connector first saw it
//! (`<shard_name>/<slot>`). That slot is the shard's *anchor*: whichever node serves it is the
//! shard's master, so after a failover the promoted replica is found under the same name, with
//! the same checkpoint, and PSYNC continues from the old replid and offset.

use crate::config::Endpoint;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::watch;

/// A master of the cluster as `CLUSTER NODES` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Master {
    pub id: String,
    pub host: String,
    pub port: u16,
    /// Slot ranges it serves, ascending.
    pub slots: Vec<(u16, u16)>,
    /// Node ids of its replicas.
    pub replicas: Vec<String>,
}

impl Master {
    /// The lowest slot it serves.
    pub fn anchor(&self) -> Option<u16> {
        self.slots.iter().map(|r| r.0).min()
    }

    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }

    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Masters with slots in a `CLUSTER NODES` reply. Failed masters, masters without an address
/// and nodes in handshake are left out; importing/migrating markers (`[…]`) are not slots.
pub fn parse_nodes(text: &str) -> Vec<Master> {
    let mut masters = Vec::new();
    let mut replicas: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            continue;
        }
        let flags: Vec<&str> = fields[2].split(',').collect();
        if flags.iter().any(|f| matches!(*f, "slave" | "replica")) {
            replicas.push((fields[3].to_owned(), fields[0].to_owned()));
            continue;
        }
        if !flags.contains(&"master")
            || flags
                .iter()
                .any(|f| matches!(*f, "fail" | "fail?" | "noaddr" | "handshake"))
        {
            continue;
        }
        // ip:port@cport[,hostname]
        let addr = fields[1].split('@').next().unwrap_or_default();
        let Some((host, port)) = addr.rsplit_once(':') else {
            continue;
        };
        let Ok(port) = port.parse::<u16>() else {
            continue;
        };
        if host.is_empty() || port == 0 {
            continue;
        }
        let mut slots: Vec<(u16, u16)> = fields[8..]
            .iter()
            .filter(|s| !s.starts_with('['))
            .filter_map(|s| match s.split_once('-') {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => s.parse().ok().map(|n| (n, n)),
            })
            .collect();
        if slots.is_empty() {
            continue;
        }
        slots.sort_unstable();
        masters.push(Master {
            id: fields[0].to_owned(),
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            slots,
            replicas: Vec::new(),
        });
    }
    for (master, replica) in replicas {
        if let Some(m) = masters.iter_mut().find(|m| m.id == master) {
            m.replicas.push(replica);
        }
    }
    masters.sort_by_key(|m| m.anchor());
    masters
}

/// The URL of `endpoint` for the redis client (credentials kept).
pub fn client_url(endpoint: &Endpoint) -> String {
    let enc = |s: &str| {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect::<String>()
    };
    let scheme = if endpoint.tls { "rediss" } else { "redis" };
    let auth = match (&endpoint.user, &endpoint.password) {
        (Some(u), Some(p)) => format!("{}:{}@", enc(u), enc(p)),
        (None, Some(p)) => format!(":{}@", enc(p)),
        (Some(u), None) => format!("{}@", enc(u)),
        (None, None) => String::new(),
    };
    format!("{scheme}://{auth}{}:{}", endpoint.host, endpoint.port)
}

/// What one node says about the cluster: `None` when it is not in cluster mode.
pub fn discover(
    endpoint: &Endpoint,
    tls: &crate::tls::TlsFiles,
    timeout: Duration,
) -> Result<Option<Vec<Master>>, String> {
    let address = endpoint.address();
    let conn = tls
        .redis_client(&client_url(endpoint))
        .and_then(|c| c.get_connection_with_timeout(timeout));
    let mut conn = match conn {
        Ok(c) => c,
        // Wrong credentials or certificates: the replica link's handshake reports them (and
        // stops) the same way for a standalone server and a cluster node.
        Err(e)
            if e.kind() == redis::ErrorKind::AuthenticationFailed
                || matches!(e.code(), Some("WRONGPASS" | "NOAUTH" | "NOPERM"))
                || (endpoint.tls && is_tls_failure(&e)) =>
        {
            tracing::debug!("source {address}: {e}");
            return Ok(None);
        }
        Err(e) => return Err(format!("source {address}: {e}")),
    };
    let _ = conn.set_read_timeout(Some(timeout));
    // `CLUSTER NODES` answers "ERR This instance has cluster support disabled" on a standalone
    // server; INFO may be forbidden to a least-privilege user, so ask the cluster directly.
    let nodes: redis::RedisResult<String> = redis::cmd("CLUSTER").arg("NODES").query(&mut conn);
    match nodes {
        Ok(text) => Ok(Some(parse_nodes(&text))),
        // No answer: retry later.
        Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => {
            Err(format!("source {address}: {e}"))
        }
        Err(e) if e.code() == Some("NOPERM") => {
            tracing::warn!("source {address}: CLUSTER NODES refused ({e}); cannot tell whether the source is a cluster, so only this node is replicated (grant +cluster|nodes, docs/security.md)");
            Ok(None)
        }
        // "cluster support disabled", or a server without the command (before 3.0, some
        // proxies): a standalone source.
        Err(e) => {
            tracing::debug!("source {address}: CLUSTER NODES: {e}: a standalone source");
            Ok(None)
        }
    }
}

/// A TLS handshake that failed on the certificates (the replica link reports it as fatal).
fn is_tls_failure(e: &redis::RedisError) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    text.contains("certificate") || text.contains("handshake") || text.contains("tls")
}

/// Asks each known node in turn until one answers with a topology.
pub fn discover_any(
    seeds: &[Endpoint],
    tls: &crate::tls::TlsFiles,
    timeout: Duration,
) -> Result<Vec<Master>, String> {
    let mut errors = Vec::new();
    for seed in seeds {
        match discover(seed, tls, timeout) {
            Ok(Some(masters)) if !masters.is_empty() => return Ok(masters),
            Ok(Some(_)) => errors.push(format!("{}: no master with slots", seed.address())),
            Ok(None) => errors.push(format!("{}: not in cluster mode", seed.address())),
            Err(e) => errors.push(e),
        }
    }
    Err(format!("no cluster node answered: {}", errors.join("; ")))
}

/// `seed` with another node's address (same credentials and TLS).
pub fn at(seed: &Endpoint, host: &str, port: u16) -> Endpoint {
    Endpoint {
        host: host.to_owned(),
        port,
        ..seed.clone()
    }
}

/// Keys that moved between shards of a cluster source (ADR 0007).
///
/// `MIGRATE` makes the new owner execute `RESTORE-ASKING key …` and then the old owner delete
/// the key, which reaches its replicas as a plain `DEL`. The two arrive on different links, so
/// the old shard's `DEL` may be read after the new shard's `RESTORE-ASKING`; published in that
/// order, it would delete the migrated key on the target. The rule: once a shard has imported a
/// key, a `DEL`/`UNLINK` of that key from any *other* shard is the migration's own delete (a
/// client's delete of a key that lives elsewhere is redirected with `-ASK`/`-MOVED` and never
/// executed there), so that key is dropped from the command. A later import by another shard
/// (the key moving again) replaces the entry. Bounded: the oldest entries are forgotten first.
///
/// The memory outlives the process: an import is written to the checkpoint topic before it is
/// published (`persist`), and its record is removed once the old owner's dropped delete is below
/// that shard's checkpoint, so it can no longer be replayed (`settled`).
#[derive(Debug, Default)]
pub struct Migrations {
    inner: Mutex<MigrationsInner>,
}

#[derive(Debug, Default)]
struct MigrationsInner {
    /// Imported key → (importing shard, which import it was).
    owner: std::collections::HashMap<bytes::Bytes, (String, u64)>,
    order: std::collections::VecDeque<bytes::Bytes>,
    imports: u64,
    /// Deletes dropped by the rule, until their shard checkpoints past them: (shard, offset after
    /// the delete, key, the import it was dropped for).
    settling: std::collections::VecDeque<(String, u64, bytes::Bytes, u64)>,
    /// Recent deletes: key → (shard, replication offset after the delete).
    deleted: std::collections::HashMap<bytes::Bytes, (String, u64)>,
    deleted_order: std::collections::VecDeque<bytes::Bytes>,
    /// What Kafka acknowledged, per shard (the running session's).
    acked: std::collections::HashMap<String, watch::Receiver<Option<crate::records::Mark>>>,
}

/// Most imported keys remembered.
const MIGRATIONS_REMEMBERED: usize = 1_000_000;
/// Most recent deletes remembered for ordering imports after them.
const DELETES_REMEMBERED: usize = 100_000;
/// Longest an import waits for another shard's delete of the same key to be acknowledged.
const IMPORT_WAIT: Duration = Duration::from_secs(10);

impl Migrations {
    /// The imported keys a previous run left in the checkpoint topic.
    pub fn restore(&self, imports: std::collections::HashMap<bytes::Bytes, String>) {
        if let Ok(mut inner) = self.inner.lock() {
            for (key, shard) in imports {
                inner.import(key, shard);
            }
        }
    }

    /// `RESTORE-ASKING`: the command by which a shard imports a key.
    pub fn is_import(args: &[bytes::Bytes]) -> bool {
        args.len() > 1 && args[0].eq_ignore_ascii_case(b"restore-asking")
    }

    /// The imported keys whose records can leave the checkpoint topic now that `shard`'s
    /// checkpoint is at `offset`: the deletes dropped for them cannot be replayed any more.
    pub fn settled(&self, shard: &str, offset: u64) -> Vec<bytes::Bytes> {
        let Ok(mut inner) = self.inner.lock() else {
            return Vec::new();
        };
        let inner = &mut *inner;
        let mut done = Vec::new();
        inner.settling.retain(|(by, after, key, import)| {
            if by != shard || *after > offset {
                return true;
            }
            // Not when the key was imported again since: that import's record must stay.
            if inner.owner.get(key).is_some_and(|(_, i)| i == import) {
                done.push(key.clone());
            }
            false
        });
        done
    }

    /// Where a shard's acknowledged position can be watched (each new session registers).
    pub fn register_acked(
        &self,
        shard: &str,
        acked: watch::Receiver<Option<crate::records::Mark>>,
    ) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.acked.insert(shard.to_owned(), acked);
        }
    }

    /// The other half of the rule: when the old owner's `DEL` was read *before* the new owner's
    /// `RESTORE-ASKING`, the delete is published (it may be a client's), and the import must
    /// reach the topic after it. Each shard has its own producer, so that order is only certain
    /// once Kafka acknowledged the delete: `RESTORE-ASKING` of a key another shard deleted
    /// recently waits for that (`order` says what to wait for; `wait_published` waits).
    pub fn order(
        &self,
        shard: &str,
        args: &[bytes::Bytes],
        end_offset: u64,
    ) -> Option<(String, u64)> {
        let name = args.first()?;
        let import = name.eq_ignore_ascii_case(b"restore-asking");
        let delete = name.eq_ignore_ascii_case(b"del") || name.eq_ignore_ascii_case(b"unlink");
        if !import && !delete {
            return None;
        }
        let mut inner = self.inner.lock().ok()?;
        if import {
            let key = args.get(1)?;
            return match inner.deleted.get(key) {
                Some((by, _)) if by != shard => inner.deleted.remove(key),
                _ => None,
            };
        }
        for key in &args[1..] {
            if inner
                .deleted
                .insert(key.clone(), (shard.to_owned(), end_offset))
                .is_none()
            {
                inner.deleted_order.push_back(key.clone());
                if inner.deleted_order.len() > DELETES_REMEMBERED {
                    if let Some(old) = inner.deleted_order.pop_front() {
                        inner.deleted.remove(&old);
                    }
                }
            }
        }
        None
    }

    /// Waits until `other` shard's publication up to `offset` is acknowledged by Kafka (at most
    /// `IMPORT_WAIT`; a shard that is gone or restarting is not waited for).
    pub async fn wait_published(&self, shard: &str, other: &str, offset: u64) {
        let acked = self
            .inner
            .lock()
            .ok()
            .and_then(|inner| inner.acked.get(other).cloned());
        let Some(mut acked) = acked else { return };
        let started = std::time::Instant::now();
        let done = tokio::time::timeout(
            IMPORT_WAIT,
            acked.wait_for(|m| m.is_some_and(|m| m.offset >= offset)),
        )
        .await;
        metrics::counter!("source_migration_import_waits_total", "shard" => shard.to_owned())
            .increment(1);
        match done {
            Ok(_) => tracing::debug!(
                shard,
                "an imported key waited {:?} for shard {other}'s delete of it to reach Kafka",
                started.elapsed()
            ),
            Err(_) => tracing::warn!(
                shard,
                "an imported key waited {IMPORT_WAIT:?} for shard {other}'s delete of it (offset {offset}) to reach Kafka; publishing it anyway"
            ),
        }
    }

    /// Applies the rule to one command of `shard`'s stream: records imports, and returns the
    /// command without the keys it must not delete (`None`: nothing left to publish).
    pub fn filter(
        &self,
        shard: &str,
        args: Vec<bytes::Bytes>,
        end_offset: u64,
    ) -> Option<Vec<bytes::Bytes>> {
        let name = args.first()?;
        let import = name.eq_ignore_ascii_case(b"restore-asking");
        // Every other command passes without taking the lock (this runs for every write).
        if !import && !name.eq_ignore_ascii_case(b"del") && !name.eq_ignore_ascii_case(b"unlink") {
            return Some(args);
        }
        let Ok(mut inner) = self.inner.lock() else {
            return Some(args);
        };
        if import {
            if let Some(key) = args.get(1) {
                inner.import(key.clone(), shard.to_owned());
            }
            return Some(args);
        }
        if inner.owner.is_empty() {
            return Some(args);
        }
        let inner = &mut *inner;
        let moved = |k: &bytes::Bytes| inner.owner.get(k).is_some_and(|(o, _)| o != shard);
        if !args[1..].iter().any(moved) {
            return Some(args);
        }
        for key in args[1..].iter().filter(|k| moved(k)) {
            let import = inner.owner[key].1;
            inner
                .settling
                .push_back((shard.to_owned(), end_offset, key.clone(), import));
        }
        while inner.settling.len() > MIGRATIONS_REMEMBERED {
            // Only leaves a record behind in the checkpoint topic.
            inner.settling.pop_front();
        }
        let kept: Vec<bytes::Bytes> = std::iter::once(args[0].clone())
            .chain(args[1..].iter().filter(|k| !moved(k)).cloned())
            .collect();
        let dropped = args.len() - kept.len();
        tracing::info!(
            shard,
            "dropped the delete of {dropped} key(s) migrated to another shard (MIGRATE's own DEL)"
        );
        metrics::counter!("source_migrated_deletes_dropped_total", "shard" => shard.to_owned())
            .increment(dropped as u64);
        (kept.len() > 1).then_some(kept)
    }
}

impl MigrationsInner {
    fn import(&mut self, key: bytes::Bytes, shard: String) {
        self.imports += 1;
        if self
            .owner
            .insert(key.clone(), (shard, self.imports))
            .is_none()
        {
            self.order.push_back(key);
            if self.order.len() > MIGRATIONS_REMEMBERED {
                if let Some(old) = self.order.pop_front() {
                    self.owner.remove(&old);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<bytes::Bytes> {
        words
            .iter()
            .map(|w| bytes::Bytes::copy_from_slice(w.as_bytes()))
            .collect()
    }

    /// The old owner's `DEL` read first: the new owner's import of that key waits until the
    /// delete is acknowledged by Kafka, so the two reach the topic in that order.
    #[tokio::test]
    async fn an_import_after_another_shards_delete_waits_for_it() {
        let m = std::sync::Arc::new(Migrations::default());
        let (tx, rx) = watch::channel(None);
        m.register_acked("b", rx);
        assert_eq!(m.order("b", &args(&["DEL", "k", "j"]), 100), None);
        assert_eq!(
            m.order("b", &args(&["RESTORE-ASKING", "k", "0", "x"]), 110),
            None
        );
        let wait = m.order("a", &args(&["RESTORE-ASKING", "k", "0", "x"]), 7);
        assert_eq!(wait, Some(("b".to_owned(), 100)));
        assert_eq!(
            m.order("a", &args(&["RESTORE-ASKING", "k", "0", "x"]), 8),
            None
        );
        let acked = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let mark = |offset| {
                Some(crate::records::Mark {
                    offset,
                    snapshot_done: true,
                })
            };
            tx.send(mark(99)).unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.send(mark(100)).unwrap();
            tx
        });
        let started = std::time::Instant::now();
        m.wait_published("a", "b", 100).await;
        assert!(started.elapsed() >= Duration::from_millis(100));
        drop(acked.await);
        // Nobody registered as "c": nothing to wait for.
        m.wait_published("a", "c", 1).await;
    }

    #[test]
    fn the_old_owners_delete_of_a_migrated_key_is_dropped() {
        let m = Migrations::default();
        // Before any import, deletes pass.
        assert_eq!(
            m.filter("a", args(&["DEL", "k"]), 0),
            Some(args(&["DEL", "k"]))
        );
        assert!(m
            .filter("b", args(&["RESTORE-ASKING", "k", "0", "x"]), 0)
            .is_some());
        // The old owner's DEL of k is MIGRATE's; other keys stay.
        assert_eq!(m.filter("a", args(&["DEL", "k"]), 0), None);
        assert_eq!(
            m.filter("a", args(&["DEL", "k", "j"]), 0),
            Some(args(&["DEL", "j"]))
        );
        // The new owner deleting it is a client's delete.
        assert_eq!(
            m.filter("b", args(&["UNLINK", "k"]), 0),
            Some(args(&["UNLINK", "k"]))
        );
        // Moved back: now b's delete is the migration's and a's is a client's.
        assert!(m
            .filter("a", args(&["RESTORE-ASKING", "k", "0", "x"]), 0)
            .is_some());
        assert_eq!(m.filter("b", args(&["DEL", "k"]), 0), None);
        assert_eq!(
            m.filter("a", args(&["DEL", "k"]), 0),
            Some(args(&["DEL", "k"]))
        );
    }

    /// The memory of an import outlives the process (`restore`), and its record can go once the
    /// old owner's dropped delete is below that shard's checkpoint, unless the key moved again.
    #[test]
    fn imports_settle_when_the_dropped_delete_is_checkpointed() {
        let m = Migrations::default();
        m.restore([(bytes::Bytes::from_static(b"k"), "b".to_owned())].into());
        assert_eq!(m.filter("a", args(&["DEL", "k"]), 50), None);
        assert!(m.settled("b", 100).is_empty(), "another shard's checkpoint");
        assert!(m.settled("a", 49).is_empty(), "before the delete");
        assert_eq!(m.settled("a", 50), vec![bytes::Bytes::from_static(b"k")]);
        assert!(m.settled("a", 60).is_empty(), "settled once");

        // Dropped for b's import, but c imported the key since: c's record stays.
        assert!(Migrations::is_import(&args(&[
            "RESTORE-ASKING",
            "j",
            "0",
            "x"
        ])));
        assert!(!Migrations::is_import(&args(&["RESTORE", "j", "0", "x"])));
        m.filter("b", args(&["RESTORE-ASKING", "j", "0", "x"]), 10);
        assert_eq!(m.filter("a", args(&["DEL", "j"]), 70), None);
        m.filter("c", args(&["RESTORE-ASKING", "j", "0", "x"]), 20);
        assert!(m.settled("a", 80).is_empty());
    }

    const NODES: &str = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,host-4 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003 master - 0 1426238318243 3 connected 10923-16383 [10923->-67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1]
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005 master,fail - 0 1426238316232 5 connected 100
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460
a1 :0@0 master,noaddr - 0 0 0 disconnected 200
";

    #[test]
    fn masters_with_slots_sorted_by_anchor() {
        let masters = parse_nodes(NODES);
        let summary: Vec<(u16, Option<u16>)> =
            masters.iter().map(|m| (m.port, m.anchor())).collect();
        assert_eq!(
            summary,
            vec![(30001, Some(0)), (30002, Some(5461)), (30003, Some(10923))]
        );
        assert_eq!(masters[2].slots, vec![(10923, 16383)]);
        assert!(masters[1].serves(10922) && !masters[1].serves(10923));
        assert_eq!(
            masters[0].replicas,
            vec!["07c37dfeb235213a872192d90877d0cd55635b91"]
        );
    }

    #[test]
    fn single_slots_and_several_ranges() {
        let m = parse_nodes("id 10.0.0.1:7000@17000 master - 0 0 1 connected 7 0-3 9-10\n");
        assert_eq!(m[0].slots, vec![(0, 3), (7, 7), (9, 10)]);
        assert_eq!(m[0].anchor(), Some(0));
        assert_eq!(m[0].address(), "10.0.0.1:7000");
    }

    #[test]
    fn credentials_survive_in_the_client_url() {
        let e = Endpoint::parse("redis://repl:p%40ss@127.0.0.1:7000").unwrap();
        assert_eq!(client_url(&at(&e, "h", 1)), "redis://repl:p%40ss@h:1");
    }
}
