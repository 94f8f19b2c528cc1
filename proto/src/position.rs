//! Positions: where a record sits in its source shard's history.

use crate::v1;
use std::fmt;

/// `(epoch, replication offset, sequence)`, compared lexicographically.
///
/// Invariant on the topic: positions are strictly increasing per source shard, and every copy of
/// a record written to several partitions carries the same position. A consumer that remembers
/// the last position it applied drops anything at or below it, which is what makes redelivery
/// after a crash harmless.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    /// Increases on every full resync.
    pub epoch: u64,
    /// Replication offset (of the byte after the command; the FULLRESYNC offset in a snapshot).
    pub offset: u64,
    /// Orders records that share an offset.
    pub sequence: u64,
}

impl Position {
    pub const fn new(epoch: u64, offset: u64, sequence: u64) -> Self {
        Position {
            epoch,
            offset,
            sequence,
        }
    }

    /// Compact text form `epoch:offset:sequence`, as stored in sink checkpoints.
    pub fn to_text(self) -> String {
        self.to_string()
    }

    /// Parses the text form written by [`Position::to_text`].
    pub fn parse(text: &str) -> Option<Position> {
        let mut it = text.split(':');
        let p = Position {
            epoch: it.next()?.parse().ok()?,
            offset: it.next()?.parse().ok()?,
            sequence: it.next()?.parse().ok()?,
        };
        it.next().is_none().then_some(p)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.epoch, self.offset, self.sequence)
    }
}

impl From<v1::Position> for Position {
    fn from(p: v1::Position) -> Self {
        Position {
            epoch: p.epoch,
            offset: p.offset,
            sequence: p.sequence,
        }
    }
}

impl From<Position> for v1::Position {
    fn from(p: Position) -> Self {
        v1::Position {
            epoch: p.epoch,
            offset: p.offset,
            sequence: p.sequence,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ordering_is_epoch_then_offset_then_sequence() {
        let a = Position::new(1, 100, 5);
        assert!(a < Position::new(1, 100, 6));
        assert!(a < Position::new(1, 101, 0));
        assert!(
            a < Position::new(2, 0, 0),
            "a new epoch supersedes any offset"
        );
        assert!(Position::new(1, 99, 1000) < a);
    }

    #[test]
    fn text_round_trip() {
        let p = Position::new(3, 123456789, 42);
        assert_eq!(Position::parse(&p.to_text()), Some(p));
        assert_eq!(Position::parse("1:2"), None);
        assert_eq!(Position::parse("1:2:3:4"), None);
        assert_eq!(Position::parse("a:2:3"), None);
    }
}
