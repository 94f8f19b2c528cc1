//! How records sit on the topic: message keys, partitions and headers.

use crate::slot::{Slot, SLOT_COUNT};
use crate::{v1, SCHEMA_VERSION};
use prost::Message;
use std::fmt;

/// Header that names the content type of the value.
pub const HEADER_CONTENT_TYPE: &str = "content-type";
/// The content type of a message holding one record ([`v1::Record`]).
pub const CONTENT_TYPE: &str = "application/x-protobuf; proto=redis_repl.v1.Record";
/// The content type of a message holding several consecutive records of its partition
/// ([`v1::RecordBatch`]): what the source connector writes (ADR 0013).
pub const CONTENT_TYPE_BATCH: &str = "application/x-protobuf; proto=redis_repl.v1.RecordBatch";
/// Header that carries [`SCHEMA_VERSION`] as decimal text.
pub const HEADER_SCHEMA_VERSION: &str = "redis-repl-schema-version";
/// Header with the source shard name, so tools can filter without decoding.
pub const HEADER_SOURCE_SHARD: &str = "redis-repl-source-shard";

/// A Kafka partition number of the topic. Invariant: below the topic's partition count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Partition(pub u32);

impl fmt::Display for Partition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The partition of a slot: contiguous slot ranges, `slot * P / 16384`.
///
/// Computed by the producer rather than left to a default partitioner so every client agrees.
/// Panics if `partitions` is 0 (a topic always has at least one partition; config validation
/// rejects 0 long before this).
pub fn partition_for_slot(slot: Slot, partitions: u32) -> Partition {
    assert!(partitions > 0, "a topic has at least one partition");
    Partition((u64::from(slot.get()) * u64::from(partitions) / u64::from(SLOT_COUNT)) as u32)
}

/// The message key: the slot for records about keys, `*` for records that belong to no single
/// slot (snapshot markers, heartbeats, barriers). Readable text so `kcat -f '%k'` shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKey {
    Slot(Slot),
    Unslotted,
}

impl RecordKey {
    /// The key bytes: the slot as 5-digit decimal (`"00042"`), or `"*"`.
    pub fn to_bytes(self) -> Vec<u8> {
        match self {
            RecordKey::Slot(s) => format!("{:05}", s.get()).into_bytes(),
            RecordKey::Unslotted => b"*".to_vec(),
        }
    }

    pub fn parse(bytes: &[u8]) -> Option<RecordKey> {
        if bytes == b"*" {
            return Some(RecordKey::Unslotted);
        }
        let text = std::str::from_utf8(bytes).ok()?;
        if text.len() != 5 || !text.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Slot::new(text.parse().ok()?).map(RecordKey::Slot)
    }
}

/// Why a message on the topic could not be read as a record.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("message has no `{HEADER_CONTENT_TYPE}: {CONTENT_TYPE}` or `{CONTENT_TYPE_BATCH}` header (foreign message)")]
    ForeignContentType { found: Option<String> },
    #[error("record schema version {found} is newer than supported version {SCHEMA_VERSION}")]
    NewerSchema { found: u32 },
    #[error("record body is not a valid redis_repl.v1.Record: {reason}")]
    Malformed { reason: String },
    #[error("record has no body")]
    EmptyBody,
}

/// Encodes a record into the message value.
pub fn encode(record: &v1::Record) -> Vec<u8> {
    record.encode_to_vec()
}

/// How many bytes an encoded record of `len` bytes takes in a batch message.
pub fn batch_entry_len(len: usize) -> usize {
    1 + prost::length_delimiter_len(len) + len
}

/// Appends an encoded record to the value of a batch message (a [`v1::RecordBatch`] is its
/// records one after the other, each as field 1), so records are encoded once.
pub fn push_to_batch(batch: &mut Vec<u8>, encoded: &[u8]) {
    prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, batch);
    prost::encoding::encode_varint(encoded.len() as u64, batch);
    batch.extend_from_slice(encoded);
}

/// One record of a message: where its bytes sit in the message value (for a dead-letter copy
/// of that record alone) and the record, or why it cannot be read.
#[derive(Debug)]
pub struct Entry {
    pub bytes: std::ops::Range<usize>,
    pub record: Result<v1::Record, DecodeError>,
}

/// The records of a message, in order, given its content-type header value and body: one for a
/// [`CONTENT_TYPE`] message, each of a [`CONTENT_TYPE_BATCH`] one.
///
/// Fails as a whole when the message is not this pipeline's (foreign content type) or the batch
/// envelope is unreadable; a record that cannot be read inside a readable batch is an `Err` in
/// its own entry, so the records around it are not lost. Byte fields share `value`'s memory.
pub fn decode_message(
    content_type: Option<&[u8]>,
    value: &bytes::Bytes,
) -> Result<Vec<Entry>, DecodeError> {
    Ok(record_ranges(content_type, value)?
        .into_iter()
        .map(|bytes| Entry {
            record: decode_record(value.slice(bytes.clone())),
            bytes,
        })
        .collect())
}

/// Where each record of a message sits in its value, in order: the whole value for a
/// [`CONTENT_TYPE`] message, each record of a [`CONTENT_TYPE_BATCH`] one. Decode each with
/// [`decode_record`]. Fails as [`decode_message`] does: for a foreign content type or an
/// unreadable batch envelope.
pub fn record_ranges(
    content_type: Option<&[u8]>,
    value: &[u8],
) -> Result<Vec<std::ops::Range<usize>>, DecodeError> {
    if content_type == Some(CONTENT_TYPE.as_bytes()) {
        let whole = 0..value.len();
        return Ok(vec![whole]);
    }
    if content_type != Some(CONTENT_TYPE_BATCH.as_bytes()) {
        return Err(foreign(content_type));
    }
    let malformed = |reason: String| DecodeError::Malformed {
        reason: format!("batch envelope: {reason}"),
    };
    let mut ranges = Vec::new();
    let mut rest = value;
    while !rest.is_empty() {
        let (tag, wire_type) =
            prost::encoding::decode_key(&mut rest).map_err(|e| malformed(e.to_string()))?;
        if tag != 1 || wire_type != prost::encoding::WireType::LengthDelimited {
            // A field a later schema added: not a record.
            prost::encoding::skip_field(wire_type, tag, &mut rest, Default::default())
                .map_err(|e| malformed(e.to_string()))?;
            continue;
        }
        let len =
            prost::encoding::decode_varint(&mut rest).map_err(|e| malformed(e.to_string()))?;
        let start = value.len() - rest.len();
        let end = usize::try_from(len)
            .ok()
            .and_then(|len| start.checked_add(len))
            .filter(|&end| end <= value.len())
            .ok_or_else(|| malformed(format!("record of {len} bytes runs past the message")))?;
        rest = &value[end..];
        ranges.push(start..end);
    }
    if ranges.is_empty() {
        return Err(malformed("no records".into()));
    }
    Ok(ranges)
}

/// Decodes a message holding one record, given its content-type header value and body.
///
/// Checks the header first so a foreign message on the topic gets a clear error instead of a
/// protobuf parse that might accidentally succeed.
pub fn decode(content_type: Option<&[u8]>, value: &[u8]) -> Result<v1::Record, DecodeError> {
    if content_type != Some(CONTENT_TYPE.as_bytes()) {
        return Err(foreign(content_type));
    }
    decode_record(value)
}

fn foreign(content_type: Option<&[u8]>) -> DecodeError {
    DecodeError::ForeignContentType {
        found: content_type.map(|c| String::from_utf8_lossy(c).into_owned()),
    }
}

/// Decodes one encoded record from any buffer: given `bytes::Bytes`, the record's byte fields
/// share its memory instead of being copied one by one.
pub fn decode_record(value: impl bytes::Buf) -> Result<v1::Record, DecodeError> {
    let record = v1::Record::decode(value).map_err(|e| DecodeError::Malformed {
        reason: e.to_string(),
    })?;
    if record.schema_version > SCHEMA_VERSION {
        return Err(DecodeError::NewerSchema {
            found: record.schema_version,
        });
    }
    if record.body.is_none() {
        return Err(DecodeError::EmptyBody);
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partition_ranges_are_contiguous_and_cover_all() {
        for p in [1u32, 2, 3, 7, 16, 100, 16384] {
            let mut last = 0;
            for s in 0..SLOT_COUNT {
                let part = partition_for_slot(Slot::new(s).unwrap(), p).0;
                assert!(part >= last && part < p, "P={p} slot={s}");
                assert!(part - last <= 1);
                last = part;
            }
            assert_eq!(last, p - 1, "every partition gets slots when P={p}");
        }
        assert_eq!(
            partition_for_slot(Slot::new(8192).unwrap(), 16),
            Partition(8)
        );
        assert_eq!(
            partition_for_slot(Slot::new(1023).unwrap(), 16),
            Partition(0)
        );
        assert_eq!(
            partition_for_slot(Slot::new(1024).unwrap(), 16),
            Partition(1)
        );
    }

    #[test]
    fn record_key_round_trip() {
        let k = RecordKey::Slot(Slot::new(42).unwrap());
        assert_eq!(k.to_bytes(), b"00042");
        assert_eq!(RecordKey::parse(b"00042"), Some(k));
        assert_eq!(RecordKey::parse(b"*"), Some(RecordKey::Unslotted));
        assert_eq!(RecordKey::parse(b"16384"), None);
        assert_eq!(RecordKey::parse(b"42"), None);
    }

    #[test]
    fn decode_rejects_foreign_and_newer() {
        let ct = Some(CONTENT_TYPE.as_bytes());
        assert!(matches!(
            decode(None, b"x"),
            Err(DecodeError::ForeignContentType { .. })
        ));
        assert!(matches!(
            decode(ct, &[0xff, 0xff, 0xff]),
            Err(DecodeError::Malformed { .. })
        ));
        let rec = v1::Record {
            schema_version: SCHEMA_VERSION + 1,
            body: Some(v1::record::Body::Heartbeat(v1::Heartbeat::default())),
            ..Default::default()
        };
        assert_eq!(
            decode(ct, &encode(&rec)),
            Err(DecodeError::NewerSchema {
                found: SCHEMA_VERSION + 1
            })
        );
        assert_eq!(decode(ct, &[]), Err(DecodeError::EmptyBody));
    }

    fn command(n: u64) -> v1::Record {
        v1::Record {
            schema_version: SCHEMA_VERSION,
            position: Some(crate::Position::new(1, n, 0).into()),
            body: Some(v1::record::Body::Heartbeat(v1::Heartbeat::default())),
            ..Default::default()
        }
    }

    /// A batch built with `push_to_batch` is a `RecordBatch` to any protobuf reader, and
    /// `decode_message` gives its records back in order with their byte ranges.
    #[test]
    fn batch_round_trip() {
        let records: Vec<v1::Record> = (1..=3).map(command).collect();
        let mut value = Vec::new();
        for r in &records {
            let encoded = encode(r);
            let before = value.len();
            push_to_batch(&mut value, &encoded);
            assert_eq!(value.len() - before, batch_entry_len(encoded.len()));
        }
        let generic = v1::RecordBatch::decode(&value[..]).unwrap();
        assert_eq!(generic.records, records);
        let value = bytes::Bytes::from(value);
        let entries = decode_message(Some(CONTENT_TYPE_BATCH.as_bytes()), &value).unwrap();
        assert_eq!(entries.len(), 3);
        for (entry, record) in entries.iter().zip(&records) {
            assert_eq!(entry.record.as_ref().unwrap(), record);
            assert_eq!(&value[entry.bytes.clone()], &encode(record)[..]);
        }
        let single = bytes::Bytes::from(encode(&records[0]));
        let entries = decode_message(Some(CONTENT_TYPE.as_bytes()), &single).unwrap();
        assert_eq!(entries.len(), 1);
        assert_eq!(entries[0].record.as_ref().unwrap(), &records[0]);
    }

    /// A bad record inside a readable batch is an error of its own; the others still decode.
    /// An unreadable envelope or a foreign content type fails the whole message.
    #[test]
    fn batch_errors_stay_where_they_are() {
        let mut value = Vec::new();
        push_to_batch(&mut value, &encode(&command(1)));
        push_to_batch(&mut value, &[0xff, 0xff, 0xff]);
        push_to_batch(&mut value, &encode(&command(3)));
        let value = bytes::Bytes::from(value);
        let batch = Some(CONTENT_TYPE_BATCH.as_bytes());
        let entries = decode_message(batch, &value).unwrap();
        assert!(entries[0].record.is_ok() && entries[2].record.is_ok());
        assert!(matches!(
            entries[1].record,
            Err(DecodeError::Malformed { .. })
        ));
        let cut = value.slice(..value.len() - 1);
        assert!(matches!(
            decode_message(batch, &cut),
            Err(DecodeError::Malformed { .. })
        ));
        assert!(matches!(
            decode_message(batch, &bytes::Bytes::new()),
            Err(DecodeError::Malformed { .. })
        ));
        assert!(matches!(
            decode_message(Some(b"text/plain"), &value),
            Err(DecodeError::ForeignContentType { .. })
        ));
    }
}
