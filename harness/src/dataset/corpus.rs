//! Datasets from the corpus JSON (`rdb/*.json`, captures' initial and final datasets).

use super::*;
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use serde_json::Value as JV;

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
