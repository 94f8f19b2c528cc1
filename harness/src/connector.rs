//! The connectors as real processes: the binaries built by `cargo test`/`cargo build` in the
//! workspace's target directory, run with a TOML config written to a scratch directory.

use crate::ports::free_port;
use crate::process::{ManagedProcess, Spec, WorkDir};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

/// Which connector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Source,
    Sink,
}

impl Kind {
    fn binary(self) -> &'static str {
        match self {
            Kind::Source => "source-connector",
            Kind::Sink => "sink-connector",
        }
    }
}

/// Path of a connector binary: `$SOURCE_CONNECTOR_BIN`/`$SINK_CONNECTOR_BIN`, else next to the
/// running test or example executable's directory (`target/<profile>/`).
pub fn binary(kind: Kind) -> PathBuf {
    let var = match kind {
        Kind::Source => "SOURCE_CONNECTOR_BIN",
        Kind::Sink => "SINK_CONNECTOR_BIN",
    };
    if let Ok(p) = std::env::var(var) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    // Tests run from target/<profile>/deps, examples from target/<profile>/examples.
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.pop();
    }
    dir.join(kind.binary())
}

#[derive(Debug)]
pub struct Connector {
    process: ManagedProcess,
    metrics_port: u16,
    config_path: PathBuf,
    _dir: WorkDir,
}

impl Connector {
    /// Starts a connector with `config` (TOML without a `[metrics]` table: the harness adds one
    /// on a free port) and extra environment variables.
    pub fn start(kind: Kind, config: &str, env: &[(&str, &str)]) -> anyhow::Result<Connector> {
        let bin = binary(kind);
        anyhow::ensure!(
            bin.exists(),
            "{} not found: build the workspace first (cargo build --workspace)",
            bin.display()
        );
        let dir = WorkDir::new(kind.binary())?;
        let metrics_port = free_port();
        let config_path = dir.path().join("config.toml");
        let text = format!("{config}\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n");
        std::fs::write(&config_path, text)?;
        let mut envs: Vec<(String, String)> = vec![(
            "RUST_LOG".into(),
            std::env::var("CONNECTOR_LOG").unwrap_or_else(|_| "info".into()),
        )];
        envs.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let process = ManagedProcess::spawn(Spec {
            name: format!("{}-{metrics_port}", kind.binary()),
            program: bin,
            args: vec![
                "run".into(),
                "--config".into(),
                config_path.display().to_string(),
            ],
            cwd: dir.path().to_path_buf(),
            env: envs,
        })?;
        Ok(Connector {
            process,
            metrics_port,
            config_path,
            _dir: dir,
        })
    }

    pub fn config_path(&self) -> &std::path::Path {
        &self.config_path
    }

    /// The process id (0 once it has exited).
    pub fn pid(&self) -> u32 {
        self.process.pid().unwrap_or(0)
    }

    pub fn process(&mut self) -> &mut ManagedProcess {
        &mut self.process
    }

    pub fn kill9(&mut self) {
        self.process.kill9();
    }

    /// SIGTERM and wait for a clean exit (up to 20 s, then SIGKILL). Returns how long the
    /// connector took to exit on its own (`None`: it had to be killed).
    pub fn stop(&mut self) -> Option<Duration> {
        self.process.stop(Duration::from_secs(20))
    }

    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.process.restart()
    }

    pub fn log(&self) -> String {
        self.process.log_tail(1 << 20)
    }

    /// GET `path` on the metrics endpoint; `None` while it does not answer.
    pub fn http_get(&self, path: &str) -> Option<(u16, String)> {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.metrics_port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let status = out.split_whitespace().nth(1)?.parse().ok()?;
        let body = out.split_once("\r\n\r\n").map(|x| x.1).unwrap_or_default();
        Some((status, body.to_owned()))
    }

    /// Sum of the samples of `name` whose labels contain every `key="value"` in `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let (_, body) = self.http_get("/metrics")?;
        parse_metric(&body, name, labels)
    }
}

/// Sums the samples of `name` (exact name, any labels matching) in Prometheus text.
pub fn parse_metric(body: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut total = None;
    for line in body.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_text, value) = if let Some(r) = rest.strip_prefix('{') {
            let Some((l, v)) = r.split_once('}') else {
                continue;
            };
            (l, v)
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue;
        };
        if !labels
            .iter()
            .all(|(k, v)| label_text.contains(&format!("{k}=\"{v}\"")))
        {
            continue;
        }
        if let Ok(v) = value.trim().parse::<f64>() {
            *total.get_or_insert(0.0) += v;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_metrics() {
        let body = "# TYPE a counter\na{shard=\"x\",k=\"1\"} 2\na{shard=\"y\"} 3\nab 7\na 1\n";
        assert_eq!(super::parse_metric(body, "a", &[]), Some(6.0));
        assert_eq!(super::parse_metric(body, "a", &[("shard", "x")]), Some(2.0));
        assert_eq!(super::parse_metric(body, "ab", &[]), Some(7.0));
        assert_eq!(super::parse_metric(body, "zz", &[]), None);
    }
}
