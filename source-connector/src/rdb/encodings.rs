//! The compact in-memory encodings Redis writes into RDB files as opaque strings: ziplist,
//! listpack, intset and zipmap. Each parser checks every length against the blob and returns the
//! elements in order; integers come out as their decimal text, as Redis would return them.

use bytes::Bytes;

/// What is wrong inside an encoded blob, with the position inside the blob.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{encoding} blob invalid at byte {at} of {len}: {what}")]
pub struct EncodingError {
    pub encoding: &'static str,
    pub at: usize,
    pub len: usize,
    pub what: &'static str,
}

struct Blob<'a> {
    data: &'a [u8],
    pos: usize,
    encoding: &'static str,
}

impl<'a> Blob<'a> {
    fn new(data: &'a [u8], encoding: &'static str) -> Self {
        Blob {
            data,
            pos: 0,
            encoding,
        }
    }

    fn err(&self, what: &'static str) -> EncodingError {
        EncodingError {
            encoding: self.encoding,
            at: self.pos,
            len: self.data.len(),
            what,
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], EncodingError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or_else(|| self.err("length runs past the end"))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, EncodingError> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], EncodingError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
}

fn int_text(v: i64) -> Bytes {
    Bytes::from(v.to_string())
}

/// A ziplist (Redis < 7.0): `zlbytes zltail zllen entries... 0xFF`.
pub fn ziplist(data: &[u8]) -> Result<Vec<Bytes>, EncodingError> {
    let mut b = Blob::new(data, "ziplist");
    let zlbytes = u32::from_le_bytes(b.array()?) as usize;
    if zlbytes != data.len() {
        return Err(b.err("zlbytes does not match the blob size"));
    }
    b.take(4)?; // zltail
    let count = u16::from_le_bytes(b.array()?) as usize;
    let mut out = Vec::with_capacity(count.min(data.len()));
    loop {
        let first = *data.get(b.pos).ok_or_else(|| b.err("missing end marker"))?;
        if first == 0xFF {
            break;
        }
        // prevlen
        if b.u8()? == 0xFE {
            b.take(4)?;
        }
        let enc = b.u8()?;
        let entry = match enc >> 6 {
            0 => Bytes::copy_from_slice(b.take((enc & 0x3F) as usize)?),
            1 => {
                let len = (((enc & 0x3F) as usize) << 8) | b.u8()? as usize;
                Bytes::copy_from_slice(b.take(len)?)
            }
            2 => {
                let len = u32::from_be_bytes(b.array()?) as usize;
                Bytes::copy_from_slice(b.take(len)?)
            }
            _ => match enc {
                0xC0 => int_text(i16::from_le_bytes(b.array()?) as i64),
                0xD0 => int_text(i32::from_le_bytes(b.array()?) as i64),
                0xE0 => int_text(i64::from_le_bytes(b.array()?)),
                0xF0 => {
                    let [x, y, z] = b.array()?;
                    int_text((i32::from_le_bytes([0, x, y, z]) >> 8) as i64)
                }
                0xFE => int_text(b.u8()? as i8 as i64),
                0xF1..=0xFD => int_text(((enc & 0x0F) as i64) - 1),
                _ => return Err(b.err("unknown entry encoding")),
            },
        };
        out.push(entry);
    }
    if count != 0xFFFF && count != out.len() {
        return Err(b.err("zllen does not match the entries"));
    }
    Ok(out)
}

/// A listpack (Redis ≥ 7.0, and stream nodes since 5.0): `total count entries... 0xFF`.
pub fn listpack(data: &[u8]) -> Result<Vec<Bytes>, EncodingError> {
    let mut out = Vec::new();
    listpack_each(data, |e| {
        out.push(match e {
            LpEntry::Str(s) => Bytes::copy_from_slice(s),
            LpEntry::Int(i) => int_text(i),
        })
    })?;
    Ok(out)
}

/// A listpack entry, before conversion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LpEntry<'a> {
    Str(&'a [u8]),
    Int(i64),
}

impl LpEntry<'_> {
    /// The integer value, also for a string holding one (stream fields are written either way).
    pub fn as_int(&self) -> Option<i64> {
        match self {
            LpEntry::Int(i) => Some(*i),
            LpEntry::Str(s) => std::str::from_utf8(s).ok()?.parse().ok(),
        }
    }

    pub fn to_bytes(self) -> Bytes {
        match self {
            LpEntry::Str(s) => Bytes::copy_from_slice(s),
            LpEntry::Int(i) => int_text(i),
        }
    }
}

/// Calls `f` for each entry of a listpack, in order.
pub fn listpack_each<'a>(
    data: &'a [u8],
    mut f: impl FnMut(LpEntry<'a>),
) -> Result<usize, EncodingError> {
    let mut b = Blob::new(data, "listpack");
    let total = u32::from_le_bytes(b.array()?) as usize;
    if total != data.len() {
        return Err(b.err("total bytes does not match the blob size"));
    }
    let count = u16::from_le_bytes(b.array()?) as usize;
    let mut n = 0;
    loop {
        let start = b.pos;
        let enc = b.u8()?;
        if enc == 0xFF {
            break;
        }
        let entry = if enc & 0x80 == 0 {
            LpEntry::Int((enc & 0x7F) as i64)
        } else if enc & 0xC0 == 0x80 {
            LpEntry::Str(b.take((enc & 0x3F) as usize)?)
        } else if enc & 0xE0 == 0xC0 {
            let v = (((enc & 0x1F) as u16) << 8) | b.u8()? as u16;
            LpEntry::Int(((v << 3) as i16 >> 3) as i64)
        } else if enc & 0xF0 == 0xE0 {
            let len = (((enc & 0x0F) as usize) << 8) | b.u8()? as usize;
            LpEntry::Str(b.take(len)?)
        } else {
            match enc {
                0xF0 => {
                    let len = u32::from_le_bytes(b.array()?) as usize;
                    LpEntry::Str(b.take(len)?)
                }
                0xF1 => LpEntry::Int(i16::from_le_bytes(b.array()?) as i64),
                0xF2 => {
                    let [x, y, z] = b.array()?;
                    LpEntry::Int((i32::from_le_bytes([0, x, y, z]) >> 8) as i64)
                }
                0xF3 => LpEntry::Int(i32::from_le_bytes(b.array()?) as i64),
                0xF4 => LpEntry::Int(i64::from_le_bytes(b.array()?)),
                _ => return Err(b.err("unknown entry encoding")),
            }
        };
        // backlen: the size of encoding + data, in 1 to 5 bytes.
        let size = b.pos - start;
        let backlen = match size {
            0..=127 => 1,
            128..=16383 => 2,
            16384..=2097151 => 3,
            2097152..=268435455 => 4,
            _ => 5,
        };
        b.take(backlen)?;
        f(entry);
        n += 1;
    }
    if count != 0xFFFF && count != n {
        return Err(b.err("element count does not match the entries"));
    }
    if b.pos != data.len() {
        return Err(b.err("bytes after the end marker"));
    }
    Ok(n)
}

/// An intset: `encoding(2|4|8) length contents`, little endian.
pub fn intset(data: &[u8]) -> Result<Vec<Bytes>, EncodingError> {
    let mut b = Blob::new(data, "intset");
    let width = u32::from_le_bytes(b.array()?) as usize;
    let len = u32::from_le_bytes(b.array()?) as usize;
    if !matches!(width, 2 | 4 | 8) {
        return Err(b.err("integer width is not 2, 4 or 8"));
    }
    if len.checked_mul(width) != Some(data.len() - 8) {
        return Err(b.err("length does not match the blob size"));
    }
    let mut out = Vec::with_capacity(len);
    for _ in 0..len {
        let v = match width {
            2 => i16::from_le_bytes(b.array()?) as i64,
            4 => i32::from_le_bytes(b.array()?) as i64,
            _ => i64::from_le_bytes(b.array()?),
        };
        out.push(int_text(v));
    }
    Ok(out)
}

/// A zipmap (hashes before Redis 2.6): `zmlen (len key len free value free-bytes)... 0xFF`.
/// Returns field, value, field, value...
pub fn zipmap(data: &[u8]) -> Result<Vec<Bytes>, EncodingError> {
    let mut b = Blob::new(data, "zipmap");
    b.u8()?; // zmlen: a hint only, 254+ means "count it"
    let mut out = Vec::new();
    let len = |b: &mut Blob| -> Result<Option<usize>, EncodingError> {
        match b.u8()? {
            0xFF => Ok(None),
            0xFE => Ok(Some(u32::from_le_bytes(b.array()?) as usize)),
            n => Ok(Some(n as usize)),
        }
    };
    while let Some(klen) = len(&mut b)? {
        out.push(Bytes::copy_from_slice(b.take(klen)?));
        let vlen = len(&mut b)?.ok_or_else(|| b.err("field without value"))?;
        let free = b.u8()? as usize;
        out.push(Bytes::copy_from_slice(b.take(vlen)?));
        b.take(free)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lp(entries: &[&[u8]]) -> Vec<u8> {
        let mut body = Vec::new();
        for e in entries {
            assert!(e.len() < 64);
            body.push(0x80 | e.len() as u8);
            body.extend_from_slice(e);
            body.push(1 + e.len() as u8);
        }
        let total = 4 + 2 + body.len() + 1;
        let mut out = (total as u32).to_le_bytes().to_vec();
        out.extend_from_slice(&(entries.len() as u16).to_le_bytes());
        out.extend_from_slice(&body);
        out.push(0xFF);
        out
    }

    #[test]
    fn listpack_strings() {
        let data = lp(&[b"a", b"hello"]);
        assert_eq!(
            listpack(&data).unwrap(),
            vec![Bytes::from("a"), Bytes::from("hello")]
        );
    }

    #[test]
    fn listpack_rejects_bad_sizes() {
        let mut data = lp(&[b"a"]);
        data[0] += 1;
        assert!(listpack(&data).is_err());
        let data = lp(&[b"abc"]);
        assert!(listpack(&data[..data.len() - 2]).is_err());
    }

    #[test]
    fn intset_widths() {
        let mut d = 2u32.to_le_bytes().to_vec();
        d.extend_from_slice(&2u32.to_le_bytes());
        d.extend_from_slice(&(-5i16).to_le_bytes());
        d.extend_from_slice(&7i16.to_le_bytes());
        assert_eq!(
            intset(&d).unwrap(),
            vec![Bytes::from("-5"), Bytes::from("7")]
        );
        d[4] = 3;
        assert!(intset(&d).is_err());
    }
}
