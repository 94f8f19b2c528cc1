//! Plumbing both connectors share: configuration loading (TOML file plus environment overrides),
//! logging, the `/metrics` and `/health` HTTP endpoint, Kafka client settings, Redis endpoints
//! and TLS, and shutdown.

pub mod backoff;
pub mod check;
pub mod config;
pub mod endpoint;
pub mod http;
pub mod kafka;
pub mod latency;
pub mod shutdown;
pub mod tls;

/// How log lines are written (`[log]` in both connectors' configuration).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `text` (a line per event, for people) or `json` (an object per line, for collectors).
    #[serde(default)]
    pub format: LogFormat,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `fields` (the message and every field
    /// such as `partition`, `shard`, `offset`) and `spans`, the context the event happened in.
    Json,
}

/// Initialises logging to stderr. `RUST_LOG` filters (default `info`). Colours only when stderr
/// is a terminal: a log file or a collector gets plain text, not escape sequences.
pub fn init_logging(config: &LogConfig) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match config.format {
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(false)
            .with_span_list(true)
            .try_init(),
    };
}

/// Turns transparent huge pages off for this process. mimalloc asks for them on its arenas, and
/// with 2 MiB pages a partly used region counts whole in RSS: the sink catching up on 1M SETs
/// peaked at 150-162 MB RSS with them and 132-133 MB without (docs/benchmarks.md). Call it first
/// thing in `main`.
pub fn no_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(e) = nix::sys::prctl::set_thp_disable(true) {
        eprintln!("warning: cannot turn transparent huge pages off (prctl): {e}; memory use may be higher");
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
