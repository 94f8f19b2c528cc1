//! Datasets read from live Redis servers (every db that holds keys, every type).

use super::*;
use redis::Value as RV;

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
