//! The replica link: connect to the source as a replica, sync, and publish everything it sends.
//! Its parts follow the protocol: [`connection`], [`handshake`] (`AUTH`, `REPLCONF`, `PSYNC`),
//! [`full_sync`] (the RDB) and [`stream`] (the command stream and `REPLCONF ACK`).
//!
//! One [`session`] is one connection. It ends with an error that says whether retrying can help
//! ([`LinkError::Transient`]) or not ([`LinkError::Fatal`], for example a wrong password); the
//! caller reconnects with backoff and resumes from the durable checkpoint.

use crate::checkpoint::{self, Checkpoint};
use crate::config::{Config, Endpoint, SyncMode};
use crate::publish::{PublishError, Publisher};
use crate::records::Builder;
use crate::transfer::PsyncReply;
use metrics::{counter, gauge};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use wire::refusal::{Meaning, Refusal};

mod connection;
mod full_sync;
mod handshake;
mod stream;

use connection::Conn;
use full_sync::full_sync;
use handshake::Handshake;
use stream::stream;

/// Why a session ended. What to do next is on the type: [`LinkError::next`].
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Worth retrying after a pause (connection refused or lost, a broken transfer, a Kafka
    /// failure).
    #[error("{0}")]
    Transient(String),
    /// Retrying cannot help until an operator acts (a TLS certificate nobody trusts, a record
    /// too big for the topic, no name for the replication commands).
    #[error("{0}")]
    Fatal(String),
    /// The master refused a command (`context` names it and the master): retried unless it
    /// refuses this client ([`Meaning::Authentication`]).
    #[error("{context} refused: {refusal}")]
    Refused { context: String, refusal: Refusal },
    /// Nothing left to do: `sync.mode = "full"` and the snapshot is in Kafka.
    #[error("{0}")]
    Done(String),
}

/// What the shard's loop does after a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Connect again after a backoff.
    Reconnect,
    /// Stop the connector with the error.
    Exit,
    /// Stop the shard's loop: its work is done.
    Finish,
}

impl LinkError {
    pub fn next(&self) -> Next {
        match self {
            LinkError::Transient(_) => Next::Reconnect,
            LinkError::Refused { refusal, .. } => match refusal.meaning() {
                Meaning::Authentication => Next::Exit,
                Meaning::UnknownCommand | Meaning::Other => Next::Reconnect,
            },
            LinkError::Fatal(_) => Next::Exit,
            LinkError::Done(_) => Next::Finish,
        }
    }

    /// A sync reply that is malformed, or an error line (`what` was refused).
    pub(super) fn sync_reply(address: &str, e: crate::transfer::Error) -> LinkError {
        match e {
            crate::transfer::Error::Refused(refusal) => LinkError::Refused {
                context: format!("source {address}: the sync"),
                refusal,
            },
            malformed => LinkError::Transient(format!("source {address}: {malformed}")),
        }
    }

    /// Whether the master said it does not know the command under the name it was sent by.
    pub(super) fn unknown_command(&self) -> bool {
        matches!(self, LinkError::Refused { refusal, .. } if refusal.meaning() == Meaning::UnknownCommand)
    }
}

impl From<PublishError> for LinkError {
    fn from(e: PublishError) -> Self {
        if e.fatal {
            LinkError::Fatal(e.to_string())
        } else {
            LinkError::Transient(e.to_string())
        }
    }
}

/// Shared state of the connector across sessions.
#[derive(Debug)]
pub struct Shared {
    pub config: Config,
    pub shard: String,
    pub checkpoint_topic: String,
    pub endpoint: Endpoint,
    pub checkpoint: Option<Checkpoint>,
    /// Slots the shard serves when the source is a cluster (empty otherwise); updated by the
    /// topology watcher when slots migrate.
    pub scope: watch::Receiver<Vec<(u16, u16)>>,
    /// Node ids of a cluster shard's master and replicas, kept in its checkpoint so a restart
    /// finds the shard's name again whatever slots it serves by then.
    pub nodes: Vec<String>,
    /// Keys that moved between the shards of a cluster source (ADR 0007).
    pub migrations: Option<std::sync::Arc<crate::migration::Migrations>>,
}

/// `sync.mode = "full"`: the snapshot is in Kafka, the connector's work is done.
pub(super) fn snapshot_only_done(
    cfg: &Config,
    epoch: u64,
    builder: &Builder,
) -> Result<(), LinkError> {
    if cfg.sync.mode == SyncMode::Full {
        return Err(LinkError::Done(format!(
            "sync.mode = \"full\": the snapshot of epoch {epoch} ({} keys) is in Kafka; stopping",
            builder.keys()
        )));
    }
    Ok(())
}

/// Runs one replication session until it fails or `shutdown` flips.
pub async fn session(
    shared: &mut Shared,
    publisher: &mut Publisher,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), LinkError> {
    let cfg = shared.config.clone();
    let shard = shared.shard.clone();
    let timeout = Duration::from_secs(cfg.redis.timeout_s);
    let mut conn = Conn::connect(&shared.endpoint, timeout, &cfg.redis.tls).await?;
    let address = conn.address.clone();

    let Handshake {
        reply,
        acks,
        replconf,
        psync,
        sync,
    } = handshake::run(&mut conn, shared).await?;
    let sync_started = Instant::now();
    let (mut builder, replid, start_offset) = match reply {
        PsyncReply::FullResync { replid, offset } => {
            let epoch = shared.checkpoint.as_ref().map_or(1, |c| c.epoch + 1);
            tracing::info!(shard = %shard, source = %address, epoch, %replid, offset = %offset, "full resync: replid {replid}, offset {offset}");
            counter!("source_full_syncs_total", "shard" => shard.clone()).increment(1);
            let (builder, offset) = full_sync(
                &mut conn, shared, publisher, &replid, offset, epoch, shutdown,
            )
            .await?;
            snapshot_only_done(&cfg, epoch, &builder)?;
            (builder, replid, offset)
        }
        PsyncReply::Continue { new_replid } => {
            let c = shared
                .checkpoint
                .clone()
                .expect("CONTINUE follows a checkpoint");
            let replid = new_replid.unwrap_or(c.replid.clone());
            tracing::info!(shard = %shard, source = %address, epoch = c.epoch, offset = %c.offset, "partial resync from offset {}", c.offset);
            counter!("source_partial_syncs_total", "shard" => shard.clone()).increment(1);
            let builder = Builder::new(
                shard.clone(),
                cfg.kafka.partitions,
                cfg.snapshot.piece_bytes,
                c.epoch,
                c.offset,
            )
            .scoped(shared.scope.borrow_and_update().clone());
            if replid != c.replid {
                save_checkpoint(
                    shared,
                    publisher,
                    Checkpoint {
                        replid: replid.clone(),
                        ..c.clone()
                    },
                )
                .await?;
            }
            (builder, replid, c.offset)
        }
        PsyncReply::Sync => {
            // A renamed PSYNC on open-source Redis: served as SYNC, without a position, so
            // every connection is a full sync (a service that keeps its renamed PSYNC working
            // answers +FULLRESYNC / +CONTINUE instead).
            let epoch = shared.checkpoint.as_ref().map_or(1, |c| c.epoch + 1);
            tracing::warn!(shard = %shard, source = %address, epoch, "the master answered {} with an RDB and no position, as it answers SYNC (open-source Redis does so for a renamed PSYNC): every reconnection will be a full sync", psync.unwrap_or_default());
            counter!("source_full_syncs_total", "shard" => shard.clone()).increment(1);
            let (builder, offset) =
                full_sync(&mut conn, shared, publisher, "", 0, epoch, shutdown).await?;
            snapshot_only_done(&cfg, epoch, &builder)?;
            (builder, String::new(), offset)
        }
        PsyncReply::Refused(refusal) if refusal.meaning() == Meaning::UnknownCommand => {
            let message = refusal.to_string();
            let Some(sync) = sync else {
                return Err(LinkError::Fatal(format!(
                    "source {address}: the master does not know PSYNC as {:?} ({message}) and SYNC is disabled (redis.rename_commands): set redis.rename_commands.PSYNC to the name the master's rename-command gives it",
                    psync.unwrap_or_default()
                )));
            };
            // A master before 2.8: SYNC sends the RDB with no replication id or offset, so the
            // position cannot be resumed and every session starts with a full sync.
            let epoch = shared.checkpoint.as_ref().map_or(1, |c| c.epoch + 1);
            tracing::warn!(shard = %shard, source = %address, epoch, "the master does not know PSYNC ({message}): falling back to SYNC; every reconnection will be a full sync");
            counter!("source_full_syncs_total", "shard" => shard.clone()).increment(1);
            conn.send(&[sync.as_bytes()]).await?;
            let (builder, offset) =
                match full_sync(&mut conn, shared, publisher, "", 0, epoch, shutdown).await {
                    Err(e) if e.unknown_command() => {
                        return Err(LinkError::Fatal(format!(
                            "{e}: the master knows neither PSYNC as {:?} nor SYNC as {sync:?}; set redis.rename_commands to the names its rename-command gives them",
                            psync.unwrap_or_default()
                        )))
                    }
                    other => other?,
                };
            snapshot_only_done(&cfg, epoch, &builder)?;
            (builder, String::new(), offset)
        }
        PsyncReply::Refused(refusal) => {
            let context = format!("source {address}: {}", psync.unwrap_or_default());
            return Err(LinkError::Refused { context, refusal });
        }
    };
    gauge!("source_link_up", "shard" => shard.clone()).set(1.0);
    gauge!("source_epoch", "shard" => shard.clone()).set(builder.epoch() as f64);
    tracing::info!(shard = %shard, offset = %start_offset, "streaming from offset {start_offset} (sync took {:?})", sync_started.elapsed());
    let result = stream(
        conn,
        shared,
        publisher,
        &mut builder,
        replid,
        start_offset,
        acks,
        replconf.unwrap_or_else(|| "REPLCONF".to_owned()),
        shutdown,
    )
    .await;
    gauge!("source_link_up", "shard" => shard.clone()).set(0.0);
    result
}

pub(super) async fn save_checkpoint(
    shared: &mut Shared,
    publisher: &Publisher,
    mut c: Checkpoint,
) -> Result<(), LinkError> {
    c.written_ms = service::now_ms();
    c.nodes = shared.nodes.clone();
    publisher
        .send_and_wait(
            &shared.checkpoint_topic,
            shared.shard.as_bytes(),
            &checkpoint::encode(&c),
        )
        .await
        .map_err(|e| LinkError::Transient(e.to_string()))?;
    counter!("source_checkpoints_total", "shard" => shared.shard.clone()).increment(1);
    gauge!("source_checkpoint_offset", "shard" => shared.shard.clone()).set(c.offset as f64);
    if let Some(migrations) = &shared.migrations {
        // This shard's deletes that imports were ordered after, or that were dropped for them,
        // are below its checkpoint now, never to be replayed: those imports need not be
        // remembered. Should this fail, the records only stay (a later import replaces them).
        let settled = migrations.settled(&shared.shard, c.offset);
        if !settled.is_empty() {
            let keys: Vec<Vec<u8>> = settled.iter().map(|k| checkpoint::import_key(k)).collect();
            let tombstones: Vec<_> = keys.iter().map(|k| (k.as_slice(), None)).collect();
            match publisher
                .send_all_and_wait(&shared.checkpoint_topic, &tombstones)
                .await
            {
                Ok(()) => counter!("source_migration_imports_settled_total", "shard" => shared.shard.clone())
                    .increment(keys.len() as u64),
                Err(e) => tracing::warn!(shard = %shared.shard, "cannot forget {} settled imported key(s): {e}", keys.len()),
            }
        }
    }
    tracing::debug!(shard = %shared.shard, "checkpoint epoch {} offset {} snapshot_done {}", c.epoch, c.offset, c.snapshot_done);
    shared.checkpoint = Some(c);
    Ok(())
}
