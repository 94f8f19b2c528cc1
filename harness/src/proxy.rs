//! A fault-injecting TCP proxy on 127.0.0.1, put between a connector and Redis or Kafka: added latency,
//! dropped connections, and a half-open mode where connections stay up but nothing gets through
//! in either direction (as when a network path dies without a reset). Like TCP, it never loses
//! bytes in the middle of a connection: what a half-open link held back arrives, in order, once
//! it heals (unless the connection was closed meanwhile).

use crate::ports::free_port;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Default)]
struct State {
    latency_ms: AtomicU64,
    /// Half-open: nothing is read or forwarded, nothing is closed. The bytes wait in the
    /// sockets' buffers (their senders block once those are full) and go through when it ends,
    /// as TCP retransmits them once a dead path heals.
    blackhole: AtomicBool,
    /// Only the upstream's replies are thrown away: requests still arrive and run.
    drop_replies: AtomicBool,
    /// Bumped to cut every open connection.
    generation: AtomicU64,
    /// Connections numbered below this are held as if half-open; newer ones flow (a path that
    /// died while the client reconnects over another).
    held_below: AtomicU64,
    /// What `held_below` was when the hold ended.
    released_below: AtomicU64,
    /// Connections whose requests (client to upstream) are still being forwarded.
    open: std::sync::Mutex<std::collections::BTreeSet<u64>>,
    /// New connections are refused (accepted and closed at once).
    refuse: AtomicBool,
    stopped: AtomicBool,
    connections: AtomicU64,
    /// Where new connections go (`host:port`); existing ones keep their upstream.
    upstream: std::sync::Mutex<String>,
}

/// A running proxy; stops when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    port: u16,
    state: Arc<State>,
}

impl FaultProxy {
    /// Listens on a free port and forwards every connection to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> anyhow::Result<FaultProxy> {
        let port = free_port();
        let listener = TcpListener::bind(("127.0.0.1", port))?;
        listener.set_nonblocking(true)?;
        let state = Arc::new(State {
            upstream: std::sync::Mutex::new(upstream.to_string()),
            ..State::default()
        });
        let accept_state = Arc::clone(&state);
        std::thread::Builder::new()
            .name(format!("proxy-{port}"))
            .spawn(move || accept_loop(listener, accept_state))?;
        Ok(FaultProxy { port, state })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:<port>` to give the client instead of the upstream address.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn upstream(&self) -> String {
        self.state.upstream.lock().unwrap().clone()
    }

    /// Sends new connections to another upstream (a failover behind a stable address).
    pub fn set_upstream(&self, upstream: &str) {
        *self.state.upstream.lock().unwrap() = upstream.to_string();
    }

    /// Delay added to every chunk forwarded, in each direction.
    pub fn set_latency(&self, latency: Duration) {
        self.state
            .latency_ms
            .store(latency.as_millis() as u64, SeqCst);
    }

    /// Half-open mode on or off: connections stay established but nothing is forwarded.
    pub fn set_blackhole(&self, on: bool) {
        self.state.blackhole.store(on, SeqCst);
    }

    /// Holds every connection open now as if half-open, while new ones go through; `false`
    /// releases them, and what they held back arrives then (as after a partition of one path
    /// that heals once the client has moved to another).
    pub fn set_hold_existing(&self, on: bool) {
        let below = if on {
            self.state.connections.load(SeqCst) + 1
        } else {
            0
        };
        let before = self.state.held_below.swap(below, SeqCst);
        if !on {
            self.state.released_below.store(before, SeqCst);
        }
    }

    /// Connections the last `set_hold_existing(false)` released that are still open: 0 once
    /// each has delivered what it held back (or found its upstream gone) and closed.
    pub fn released_still_open(&self) -> usize {
        let below = self.state.released_below.load(SeqCst);
        let open = self.state.open.lock().unwrap();
        open.range(..below).count()
    }

    /// Requests still reach the upstream (and run there), but its replies are thrown away: the
    /// client cannot tell whether what it sent was applied.
    pub fn set_drop_replies(&self, on: bool) {
        self.state.drop_replies.store(on, SeqCst);
    }

    /// Refuse (accept and close at once) new connections, or accept them again.
    pub fn set_refuse(&self, on: bool) {
        self.state.refuse.store(on, SeqCst);
    }

    /// Cuts every open connection (both sides see the close).
    pub fn drop_connections(&self) {
        self.state.generation.fetch_add(1, SeqCst);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.stopped.store(true, SeqCst);
        self.drop_connections();
    }
}

fn accept_loop(listener: TcpListener, state: Arc<State>) {
    while !state.stopped.load(SeqCst) {
        match listener.accept() {
            Ok((client, _)) => {
                if state.refuse.load(SeqCst) {
                    drop(client);
                    continue;
                }
                let upstream = state.upstream.lock().unwrap().clone();
                let Ok(server) = TcpStream::connect(&upstream) else {
                    continue;
                };
                // Numbered from 1.
                let number = state.connections.fetch_add(1, SeqCst) + 1;
                state.open.lock().unwrap().insert(number);
                let generation = state.generation.load(SeqCst);
                for (from, to, replies) in [(&client, &server, false), (&server, &client, true)] {
                    let (Ok(from), Ok(to)) = (from.try_clone(), to.try_clone()) else {
                        continue;
                    };
                    let state = Arc::clone(&state);
                    let _ = std::thread::Builder::new()
                        .name("proxy-pipe".into())
                        .spawn(move || pipe(from, to, &state, (generation, number), replies));
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Copies `from` to `to` until either side closes or the connection generation changes.
/// `replies`: this direction carries the upstream's replies.
fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    state: &State,
    (generation, number): (u64, u64),
    replies: bool,
) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(50)));
    let _ = from.set_nonblocking(false);
    let mut buf = vec![0u8; 64 * 1024];
    let cut = || state.generation.load(SeqCst) != generation;
    // Half-open: wait, reading nothing, until the link heals or is cut.
    let held = || {
        while (state.blackhole.load(SeqCst) || number < state.held_below.load(SeqCst)) && !cut() {
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    loop {
        held();
        if cut() {
            break;
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => break,
        };
        if replies && state.drop_replies.load(SeqCst) {
            continue;
        }
        // Read just before the link went half-open: held back with the rest.
        held();
        if cut() {
            break;
        }
        let latency = state.latency_ms.load(SeqCst);
        if latency > 0 {
            std::thread::sleep(Duration::from_millis(latency));
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
    if !replies {
        state.open.lock().unwrap().remove(&number);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn echo_server() -> String {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf) {
                        if n == 0 || s.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    fn roundtrip(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
        s.write_all(b"ping")?;
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf)?;
        Ok(buf.to_vec())
    }

    #[test]
    fn forwards_blackholes_and_cuts() {
        let proxy = FaultProxy::start(&echo_server()).unwrap();
        let mut s = TcpStream::connect(proxy.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        assert_eq!(roundtrip(&mut s).unwrap(), b"ping");

        proxy.set_blackhole(true);
        assert!(
            roundtrip(&mut s).is_err(),
            "nothing gets through a half-open link"
        );
        proxy.set_blackhole(false);
        // What the half-open link held back arrives once it heals, in order: nothing is lost.
        let mut late = [0u8; 4];
        s.read_exact(&mut late).unwrap();
        assert_eq!(&late, b"ping");
        assert_eq!(roundtrip(&mut s).unwrap(), b"ping");

        // Hold what is open, let new connections through, then release: the held bytes arrive.
        proxy.set_hold_existing(true);
        assert!(
            roundtrip(&mut s).is_err(),
            "a held connection carries nothing"
        );
        let mut fresh = TcpStream::connect(proxy.addr()).unwrap();
        fresh
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(roundtrip(&mut fresh).unwrap(), b"ping", "new ones flow");
        proxy.set_hold_existing(false);
        s.read_exact(&mut late).unwrap();
        assert_eq!(&late, b"ping");
        assert_eq!(proxy.released_still_open(), 1, "released, still open");

        proxy.set_latency(Duration::from_millis(200));
        let started = std::time::Instant::now();
        let mut s2 = TcpStream::connect(proxy.addr()).unwrap();
        s2.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(roundtrip(&mut s2).unwrap(), b"ping");
        assert!(started.elapsed() >= Duration::from_millis(400));
        proxy.set_latency(Duration::ZERO);

        proxy.drop_connections();
        // The read returns when the proxy closes the connection (or fails after 5 s).
        let mut buf = [0u8; 4];
        assert!(
            matches!(s2.read(&mut buf), Ok(0) | Err(_)),
            "cut connections close"
        );
        assert_eq!(proxy.connections(), 3);
    }
}
