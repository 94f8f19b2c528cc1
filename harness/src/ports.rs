//! Free TCP ports on 127.0.0.1.

use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU16, Ordering};

/// Ports are handed out from a per-process counter in a band chosen by the process id, and each is
/// checked free by binding it. That avoids the usual race where two tests both ask the kernel for
/// an ephemeral port and get the same one after it is released.
static NEXT: AtomicU16 = AtomicU16::new(0);

fn band_start() -> u16 {
    // 20000..40000, in bands of 400 per process id; bus ports (+10000) stay below 50000.
    20000 + ((std::process::id() % 50) as u16) * 400
}

fn is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
        && TcpStream::connect(("127.0.0.1", port)).is_err()
}

/// A free port (and, for cluster nodes, its bus port `port + 10000` is free too).
pub fn free_port() -> u16 {
    let start = band_start();
    for _ in 0..20000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed) % 20000;
        let port = 20000 + (start - 20000 + n) % 20000;
        if is_free(port) && is_free(port + 10000) {
            return port;
        }
    }
    panic!("no free port on 127.0.0.1 in 20000..40000")
}
