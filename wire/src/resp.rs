//! The replication command stream: RESP arrays (and inline commands) with byte-exact offsets.
//!
//! Every command carries the replication offset of the byte after it, which is what the source
//! acknowledges and what positions on the topic are made of. Bare newlines are keep-alives; they
//! are not part of the replication stream and do not advance the offset.

use bytes::Bytes;

/// Limits that keep a hostile or corrupt stream from sizing allocations.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest single argument (Redis's `proto-max-bulk-len` default is 512 MB).
    pub max_bulk_bytes: usize,
    /// Most arguments in one command.
    pub max_args: usize,
    /// Longest inline command or header line.
    pub max_line_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_bulk_bytes: 512 * 1024 * 1024,
            max_args: 1024 * 1024,
            max_line_bytes: 64 * 1024,
        }
    }
}

/// What a command is, for the connector's purposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The master's heartbeat: consumed, not published.
    Ping,
    /// `REPLCONF GETACK *`: the replica must answer with `REPLCONF ACK <offset>`.
    GetAck,
    /// `SELECT db`: changes the db of what follows.
    Select(u32),
    /// Anything else: a write to publish.
    Write,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub args: Vec<Bytes>,
    /// Replication offset of the byte after this command.
    pub end_offset: u64,
    pub kind: Kind,
}

impl Command {
    /// The command name, upper-cased.
    pub fn name(&self) -> String {
        self.args
            .first()
            .map(|a| String::from_utf8_lossy(a).to_ascii_uppercase())
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("command stream at replication offset {offset}: {what}")]
pub struct Error {
    pub offset: u64,
    pub what: String,
}

/// Decodes the command stream from chunks of any size.
#[derive(Debug)]
pub struct Decoder {
    limits: Limits,
    buf: Vec<u8>,
    start: usize,
    /// Replication offset of `buf[start]`.
    offset: u64,
    /// Bytes the pending command needs before it is worth parsing again (keeps a big command
    /// arriving in small reads linear rather than quadratic).
    need: usize,
}

enum Parse<T> {
    Done(T, usize),
    /// Not complete: at least this many bytes are needed.
    More(usize),
}

impl Decoder {
    /// A decoder whose first byte is at replication offset `offset`.
    pub fn new(offset: u64, limits: Limits) -> Decoder {
        Decoder {
            limits,
            buf: Vec::new(),
            start: 0,
            offset,
            need: 0,
        }
    }

    /// Replication offset of the next unread byte.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    pub fn feed(&mut self, data: &[u8]) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next command, or `Ok(None)` when more input is needed.
    pub fn next_command(&mut self) -> Result<Option<Command>, Error> {
        loop {
            let data = &self.buf[self.start..];
            if data.len() < self.need {
                return Ok(None);
            }
            let Some(&first) = data.first() else {
                return Ok(None);
            };
            if first == b'\n' {
                // Keep-alive: not part of the offset.
                self.start += 1;
                continue;
            }
            let parsed = if first == b'*' {
                self.array(data)?
            } else {
                self.inline(data)?
            };
            let (args, used) = match parsed {
                Parse::Done(args, used) => (args, used),
                Parse::More(need) => {
                    self.need = need;
                    return Ok(None);
                }
            };
            self.need = 0;
            self.start += used;
            self.offset += used as u64;
            if args.is_empty() {
                continue;
            }
            let kind = classify(&args);
            return Ok(Some(Command {
                args,
                end_offset: self.offset,
                kind,
            }));
        }
    }

    fn err(&self, at: usize, what: impl Into<String>) -> Error {
        Error {
            offset: self.offset + at as u64,
            what: what.into(),
        }
    }

    /// A line ending in `\r\n` starting at `from`: returns (content end, next start).
    fn line(&self, data: &[u8], from: usize) -> Result<Option<(usize, usize)>, Error> {
        let window = &data[from..data.len().min(from + self.limits.max_line_bytes + 2)];
        match window.iter().position(|&b| b == b'\n') {
            Some(i) if i > 0 && window[i - 1] == b'\r' => Ok(Some((from + i - 1, from + i + 1))),
            Some(_) => Err(self.err(from, "line ends in a bare \\n where \\r\\n is expected")),
            None if window.len() > self.limits.max_line_bytes => Err(self.err(
                from,
                format!("line longer than {} bytes", self.limits.max_line_bytes),
            )),
            None => Ok(None),
        }
    }

    fn number(&self, data: &[u8], from: usize, to: usize) -> Result<i64, Error> {
        std::str::from_utf8(&data[from..to])
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                self.err(
                    from,
                    format!(
                        "expected a number, found {:?}",
                        String::from_utf8_lossy(&data[from..to])
                    ),
                )
            })
    }

    fn array(&self, data: &[u8]) -> Result<Parse<Vec<Bytes>>, Error> {
        let Some((end, mut pos)) = self.line(data, 0)? else {
            return Ok(Parse::More(0));
        };
        let n = self.number(data, 1, end)?;
        if n < 0 || n as usize > self.limits.max_args {
            return Err(self.err(0, format!("array of {n} elements is out of range")));
        }
        let mut args = Vec::with_capacity((n as usize).min(64));
        for _ in 0..n {
            if pos >= data.len() {
                return Ok(Parse::More(pos + 1));
            }
            if data[pos] != b'$' {
                return Err(self.err(
                    pos,
                    format!("expected '$' (bulk string), found 0x{:02x}", data[pos]),
                ));
            }
            let Some((end, next)) = self.line(data, pos)? else {
                return Ok(Parse::More(0));
            };
            let len = self.number(data, pos + 1, end)?;
            if len < 0 || len as usize > self.limits.max_bulk_bytes {
                return Err(self.err(pos, format!("bulk length {len} is out of range")));
            }
            let len = len as usize;
            if data.len() < next + len + 2 {
                return Ok(Parse::More(next + len + 2));
            }
            if &data[next + len..next + len + 2] != b"\r\n" {
                return Err(self.err(next + len, "bulk string is not followed by \\r\\n"));
            }
            args.push(Bytes::copy_from_slice(&data[next..next + len]));
            pos = next + len + 2;
        }
        Ok(Parse::Done(args, pos))
    }

    /// An inline command: one line of space-separated words.
    fn inline(&self, data: &[u8]) -> Result<Parse<Vec<Bytes>>, Error> {
        let window = &data[..data.len().min(self.limits.max_line_bytes + 2)];
        let Some(i) = window.iter().position(|&b| b == b'\n') else {
            if window.len() > self.limits.max_line_bytes {
                return Err(self.err(0, "inline command too long"));
            }
            return Ok(Parse::More(0));
        };
        let line = &data[..i];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let args = line
            .split(|b| b.is_ascii_whitespace())
            .filter(|w| !w.is_empty())
            .map(Bytes::copy_from_slice)
            .collect();
        Ok(Parse::Done(args, i + 1))
    }
}

fn classify(args: &[Bytes]) -> Kind {
    let name = &args[0];
    if name.eq_ignore_ascii_case(b"PING") {
        Kind::Ping
    } else if name.eq_ignore_ascii_case(b"REPLCONF")
        && args
            .get(1)
            .is_some_and(|a| a.eq_ignore_ascii_case(b"GETACK"))
    {
        Kind::GetAck
    } else if name.eq_ignore_ascii_case(b"SELECT") {
        match args
            .get(1)
            .and_then(|d| std::str::from_utf8(d).ok()?.parse().ok())
        {
            Some(db) => Kind::Select(db),
            None => Kind::Write,
        }
    } else {
        Kind::Write
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all(d: &mut Decoder) -> Vec<Command> {
        let mut out = Vec::new();
        while let Some(c) = d.next_command().unwrap() {
            out.push(c);
        }
        out
    }

    #[test]
    fn offsets_are_byte_exact_and_newlines_do_not_count() {
        let stream = b"*1\r\n$4\r\nPING\r\n\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n*2\r\n$6\r\nSELECT\r\n$1\r\n3\r\n";
        let mut d = Decoder::new(100, Limits::default());
        d.feed(stream);
        let cmds = all(&mut d);
        assert_eq!(cmds.len(), 3);
        assert_eq!(cmds[0].kind, Kind::Ping);
        assert_eq!(cmds[0].end_offset, 114);
        assert_eq!(cmds[1].kind, Kind::Write);
        assert_eq!(cmds[1].end_offset, 114 + 27);
        assert_eq!(cmds[2].kind, Kind::Select(3));
        assert_eq!(d.offset(), 100 + stream.len() as u64 - 1);
    }

    #[test]
    fn byte_at_a_time_equals_whole() {
        let stream: &[u8] = b"*3\r\n$8\r\nREPLCONF\r\n$6\r\nGETACK\r\n$1\r\n*\r\nPING\r\n*2\r\n$3\r\nDEL\r\n$0\r\n\r\n";
        let mut whole = Decoder::new(0, Limits::default());
        whole.feed(stream);
        let expected = all(&mut whole);
        let mut d = Decoder::new(0, Limits::default());
        let mut got = Vec::new();
        for b in stream {
            d.feed(&[*b]);
            got.extend(all(&mut d));
        }
        assert_eq!(got, expected);
        assert_eq!(expected[0].kind, Kind::GetAck);
        assert_eq!(expected[1].args, vec![Bytes::from("PING")]);
        assert_eq!(expected[2].args[1], Bytes::new());
    }

    #[test]
    fn bad_input_gives_errors_not_allocations() {
        for bad in [
            &b"*99999999999\r\n"[..],
            b"*1\r\n$-5\r\n",
            b"*1\r\n$3\r\nabcXY",
            b"*1\r\n:5\r\n",
            b"*x\r\n",
        ] {
            let mut d = Decoder::new(0, Limits::default());
            d.feed(bad);
            assert!(d.next_command().is_err(), "{bad:?}");
        }
        let mut d = Decoder::new(0, Limits::default());
        d.feed(b"*1\r\n$1000000\r\n");
        assert_eq!(
            d.next_command().unwrap(),
            None,
            "waits for the declared bytes"
        );
    }
}
