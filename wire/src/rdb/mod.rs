//! RDB decoding: bytes in, items out, no I/O.
//!
//! - [`Decoder`] takes the file (or the replication transfer) in chunks of any size and returns
//!   [`Item`]s: header, aux fields, db selection, functions, and for each key a [`KeyHeader`],
//!   its value as ordered [`Piece`]s (bounded by [`Config::piece_bytes`]) and a [`KeyEnd`] with
//!   the DUMP payload for `RESTORE` when the value is small enough.
//! - [`assemble`] joins pieces back into whole values, for `rdb-dump` and tests.
//! - [`encodings`]: ziplist, listpack, intset, zipmap; [`lzf`]; [`crc64`].

pub mod assemble;
pub mod crc64;
mod decoder;
pub mod encodings;
pub mod lzf;

pub use decoder::{Config, Decoder};

use bytes::Bytes;

/// Highest RDB format version this decoder reads (Redis 7.4/8.0 write 12; Valkey 8 writes 11).
pub const MAX_RDB_VERSION: u32 = 12;

/// A stream entry id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct StreamId {
    pub ms: u64,
    pub seq: u64,
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.ms, self.seq)
    }
}

/// What the decoder produces, in file order.
#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    /// The `REDIS00NN` header.
    Header {
        version: u32,
    },
    Aux {
        key: Bytes,
        value: Bytes,
    },
    SelectDb {
        db: u32,
    },
    ResizeDb {
        keys: u64,
        expires: u64,
    },
    SlotInfo {
        slot: u64,
        keys: u64,
        expires: u64,
    },
    /// A function library (both the 7.0 and the pre-GA opcode), as its source code.
    Function {
        code: Bytes,
    },
    /// Module auxiliary data (kept opaque).
    ModuleAux {
        module_id: u64,
    },
    /// A key starts; its value follows as pieces, then [`Item::KeyEnd`].
    Key(KeyHeader),
    Piece(Piece),
    KeyEnd(KeyEnd),
    /// End of file; the checksum when the file has one (0 means checksums were off).
    End {
        checksum: Option<u64>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct KeyHeader {
    pub db: u32,
    pub key: Bytes,
    /// The object type byte (0, 2, 4, 5, 11-25 ...).
    pub rdb_type: u8,
    /// Absolute expiry, Unix ms.
    pub expire_ms: Option<i64>,
    pub lru_idle_s: Option<u64>,
    pub lfu_freq: Option<u8>,
}

impl KeyHeader {
    /// The logical type name: `string`, `list`, `set`, `zset`, `hash`, `stream` or `module`.
    pub fn type_name(&self) -> &'static str {
        type_name(self.rdb_type)
    }
}

/// Logical type of an RDB object type byte.
pub fn type_name(rdb_type: u8) -> &'static str {
    match rdb_type {
        0 => "string",
        1 | 10 | 14 | 18 => "list",
        2 | 11 | 20 => "set",
        3 | 5 | 12 | 17 => "zset",
        4 | 9 | 13 | 16 | 22..=25 => "hash",
        15 | 19 | 21 => "stream",
        _ => "module",
    }
}

/// A piece of a value. Pieces of one key are in order and all of one kind (streams: entries,
/// then meta, then groups).
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Bytes of a string, to be appended in order.
    String(Bytes),
    List(Vec<Bytes>),
    Set(Vec<Bytes>),
    ZSet(Vec<(Bytes, f64)>),
    /// field, value, field TTL (absolute Unix ms).
    Hash(Vec<(Bytes, Bytes, Option<i64>)>),
    StreamEntries(Vec<StreamEntry>),
    StreamMeta(StreamMeta),
    StreamGroup(StreamGroup),
    /// A module value; only its DUMP payload can carry it.
    Module {
        module_id: u64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct StreamEntry {
    pub id: StreamId,
    pub fields: Vec<(Bytes, Bytes)>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct StreamMeta {
    pub length: u64,
    pub last_id: StreamId,
    pub first_id: Option<StreamId>,
    pub max_deleted_id: Option<StreamId>,
    pub entries_added: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct StreamGroup {
    pub name: Bytes,
    pub last_delivered_id: StreamId,
    pub entries_read: Option<u64>,
    /// (id, consumer, delivery time ms, delivery count), by id.
    pub pending: Vec<(StreamId, Bytes, i64, u64)>,
    pub consumers: Vec<StreamConsumer>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct StreamConsumer {
    pub name: Bytes,
    pub seen_time_ms: i64,
    /// From RDB stream format 3 (Redis 7.2) on.
    pub active_time_ms: Option<i64>,
    pub pending: Vec<StreamId>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct KeyEnd {
    /// DUMP-format payload for `RESTORE` (type + value + RDB version + CRC64), when the value's
    /// encoded size is within [`Config::dump_limit_bytes`].
    pub dump: Option<Bytes>,
    /// Encoded size of the value in the file.
    pub encoded_bytes: u64,
}

/// Why decoding stopped. `offset` is the byte offset in the input where the problem is.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("rdb byte {offset}: {kind}")]
pub struct Error {
    pub offset: u64,
    pub kind: ErrorKind,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ErrorKind {
    #[error("not an RDB file: expected \"REDIS\" and a 4-digit version")]
    NotRdb,
    #[error("RDB version {0} is newer than the supported {MAX_RDB_VERSION}")]
    UnsupportedVersion(u32),
    #[error("unknown opcode or object type 0x{0:02x}")]
    UnknownType(u8),
    #[error("input ends inside {0}: the file is truncated")]
    Truncated(&'static str),
    #[error("checksum mismatch: file says {expected:016x}, content gives {computed:016x}")]
    CrcMismatch { expected: u64, computed: u64 },
    #[error("{what} of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        what: &'static str,
        len: u64,
        limit: u64,
    },
    #[error(transparent)]
    Encoding(#[from] encodings::EncodingError),
    #[error(transparent)]
    Lzf(#[from] lzf::LzfError),
    #[error("{0}")]
    Invalid(&'static str),
    #[error("data after the end of the RDB")]
    TrailingData,
}
