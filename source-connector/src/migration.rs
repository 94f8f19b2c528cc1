//! The slot-migration rule of cluster sources (ADR 0007): imports published after the old
//! owner's delete of the key, and that delete left out once the key is imported.

use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::{oneshot, watch};

/// Keys that moved between shards of a cluster source (ADR 0007).
///
/// `MIGRATE` makes the new owner execute `RESTORE-ASKING key …` and then the old owner delete
/// the key, which reaches its replicas as a plain `DEL`. The two arrive on different links, in
/// either order, and each shard has its own producer. Two rules keep the target right:
///
/// - **Order**: an import is published only once the old owner's delete of the key, and so every
///   write the old owner made to it before, is acknowledged by Kafka (`order`, then `wait`). The
///   delete may have been read already, or still be to come on the other link; a wait that
///   takes longer than 10 s gives up (the old owner's link is down or far behind).
/// - **Drop**: once a shard has imported a key, a `DEL`/`UNLINK` of that key from any *other*
///   shard is the migration's own delete (a client's delete of a key that lives elsewhere is
///   redirected with `-ASK`/`-MOVED` and never executed there), so that key is left out of the
///   command (`filter`). This covers deletes read after a wait gave up.
///
/// The memory of imports outlives the process: the caller writes each import to the checkpoint
/// topic before publishing it, and removes the record once the old owner's delete it was
/// ordered after, or that was dropped for it, is below that shard's checkpoint and can no
/// longer be replayed (`settled`). A later import of the key by another shard replaces the
/// entry. Bounded: the oldest entries are forgotten first.
#[derive(Debug, Default)]
pub struct Migrations {
    inner: Mutex<MigrationsInner>,
}

#[derive(Debug, Default)]
struct MigrationsInner {
    /// Imported key → (importing shard, which import it was).
    owner: Recent<(String, u64), MIGRATIONS_REMEMBERED>,
    imports: u64,
    /// Old owners' deletes of imported keys, until their shard checkpoints past them: (shard,
    /// offset after the delete, key, the import it belongs to).
    settling: std::collections::VecDeque<(String, u64, bytes::Bytes, u64)>,
    /// Recent deletes: key → (shard, replication offset after the delete).
    deleted: Recent<(String, u64), DELETES_REMEMBERED>,
    /// Imports waiting for another shard's delete of their key: key → (importing shard, where
    /// to say which shard deleted it, at what offset).
    awaiting: std::collections::HashMap<bytes::Bytes, Vec<(String, DeleteSender)>>,
    /// After a wait for a delete still to come gave up, imports do not wait for one until then.
    unordered_until: Option<std::time::Instant>,
    /// What Kafka acknowledged, per shard (the running session's).
    acked: std::collections::HashMap<String, watch::Receiver<Option<crate::records::Mark>>>,
}

/// Where an import waiting for another shard's delete of its key learns that shard and the
/// offset after the delete.
type DeleteSender = oneshot::Sender<(String, u64)>;

/// What an import is to be published after.
#[derive(Debug)]
pub enum Before {
    /// Not an import.
    Nothing,
    /// Another shard's delete of the key, already read.
    Delete(String, u64),
    /// Another shard's delete of the key, still to come.
    Pending(oneshot::Receiver<(String, u64)>),
    /// Nothing known, and not waited for (a recent wait gave up).
    Unordered,
}

/// Most imported keys remembered.
const MIGRATIONS_REMEMBERED: usize = 1_000_000;
/// Most recent deletes remembered for ordering imports after them.
const DELETES_REMEMBERED: usize = 100_000;
/// Longest an import waits for another shard's delete of the same key to be acknowledged.
const IMPORT_WAIT: Duration = Duration::from_secs(10);
/// How long imports stop waiting for deletes still to come after such a wait gave up.
const UNORDERED_FOR: Duration = Duration::from_secs(60);

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
    /// checkpoint is at `offset`: the deletes they belong to cannot be replayed any more.
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
            if inner.owner.map.get(key).is_some_and(|(_, i)| i == import) {
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

    /// The order rule, for one write of `shard`'s stream: a delete is noted (and handed to an
    /// import waiting for it); an import learns what it must be published after.
    pub fn order(&self, shard: &str, args: &[bytes::Bytes], end_offset: u64) -> Before {
        let Some(name) = args.first() else {
            return Before::Nothing;
        };
        let import = Self::is_import(args);
        if !import && !name.eq_ignore_ascii_case(b"del") && !name.eq_ignore_ascii_case(b"unlink") {
            return Before::Nothing;
        }
        let Ok(mut inner) = self.inner.lock() else {
            return Before::Nothing;
        };
        if import {
            let key = &args[1];
            if let Some((by, offset)) = inner.deleted.map.get(key).cloned() {
                if by != shard {
                    inner.deleted.map.remove(key);
                    return Before::Delete(by, offset);
                }
            }
            if inner
                .unordered_until
                .is_some_and(|t| std::time::Instant::now() < t)
            {
                return Before::Unordered;
            }
            let (tx, rx) = oneshot::channel();
            inner
                .awaiting
                .entry(key.clone())
                .or_default()
                .push((shard.to_owned(), tx));
            return Before::Pending(rx);
        }
        for key in &args[1..] {
            if let Some(waiting) = inner.awaiting.remove(key) {
                let mut handed = false;
                let mut own = Vec::new();
                for (importer, tx) in waiting {
                    if importer == shard {
                        own.push((importer, tx));
                    } else {
                        handed |= tx.send((shard.to_owned(), end_offset)).is_ok();
                    }
                }
                if !own.is_empty() {
                    inner.awaiting.insert(key.clone(), own);
                }
                if handed {
                    continue;
                }
            }
            inner
                .deleted
                .insert(key.clone(), (shard.to_owned(), end_offset));
        }
        Before::Nothing
    }

    /// Waits for what `order` said (at most `IMPORT_WAIT` in all). Returns the delete the import
    /// is now ordered after, or `None` when there is none or the wait gave up.
    pub async fn wait(&self, shard: &str, before: Before) -> Option<(String, u64)> {
        if matches!(before, Before::Nothing | Before::Unordered) {
            return None;
        }
        let started = std::time::Instant::now();
        let after = self.wait_for_delete(shard, before, started).await;
        metrics::histogram!("source_migration_import_wait_seconds", "shard" => shard.to_owned())
            .record(started.elapsed().as_secs_f64());
        after
    }

    async fn wait_for_delete(
        &self,
        shard: &str,
        before: Before,
        started: std::time::Instant,
    ) -> Option<(String, u64)> {
        let (other, offset) = match before {
            Before::Nothing | Before::Unordered => return None,
            Before::Delete(other, offset) => (other, offset),
            Before::Pending(rx) => match tokio::time::timeout(IMPORT_WAIT, rx).await {
                Ok(Ok(delete)) => delete,
                _ => {
                    if let Ok(mut inner) = self.inner.lock() {
                        inner.unordered_until = Some(std::time::Instant::now() + UNORDERED_FOR);
                        // Forget the waits that gave up (this one among them).
                        inner.awaiting.retain(|_, w| {
                            w.retain(|(_, tx)| !tx.is_closed());
                            !w.is_empty()
                        });
                    }
                    metrics::counter!("source_migration_import_wait_timeouts_total", "shard" => shard.to_owned()).increment(1);
                    tracing::warn!(
                        shard,
                        "an imported key waited {IMPORT_WAIT:?} for its old shard's delete of it, which did not come (that shard's link is down or far behind, or MIGRATE COPY); publishing it, and imports for the next {UNORDERED_FOR:?} do not wait for deletes still to come"
                    );
                    return None;
                }
            },
        };
        let acked = self
            .inner
            .lock()
            .ok()
            .and_then(|inner| inner.acked.get(&other).cloned());
        metrics::counter!("source_migration_import_waits_total", "shard" => shard.to_owned())
            .increment(1);
        // A shard that is gone or restarting is not waited for.
        let Some(mut acked) = acked else {
            return Some((other, offset));
        };
        let done = tokio::time::timeout(
            IMPORT_WAIT.saturating_sub(started.elapsed()),
            acked.wait_for(|m| m.is_some_and(|m| m.offset >= offset)),
        )
        .await;
        match done {
            Ok(_) => {
                tracing::debug!(
                    shard,
                    "an imported key waited {:?} for shard {other}'s delete of it to reach Kafka",
                    started.elapsed()
                );
                Some((other, offset))
            }
            Err(_) => {
                metrics::counter!("source_migration_import_wait_timeouts_total", "shard" => shard.to_owned()).increment(1);
                tracing::warn!(
                    shard,
                    "an imported key waited {IMPORT_WAIT:?} for shard {other}'s delete of it (offset {offset}) to reach Kafka; publishing it anyway"
                );
                None
            }
        }
    }

    /// Notes that `shard` imported `key`, published after `after` (the old owner's delete, when
    /// known): from now on other shards' deletes of it are dropped (the drop rule).
    pub fn imported(&self, shard: &str, key: &bytes::Bytes, after: Option<(String, u64)>) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        inner.import(key.clone(), shard.to_owned());
        if let Some((by, offset)) = after {
            let import = inner.imports;
            inner.settle_after(by, offset, key.clone(), import);
        }
    }

    /// The drop rule, for one write of `shard`'s stream: returns the command without the keys it
    /// must not delete (`None`: nothing left to publish).
    pub fn filter(
        &self,
        shard: &str,
        args: Vec<bytes::Bytes>,
        end_offset: u64,
    ) -> Option<Vec<bytes::Bytes>> {
        let name = args.first()?;
        // Every other command passes without taking the lock (this runs for every write).
        if !name.eq_ignore_ascii_case(b"del") && !name.eq_ignore_ascii_case(b"unlink") {
            return Some(args);
        }
        let Ok(mut inner) = self.inner.lock() else {
            return Some(args);
        };
        if inner.owner.map.is_empty() {
            return Some(args);
        }
        let inner = &mut *inner;
        let moved = |k: &bytes::Bytes| inner.owner.map.get(k).is_some_and(|(o, _)| o != shard);
        if !args[1..].iter().any(moved) {
            return Some(args);
        }
        let dropped: Vec<(bytes::Bytes, u64)> = args[1..]
            .iter()
            .filter(|k| moved(k))
            .map(|k| (k.clone(), inner.owner.map[k].1))
            .collect();
        let kept: Vec<bytes::Bytes> = std::iter::once(args[0].clone())
            .chain(args[1..].iter().filter(|k| !moved(k)).cloned())
            .collect();
        for (key, import) in &dropped {
            inner.settle_after(shard.to_owned(), end_offset, key.clone(), *import);
        }
        tracing::info!(
            shard,
            "dropped the delete of {} key(s) migrated to another shard (MIGRATE's own DEL)",
            dropped.len()
        );
        metrics::counter!("source_migrated_deletes_dropped_total", "shard" => shard.to_owned())
            .increment(dropped.len() as u64);
        (kept.len() > 1).then_some(kept)
    }
}

/// A map that forgets its oldest keys beyond `CAP` (a key's age is its first insertion).
#[derive(Debug)]
struct Recent<V, const CAP: usize> {
    map: std::collections::HashMap<bytes::Bytes, V>,
    order: std::collections::VecDeque<bytes::Bytes>,
}

impl<V, const CAP: usize> Default for Recent<V, CAP> {
    fn default() -> Self {
        Recent {
            map: Default::default(),
            order: Default::default(),
        }
    }
}

impl<V, const CAP: usize> Recent<V, CAP> {
    fn insert(&mut self, key: bytes::Bytes, value: V) {
        if self.map.insert(key.clone(), value).is_none() {
            self.order.push_back(key);
            if self.order.len() > CAP {
                if let Some(old) = self.order.pop_front() {
                    self.map.remove(&old);
                }
            }
        }
    }
}

impl MigrationsInner {
    fn import(&mut self, key: bytes::Bytes, shard: String) {
        self.imports += 1;
        self.owner.insert(key, (shard, self.imports));
    }

    fn settle_after(&mut self, shard: String, offset: u64, key: bytes::Bytes, import: u64) {
        self.settling.push_back((shard, offset, key, import));
        while self.settling.len() > MIGRATIONS_REMEMBERED {
            // Only leaves a record behind in the checkpoint topic.
            self.settling.pop_front();
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

    fn mark(offset: u64) -> Option<crate::records::Mark> {
        Some(crate::records::Mark {
            offset,
            snapshot_done: true,
        })
    }

    /// The old owner's `DEL` read first: the new owner's import of that key waits until the
    /// delete is acknowledged by Kafka, so the two reach the topic in that order.
    #[tokio::test]
    async fn an_import_after_another_shards_delete_waits_for_it() {
        let m = std::sync::Arc::new(Migrations::default());
        let (tx, rx) = watch::channel(None);
        m.register_acked("b", rx);
        assert!(matches!(
            m.order("b", &args(&["DEL", "k", "j"]), 100),
            Before::Nothing
        ));
        let before = m.order("a", &args(&["RESTORE-ASKING", "k", "0", "x"]), 7);
        assert!(matches!(&before, Before::Delete(b, 100) if b == "b"));
        let acked = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.send(mark(99)).unwrap();
            tokio::time::sleep(Duration::from_millis(50)).await;
            tx.send(mark(100)).unwrap();
            tx
        });
        let started = std::time::Instant::now();
        assert_eq!(m.wait("a", before).await, Some(("b".to_owned(), 100)));
        assert!(started.elapsed() >= Duration::from_millis(100));
        drop(acked.await);
        // Nobody registered as "c": nothing to wait for.
        let before = m.order("a", &args(&["RESTORE-ASKING", "j", "0", "x"]), 8);
        assert!(matches!(&before, Before::Delete(b, 100) if b == "b"));
        let d = m.order("c", &args(&["DEL", "z"]), 5);
        assert!(matches!(d, Before::Nothing));
        assert!(matches!(
            m.wait("a", Before::Delete("c".into(), 5)).await,
            Some((c, 5)) if c == "c"
        ));
    }

    /// The import read first: it waits for the old owner's delete to be read, and then
    /// acknowledged; a delete by the importing shard itself is not it.
    #[tokio::test]
    async fn an_import_before_the_old_owners_delete_waits_for_it_to_come() {
        let m = std::sync::Arc::new(Migrations::default());
        let (tx, rx) = watch::channel(mark(10));
        m.register_acked("a", rx);
        let before = m.order("b", &args(&["RESTORE-ASKING", "k", "0", "x"]), 7);
        assert!(matches!(before, Before::Pending(_)));
        let waiting = {
            let m = std::sync::Arc::clone(&m);
            tokio::spawn(async move { m.wait("b", before).await })
        };
        assert!(matches!(
            m.order("b", &args(&["DEL", "k"]), 8),
            Before::Nothing
        ));
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        assert!(matches!(
            m.order("a", &args(&["DEL", "k"]), 50),
            Before::Nothing
        ));
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!waiting.is_finished(), "read, not yet acknowledged");
        tx.send(mark(50)).unwrap();
        assert_eq!(waiting.await.unwrap(), Some(("a".to_owned(), 50)));
        // a's delete went to the import and is not kept for another: a later import of k
        // sees b's own earlier delete only.
        assert!(matches!(
            m.order("c", &args(&["RESTORE-ASKING", "k", "0", "x"]), 9),
            Before::Delete(b, 8) if b == "b"
        ));
    }

    #[test]
    fn the_old_owners_delete_of_a_migrated_key_is_dropped() {
        let m = Migrations::default();
        let k = bytes::Bytes::from_static(b"k");
        // Before any import, deletes pass.
        assert_eq!(
            m.filter("a", args(&["DEL", "k"]), 0),
            Some(args(&["DEL", "k"]))
        );
        m.imported("b", &k, None);
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
        m.imported("a", &k, None);
        assert_eq!(m.filter("b", args(&["DEL", "k"]), 0), None);
        assert_eq!(
            m.filter("a", args(&["DEL", "k"]), 0),
            Some(args(&["DEL", "k"]))
        );
    }

    /// The memory of an import outlives the process (`restore`), and its record can go once the
    /// old owner's delete is below that shard's checkpoint, unless the key moved again.
    #[test]
    fn imports_settle_when_the_old_owners_delete_is_checkpointed() {
        let m = Migrations::default();
        let (k, j) = (
            bytes::Bytes::from_static(b"k"),
            bytes::Bytes::from_static(b"j"),
        );
        m.restore([(k.clone(), "b".to_owned())].into());
        assert_eq!(m.filter("a", args(&["DEL", "k"]), 50), None);
        assert!(m.settled("b", 100).is_empty(), "another shard's checkpoint");
        assert!(m.settled("a", 49).is_empty(), "before the delete");
        assert_eq!(m.settled("a", 50), vec![k.clone()]);
        assert!(m.settled("a", 60).is_empty(), "settled once");
        // Ordered after a's delete at 70.
        m.imported("b", &k, Some(("a".into(), 70)));
        assert_eq!(m.settled("a", 70), vec![k]);

        assert!(Migrations::is_import(&args(&[
            "RESTORE-ASKING",
            "j",
            "0",
            "x"
        ])));
        assert!(!Migrations::is_import(&args(&["RESTORE", "j", "0", "x"])));
        // Dropped for b's import, but c imported the key since: c's record stays.
        m.imported("b", &j, None);
        assert_eq!(m.filter("a", args(&["DEL", "j"]), 70), None);
        m.imported("c", &j, None);
        assert!(m.settled("a", 80).is_empty());
    }
}
