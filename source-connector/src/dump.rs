//! `rdb-dump`: the logical content of an RDB file as JSON, in the corpus format
//! (`rdb/<label>/<profile>.json`): `rdb_version`, `functions` and `keys` sorted by (db, key).

use crate::rdb::assemble::{Contents, Key, Value};
use crate::rdb::{StreamId, MAX_RDB_VERSION};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::{json, Map, Value as J};
use sha2::{Digest, Sha256};

/// Strings longer than this are given as a digest (corpus rule).
pub const DIGEST_STRING_BYTES: usize = 256 * 1024;
/// Collections with more elements than this are given as a digest (corpus rule).
pub const DIGEST_ELEMENTS: usize = 50_000;

/// Text when the bytes are UTF-8, else `{"b64": ...}`.
pub fn bytes_json(b: &[u8]) -> J {
    match std::str::from_utf8(b) {
        Ok(s) => J::String(s.to_owned()),
        Err(_) => json!({ "b64": B64.encode(b) }),
    }
}

/// Shortest text that reads back as the same double; `inf`, `-inf`.
pub fn score_text(s: f64) -> String {
    if s == f64::INFINITY {
        "inf".into()
    } else if s == f64::NEG_INFINITY {
        "-inf".into()
    } else {
        format!("{s:?}")
    }
}

fn id(i: StreamId) -> J {
    J::String(i.to_string())
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn digest_elems<'a>(it: impl Iterator<Item = &'a [u8]>, h: &mut Sha256) {
    for e in it {
        h.update((e.len() as u64).to_le_bytes());
        h.update(e);
    }
}

/// The corpus `value` (or `value_digest`) of a key.
fn value_json(v: &Value) -> (J, Option<J>) {
    match v {
        Value::String(s) if s.len() > DIGEST_STRING_BYTES => {
            let d = json!({
                "sha256": hex(&Sha256::digest(s)),
                "len": s.len(),
                "head_b64": B64.encode(&s[..64.min(s.len())]),
                "tail_b64": B64.encode(&s[s.len().saturating_sub(64)..]),
            });
            (J::Null, Some(d))
        }
        Value::String(s) => (J::String(B64.encode(s)), None),
        Value::List(l) if l.len() > DIGEST_ELEMENTS => {
            let mut h = Sha256::new();
            digest_elems(l.iter().map(|b| &b[..]), &mut h);
            (
                J::Null,
                Some(json!({"sha256": hex(&h.finalize()), "len": l.len()})),
            )
        }
        Value::List(l) => (J::Array(l.iter().map(|e| bytes_json(e)).collect()), None),
        Value::Set(s) => {
            let mut s: Vec<&[u8]> = s.iter().map(|b| &b[..]).collect();
            s.sort();
            if s.len() > DIGEST_ELEMENTS {
                let mut h = Sha256::new();
                digest_elems(s.iter().copied(), &mut h);
                return (
                    J::Null,
                    Some(json!({"sha256": hex(&h.finalize()), "len": s.len()})),
                );
            }
            (J::Array(s.into_iter().map(bytes_json).collect()), None)
        }
        Value::ZSet(z) => {
            let mut z: Vec<&(bytes::Bytes, f64)> = z.iter().collect();
            z.sort_by(|a, b| a.0.cmp(&b.0));
            if z.len() > DIGEST_ELEMENTS {
                let mut h = Sha256::new();
                for (m, s) in &z {
                    h.update((m.len() as u64).to_le_bytes());
                    h.update(m);
                    h.update(s.to_le_bytes());
                }
                return (
                    J::Null,
                    Some(json!({"sha256": hex(&h.finalize()), "len": z.len()})),
                );
            }
            (
                J::Array(
                    z.into_iter()
                        .map(|(m, s)| json!([bytes_json(m), score_text(*s)]))
                        .collect(),
                ),
                None,
            )
        }
        Value::Hash(fields) => {
            let mut f: Vec<&(bytes::Bytes, bytes::Bytes, Option<i64>)> = fields.iter().collect();
            f.sort_by(|a, b| a.0.cmp(&b.0));
            if f.len() > DIGEST_ELEMENTS {
                let mut h = Sha256::new();
                for (k, v, _) in &f {
                    digest_elems([&k[..], &v[..]].into_iter(), &mut h);
                }
                return (
                    J::Null,
                    Some(json!({"sha256": hex(&h.finalize()), "len": f.len()})),
                );
            }
            (
                J::Array(
                    f.into_iter()
                        .map(|(k, v, t)| json!([bytes_json(k), bytes_json(v), t]))
                        .collect(),
                ),
                None,
            )
        }
        Value::Stream {
            meta,
            entries,
            groups,
        } => {
            let mut groups: Vec<_> = groups.iter().collect();
            groups.sort_by(|a, b| a.name.cmp(&b.name));
            let groups: Vec<J> = groups
                .into_iter()
                .map(|g| {
                    let mut pel: Vec<_> = g.pending.iter().collect();
                    pel.sort_by_key(|p| p.0);
                    let mut consumers: Vec<_> = g.consumers.iter().collect();
                    consumers.sort_by(|a, b| a.name.cmp(&b.name));
                    json!({
                        "name": bytes_json(&g.name),
                        "last_delivered_id": id(g.last_delivered_id),
                        "entries_read": g.entries_read,
                        "pel": pel.into_iter().map(|(i, c, t, n)| json!([id(*i), bytes_json(c), t, n])).collect::<Vec<_>>(),
                        "consumers": consumers.into_iter().map(|c| json!({
                            "name": bytes_json(&c.name),
                            "seen_time": c.seen_time_ms,
                            "active_time": c.active_time_ms,
                            "pel": c.pending.iter().map(|i| id(*i)).collect::<Vec<_>>(),
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            let v = json!({
                "length": meta.length,
                "last_id": id(meta.last_id),
                "entries_added": meta.entries_added,
                "max_deleted_entry_id": meta.max_deleted_id.map(id),
                "entries": entries.iter().map(|e| json!([id(e.id), e.fields.iter().map(|(f, v)| json!([bytes_json(f), bytes_json(v)])).collect::<Vec<_>>()])).collect::<Vec<_>>(),
                "groups": groups,
            });
            (v, None)
        }
        Value::Module { module_id } => (json!({ "module_id": module_id }), None),
    }
}

/// One key record. `now_ms` decides `expired`: a key whose TTL (or one of whose field TTLs) is
/// before it.
pub fn key_json(k: &Key, now_ms: i64) -> J {
    let h = &k.header;
    let mut m = Map::new();
    m.insert("db".into(), json!(h.db));
    m.insert("key".into(), bytes_json(&h.key));
    m.insert("type".into(), json!(h.type_name()));
    m.insert("ttl".into(), json!(h.expire_ms));
    let (value, digest) = value_json(&k.value);
    m.insert("value".into(), value);
    if let Some(d) = digest {
        m.insert("value_digest".into(), d);
    }
    m.insert("rdb_type".into(), json!(h.rdb_type));
    let field_expired = matches!(&k.value, Value::Hash(f) if f.iter().any(|(_, _, t)| t.is_some_and(|t| t < now_ms)));
    if h.expire_ms.is_some_and(|t| t < now_ms) || field_expired {
        m.insert("expired".into(), J::Bool(true));
    }
    if let Some(f) = h.lfu_freq {
        m.insert("lfu_freq".into(), json!(f));
    }
    if let Some(i) = h.lru_idle_s {
        m.insert("lru_idle_s".into(), json!(i));
    }
    J::Object(m)
}

/// Library name, engine and functions (name and flags) read from a library's source. Function
/// declarations are recognised in the two forms `redis.register_function('name', ...)` and
/// `redis.register_function{function_name='name', ..., flags={...}}`.
pub fn function_json(code: &[u8]) -> J {
    let text = String::from_utf8_lossy(code);
    let first = text.lines().next().unwrap_or_default();
    let engine = first
        .strip_prefix("#!")
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_default();
    let library = first
        .split_whitespace()
        .find_map(|w| w.strip_prefix("name="))
        .unwrap_or_default();
    let mut functions = Vec::new();
    for (i, _) in text.match_indices("register_function") {
        let rest = text[i + "register_function".len()..].trim_start();
        let quoted = |s: &str| -> Option<String> {
            let s = s.trim_start();
            let q = s.chars().next().filter(|c| *c == '\'' || *c == '"')?;
            Some(s[1..].split(q).next()?.to_owned())
        };
        let (name, flags) = if let Some(table) = rest.strip_prefix('{') {
            let body = table.split('}').next().unwrap_or_default();
            let name = body
                .split("function_name")
                .nth(1)
                .and_then(|s| quoted(s.trim_start().strip_prefix('=')?));
            let flags = table
                .split("flags")
                .nth(1)
                .and_then(|s| {
                    s.trim_start()
                        .strip_prefix('=')?
                        .trim_start()
                        .strip_prefix('{')
                })
                .map(|s| {
                    s.split('}')
                        .next()
                        .unwrap_or_default()
                        .split(',')
                        .filter_map(quoted)
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            (name, flags)
        } else {
            (rest.strip_prefix('(').and_then(quoted), Vec::new())
        };
        if let Some(name) = name {
            functions.push(json!({"name": name, "flags": flags}));
        }
    }
    json!({
        "library": library,
        "engine": engine.to_ascii_uppercase(),
        "code": text,
        "functions": functions,
    })
}

/// The whole document.
pub fn contents_json(c: &Contents, now_ms: i64) -> J {
    let mut keys: Vec<&Key> = c.keys.iter().collect();
    keys.sort_by(|a, b| (a.header.db, &a.header.key).cmp(&(b.header.db, &b.header.key)));
    // Functions exist from RDB 10 (Redis 7.0) on; before that the field is null.
    let functions = if c.version >= 10 {
        let mut f: Vec<J> = c.functions.iter().map(|code| function_json(code)).collect();
        f.sort_by(|a, b| a["library"].as_str().cmp(&b["library"].as_str()));
        J::Array(f)
    } else {
        J::Null
    };
    debug_assert!(c.version <= MAX_RDB_VERSION);
    json!({
        "rdb_version": c.version,
        "functions": functions,
        "key_count": keys.len(),
        "keys": keys.into_iter().map(|k| key_json(k, now_ms)).collect::<Vec<_>>(),
    })
}
