//! Where a replicated write command goes on the topic: which keys it touches, and therefore
//! which slot (single-slot record), which per-slot pieces (decomposable multi-key commands), or
//! which barrier (multi-slot and keyless commands).
//!
//! Unknown commands are routed as broadcast barriers: that is always correct (applied after
//! everything before it on every partition, before everything after it), only slower.

use bytes::Bytes;
use proto::slot::{key_slot, Slot};

/// How a command is published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// All its keys are in this slot.
    Slot(Slot),
    /// A decomposable multi-key command (`DEL`, `UNLINK`, `TOUCH`, `MSET`) over several slots,
    /// split into one command per slot, in the order the slots first appear.
    Split(Vec<(Slot, Vec<Bytes>)>),
    /// Touches keys in several slots and cannot be split: a multi-slot barrier over these slots
    /// (ascending, unique).
    MultiSlot(Vec<Slot>),
    /// Concerns no single key (`FLUSHALL`, `SWAPDB`, `FUNCTION`, unknown commands): a barrier
    /// on every partition.
    Broadcast,
}

/// Where the keys of a command are.
enum Keys {
    /// Arguments from `first` to the end (or `last` from the end), every `step`.
    Range {
        first: usize,
        from_end: usize,
        step: usize,
    },
    /// Explicit argument positions.
    At(&'static [usize]),
    /// `numkeys` at `at`, keys follow; plus optionally a destination key at `dest`.
    Counted { at: usize, dest: Option<usize> },
    /// No key, or unknown.
    None,
}

fn spec(name: &[u8]) -> (Keys, bool) {
    let lower = name.to_ascii_lowercase();
    let decomposable = matches!(lower.as_slice(), b"del" | b"unlink" | b"touch" | b"mset");
    let keys = match lower.as_slice() {
        b"del" | b"unlink" | b"touch" | b"sunionstore" | b"sinterstore" | b"sdiffstore"
        | b"pfmerge" | b"pfcount" | b"watch" => Keys::Range {
            first: 1,
            from_end: 0,
            step: 1,
        },
        b"mset" | b"msetnx" => Keys::Range {
            first: 1,
            from_end: 0,
            step: 2,
        },
        b"rename" | b"renamenx" | b"copy" | b"smove" | b"lmove" | b"blmove" | b"rpoplpush"
        | b"brpoplpush" | b"zrangestore" | b"georadius" | b"georadiusbymember"
        | b"geosearchstore" => Keys::At(&[1, 2]),
        b"zunionstore" | b"zinterstore" | b"zdiffstore" => Keys::Counted {
            at: 2,
            dest: Some(1),
        },
        b"eval" | b"evalsha" | b"eval_ro" | b"evalsha_ro" | b"fcall" | b"fcall_ro" | b"lmpop"
        | b"zmpop" | b"sintercard" | b"zintercard" => Keys::Counted { at: 2, dest: None },
        b"blmpop" | b"bzmpop" => Keys::Counted { at: 2, dest: None },
        b"bitop" => Keys::Range {
            first: 2,
            from_end: 0,
            step: 1,
        },
        b"xgroup" | b"object" => Keys::At(&[2]),
        b"sort" => Keys::At(&[1]),
        b"flushall" | b"flushdb" | b"swapdb" | b"function" | b"script" | b"publish"
        | b"spublish" | b"multi" | b"exec" | b"select" | b"ping" | b"replconf" => Keys::None,
        _ if single_key(&lower) => Keys::At(&[1]),
        _ => Keys::None,
    };
    (keys, decomposable)
}

/// Write commands whose only key is the first argument.
fn single_key(name: &[u8]) -> bool {
    matches!(
        name,
        b"set"
            | b"setnx"
            | b"setex"
            | b"psetex"
            | b"append"
            | b"incr"
            | b"decr"
            | b"incrby"
            | b"decrby"
            | b"incrbyfloat"
            | b"getset"
            | b"getdel"
            | b"getex"
            | b"setrange"
            | b"setbit"
            | b"bitfield"
            | b"expire"
            | b"pexpire"
            | b"expireat"
            | b"pexpireat"
            | b"persist"
            | b"lpush"
            | b"rpush"
            | b"lpushx"
            | b"rpushx"
            | b"lpop"
            | b"rpop"
            | b"blpop"
            | b"brpop"
            | b"lset"
            | b"lrem"
            | b"ltrim"
            | b"linsert"
            | b"sadd"
            | b"srem"
            | b"spop"
            | b"zadd"
            | b"zincrby"
            | b"zrem"
            | b"zremrangebyscore"
            | b"zremrangebyrank"
            | b"zremrangebylex"
            | b"zpopmin"
            | b"zpopmax"
            | b"bzpopmin"
            | b"bzpopmax"
            | b"hset"
            | b"hsetnx"
            | b"hmset"
            | b"hdel"
            | b"hincrby"
            | b"hincrbyfloat"
            | b"hexpire"
            | b"hpexpire"
            | b"hexpireat"
            | b"hpexpireat"
            | b"hpersist"
            | b"hgetdel"
            | b"hgetex"
            | b"hsetex"
            | b"xadd"
            | b"xtrim"
            | b"xdel"
            | b"xack"
            | b"xclaim"
            | b"xautoclaim"
            | b"xsetid"
            | b"pfadd"
            | b"geoadd"
            | b"restore"
            | b"restore-asking"
            | b"xackdel"
            | b"xdelex"
    )
}

fn key_positions(args: &[Bytes]) -> Option<(Vec<usize>, bool)> {
    let name = args.first()?;
    let (keys, decomposable) = spec(name);
    let n = args.len();
    let positions = match keys {
        Keys::None => return None,
        Keys::At(at) => at.iter().copied().filter(|&i| i < n).collect(),
        Keys::Range {
            first,
            from_end,
            step,
        } => (first..n.saturating_sub(from_end)).step_by(step).collect(),
        Keys::Counted { at, dest } => {
            let numkeys: usize = std::str::from_utf8(args.get(at)?).ok()?.parse().ok()?;
            let mut v: Vec<usize> = dest.into_iter().collect();
            v.extend((at + 1..at + 1 + numkeys).filter(|&i| i < n));
            v
        }
    };
    if positions.is_empty() {
        return None;
    }
    let mut positions = positions;
    // SORT ... STORE dest and GEORADIUS ... STORE/STOREDIST dest write a second key.
    let lower = name.to_ascii_lowercase();
    if matches!(
        lower.as_slice(),
        b"sort" | b"georadius" | b"georadiusbymember"
    ) {
        positions.truncate(1);
        for (i, a) in args.iter().enumerate().take(n.saturating_sub(1)).skip(2) {
            let a = a.to_ascii_lowercase();
            if a == b"store" || a == b"storedist" {
                positions.push(i + 1);
            }
        }
    }
    Some((positions, decomposable))
}

/// The argument positions of a command's keys, or `None` when it concerns no key.
pub fn key_indexes(args: &[Bytes]) -> Option<Vec<usize>> {
    key_positions(args).map(|(positions, _)| positions)
}

/// The slots a command's keys are in, or `None` when it concerns no single key.
pub fn slots(args: &[Bytes]) -> Option<Vec<Slot>> {
    let (positions, _) = key_positions(args)?;
    let mut slots: Vec<Slot> = positions.iter().map(|&i| key_slot(&args[i])).collect();
    slots.sort();
    slots.dedup();
    Some(slots)
}

/// How to publish `args`.
pub fn route(args: &[Bytes]) -> Route {
    let Some((positions, decomposable)) = key_positions(args) else {
        return Route::Broadcast;
    };
    let key_slots: Vec<Slot> = positions.iter().map(|&i| key_slot(&args[i])).collect();
    let first = key_slots[0];
    if key_slots.iter().all(|&s| s == first) {
        return Route::Slot(first);
    }
    if decomposable {
        let mset = args[0].eq_ignore_ascii_case(b"mset");
        let mut pieces: Vec<(Slot, Vec<Bytes>)> = Vec::new();
        for (&i, &slot) in positions.iter().zip(&key_slots) {
            let idx = match pieces.iter().position(|(s, _)| *s == slot) {
                Some(idx) => idx,
                None => {
                    pieces.push((slot, vec![args[0].clone()]));
                    pieces.len() - 1
                }
            };
            pieces[idx].1.push(args[i].clone());
            if mset {
                if let Some(v) = args.get(i + 1) {
                    pieces[idx].1.push(v.clone());
                }
            }
        }
        return Route::Split(pieces);
    }
    let mut slots = key_slots;
    slots.sort();
    slots.dedup();
    Route::MultiSlot(slots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<Bytes> {
        words
            .iter()
            .map(|w| Bytes::copy_from_slice(w.as_bytes()))
            .collect()
    }

    #[test]
    fn routes() {
        let s = |k: &str| key_slot(k.as_bytes());
        assert_eq!(route(&args(&["SET", "a", "1"])), Route::Slot(s("a")));
        assert_eq!(route(&args(&["flushall"])), Route::Broadcast);
        assert_eq!(route(&args(&["SOMETHINGNEW", "a"])), Route::Broadcast);
        assert_eq!(route(&args(&["DEL", "{t}a", "{t}b"])), Route::Slot(s("t")));
        assert_eq!(
            route(&args(&["MSET", "a", "1", "b", "2", "{a}c", "3"])),
            Route::Split(vec![
                (s("a"), args(&["MSET", "a", "1", "{a}c", "3"])),
                (s("b"), args(&["MSET", "b", "2"])),
            ])
        );
        let mut two = vec![s("a"), s("b")];
        two.sort();
        assert_eq!(
            route(&args(&["RENAME", "a", "b"])),
            Route::MultiSlot(two.clone())
        );
        assert_eq!(
            route(&args(&["ZUNIONSTORE", "a", "1", "b", "WEIGHTS", "1"])),
            Route::MultiSlot(two.clone())
        );
        assert_eq!(
            route(&args(&["SORT", "a", "BY", "x", "STORE", "b"])),
            Route::MultiSlot(two.clone())
        );
        assert_eq!(
            route(&args(&["XGROUP", "CREATE", "a", "g", "$"])),
            Route::Slot(s("a"))
        );
        assert_eq!(route(&args(&["EVAL", "return 1", "0"])), Route::Broadcast);
        assert_eq!(
            route(&args(&["EVAL", "x", "2", "a", "b", "argv"])),
            Route::MultiSlot(two)
        );
    }
}
