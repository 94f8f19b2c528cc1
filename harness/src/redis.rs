//! Standalone `redis-server` processes, and a master with a replica.
//!
//! The binary is `redis-server` from PATH, or `$REDIS_SERVER_BIN` (to test other versions).

use crate::ports::free_port;
use crate::process::{ManagedProcess, Spec, WorkDir};
use crate::wait_for;
use std::path::PathBuf;
use std::time::Duration;

/// How to start a server. `Default` is a plain server with persistence off.
#[derive(Debug, Clone, Default)]
pub struct RedisConfig {
    /// `requirepass` (the `default` user's password).
    pub password: Option<String>,
    /// Extra ACL users: `(name, password, rules)`, rules like `"~* &* +@all"`.
    pub acl_users: Vec<(String, String, String)>,
    pub maxmemory: Option<String>,
    pub maxmemory_policy: Option<String>,
    pub cluster_enabled: bool,
    /// Anything else, as `redis-server` command-line pairs: `("repl-backlog-size", "1mb")`.
    pub extra: Vec<(String, String)>,
    /// `rename-command <from> <to>` lines (an empty `to` disables the command).
    pub renamed: Vec<(String, String)>,
}

impl RedisConfig {
    pub fn with(mut self, name: &str, value: &str) -> Self {
        self.extra.push((name.into(), value.into()));
        self
    }

    /// Renames a command (`""`: disables it), as managed services do with replication commands.
    pub fn rename_command(mut self, from: &str, to: &str) -> Self {
        self.renamed.push((from.into(), to.into()));
        self
    }
}

/// Path of the `redis-server` binary the harness runs.
pub fn server_bin() -> PathBuf {
    std::env::var_os("REDIS_SERVER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| "redis-server".into())
}

/// Path of `redis-cli` (`$REDIS_CLI_BIN` or PATH).
pub fn cli_bin() -> PathBuf {
    std::env::var_os("REDIS_CLI_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| "redis-cli".into())
}

/// A running `redis-server` on 127.0.0.1.
#[derive(Debug)]
pub struct RedisServer {
    // Field order matters: the process is dropped before its directory.
    process: ManagedProcess,
    port: u16,
    password: Option<String>,
    _dir: Option<WorkDir>,
}

impl RedisServer {
    /// Starts a server in its own scratch directory and waits until it answers PING.
    pub fn start(config: RedisConfig) -> anyhow::Result<RedisServer> {
        let dir = WorkDir::new("redis")?;
        let path = dir.path().to_path_buf();
        let mut s = Self::start_in(config, path)?;
        s._dir = Some(dir);
        Ok(s)
    }

    /// Starts a server whose files live in `dir` (owned by the caller).
    pub fn start_in(config: RedisConfig, dir: PathBuf) -> anyhow::Result<RedisServer> {
        let port = free_port();
        std::fs::create_dir_all(&dir)?;
        let mut args: Vec<String> = vec![
            "--port".into(),
            port.to_string(),
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
            "--dir".into(),
            dir.display().to_string(),
            "--daemonize".into(),
            "no".into(),
            "--protected-mode".into(),
            "no".into(),
            // Replicas (and the connector) get the snapshot at once instead of after 5 s.
            "--repl-diskless-sync-delay".into(),
            "0".into(),
        ];
        let mut push = |k: &str, v: &str| {
            args.push(format!("--{k}"));
            args.push(v.to_owned());
        };
        if let Some(p) = &config.password {
            push("requirepass", p);
            push("masterauth", p);
        }
        if let Some(m) = &config.maxmemory {
            push("maxmemory", m);
        }
        if let Some(p) = &config.maxmemory_policy {
            push("maxmemory-policy", p);
        }
        if config.cluster_enabled {
            push("cluster-enabled", "yes");
            push(
                "cluster-config-file",
                &dir.join("nodes.conf").display().to_string(),
            );
            push("cluster-node-timeout", "2000");
        }
        for (k, v) in &config.extra {
            push(k, v);
        }
        for (from, to) in &config.renamed {
            args.extend(["--rename-command".into(), from.clone(), to.clone()]);
        }
        let process = ManagedProcess::spawn(Spec {
            name: format!("redis-{port}"),
            program: server_bin(),
            args,
            cwd: dir,
            env: vec![],
        })?;
        let server = RedisServer {
            process,
            port,
            password: config.password,
            _dir: None,
        };
        if let Err(e) = server.wait_ready() {
            anyhow::bail!("{e}; server log:\n{}", server.process.log_tail(2000));
        }
        for (user, pass, rules) in &config.acl_users {
            let mut c = server.conn();
            let mut cmd = redis::cmd("ACL");
            cmd.arg("SETUSER")
                .arg(user)
                .arg("reset")
                .arg("on")
                .arg(format!(">{pass}"));
            for r in rules.split_whitespace() {
                cmd.arg(r);
            }
            cmd.query::<()>(&mut c)?;
        }
        Ok(server)
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        wait_for(
            &format!("redis on port {} to answer PING", self.port),
            Duration::from_secs(20),
            || {
                let mut c = self.try_conn().ok()?;
                let pong: String = redis::cmd("PING").query(&mut c).ok()?;
                (pong == "PONG").then_some(())
            },
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `redis://[:password@]127.0.0.1:port`.
    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    fn try_conn(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection_with_timeout(Duration::from_secs(5))
    }

    /// A new connection (authenticated as the default user when a password is set).
    pub fn conn(&self) -> redis::Connection {
        self.try_conn()
            .unwrap_or_else(|e| panic!("connect to redis {}: {e}", self.addr()))
    }

    /// Runs one command and returns its reply.
    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let mut c = self.try_conn()?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut c)
    }

    /// A field of `INFO <section>`.
    pub fn info_field(&self, section: &str, field: &str) -> Option<String> {
        let info: String = self.cmd(&["INFO", section]).ok()?;
        info.lines().find_map(|l| {
            l.strip_prefix(field)?
                .strip_prefix(':')
                .map(|v| v.trim().to_owned())
        })
    }

    /// `master_repl_offset` from `INFO replication`, as the connectors' offset metrics report
    /// it (a float, for comparing with them).
    pub fn repl_offset(&self) -> anyhow::Result<f64> {
        let field = self
            .info_field("replication", "master_repl_offset")
            .ok_or_else(|| anyhow::anyhow!("INFO replication has no master_repl_offset"))?;
        Ok(field.parse()?)
    }

    /// The process id (0 once it has exited).
    pub fn pid(&self) -> u32 {
        self.process.pid().unwrap_or(0)
    }

    pub fn process(&mut self) -> &mut ManagedProcess {
        &mut self.process
    }

    /// kill -9 the server.
    pub fn kill9(&mut self) {
        self.process.kill9();
    }

    /// Starts the server again on the same port and directory, and waits until it answers.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.process.restart()?;
        self.wait_ready()
    }
}

/// A master with one replica attached and in sync.
#[derive(Debug)]
pub struct MasterReplica {
    pub replica: RedisServer,
    pub master: RedisServer,
}

impl MasterReplica {
    pub fn start(config: RedisConfig) -> anyhow::Result<MasterReplica> {
        let master = RedisServer::start(config.clone())?;
        let replica =
            RedisServer::start(config.with("replicaof", &format!("127.0.0.1 {}", master.port())))?;
        wait_for("replica link up", Duration::from_secs(20), || {
            (replica.info_field("replication", "master_link_status")? == "up").then_some(())
        })?;
        Ok(MasterReplica { replica, master })
    }

    /// Promotes the replica (`REPLICAOF NO ONE`) and makes the old master its replica, as a
    /// manual failover would.
    pub fn failover(&mut self) -> anyhow::Result<()> {
        let _: String = self.replica.cmd(&["REPLICAOF", "NO", "ONE"])?;
        let port = self.replica.port().to_string();
        let _: String = self.master.cmd(&["REPLICAOF", "127.0.0.1", &port])?;
        std::mem::swap(&mut self.master, &mut self.replica);
        let replica = &self.replica;
        wait_for(
            "old master to follow the new one",
            Duration::from_secs(20),
            || (replica.info_field("replication", "master_link_status")? == "up").then_some(()),
        )
    }
}

/// Runs a command given as raw arguments and panics with its name when it fails (for tests).
pub fn exec(conn: &mut redis::Connection, args: &[&[u8]]) {
    let mut cmd = redis::Cmd::new();
    for a in args {
        cmd.arg(*a);
    }
    cmd.exec(conn)
        .unwrap_or_else(|e| panic!("{:?}: {e}", String::from_utf8_lossy(args[0])));
}
