//! The command stream after the sync: writes published in order, `REPLCONF ACK` of what Kafka
//! acknowledged, heartbeats and checkpoints.

use super::connection::{encode_command, Conn, Writer, READ_CHUNK};
use super::{save_checkpoint, LinkError, Shared};
use crate::checkpoint::{self, Checkpoint};
use crate::publish::Publisher;
use crate::records::{Builder, Mark};
use crate::resp;
use metrics::{counter, gauge};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

/// The command stream: publish writes, answer GETACK, acknowledge durable progress every
/// second, heartbeat every second and checkpoint what Kafka acknowledged.
pub(super) async fn stream(
    conn: Conn,
    shared: &mut Shared,
    publisher: &mut Publisher,
    builder: &mut Builder,
    replid: String,
    start_offset: u64,
    acks: bool,
    replconf: String,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), LinkError> {
    let shard = shared.shard.clone();
    let address = conn.address.clone();
    let Conn {
        mut rd, wr, buf, ..
    } = conn;
    let mut decoder = resp::Decoder::new(start_offset, resp::Limits::default());
    decoder.feed(&buf);

    // ACKs go out from their own task so they continue while publishing waits on Kafka.
    let acked = publisher.acked();
    if let Some(migrations) = &shared.migrations {
        migrations.register_acked(&shard, acked.clone());
    }
    let (getack_tx, getack_rx) = mpsc::channel::<()>(16);
    let (writer_dead_tx, mut writer_dead) = mpsc::channel::<String>(1);
    let ack_floor = start_offset;
    let writer = tokio::spawn(ack_loop(
        wr,
        acked.clone(),
        getack_rx,
        ack_floor,
        writer_dead_tx,
        acks,
        replconf,
    ));

    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut chunk = vec![0u8; READ_CHUNK];
    let mut saved: Option<Mark> = None;
    let epoch = builder.epoch();
    let silence_limit = Duration::from_secs(shared.config.redis.repl_timeout_s);
    let mut last_received = Instant::now();
    let mut imports: Vec<resp::Command> = Vec::new();
    let result: Result<(), LinkError> = 'session: loop {
        // Publish every complete command.
        let publishing = Instant::now();
        loop {
            let cmd = match decoder.next_command() {
                Ok(Some(c)) => c,
                Ok(None) => break,
                Err(e) => {
                    counter!("source_stream_errors_total", "shard" => shard.clone()).increment(1);
                    break 'session Err(LinkError::Transient(format!("source {address}: {e}")));
                }
            };
            if cmd.kind == resp::Kind::GetAck {
                let _ = getack_tx.try_send(());
            }
            gauge!("source_offset_received", "shard" => shard.clone()).set(cmd.end_offset as f64);
            if shared.scope.has_changed().unwrap_or(false) {
                builder.set_scope(shared.scope.borrow_and_update().clone());
            }
            let cmd = match shared
                .migrations
                .clone()
                .filter(|_| cmd.kind == resp::Kind::Write)
            {
                Some(migrations) => {
                    let before = migrations.order(&shard, &cmd.args, cmd.end_offset);
                    if crate::migration::Migrations::is_import(&cmd.args) {
                        // Published after the old owner's delete, and remembered in the
                        // checkpoint topic first (ADR 0007); imports that follow at once are
                        // written together.
                        // What this shard holds goes out first: the other shard may be
                        // waiting on one of its deletes just as this one waits on that shard.
                        publisher.send().await?;
                        let after = migrations.wait(&shard, before).await;
                        migrations.imported(&shard, &cmd.args[1], after);
                        imports.push(cmd);
                        continue;
                    }
                    match migrations.filter(&shard, cmd.args, cmd.end_offset) {
                        Some(args) => resp::Command { args, ..cmd },
                        // Nothing left to publish; the offset still advances.
                        None => resp::Command {
                            args: Vec::new(),
                            kind: resp::Kind::Ping,
                            ..cmd
                        },
                    }
                }
                None => cmd,
            };
            publish_imports(shared, publisher, builder, &mut imports).await?;
            for out in builder.command(cmd) {
                publisher.publish(out).await?;
            }
        }
        publish_imports(shared, publisher, builder, &mut imports).await?;
        // Everything read so far goes to Kafka before waiting for more.
        publisher.send().await?;
        if publishing.elapsed() > Duration::from_millis(500) {
            // Waiting on Kafka is not silence from the master: we were not reading.
            last_received = Instant::now();
        }
        tokio::select! {
            r = rd.read(&mut chunk) => match r {
                Ok(0) => break Err(LinkError::Transient(format!("source {address}: connection closed by the master"))),
                Ok(n) => {
                    last_received = Instant::now();
                    decoder.feed(&chunk[..n]);
                }
                Err(e) => break Err(LinkError::Transient(format!("source {address}: read failed: {e}"))),
            },
            _ = tick.tick() => {
                if last_received.elapsed() > silence_limit {
                    // A half-open link: the master pings every repl-ping-replica-period, so
                    // silence this long means the connection is dead without a reset.
                    break Err(LinkError::Transient(format!(
                        "source {address}: nothing received for {:?} (redis.repl_timeout_s); the link is dead, reconnecting",
                        last_received.elapsed()
                    )));
                }
                if let Some(hb) = builder.heartbeat() {
                    publisher.publish(hb).await?;
                    publisher.send().await?;
                }
                let current = *acked.borrow();
                if let Some(mark) = current {
                    if saved != Some(mark) {
                        save_checkpoint(shared, publisher, Checkpoint {
                            replid: replid.clone(),
                            offset: mark.offset,
                            epoch,
                            snapshot_done: mark.snapshot_done,
                            written_ms: 0,
                            nodes: Vec::new(),
                        }).await?;
                        saved = Some(mark);
                    }
                }
            }
            Some(e) = writer_dead.recv() => break Err(LinkError::Transient(format!("source {address}: {e}"))),
            _ = shutdown.changed() => {
                if *shutdown.borrow() {
                    break Ok(());
                }
            }
        }
    };
    // Whatever happened, record what Kafka has acknowledged.
    let final_mark = match &result {
        // Shutdown: give Kafka a little time to acknowledge what is in flight.
        Ok(()) => match tokio::time::timeout(Duration::from_secs(10), publisher.flush()).await {
            Ok(r) => r.ok().flatten(),
            Err(_) => {
                tracing::warn!(shard = %shard, "Kafka did not acknowledge the last records within 10 s; they will be republished on restart");
                *acked.borrow()
            }
        },
        Err(_) => *acked.borrow(),
    };
    if let Some(mark) = final_mark {
        if saved != Some(mark) {
            let _ = tokio::time::timeout(
                Duration::from_secs(10),
                save_checkpoint(
                    shared,
                    publisher,
                    Checkpoint {
                        replid: replid.clone(),
                        offset: mark.offset,
                        epoch,
                        snapshot_done: mark.snapshot_done,
                        written_ms: 0,
                        nodes: Vec::new(),
                    },
                ),
            )
            .await;
        }
    }
    writer.abort();
    result
}

/// Writes the held imports to the checkpoint topic, then publishes them (ADR 0007).
pub(super) async fn publish_imports(
    shared: &Shared,
    publisher: &mut Publisher,
    builder: &mut Builder,
    imports: &mut Vec<resp::Command>,
) -> Result<(), LinkError> {
    if imports.is_empty() {
        return Ok(());
    }
    let value = checkpoint::encode_import(&shared.shard);
    let keys: Vec<Vec<u8>> = imports
        .iter()
        .map(|c| checkpoint::import_key(&c.args[1]))
        .collect();
    let records: Vec<_> = keys
        .iter()
        .map(|k| (k.as_slice(), Some(value.as_slice())))
        .collect();
    let started = Instant::now();
    publisher
        .send_all_and_wait(&shared.checkpoint_topic, &records)
        .await
        .map_err(|e| {
            LinkError::Transient(format!(
                "cannot remember {} imported key(s): {e}",
                imports.len()
            ))
        })?;
    counter!("source_migration_imports_remembered_total", "shard" => shared.shard.clone())
        .increment(imports.len() as u64);
    tracing::debug!(shard = %shared.shard, "remembered {} imported key(s) in {:?}", imports.len(), started.elapsed());
    for cmd in imports.drain(..) {
        for out in builder.command(cmd) {
            publisher.publish(out).await?;
        }
    }
    Ok(())
}

/// Sends `REPLCONF ACK <durably published offset>` every second and on `GETACK`.
pub(super) async fn ack_loop(
    mut wr: Writer,
    acked: watch::Receiver<Option<Mark>>,
    mut getack: mpsc::Receiver<()>,
    floor: u64,
    dead: mpsc::Sender<String>,
    enabled: bool,
    replconf: String,
) {
    if !enabled {
        // Keep the write half open (closing it would end the link) and send nothing.
        let _wr = wr;
        while getack.recv().await.is_some() {}
        return;
    }
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = getack.recv() => if r.is_none() { return },
        }
        let offset = acked.borrow().map_or(floor, |m| m.offset.max(floor));
        let off = offset.to_string();
        if let Err(e) = wr
            .write_all(&encode_command(&[
                replconf.as_bytes(),
                b"ACK",
                off.as_bytes(),
            ]))
            .await
        {
            let _ = dead.send(format!("cannot send REPLCONF ACK: {e}")).await;
            return;
        }
    }
}
