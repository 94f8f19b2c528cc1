//! A consumed message as a lane keeps it until its record is applied.
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
use rdkafka::message::{Headers, Message};
use std::ops::Range;

#[derive(Debug, Clone)]
pub struct Incoming {
    offset: i64,
    /// The message's Kafka timestamp (Unix ms): when the source connector produced it
    /// (`CreateTime`, librdkafka's default) or when the broker appended it (`LogAppendTime`).
    kafka_ms: Option<i64>,
    /// When the lane took the message from the consumer (Unix ms).
    taken_ms: i64,
    /// The payload, then the key, then the headers' names and values.
    buf: Bytes,
    payload_len: usize,
    key: Option<Range<usize>>,
    headers: Vec<(Range<usize>, Option<Range<usize>>)>,
}

impl Incoming {
    /// Copies `m`, taken by the lane at `taken_ms` (Unix ms).
    pub fn new<M: Message>(m: &M, taken_ms: i64) -> Incoming {
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
            kafka_ms: m.timestamp().to_millis(),
            taken_ms,
            buf: buf.freeze(),
            payload_len: payload.len(),
            key,
            headers,
        }
    }

    pub fn offset(&self) -> i64 {
        self.offset
    }

    pub fn kafka_ms(&self) -> Option<i64> {
        self.kafka_ms
    }

    pub fn taken_ms(&self) -> i64 {
        self.taken_ms
    }

    /// The payload, sharing this message's buffer.
    pub fn payload(&self) -> Bytes {
        self.buf.slice(..self.payload_len)
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
    /// UTF-8 names).
    pub fn headers(&self) -> impl Iterator<Item = (&str, Option<&[u8]>)> {
        self.headers.iter().filter_map(|(k, v)| {
            let name = std::str::from_utf8(&self.buf[k.clone()]).ok()?;
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
}
