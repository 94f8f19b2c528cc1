//! Cluster slots: `CRC16/XMODEM(key or its hash tag) mod 16384`, exactly as Redis Cluster computes
//! them (`keyHashSlot` in Redis's `cluster.c`).

use std::fmt;

/// Number of hash slots in Redis Cluster.
pub const SLOT_COUNT: u16 = 16384;

/// A Redis Cluster hash slot. Invariant: the value is below [`SLOT_COUNT`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slot(u16);

impl Slot {
    /// Returns the slot, or `None` when `n` is not below 16384.
    pub fn new(n: u16) -> Option<Slot> {
        (n < SLOT_COUNT).then_some(Slot(n))
    }

    pub fn get(self) -> u16 {
        self.0
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// CRC16/XMODEM (poly 0x1021, init 0, no reflection, no final xor).
pub fn crc16(data: &[u8]) -> u16 {
    const TABLE: [u16; 256] = {
        let mut table = [0u16; 256];
        let mut i = 0;
        while i < 256 {
            let mut crc = (i as u16) << 8;
            let mut bit = 0;
            while bit < 8 {
                crc = if crc & 0x8000 != 0 {
                    (crc << 1) ^ 0x1021
                } else {
                    crc << 1
                };
                bit += 1;
            }
            table[i] = crc;
            i += 1;
        }
        table
    };
    data.iter().fold(0u16, |crc, &b| {
        (crc << 8) ^ TABLE[(((crc >> 8) as u8) ^ b) as usize]
    })
}

/// The part of the key that is hashed: the bytes between the first `{` and the first `}` after
/// it, when that is non-empty; otherwise the whole key.
pub fn hash_tag(key: &[u8]) -> &[u8] {
    if let Some(open) = key.iter().position(|&b| b == b'{') {
        if let Some(len) = key[open + 1..].iter().position(|&b| b == b'}') {
            if len > 0 {
                return &key[open + 1..open + 1 + len];
            }
        }
    }
    key
}

/// The cluster slot of a key.
pub fn key_slot(key: &[u8]) -> Slot {
    Slot(crc16(hash_tag(key)) & (SLOT_COUNT - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc16_xmodem_check_value() {
        // The standard check value of CRC-16/XMODEM, also in Redis's crc16.c test.
        assert_eq!(crc16(b"123456789"), 0x31C3);
    }

    #[test]
    fn known_slots() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(key_slot(b"foo").get(), 12182);
        assert_eq!(key_slot(b"bar").get(), 5061);
        assert_eq!(key_slot(b"hello").get(), 866);
        assert_eq!(key_slot(b"").get(), 0);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"{user1000}.followers"), key_slot(b"user1000"));
    }

    #[test]
    fn hash_tag_rules() {
        assert_eq!(
            hash_tag(b"foo{}{bar}"),
            b"foo{}{bar}",
            "empty first tag: whole key"
        );
        assert_eq!(
            hash_tag(b"foo{{bar}}zap"),
            b"{bar",
            "tag runs to the first closing brace"
        );
        assert_eq!(
            hash_tag(b"foo{bar}{zap}"),
            b"bar",
            "only the first tag counts"
        );
        assert_eq!(hash_tag(b"foo{bar"), b"foo{bar", "unclosed: whole key");
        assert_eq!(hash_tag(b"}{x}"), b"x");
    }

    #[test]
    fn slot_invariant() {
        assert!(Slot::new(16383).is_some());
        assert!(Slot::new(16384).is_none());
    }
}
