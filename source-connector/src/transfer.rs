//! The master's replies that frame a sync: the PSYNC reply line, keep-alive newlines, and the RDB
//! transfer header (`$<len>` for disk-based sync, `$EOF:<40-byte mark>` for diskless). Pure
//! parsers over buffered bytes: each returns what it read and how many bytes that took, or `None`
//! when more input is needed.

use wire::refusal::Refusal;

/// Length of the random end mark of a diskless transfer (`RDB_EOF_MARK_SIZE`).
pub const EOF_MARK_LEN: usize = 40;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PsyncReply {
    /// `+FULLRESYNC <replid> <offset>`: a snapshot follows; the stream continues from `offset`.
    FullResync { replid: String, offset: u64 },
    /// `+CONTINUE [<new replid>]`: partial resync accepted.
    Continue { new_replid: Option<String> },
    /// An error line (`-LOADING`, `-NOMASTERLINK`, `-NOAUTH`, `-NOPERM` ...).
    Refused(Refusal),
    /// The RDB header straight away, with no position: the master served the request as `SYNC`.
    /// Open-source Redis does that when `PSYNC` is renamed (`syncCommand` tries a partial resync
    /// only for a command literally named "psync"). The header is left in the buffer.
    Sync,
}

/// How the RDB payload is delimited.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RdbFraming {
    Length(u64),
    EofMark(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Not what the protocol allows here.
    #[error("sync reply: {0}")]
    Malformed(String),
    /// An error line where the RDB should begin (`-ERR unknown command 'SYNC'`, …).
    #[error("master error instead of RDB: {0}")]
    Refused(Refusal),
}

/// Skips keep-alive newlines; returns how many there were.
pub fn skip_newlines(buf: &[u8]) -> usize {
    buf.iter().take_while(|&&b| b == b'\n').count()
}

fn line(buf: &[u8]) -> Result<Option<(&str, usize)>, Error> {
    let Some(i) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() > 1024 {
            return Err(Error::Malformed("reply line longer than 1024 bytes".into()));
        }
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..i])
        .map_err(|_| Error::Malformed("reply line is not text".into()))?;
    Ok(Some((text.trim_end_matches('\r'), i + 1)))
}

/// Parses the reply to PSYNC (after any leading newlines, which it skips and counts in the
/// returned length).
pub fn psync_reply(buf: &[u8]) -> Result<Option<(PsyncReply, usize)>, Error> {
    let skip = skip_newlines(buf);
    let Some((text, used)) = line(&buf[skip..])? else {
        return Ok(None);
    };
    let mut words = text.split(' ');
    let reply = match words.next().unwrap_or_default() {
        "+FULLRESYNC" => {
            let replid = words
                .next()
                .filter(|r| r.len() == 40)
                .ok_or_else(|| Error::Malformed(format!("bad FULLRESYNC line {text:?}")))?;
            let offset = words
                .next()
                .and_then(|o| o.parse().ok())
                .ok_or_else(|| Error::Malformed(format!("bad FULLRESYNC line {text:?}")))?;
            PsyncReply::FullResync {
                replid: replid.to_owned(),
                offset,
            }
        }
        "+CONTINUE" => PsyncReply::Continue {
            new_replid: words.next().filter(|r| !r.is_empty()).map(str::to_owned),
        },
        w if w.starts_with('-') => PsyncReply::Refused(Refusal::parse(&text[1..])),
        w if w.starts_with('$') => return Ok(Some((PsyncReply::Sync, skip))),
        _ => {
            return Err(Error::Malformed(format!(
                "unexpected reply to PSYNC: {:?}",
                text.chars().take(80).collect::<String>()
            )))
        }
    };
    Ok(Some((reply, skip + used)))
}

/// Parses the RDB transfer header (after any keep-alive newlines, counted in the length).
pub fn rdb_framing(buf: &[u8]) -> Result<Option<(RdbFraming, usize)>, Error> {
    let skip = skip_newlines(buf);
    let Some((text, used)) = line(&buf[skip..])? else {
        return Ok(None);
    };
    let framing = if let Some(mark) = text.strip_prefix("$EOF:") {
        if mark.len() != EOF_MARK_LEN {
            return Err(Error::Malformed(format!(
                "EOF mark of {} bytes, expected {EOF_MARK_LEN}",
                mark.len()
            )));
        }
        RdbFraming::EofMark(mark.as_bytes().to_vec())
    } else if let Some(len) = text.strip_prefix('$') {
        RdbFraming::Length(
            len.parse()
                .map_err(|_| Error::Malformed(format!("bad RDB length {text:?}")))?,
        )
    } else if let Some(err) = text.strip_prefix('-') {
        return Err(Error::Refused(Refusal::parse(err)));
    } else {
        return Err(Error::Malformed(format!(
            "expected $<len> or $EOF:<mark>, got {:?}",
            text.chars().take(80).collect::<String>()
        )));
    };
    Ok(Some((framing, skip + used)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_rdb_header_instead_of_a_psync_reply_is_a_sync() {
        let r = b"\n$EOF:0123456789012345678901234567890123456789\r\nREDIS";
        assert_eq!(psync_reply(r).unwrap(), Some((PsyncReply::Sync, 1)));
        assert_eq!(
            psync_reply(b"$1234\r\n").unwrap(),
            Some((PsyncReply::Sync, 0))
        );
    }

    #[test]
    fn replies() {
        let r = format!("\n\n+FULLRESYNC {} 42\r\nrest", "a".repeat(40));
        let (reply, used) = psync_reply(r.as_bytes()).unwrap().unwrap();
        assert_eq!(
            reply,
            PsyncReply::FullResync {
                replid: "a".repeat(40),
                offset: 42
            }
        );
        assert_eq!(&r.as_bytes()[used..], b"rest");
        assert_eq!(
            psync_reply(b"+CONTINUE\r\n").unwrap().unwrap().0,
            PsyncReply::Continue { new_replid: None }
        );
        assert!(
            matches!(psync_reply(b"-NOMASTERLINK Can't SYNC\r\n").unwrap().unwrap().0, PsyncReply::Refused(r) if r.code == "NOMASTERLINK")
        );
        assert_eq!(psync_reply(b"+FULLRES").unwrap(), None);
        assert!(psync_reply(b"HTTP/1.1 400\r\n").is_err());
    }

    #[test]
    fn framing() {
        assert_eq!(
            rdb_framing(b"\n$123\r\n").unwrap().unwrap(),
            (RdbFraming::Length(123), 7)
        );
        let m = format!("$EOF:{}\r\n", "x".repeat(40));
        assert_eq!(
            rdb_framing(m.as_bytes()).unwrap().unwrap().0,
            RdbFraming::EofMark(vec![b'x'; 40])
        );
        assert!(rdb_framing(b"$EOF:short\r\n").is_err());
    }
}
