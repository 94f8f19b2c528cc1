//! Building a topic value from decoded RDB pieces (the source, for a snapshot key too big for one
//! record; the sink, to rebuild a DUMP payload its target cannot RESTORE).

use crate::rdb::{self, Piece};
use bytes::Bytes;
use proto::v1::{self, value::Kind};

/// Adds a decoded piece to a value being built (as a topic value); returns the bytes it added.
/// The sink uses it too, to rebuild a DUMP payload its target cannot RESTORE.
pub fn merge(value: &mut Option<Kind>, piece: Piece) -> usize {
    use proto::chunk::ELEMENT_OVERHEAD_BYTES as E;
    match piece {
        Piece::String(b) => {
            let n = b.len();
            match value {
                Some(Kind::String(s)) => {
                    let mut joined = bytes::BytesMut::with_capacity(s.len() + b.len());
                    joined.extend_from_slice(s);
                    joined.extend_from_slice(&b);
                    *s = joined.freeze();
                }
                _ => *value = Some(Kind::String(b)),
            }
            n
        }
        Piece::List(items) => {
            let n = items.iter().map(|i| i.len() + E).sum();
            let v = value.get_or_insert_with(|| Kind::List(v1::ListValue::default()));
            if let Kind::List(l) = v {
                l.elements.extend(items);
            }
            n
        }
        Piece::Set(items) => {
            let n = items.iter().map(|i| i.len() + E).sum();
            let v = value.get_or_insert_with(|| Kind::Set(v1::SetValue::default()));
            if let Kind::Set(l) = v {
                l.members.extend(items);
            }
            n
        }
        Piece::ZSet(items) => {
            let n = items.iter().map(|(m, _)| m.len() + 8 + E).sum();
            let v = value.get_or_insert_with(|| Kind::Zset(v1::ZSetValue::default()));
            if let Kind::Zset(z) = v {
                z.members.extend(
                    items
                        .into_iter()
                        .map(|(m, score)| v1::ZSetMember { member: m, score }),
                );
            }
            n
        }
        Piece::Hash(items) => {
            let n = items
                .iter()
                .map(|(f, v, _)| f.len() + v.len() + 2 * E)
                .sum();
            let v = value.get_or_insert_with(|| Kind::Hash(v1::HashValue::default()));
            if let Kind::Hash(h) = v {
                h.fields
                    .extend(items.into_iter().map(|(field, value, ttl)| v1::HashField {
                        field,
                        value,
                        expire_at_ms: ttl,
                    }));
            }
            n
        }
        Piece::StreamEntries(entries) => {
            let v = value.get_or_insert_with(|| Kind::Stream(v1::StreamValue::default()));
            let mut n = 0;
            if let Kind::Stream(s) = v {
                for e in entries {
                    let mut fields = Vec::with_capacity(e.fields.len() * 2);
                    for (f, val) in e.fields {
                        n += f.len() + val.len() + 2 * E;
                        fields.push(f);
                        fields.push(val);
                    }
                    n += 16;
                    s.entries.push(v1::StreamEntry {
                        id: Some(stream_id(e.id)),
                        fields,
                    });
                }
            }
            n
        }
        Piece::StreamMeta(meta) => {
            let v = value.get_or_insert_with(|| Kind::Stream(v1::StreamValue::default()));
            if let Kind::Stream(s) = v {
                s.length = meta.length;
                s.last_id = Some(stream_id(meta.last_id));
                s.entries_added = meta.entries_added;
                s.max_deleted_id = meta.max_deleted_id.map(stream_id);
            }
            64
        }
        Piece::StreamGroup(g) => {
            let v = value.get_or_insert_with(|| Kind::Stream(v1::StreamValue::default()));
            let mut n = g.name.len() + 32;
            if let Kind::Stream(s) = v {
                let pending = g
                    .pending
                    .into_iter()
                    .map(|(id, consumer, time, count)| {
                        n += consumer.len() + 40;
                        v1::StreamPendingEntry {
                            id: Some(stream_id(id)),
                            consumer,
                            delivery_time_ms: time,
                            delivery_count: count,
                        }
                    })
                    .collect();
                let consumers = g
                    .consumers
                    .into_iter()
                    .map(|c| {
                        n += c.name.len() + 24;
                        v1::StreamConsumer {
                            name: c.name,
                            seen_time_ms: c.seen_time_ms,
                            active_time_ms: c.active_time_ms,
                        }
                    })
                    .collect();
                s.groups.push(v1::StreamGroup {
                    name: g.name,
                    last_delivered_id: Some(stream_id(g.last_delivered_id)),
                    entries_read: g.entries_read,
                    pending,
                    consumers,
                });
            }
            n
        }
        Piece::Module { module_id } => {
            *value = Some(Kind::Dump(v1::DumpPayload {
                payload: Bytes::new(),
                rdb_version: 0,
                module_id,
            }));
            0
        }
    }
}

fn stream_id(id: rdb::StreamId) -> v1::StreamId {
    v1::StreamId {
        ms: id.ms,
        seq: id.seq,
    }
}
