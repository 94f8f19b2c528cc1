//! A workload whose every lost, doubled or reordered write shows, the record of what the source
//! acknowledged, and a checker that reads a target against that record.
//!
//! Each key family makes one kind of damage visible:
//! - `ctr:<k>`: `INCRBY` by a unique amount (the op's number), so a doubled or lost write shows
//!   as an excess or a deficit that names the amount;
//! - `list:<k>` (`RPUSH` of op numbers), `app:<k>` (`APPEND` of `<n>,` tokens), `xs:<k>` (`XADD`
//!   with explicit ids `<n>-1`): sequences, where a missing, repeated or displaced item is a lost,
//!   doubled or reordered write;
//! - `ver:<k>`: `SET` of a versioned value with `PXAT`: an older version is a stale value, another
//!   expiry a wrong TTL;
//! - `DEL` and re-creation of lists, `RENAME` across slots (a barrier), `MULTI/EXEC` blocks in one
//!   slot, and now and then `FLUSHDB` (a broadcast barrier) that empties the record too.
//!
//! The record only changes once the source replied OK: it is what the source acknowledged.

use crate::dataset::{Dataset, Value};
use rand::Rng;
use std::collections::{BTreeMap, HashMap};
use std::fmt;

/// What a key must hold.
#[derive(Debug, Clone, PartialEq)]
pub enum Expected {
    /// Sum of the increments, and the increments (to name a doubled or lost one).
    Counter { value: i64, increments: Vec<i64> },
    /// Items in order: list elements, appended tokens or stream entry ids (their first part).
    Sequence(Vec<u64>),
    /// The last version set, and its absolute expiry in Unix ms.
    Versioned { version: u64, expire_at_ms: i64 },
}

/// The kinds of damage the checker tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Damage {
    LostWrite,
    DoubledWrite,
    ReorderedWrite,
    StaleValue,
    WrongTtl,
    ExtraKey,
    MissingKey,
}

impl fmt::Display for Damage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Damage::LostWrite => "lost write",
            Damage::DoubledWrite => "doubled write",
            Damage::ReorderedWrite => "reordered write",
            Damage::StaleValue => "stale value",
            Damage::WrongTtl => "wrong TTL",
            Damage::ExtraKey => "extra key",
            Damage::MissingKey => "missing key",
        })
    }
}

/// One difference between the target and the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Difference {
    pub key: String,
    pub damage: Damage,
    pub detail: String,
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.damage, self.key, self.detail)
    }
}

/// The record of acknowledged writes, key by key (db 0).
#[derive(Debug, Default, Clone)]
pub struct History {
    pub keys: BTreeMap<Vec<u8>, Expected>,
    /// Writes acknowledged since the start.
    pub writes: u64,
}

/// How many keys of each family the workload cycles through.
const KEYS: u64 = 64;

impl History {
    /// Issues the next `n` writes of the workload on `conn` (the source) and records those the
    /// source acknowledged. `op` numbers every write and must keep growing across calls.
    pub fn write(
        &mut self,
        conn: &mut redis::Connection,
        rng: &mut impl Rng,
        op: &mut u64,
        n: u64,
        now_ms: i64,
    ) -> redis::RedisResult<()> {
        for _ in 0..n {
            *op += 1;
            let i = *op;
            let k = rng.random_range(0..KEYS);
            match rng.random_range(0..100) {
                0..=24 => {
                    let key = format!("ctr:{k}");
                    redis::cmd("INCRBY").arg(&key).arg(i).query::<i64>(conn)?;
                    self.incr(key.into_bytes(), i as i64);
                }
                25..=44 => {
                    let key = format!("list:{k}");
                    redis::cmd("RPUSH").arg(&key).arg(i).query::<i64>(conn)?;
                    self.push(key.into_bytes(), i);
                }
                45..=59 => {
                    let key = format!("app:{k}");
                    redis::cmd("APPEND")
                        .arg(&key)
                        .arg(format!("{i},"))
                        .query::<i64>(conn)?;
                    self.push(key.into_bytes(), i);
                }
                60..=69 => {
                    let key = format!("xs:{k}");
                    redis::cmd("XADD")
                        .arg(&key)
                        .arg(format!("{i}-1"))
                        .arg("n")
                        .arg(i)
                        .query::<String>(conn)?;
                    self.push(key.into_bytes(), i);
                }
                70..=84 => {
                    let key = format!("ver:{k}");
                    let at = now_ms + 3_600_000 + (i % 1000) as i64;
                    redis::cmd("SET")
                        .arg(&key)
                        .arg(format!("v{i}"))
                        .arg("PXAT")
                        .arg(at)
                        .query::<()>(conn)?;
                    self.keys.insert(
                        key.into_bytes(),
                        Expected::Versioned {
                            version: i,
                            expire_at_ms: at,
                        },
                    );
                }
                85..=89 => {
                    // Delete a list; the next pushes create it again.
                    let key = format!("list:{k}");
                    redis::cmd("DEL").arg(&key).query::<i64>(conn)?;
                    self.keys.remove(key.as_bytes());
                }
                90..=94 => {
                    // One slot, one transaction: both or neither.
                    let (a, l) = (format!("{{tx{k}}}:ctr"), format!("{{tx{k}}}:list"));
                    redis::pipe()
                        .atomic()
                        .cmd("INCRBY")
                        .arg(&a)
                        .arg(i)
                        .cmd("RPUSH")
                        .arg(&l)
                        .arg(i)
                        .query::<(i64, i64)>(conn)?;
                    self.incr(a.into_bytes(), i as i64);
                    self.push(l.into_bytes(), i);
                }
                95..=98 => {
                    // Across slots: a barrier on the topic.
                    let from = format!("list:{k}");
                    let to = format!("moved:{}", i % 8);
                    if self.keys.contains_key(from.as_bytes()) {
                        redis::cmd("RENAME").arg(&from).arg(&to).query::<()>(conn)?;
                        let v = self.keys.remove(from.as_bytes());
                        if let Some(v) = v {
                            self.keys.insert(to.into_bytes(), v);
                        }
                    }
                }
                _ => {
                    // Rarely: everything goes (a broadcast barrier).
                    if rng.random_range(0..20) == 0 {
                        redis::cmd("FLUSHDB").query::<()>(conn)?;
                        self.keys.clear();
                    }
                }
            }
            self.writes += 1;
        }
        Ok(())
    }

    fn incr(&mut self, key: Vec<u8>, by: i64) {
        match self.keys.entry(key).or_insert(Expected::Counter {
            value: 0,
            increments: Vec::new(),
        }) {
            Expected::Counter { value, increments } => {
                *value += by;
                increments.push(by);
            }
            other => {
                *other = Expected::Counter {
                    value: by,
                    increments: vec![by],
                }
            }
        }
    }

    fn push(&mut self, key: Vec<u8>, item: u64) {
        match self
            .keys
            .entry(key)
            .or_insert(Expected::Sequence(Vec::new()))
        {
            Expected::Sequence(items) => items.push(item),
            other => *other = Expected::Sequence(vec![item]),
        }
    }

    /// Compares `target` (keys starting with `ignore` left out) with the record.
    pub fn check(&self, target: &Dataset, ignore: &[u8], ttl_tolerance_ms: i64) -> Vec<Difference> {
        let mut out = Vec::new();
        let name = |k: &[u8]| String::from_utf8_lossy(k).into_owned();
        for (key, expected) in &self.keys {
            let Some(entry) = target.keys.get(&(0, key.clone())) else {
                out.push(Difference {
                    key: name(key),
                    damage: Damage::MissingKey,
                    detail: format!("expected {}", summary(expected)),
                });
                continue;
            };
            out.extend(
                compare(expected, &entry.value, entry.ttl_ms, ttl_tolerance_ms).map(
                    |(damage, detail)| Difference {
                        key: name(key),
                        damage,
                        detail,
                    },
                ),
            );
        }
        for (db, key) in target.keys.keys() {
            if key.starts_with(ignore) || (*db == 0 && self.keys.contains_key(key)) {
                continue;
            }
            out.push(Difference {
                key: format!("db{db}:{}", name(key)),
                damage: Damage::ExtraKey,
                detail: "on the target, not in what the source acknowledged".into(),
            });
        }
        out
    }
}

fn summary(e: &Expected) -> String {
    match e {
        Expected::Counter { value, .. } => format!("counter {value}"),
        Expected::Sequence(items) => format!("{} items", items.len()),
        Expected::Versioned { version, .. } => format!("version {version}"),
    }
}

/// The items of a sequence value: list elements, `n,` tokens of a string, or stream ids.
fn items(v: &Value) -> Option<Vec<u64>> {
    match v {
        Value::List(l) => l
            .iter()
            .map(|e| std::str::from_utf8(e).ok()?.parse().ok())
            .collect(),
        Value::String(s) => std::str::from_utf8(s)
            .ok()?
            .split(',')
            .filter(|t| !t.is_empty())
            .map(|t| t.parse().ok())
            .collect(),
        Value::Stream(s) => s
            .entries
            .iter()
            .map(|(id, _)| id.split('-').next()?.parse().ok())
            .collect(),
        _ => None,
    }
}

/// The damage one key shows, if any.
fn compare(
    expected: &Expected,
    actual: &Value,
    ttl_ms: Option<i64>,
    tolerance_ms: i64,
) -> Option<(Damage, String)> {
    match expected {
        Expected::Counter { value, increments } => {
            let Value::String(s) = actual else {
                return Some((Damage::StaleValue, format!("not a counter: {actual:?}")));
            };
            let got: i64 = String::from_utf8_lossy(s).parse().ok()?;
            let diff = got - value;
            let named = |d: i64| {
                increments
                    .iter()
                    .find(|&&i| i == d.abs())
                    .map_or(String::new(), |i| format!(" (the increment of op {i})"))
            };
            match diff.signum() {
                0 => None,
                1 => Some((
                    Damage::DoubledWrite,
                    format!("{got}, expected {value}: {diff} too much{}", named(diff)),
                )),
                _ => Some((
                    Damage::LostWrite,
                    format!("{got}, expected {value}: {} missing{}", -diff, named(diff)),
                )),
            }
        }
        Expected::Sequence(want) => {
            let Some(got) = items(actual) else {
                return Some((Damage::StaleValue, format!("not a sequence: {actual:?}")));
            };
            sequence_damage(want, &got)
        }
        Expected::Versioned {
            version,
            expire_at_ms,
        } => {
            let Value::String(s) = actual else {
                return Some((Damage::StaleValue, format!("not a string: {actual:?}")));
            };
            let got: u64 = String::from_utf8_lossy(s)
                .strip_prefix('v')
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            if got != *version {
                return Some((
                    Damage::StaleValue,
                    format!("version {got}, expected {version}"),
                ));
            }
            match ttl_ms {
                Some(at) if (at - expire_at_ms).abs() <= tolerance_ms => None,
                other => Some((
                    Damage::WrongTtl,
                    format!("expires at {other:?}, expected {expire_at_ms}"),
                )),
            }
        }
    }
}

/// Missing items are lost writes, repeated ones doubled writes, the same items in another order
/// reordered writes; items the record never had are stale (from before a delete).
pub fn sequence_damage(want: &[u64], got: &[u64]) -> Option<(Damage, String)> {
    if want == got {
        return None;
    }
    let count = |items: &[u64]| {
        let mut c: HashMap<u64, i64> = HashMap::new();
        items.iter().for_each(|i| *c.entry(*i).or_default() += 1);
        c
    };
    let (w, g) = (count(want), count(got));
    let lost: Vec<u64> = want
        .iter()
        .filter(|i| g.get(i).copied().unwrap_or(0) < w[i])
        .copied()
        .collect();
    if !lost.is_empty() {
        return Some((
            Damage::LostWrite,
            format!(
                "{} of {} items missing, first {:?}",
                lost.len(),
                want.len(),
                &lost[..lost.len().min(5)]
            ),
        ));
    }
    let unknown: Vec<u64> = got.iter().filter(|i| !w.contains_key(i)).copied().collect();
    if !unknown.is_empty() {
        return Some((
            Damage::StaleValue,
            format!(
                "items the source no longer has: {:?}",
                &unknown[..unknown.len().min(5)]
            ),
        ));
    }
    let doubled: Vec<u64> = got.iter().filter(|i| g[i] > w[i]).copied().collect();
    if !doubled.is_empty() {
        return Some((
            Damage::DoubledWrite,
            format!(
                "items applied twice: {:?}",
                &doubled[..doubled.len().min(5)]
            ),
        ));
    }
    let at = want.iter().zip(got).position(|(a, b)| a != b).unwrap_or(0);
    Some((
        Damage::ReorderedWrite,
        format!(
            "order differs from item {at}: expected {:?}, got {:?}",
            &want[at..(at + 5).min(want.len())],
            &got[at..(at + 5).min(got.len())]
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataset::Entry;

    fn entry(value: Value, ttl_ms: Option<i64>) -> Entry {
        Entry {
            kind: String::new(),
            ttl_ms,
            ttl_approx: false,
            expired: false,
            value,
        }
    }

    #[test]
    fn sequences_tell_lost_doubled_reordered_and_stale() {
        assert_eq!(sequence_damage(&[1, 2, 3], &[1, 2, 3]), None);
        assert_eq!(
            sequence_damage(&[1, 2, 3], &[1, 3]).unwrap().0,
            Damage::LostWrite
        );
        assert_eq!(
            sequence_damage(&[1, 2, 3], &[1, 2, 2, 3]).unwrap().0,
            Damage::DoubledWrite
        );
        assert_eq!(
            sequence_damage(&[1, 2, 3], &[1, 3, 2]).unwrap().0,
            Damage::ReorderedWrite
        );
        assert_eq!(
            sequence_damage(&[5], &[1, 5]).unwrap().0,
            Damage::StaleValue
        );
    }

    #[test]
    fn counters_versions_ttls_and_extra_keys() {
        let mut h = History::default();
        h.incr(b"c".to_vec(), 7);
        h.incr(b"c".to_vec(), 9);
        h.keys.insert(
            b"v".to_vec(),
            Expected::Versioned {
                version: 4,
                expire_at_ms: 1_000_000,
            },
        );
        let mut target = Dataset::default();
        target.keys.insert(
            (0, b"c".to_vec()),
            entry(Value::String(b"25".to_vec()), None),
        );
        target.keys.insert(
            (0, b"v".to_vec()),
            entry(Value::String(b"v3".to_vec()), Some(1_000_000)),
        );
        target.keys.insert(
            (0, b"x".to_vec()),
            entry(Value::String(b"1".to_vec()), None),
        );
        target.keys.insert(
            (0, b"ckpt:1".to_vec()),
            entry(Value::String(b"1".to_vec()), None),
        );
        let found = h.check(&target, b"ckpt", 1000);
        let kinds: Vec<(Damage, &str)> = found.iter().map(|d| (d.damage, d.key.as_str())).collect();
        assert_eq!(
            kinds,
            vec![
                (Damage::DoubledWrite, "c"),
                (Damage::StaleValue, "v"),
                (Damage::ExtraKey, "db0:x")
            ]
        );
        assert!(found[0].detail.contains("op 9"), "{}", found[0]);
        target.keys.insert(
            (0, b"v".to_vec()),
            entry(Value::String(b"v4".to_vec()), Some(1_500_000)),
        );
        target.keys.remove(&(0, b"c".to_vec()));
        let found = h.check(&target, b"ckpt", 1000);
        let kinds: Vec<Damage> = found.iter().map(|d| d.damage).collect();
        assert_eq!(
            kinds,
            vec![Damage::MissingKey, Damage::WrongTtl, Damage::ExtraKey]
        );
    }
}
