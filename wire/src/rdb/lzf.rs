//! LZF decompression (the format of Redis's `lzf_d.c`), with every length checked.

/// Why a compressed string could not be expanded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LzfError {
    #[error("lzf data ends inside an instruction")]
    Truncated,
    #[error("lzf back reference points before the start of the output")]
    BadReference,
    #[error("lzf output does not match the declared length")]
    LengthMismatch,
}

/// Expands `input` into exactly `out_len` bytes.
pub fn decompress(input: &[u8], out_len: usize) -> Result<Vec<u8>, LzfError> {
    let mut out = Vec::with_capacity(out_len);
    let mut i = 0;
    while i < input.len() {
        instruction(input, &mut i, &mut out)?;
        if out.len() > out_len {
            return Err(LzfError::LengthMismatch);
        }
    }
    if out.len() != out_len {
        return Err(LzfError::LengthMismatch);
    }
    Ok(out)
}

/// Runs the instruction at `input[*i]`: a literal run or a back reference into `out`, appended
/// to `out`. Advances `*i` past it.
#[inline(always)]
fn instruction(input: &[u8], i: &mut usize, out: &mut Vec<u8>) -> Result<(), LzfError> {
    let ctrl = input[*i] as usize;
    *i += 1;
    if ctrl < 32 {
        let run = ctrl + 1;
        let lit = input.get(*i..*i + run).ok_or(LzfError::Truncated)?;
        out.extend_from_slice(lit);
        *i += run;
        return Ok(());
    }
    let mut len = ctrl >> 5;
    if len == 7 {
        len += *input.get(*i).ok_or(LzfError::Truncated)? as usize;
        *i += 1;
    }
    len += 2;
    let low = *input.get(*i).ok_or(LzfError::Truncated)? as usize;
    *i += 1;
    let back = ((ctrl & 0x1f) << 8) + low + 1;
    if back > out.len() {
        return Err(LzfError::BadReference);
    }
    let start = out.len() - back;
    if back >= len {
        out.extend_from_within(start..start + len);
    } else {
        // Overlapping copy: repeats the last `back` bytes.
        for k in 0..len {
            let b = out[start + k];
            out.push(b);
        }
    }
    Ok(())
}

/// Longest distance of an LZF back reference: what an [`Expander`] keeps of earlier output.
const WINDOW: usize = 8192;

/// Expands a compressed string piece by piece, holding the compressed input and the last 8 KiB
/// of output instead of the whole value (a 1 GB string of one repeated byte is a few MB
/// compressed).
#[derive(Debug)]
pub struct Expander {
    input: Vec<u8>,
    pos: usize,
    out_len: usize,
    produced: usize,
    /// The last `WINDOW` bytes of output, for back references.
    history: Vec<u8>,
}

impl Expander {
    pub fn new(input: Vec<u8>, out_len: usize) -> Expander {
        Expander {
            input,
            pos: 0,
            out_len,
            produced: 0,
            history: Vec::new(),
        }
    }

    pub fn is_done(&self) -> bool {
        self.pos >= self.input.len()
    }

    /// The next piece: about `max` bytes (whole instructions, so up to 264 more), or the rest.
    /// After the last piece the output length is checked against the declared one.
    pub fn next_piece(&mut self, max: usize) -> Result<Vec<u8>, LzfError> {
        let input = &self.input;
        let mut buf = std::mem::take(&mut self.history);
        let base = buf.len();
        let mut i = self.pos;
        while i < input.len() && buf.len() - base < max {
            instruction(input, &mut i, &mut buf)?;
            if self.produced + (buf.len() - base) > self.out_len {
                return Err(LzfError::LengthMismatch);
            }
        }
        self.pos = i;
        let piece = buf[base..].to_vec();
        self.produced += piece.len();
        let keep = buf.len().saturating_sub(WINDOW);
        buf.drain(..keep);
        self.history = buf;
        if self.is_done() && self.produced != self.out_len {
            return Err(LzfError::LengthMismatch);
        }
        Ok(piece)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A compressible input made of literals and back references at every distance.
    fn sample() -> (Vec<u8>, Vec<u8>) {
        let mut compressed = Vec::new();
        let mut expected: Vec<u8> = Vec::new();
        for round in 0..3000u32 {
            let lit: Vec<u8> = (0..(round % 32) as u8 + 1)
                .map(|b| b.wrapping_mul(31).wrapping_add(round as u8))
                .collect();
            compressed.push((lit.len() - 1) as u8);
            compressed.extend_from_slice(&lit);
            expected.extend_from_slice(&lit);
            let back = 1 + (round as usize * 7919) % expected.len().min(WINDOW);
            // A reference copies at least 3 bytes (a length field of 0 would read as a literal).
            let len = 3 + (round as usize % 200);
            let l = len - 2;
            let d = back - 1;
            if l < 7 {
                compressed.push(((l << 5) | (d >> 8)) as u8);
            } else {
                compressed.push(((7 << 5) | (d >> 8)) as u8);
                compressed.push((l - 7) as u8);
            }
            compressed.push((d & 0xff) as u8);
            let start = expected.len() - back;
            for k in 0..len {
                let b = expected[start + k];
                expected.push(b);
            }
        }
        (compressed, expected)
    }

    #[test]
    fn expander_equals_whole_decompression_for_any_piece_size() {
        let (compressed, expected) = sample();
        assert_eq!(decompress(&compressed, expected.len()).unwrap(), expected);
        for max in [1, 7, 100, 4096, 8192, 50_000, 1 << 20] {
            let mut e = Expander::new(compressed.clone(), expected.len());
            let mut out = Vec::new();
            while !e.is_done() {
                let piece = e.next_piece(max).unwrap();
                assert!(
                    piece.len() < max + 300,
                    "piece of {} for max {max}",
                    piece.len()
                );
                out.extend_from_slice(&piece);
            }
            assert_eq!(out, expected, "max {max}");
        }
    }

    #[test]
    fn expander_errors() {
        let (compressed, expected) = sample();
        let mut e = Expander::new(compressed.clone(), expected.len() + 1);
        let mut last = Ok(Vec::new());
        while !e.is_done() && last.is_ok() {
            last = e.next_piece(4096);
        }
        assert_eq!(last, Err(LzfError::LengthMismatch));
        let mut e = Expander::new(vec![0, b'a', (1 << 5), 5], 4);
        assert_eq!(e.next_piece(100), Err(LzfError::BadReference));
    }

    #[test]
    fn literal_and_backref() {
        // "abcabcabc": literal "abc" then a back reference of 6 bytes at distance 3.
        let data = [2, b'a', b'b', b'c', (4 << 5), 2];
        assert_eq!(decompress(&data, 9).unwrap(), b"abcabcabc");
    }

    #[test]
    fn errors() {
        assert_eq!(decompress(&[5, b'a'], 6), Err(LzfError::Truncated));
        assert_eq!(
            decompress(&[0, b'a', (1 << 5), 5], 4),
            Err(LzfError::BadReference)
        );
        assert_eq!(decompress(&[0, b'a'], 2), Err(LzfError::LengthMismatch));
    }
}
