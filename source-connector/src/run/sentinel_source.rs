//! Sources behind Redis Sentinel: the master the Sentinels name, and a session that ends when
//! they name another.

use super::session;
use crate::config::{Config, Endpoint};
use crate::replica::{LinkError, Shared};
use crate::sentinel::{self, Sentinels};
use metrics::counter;
use service::backoff::Backoff;
use std::time::Duration;
use tokio::sync::watch;

/// The master's endpoint from the Sentinels, asking again (with backoff) while none answers; an
/// error when they answer but none knows the master's name.
pub(super) async fn sentinel_master(
    sentinels: &Sentinels,
    endpoint: &Endpoint,
) -> anyhow::Result<Endpoint> {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
    loop {
        let (s, e) = (sentinels.clone(), endpoint.clone());
        match tokio::task::spawn_blocking(move || s.master_endpoint(&e)).await? {
            Ok(endpoint) => return Ok(endpoint),
            Err(e) if e.is_fatal() => anyhow::bail!("{e}"),
            Err(e) => {
                let wait = backoff.next_wait();
                tracing::warn!("{e}; asking again in {wait:?}");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// A session with the master the Sentinels name now, ended cleanly (what Kafka acknowledged
/// is checkpointed) as soon as they name another: the next session continues there with PSYNC.
pub(super) async fn sentinel_session(
    sentinels: &Sentinels,
    config: &Config,
    shared: &mut Shared,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), LinkError> {
    let (s, e) = (sentinels.clone(), shared.endpoint.clone());
    let endpoint = tokio::task::spawn_blocking(move || s.master_endpoint(&e))
        .await
        .map_err(|e| LinkError::Transient(format!("Sentinel query failed: {e}")))?
        .map_err(|e| match e.is_fatal() {
            true => LinkError::Fatal(e.to_string()),
            false => LinkError::Transient(e.to_string()),
        })?;
    if endpoint.address() != shared.endpoint.address() {
        tracing::warn!(
            shard = %shared.shard,
            "Sentinel: master {:?} moved from {} to {}: continuing there (PSYNC from the checkpoint)",
            sentinels.master_name(),
            shared.endpoint.address(),
            endpoint.address()
        );
        counter!("source_sentinel_switches_total", "shard" => shared.shard.clone()).increment(1);
        shared.endpoint = endpoint;
    }
    let (moved, relink) = watch::channel(());
    let watcher = {
        let sentinels = sentinels.clone();
        let current = shared.endpoint.address();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(sentinel::POLL).await;
                let s = sentinels.clone();
                let now = tokio::task::spawn_blocking(move || s.master()).await;
                if let Ok(Ok((host, port))) = now {
                    if format!("{host}:{port}") != current {
                        let _ = moved.send(());
                        return;
                    }
                }
            }
        })
    };
    let result = session(config, shared, shutdown, Some(relink)).await;
    watcher.abort();
    result
}
