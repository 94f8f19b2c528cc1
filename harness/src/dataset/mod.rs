//! Datasets in canonical form, read from live Redis deployments or from corpus JSON, and an exact
//! comparison with a readable report of the differences.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

mod corpus;
mod live;

pub use corpus::json_bytes;
pub use live::read;

/// A key's value in canonical form: sets and hashes sorted, scores as doubles.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    String(Vec<u8>),
    List(Vec<Vec<u8>>),
    Set(BTreeSet<Vec<u8>>),
    ZSet(BTreeMap<Vec<u8>, f64>),
    /// field -> (value, field TTL in Unix ms)
    Hash(BTreeMap<Vec<u8>, (Vec<u8>, Option<i64>)>),
    Stream(Stream),
    /// A huge value given only by its digest (corpus `value_digest`): sha256 hex and length.
    Digest {
        sha256: String,
        len: u64,
    },
}

/// A stream entry: id and its field/value pairs, in stored order.
pub type StreamEntry = (String, Vec<(Vec<u8>, Vec<u8>)>);

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Stream {
    pub length: u64,
    pub last_id: String,
    pub entries_added: Option<u64>,
    pub max_deleted_id: Option<String>,
    pub entries: Vec<StreamEntry>,
    pub groups: Vec<Group>,
}

/// A consumer group. Clock-dependent fields (delivery, seen and active times) are left out:
/// they legitimately differ between a master and its copies.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Group {
    pub name: Vec<u8>,
    pub last_delivered_id: String,
    pub entries_read: Option<u64>,
    /// (id, consumer, delivery count)
    pub pel: Vec<(String, Vec<u8>, u64)>,
    /// consumer name -> pending ids
    pub consumers: BTreeMap<Vec<u8>, Vec<String>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub kind: String,
    /// Absolute expiry, Unix ms.
    pub ttl_ms: Option<i64>,
    /// The TTL is only known approximately (corpus `ttl_approx`).
    pub ttl_approx: bool,
    /// The key had expired when the data was taken (corpus `expired`).
    pub expired: bool,
    pub value: Value,
}

/// Keys by (db, key bytes).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Dataset {
    pub keys: BTreeMap<(u32, Vec<u8>), Entry>,
}

/// How strictly to compare.
#[derive(Debug, Clone)]
pub struct CompareOptions {
    /// TTLs within this many ms are equal (exact TTLs).
    pub ttl_tolerance_ms: i64,
    /// Tolerance for TTLs marked approximate.
    pub approx_ttl_tolerance_ms: i64,
    /// Keys starting with this prefix are ignored on both sides (sink checkpoints).
    pub ignore_prefix: Option<Vec<u8>>,
    /// Compare stream `entries_read` (differs between master and replica on some versions).
    pub stream_entries_read: bool,
}

impl Default for CompareOptions {
    fn default() -> Self {
        CompareOptions {
            ttl_tolerance_ms: 2_000,
            approx_ttl_tolerance_ms: 10_000,
            ignore_prefix: None,
            stream_entries_read: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Difference {
    Missing { db: u32, key: Vec<u8> },
    Extra { db: u32, key: Vec<u8> },
    Different { db: u32, key: Vec<u8>, what: String },
}

/// The outcome of a comparison.
#[derive(Debug, Default)]
pub struct Report {
    pub compared: usize,
    pub differences: Vec<Difference>,
}

impl Report {
    pub fn is_equal(&self) -> bool {
        self.differences.is_empty()
    }
}

fn show_key(k: &[u8]) -> String {
    match std::str::from_utf8(k) {
        Ok(s) if s.len() <= 80 => format!("{s:?}"),
        Ok(s) => format!(
            "{:?}...({} bytes)",
            &s[..s.char_indices().nth(60).map_or(s.len(), |c| c.0)],
            k.len()
        ),
        Err(_) => format!("b64:{}", B64.encode(&k[..k.len().min(60)])),
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = |p: fn(&Difference) -> bool| self.differences.iter().filter(|d| p(d)).count();
        writeln!(
            f,
            "compared {} keys: {} missing, {} extra, {} different",
            self.compared,
            count(|d| matches!(d, Difference::Missing { .. })),
            count(|d| matches!(d, Difference::Extra { .. })),
            count(|d| matches!(d, Difference::Different { .. })),
        )?;
        for d in self.differences.iter().take(20) {
            match d {
                Difference::Missing { db, key } => {
                    writeln!(f, "  missing  db={db} key={}", show_key(key))?
                }
                Difference::Extra { db, key } => {
                    writeln!(f, "  extra    db={db} key={}", show_key(key))?
                }
                Difference::Different { db, key, what } => {
                    writeln!(f, "  differs  db={db} key={}: {what}", show_key(key))?
                }
            }
        }
        if self.differences.len() > 20 {
            writeln!(f, "  ... and {} more", self.differences.len() - 20)?;
        }
        Ok(())
    }
}

impl Dataset {
    /// Drops keys marked expired (Redis drops them when it loads a file as a master).
    pub fn without_expired(mut self) -> Dataset {
        self.keys.retain(|_, e| !e.expired);
        self
    }

    /// Compares `self` (expected) with `actual`.
    pub fn compare(&self, actual: &Dataset, opts: &CompareOptions) -> Report {
        let ignored = |k: &[u8]| {
            opts.ignore_prefix
                .as_deref()
                .is_some_and(|p| k.starts_with(p))
        };
        let mut report = Report::default();
        for ((db, key), want) in &self.keys {
            if ignored(key) {
                continue;
            }
            report.compared += 1;
            let Some(got) = actual.keys.get(&(*db, key.clone())) else {
                report.differences.push(Difference::Missing {
                    db: *db,
                    key: key.clone(),
                });
                continue;
            };
            if let Some(what) = entry_difference(want, got, opts) {
                report.differences.push(Difference::Different {
                    db: *db,
                    key: key.clone(),
                    what,
                });
            }
        }
        for (db, key) in actual.keys.keys() {
            if !ignored(key) && !self.keys.contains_key(&(*db, key.clone())) {
                report.differences.push(Difference::Extra {
                    db: *db,
                    key: key.clone(),
                });
            }
        }
        report
    }

    /// Panics with the report unless `actual` equals `self`.
    pub fn assert_equal(&self, actual: &Dataset, opts: &CompareOptions) {
        let r = self.compare(actual, opts);
        assert!(r.is_equal(), "datasets differ: {r}");
    }
}

fn entry_difference(want: &Entry, got: &Entry, opts: &CompareOptions) -> Option<String> {
    if want.kind != got.kind {
        return Some(format!("type {} != {}", want.kind, got.kind));
    }
    let tol = if want.ttl_approx || got.ttl_approx {
        opts.approx_ttl_tolerance_ms
    } else {
        opts.ttl_tolerance_ms
    };
    match (want.ttl_ms, got.ttl_ms) {
        (None, None) => {}
        (Some(a), Some(b)) if (a - b).abs() <= tol => {}
        (a, b) => return Some(format!("ttl {a:?} != {b:?}")),
    }
    value_difference(&want.value, &got.value, opts)
}

fn value_difference(want: &Value, got: &Value, opts: &CompareOptions) -> Option<String> {
    match (want, got) {
        (Value::Digest { sha256, len }, other) | (other, Value::Digest { sha256, len }) => {
            let (h, l) = digest(other);
            (h != *sha256 || l != *len).then(|| format!("digest {sha256}/{len} != {h}/{l}"))
        }
        (Value::ZSet(a), Value::ZSet(b)) => {
            if a.len() != b.len() || a.keys().ne(b.keys()) {
                return Some(format!("zset members differ ({} vs {})", a.len(), b.len()));
            }
            a.iter()
                .find(|(m, s)| b[*m].to_bits() != s.to_bits())
                .map(|(m, s)| format!("zset score of {} {s} != {}", show_key(m), b[m]))
        }
        (Value::Stream(a), Value::Stream(b))
            if !opts.stream_entries_read || stream_fields_unknown(a, b) =>
        {
            // Fields the expected side does not know (a source older than 7.0 has no
            // entries_added, max_deleted_id or entries_read; a newer target computes them) and,
            // when asked, entries_read everywhere are left out of the comparison.
            let strip = |s: &Stream| {
                let mut s = s.clone();
                if a.entries_added.is_none() {
                    s.entries_added = None;
                }
                if a.max_deleted_id.is_none() {
                    s.max_deleted_id = None;
                }
                for (i, g) in s.groups.iter_mut().enumerate() {
                    let known = a.groups.get(i).is_some_and(|g| g.entries_read.is_some());
                    if !opts.stream_entries_read || !known {
                        g.entries_read = None;
                    }
                }
                s
            };
            (strip(a) != strip(b))
                .then(|| describe(&Value::Stream(strip(a)), &Value::Stream(strip(b))))
        }
        (a, b) => (a != b).then(|| describe(a, b)),
    }
}

/// True when the expected stream lacks fields the actual one has (older format on the left).
fn stream_fields_unknown(a: &Stream, b: &Stream) -> bool {
    (a.entries_added.is_none() && b.entries_added.is_some())
        || (a.max_deleted_id.is_none() && b.max_deleted_id.is_some())
        || a.groups
            .iter()
            .zip(&b.groups)
            .any(|(x, y)| x.entries_read.is_none() && y.entries_read.is_some())
}

/// The first field in which two streams differ.
fn stream_difference(a: &Stream, b: &Stream) -> Option<String> {
    macro_rules! field {
        ($($f:ident),*) => {$(
            if a.$f != b.$f {
                return Some(format!("stream {} {:?} != {:?}", stringify!($f), a.$f, b.$f));
            }
        )*};
    }
    field!(length, last_id, entries_added, max_deleted_id, entries);
    if a.groups.len() != b.groups.len() {
        return Some(format!(
            "stream groups {} != {}",
            a.groups.len(),
            b.groups.len()
        ));
    }
    for (x, y) in a.groups.iter().zip(&b.groups) {
        let name = String::from_utf8_lossy(&x.name);
        macro_rules! group_field {
            ($($f:ident),*) => {$(
                if x.$f != y.$f {
                    return Some(format!("stream group {name} {}: {:?} != {:?}", stringify!($f), x.$f, y.$f));
                }
            )*};
        }
        group_field!(last_delivered_id, entries_read, pel, consumers);
    }
    None
}

fn describe(a: &Value, b: &Value) -> String {
    let mut s = match (a, b) {
        (Value::Stream(x), Value::Stream(y)) => {
            stream_difference(x, y).unwrap_or_else(|| format!("{a:?} != {b:?}"))
        }
        _ => format!("{a:?} != {b:?}"),
    };
    if s.len() > 300 {
        let cut = s.char_indices().nth(300).map_or(s.len(), |c| c.0);
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

/// The corpus digest of a value (README: `value_digest`).
pub fn digest(v: &Value) -> (String, u64) {
    let mut h = Sha256::new();
    let lp = |h: &mut Sha256, b: &[u8]| {
        h.update((b.len() as u64).to_le_bytes());
        h.update(b);
    };
    let len = match v {
        Value::String(s) => {
            h.update(s);
            s.len()
        }
        Value::List(l) => {
            l.iter().for_each(|e| lp(&mut h, e));
            l.len()
        }
        Value::Set(s) => {
            s.iter().for_each(|e| lp(&mut h, e));
            s.len()
        }
        Value::Hash(m) => {
            m.iter().for_each(|(f, (v, _))| {
                lp(&mut h, f);
                lp(&mut h, v)
            });
            m.len()
        }
        Value::ZSet(z) => {
            z.iter().for_each(|(m, s)| {
                lp(&mut h, m);
                h.update(s.to_le_bytes())
            });
            z.len()
        }
        Value::Stream(s) => s.entries.len(),
        Value::Digest { sha256, len } => return (sha256.clone(), *len),
    };
    (
        h.finalize().iter().map(|b| format!("{b:02x}")).collect(),
        len as u64,
    )
}
