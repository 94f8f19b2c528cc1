//! What a record means for the target: the commands that apply it.
//!
//! Snapshot keys are restored from their DUMP payload when the target reads that RDB version;
//! otherwise (and for chunked values) they are rebuilt with type commands in bounded batches:
//! the first piece replaces the key, later pieces append, the TTL comes with the last piece.

use crate::config::{Config, Conflict};
use bytes::Bytes;
use proto::v1::{self, value::Kind};
use wire::rdb;

pub type Args = Vec<Bytes>;

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn num<T: std::fmt::Display>(n: T) -> Bytes {
    Bytes::from(n.to_string())
}

/// Formats a score the way Redis reads it back exactly.
fn score(f: f64) -> Bytes {
    if f == f64::INFINITY {
        b("+inf")
    } else if f == f64::NEG_INFINITY {
        b("-inf")
    } else {
        num(f)
    }
}

fn id(i: Option<&v1::StreamId>) -> Bytes {
    let i = i.cloned().unwrap_or_default();
    Bytes::from(format!("{}-{}", i.ms, i.seq))
}

fn id_key(i: Option<&v1::StreamId>) -> (u64, u64) {
    i.map_or((0, 0), |i| (i.ms, i.seq))
}

/// The ids that pending entries of `s`'s groups refer to but that are no longer in the stream
/// (deleted by `XDEL` or trimmed since they were delivered), sorted. Redis keeps such pending
/// entries, but `XCLAIM` ignores ids that are not in the stream, so they are added as placeholder
/// entries in id order, claimed, and deleted again (`XSETID` restores the counters). In a later
/// piece of a chunked stream an id below the piece's first entry can no longer be added (`XADD`
/// only appends): if that message was deleted, its pending entry is lost, and a warning says so.
fn deleted_pending(key: &Bytes, s: &v1::StreamValue, first: bool) -> Vec<(u64, u64)> {
    let present: std::collections::HashSet<(u64, u64)> =
        s.entries.iter().map(|e| id_key(e.id.as_ref())).collect();
    let mut ids: Vec<(u64, u64)> = s
        .groups
        .iter()
        .flat_map(|g| g.pending.iter().map(|p| id_key(p.id.as_ref())))
        .filter(|i| !present.contains(i))
        .collect();
    ids.sort_unstable();
    ids.dedup();
    let floor = (!first).then(|| s.entries.first().map(|e| id_key(e.id.as_ref())));
    let (placeable, lost): (Vec<_>, Vec<_>) = ids
        .into_iter()
        .partition(|i| floor.is_none_or(|f| f.is_some_and(|f| *i > f)));
    if !lost.is_empty() {
        tracing::warn!(
            "stream {}: {} pending entries refer to messages before this piece of the value ({:?}…); those of them that were deleted cannot be recreated with commands",
            String::from_utf8_lossy(key),
            lost.len(),
            lost[0]
        );
    }
    placeable
}

fn placeholder(key: &Bytes, (ms, seq): (u64, u64)) -> Args {
    vec![
        b("XADD"),
        key.clone(),
        Bytes::from(format!("{ms}-{seq}")),
        b("redis-repl"),
        b("deleted"),
    ]
}

/// Rebuilds (part of) a value with type commands.
pub fn rebuild(
    key: &Bytes,
    value: Option<&v1::Value>,
    first: bool,
    expire_at_ms: Option<i64>,
    last: bool,
    elements: usize,
) -> Vec<Args> {
    let mut out: Vec<Args> = Vec::new();
    let kind = value.and_then(|v| v.kind.as_ref());
    // A first string piece is a SET, which replaces whatever the key held: no DEL before it
    // (two million strings of a snapshot were four million commands on the target).
    if first && !matches!(kind, Some(Kind::String(_))) {
        out.push(vec![b("DEL"), key.clone()]);
    }
    let per = elements.max(1);
    match kind {
        None => {}
        Some(Kind::String(s)) => {
            let cmd = if first { "SET" } else { "APPEND" };
            out.push(vec![b(cmd), key.clone(), s.clone()]);
        }
        Some(Kind::List(l)) => {
            for c in l.elements.chunks(per) {
                let mut a = vec![b("RPUSH"), key.clone()];
                a.extend(c.iter().cloned());
                out.push(a);
            }
        }
        Some(Kind::Set(s)) => {
            for c in s.members.chunks(per) {
                let mut a = vec![b("SADD"), key.clone()];
                a.extend(c.iter().cloned());
                out.push(a);
            }
        }
        Some(Kind::Zset(z)) => {
            for c in z.members.chunks(per) {
                let mut a = vec![b("ZADD"), key.clone()];
                for m in c {
                    a.push(score(m.score));
                    a.push(m.member.clone());
                }
                out.push(a);
            }
        }
        Some(Kind::Hash(h)) => {
            for c in h.fields.chunks(per) {
                let mut a = vec![b("HSET"), key.clone()];
                for f in c {
                    a.push(f.field.clone());
                    a.push(f.value.clone());
                }
                out.push(a);
            }
            for f in &h.fields {
                if let Some(ms) = f.expire_at_ms {
                    out.push(vec![
                        b("HPEXPIREAT"),
                        key.clone(),
                        num(ms),
                        b("FIELDS"),
                        b("1"),
                        f.field.clone(),
                    ]);
                }
            }
        }
        Some(Kind::Stream(s)) => {
            let placeholders = deleted_pending(key, s, first);
            let mut pending_placeholders = placeholders.iter().peekable();
            for e in &s.entries {
                let at = id_key(e.id.as_ref());
                while let Some(p) = pending_placeholders.next_if(|p| **p < at) {
                    out.push(placeholder(key, *p));
                }
                let mut a = vec![b("XADD"), key.clone(), id(e.id.as_ref())];
                a.extend(e.fields.iter().cloned());
                out.push(a);
            }
            for p in pending_placeholders {
                out.push(placeholder(key, *p));
            }
            if s.last_id.is_some() && first && s.entries.is_empty() {
                // An empty stream: a group created with MKSTREAM, then dropped, leaves one
                // with no entries, no deleted ids and last id 0-0.
                out.push(vec![
                    b("XGROUP"),
                    b("CREATE"),
                    key.clone(),
                    b("redis-repl-tmp"),
                    b("$"),
                    b("MKSTREAM"),
                ]);
                out.push(vec![
                    b("XGROUP"),
                    b("DESTROY"),
                    key.clone(),
                    b("redis-repl-tmp"),
                ]);
            }
            let setid = s.last_id.as_ref().map(|last_id| {
                let mut a = vec![b("XSETID"), key.clone(), id(Some(last_id))];
                if let Some(n) = s.entries_added {
                    a.push(b("ENTRIESADDED"));
                    a.push(num(n));
                    a.push(b("MAXDELETEDID"));
                    a.push(id(s.max_deleted_id.as_ref()));
                }
                a
            });
            out.extend(setid.clone());
            for g in &s.groups {
                let mut a = vec![
                    b("XGROUP"),
                    b("CREATE"),
                    key.clone(),
                    g.name.clone(),
                    id(g.last_delivered_id.as_ref()),
                ];
                if let Some(n) = g.entries_read {
                    a.push(b("ENTRIESREAD"));
                    a.push(num(n));
                }
                out.push(a);
                for c in &g.consumers {
                    out.push(vec![
                        b("XGROUP"),
                        b("CREATECONSUMER"),
                        key.clone(),
                        g.name.clone(),
                        c.name.clone(),
                    ]);
                }
                for p in &g.pending {
                    out.push(vec![
                        b("XCLAIM"),
                        key.clone(),
                        g.name.clone(),
                        p.consumer.clone(),
                        b("0"),
                        id(p.id.as_ref()),
                        b("TIME"),
                        num(p.delivery_time_ms),
                        b("RETRYCOUNT"),
                        num(p.delivery_count),
                        b("FORCE"),
                        b("JUSTID"),
                    ]);
                }
            }
            if !placeholders.is_empty() {
                let mut a = vec![b("XDEL"), key.clone()];
                a.extend(
                    placeholders
                        .iter()
                        .map(|&(ms, seq)| Bytes::from(format!("{ms}-{seq}"))),
                );
                out.push(a);
                // The placeholders' deletion moved the counters: set them again.
                out.extend(setid);
            }
        }
        Some(Kind::Dump(_)) => {}
    }
    if last {
        if let Some(ms) = expire_at_ms {
            out.push(vec![b("PEXPIREAT"), key.clone(), num(ms)]);
        }
    }
    out
}

/// Turns a DUMP payload back into a typed value, for a target that cannot RESTORE its version.
pub fn undump(key: &Bytes, payload: &v1::DumpPayload) -> Result<Option<Kind>, String> {
    let p = &payload.payload;
    if p.len() < 11 {
        return Err("DUMP payload shorter than its footer".into());
    }
    let version = u16::from_le_bytes([p[p.len() - 10], p[p.len() - 9]]);
    let mut file = format!("REDIS{version:04}").into_bytes();
    file.push(p[0]);
    // The key as an RDB length-prefixed string.
    let len = key.len();
    if len < 64 {
        file.push(len as u8);
    } else if len < 16384 {
        file.push(0x40 | (len >> 8) as u8);
        file.push(len as u8);
    } else {
        file.push(0x80);
        file.extend_from_slice(&(len as u32).to_be_bytes());
    }
    file.extend_from_slice(key);
    file.extend_from_slice(&p[1..p.len() - 10]);
    file.push(0xFF);
    file.extend_from_slice(&[0u8; 8]);
    let mut decoder = rdb::Decoder::new(rdb::Config {
        dump_limit_bytes: 0,
        ..rdb::Config::default()
    });
    decoder.feed(&file);
    let mut value = None;
    while let Some(item) = decoder.next_item().map_err(|e| e.to_string())? {
        if let rdb::Item::Piece(piece) = item {
            wire::merge::merge(&mut value, piece);
        }
    }
    decoder.finish().map_err(|e| e.to_string())?;
    Ok(value)
}

/// The commands of a snapshot key entry.
pub fn key_entry(
    cfg: &Config,
    entry: &v1::KeyEntry,
    restore_max_version: u32,
) -> Result<Vec<Args>, String> {
    let key = &entry.key;
    if let Some(Kind::Dump(d)) = entry.value.as_ref().and_then(|v| v.kind.as_ref()) {
        if d.rdb_version <= restore_max_version {
            let mut a = vec![
                b("RESTORE"),
                key.clone(),
                num(entry.expire_at_ms.unwrap_or(0).max(0)),
                d.payload.clone(),
            ];
            if cfg.apply.snapshot_conflict == Conflict::Replace {
                a.push(b("REPLACE"));
            }
            if entry.expire_at_ms.is_some() {
                a.push(b("ABSTTL"));
            }
            if let Some(idle) = entry.lru_idle_s {
                a.push(b("IDLETIME"));
                a.push(num(idle));
            } else if let Some(freq) = entry.lfu_freq {
                a.push(b("FREQ"));
                a.push(num(freq));
            }
            return Ok(vec![a]);
        }
        if d.module_id != 0 {
            return Err(format!(
                "module value of key {} needs RDB version {}, the target reads up to {restore_max_version}",
                String::from_utf8_lossy(key),
                d.rdb_version
            ));
        }
        let kind = undump(key, d).map_err(|e| {
            format!(
                "cannot rebuild key {} from its DUMP payload: {e}",
                String::from_utf8_lossy(key)
            )
        })?;
        let value = v1::Value {
            kind: Some(kind.unwrap_or(Kind::String(Bytes::new()))),
        };
        return Ok(rebuild(
            key,
            Some(&value),
            true,
            entry.expire_at_ms,
            true,
            cfg.apply.rebuild_elements,
        ));
    }
    Ok(rebuild(
        key,
        entry.value.as_ref(),
        true,
        entry.expire_at_ms,
        !entry.chunked,
        cfg.apply.rebuild_elements,
    ))
}

/// The commands of a later chunk of a big value.
pub fn key_chunk(cfg: &Config, chunk: &v1::KeyChunk) -> Vec<Args> {
    rebuild(
        &chunk.key,
        chunk.value.as_ref(),
        false,
        chunk.expire_at_ms,
        chunk.last,
        cfg.apply.rebuild_elements,
    )
}

/// Captured commands, with the operator's renames applied and past expiries deferred.
pub fn commands(cfg: &Config, commands: impl IntoIterator<Item = v1::Command>) -> Vec<Args> {
    let now = service::now_ms();
    let grace = cfg.apply.expired_grace_ms as i64;
    commands
        .into_iter()
        .map(|c| {
            let mut args = defer_past_expiry(c.args, now, grace);
            if cfg.redis.rename_commands.is_empty() {
                return args;
            }
            if let Some(name) = args.first() {
                let upper = String::from_utf8_lossy(name).to_ascii_uppercase();
                if let Some(renamed) = cfg.redis.rename_commands.get(&upper) {
                    args[0] = Bytes::from(renamed.clone());
                }
            }
            args
        })
        .collect()
}

/// Redis (7.0+) propagates expiries as absolute times. Applied late (the sink lagging, or a
/// replay), a time already past would make the target delete the key at once, although the
/// source may still `PERSIST` or overwrite it a few commands later; a Redis replica never
/// expires keys itself for that reason, it waits for the master's `DEL`. The sink does the same
/// within a grace period: a past expiry becomes "now + grace", and the source's own `DEL` (which
/// Redis propagates when the key really expires) removes the key.
pub fn defer_past_expiry(mut args: Args, now_ms: i64, grace_ms: i64) -> Args {
    // Names are compared in place: this runs for every command applied.
    let Some(name) = args.first() else {
        return args;
    };
    let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
    let ms_expiry = is(b"pexpireat") || is(b"hpexpireat");
    let s_expiry = is(b"expireat") || is(b"hexpireat");
    let hash = is(b"hexpireat");
    // Where `SET`'s and `GETEX`'s options start.
    let set_options_from = if is(b"set") {
        Some(3)
    } else if is(b"getex") {
        Some(2)
    } else {
        None
    };
    let num = |a: &Bytes| -> Option<i64> { std::str::from_utf8(a).ok()?.parse().ok() };
    let deferred = || Bytes::from((now_ms + grace_ms).to_string());
    if ms_expiry && args.len() >= 3 && num(&args[2]).is_some_and(|t| t <= now_ms) {
        args[2] = deferred();
    } else if s_expiry
        && args.len() >= 3
        && num(&args[2]).is_some_and(|t| t.saturating_mul(1000) <= now_ms)
    {
        args[0] = Bytes::from_static(if hash { b"HPEXPIREAT" } else { b"PEXPIREAT" });
        args[2] = deferred();
    } else if let Some(start) = set_options_from {
        for i in start..args.len().saturating_sub(1) {
            let opt = &args[i];
            let past = if opt.eq_ignore_ascii_case(b"pxat") {
                num(&args[i + 1]).is_some_and(|t| t <= now_ms)
            } else if opt.eq_ignore_ascii_case(b"exat") {
                num(&args[i + 1]).is_some_and(|t| t.saturating_mul(1000) <= now_ms)
            } else {
                false
            };
            if past {
                args[i] = Bytes::from_static(b"PXAT");
                args[i + 1] = deferred();
            }
        }
    }
    args
}

/// A `RESTORE` from the command stream whose payload the target cannot read, rebuilt with type
/// commands (`None` when the target can take it as is).
pub fn restore_fallback(
    cfg: &Config,
    args: &Args,
    restore_max_version: u32,
) -> Option<Result<Vec<Args>, String>> {
    let name = args.first()?;
    if !(name.eq_ignore_ascii_case(b"restore") || name.eq_ignore_ascii_case(b"restore-asking"))
        || args.len() < 4
    {
        return None;
    }
    let p = &args[3];
    if p.len() < 11 {
        return None;
    }
    let version = u32::from(u16::from_le_bytes([p[p.len() - 10], p[p.len() - 9]]));
    if version <= restore_max_version {
        return None;
    }
    let key = args[1].clone();
    let ttl: i64 = std::str::from_utf8(&args[2]).ok()?.parse().ok()?;
    let absolute = args[4..].iter().any(|a| a.eq_ignore_ascii_case(b"absttl"));
    let expire_at = match (ttl, absolute) {
        (0, _) => None,
        (t, true) => Some(t),
        (t, false) => Some(service::now_ms() + t),
    };
    let payload = v1::DumpPayload {
        payload: p.clone(),
        rdb_version: version,
        module_id: 0,
    };
    Some(undump(&key, &payload).map(|kind| {
        let value = v1::Value {
            kind: Some(kind.unwrap_or(Kind::String(Bytes::new()))),
        };
        rebuild(
            &key,
            Some(&value),
            true,
            expire_at,
            true,
            cfg.apply.rebuild_elements,
        )
    }))
}

/// True for `FLUSHALL`/`FLUSHDB`.
pub fn is_flush(args: &Args) -> bool {
    args.first()
        .is_some_and(|n| n.eq_ignore_ascii_case(b"flushall") || n.eq_ignore_ascii_case(b"flushdb"))
}

/// For `SWAPDB a b` touching `db`, the db that `db`'s content moves to.
pub fn swapdb_other(args: &Args, db: u32) -> Option<u32> {
    if !args.first()?.eq_ignore_ascii_case(b"swapdb") {
        return None;
    }
    let n = |i: usize| -> Option<u32> { std::str::from_utf8(args.get(i)?).ok()?.parse().ok() };
    let (a, b) = (n(1)?, n(2)?);
    match (a == db, b == db) {
        (true, false) => Some(b),
        (false, true) => Some(a),
        _ => None,
    }
}

/// The RDB version a Redis (or Valkey) version writes, which is the newest it can RESTORE.
pub fn rdb_version_for(server: &str, version: &str) -> u32 {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let major = parts.next().unwrap_or(0);
    let minor = parts.next().unwrap_or(0);
    if server == "valkey" {
        return if major >= 9 { 12 } else { 11 };
    }
    match (major, minor) {
        (8.., _) | (7, 4..) => 12,
        (7, 2..) => 11,
        (7, _) => 10,
        (5..=6, _) => 9,
        (4, _) => 8,
        (3, 2..) => 7,
        _ => 6,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshot's string is one SET (which replaces whatever the key held), with its expiry
    /// after it; a collection's first piece clears the key first, as its commands add to it.
    #[test]
    fn a_first_string_piece_is_a_set_and_a_collection_starts_with_del() {
        let key = b("k");
        let string = v1::Value {
            kind: Some(Kind::String(b("v"))),
        };
        let cmds = rebuild(&key, Some(&string), true, Some(5_000), true, 100);
        let names: Vec<&[u8]> = cmds.iter().map(|c| &c[0][..]).collect();
        assert_eq!(names, [&b"SET"[..], b"PEXPIREAT"]);
        let list = v1::Value {
            kind: Some(Kind::List(v1::ListValue {
                elements: vec![b("a")],
            })),
        };
        let cmds = rebuild(&key, Some(&list), true, None, true, 100);
        let names: Vec<&[u8]> = cmds.iter().map(|c| &c[0][..]).collect();
        assert_eq!(names, [&b"DEL"[..], b"RPUSH"]);
        // A later piece of a chunked string appends.
        let cmds = rebuild(&key, Some(&string), false, None, true, 100);
        assert_eq!(cmds, vec![vec![b("APPEND"), key.clone(), b("v")]]);
    }

    /// A pending entry whose message was deleted: added as a placeholder in id order, claimed,
    /// deleted again, and the counters set again afterwards. In a later piece of a chunked
    /// stream, one below the piece's first entry cannot be added.
    #[test]
    fn pending_entries_of_deleted_messages_are_recreated() {
        let sid = |ms, seq| Some(v1::StreamId { ms, seq });
        let entry = |ms| v1::StreamEntry {
            id: sid(ms, 0),
            fields: vec![b("f"), b("v")],
        };
        let pending = |ms, seq| v1::StreamPendingEntry {
            id: sid(ms, seq),
            consumer: b("bob"),
            delivery_time_ms: 7,
            delivery_count: 1,
        };
        let stream = v1::StreamValue {
            entries: vec![entry(1), entry(3)],
            length: 2,
            last_id: sid(3, 0),
            entries_added: Some(4),
            max_deleted_id: sid(2, 5),
            groups: vec![v1::StreamGroup {
                name: b("g"),
                last_delivered_id: sid(3, 0),
                entries_read: Some(4),
                pending: vec![pending(1, 0), pending(2, 5)],
                consumers: vec![],
            }],
        };
        let value = v1::Value {
            kind: Some(Kind::Stream(stream.clone())),
        };
        let key = b("s");
        let cmds: Vec<String> = rebuild(&key, Some(&value), true, None, true, 100)
            .iter()
            .map(|a| {
                a.iter()
                    .map(|x| String::from_utf8_lossy(x).into_owned())
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
        let at = |prefix: &str| {
            cmds.iter()
                .position(|c| c.starts_with(prefix))
                .unwrap_or_else(|| panic!("no {prefix} in {cmds:#?}"))
        };
        assert!(at("XADD s 1-0") < at("XADD s 2-5 redis-repl deleted"));
        assert!(at("XADD s 2-5") < at("XADD s 3-0"));
        assert!(at("XCLAIM s g bob 0 2-5") < at("XDEL s 2-5"));
        let setids: Vec<usize> = (0..cmds.len())
            .filter(|&i| cmds[i].starts_with("XSETID s 3-0 ENTRIESADDED 4 MAXDELETEDID 2-5"))
            .collect();
        assert_eq!(setids.len(), 2, "{cmds:#?}");
        assert!(setids[1] > at("XDEL s 2-5"));

        // The last piece of a chunked stream holding only 3-0: 2-5 cannot be appended.
        let mut last_piece = stream;
        last_piece.entries.remove(0);
        let value = v1::Value {
            kind: Some(Kind::Stream(last_piece)),
        };
        let later = rebuild(&key, Some(&value), false, None, true, 100);
        assert!(!later
            .iter()
            .any(|a| a[0] == "XDEL" || a.ends_with(&[b("deleted")])));
    }

    #[test]
    fn past_expiries_are_deferred() {
        let a = |w: &[&str]| -> Args { w.iter().map(|x| b(x)).collect() };
        let now = 1_000_000;
        assert_eq!(
            defer_past_expiry(a(&["PEXPIREAT", "k", "999999"]), now, 10),
            a(&["PEXPIREAT", "k", "1000010"])
        );
        assert_eq!(
            defer_past_expiry(a(&["PEXPIREAT", "k", "2000000", "NX"]), now, 10),
            a(&["PEXPIREAT", "k", "2000000", "NX"])
        );
        assert_eq!(
            defer_past_expiry(a(&["EXPIREAT", "k", "999"]), now, 10),
            a(&["PEXPIREAT", "k", "1000010"])
        );
        assert_eq!(
            defer_past_expiry(a(&["SET", "k", "v", "PXAT", "5", "KEEPTTL"]), now, 10),
            a(&["SET", "k", "v", "PXAT", "1000010", "KEEPTTL"])
        );
        assert_eq!(
            defer_past_expiry(a(&["SET", "k", "v", "EXAT", "5000"]), now, 10),
            a(&["SET", "k", "v", "EXAT", "5000"])
        );
        assert_eq!(
            defer_past_expiry(a(&["INCR", "k"]), now, 10),
            a(&["INCR", "k"])
        );
    }

    #[test]
    fn versions() {
        assert_eq!(rdb_version_for("redis", "7.0.15"), 10);
        assert_eq!(rdb_version_for("redis", "7.2.6"), 11);
        assert_eq!(rdb_version_for("redis", "7.4.1"), 12);
        assert_eq!(rdb_version_for("redis", "8.0.0"), 12);
        assert_eq!(rdb_version_for("redis", "6.2.16"), 9);
        assert_eq!(rdb_version_for("valkey", "8.0.1"), 11);
    }

    #[test]
    fn scores_round_trip() {
        for f in [0.1, 1.0 / 3.0, -2.5e300, 1e-300, f64::INFINITY] {
            let s = score(f);
            let back: f64 = String::from_utf8_lossy(&s)
                .replace("+inf", "inf")
                .parse()
                .unwrap();
            assert_eq!(back, f);
        }
    }
}
