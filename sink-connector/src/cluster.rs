//! Redis Cluster targets: where each write goes, and the slot map.
//!
//! A lane's records are grouped by slot; each group is one `MULTI/EXEC` on the master that owns
//! the slot, together with the lane's checkpoint for that slot, in a key whose hash tag maps to
//! it ([`slot_tag`]). Keyless commands (flushes, functions, scripts) go to every master.

use crate::convert::Args;
use bytes::Bytes;
use std::sync::OnceLock;

/// Where one command must run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// Every key is in this slot.
    Slot(u16),
    /// About no key, with an effect on every node (`FLUSHALL`, `FUNCTION …`, `SCRIPT …`).
    AllMasters,
    /// About no key, once anywhere (`PUBLISH` reaches the whole cluster from any node).
    Anywhere,
    /// Keys in several slots: no single node can run it.
    CrossSlot,
}

pub fn routing(args: &[Bytes]) -> Routing {
    match wire::commands::slots(args) {
        Some(slots) if slots.len() == 1 => Routing::Slot(slots[0].get()),
        Some(slots) if !slots.is_empty() => Routing::CrossSlot,
        _ => {
            let name = args
                .first()
                .map(|n| n.to_ascii_lowercase())
                .unwrap_or_default();
            match name.as_slice() {
                // Reads the sink makes itself (checkpoints, barrier markers, conflict checks).
                b"hgetall" | b"hget" | b"hmget" | b"get" | b"exists" | b"type" | b"dump"
                | b"pttl"
                    if args.len() >= 2 =>
                {
                    Routing::Slot(proto::key_slot(&args[1]).get())
                }
                b"flushall" | b"flushdb" | b"function" | b"script" | b"swapdb" => {
                    Routing::AllMasters
                }
                _ => Routing::Anywhere,
            }
        }
    }
}

/// The single slot all `ops` are in, when they are.
pub fn single_slot<'a>(ops: impl IntoIterator<Item = &'a Args>) -> Option<u16> {
    let mut slot = None;
    for args in ops {
        match routing(args) {
            Routing::Slot(s) if slot.is_none_or(|x| x == s) => slot = Some(s),
            _ => return None,
        }
    }
    slot
}

/// A short string whose CRC16 puts a `{tag}` key in `slot`.
pub fn slot_tag(slot: u16) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags = vec![String::new(); 16384];
        let mut missing = 16384;
        let mut i = 0u64;
        while missing > 0 {
            let t = i.to_string();
            let s = proto::key_slot(t.as_bytes()).get() as usize;
            if tags[s].is_empty() {
                tags[s] = t;
                missing -= 1;
            }
            i += 1;
        }
        tags
    });
    &tags[usize::from(slot) % 16384]
}

/// Owner of every slot, from a `CLUSTER SLOTS` reply: `(first, last, host, port)` ranges.
pub fn parse_slots(reply: &redis::Value, default_host: &str) -> Vec<(u16, u16, String, u16)> {
    let mut out = Vec::new();
    let redis::Value::Array(ranges) = reply else {
        return out;
    };
    for r in ranges {
        let redis::Value::Array(items) = r else {
            continue;
        };
        let (
            Some(redis::Value::Int(lo)),
            Some(redis::Value::Int(hi)),
            Some(redis::Value::Array(m)),
        ) = (items.first(), items.get(1), items.get(2))
        else {
            continue;
        };
        let host = match m.first() {
            Some(redis::Value::BulkString(h)) if !h.is_empty() => {
                String::from_utf8_lossy(h).into_owned()
            }
            _ => default_host.to_owned(),
        };
        let Some(redis::Value::Int(port)) = m.get(1) else {
            continue;
        };
        out.push((*lo as u16, *hi as u16, host, *port as u16));
    }
    out
}

pub fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Args {
        words.iter().map(|w| b(w)).collect()
    }

    #[test]
    fn every_slot_has_a_tag_that_hashes_to_it() {
        for slot in [0u16, 1, 5460, 5461, 12182, 16383] {
            let key = format!("redis-repl:checkpoint:t:3:{{{}}}", slot_tag(slot));
            assert_eq!(proto::key_slot(key.as_bytes()).get(), slot);
        }
    }

    #[test]
    fn commands_are_routed_by_their_keys() {
        let slot = proto::key_slot(b"k").get();
        assert_eq!(routing(&args(&["SET", "k", "v"])), Routing::Slot(slot));
        assert_eq!(routing(&args(&["FLUSHALL"])), Routing::AllMasters);
        assert_eq!(routing(&args(&["HGETALL", "k"])), Routing::Slot(slot));
        assert_eq!(routing(&args(&["PUBLISH", "ch", "m"])), Routing::Anywhere);
        assert_eq!(
            routing(&args(&["FUNCTION", "LOAD", "code"])),
            Routing::AllMasters
        );
        assert_eq!(routing(&args(&["RENAME", "a", "b"])), Routing::CrossSlot);
        assert_eq!(
            routing(&args(&["RENAME", "{a}1", "{a}2"])),
            Routing::Slot(proto::key_slot(b"a").get())
        );
        let group = [args(&["SET", "k", "1"]), args(&["INCR", "k"])];
        assert_eq!(single_slot(group.iter()), Some(slot));
        let mixed = [args(&["SET", "k", "1"]), args(&["SET", "other", "1"])];
        assert_eq!(single_slot(mixed.iter()), None);
    }
}
