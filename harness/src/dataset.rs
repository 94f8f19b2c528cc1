//! Datasets in canonical form, read from live Redis deployments or from corpus JSON, and an exact
//! comparison with a readable report of the differences.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use redis::Value as RV;
use serde_json::Value as JV;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

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

// ---------------------------------------------------------------------------------------------
// From corpus JSON

/// A byte string in corpus JSON: text, or `{"b64": ...}`.
pub fn json_bytes(v: &JV) -> anyhow::Result<Vec<u8>> {
    match v {
        JV::String(s) => Ok(s.as_bytes().to_vec()),
        JV::Object(o) => Ok(B64.decode(
            o.get("b64")
                .and_then(JV::as_str)
                .ok_or_else(|| anyhow::anyhow!("bad bytes {v}"))?,
        )?),
        _ => anyhow::bail!("expected bytes, got {v}"),
    }
}

fn json_u64(v: &JV) -> Option<u64> {
    v.as_u64()
}

fn json_id(v: &JV) -> String {
    v.as_str().unwrap_or_default().to_owned()
}

impl Dataset {
    /// Reads the `keys` array of a corpus JSON (`rdb/*.json`, or a capture's `initial_dataset`
    /// / `final_dataset`).
    pub fn from_corpus_keys(keys: &JV) -> anyhow::Result<Dataset> {
        let mut ds = Dataset::default();
        for k in keys
            .as_array()
            .ok_or_else(|| anyhow::anyhow!("keys is not an array"))?
        {
            let db = k["db"].as_u64().unwrap_or(0) as u32;
            let key = json_bytes(&k["key"])?;
            let kind = k["type"].as_str().unwrap_or_default().to_owned();
            let value = if let Some(d) = k.get("value_digest").filter(|d| !d.is_null()) {
                Value::Digest {
                    sha256: d["sha256"].as_str().unwrap_or_default().to_owned(),
                    len: d["len"].as_u64().unwrap_or(0),
                }
            } else {
                json_value(&kind, &k["value"])?
            };
            ds.keys.insert(
                (db, key),
                Entry {
                    kind,
                    ttl_ms: k["ttl"].as_i64(),
                    ttl_approx: k["ttl_approx"].as_bool().unwrap_or(false),
                    expired: k["expired"].as_bool().unwrap_or(false),
                    value,
                },
            );
        }
        Ok(ds)
    }
}

fn json_list(v: &JV) -> anyhow::Result<Vec<Vec<u8>>> {
    v.as_array().into_iter().flatten().map(json_bytes).collect()
}

fn json_value(kind: &str, v: &JV) -> anyhow::Result<Value> {
    Ok(match kind {
        "string" => Value::String(B64.decode(v.as_str().unwrap_or_default())?),
        "list" => Value::List(json_list(v)?),
        "set" => Value::Set(json_list(v)?.into_iter().collect()),
        "zset" => Value::ZSet(
            v.as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    Ok((
                        json_bytes(&p[0])?,
                        p[1].as_str().unwrap_or_default().parse::<f64>()?,
                    ))
                })
                .collect::<anyhow::Result<_>>()?,
        ),
        "hash" => Value::Hash(
            v.as_array()
                .into_iter()
                .flatten()
                .map(|p| Ok((json_bytes(&p[0])?, (json_bytes(&p[1])?, p[2].as_i64()))))
                .collect::<anyhow::Result<_>>()?,
        ),
        "stream" => Value::Stream(Stream {
            length: v["length"].as_u64().unwrap_or(0),
            last_id: json_id(&v["last_id"]),
            entries_added: json_u64(&v["entries_added"]),
            max_deleted_id: v["max_deleted_entry_id"].as_str().map(str::to_owned),
            entries: v["entries"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|e| {
                    let fields = e[1]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|fv| Ok((json_bytes(&fv[0])?, json_bytes(&fv[1])?)))
                        .collect::<anyhow::Result<_>>()?;
                    Ok((json_id(&e[0]), fields))
                })
                .collect::<anyhow::Result<_>>()?,
            groups: v["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|g| {
                    Ok(Group {
                        name: json_bytes(&g["name"])?,
                        last_delivered_id: json_id(&g["last_delivered_id"]),
                        entries_read: json_u64(&g["entries_read"]),
                        pel: g["pel"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|p| {
                                Ok((
                                    json_id(&p[0]),
                                    json_bytes(&p[1])?,
                                    p[3].as_u64().unwrap_or(0),
                                ))
                            })
                            .collect::<anyhow::Result<_>>()?,
                        consumers: g["consumers"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|c| {
                                let ids = c["pel"]
                                    .as_array()
                                    .into_iter()
                                    .flatten()
                                    .map(json_id)
                                    .collect();
                                Ok((json_bytes(&c["name"])?, ids))
                            })
                            .collect::<anyhow::Result<_>>()?,
                    })
                })
                .collect::<anyhow::Result<_>>()?,
        }),
        other => anyhow::bail!("unknown type {other}"),
    })
}

// ---------------------------------------------------------------------------------------------
// From live servers

fn rv_bytes(v: &RV) -> Vec<u8> {
    match v {
        RV::BulkString(b) => b.clone(),
        RV::SimpleString(s) => s.as_bytes().to_vec(),
        RV::Int(i) => i.to_string().into_bytes(),
        RV::Double(d) => d.to_string().into_bytes(),
        RV::VerbatimString { text, .. } => text.as_bytes().to_vec(),
        _ => Vec::new(),
    }
}

fn rv_string(v: &RV) -> String {
    String::from_utf8_lossy(&rv_bytes(v)).into_owned()
}

fn rv_array(v: &RV) -> &[RV] {
    match v {
        RV::Array(a) | RV::Set(a) => a,
        _ => &[],
    }
}

/// A RESP2 flat `[k, v, k, v]` array or a RESP3 map, as (key text, value) pairs.
fn rv_map(v: &RV) -> Vec<(String, &RV)> {
    match v {
        RV::Map(m) => m.iter().map(|(k, v)| (rv_string(k), v)).collect(),
        _ => rv_array(v)
            .chunks(2)
            .filter(|c| c.len() == 2)
            .map(|c| (rv_string(&c[0]), &c[1]))
            .collect(),
    }
}

fn rv_opt_u64(v: Option<&&RV>) -> Option<u64> {
    match v? {
        RV::Int(i) if *i >= 0 => Some(*i as u64),
        RV::Nil => None,
        other => rv_string(other).parse().ok(),
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Reads every key of the given connections (one per master; all dbs that hold keys).
pub fn read(conns: &mut [redis::Connection]) -> redis::RedisResult<Dataset> {
    let mut ds = Dataset::default();
    for c in conns.iter_mut() {
        read_one(c, &mut ds)?;
    }
    Ok(ds)
}

fn read_one(c: &mut redis::Connection, ds: &mut Dataset) -> redis::RedisResult<()> {
    let info: String = redis::cmd("INFO").arg("keyspace").query(c)?;
    let dbs: Vec<u32> = info
        .lines()
        .filter_map(|l| l.strip_prefix("db")?.split(':').next()?.parse().ok())
        .collect();
    let hash_ttls = redis::cmd("COMMAND")
        .arg("INFO")
        .arg("HPEXPIRETIME")
        .query::<RV>(c)
        .map(|v| rv_array(&v).first().is_some_and(|x| !matches!(x, RV::Nil)))
        .unwrap_or(false);
    for db in dbs {
        // Servers without SELECT (cluster nodes accept only 0, proxies none) hold db 0 only.
        let selected = redis::cmd("SELECT").arg(db).query::<()>(c);
        if db != 0 {
            selected?;
        }
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("COUNT")
                .arg(1000)
                .query(c)?;
            for key in keys {
                if let Some(e) = read_key(c, &key, hash_ttls)? {
                    ds.keys.insert((db, key), e);
                }
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(())
}

/// One key's entry; `None` when it does not exist (any more: a key deleted between `SCAN` and
/// its reads, such as the sink's temporary keys, is not an error).
fn read_key(
    c: &mut redis::Connection,
    key: &[u8],
    hash_ttls: bool,
) -> redis::RedisResult<Option<Entry>> {
    match read_existing_key(c, key, hash_ttls) {
        Err(e) if e.to_string().contains("no such key") => Ok(None),
        r => r,
    }
}

fn read_existing_key(
    c: &mut redis::Connection,
    key: &[u8],
    hash_ttls: bool,
) -> redis::RedisResult<Option<Entry>> {
    let kind: String = redis::cmd("TYPE").arg(key).query(c)?;
    let value = match kind.as_str() {
        "none" => return Ok(None),
        "string" => Value::String(redis::cmd("GET").arg(key).query(c)?),
        "list" => Value::List(redis::cmd("LRANGE").arg(key).arg(0).arg(-1).query(c)?),
        "set" => Value::Set(
            redis::cmd("SMEMBERS")
                .arg(key)
                .query::<Vec<Vec<u8>>>(c)?
                .into_iter()
                .collect(),
        ),
        "zset" => {
            let flat: Vec<Vec<u8>> = redis::cmd("ZRANGE")
                .arg(key)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query(c)?;
            Value::ZSet(
                flat.chunks(2)
                    .map(|p| {
                        (
                            p[0].clone(),
                            String::from_utf8_lossy(&p[1])
                                .parse::<f64>()
                                .unwrap_or(f64::NAN),
                        )
                    })
                    .collect(),
            )
        }
        "hash" => {
            let flat: Vec<Vec<u8>> = redis::cmd("HGETALL").arg(key).query(c)?;
            let mut m: BTreeMap<Vec<u8>, (Vec<u8>, Option<i64>)> = flat
                .chunks(2)
                .map(|p| (p[0].clone(), (p[1].clone(), None)))
                .collect();
            if hash_ttls && !m.is_empty() {
                let fields: Vec<Vec<u8>> = m.keys().cloned().collect();
                let ttls: Vec<i64> = redis::cmd("HPEXPIRETIME")
                    .arg(key)
                    .arg("FIELDS")
                    .arg(fields.len())
                    .arg(&fields)
                    .query(c)?;
                for (f, t) in fields.iter().zip(ttls) {
                    if t > 0 {
                        m.get_mut(f).expect("field read above").1 = Some(t);
                    }
                }
            }
            Value::Hash(m)
        }
        "stream" => Value::Stream(read_stream(c, key)?),
        other => {
            return Err(redis::RedisError::from((
                redis::ErrorKind::TypeError,
                "unsupported type",
                other.to_owned(),
            )))
        }
    };
    let ttl_ms = match redis::cmd("PEXPIRETIME").arg(key).query::<i64>(c) {
        Ok(t) => (t > 0).then_some(t),
        Err(_) => {
            let pttl: i64 = redis::cmd("PTTL").arg(key).query(c)?;
            (pttl > 0).then(|| now_ms() + pttl)
        }
    };
    Ok(Some(Entry {
        kind,
        ttl_ms,
        ttl_approx: false,
        expired: false,
        value,
    }))
}

fn read_stream(c: &mut redis::Connection, key: &[u8]) -> redis::RedisResult<Stream> {
    let info: RV = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(key)
        .arg("FULL")
        .arg("COUNT")
        .arg(0)
        .query(c)?;
    let m = rv_map(&info);
    let get = |name: &str| m.iter().find(|(k, _)| k == name).map(|(_, v)| v);
    let entries = get("entries")
        .map(|e| {
            rv_array(e)
                .iter()
                .map(|entry| {
                    let parts = rv_array(entry);
                    let id = parts.first().map(rv_string).unwrap_or_default();
                    let fields = parts
                        .get(1)
                        .map(|f| {
                            rv_array(f)
                                .chunks(2)
                                .map(|p| (rv_bytes(&p[0]), rv_bytes(&p[1])))
                                .collect()
                        })
                        .unwrap_or_default();
                    (id, fields)
                })
                .collect()
        })
        .unwrap_or_default();
    let mut groups: Vec<Group> = get("groups")
        .map(|gs| {
            rv_array(gs)
                .iter()
                .map(|g| {
                    let gm = rv_map(g);
                    let gget = |name: &str| gm.iter().find(|(k, _)| k == name).map(|(_, v)| v);
                    let pel = gget("pending")
                        .map(|p| {
                            rv_array(p)
                                .iter()
                                .map(|e| {
                                    let e = rv_array(e);
                                    (
                                        rv_string(&e[0]),
                                        rv_bytes(&e[1]),
                                        rv_string(&e[3]).parse().unwrap_or(0),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    let consumers = gget("consumers")
                        .map(|cs| {
                            rv_array(cs)
                                .iter()
                                .map(|cons| {
                                    let cm = rv_map(cons);
                                    let name = cm
                                        .iter()
                                        .find(|(k, _)| k == "name")
                                        .map(|(_, v)| rv_bytes(v))
                                        .unwrap_or_default();
                                    let ids = cm
                                        .iter()
                                        .find(|(k, _)| k == "pending")
                                        .map(|(_, p)| {
                                            rv_array(p)
                                                .iter()
                                                .map(|e| rv_string(&rv_array(e)[0]))
                                                .collect()
                                        })
                                        .unwrap_or_default();
                                    (name, ids)
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    Group {
                        name: gget("name").map(|v| rv_bytes(v)).unwrap_or_default(),
                        last_delivered_id: gget("last-delivered-id")
                            .map(|v| rv_string(v))
                            .unwrap_or_default(),
                        entries_read: rv_opt_u64(gget("entries-read")),
                        pel,
                        consumers,
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    groups.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Stream {
        length: rv_opt_u64(get("length")).unwrap_or(0),
        last_id: get("last-generated-id")
            .map(|v| rv_string(v))
            .unwrap_or_default(),
        entries_added: rv_opt_u64(get("entries-added")),
        max_deleted_id: get("max-deleted-entry-id").map(|v| rv_string(v)),
        entries,
        groups,
    })
}
