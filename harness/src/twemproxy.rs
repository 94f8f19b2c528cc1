//! twemproxy (`nutcracker`, from Debian's packages): a real proxy that shards keys over several
//! Redis servers by its own hash and accepts no transactions, no `SELECT`, no `INFO` (it closes
//! a connection that sends a command it does not know).

use crate::ports::free_port;
use crate::process::{ManagedProcess, Spec, WorkDir};
use crate::redis::RedisServer;
use std::path::PathBuf;
use std::time::Duration;

/// The `nutcracker` binary: `$NUTCRACKER_BIN`, else the one on the `PATH` (Debian installs it in
/// `/usr/sbin`).
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NUTCRACKER_BIN") {
        return p.into();
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|d| d.join("nutcracker"))
        .find(|p| p.exists())
        .unwrap_or_else(|| "nutcracker".into())
}

/// A running twemproxy in front of some servers; stops when dropped.
#[derive(Debug)]
pub struct Twemproxy {
    process: ManagedProcess,
    port: u16,
    _dir: WorkDir,
}

impl Twemproxy {
    /// Listens on a free port and shards over `servers` (ketama, fnv1a_64: twemproxy's usual
    /// Redis setup). Waits until a PING through it is answered.
    pub fn start(servers: &[&RedisServer]) -> anyhow::Result<Twemproxy> {
        let dir = WorkDir::new("twemproxy")?;
        let port = free_port();
        let stats_port = free_port();
        let list: String = servers
            .iter()
            .map(|s| format!("    - {}:1\n", s.addr()))
            .collect();
        let config = format!(
            "pool:\n  listen: 127.0.0.1:{port}\n  hash: fnv1a_64\n  distribution: ketama\n  redis: true\n  auto_eject_hosts: false\n  timeout: 10000\n  server_connections: 1\n  servers:\n{list}"
        );
        let path = dir.path().join("nutcracker.yml");
        std::fs::write(&path, config)?;
        let process = ManagedProcess::spawn(Spec {
            name: format!("nutcracker-{port}"),
            program: binary(),
            args: vec![
                "-c".into(),
                path.display().to_string(),
                "-s".into(),
                stats_port.to_string(),
                "-a".into(),
                "127.0.0.1".into(),
            ],
            cwd: dir.path().to_path_buf(),
            env: vec![],
        })?;
        let proxy = Twemproxy {
            process,
            port,
            _dir: dir,
        };
        let ready = crate::wait_for(
            &format!("twemproxy on port {port} to answer PING"),
            Duration::from_secs(20),
            || {
                let client = redis::Client::open(proxy.url()).ok()?;
                let mut c = client
                    .get_connection_with_timeout(Duration::from_secs(1))
                    .ok()?;
                let pong: String = redis::cmd("PING").query(&mut c).ok()?;
                (pong == "PONG").then_some(())
            },
        );
        if let Err(e) = ready {
            anyhow::bail!("{e}; nutcracker log:\n{}", proxy.process.log_tail(2000));
        }
        Ok(proxy)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        self.process.log_tail(1 << 16)
    }
}
