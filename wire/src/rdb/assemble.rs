//! Joins a decoder's pieces back into whole keys. Used by `rdb-dump` and tests; the connector
//! itself publishes pieces as they come.

use super::{Item, KeyHeader, Piece, StreamEntry, StreamGroup, StreamMeta};
use bytes::Bytes;

/// A whole logical value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    String(Vec<u8>),
    List(Vec<Bytes>),
    Set(Vec<Bytes>),
    ZSet(Vec<(Bytes, f64)>),
    Hash(Vec<(Bytes, Bytes, Option<i64>)>),
    Stream {
        meta: StreamMeta,
        entries: Vec<StreamEntry>,
        groups: Vec<StreamGroup>,
    },
    Module {
        module_id: u64,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Key {
    pub header: KeyHeader,
    pub value: Value,
    pub dump: Option<Bytes>,
}

/// Everything in a file, assembled.
#[derive(Debug, Default)]
pub struct Contents {
    pub version: u32,
    pub aux: Vec<(Bytes, Bytes)>,
    pub functions: Vec<Bytes>,
    pub keys: Vec<Key>,
    pub checksum: Option<u64>,
}

/// Feeds items in, collects keys.
#[derive(Debug, Default)]
pub struct Assembler {
    pub contents: Contents,
    current: Option<(KeyHeader, Option<Value>)>,
}

fn empty_value(type_name: &str) -> Value {
    match type_name {
        "string" => Value::String(Vec::new()),
        "list" => Value::List(Vec::new()),
        "set" => Value::Set(Vec::new()),
        "zset" => Value::ZSet(Vec::new()),
        "hash" => Value::Hash(Vec::new()),
        "stream" => Value::Stream {
            meta: StreamMeta::default(),
            entries: Vec::new(),
            groups: Vec::new(),
        },
        _ => Value::Module { module_id: 0 },
    }
}

impl Assembler {
    pub fn push(&mut self, item: Item) {
        match item {
            Item::Header { version } => self.contents.version = version,
            Item::Aux { key, value } => self.contents.aux.push((key, value)),
            Item::Function { code } => self.contents.functions.push(code),
            Item::Key(h) => {
                let v = empty_value(h.type_name());
                self.current = Some((h, Some(v)));
            }
            Item::Piece(p) => {
                if let Some((_, Some(v))) = &mut self.current {
                    match (v, p) {
                        (Value::String(s), Piece::String(b)) => s.extend_from_slice(&b),
                        (Value::List(a), Piece::List(b)) | (Value::Set(a), Piece::Set(b)) => {
                            a.extend(b)
                        }
                        (Value::ZSet(a), Piece::ZSet(b)) => a.extend(b),
                        (Value::Hash(a), Piece::Hash(b)) => a.extend(b),
                        (Value::Stream { entries, .. }, Piece::StreamEntries(b)) => {
                            entries.extend(b)
                        }
                        (Value::Stream { meta, .. }, Piece::StreamMeta(m)) => *meta = m,
                        (Value::Stream { groups, .. }, Piece::StreamGroup(g)) => groups.push(g),
                        (v @ Value::Module { .. }, Piece::Module { module_id }) => {
                            *v = Value::Module { module_id }
                        }
                        (_, p) => panic!("piece {p:?} does not match the key's type"),
                    }
                }
            }
            Item::KeyEnd(end) => {
                if let Some((header, value)) = self.current.take() {
                    let value = value.expect("value present");
                    self.contents.keys.push(Key {
                        header,
                        value,
                        dump: end.dump,
                    });
                }
            }
            Item::End { checksum } => self.contents.checksum = checksum,
            Item::SelectDb { .. }
            | Item::ResizeDb { .. }
            | Item::SlotInfo { .. }
            | Item::ModuleAux { .. } => {}
        }
    }
}

/// Decodes a whole buffer in chunks of `chunk` bytes.
pub fn decode_all(
    data: &[u8],
    config: super::Config,
    chunk: usize,
) -> Result<Contents, super::Error> {
    let mut d = super::Decoder::new(config);
    let mut a = Assembler::default();
    for part in data.chunks(chunk.max(1)) {
        d.feed(part);
        while let Some(item) = d.next_item()? {
            a.push(item);
        }
    }
    d.finish()?;
    Ok(a.contents)
}
