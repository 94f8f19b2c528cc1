//! The full sync: the RDB the master sends after `+FULLRESYNC` (or SYNC), decoded and
//! published as the snapshot of a new epoch.

use super::connection::Conn;
use super::{save_checkpoint, LinkError, Shared};
use crate::checkpoint::Checkpoint;
use crate::config::SyncMode;
use crate::publish::Publisher;
use crate::rdb;
use crate::records::Builder;
use crate::transfer::{self, RdbFraming, EOF_MARK_LEN};
use metrics::{counter, gauge};
use proto::v1;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// Receives the RDB and publishes the snapshot. Returns the builder and the offset the command
/// stream starts at.
pub(super) async fn full_sync(
    conn: &mut Conn,
    shared: &mut Shared,
    publisher: &mut Publisher,
    replid: &str,
    offset: u64,
    epoch: u64,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(Builder, u64), LinkError> {
    let shard = shared.shard.clone();
    let cfg = shared.config.clone();
    let address = conn.address.clone();
    // The new epoch is durable before any of its records is published.
    save_checkpoint(
        shared,
        publisher,
        Checkpoint {
            replid: replid.to_owned(),
            offset,
            epoch,
            snapshot_done: false,
            written_ms: 0,
            nodes: Vec::new(),
        },
    )
    .await?;
    let mut builder = Builder::new(
        shard.clone(),
        cfg.kafka.partitions,
        cfg.snapshot.piece_bytes,
        epoch,
        offset,
    )
    .scoped(shared.scope.borrow_and_update().clone());
    builder.begin_snapshot(epoch, offset);

    // The master may send newlines for a long time while it prepares the RDB.
    let framing = loop {
        match transfer::rdb_framing(&conn.buf) {
            Ok(Some((framing, used))) => {
                conn.buf.drain(..used);
                break framing;
            }
            Ok(None) => {
                let skip = transfer::skip_newlines(&conn.buf);
                conn.buf.drain(..skip);
                conn.fill(Duration::from_secs(cfg.redis.repl_timeout_s))
                    .await?;
            }
            Err(e) => return Err(LinkError::sync_reply(&address, e)),
        }
    };
    let (total, mark) = match &framing {
        RdbFraming::Length(n) => (Some(*n), None),
        RdbFraming::EofMark(m) => (None, Some(m.clone())),
    };
    gauge!("source_snapshot_total_bytes", "shard" => shard.clone()).set(total.unwrap_or(0) as f64);
    tracing::info!(shard = %shard, "receiving the RDB ({})", match total { Some(n) => format!("{n} bytes"), None => "diskless".into() });

    let start = v1::SnapshotStart {
        replid: bytes::Bytes::copy_from_slice(replid.as_bytes()),
        repl_offset: offset,
        rdb_version: 0,
        rdb_size_bytes: total,
        source_version: String::new(),
        partitions: cfg.kafka.partitions,
        scope: shared
            .scope
            .borrow()
            .iter()
            .map(|&(first, last)| v1::SlotRange {
                first: first.into(),
                last: last.into(),
            })
            .collect(),
    };
    let mut decoder = rdb::Decoder::new(rdb::Config {
        piece_bytes: cfg.snapshot.piece_bytes,
        dump_limit_bytes: cfg.snapshot.piece_bytes,
        ..rdb::Config::default()
    });
    let publish_keys = cfg.sync.mode != SyncMode::Incremental;
    if !publish_keys {
        tracing::warn!(shard = %shard, "sync.mode = \"incremental\": the keys of this snapshot (epoch {epoch}) are not published; the target gets only the writes from offset {offset} on, and keys written before are missing or stale there");
        counter!("source_snapshots_skipped_total", "shard" => shard.clone()).increment(1);
    }
    let mut received: u64 = 0;
    let mut last_progress = Instant::now();
    let started = Instant::now();
    loop {
        // Feed what belongs to the RDB.
        let take = match total {
            Some(n) => ((n - received) as usize).min(conn.buf.len()),
            None => conn.buf.len(),
        };
        if take > 0 {
            decoder.feed(&conn.buf[..take]);
            conn.buf.drain(..take);
            received += take as u64;
        }
        loop {
            let item = decoder.next_item().map_err(|e| {
                counter!("source_rdb_errors_total", "shard" => shard.clone()).increment(1);
                LinkError::Transient(format!("source {address}: RDB transfer: {e}"))
            })?;
            let Some(item) = item else { break };
            for out in builder.rdb_item(item, &start) {
                if !publish_keys
                    && matches!(
                        out.record.body,
                        Some(v1::record::Body::KeyEntry(_) | v1::record::Body::KeyChunk(_))
                    )
                {
                    continue;
                }
                publisher.publish(out).await?;
            }
        }
        if last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            gauge!("source_snapshot_bytes", "shard" => shard.clone()).set(received as f64);
            gauge!("source_snapshot_keys", "shard" => shard.clone()).set(builder.keys() as f64);
            if let Some(t) = total {
                gauge!("source_snapshot_progress_ratio", "shard" => shard.clone())
                    .set(received as f64 / t.max(1) as f64);
            }
            let pct = total
                .map(|t| format!(" ({:.1}%)", 100.0 * received as f64 / t.max(1) as f64))
                .unwrap_or_default();
            tracing::info!(shard = %shard, "snapshot: {received} bytes{pct}, {} keys", builder.keys());
        }
        if decoder.is_done() {
            match (total, &mark) {
                (Some(n), _) => {
                    if received == n {
                        decoder.finish().map_err(|e| {
                            LinkError::Transient(format!("source {address}: RDB transfer: {e}"))
                        })?;
                        break;
                    }
                }
                (None, Some(mark)) => {
                    let trailing = decoder.trailing();
                    if trailing.len() >= EOF_MARK_LEN {
                        if &trailing[..EOF_MARK_LEN] != mark.as_slice() {
                            return Err(LinkError::Transient(format!(
                                "source {address}: diskless RDB transfer does not end with its EOF mark"
                            )));
                        }
                        let rest = trailing[EOF_MARK_LEN..].to_vec();
                        received -= rest.len() as u64 + EOF_MARK_LEN as u64;
                        let mut buf = rest;
                        buf.extend_from_slice(&conn.buf);
                        conn.buf = buf;
                        break;
                    }
                }
                (None, None) => unreachable!("framing has a length or a mark"),
            }
        } else if total == Some(received) {
            return Err(LinkError::Transient(format!(
                "source {address}: RDB transfer of {received} bytes ended inside the RDB"
            )));
        }
        if *shutdown.borrow() {
            return Err(LinkError::Transient(
                "shutdown during the snapshot; it restarts on the next run".into(),
            ));
        }
        // Everything decoded so far goes to Kafka before waiting for more.
        publisher.send().await?;
        conn.fill(Duration::from_secs(cfg.redis.repl_timeout_s))
            .await
            .map_err(|e| match e {
                LinkError::Transient(m) => LinkError::Transient(format!(
                    "{m} during the RDB transfer, after {received} of {} bytes",
                    total.map_or_else(|| "?".to_string(), |t| t.to_string())
                )),
                fatal => fatal,
            })?;
    }
    gauge!("source_snapshot_bytes", "shard" => shard.clone()).set(received as f64);
    gauge!("source_snapshot_keys", "shard" => shard.clone()).set(builder.keys() as f64);
    gauge!("source_snapshot_progress_ratio", "shard" => shard.clone()).set(1.0);
    let end = builder.end_snapshot(received);
    publisher.publish(end).await?;
    tracing::info!(shard = %shard, "snapshot received: {received} bytes, {} keys in {:?}; waiting for Kafka to acknowledge it", builder.keys(), started.elapsed());
    // Checkpoint the completed snapshot at once: a crash from here on resumes with PSYNC.
    let acked = publisher.flush().await?;
    if let Some(mark) = acked {
        save_checkpoint(
            shared,
            publisher,
            Checkpoint {
                replid: replid.to_owned(),
                offset: mark.offset,
                epoch,
                snapshot_done: mark.snapshot_done,
                written_ms: 0,
                nodes: Vec::new(),
            },
        )
        .await?;
    }
    tracing::info!(shard = %shard, "snapshot acknowledged by Kafka after {:?}", started.elapsed());
    Ok((builder, offset))
}
