//! `source-connector`: command-line entry point.

/// mimalloc instead of glibc's malloc: allocation was a quarter of both connectors' CPU time
/// under load, most of it in glibc's arena locking and consolidation (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use source_connector::{dump, rdb};
use std::io::{Read, Write};
use std::path::PathBuf;

/// Poses as a Redis replica and publishes the snapshot and the command stream to Kafka.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Replicate: connect to the source as a replica and publish to Kafka until stopped.
    ///
    /// Configuration comes from the TOML file, overridden by SOURCE_* environment variables
    /// (nested keys joined by `__`, e.g. SOURCE_KAFKA__TOPIC). See docs/configuration.md.
    Run {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Check the configuration, the source and Kafka before replicating, without disturbing them.
    ///
    /// Connects and authenticates, checks that the user may run REPLCONF (and PSYNC when ACL
    /// DRYRUN is allowed), reads the source's version, role and backlog size when INFO is
    /// allowed, checks the topic's partitions, and says whether a restart from the stored
    /// checkpoint would continue with PSYNC. Never sends PSYNC. Prints one line per check and
    /// exits non-zero when one failed.
    Check {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print the logical content of an RDB file as JSON.
    ///
    /// Reads any RDB from Redis 2.8 to 8.x and Valkey (format versions 1 to 12), checks its
    /// CRC64, and prints `rdb_version`, `functions` and every key sorted by (db, key):
    /// `db`, `key`, `type`, `ttl` (absolute Unix ms), `value` (or `value_digest` for strings over
    /// 256 KiB and collections over 50,000 elements), `expired`, `lfu_freq` and `lru_idle_s`.
    /// Byte strings that are not UTF-8 appear as {"b64": ...}; string values are always base64.
    /// The format is the corpus format described in docs/rdb-dump.md.
    ///
    /// Exits non-zero with a one-line error naming the byte offset when the file is not an RDB,
    /// is truncated, fails its checksum or holds something unknown.
    RdbDump {
        /// The RDB file, or `-` for standard input.
        file: PathBuf,
        /// Mark keys whose TTL is before this time (Unix ms) as expired [default: now].
        #[arg(long)]
        now_ms: Option<i64>,
        /// Largest single unit (key, element, encoded blob) to hold in memory, in bytes.
        #[arg(long, default_value_t = 512 * 1024 * 1024)]
        max_unit_bytes: usize,
    },
}

fn main() -> std::process::ExitCode {
    service::no_huge_pages();
    let cli = Cli::parse();
    source_connector::tls::install_crypto_provider();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Check { config } => {
            let config = source_connector::config::Config::load(config.as_deref())?;
            source_connector::check::check(&config)
        }
        Command::Run { config } => {
            let config = source_connector::config::Config::load(config.as_deref())?;
            service::init_logging(&config.log);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let handle = service::http::install_recorder(
                    include_str!("../../docs/metrics.md"),
                    "source_",
                    &["source_produce_latency_seconds"],
                )?;
                let health = service::http::Health::default();
                let addr = service::http::serve(config.metrics.listen, handle, health.clone()).await?;
                tracing::info!(
                    "source-connector {}: {} -> {} topic {} ({} partitions); metrics on http://{addr}/metrics",
                    env!("CARGO_PKG_VERSION"),
                    service::config::redact_url(&config.redis.url),
                    config.kafka.bootstrap_servers,
                    config.kafka.topic,
                    config.kafka.partitions
                );
                health.ok("source", "running");
                let shutdown = service::shutdown::signal();
                source_connector::run::run(config, shutdown).await
            })
        }
        Command::RdbDump {
            file,
            now_ms,
            max_unit_bytes,
        } => {
            let mut input: Box<dyn Read> = if file.as_os_str() == "-" {
                Box::new(std::io::stdin().lock())
            } else {
                Box::new(
                    std::fs::File::open(&file)
                        .with_context(|| format!("cannot open {}", file.display()))?,
                )
            };
            let config = rdb::Config {
                max_unit_bytes,
                ..rdb::Config::default()
            };
            let mut decoder = rdb::Decoder::new(config);
            let mut assembler = rdb::assemble::Assembler::default();
            let mut buf = vec![0u8; 256 * 1024];
            let name = file.display().to_string();
            loop {
                let n = input
                    .read(&mut buf)
                    .with_context(|| format!("reading {name}"))?;
                if n == 0 {
                    break;
                }
                decoder.feed(&buf[..n]);
                while let Some(item) = decoder.next_item().with_context(|| name.clone())? {
                    assembler.push(item);
                }
            }
            decoder.finish().with_context(|| name.clone())?;
            let now = now_ms.unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as i64)
            });
            let doc = dump::contents_json(&assembler.contents, now);
            let mut out = std::io::stdout().lock();
            serde_json::to_writer_pretty(&mut out, &doc)?;
            writeln!(out)?;
            Ok(())
        }
    }
}
