//! `sink-connector`: command-line entry point.

/// mimalloc instead of glibc's malloc: allocation was a quarter of both connectors' CPU time
/// under load, most of it in glibc's arena locking and consolidation (docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

/// Consumes the replication topic in order and applies it to a target Redis, exactly once.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Apply the topic to the target until stopped.
    ///
    /// Configuration comes from the TOML file, overridden by SINK_* environment variables
    /// (nested keys joined by `__`, e.g. SINK_REDIS__URL). See docs/configuration.md.
    Run {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Check the configuration, the target and the topic before applying.
    ///
    /// Connects and authenticates, checks the target's role, maxmemory-policy (noeviction),
    /// databases against redis.db_map, that a MULTI/EXEC write is accepted (a probe key under
    /// the checkpoint prefix that expires in 10 s), the topic's partitions, and how many
    /// partitions already have checkpoints in the target. One line per check; exits non-zero
    /// when one failed.
    Check {
        /// The TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Compare the source with the target key by key; exit 0 only when they match.
    ///
    /// Reports keys missing on the target, extra keys and different values or TTLs, with counts
    /// and examples. The sink's checkpoint keys are ignored. Stop writes to the source (or accept
    /// differences for keys written meanwhile) for an exact answer.
    Verify {
        /// The sink's TOML configuration file (for the target, db mapping and checkpoint prefix).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The source, as redis://[user:password@]host:port.
        #[arg(long)]
        source: String,
        /// Compare this many random keys per db instead of all.
        #[arg(long)]
        sample: Option<u64>,
        /// TTLs within this many milliseconds are equal.
        #[arg(long, default_value_t = 2000)]
        ttl_tolerance_ms: i64,
    },
}

fn main() -> std::process::ExitCode {
    service::no_huge_pages();
    let cli = Cli::parse();
    service::tls::install_crypto_provider();
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
            let config = sink_connector::config::Config::load(config.as_deref())?;
            sink_connector::check::check(&config)
        }
        Command::Verify {
            config,
            source,
            sample,
            ttl_tolerance_ms,
        } => {
            let config = sink_connector::config::Config::load(config.as_deref())?;
            let report =
                sink_connector::verify::verify(&config, &source, sample, ttl_tolerance_ms)?;
            print!("{report}");
            if report.is_equal() {
                println!("source and target match");
                Ok(())
            } else {
                anyhow::bail!("source and target differ")
            }
        }
        Command::Run { config } => {
            let config = sink_connector::config::Config::load(config.as_deref())?;
            service::init_logging(&config.log);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let handle = service::http::install_recorder(
                    include_str!("../../docs/metrics.md"),
                    "sink_",
                    &[],
                )?;
                let health = service::http::Health::default();
                let addr =
                    service::http::serve(config.metrics.listen, handle, health.clone()).await?;
                tracing::info!(
                    "sink-connector {}: topic {} at {} -> {}; metrics on http://{addr}/metrics",
                    env!("CARGO_PKG_VERSION"),
                    config.kafka.topic,
                    config.kafka.bootstrap_servers,
                    service::config::redact_url(&config.redis.url),
                );
                let shutdown = service::shutdown::signal();
                sink_connector::run::run(config, health, shutdown).await
            })
        }
    }
}
