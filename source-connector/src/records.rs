//! Turns what the replica link receives (RDB items, commands) into topic records (DESIGN §4).
//!
//! Pure and synchronous: the caller feeds items and commands in replication order and publishes
//! the [`Outgoing`] records in the order returned. Positions are `(epoch, offset, sequence)`:
//! snapshot records share the FULLRESYNC offset and count up in `sequence`; a command's offset
//! is the replication offset after it, and `sequence` numbers the pieces of a split command.

use crate::commands::{self, Route};
use crate::rdb::{self, Item, Piece};
use crate::resp;
use bytes::Bytes;
use proto::topic::{partition_for_slot, RecordKey};
use proto::v1::{self, record::Body, value::Kind};
use proto::{Position, Slot};
pub use wire::merge::merge;

/// One record to publish, to one or several partitions (barriers, snapshot markers and
/// heartbeats go to several, each copy identical).
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub partitions: Vec<u32>,
    pub key: RecordKey,
    pub record: v1::Record,
    /// Progress the source may acknowledge once this record and all before it are in Kafka.
    pub mark: Option<Mark>,
}

/// A point in the replication stream that is safe to resume from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    /// Replication offset: everything before it is published.
    pub offset: u64,
    /// The snapshot of the current epoch is completely published.
    pub snapshot_done: bool,
}

#[derive(Debug)]
struct KeyInProgress {
    header: rdb::KeyHeader,
    slot: Slot,
    value: Option<Kind>,
    value_bytes: usize,
    /// Pieces already emitted (0: nothing yet).
    emitted: u32,
}

/// Builds the records of one source shard.
#[derive(Debug)]
pub struct Builder {
    shard: String,
    partitions: u32,
    piece_bytes: usize,
    epoch: u64,
    db: u32,
    /// Offset of the current snapshot (FULLRESYNC offset) and the next sequence number in it.
    snapshot_offset: u64,
    sequence: u64,
    rdb_version: u32,
    key: Option<KeyInProgress>,
    keys: u64,
    functions: Vec<v1::FunctionLibrary>,
    /// Commands of an open MULTI, with their db.
    multi: Option<Vec<(u32, Vec<Bytes>)>>,
    /// Offset after the last complete command outside a transaction.
    safe_offset: u64,
    /// For one shard of a cluster source: the slots it serves, which bound its keyless commands.
    scope: Vec<(u16, u16)>,
}

impl Builder {
    pub fn new(
        shard: String,
        partitions: u32,
        piece_bytes: usize,
        epoch: u64,
        offset: u64,
    ) -> Self {
        Builder {
            shard,
            partitions,
            piece_bytes,
            epoch,
            db: 0,
            snapshot_offset: offset,
            sequence: 0,
            rdb_version: 0,
            key: None,
            keys: 0,
            functions: Vec::new(),
            multi: None,
            safe_offset: offset,
            scope: Vec::new(),
        }
    }

    /// The source is one shard of a cluster serving these slot ranges: a keyless command
    /// (FLUSHALL, FLUSHDB, …) ran on that node only and concerns only these slots' keys.
    pub fn scoped(mut self, ranges: Vec<(u16, u16)>) -> Self {
        self.scope = ranges;
        self
    }

    /// The shard's slots changed (a migration finished).
    pub fn set_scope(&mut self, ranges: Vec<(u16, u16)>) {
        self.scope = ranges;
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Offset after the last complete command outside a transaction: where a resumed stream
    /// would start.
    pub fn safe_offset(&self) -> u64 {
        self.safe_offset
    }

    pub fn keys(&self) -> u64 {
        self.keys
    }

    fn all_partitions(&self) -> Vec<u32> {
        (0..self.partitions).collect()
    }

    fn record(&self, position: Position, db: u32, slot: Option<Slot>, body: Body) -> v1::Record {
        v1::Record {
            schema_version: proto::SCHEMA_VERSION,
            source_shard: self.shard.clone(),
            position: Some(position.into()),
            capture_time_ms: service::now_ms(),
            db,
            slot: slot.map(|s| u32::from(s.get())),
            body: Some(body),
        }
    }

    fn next_snapshot_position(&mut self) -> Position {
        let p = Position::new(self.epoch, self.snapshot_offset, self.sequence);
        self.sequence += 1;
        p
    }

    fn broadcast(&mut self, position: Position, body: Body, mark: Option<Mark>) -> Outgoing {
        Outgoing {
            partitions: self.all_partitions(),
            key: RecordKey::Unslotted,
            record: self.record(position, self.db, None, body),
            mark,
        }
    }

    fn to_slot(&self, position: Position, db: u32, slot: Slot, body: Body) -> Outgoing {
        Outgoing {
            partitions: vec![partition_for_slot(slot, self.partitions).0],
            key: RecordKey::Slot(slot),
            record: self.record(position, db, Some(slot), body),
            mark: None,
        }
    }

    // ---- snapshot ----

    /// A full resync begins: a new epoch whose snapshot holds everything up to `offset`.
    pub fn begin_snapshot(&mut self, epoch: u64, offset: u64) {
        self.epoch = epoch;
        self.snapshot_offset = offset;
        self.safe_offset = offset;
        self.sequence = 0;
        self.keys = 0;
        self.functions.clear();
        self.key = None;
        self.multi = None;
        self.db = 0;
    }

    /// The records for one RDB item. `start` describes the sync for the snapshot-start record,
    /// which is written when the RDB header arrives (it carries the RDB version).
    pub fn rdb_item(&mut self, item: Item, start: &v1::SnapshotStart) -> Vec<Outgoing> {
        match item {
            Item::Header { version } => {
                self.rdb_version = version;
                let mut start = start.clone();
                start.rdb_version = version;
                start.partitions = self.partitions;
                let position = self.next_snapshot_position();
                vec![self.broadcast(position, Body::SnapshotStart(start), None)]
            }
            Item::SelectDb { db } => {
                self.db = db;
                Vec::new()
            }
            Item::Function { code } => {
                self.functions.push(v1::FunctionLibrary {
                    name: library_name(&code),
                    code,
                });
                Vec::new()
            }
            Item::Key(header) => {
                let slot = proto::key_slot(&header.key);
                self.key = Some(KeyInProgress {
                    header,
                    slot,
                    value: None,
                    value_bytes: 0,
                    emitted: 0,
                });
                Vec::new()
            }
            Item::Piece(Piece::String(mut bytes)) => {
                // An LZF-compressed string arrives whole: cut it to the piece size here.
                let mut out = Vec::new();
                while !bytes.is_empty() {
                    let Some(key) = self.key.as_mut() else {
                        return out;
                    };
                    let room = self.piece_bytes.saturating_sub(key.value_bytes).max(1);
                    let part = bytes.split_to(room.min(bytes.len()));
                    key.value_bytes += merge(&mut key.value, Piece::String(part));
                    if key.value_bytes >= self.piece_bytes {
                        out.push(self.emit_piece(false));
                    }
                }
                out
            }
            Item::Piece(piece) => {
                let Some(key) = self.key.as_mut() else {
                    return Vec::new();
                };
                key.value_bytes += merge(&mut key.value, piece);
                if key.value_bytes >= self.piece_bytes {
                    let out = self.emit_piece(false);
                    return vec![out];
                }
                Vec::new()
            }
            Item::KeyEnd(end) => {
                let Some(key) = self.key.as_mut() else {
                    return Vec::new();
                };
                self.keys += 1;
                if key.emitted == 0 {
                    if let Some(payload) = end.dump {
                        let module_id = match key.value {
                            Some(Kind::Dump(ref d)) => d.module_id,
                            _ => 0,
                        };
                        key.value = Some(Kind::Dump(v1::DumpPayload {
                            payload,
                            rdb_version: self.rdb_version,
                            module_id,
                        }));
                    }
                }
                let out = self.emit_piece(true);
                self.key = None;
                vec![out]
            }
            Item::Aux { .. }
            | Item::ResizeDb { .. }
            | Item::SlotInfo { .. }
            | Item::ModuleAux { .. }
            | Item::End { .. } => Vec::new(),
        }
    }

    fn emit_piece(&mut self, last: bool) -> Outgoing {
        let position = self.next_snapshot_position();
        let db = self.db;
        let key = self.key.as_mut().expect("a key is in progress");
        // An empty string has no piece; a last chunk may carry only the TTL.
        let kind = match key.value.take() {
            None if key.emitted == 0 => Some(Kind::String(Bytes::new())),
            kind => kind,
        };
        let value = v1::Value { kind };
        key.value_bytes = 0;
        let expire = if last { key.header.expire_ms } else { None };
        let body = if key.emitted == 0 {
            Body::KeyEntry(v1::KeyEntry {
                key: key.header.key.clone(),
                expire_at_ms: expire,
                lru_idle_s: key.header.lru_idle_s,
                lfu_freq: key.header.lfu_freq.map(u32::from),
                value: Some(value),
                chunked: !last,
            })
        } else {
            Body::KeyChunk(v1::KeyChunk {
                key: key.header.key.clone(),
                index: key.emitted,
                last,
                expire_at_ms: expire,
                value: Some(value),
            })
        };
        key.emitted += 1;
        let slot = key.slot;
        self.to_slot(position, db, slot, body)
    }

    /// The snapshot ended after `rdb_bytes` bytes: its end marker, which completes the epoch's
    /// snapshot once acknowledged.
    pub fn end_snapshot(&mut self, rdb_bytes: u64) -> Outgoing {
        let position = self.next_snapshot_position();
        let end = v1::SnapshotEnd {
            keys: self.keys,
            rdb_bytes,
            functions: std::mem::take(&mut self.functions),
        };
        let mark = Mark {
            offset: self.snapshot_offset,
            snapshot_done: true,
        };
        self.db = 0;
        self.broadcast(position, Body::SnapshotEnd(end), Some(mark))
    }

    // ---- command stream ----

    /// The records for one command of the stream (none for PING, REPLCONF, SELECT, MULTI and
    /// the commands inside a transaction until its EXEC).
    pub fn command(&mut self, cmd: resp::Command) -> Vec<Outgoing> {
        let offset = cmd.end_offset;
        match cmd.kind {
            resp::Kind::Select(db) => {
                self.db = db;
                self.advance_outside_multi(offset);
                return Vec::new();
            }
            resp::Kind::Ping | resp::Kind::GetAck => {
                self.advance_outside_multi(offset);
                return Vec::new();
            }
            resp::Kind::Write => {}
        }
        let name = &cmd.args[0];
        if name.eq_ignore_ascii_case(b"multi") {
            self.multi = Some(Vec::new());
            return Vec::new();
        }
        if name.eq_ignore_ascii_case(b"exec") {
            let Some(commands) = self.multi.take() else {
                return Vec::new();
            };
            self.safe_offset = offset;
            return self.transaction(commands, offset);
        }
        if let Some(multi) = self.multi.as_mut() {
            multi.push((self.db, cmd.args));
            return Vec::new();
        }
        self.safe_offset = offset;
        let db = self.db;
        let mut out = match commands::route(&cmd.args) {
            Route::Slot(slot) => split_big(cmd.args, self.piece_bytes)
                .into_iter()
                .enumerate()
                .map(|(i, args)| {
                    let p = Position::new(self.epoch, offset, i as u64);
                    self.to_slot(p, db, slot, command_body(args))
                })
                .collect(),
            Route::Split(pieces) => pieces
                .into_iter()
                .enumerate()
                .map(|(i, (slot, args))| {
                    let p = Position::new(self.epoch, offset, i as u64);
                    self.to_slot(p, db, slot, command_body(args))
                })
                .collect(),
            Route::MultiSlot(slots) => vec![self.barrier(
                v1::BarrierKind::MultiSlot,
                slots,
                vec![cmd.args],
                db,
                offset,
            )],
            Route::Broadcast => vec![self.barrier(
                v1::BarrierKind::Broadcast,
                Vec::new(),
                vec![cmd.args],
                db,
                offset,
            )],
        };
        if let Some(last) = out.last_mut() {
            last.mark = Some(Mark {
                offset,
                snapshot_done: true,
            });
        }
        out
    }

    fn advance_outside_multi(&mut self, offset: u64) {
        if self.multi.is_none() {
            self.safe_offset = offset;
        }
    }

    fn transaction(&mut self, commands: Vec<(u32, Vec<Bytes>)>, offset: u64) -> Vec<Outgoing> {
        let mark = Some(Mark {
            offset,
            snapshot_done: true,
        });
        if commands.is_empty() {
            return Vec::new();
        }
        let db = commands[0].0;
        let same_db = commands.iter().all(|(d, _)| *d == db);
        let mut slots = Vec::new();
        let mut broadcast = false;
        for (_, args) in &commands {
            match commands::slots(args) {
                Some(s) => slots.extend(s),
                None => broadcast = true,
            }
        }
        slots.sort();
        slots.dedup();
        let args: Vec<Vec<Bytes>> = commands.into_iter().map(|(_, a)| a).collect();
        let mut out = if !broadcast && same_db && slots.len() == 1 {
            let p = Position::new(self.epoch, offset, 0);
            let body = Body::Transaction(v1::Transaction {
                commands: args.into_iter().map(command).collect(),
            });
            self.to_slot(p, db, slots[0], body)
        } else if broadcast || !same_db {
            self.barrier(v1::BarrierKind::Broadcast, slots, args, db, offset)
        } else {
            self.barrier(v1::BarrierKind::MultiSlot, slots, args, db, offset)
        };
        out.mark = mark;
        vec![out]
    }

    fn barrier(
        &mut self,
        kind: v1::BarrierKind,
        slots: Vec<Slot>,
        commands: Vec<Vec<Bytes>>,
        db: u32,
        offset: u64,
    ) -> Outgoing {
        let partitions: Vec<u32> = if kind == v1::BarrierKind::Broadcast && !self.scope.is_empty() {
            let mut p: Vec<u32> = self
                .scope
                .iter()
                .flat_map(|&(first, last)| {
                    let part = |n: u16| {
                        Slot::new(n).map_or(0, |s| partition_for_slot(s, self.partitions).0)
                    };
                    part(first)..=part(last)
                })
                .collect();
            p.sort_unstable();
            p.dedup();
            p
        } else if kind == v1::BarrierKind::Broadcast {
            self.all_partitions()
        } else {
            let mut p: Vec<u32> = slots
                .iter()
                .map(|&s| partition_for_slot(s, self.partitions).0)
                .collect();
            p.sort_unstable();
            p.dedup();
            p
        };
        let body = Body::Barrier(v1::Barrier {
            kind: kind as i32,
            partitions: partitions.clone(),
            commands: commands.into_iter().map(command).collect(),
            slots: slots.iter().map(|s| u32::from(s.get())).collect(),
            scope: match kind {
                v1::BarrierKind::Broadcast => self
                    .scope
                    .iter()
                    .map(|&(first, last)| v1::SlotRange {
                        first: first.into(),
                        last: last.into(),
                    })
                    .collect(),
                _ => Vec::new(),
            },
        });
        let position = Position::new(self.epoch, offset, 0);
        Outgoing {
            partitions,
            key: RecordKey::Unslotted,
            record: self.record(position, db, None, body),
            mark: None,
        }
    }

    /// A heartbeat on every partition, unless a transaction is open (its offset would not be
    /// safe to resume from).
    pub fn heartbeat(&mut self) -> Option<Outgoing> {
        if self.multi.is_some() || self.key.is_some() {
            return None;
        }
        let offset = self.safe_offset;
        // Heartbeats sort after every record at their offset and are never applied.
        let position = Position::new(self.epoch, offset, u64::MAX);
        let body = Body::Heartbeat(v1::Heartbeat {
            master_repl_offset: offset,
        });
        Some(self.broadcast(
            position,
            body,
            Some(Mark {
                offset,
                snapshot_done: true,
            }),
        ))
    }
}

/// Splits a command bigger than `limit` bytes into several commands with the same effect when
/// applied in order: variadic writes by their elements (`HSET`, `SADD`, `RPUSH`, `ZADD`, `DEL`,
/// `MSET`, ...), and `SET key value` into `SET` plus `APPEND`s. Anything else stays whole (the
/// publisher refuses it with a clear error if it exceeds the topic's message size).
pub fn split_big(args: Vec<Bytes>, limit: usize) -> Vec<Vec<Bytes>> {
    let size: usize = args.iter().map(|a| a.len() + 16).sum();
    if size <= limit || args.len() < 3 {
        return vec![args];
    }
    let name = args[0].to_ascii_lowercase();
    // (arguments kept in every piece, size of one element group)
    let (fixed, group) = match name.as_slice() {
        b"hset" | b"hmset" => (2, 2),
        b"sadd" | b"srem" | b"rpush" | b"lpush" | b"rpushx" | b"lpushx" | b"hdel" | b"zrem"
        | b"pfadd" => (2, 1),
        b"del" | b"unlink" | b"touch" => (1, 1),
        b"mset" => (1, 2),
        b"zadd" => {
            // Flags (NX, XX, GT, LT, CH) come before the score/member pairs; INCR takes one pair.
            let mut f = 2;
            while f < args.len()
                && matches!(
                    args[f].to_ascii_lowercase().as_slice(),
                    b"nx" | b"xx" | b"gt" | b"lt" | b"ch"
                )
            {
                f += 1;
            }
            (f, 2)
        }
        b"set" if args.len() == 3 => {
            let value = &args[2];
            let piece = limit.max(1024);
            let mut out = Vec::new();
            for (i, start) in (0..value.len()).step_by(piece).enumerate() {
                let part = value.slice(start..(start + piece).min(value.len()));
                let verb = if i == 0 { "SET" } else { "APPEND" };
                out.push(vec![
                    Bytes::from_static(verb.as_bytes()),
                    args[1].clone(),
                    part,
                ]);
            }
            return out;
        }
        _ => return vec![args],
    };
    if !(args.len() - fixed).is_multiple_of(group) {
        return vec![args];
    }
    let head: Vec<Bytes> = args[..fixed].to_vec();
    let head_size: usize = head.iter().map(|a| a.len() + 16).sum();
    let mut out = Vec::new();
    let mut current = head.clone();
    let mut current_size = head_size;
    for g in args[fixed..].chunks(group) {
        let g_size: usize = g.iter().map(|a| a.len() + 16).sum();
        if current.len() > fixed && current_size + g_size > limit {
            out.push(std::mem::replace(&mut current, head.clone()));
            current_size = head_size;
        }
        current.extend(g.iter().cloned());
        current_size += g_size;
    }
    out.push(current);
    out
}

fn command(args: Vec<Bytes>) -> v1::Command {
    v1::Command { args }
}

fn command_body(args: Vec<Bytes>) -> Body {
    Body::Command(command(args))
}

/// The library name from a function's `#!<engine> name=<name>` first line.
fn library_name(code: &[u8]) -> String {
    let first = code.split(|&b| b == b'\n').next().unwrap_or_default();
    String::from_utf8_lossy(first)
        .split_whitespace()
        .find_map(|w| w.strip_prefix("name="))
        .unwrap_or_default()
        .to_owned()
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
    fn keyless_commands_of_a_cluster_shard_are_scoped_to_its_slots() {
        let flush = |b: &mut Builder| {
            let out = b.command(resp::Command {
                args: args(&["FLUSHALL"]),
                end_offset: 100,
                kind: resp::Kind::Write,
            });
            let Some(Body::Barrier(barrier)) = out[0].record.body.clone() else {
                panic!("FLUSHALL is a barrier: {out:?}");
            };
            (out[0].partitions.clone(), barrier)
        };
        let (partitions, barrier) = flush(&mut Builder::new("s".into(), 8, 1024, 1, 0));
        assert_eq!(partitions, (0..8).collect::<Vec<u32>>());
        assert!(barrier.scope.is_empty());
        // Slots 5461-10922 are in partitions 2..=5 of 8 (2048 slots each).
        let mut shard = Builder::new("s".into(), 8, 1024, 1, 0).scoped(vec![(5461, 10922)]);
        let (partitions, barrier) = flush(&mut shard);
        assert_eq!(partitions, vec![2, 3, 4, 5]);
        assert_eq!(barrier.partitions, partitions);
        assert_eq!(
            barrier.scope,
            vec![v1::SlotRange {
                first: 5461,
                last: 10922
            }]
        );
    }

    #[test]
    fn big_commands_split_with_the_same_effect() {
        let small = args(&["HSET", "h", "f", "v"]);
        assert_eq!(split_big(small.clone(), 1000), vec![small]);
        let mut hset = args(&["HSET", "h"]);
        for i in 0..100 {
            hset.push(Bytes::from(format!("field-{i}")));
            hset.push(Bytes::from(format!("value-{i}")));
        }
        let pieces = split_big(hset.clone(), 300);
        assert!(pieces.len() > 5);
        let mut joined = args(&["HSET", "h"]);
        for p in &pieces {
            assert_eq!(&p[..2], &hset[..2]);
            assert_eq!((p.len() - 2) % 2, 0);
            assert!(p.iter().map(|a| a.len() + 16).sum::<usize>() <= 300 + 64);
            joined.extend(p[2..].iter().cloned());
        }
        assert_eq!(joined, hset);
        let zadd = args(&["ZADD", "z", "NX", "CH", "1", "a", "2", "b", "3", "c"]);
        let pieces = split_big(zadd, 80);
        assert!(pieces.iter().all(|p| p[2] == "NX" && p[3] == "CH"));
        let set = vec![
            Bytes::from("SET"),
            Bytes::from("k"),
            Bytes::from(vec![b'x'; 5000]),
        ];
        let pieces = split_big(set, 2048);
        assert_eq!(pieces.len(), 3);
        assert_eq!(pieces[0][0], "SET");
        assert_eq!(pieces[1][0], "APPEND");
        assert_eq!(pieces.iter().map(|p| p[2].len()).sum::<usize>(), 5000);
        // SET with options is not split.
        let set_px = vec![
            Bytes::from("SET"),
            Bytes::from("k"),
            Bytes::from(vec![b'x'; 5000]),
            Bytes::from("PX"),
            Bytes::from("10"),
        ];
        assert_eq!(split_big(set_px, 2048).len(), 1);
    }
}
