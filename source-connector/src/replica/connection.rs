//! The connection to the master: TCP (or TLS), RESP commands out, raw bytes in.

use super::LinkError;
use crate::config::Endpoint;
use crate::transfer;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use wire::refusal::Refusal;

pub(super) type Reader = Box<dyn AsyncRead + Unpin + Send>;

pub(super) type Writer = Box<dyn AsyncWrite + Unpin + Send>;

pub(super) const READ_CHUNK: usize = 256 * 1024;

/// RESP encoding of a command.
pub(super) fn encode_command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

pub(super) struct Conn {
    pub(super) rd: Reader,
    pub(super) wr: Writer,
    pub(super) buf: Vec<u8>,
    pub(super) address: String,
    pub(super) timeout: Duration,
}

impl Conn {
    pub(super) async fn connect(
        endpoint: &Endpoint,
        timeout: Duration,
        tls: &crate::tls::TlsFiles,
    ) -> Result<Conn, LinkError> {
        let address = endpoint.address();
        let stream = tokio::time::timeout(timeout, TcpStream::connect(&address))
            .await
            .map_err(|_| {
                LinkError::Transient(format!(
                    "source {address}: connect timed out after {timeout:?}"
                ))
            })?
            .map_err(|e| LinkError::Transient(format!("source {address}: cannot connect: {e}")))?;
        let _ = stream.set_nodelay(true);
        let (rd, wr): (Reader, Writer) = if endpoint.tls {
            let config = tls
                .client_config()
                .map_err(|e| LinkError::Fatal(format!("source {address}: {e}")))?;
            let stream =
                tokio::time::timeout(timeout, crate::tls::connect(config, &endpoint.host, stream))
                    .await
                    .map_err(|_| {
                        LinkError::Transient(format!("source {address}: TLS handshake timed out"))
                    })?
                    .map_err(|e| {
                        // A certificate the configured CA did not sign does not fix itself.
                        let fatal = e.kind() == std::io::ErrorKind::InvalidData;
                        let message = format!("source {address}: TLS handshake failed: {e}");
                        if fatal {
                            LinkError::Fatal(message)
                        } else {
                            LinkError::Transient(message)
                        }
                    })?;
            let (rd, wr) = tokio::io::split(stream);
            (Box::new(rd), Box::new(wr))
        } else {
            let (rd, wr) = stream.into_split();
            (Box::new(rd), Box::new(wr))
        };
        Ok(Conn {
            rd,
            wr,
            buf: Vec::with_capacity(READ_CHUNK),
            address,
            timeout,
        })
    }

    pub(super) async fn send(&mut self, args: &[&[u8]]) -> Result<(), LinkError> {
        self.wr.write_all(&encode_command(args)).await.map_err(|e| {
            LinkError::Transient(format!("source {}: write failed: {e}", self.address))
        })
    }

    /// Reads more bytes into the buffer; fails on EOF or timeout.
    pub(super) async fn fill(&mut self, timeout: Duration) -> Result<usize, LinkError> {
        let mut chunk = vec![0u8; READ_CHUNK];
        let n = tokio::time::timeout(timeout, self.rd.read(&mut chunk))
            .await
            .map_err(|_| {
                LinkError::Transient(format!(
                    "source {}: nothing received for {timeout:?}",
                    self.address
                ))
            })?
            .map_err(|e| {
                LinkError::Transient(format!("source {}: read failed: {e}", self.address))
            })?;
        if n == 0 {
            return Err(LinkError::Transient(format!(
                "source {}: connection closed by the master",
                self.address
            )));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// One reply line of the handshake (keep-alive newlines skipped).
    pub(super) async fn reply_line(&mut self) -> Result<String, LinkError> {
        loop {
            let skip = transfer::skip_newlines(&self.buf);
            if let Some(i) = self.buf[skip..].iter().position(|&b| b == b'\n') {
                let line = String::from_utf8_lossy(&self.buf[skip..skip + i])
                    .trim_end_matches('\r')
                    .to_owned();
                self.buf.drain(..skip + i + 1);
                return Ok(line);
            }
            self.fill(self.timeout).await?;
        }
    }

    /// Sends a handshake command and expects `+OK` (or anything not an error).
    pub(super) async fn command(
        &mut self,
        what: &str,
        args: &[&[u8]],
    ) -> Result<String, LinkError> {
        self.send(args).await?;
        let line = self.reply_line().await?;
        if let Some(err) = line.strip_prefix('-') {
            return Err(LinkError::Refused {
                context: format!("source {}: {what}", self.address),
                refusal: Refusal::parse(err),
            });
        }
        Ok(line)
    }
}
