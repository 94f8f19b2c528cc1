//! The compact in-memory encodings Redis writes into RDB files as opaque strings: ziplist,
//! listpack, intset and zipmap. Each parser checks every length against the blob and returns the
//! elements in order; integers come out as their decimal text, as Redis would return them.
//!
//! Elements are not copied one by one: strings are slices of the blob's `Bytes` and integers are
//! written as text into one buffer per blob, so a blob costs a few allocations, not one per
//! element (a hash of 60 small fields was 120).

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
    let mut text = Vec::with_capacity(20);
    push_int(&mut text, v);
    Bytes::from(text)
}

/// Appends the decimal text of `v`.
fn push_int(out: &mut Vec<u8>, v: i64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut n = v.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    if v < 0 {
        out.push(b'-');
    }
    out.extend_from_slice(&digits[at..]);
}

/// A blob's elements as they are parsed: strings as slices of the blob, integers as text in one
/// shared buffer, filled in by [`Gather::finish`].
struct Gather<'b> {
    blob: &'b Bytes,
    out: Vec<Bytes>,
    ints: Vec<u8>,
    /// (index in `out`, range in `ints`) of each integer.
    int_at: Vec<(usize, usize, usize)>,
}

impl<'b> Gather<'b> {
    fn new(blob: &'b Bytes, capacity: usize) -> Self {
        Gather {
            blob,
            out: Vec::with_capacity(capacity),
            ints: Vec::new(),
            int_at: Vec::new(),
        }
    }

    /// `s` must be a part of the blob.
    fn str(&mut self, s: &[u8]) {
        self.out.push(self.blob.slice_ref(s));
    }

    fn int(&mut self, v: i64) {
        let start = self.ints.len();
        push_int(&mut self.ints, v);
        self.int_at.push((self.out.len(), start, self.ints.len()));
        self.out.push(Bytes::new());
    }

    fn entry(&mut self, e: LpEntry) {
        match e {
            LpEntry::Str(s) => self.str(s),
            LpEntry::Int(i) => self.int(i),
        }
    }

    fn len(&self) -> usize {
        self.out.len()
    }

    fn finish(mut self) -> Vec<Bytes> {
        if !self.int_at.is_empty() {
            let ints = Bytes::from(self.ints);
            for (i, start, end) in self.int_at {
                self.out[i] = ints.slice(start..end);
            }
        }
        self.out
    }
}

/// A ziplist (Redis < 7.0): `zlbytes zltail zllen entries... 0xFF`.
pub fn ziplist(blob: &Bytes) -> Result<Vec<Bytes>, EncodingError> {
    let data: &[u8] = blob;
    let mut b = Blob::new(data, "ziplist");
    let zlbytes = u32::from_le_bytes(b.array()?) as usize;
    if zlbytes != data.len() {
        return Err(b.err("zlbytes does not match the blob size"));
    }
    b.take(4)?; // zltail
    let count = u16::from_le_bytes(b.array()?) as usize;
    let mut out = Gather::new(blob, count.min(data.len()));
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
        match enc >> 6 {
            0 => out.str(b.take((enc & 0x3F) as usize)?),
            1 => {
                let len = (((enc & 0x3F) as usize) << 8) | b.u8()? as usize;
                out.str(b.take(len)?)
            }
            2 => {
                let len = u32::from_be_bytes(b.array()?) as usize;
                out.str(b.take(len)?)
            }
            _ => out.int(match enc {
                0xC0 => i16::from_le_bytes(b.array()?) as i64,
                0xD0 => i32::from_le_bytes(b.array()?) as i64,
                0xE0 => i64::from_le_bytes(b.array()?),
                0xF0 => {
                    let [x, y, z] = b.array()?;
                    (i32::from_le_bytes([0, x, y, z]) >> 8) as i64
                }
                0xFE => b.u8()? as i8 as i64,
                0xF1..=0xFD => ((enc & 0x0F) as i64) - 1,
                _ => return Err(b.err("unknown entry encoding")),
            }),
        }
    }
    if count != 0xFFFF && count != out.len() {
        return Err(b.err("zllen does not match the entries"));
    }
    Ok(out.finish())
}

/// A listpack (Redis ≥ 7.0, and stream nodes since 5.0): `total count entries... 0xFF`.
pub fn listpack(blob: &Bytes) -> Result<Vec<Bytes>, EncodingError> {
    // The header's count (0xFFFF: unknown), bounded by what the blob can hold.
    let count = match blob.get(4..6) {
        Some(&[lo, hi]) => usize::from(u16::from_le_bytes([lo, hi])).min(blob.len() / 2),
        _ => 0,
    };
    let mut out = Gather::new(blob, count);
    listpack_each(blob, |e| out.entry(e))?;
    Ok(out.finish())
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

    /// The entry as text; a string entry is a slice of `blob`, which it must come from.
    pub fn to_bytes(self, blob: &Bytes) -> Bytes {
        match self {
            LpEntry::Str(s) => blob.slice_ref(s),
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
pub fn intset(blob: &Bytes) -> Result<Vec<Bytes>, EncodingError> {
    let data: &[u8] = blob;
    let mut b = Blob::new(data, "intset");
    let width = u32::from_le_bytes(b.array()?) as usize;
    let len = u32::from_le_bytes(b.array()?) as usize;
    if !matches!(width, 2 | 4 | 8) {
        return Err(b.err("integer width is not 2, 4 or 8"));
    }
    if len.checked_mul(width) != Some(data.len() - 8) {
        return Err(b.err("length does not match the blob size"));
    }
    let mut out = Gather::new(blob, len);
    for _ in 0..len {
        out.int(match width {
            2 => i16::from_le_bytes(b.array()?) as i64,
            4 => i32::from_le_bytes(b.array()?) as i64,
            _ => i64::from_le_bytes(b.array()?),
        });
    }
    Ok(out.finish())
}

/// A zipmap (hashes before Redis 2.6): `zmlen (len key len free value free-bytes)... 0xFF`.
/// Returns field, value, field, value...
pub fn zipmap(blob: &Bytes) -> Result<Vec<Bytes>, EncodingError> {
    let mut b = Blob::new(blob, "zipmap");
    b.u8()?; // zmlen: a hint only, 254+ means "count it"
    let mut out = Gather::new(blob, 0);
    let len = |b: &mut Blob| -> Result<Option<usize>, EncodingError> {
        match b.u8()? {
            0xFF => Ok(None),
            0xFE => Ok(Some(u32::from_le_bytes(b.array()?) as usize)),
            n => Ok(Some(n as usize)),
        }
    };
    while let Some(klen) = len(&mut b)? {
        out.str(b.take(klen)?);
        let vlen = len(&mut b)?.ok_or_else(|| b.err("field without value"))?;
        let free = b.u8()? as usize;
        out.str(b.take(vlen)?);
        b.take(free)?;
    }
    Ok(out.finish())
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
        let data = Bytes::from(lp(&[b"a", b"hello"]));
        assert_eq!(
            listpack(&data).unwrap(),
            vec![Bytes::from("a"), Bytes::from("hello")]
        );
    }

    #[test]
    fn listpack_rejects_bad_sizes() {
        let mut data = lp(&[b"a"]);
        data[0] += 1;
        assert!(listpack(&Bytes::from(data)).is_err());
        let data = Bytes::from(lp(&[b"abc"]));
        assert!(listpack(&data.slice(..data.len() - 2)).is_err());
    }

    #[test]
    fn integers_as_text() {
        for v in [0, 7, -1, -5, 10, 99, 100, i64::MAX, i64::MIN, i64::MIN + 1] {
            assert_eq!(int_text(v), Bytes::from(v.to_string()), "{v}");
        }
    }

    #[test]
    fn listpack_mixes_strings_and_integers() {
        // "a", 5 (7-bit uint), -300 (13-bit int), "bc".
        let mut body = vec![0x81, b'a', 2, 5, 1];
        let v = (-300i16 as u16) & 0x1FFF;
        body.extend_from_slice(&[0xC0 | (v >> 8) as u8, v as u8, 2, 0x82, b'b', b'c', 3]);
        let total = 4 + 2 + body.len() + 1;
        let mut data = (total as u32).to_le_bytes().to_vec();
        data.extend_from_slice(&4u16.to_le_bytes());
        data.extend_from_slice(&body);
        data.push(0xFF);
        let elems = listpack(&Bytes::from(data)).unwrap();
        assert_eq!(elems, ["a", "5", "-300", "bc"].map(Bytes::from).to_vec());
    }

    #[test]
    fn intset_widths() {
        let mut d = 2u32.to_le_bytes().to_vec();
        d.extend_from_slice(&2u32.to_le_bytes());
        d.extend_from_slice(&(-5i16).to_le_bytes());
        d.extend_from_slice(&7i16.to_le_bytes());
        assert_eq!(
            intset(&Bytes::from(d.clone())).unwrap(),
            vec![Bytes::from("-5"), Bytes::from("7")]
        );
        d[4] = 3;
        assert!(intset(&Bytes::from(d)).is_err());
    }
}
