//! Plumbing both connectors share: configuration loading (TOML file plus environment overrides),
//! logging, the `/metrics` and `/health` HTTP endpoint, Kafka client settings and shutdown.

pub mod check;
pub mod config;
pub mod http;
pub mod kafka;
pub mod shutdown;

/// Initialises logging to stderr. `RUST_LOG` filters (default `info`).
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,rdkafka=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}
