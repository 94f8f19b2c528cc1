//! A fake master that plays a recorded replication capture to whoever connects as a replica.
//!
//! It answers the handshake (`AUTH`, `PING`, `REPLCONF ...`) like a master, and on `PSYNC`/`SYNC`
//! sends the capture's bytes: the `+FULLRESYNC` line, keep-alive newlines, the RDB payload and the
//! command stream, exactly as recorded. A [`Fault`] alters the bytes to test bad input. After the
//! capture it keeps the connection open and records the replica's `REPLCONF ACK` offsets.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Changes to the recorded bytes, to test how a replica handles bad masters.
#[derive(Debug, Clone, Default)]
pub enum Fault {
    #[default]
    None,
    /// Stop sending after this many bytes, then close the connection.
    TruncateAt(usize),
    /// XOR the byte at this position with 0xFF.
    FlipByte(usize),
    /// Replace the bytes at `at` with `bytes`.
    Overwrite { at: usize, bytes: Vec<u8> },
    /// Send extra bytes after the capture.
    Append(Vec<u8>),
}

/// What the replica did, for assertions.
#[derive(Debug, Default, Clone)]
pub struct Observed {
    /// Every command the replica sent, as text arguments.
    pub commands: Vec<Vec<String>>,
    /// Highest `REPLCONF ACK` offset received.
    pub last_ack: Option<u64>,
    pub connections: usize,
}

#[derive(Debug)]
pub struct FakeMaster {
    port: u16,
    observed: Arc<Mutex<Observed>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How to play the capture.
#[derive(Debug, Clone)]
pub struct Playback {
    /// The bytes sent after PSYNC (a capture `.bin` file).
    pub bytes: Arc<Vec<u8>>,
    /// The password `AUTH` must present, when set.
    pub password: Option<String>,
    /// Bytes written per send.
    pub chunk_bytes: usize,
    pub fault: Fault,
    /// Behave like a master before 2.8: `PSYNC` and `REPLCONF` are unknown commands, and only
    /// `SYNC` replicates.
    pub before_psync: bool,
}

impl Playback {
    pub fn from_file(path: &Path) -> anyhow::Result<Playback> {
        Ok(Playback {
            bytes: Arc::new(std::fs::read(path)?),
            password: None,
            chunk_bytes: 64 * 1024,
            fault: Fault::None,
            before_psync: false,
        })
    }

    fn faulted(&self) -> Vec<u8> {
        let mut b = self.bytes.as_ref().clone();
        match &self.fault {
            Fault::None => {}
            Fault::TruncateAt(n) => b.truncate(*n),
            Fault::FlipByte(i) => b[*i] ^= 0xFF,
            Fault::Overwrite { at, bytes } => b[*at..*at + bytes.len()].copy_from_slice(bytes),
            Fault::Append(extra) => b.extend_from_slice(extra),
        }
        b
    }
}

impl FakeMaster {
    /// Listens on a free port of 127.0.0.1 and serves `playback` to each connection in turn.
    pub fn start(playback: Playback) -> anyhow::Result<FakeMaster> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let observed = Arc::new(Mutex::new(Observed::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (obs, st) = (observed.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        obs.lock().unwrap().connections += 1;
                        let _ = serve(stream, &playback, &obs, &st);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(FakeMaster {
            port,
            observed,
            stop,
            thread: Some(thread),
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn observed(&self) -> Observed {
        self.observed.lock().unwrap().clone()
    }
}

impl Drop for FakeMaster {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Reads one command: a RESP array of bulk strings, or an inline line.
fn read_command(r: &mut BufReader<TcpStream>) -> std::io::Result<Option<Vec<String>>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let line = line.trim_end();
    let Some(count) = line.strip_prefix('*') else {
        return Ok(Some(line.split_whitespace().map(str::to_owned).collect()));
    };
    let count: usize = count.parse().map_err(|_| std::io::ErrorKind::InvalidData)?;
    let mut args = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let mut hdr = String::new();
        r.read_line(&mut hdr)?;
        let len: usize = hdr
            .trim_end()
            .trim_start_matches('$')
            .parse()
            .map_err(|_| std::io::ErrorKind::InvalidData)?;
        let mut buf = vec![0; len + 2];
        r.read_exact(&mut buf)?;
        buf.truncate(len);
        args.push(String::from_utf8_lossy(&buf).into_owned());
    }
    Ok(Some(args))
}

fn serve(
    stream: TcpStream,
    pb: &Playback,
    obs: &Mutex<Observed>,
    stop: &AtomicBool,
) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut authed = pb.password.is_none();
    while !stop.load(Ordering::Relaxed) {
        let cmd = match read_command(&mut reader) {
            Ok(Some(c)) if !c.is_empty() => c,
            Ok(Some(_)) => continue,
            Ok(None) => return Ok(()),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        };
        obs.lock().unwrap().commands.push(cmd.clone());
        let name = cmd[0].to_ascii_uppercase();
        let reply: &[u8] = match name.as_str() {
            "AUTH" => {
                if pb.password.as_deref() == cmd.last().map(String::as_str) {
                    authed = true;
                    b"+OK\r\n"
                } else {
                    b"-WRONGPASS invalid username-password pair or user is disabled.\r\n"
                }
            }
            _ if !authed => b"-NOAUTH Authentication required.\r\n",
            "PING" => b"+PONG\r\n",
            "PSYNC" | "REPLCONF" if pb.before_psync => b"-ERR unknown command\r\n",
            "REPLCONF" if cmd.get(1).is_some_and(|a| a.eq_ignore_ascii_case("ACK")) => {
                if let Some(off) = cmd.get(2).and_then(|o| o.parse().ok()) {
                    let mut o = obs.lock().unwrap();
                    o.last_ack = o.last_ack.max(Some(off));
                }
                continue;
            }
            "REPLCONF" => b"+OK\r\n",
            "PSYNC" | "SYNC" => {
                let mut bytes = pb.faulted();
                if name == "SYNC" {
                    // SYNC gets no +FULLRESYNC line: the payload header comes first.
                    if let Some(nl) = bytes.iter().position(|&b| b == b'\n') {
                        bytes.drain(..=nl);
                    }
                }
                for chunk in bytes.chunks(pb.chunk_bytes.max(1)) {
                    writer.write_all(chunk)?;
                }
                writer.flush()?;
                if matches!(pb.fault, Fault::TruncateAt(_)) {
                    return Ok(());
                }
                continue;
            }
            _ => b"-ERR unknown command\r\n",
        };
        writer.write_all(reply)?;
    }
    Ok(())
}
