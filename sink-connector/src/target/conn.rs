//! A connection to one target node: commands encoded once, straight from the ops' bytes, into
//! one buffer, and their replies read by a small RESP2 parser.
//!
//! It replaces redis-rs's multiplexed connection on the apply path (ADR 0014): at the head of
//! the stream, where each transaction holds a few records, redis-rs cost about a third of the
//! sink's CPU — a `Cmd` and `Pipeline` built per transaction and copied again into its own
//! buffer, a driver task handed every request through a channel, and a parser-combinator
//! reading every `+QUEUED`. Errors are still `redis::RedisError` and replies `redis::Value`, so
//! what the lane decides from them did not change.
//!
//! One request at a time: `send` writes every command and reads exactly as many replies. A
//! request abandoned half-way (its future dropped, a timeout) leaves replies unread or a
//! command half-written, so the connection is then marked broken and every later request
//! fails at once: the caller reconnects, as after any lost connection.

use bytes::{Buf, BufMut, BytesMut};
use redis::{ErrorKind, FromRedisValue, RedisError, RedisResult, Value};
use service::endpoint::Endpoint;
use service::tls::TlsFiles;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

/// Commands encoded in RESP, ready to be written.
#[derive(Debug, Default)]
pub struct Packed {
    buf: BytesMut,
    count: usize,
}

impl Packed {
    /// Makes room for `bytes` more.
    pub fn reserve(&mut self, bytes: usize) {
        self.buf.reserve(bytes);
    }

    /// Empties it for the next request, keeping its buffer unless it grew past `keep` bytes.
    pub fn reset(&mut self, keep: usize) {
        if self.buf.capacity() > keep {
            self.buf = BytesMut::new();
        }
        self.buf.clear();
        self.count = 0;
    }

    /// Appends one command.
    pub fn push<A: AsRef<[u8]>>(&mut self, args: &[A]) -> &mut Packed {
        self.header(b'*', args.len());
        for a in args {
            let a = a.as_ref();
            self.header(b'$', a.len());
            self.buf.put_slice(a);
            self.buf.put_slice(b"\r\n");
        }
        self.count += 1;
        self
    }

    fn header(&mut self, kind: u8, n: usize) {
        let mut digits = itoa::Buffer::new();
        self.buf.put_u8(kind);
        self.buf.put_slice(digits.format(n).as_bytes());
        self.buf.put_slice(b"\r\n");
    }
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

struct Inner {
    io: Box<dyn Io>,
    read: BytesMut,
    /// A request was abandoned half-way: the replies on the wire no longer match.
    broken: bool,
}

/// A connection to one target node; clones share it (one request at a time).
#[derive(Clone)]
pub struct Conn {
    inner: Arc<Mutex<Inner>>,
    /// How long a request may wait for its replies.
    response_timeout: Duration,
}

impl Conn {
    /// Connects (within `timeout`) to `endpoint`, with TLS for `rediss://`, and authenticates
    /// with its credentials. A request may then wait `response_timeout` for its replies.
    pub async fn connect(
        endpoint: &Endpoint,
        tls: &TlsFiles,
        timeout: Duration,
        response_timeout: Duration,
    ) -> RedisResult<Conn> {
        let address = endpoint.address();
        let tcp = tokio::time::timeout(timeout, TcpStream::connect(&address))
            .await
            .map_err(|_| timed_out(&format!("connect to {address}"), timeout))??;
        tcp.set_nodelay(true)?;
        let io: Box<dyn Io> = if endpoint.tls {
            let config = tls.client_config().map_err(|e| {
                RedisError::from((ErrorKind::InvalidClientConfig, "TLS", e.to_string()))
            })?;
            let stream =
                tokio::time::timeout(timeout, service::tls::connect(config, &endpoint.host, tcp))
                    .await
                    .map_err(|_| timed_out("TLS handshake", timeout))??;
            Box::new(stream)
        } else {
            Box::new(tcp)
        };
        let conn = Conn {
            inner: Arc::new(Mutex::new(Inner {
                io,
                read: BytesMut::with_capacity(64 << 10),
                broken: false,
            })),
            response_timeout,
        };
        if let Some(password) = &endpoint.password {
            let mut auth = vec!["AUTH"];
            auth.extend(endpoint.user.as_deref());
            auth.push(password);
            let reply = conn.send(Packed::default().push(&auth)).await?;
            if let Some(Value::ServerError(e)) = reply.first() {
                return Err(RedisError::from((
                    ErrorKind::AuthenticationFailed,
                    "Password authentication failed",
                    format!("{} {}", e.code(), e.details().unwrap_or_default()),
                )));
            }
        }
        Ok(conn)
    }

    /// Writes `commands` and reads one reply for each (error replies included, as
    /// `Value::ServerError`).
    pub async fn send(&self, commands: &Packed) -> RedisResult<Vec<Value>> {
        let mut inner = self.inner.lock().await;
        if inner.broken {
            return Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the connection was abandoned in the middle of a request",
            )
            .into());
        }
        inner.broken = true;
        let replies = tokio::time::timeout(self.response_timeout, inner.request(commands))
            .await
            .map_err(|_| timed_out("replies", self.response_timeout))??;
        inner.broken = false;
        Ok(replies)
    }

    /// One command; an error reply is an `Err`, like redis-rs's `query_async`.
    pub async fn query<T: FromRedisValue, A: AsRef<[u8]>>(&self, args: &[A]) -> RedisResult<T> {
        let mut reply = self.send(Packed::default().push(args)).await?;
        match reply.pop().unwrap_or(Value::Nil) {
            Value::ServerError(e) => Err(e.into()),
            v => redis::from_owned_redis_value(v),
        }
    }
}

impl Inner {
    async fn request(&mut self, commands: &Packed) -> RedisResult<Vec<Value>> {
        self.io.write_all(&commands.buf).await?;
        self.io.flush().await?;
        let mut replies = Vec::with_capacity(commands.count);
        while replies.len() < commands.count {
            match parse(&self.read, 0)? {
                Some((value, used)) => {
                    self.read.advance(used);
                    replies.push(value);
                }
                None => {
                    self.read.reserve(64 << 10);
                    if self.io.read_buf(&mut self.read).await? == 0 {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "the target closed the connection",
                        )
                        .into());
                    }
                }
            }
        }
        Ok(replies)
    }
}

fn timed_out(what: &str, after: Duration) -> RedisError {
    std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what}: no answer within {after:?}"),
    )
    .into()
}

fn protocol(detail: String) -> RedisError {
    RedisError::from((ErrorKind::ParseError, "not a RESP2 reply", detail))
}

/// Nested arrays deeper than this are not a reply of a command the sink sends.
const MAX_DEPTH: usize = 64;

/// One RESP2 reply at the start of `buf`, and its length; `None` while it is incomplete.
fn parse(buf: &[u8], depth: usize) -> RedisResult<Option<(Value, usize)>> {
    let Some(end) = memchr::memchr(b'\n', buf) else {
        return Ok(None);
    };
    let Some(end) = end.checked_sub(1).filter(|&r| buf[r] == b'\r') else {
        return Err(protocol("a line without CR before its LF".into()));
    };
    let Some((&kind, line)) = buf[..end].split_first() else {
        return Err(protocol("an empty line".into()));
    };
    let after = end + 2;
    let number = || -> RedisResult<i64> {
        std::str::from_utf8(line)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                protocol(format!(
                    "{:?} is not a number",
                    String::from_utf8_lossy(line)
                ))
            })
    };
    let value = match kind {
        b'+' if line == b"OK" => Value::Okay,
        b'+' => Value::SimpleString(String::from_utf8_lossy(line).into_owned()),
        // Rare: redis-rs's own parser, for its error type and the kinds it gives known codes.
        b'-' => redis::parse_redis_value(&buf[..after])?,
        b':' => Value::Int(number()?),
        b'$' => {
            let Ok(len) = usize::try_from(number()?) else {
                return Ok(Some((Value::Nil, after)));
            };
            if buf.len() < after + len + 2 {
                return Ok(None);
            }
            if &buf[after + len..after + len + 2] != b"\r\n" {
                return Err(protocol("a bulk string without its CRLF".into()));
            }
            return Ok(Some((
                Value::BulkString(buf[after..after + len].to_vec()),
                after + len + 2,
            )));
        }
        b'*' => {
            let Ok(len) = usize::try_from(number()?) else {
                return Ok(Some((Value::Nil, after)));
            };
            if depth >= MAX_DEPTH {
                return Err(protocol(format!("arrays nested deeper than {MAX_DEPTH}")));
            }
            let mut items = Vec::with_capacity(len.min(buf.len()));
            let mut at = after;
            for _ in 0..len {
                let Some((item, used)) = parse(&buf[at..], depth + 1)? else {
                    return Ok(None);
                };
                items.push(item);
                at += used;
            }
            return Ok(Some((Value::Array(items), at)));
        }
        other => {
            return Err(protocol(format!(
                "unexpected reply type {:?}",
                char::from(other)
            )))
        }
    };
    Ok(Some((value, after)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(text: &[u8]) -> Option<(Value, usize)> {
        parse(text, 0).expect("a reply")
    }

    #[test]
    fn encodes_commands_in_resp() {
        let mut p = Packed::default();
        p.push(&["SET", "k", ""])
            .push(&[b"GET".as_slice(), b"k\r\n"]);
        assert_eq!(
            &p.buf[..],
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n*2\r\n$3\r\nGET\r\n$3\r\nk\r\n\r\n"
        );
        assert_eq!(p.count, 2);
    }

    #[test]
    fn parses_every_reply_kind() {
        assert_eq!(one(b"+OK\r\n"), Some((Value::Okay, 5)));
        assert_eq!(
            one(b"+QUEUED\r\nrest"),
            Some((Value::SimpleString("QUEUED".into()), 9))
        );
        assert_eq!(one(b":-42\r\n"), Some((Value::Int(-42), 6)));
        assert_eq!(one(b"$-1\r\n"), Some((Value::Nil, 5)));
        assert_eq!(one(b"*-1\r\n"), Some((Value::Nil, 5)));
        assert_eq!(
            one(b"$4\r\na\r\nb\r\n"),
            Some((Value::BulkString(b"a\r\nb".to_vec()), 10))
        );
        assert_eq!(
            one(b"*2\r\n:1\r\n*1\r\n$0\r\n\r\n"),
            Some((
                Value::Array(vec![
                    Value::Int(1),
                    Value::Array(vec![Value::BulkString(vec![])])
                ]),
                18
            ))
        );
        let Some((Value::ServerError(e), 26)) = one(b"-OOM command not allowed\r\n".as_slice())
        else {
            panic!("an error reply");
        };
        assert_eq!(e.code(), "OOM");
        assert_eq!(e.details(), Some("command not allowed"));
        let Some((Value::ServerError(e), _)) = one(b"-MOVED 3999 127.0.0.1:6381\r\n") else {
            panic!("an error reply");
        };
        assert_eq!(e.code(), "MOVED");
        assert_eq!(redis::RedisError::from(e).kind(), ErrorKind::Moved);
    }

    #[test]
    fn an_incomplete_reply_waits_for_more() {
        for text in [
            b"".as_slice(),
            b"+OK\r",
            b"$5\r\nabc",
            b"$5\r\nabcde\r",
            b"*2\r\n:1\r\n",
            b"*2\r\n:1\r\n$3\r\nab",
        ] {
            assert_eq!(parse(text, 0).expect("no error"), None, "{text:?}");
        }
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        for text in [
            b"?what\r\n".as_slice(),
            b":x\r\n",
            b"$3\r\nabcd\r\n",
            b"\r\n",
        ] {
            let e = parse(text, 0).expect_err("not RESP");
            assert_eq!(e.kind(), ErrorKind::ParseError, "{text:?}");
        }
    }
}
