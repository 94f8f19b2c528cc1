//! The streaming RDB decoder.
//!
//! Each step parses one bounded unit (an opcode, a key header, one element of a collection, one
//! quicklist or stream node, one consumer group, or up to `piece_bytes` of a big string) from the
//! buffered input. When the unit is not complete yet the step reports "need more input" and
//! leaves the buffer untouched, so feeding one byte at a time gives the same items as feeding the
//! whole file. Consumed input is dropped, so memory is bounded by the largest unit, not the file.

use super::encodings::{self, LpEntry};
use super::{
    crc64, lzf, Error, ErrorKind, Item, KeyEnd, KeyHeader, Piece, StreamConsumer, StreamEntry,
    StreamGroup, StreamId, StreamMeta, MAX_RDB_VERSION,
};
use bytes::Bytes;
use std::collections::VecDeque;

/// Limits of the decoder.
#[derive(Debug, Clone)]
pub struct Config {
    /// Target size of one value piece: strings are cut into pieces of this size, collections are
    /// grouped into pieces of about this many bytes.
    pub piece_bytes: usize,
    /// Largest unit that must be held whole: a key name, one collection element, one encoded
    /// blob (listpack, ziplist, intset), an LZF-compressed string, a consumer group. A declared
    /// length above it is an error rather than an allocation.
    pub max_unit_bytes: usize,
    /// Values whose encoded size is at most this get a DUMP payload for RESTORE.
    pub dump_limit_bytes: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            piece_bytes: proto::chunk::DEFAULT_PIECE_BYTES,
            // Redis caps a bulk string at 512 MB (proto-max-bulk-len); nothing legitimate is bigger.
            max_unit_bytes: 512 * 1024 * 1024,
            dump_limit_bytes: proto::chunk::DEFAULT_PIECE_BYTES,
        }
    }
}

/// Object type bytes.
mod t {
    pub const STRING: u8 = 0;
    pub const LIST: u8 = 1;
    pub const SET: u8 = 2;
    pub const ZSET: u8 = 3;
    pub const HASH: u8 = 4;
    pub const ZSET_2: u8 = 5;
    pub const MODULE_PRE_GA: u8 = 6;
    pub const MODULE_2: u8 = 7;
    pub const HASH_ZIPMAP: u8 = 9;
    pub const LIST_ZIPLIST: u8 = 10;
    pub const SET_INTSET: u8 = 11;
    pub const ZSET_ZIPLIST: u8 = 12;
    pub const HASH_ZIPLIST: u8 = 13;
    pub const LIST_QUICKLIST: u8 = 14;
    pub const STREAM_LISTPACKS: u8 = 15;
    pub const HASH_LISTPACK: u8 = 16;
    pub const ZSET_LISTPACK: u8 = 17;
    pub const LIST_QUICKLIST_2: u8 = 18;
    pub const STREAM_LISTPACKS_2: u8 = 19;
    pub const SET_LISTPACK: u8 = 20;
    pub const STREAM_LISTPACKS_3: u8 = 21;
    pub const HASH_METADATA_PRE_GA: u8 = 22;
    pub const HASH_LISTPACK_EX_PRE_GA: u8 = 23;
    pub const HASH_METADATA: u8 = 24;
    pub const HASH_LISTPACK_EX: u8 = 25;
}

/// Opcodes.
mod op {
    pub const SLOT_INFO: u8 = 0xF4;
    pub const FUNCTION2: u8 = 0xF5;
    pub const FUNCTION_PRE_GA: u8 = 0xF6;
    pub const MODULE_AUX: u8 = 0xF7;
    pub const IDLE: u8 = 0xF8;
    pub const FREQ: u8 = 0xF9;
    pub const AUX: u8 = 0xFA;
    pub const RESIZEDB: u8 = 0xFB;
    pub const EXPIRETIME_MS: u8 = 0xFC;
    pub const EXPIRETIME: u8 = 0xFD;
    pub const SELECTDB: u8 = 0xFE;
    pub const EOF: u8 = 0xFF;
}

/// Why a step did not produce anything.
enum Stop {
    /// The unit is not complete in the buffer.
    More(&'static str),
    /// The input is wrong at this position (relative to the step's start).
    Bad(usize, ErrorKind),
}

type R<T> = Result<T, Stop>;

/// A read position in the buffered input.
struct Cur<'a> {
    data: &'a [u8],
    pos: usize,
    /// On "need more input": how many bytes the unit needs at least.
    need: usize,
    /// What is being read, for the "truncated inside ..." message.
    what: &'static str,
}

impl<'a> Cur<'a> {
    fn bad<T>(&self, kind: ErrorKind) -> R<T> {
        Err(Stop::Bad(self.pos, kind))
    }

    fn take(&mut self, n: usize) -> R<&'a [u8]> {
        match self.pos.checked_add(n) {
            Some(end) if end <= self.data.len() => {
                let s = &self.data[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            _ => {
                self.need = self.pos.saturating_add(n);
                Err(Stop::More(self.what))
            }
        }
    }

    fn u8(&mut self) -> R<u8> {
        Ok(self.take(1)?[0])
    }

    fn arr<const N: usize>(&mut self) -> R<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u64_le(&mut self) -> R<u64> {
        Ok(u64::from_le_bytes(self.arr()?))
    }

    /// A length, or the special encoding number for `11xxxxxx` strings.
    fn length_or_special(&mut self) -> R<Result<u64, u8>> {
        let first = self.u8()?;
        Ok(match first >> 6 {
            0 => Ok(u64::from(first & 0x3F)),
            1 => Ok((u64::from(first & 0x3F) << 8) | u64::from(self.u8()?)),
            2 => match first {
                0x80 => Ok(u64::from(u32::from_be_bytes(self.arr()?))),
                0x81 => Ok(u64::from_be_bytes(self.arr()?)),
                _ => return self.bad(ErrorKind::Invalid("invalid length encoding")),
            },
            _ => Err(first & 0x3F),
        })
    }

    fn length(&mut self) -> R<u64> {
        match self.length_or_special()? {
            Ok(n) => Ok(n),
            Err(_) => self.bad(ErrorKind::Invalid(
                "expected a length, found an encoded string",
            )),
        }
    }

    /// A string: raw, integer-encoded (as decimal text) or LZF-compressed.
    fn string(&mut self, limit: usize) -> R<Bytes> {
        let start = self.pos;
        let too_large = |what, len| {
            Err(Stop::Bad(
                start,
                ErrorKind::TooLarge {
                    what,
                    len,
                    limit: limit as u64,
                },
            ))
        };
        match self.length_or_special()? {
            Ok(n) => {
                if n > limit as u64 {
                    return too_large("string", n);
                }
                Ok(Bytes::copy_from_slice(self.take(n as usize)?))
            }
            Err(0) => Ok(Bytes::from((self.u8()? as i8).to_string())),
            Err(1) => Ok(Bytes::from(i16::from_le_bytes(self.arr()?).to_string())),
            Err(2) => Ok(Bytes::from(i32::from_le_bytes(self.arr()?).to_string())),
            Err(3) => {
                let clen = self.length()?;
                let len = self.length()?;
                for (what, n) in [("compressed string", clen), ("decompressed string", len)] {
                    if n > limit as u64 {
                        return too_large(what, n);
                    }
                }
                let at = self.pos;
                let data = self.take(clen as usize)?;
                lzf::decompress(data, len as usize)
                    .map(Bytes::from)
                    .map_err(|e| Stop::Bad(at, e.into()))
            }
            Err(_) => self.bad(ErrorKind::Invalid("unknown string encoding")),
        }
    }

    fn stream_id_raw(&mut self) -> R<StreamId> {
        let raw: [u8; 16] = self.arr()?;
        Ok(StreamId {
            ms: u64::from_be_bytes(raw[..8].try_into().expect("8 bytes")),
            seq: u64::from_be_bytes(raw[8..].try_into().expect("8 bytes")),
        })
    }

    fn stream_id_lens(&mut self) -> R<StreamId> {
        Ok(StreamId {
            ms: self.length()?,
            seq: self.length()?,
        })
    }

    /// A module value body: opcodes until `EOF` (kept opaque).
    fn module_opcodes(&mut self, limit: usize) -> R<()> {
        loop {
            match self.length()? {
                0 => return Ok(()),
                1 | 2 => {
                    self.length()?;
                }
                3 => {
                    self.take(4)?;
                }
                4 => {
                    self.take(8)?;
                }
                5 => {
                    self.string(limit)?;
                }
                _ => return self.bad(ErrorKind::Invalid("unknown module value opcode")),
            }
        }
    }
}

/// A collection read element by element.
#[derive(Debug, Clone, Copy)]
enum Elem {
    List,
    Set,
    /// `binary`: ZSET_2 scores are 8-byte doubles; ZSET scores are text.
    ZSet {
        binary: bool,
    },
    Hash,
    /// Hash with field TTLs. `min_expire`: the GA format stores TTLs relative to it.
    HashTtl {
        min_expire: Option<u64>,
    },
}

#[derive(Debug, Clone, Copy)]
enum Value {
    Begin,
    RawString {
        remaining: u64,
    },
    /// A big LZF-compressed string, expanded piece by piece by `Decoder::lzf`.
    LzfString,
    Elements {
        remaining: u64,
        elem: Elem,
    },
    Quicklist {
        remaining: u64,
        v2: bool,
    },
    StreamNodes {
        remaining: u64,
    },
    StreamMeta,
    StreamGroups {
        remaining: u64,
    },
    End,
}

#[derive(Debug, Clone, Copy)]
enum State {
    Magic,
    Top,
    Value(Value),
    Checksum,
    Done,
}

/// What one top-level step read.
enum Top {
    Item(Item),
    Key(KeyHeader),
    Expire(i64),
    Idle(u64),
    Freq(u8),
    Eof,
}

/// Per-key metadata opcodes seen before the key.
#[derive(Debug, Default)]
struct Meta {
    expire_ms: Option<i64>,
    idle: Option<u64>,
    freq: Option<u8>,
}

/// The key being decoded.
#[derive(Debug)]
struct Current {
    rdb_type: u8,
    /// The value's bytes as read, for the DUMP payload; `None` once over the limit.
    dump: Option<Vec<u8>>,
    encoded: u64,
    piece: Option<Piece>,
    piece_cost: usize,
}

/// The streaming decoder. See the module documentation.
#[derive(Debug)]
pub struct Decoder {
    config: Config,
    buf: Vec<u8>,
    start: usize,
    /// Absolute offset of `buf[start]`.
    offset: u64,
    crc: u64,
    version: u32,
    db: u32,
    state: State,
    meta: Meta,
    current: Option<Current>,
    ready: VecDeque<Item>,
    failed: Option<Error>,
    /// Bytes the current unit needs before it is worth parsing again.
    need: usize,
    /// The big compressed string being expanded (`Value::LzfString`).
    lzf: Option<lzf::Expander>,
}

impl Decoder {
    pub fn new(config: Config) -> Decoder {
        Decoder {
            config,
            buf: Vec::new(),
            start: 0,
            offset: 0,
            crc: 0,
            version: 0,
            db: 0,
            state: State::Magic,
            meta: Meta::default(),
            current: None,
            ready: VecDeque::new(),
            failed: None,
            need: 0,
            lzf: None,
        }
    }

    /// The RDB version from the header (0 until it has been read).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Bytes consumed so far (the offset of the next unread byte).
    pub fn position(&self) -> u64 {
        self.offset
    }

    /// Bytes buffered but not consumed yet.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// True once the EOF opcode and checksum have been read.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done) && self.ready.is_empty()
    }

    /// Bytes fed after the end of the RDB (the `$EOF:` mark and the command stream, in a
    /// replication transfer). [`Decoder::finish`] treats them as an error.
    pub fn trailing(&self) -> &[u8] {
        if matches!(self.state, State::Done) {
            &self.buf[self.start..]
        } else {
            &[]
        }
    }

    /// Adds input.
    pub fn feed(&mut self, data: &[u8]) {
        if self.start > 0 && (self.start >= self.buf.len() / 2 || self.start > 1 << 20) {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next item, `Ok(None)` when more input is needed (or the file is done).
    pub fn next_item(&mut self) -> Result<Option<Item>, Error> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        loop {
            if let Some(item) = self.ready.pop_front() {
                return Ok(Some(item));
            }
            if matches!(self.state, State::Done) {
                return Ok(None);
            }
            if self.buffered() < self.need {
                return Ok(None);
            }
            match self.step() {
                Ok(()) => self.need = 0,
                Err(Stop::More(_)) => return Ok(None),
                Err(Stop::Bad(at, kind)) => return Err(self.fail(at, kind)),
            }
        }
    }

    /// Call when the input has ended: an error unless the RDB was complete.
    pub fn finish(&mut self) -> Result<(), Error> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if matches!(self.state, State::Done) {
            if self.buffered() > 0 {
                return Err(self.fail(0, ErrorKind::TrailingData));
            }
            return Ok(());
        }
        let what = match self.step() {
            Err(Stop::More(what)) => what,
            _ => "the file",
        };
        Err(self.fail(self.buffered(), ErrorKind::Truncated(what)))
    }

    fn fail(&mut self, at: usize, kind: ErrorKind) -> Error {
        let e = Error {
            offset: self.offset + at as u64,
            kind,
        };
        self.failed = Some(e.clone());
        e
    }

    /// Consumes `n` bytes: checksum, DUMP capture, buffer position.
    fn commit(&mut self, n: usize) {
        let bytes = &self.buf[self.start..self.start + n];
        if !matches!(self.state, State::Checksum) {
            self.crc = crc64::update(self.crc, bytes);
        }
        if let Some(cur) = &mut self.current {
            cur.encoded += n as u64;
            if let Some(d) = &mut cur.dump {
                if d.len() + n <= self.config.dump_limit_bytes {
                    d.extend_from_slice(bytes);
                } else {
                    cur.dump = None;
                }
            }
        }
        self.start += n;
        self.offset += n as u64;
    }

    /// Runs `f` over the unconsumed input; on success commits what it read.
    fn parse<T>(&mut self, what: &'static str, f: impl FnOnce(&mut Cur, &Config) -> R<T>) -> R<T> {
        let mut cur = Cur {
            data: &self.buf[self.start..],
            pos: 0,
            need: 0,
            what,
        };
        let v = match f(&mut cur, &self.config) {
            Ok(v) => v,
            Err(e) => {
                // Do not re-parse the unit until at least this much input is there, so a big
                // unit arriving in small reads costs linear, not quadratic, time.
                self.need = cur.need;
                return Err(e);
            }
        };
        let n = cur.pos;
        self.commit(n);
        Ok(v)
    }

    fn step(&mut self) -> R<()> {
        match self.state {
            State::Magic => {
                let version = self.parse("the header", |c, _| {
                    let head = c.take(9)?;
                    if &head[..5] != b"REDIS" || !head[5..].iter().all(u8::is_ascii_digit) {
                        return Err(Stop::Bad(0, ErrorKind::NotRdb));
                    }
                    let v: u32 = std::str::from_utf8(&head[5..])
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0);
                    if v == 0 || v > MAX_RDB_VERSION {
                        return Err(Stop::Bad(5, ErrorKind::UnsupportedVersion(v)));
                    }
                    Ok(v)
                })?;
                self.version = version;
                self.state = State::Top;
                self.ready.push_back(Item::Header { version });
                Ok(())
            }
            State::Top => self.top(),
            State::Value(v) => {
                self.state = match self.value(v)? {
                    Some(next) => State::Value(next),
                    None => State::Top,
                };
                Ok(())
            }
            State::Checksum => {
                let computed = self.crc;
                let expected = self.parse("the checksum", |c, _| c.u64_le())?;
                if expected != 0 && expected != computed {
                    // Point at the checksum itself.
                    self.offset -= 8;
                    let e = Stop::Bad(0, ErrorKind::CrcMismatch { expected, computed });
                    return Err(e);
                }
                self.state = State::Done;
                self.ready.push_back(Item::End {
                    checksum: Some(expected),
                });
                Ok(())
            }
            State::Done => Ok(()),
        }
    }

    /// One top-level opcode or key header.
    fn top(&mut self) -> R<()> {
        let db = self.db;
        let top = self.parse("an opcode", |c, cfg| {
            let opcode = c.u8()?;
            let lim = cfg.max_unit_bytes;
            Ok(match opcode {
                op::AUX => Top::Item(Item::Aux {
                    key: c.string(lim)?,
                    value: c.string(lim)?,
                }),
                op::SELECTDB => {
                    let db = c.length()?;
                    let db = u32::try_from(db)
                        .or_else(|_| c.bad(ErrorKind::Invalid("db number out of range")))?;
                    Top::Item(Item::SelectDb { db })
                }
                op::RESIZEDB => Top::Item(Item::ResizeDb {
                    keys: c.length()?,
                    expires: c.length()?,
                }),
                op::SLOT_INFO => Top::Item(Item::SlotInfo {
                    slot: c.length()?,
                    keys: c.length()?,
                    expires: c.length()?,
                }),
                op::FUNCTION2 => Top::Item(Item::Function {
                    code: c.string(lim)?,
                }),
                op::FUNCTION_PRE_GA => {
                    let _name = c.string(lim)?;
                    let _engine = c.string(lim)?;
                    if c.length()? != 0 {
                        let _description = c.string(lim)?;
                    }
                    Top::Item(Item::Function {
                        code: c.string(lim)?,
                    })
                }
                op::MODULE_AUX => {
                    let module_id = c.length()?;
                    if c.length()? != 2 {
                        return c.bad(ErrorKind::Invalid(
                            "module aux 'when' is not an unsigned integer",
                        ));
                    }
                    c.length()?;
                    c.module_opcodes(lim)?;
                    Top::Item(Item::ModuleAux { module_id })
                }
                op::EXPIRETIME_MS => Top::Expire(c.u64_le()? as i64),
                op::EXPIRETIME => Top::Expire(i64::from(u32::from_le_bytes(c.arr()?)) * 1000),
                op::IDLE => Top::Idle(c.length()?),
                op::FREQ => Top::Freq(c.u8()?),
                op::EOF => Top::Eof,
                ty if is_object_type(ty) => {
                    let key = c.string(lim)?;
                    Top::Key(KeyHeader {
                        db,
                        key,
                        rdb_type: ty,
                        expire_ms: None,
                        lru_idle_s: None,
                        lfu_freq: None,
                    })
                }
                other => return Err(Stop::Bad(0, ErrorKind::UnknownType(other))),
            })
        })?;
        match top {
            Top::Eof if self.version >= 5 => self.state = State::Checksum,
            Top::Eof => {
                self.state = State::Done;
                self.ready.push_back(Item::End { checksum: None });
            }
            Top::Expire(ms) => self.meta.expire_ms = Some(ms),
            Top::Idle(s) => self.meta.idle = Some(s),
            Top::Freq(f) => self.meta.freq = Some(f),
            Top::Item(Item::SelectDb { db }) => {
                self.db = db;
                self.ready.push_back(Item::SelectDb { db });
            }
            Top::Item(item) => self.ready.push_back(item),
            Top::Key(mut header) => {
                let meta = std::mem::take(&mut self.meta);
                header.expire_ms = meta.expire_ms;
                header.lru_idle_s = meta.idle;
                header.lfu_freq = meta.freq;
                self.current = Some(Current {
                    rdb_type: header.rdb_type,
                    dump: Some({
                        // Most values are small: room for one, its trailer and no regrowth.
                        let mut d = Vec::with_capacity(64);
                        d.push(header.rdb_type);
                        d
                    }),
                    encoded: 0,
                    piece: None,
                    piece_cost: 0,
                });
                self.state = State::Value(Value::Begin);
                self.ready.push_back(Item::Key(header));
            }
        }
        Ok(())
    }

    fn rdb_type(&self) -> u8 {
        self.current.as_ref().map_or(0, |c| c.rdb_type)
    }

    /// One unit of the current value; returns the next value state.
    fn value(&mut self, v: Value) -> R<Option<Value>> {
        let ty = self.rdb_type();
        let next: R<Value> = match v {
            Value::Begin => self.value_begin(ty),
            Value::RawString { remaining } => {
                let piece = self.config.piece_bytes as u64;
                let avail = self.buffered() as u64;
                let n = remaining.min(piece);
                if avail < n {
                    return Err(Stop::More("a string value"));
                }
                let bytes = self.parse("a string value", |c, _| {
                    Ok(Bytes::copy_from_slice(c.take(n as usize)?))
                })?;
                self.ready.push_back(Item::Piece(Piece::String(bytes)));
                let remaining = remaining - n;
                Ok(if remaining == 0 {
                    Value::End
                } else {
                    Value::RawString { remaining }
                })
            }
            Value::LzfString => {
                let piece_bytes = self.config.piece_bytes;
                let Some(expander) = self.lzf.as_mut() else {
                    return Err(Stop::Bad(
                        0,
                        ErrorKind::Invalid("no compressed string to expand"),
                    ));
                };
                let piece = expander
                    .next_piece(piece_bytes)
                    .map_err(|e| Stop::Bad(0, e.into()))?;
                let done = expander.is_done();
                self.ready
                    .push_back(Item::Piece(Piece::String(Bytes::from(piece))));
                if done {
                    self.lzf = None;
                    Ok(Value::End)
                } else {
                    Ok(Value::LzfString)
                }
            }
            Value::Elements { remaining: 0, .. } => Ok(Value::End),
            Value::Elements { remaining, elem } => {
                let piece = self.parse("a collection element", |c, cfg| {
                    let lim = cfg.max_unit_bytes;
                    Ok(match elem {
                        Elem::List => Piece::List(vec![c.string(lim)?]),
                        Elem::Set => Piece::Set(vec![c.string(lim)?]),
                        Elem::ZSet { binary } => {
                            let m = c.string(lim)?;
                            let score = if binary {
                                f64::from_le_bytes(c.arr()?)
                            } else {
                                text_double(c)?
                            };
                            Piece::ZSet(vec![(m, score)])
                        }
                        Elem::Hash => Piece::Hash(vec![(c.string(lim)?, c.string(lim)?, None)]),
                        Elem::HashTtl { min_expire } => {
                            let at = c.pos;
                            let ttl = match (c.length()?, min_expire) {
                                (0, _) => None,
                                // GA format: stored relative to the hash's smallest TTL, plus 1.
                                (t, Some(min)) => Some(t.checked_add(min).map(|v| v - 1)),
                                (t, None) => Some(Some(t)),
                            };
                            let ttl = match ttl {
                                None => None,
                                Some(Some(ms)) if ms <= i64::MAX as u64 => Some(ms as i64),
                                Some(_) => {
                                    let kind = ErrorKind::Invalid("hash field TTL out of range");
                                    return Err(Stop::Bad(at, kind));
                                }
                            };
                            Piece::Hash(vec![(c.string(lim)?, c.string(lim)?, ttl)])
                        }
                    })
                })?;
                self.push_piece(piece);
                Ok(if remaining == 1 {
                    Value::End
                } else {
                    Value::Elements {
                        remaining: remaining - 1,
                        elem,
                    }
                })
            }
            Value::Quicklist { remaining: 0, .. } => Ok(Value::End),
            Value::Quicklist { remaining, v2 } => {
                let elems = self.parse("a quicklist node", |c, cfg| {
                    let container = if v2 { c.length()? } else { 2 };
                    let at = c.pos;
                    let blob = c.string(cfg.max_unit_bytes)?;
                    match container {
                        1 => Ok(vec![blob]),
                        2 if v2 => encodings::listpack(&blob).map_err(|e| Stop::Bad(at, e.into())),
                        2 => encodings::ziplist(&blob).map_err(|e| Stop::Bad(at, e.into())),
                        _ => c.bad(ErrorKind::Invalid("unknown quicklist container")),
                    }
                })?;
                if elems.is_empty() {
                    return Err(Stop::Bad(0, ErrorKind::Invalid("empty quicklist node")));
                }
                self.push_piece(Piece::List(elems));
                Ok(if remaining == 1 {
                    Value::End
                } else {
                    Value::Quicklist {
                        remaining: remaining - 1,
                        v2,
                    }
                })
            }
            Value::StreamNodes { remaining: 0 } => Ok(Value::StreamMeta),
            Value::StreamNodes { remaining } => {
                let entries = self.parse("a stream node", |c, cfg| {
                    let at = c.pos;
                    let key = c.string(cfg.max_unit_bytes)?;
                    if key.len() != 16 {
                        return Err(Stop::Bad(
                            at,
                            ErrorKind::Invalid("stream node key is not a 16-byte id"),
                        ));
                    }
                    let master = StreamId {
                        ms: u64::from_be_bytes(key[..8].try_into().expect("8")),
                        seq: u64::from_be_bytes(key[8..].try_into().expect("8")),
                    };
                    let at = c.pos;
                    let blob = c.string(cfg.max_unit_bytes)?;
                    stream_node(master, &blob).map_err(|k| Stop::Bad(at, k))
                })?;
                if !entries.is_empty() {
                    self.push_piece(Piece::StreamEntries(entries));
                }
                Ok(Value::StreamNodes {
                    remaining: remaining - 1,
                })
            }
            Value::StreamMeta => {
                let (meta, groups) = self.parse("stream metadata", |c, _| {
                    let length = c.length()?;
                    let last_id = c.stream_id_lens()?;
                    let mut meta = StreamMeta {
                        length,
                        last_id,
                        ..Default::default()
                    };
                    if ty >= t::STREAM_LISTPACKS_2 {
                        meta.first_id = Some(c.stream_id_lens()?);
                        meta.max_deleted_id = Some(c.stream_id_lens()?);
                        meta.entries_added = Some(c.length()?);
                    }
                    Ok((meta, c.length()?))
                })?;
                self.flush_piece();
                self.ready.push_back(Item::Piece(Piece::StreamMeta(meta)));
                Ok(if groups == 0 {
                    Value::End
                } else {
                    Value::StreamGroups { remaining: groups }
                })
            }
            Value::StreamGroups { remaining } => {
                let group =
                    self.parse("a stream consumer group", |c, cfg| stream_group(c, cfg, ty))?;
                self.ready.push_back(Item::Piece(Piece::StreamGroup(group)));
                Ok(if remaining == 1 {
                    Value::End
                } else {
                    Value::StreamGroups {
                        remaining: remaining - 1,
                    }
                })
            }
            Value::End => {
                self.flush_piece();
                let cur = self.current.take().expect("a key is being decoded");
                let dump = cur.dump.map(|mut d| {
                    d.extend_from_slice(&(self.version as u16).to_le_bytes());
                    let crc = crc64::checksum(&d);
                    d.extend_from_slice(&crc.to_le_bytes());
                    Bytes::from(d)
                });
                if cur.rdb_type == t::MODULE_2 && dump.is_none() {
                    return Err(Stop::Bad(
                        0,
                        ErrorKind::TooLarge {
                            what: "module value (carried only as a DUMP payload)",
                            len: cur.encoded,
                            limit: self.config.dump_limit_bytes as u64,
                        },
                    ));
                }
                self.ready.push_back(Item::KeyEnd(KeyEnd {
                    dump,
                    encoded_bytes: cur.encoded,
                }));
                return Ok(None);
            }
        };
        next.map(Some)
    }

    fn value_begin(&mut self, ty: u8) -> R<Value> {
        let piece_bytes = self.config.piece_bytes;
        match ty {
            t::STRING => {
                // Big strings stream in pieces, raw ones straight from the input and LZF ones
                // through an expander that keeps only the compressed bytes and an 8 KiB window;
                // everything else is read whole.
                enum Big {
                    Raw(u64),
                    Lzf(Vec<u8>, usize),
                }
                let big = self.parse("a string length", |c, cfg| {
                    let mut probe = Cur {
                        data: c.data,
                        pos: c.pos,
                        need: 0,
                        what: c.what,
                    };
                    match probe.length_or_special()? {
                        Ok(n) if n > piece_bytes as u64 => {
                            c.pos = probe.pos;
                            Ok(Some(Big::Raw(n)))
                        }
                        Err(3) => {
                            let clen = probe.length()?;
                            let len = probe.length()?;
                            if len <= piece_bytes as u64 {
                                return Ok(None);
                            }
                            let limit = cfg.max_unit_bytes as u64;
                            if clen > limit {
                                return probe.bad(ErrorKind::TooLarge {
                                    what: "compressed string",
                                    len: clen,
                                    limit,
                                });
                            }
                            let Ok(len) = usize::try_from(len) else {
                                return probe.bad(ErrorKind::Invalid("string length out of range"));
                            };
                            c.pos = probe.pos;
                            let data = c.take(clen as usize)?.to_vec();
                            Ok(Some(Big::Lzf(data, len)))
                        }
                        _ => Ok(None),
                    }
                })?;
                match big {
                    Some(Big::Raw(n)) => return Ok(Value::RawString { remaining: n }),
                    Some(Big::Lzf(data, len)) => {
                        self.lzf = Some(lzf::Expander::new(data, len));
                        return Ok(Value::LzfString);
                    }
                    None => {}
                }
                let s = self.parse("a string value", |c, cfg| c.string(cfg.max_unit_bytes))?;
                self.ready.push_back(Item::Piece(Piece::String(s)));
                Ok(Value::End)
            }
            t::LIST | t::SET | t::ZSET | t::HASH | t::ZSET_2 | t::HASH_METADATA_PRE_GA => {
                let n = self.parse("a collection length", |c, _| c.length())?;
                let elem = match ty {
                    t::LIST => Elem::List,
                    t::SET => Elem::Set,
                    t::ZSET => Elem::ZSet { binary: false },
                    t::ZSET_2 => Elem::ZSet { binary: true },
                    t::HASH => Elem::Hash,
                    _ => Elem::HashTtl { min_expire: None },
                };
                Ok(Value::Elements { remaining: n, elem })
            }
            t::HASH_METADATA => {
                let (min, n) =
                    self.parse("a hash header", |c, _| Ok((c.u64_le()?, c.length()?)))?;
                Ok(Value::Elements {
                    remaining: n,
                    elem: Elem::HashTtl {
                        min_expire: Some(min),
                    },
                })
            }
            t::LIST_QUICKLIST | t::LIST_QUICKLIST_2 => {
                let n = self.parse("a quicklist length", |c, _| c.length())?;
                Ok(Value::Quicklist {
                    remaining: n,
                    v2: ty == t::LIST_QUICKLIST_2,
                })
            }
            t::STREAM_LISTPACKS | t::STREAM_LISTPACKS_2 | t::STREAM_LISTPACKS_3 => {
                let n = self.parse("a stream node count", |c, _| c.length())?;
                Ok(Value::StreamNodes { remaining: n })
            }
            t::MODULE_2 => {
                let id = self.parse("a module value", |c, cfg| {
                    let id = c.length()?;
                    c.module_opcodes(cfg.max_unit_bytes)?;
                    Ok(id)
                })?;
                self.ready
                    .push_back(Item::Piece(Piece::Module { module_id: id }));
                Ok(Value::End)
            }
            t::MODULE_PRE_GA => Err(Stop::Bad(
                0,
                ErrorKind::Invalid(
                    "module value in the pre-GA format (type 6) cannot be read without the module",
                ),
            )),
            _ => {
                // Encoded blobs: read whole, then split into pieces.
                let piece = self.parse("an encoded value", |c, cfg| {
                    if ty == t::HASH_LISTPACK_EX {
                        // The hash's smallest field TTL: derivable from the triplets, so skipped.
                        c.u64_le()?;
                    }
                    let at = c.pos;
                    let blob = c.string(cfg.max_unit_bytes)?;
                    blob_piece(ty, &blob).map_err(|k| Stop::Bad(at, k))
                })?;
                self.push_piece(piece);
                Ok(Value::End)
            }
        }
    }

    /// Adds elements to the piece being built; emits it when it reaches `piece_bytes`.
    fn push_piece(&mut self, piece: Piece) {
        let limit = self.config.piece_bytes;
        let cur = self.current.as_mut().expect("a key is being decoded");
        cur.piece_cost += piece_cost(&piece);
        match (&mut cur.piece, piece) {
            (None, p) => cur.piece = Some(p),
            (Some(Piece::List(a)), Piece::List(b)) | (Some(Piece::Set(a)), Piece::Set(b)) => {
                a.extend(b)
            }
            (Some(Piece::ZSet(a)), Piece::ZSet(b)) => a.extend(b),
            (Some(Piece::Hash(a)), Piece::Hash(b)) => a.extend(b),
            (Some(Piece::StreamEntries(a)), Piece::StreamEntries(b)) => a.extend(b),
            (Some(_), p) => {
                let old = cur.piece.replace(p);
                self.ready.extend(old.map(Item::Piece));
            }
        }
        if self.current.as_ref().is_some_and(|c| c.piece_cost >= limit) {
            self.flush_piece();
        }
    }

    fn flush_piece(&mut self) {
        if let Some(cur) = &mut self.current {
            cur.piece_cost = 0;
            if let Some(p) = cur.piece.take() {
                self.ready.push_back(Item::Piece(p));
            }
        }
    }
}

fn is_object_type(b: u8) -> bool {
    matches!(b, 0..=7 | 9..=25)
}

/// Approximate in-memory size of a piece, for grouping.
fn piece_cost(p: &Piece) -> usize {
    const E: usize = proto::chunk::ELEMENT_OVERHEAD_BYTES;
    match p {
        Piece::String(s) => s.len(),
        Piece::List(v) | Piece::Set(v) => v.iter().map(|e| e.len() + E).sum(),
        Piece::ZSet(v) => v.iter().map(|(m, _)| m.len() + 8 + E).sum(),
        Piece::Hash(v) => v
            .iter()
            .map(|(f, v, _)| f.len() + v.len() + 8 + 2 * E)
            .sum(),
        Piece::StreamEntries(v) => v
            .iter()
            .map(|e| {
                16 + e
                    .fields
                    .iter()
                    .map(|(f, v)| f.len() + v.len() + 2 * E)
                    .sum::<usize>()
            })
            .sum(),
        _ => 0,
    }
}

/// A ZSET (type 3) score: one length byte, then text (253 NaN, 254 +inf, 255 -inf).
fn text_double(c: &mut Cur) -> R<f64> {
    let len = c.u8()?;
    Ok(match len {
        253 => f64::NAN,
        254 => f64::INFINITY,
        255 => f64::NEG_INFINITY,
        n => {
            let at = c.pos;
            let text = c.take(n as usize)?;
            std::str::from_utf8(text)
                .ok()
                .and_then(|s| s.parse::<f64>().ok())
                .ok_or(Stop::Bad(
                    at,
                    ErrorKind::Invalid("zset score is not a number"),
                ))?
        }
    })
}

fn parse_score(b: &[u8]) -> Result<f64, ErrorKind> {
    std::str::from_utf8(b)
        .ok()
        .and_then(|s| match s {
            "inf" | "+inf" => Some(f64::INFINITY),
            "-inf" => Some(f64::NEG_INFINITY),
            _ => s.parse().ok(),
        })
        .ok_or(ErrorKind::Invalid("zset score is not a number"))
}

/// Pairs up `elems` (field, value, field, value...) as `f` makes them.
fn pairs<T>(
    elems: Vec<Bytes>,
    mut f: impl FnMut(Bytes, Bytes) -> Result<T, ErrorKind>,
) -> Result<Vec<T>, ErrorKind> {
    if !elems.len().is_multiple_of(2) {
        return Err(ErrorKind::Invalid(
            "odd number of elements in a pair encoding",
        ));
    }
    let mut out = Vec::with_capacity(elems.len() / 2);
    let mut it = elems.into_iter();
    while let (Some(a), Some(b)) = (it.next(), it.next()) {
        out.push(f(a, b)?);
    }
    Ok(out)
}

/// Hash fields without TTLs.
fn hash_pairs(elems: Vec<Bytes>) -> Result<Piece, ErrorKind> {
    pairs(elems, |f, v| Ok((f, v, None))).map(Piece::Hash)
}

/// Decodes an encoded blob value into one piece.
fn blob_piece(ty: u8, blob: &Bytes) -> Result<Piece, ErrorKind> {
    Ok(match ty {
        t::HASH_ZIPMAP => hash_pairs(encodings::zipmap(blob)?)?,
        t::LIST_ZIPLIST => Piece::List(encodings::ziplist(blob)?),
        t::SET_INTSET => Piece::Set(encodings::intset(blob)?),
        t::SET_LISTPACK => Piece::Set(encodings::listpack(blob)?),
        t::ZSET_ZIPLIST | t::ZSET_LISTPACK => {
            let elems = if ty == t::ZSET_ZIPLIST {
                encodings::ziplist(blob)?
            } else {
                encodings::listpack(blob)?
            };
            Piece::ZSet(pairs(elems, |m, s| Ok((m, parse_score(&s)?)))?)
        }
        t::HASH_ZIPLIST => hash_pairs(encodings::ziplist(blob)?)?,
        t::HASH_LISTPACK => hash_pairs(encodings::listpack(blob)?)?,
        t::HASH_LISTPACK_EX | t::HASH_LISTPACK_EX_PRE_GA => {
            // TTLs in the listpack are absolute in both formats.
            let mut entries = Vec::new();
            encodings::listpack_each(blob, |e| entries.push(e))?;
            if !entries.len().is_multiple_of(3) {
                return Err(ErrorKind::Invalid(
                    "hash listpack with TTLs is not made of triplets",
                ));
            }
            let mut out = Vec::with_capacity(entries.len() / 3);
            for t in entries.chunks(3) {
                let ttl = t[2]
                    .as_int()
                    .ok_or(ErrorKind::Invalid("hash field TTL is not an integer"))?;
                let (f, v) = (t[0].to_bytes(blob), t[1].to_bytes(blob));
                out.push((f, v, (ttl > 0).then_some(ttl)));
            }
            Piece::Hash(out)
        }
        other => return Err(ErrorKind::UnknownType(other)),
    })
}

/// The entries of one stream listpack node, without deleted ones.
fn stream_node(master: StreamId, blob: &Bytes) -> Result<Vec<StreamEntry>, ErrorKind> {
    let mut lp: Vec<LpEntry> = Vec::new();
    encodings::listpack_each(blob, |e| lp.push(e))?;
    let bad = || ErrorKind::Invalid("malformed stream listpack node");
    let mut it = lp.into_iter();
    let int =
        |it: &mut std::vec::IntoIter<LpEntry>| it.next().and_then(|e| e.as_int()).ok_or_else(bad);
    let count = int(&mut it)?;
    let deleted = int(&mut it)?;
    let nfields = int(&mut it)?;
    if nfields < 0 {
        return Err(bad());
    }
    let master_fields: Vec<Bytes> = (0..nfields)
        .map(|_| it.next().map(|e| e.to_bytes(blob)).ok_or_else(bad))
        .collect::<Result<_, _>>()?;
    if int(&mut it)? != 0 {
        return Err(bad());
    }
    let total = count.checked_add(deleted).ok_or_else(bad)?;
    let mut out = Vec::with_capacity((count.max(0) as usize).min(blob.len()));
    for _ in 0..total {
        let flags = int(&mut it)?;
        let ms = int(&mut it)?;
        let seq = int(&mut it)?;
        let id = StreamId {
            ms: master.ms.wrapping_add(ms as u64),
            seq: master.seq.wrapping_add(seq as u64),
        };
        let fields: Vec<(Bytes, Bytes)> = if flags & 2 != 0 {
            master_fields
                .iter()
                .map(|f| {
                    let v = it.next().map(|e| e.to_bytes(blob)).ok_or_else(bad)?;
                    Ok((f.clone(), v))
                })
                .collect::<Result<_, ErrorKind>>()?
        } else {
            let n = int(&mut it)?;
            (0..n)
                .map(|_| {
                    let f = it.next().map(|e| e.to_bytes(blob)).ok_or_else(bad)?;
                    let v = it.next().map(|e| e.to_bytes(blob)).ok_or_else(bad)?;
                    Ok((f, v))
                })
                .collect::<Result<_, ErrorKind>>()?
        };
        int(&mut it)?; // lp-count
        if flags & 1 == 0 {
            out.push(StreamEntry { id, fields });
        }
    }
    if it.next().is_some() {
        return Err(bad());
    }
    Ok(out)
}

fn stream_group(c: &mut Cur, cfg: &Config, ty: u8) -> R<StreamGroup> {
    let lim = cfg.max_unit_bytes;
    let name = c.string(lim)?;
    let last_delivered_id = c.stream_id_lens()?;
    let entries_read = if ty >= t::STREAM_LISTPACKS_2 {
        Some(c.length()?).filter(|&n| n != u64::MAX)
    } else {
        None
    };
    let npel = c.length()?;
    let mut pel: Vec<(StreamId, i64, u64)> = Vec::with_capacity((npel as usize).min(1024));
    for _ in 0..npel {
        let id = c.stream_id_raw()?;
        let time = c.u64_le()? as i64;
        let count = c.length()?;
        pel.push((id, time, count));
    }
    let nconsumers = c.length()?;
    let mut consumers = Vec::with_capacity((nconsumers as usize).min(1024));
    for _ in 0..nconsumers {
        let name = c.string(lim)?;
        let seen_time_ms = c.u64_le()? as i64;
        let active_time_ms = if ty >= t::STREAM_LISTPACKS_3 {
            Some(c.u64_le()? as i64)
        } else {
            None
        };
        let n = c.length()?;
        let mut pending = Vec::with_capacity((n as usize).min(1024));
        for _ in 0..n {
            pending.push(c.stream_id_raw()?);
        }
        consumers.push(StreamConsumer {
            name,
            seen_time_ms,
            active_time_ms,
            pending,
        });
    }
    // The group PEL does not name consumers; each consumer lists its ids.
    let owner: std::collections::HashMap<StreamId, Bytes> = consumers
        .iter()
        .flat_map(|c| c.pending.iter().map(|id| (*id, c.name.clone())))
        .collect();
    let pending = pel
        .into_iter()
        .map(|(id, time, count)| (id, owner.get(&id).cloned().unwrap_or_default(), time, count))
        .collect();
    Ok(StreamGroup {
        name,
        last_delivered_id,
        entries_read,
        pending,
        consumers,
    })
}
