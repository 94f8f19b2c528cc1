//! How records sit on the topic: message keys, partitions and headers.

use crate::slot::{Slot, SLOT_COUNT};
use crate::{v1, SCHEMA_VERSION};
use prost::Message;
use std::fmt;

/// Header that names the content type of the value.
pub const HEADER_CONTENT_TYPE: &str = "content-type";
/// The content type of every record this pipeline writes.
pub const CONTENT_TYPE: &str = "application/x-protobuf; proto=redis_repl.v1.Record";
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
    #[error("message has no `{HEADER_CONTENT_TYPE}: {CONTENT_TYPE}` header (foreign message)")]
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

/// Decodes a message, given its content-type header value and body.
///
/// Checks the header first so a foreign message on the topic gets a clear error instead of a
/// protobuf parse that might accidentally succeed.
pub fn decode(content_type: Option<&[u8]>, value: &[u8]) -> Result<v1::Record, DecodeError> {
    decode_buf(content_type, value)
}

/// [`decode`] from any buffer: given `bytes::Bytes`, the record's byte fields share its memory
/// instead of being copied one by one.
pub fn decode_buf(
    content_type: Option<&[u8]>,
    value: impl bytes::Buf,
) -> Result<v1::Record, DecodeError> {
    if content_type != Some(CONTENT_TYPE.as_bytes()) {
        return Err(DecodeError::ForeignContentType {
            found: content_type.map(|c| String::from_utf8_lossy(c).into_owned()),
        });
    }
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
}
