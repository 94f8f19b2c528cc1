//! A consumed record as a lane keeps it until it is applied.
//!
//! A message holds one record or, as the source connector writes them, a batch of consecutive
//! records of its partition (ADR 0013). Each record becomes an [`Incoming`] of its own that
//! shares the message's buffer and knows whether it is the message's last: only once that one is
//! applied does the lane's checkpoint cover the message's offset ([`Incoming::covers`]).
//!
//! librdkafka's messages borrow its queue, so a lane batching them must copy them out. rdkafka's
//! `OwnedMessage` copies the payload, the key, the topic name and every header into separate
//! allocations (the headers through librdkafka's C allocator): a sixth of the sink's CPU. Here a
//! message is copied once into one buffer, and the record decoded from it (`proto::topic::decode`
//! over `Bytes`) slices its values out of that buffer instead of copying each argument again.
//! Key and headers are kept only for a dead-letter copy of the original.
//!
//! It also keeps the message's Kafka timestamp and when the lane took it from the consumer: the
//! two points that split a record's end-to-end latency into the source's, Kafka's and the sink's
//! shares (`sink_stage_latency_seconds`).

use bytes::{BufMut, Bytes, BytesMut};
use proto::topic::{self as wire, DecodeError};
use proto::v1;
use rdkafka::message::{Headers, Message};
use std::ops::Range;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Incoming {
    offset: i64,
    /// The message's last record (or its only one).
    last: bool,
    /// One record taken out of a batch message: its payload is a `Record` alone.
    batched: bool,
    /// The message's Kafka timestamp (Unix ms): when the source connector produced it
    /// (`CreateTime`, librdkafka's default) or when the broker appended it (`LogAppendTime`).
    kafka_ms: Option<i64>,
    /// When the lane took the message from the consumer (Unix ms).
    taken_ms: i64,
    /// The message's payload, then the key, then the headers' names and values.
    buf: Bytes,
    /// This record's bytes in `buf`.
    payload: Range<usize>,
    key: Option<Range<usize>>,
    headers: Arc<[HeaderRanges]>,
}

/// A header's name and value, as ranges of the message's buffer.
type HeaderRanges = (Range<usize>, Option<Range<usize>>);

/// A record taken from a message, or why it cannot be read.
pub type Decoded = Result<v1::Record, DecodeError>;

impl Incoming {
    /// Copies `m`, taken by the lane at `taken_ms` (Unix ms), and appends its records to
    /// `out`. A message that is not this pipeline's, or whose batch cannot be read, is one entry
    /// with the error. (Appended to a buffer the lane keeps: grown anew for every intake, its
    /// reallocations and fresh pages cost a fifth of the sink's CPU at the head of the stream.)
    pub fn read_records<M: Message>(m: &M, taken_ms: i64, out: &mut Vec<(Incoming, Decoded)>) {
        let whole = Incoming::new(m, taken_ms);
        let content_type = whole.header(wire::HEADER_CONTENT_TYPE);
        let batched = content_type == Some(wire::CONTENT_TYPE_BATCH.as_bytes());
        let ranges = match wire::record_ranges(content_type, &whole.buf[whole.payload.clone()]) {
            Ok(ranges) => ranges,
            Err(e) => return out.push((whole, Err(e))),
        };
        let count = ranges.len();
        out.reserve(count);
        let start = whole.payload.start;
        for (i, range) in ranges.into_iter().enumerate() {
            let payload = start + range.start..start + range.end;
            let record = wire::decode_record(whole.buf.slice(payload.clone()));
            let one = Incoming {
                last: i + 1 == count,
                batched,
                payload,
                ..whole.clone()
            };
            out.push((one, record));
        }
    }

    /// Copies `m`, taken by the lane at `taken_ms` (Unix ms), as one record.
    fn new<M: Message>(m: &M, taken_ms: i64) -> Incoming {
        let payload = m.payload().unwrap_or_default();
        let key = m.key();
        let borrowed = m.headers();
        let header_bytes: usize = borrowed.map_or(0, |h| {
            h.iter()
                .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len))
                .sum()
        });
        let mut buf =
            BytesMut::with_capacity(payload.len() + key.map_or(0, <[u8]>::len) + header_bytes);
        let mut put = |bytes: &[u8]| {
            let start = buf.len();
            buf.put_slice(bytes);
            start..buf.len()
        };
        put(payload);
        let key = key.map(&mut put);
        let headers = borrowed.map_or_else(Vec::new, |h| {
            h.iter()
                .map(|h| (put(h.key.as_bytes()), h.value.map(&mut put)))
                .collect()
        });
        Incoming {
            offset: m.offset(),
            last: true,
            batched: false,
            kafka_ms: m.timestamp().to_millis(),
            taken_ms,
            buf: buf.freeze(),
            payload: 0..payload.len(),
            key,
            headers: headers.into(),
        }
    }

    /// The message's offset.
    pub fn offset(&self) -> i64 {
        self.offset
    }

    /// The partition offset whose messages are all applied once this record is: the message's
    /// own for its last record, the one before it for the others (a restart reads the message
    /// again, and the lane's positions skip the records it already applied).
    pub fn covers(&self) -> i64 {
        if self.last {
            self.offset
        } else {
            self.offset - 1
        }
    }

    pub fn kafka_ms(&self) -> Option<i64> {
        self.kafka_ms
    }

    pub fn taken_ms(&self) -> i64 {
        self.taken_ms
    }

    /// This record's bytes (the whole payload for a message of one record), sharing the
    /// message's buffer.
    pub fn payload(&self) -> Bytes {
        self.buf.slice(self.payload.clone())
    }

    pub fn key(&self) -> Option<&[u8]> {
        self.key.clone().map(|r| &self.buf[r])
    }

    /// The first header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers()
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v)
    }

    /// Every header, in order (names that are not UTF-8 are skipped: librdkafka only makes
    /// UTF-8 names). A record taken out of a batch names the content type of one record, which
    /// its payload is.
    pub fn headers(&self) -> impl Iterator<Item = (&str, Option<&[u8]>)> {
        self.headers.iter().filter_map(|(k, v)| {
            let name = std::str::from_utf8(&self.buf[k.clone()]).ok()?;
            if self.batched && name == wire::HEADER_CONTENT_TYPE {
                return Some((name, Some(wire::CONTENT_TYPE.as_bytes())));
            }
            Some((name, v.clone().map(|v| &self.buf[v])))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders, OwnedMessage, Timestamp};

    #[test]
    fn keeps_payload_key_and_headers() {
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "content-type",
                value: Some("x"),
            })
            .insert(Header::<&[u8]> {
                key: "empty",
                value: None,
            });
        let m = OwnedMessage::new(
            Some(b"payload".to_vec()),
            Some(b"k".to_vec()),
            "t".into(),
            Timestamp::CreateTime(1_000),
            3,
            42,
            Some(headers),
        );
        let i = Incoming::new(&m, 1_007);
        assert_eq!(i.offset(), 42);
        assert_eq!((i.kafka_ms(), i.taken_ms()), (Some(1_000), 1_007));
        assert_eq!(&i.payload()[..], b"payload");
        assert_eq!(i.key(), Some(&b"k"[..]));
        assert_eq!(i.header("content-type"), Some(&b"x"[..]));
        assert_eq!(i.header("empty"), None);
        assert_eq!(i.headers().count(), 2);
        let bare = OwnedMessage::new(None, None, "t".into(), Timestamp::NotAvailable, 0, 1, None);
        let i = Incoming::new(&bare, 0);
        assert!(i.payload().is_empty() && i.key().is_none() && i.headers().count() == 0);
        assert_eq!(i.kafka_ms(), None);
    }

    /// Each record of a batch is its own `Incoming`: its payload is that record alone (with the
    /// one-record content type, for a dead-letter copy), and only the last covers the offset.
    #[test]
    fn a_batch_becomes_one_incoming_per_record() {
        let record = |n| v1::Record {
            schema_version: proto::SCHEMA_VERSION,
            position: Some(proto::Position::new(1, n, 0).into()),
            body: Some(v1::record::Body::Heartbeat(v1::Heartbeat::default())),
            ..Default::default()
        };
        let mut value = Vec::new();
        for n in 1..=3 {
            wire::push_to_batch(&mut value, &wire::encode(&record(n)));
        }
        let headers = OwnedHeaders::new().insert(Header {
            key: wire::HEADER_CONTENT_TYPE,
            value: Some(wire::CONTENT_TYPE_BATCH),
        });
        let m = OwnedMessage::new(
            Some(value),
            Some(b"00001".to_vec()),
            "t".into(),
            Timestamp::CreateTime(1_000),
            0,
            10,
            Some(headers),
        );
        let mut records = Vec::new();
        Incoming::read_records(&m, 1_001, &mut records);
        assert_eq!(records.len(), 3);
        let covers: Vec<i64> = records.iter().map(|(i, _)| i.covers()).collect();
        assert_eq!(covers, [9, 9, 10]);
        for (n, (one, decoded)) in (1..=3).zip(&records) {
            assert_eq!(decoded.as_ref().unwrap(), &record(n));
            assert_eq!(one.offset(), 10);
            let alone = wire::decode(one.header(wire::HEADER_CONTENT_TYPE), &one.payload());
            assert_eq!(alone.unwrap(), record(n));
        }
        let foreign = OwnedMessage::new(
            Some(b"x".to_vec()),
            None,
            "t".into(),
            Timestamp::NotAvailable,
            0,
            11,
            None,
        );
        let mut records = Vec::new();
        Incoming::read_records(&foreign, 0, &mut records);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].0.covers(), 11);
        assert!(matches!(
            records[0].1,
            Err(DecodeError::ForeignContentType { .. })
        ));
    }
}
