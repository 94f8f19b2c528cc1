//! Free TCP ports on 127.0.0.1.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU16, Ordering};

/// Ports are handed out from a per-process counter in a band chosen by the process id, and each is
/// checked free by binding it. That avoids the usual race where two tests both ask the kernel for
/// an ephemeral port and get the same one after it is released. Every port (and its cluster bus
/// port) stays below Linux's ephemeral range (32768 and up): a port checked free there could be
/// taken by an outgoing connection before the server binds it, which happened to a connector's
/// metrics port in a suite run.
static NEXT: AtomicU16 = AtomicU16::new(0);

const FIRST: u16 = 10000;
const COUNT: u16 = 12000;
/// Cluster nodes also listen on `port + BUS`.
const BUS: u16 = 10000;

fn band_start() -> u16 {
    // Bands of 240 per process id.
    ((std::process::id() % 50) as u16) * 240
}

fn is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
        && TcpStream::connect(("127.0.0.1", port)).is_err()
}

/// A free port (and, for cluster nodes, its bus port `port + 10000` is free too).
pub fn free_port() -> u16 {
    let start = band_start();
    for _ in 0..COUNT {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % COUNT;
        let port = FIRST + (start + n) % COUNT;
        if is_free(port) && is_free(port + BUS) {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 in {FIRST}..{}", FIRST + COUNT)
}
