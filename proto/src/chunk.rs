//! Chunking rules for big values (DESIGN §4).
//!
//! A key whose value does not fit in one record below the configured piece size is sent as a
//! [`crate::v1::KeyEntry`] with `chunked = true` followed by [`crate::v1::KeyChunk`]s with index
//! 1, 2, ... in order, the last one with `last = true`. The rules the sink relies on:
//!
//! - the first piece (the `KeyEntry`) **replaces** the key; later pieces **append** to it;
//! - a string is split into byte ranges, a collection into groups of whole elements;
//! - the TTL (`expire_at_ms`) is only carried, and applied, with the last piece, so a key never
//!   expires half-built;
//! - stream entries are split; the stream's metadata and consumer groups ride on the last piece;
//! - every piece has the key's slot, so all pieces land on one partition, in order;
//! - pieces are never interleaved with other records of the same slot.
//!
//! An element that alone exceeds the piece size travels alone in one piece; it must still fit in
//! the topic's maximum message size.

/// Default maximum size of one record's value: half of Kafka's default 1 MiB
/// `message.max.bytes`, leaving room for the envelope, headers and batch overhead.
pub const DEFAULT_PIECE_BYTES: usize = 512 * 1024;

/// Protobuf framing of one repeated bytes element, at most (tag + 10-byte varint length).
pub const ELEMENT_OVERHEAD_BYTES: usize = 11;

/// Groups elements into pieces whose summed cost stays within a byte budget.
///
/// `push` returns a full piece when adding the element would exceed the budget; `finish` returns
/// whatever is left. Memory is bounded by the budget plus one element.
#[derive(Debug)]
pub struct Chunker<T> {
    budget: usize,
    used: usize,
    items: Vec<T>,
}

impl<T> Chunker<T> {
    pub fn new(budget: usize) -> Self {
        Chunker {
            budget: budget.max(1),
            used: 0,
            items: Vec::new(),
        }
    }

    /// Adds an element that costs `cost` bytes. Returns the previous piece if this element did
    /// not fit in it.
    pub fn push(&mut self, item: T, cost: usize) -> Option<Vec<T>> {
        let cost = cost + ELEMENT_OVERHEAD_BYTES;
        let full = if !self.items.is_empty() && self.used + cost > self.budget {
            self.used = 0;
            Some(std::mem::take(&mut self.items))
        } else {
            None
        };
        self.used += cost;
        self.items.push(item);
        full
    }

    /// Bytes accounted to the piece being built.
    pub fn used(&self) -> usize {
        self.used
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Returns the remaining elements (possibly none).
    pub fn finish(&mut self) -> Vec<T> {
        self.used = 0;
        std::mem::take(&mut self.items)
    }
}

/// Splits a string value into byte ranges of at most `piece` bytes, in order. An empty string is
/// one empty piece.
pub fn string_pieces(len: usize, piece: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let piece = piece.max(1);
    let count = len.div_ceil(piece).max(1);
    (0..count).map(move |i| i * piece..((i + 1) * piece).min(len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunker_respects_budget_and_order() {
        let mut c = Chunker::new(100);
        let mut pieces = Vec::new();
        for i in 0..50u32 {
            if let Some(p) = c.push(i, 20) {
                pieces.push(p);
            }
        }
        pieces.push(c.finish());
        let flat: Vec<u32> = pieces.iter().flatten().copied().collect();
        assert_eq!(flat, (0..50).collect::<Vec<_>>());
        for p in &pieces {
            assert!(p.len() * (20 + ELEMENT_OVERHEAD_BYTES) <= 100);
        }
    }

    #[test]
    fn oversized_element_goes_alone() {
        let mut c = Chunker::new(100);
        assert!(c.push("a", 10).is_none());
        assert_eq!(c.push("big", 1000), Some(vec!["a"]));
        assert_eq!(c.push("b", 10), Some(vec!["big"]));
        assert_eq!(c.finish(), vec!["b"]);
    }

    #[test]
    fn string_ranges() {
        assert_eq!(string_pieces(0, 10).collect::<Vec<_>>(), vec![0..0]);
        assert_eq!(
            string_pieces(25, 10).collect::<Vec<_>>(),
            vec![0..10, 10..20, 20..25]
        );
        assert_eq!(
            string_pieces(20, 10).collect::<Vec<_>>(),
            vec![0..10, 10..20]
        );
    }
}
