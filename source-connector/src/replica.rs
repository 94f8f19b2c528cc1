//! The replica link: connect to the source as a replica, sync, and publish everything it sends.
//!
//! One [`Session`] is one connection. It ends with an error that says whether retrying can help
//! ([`LinkError::Transient`]) or not ([`LinkError::Fatal`], for example a wrong password); the
//! caller reconnects with backoff and resumes from the durable checkpoint.

use crate::checkpoint::{self, Checkpoint};
use crate::config::{Config, Endpoint, SyncMode};
use crate::publish::{PublishError, Publisher};
use crate::rdb;
use crate::records::{Builder, Mark};
use crate::resp;
use crate::transfer::{self, PsyncReply, RdbFraming, EOF_MARK_LEN};
use metrics::{counter, gauge};
use proto::v1;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Worth retrying after a pause (connection refused or lost, `-LOADING`, a Kafka failure).
    #[error("{0}")]
    Transient(String),
    /// Retrying cannot help until an operator acts (authentication, permissions).
    #[error("{0}")]
    Fatal(String),
    /// Nothing left to do: `sync.mode = "full"` and the snapshot is in Kafka.
    #[error("{0}")]
    Done(String),
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

type Reader = Box<dyn AsyncRead + Unpin + Send>;
type Writer = Box<dyn AsyncWrite + Unpin + Send>;

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
    pub migrations: Option<std::sync::Arc<crate::cluster::Migrations>>,
}

const READ_CHUNK: usize = 256 * 1024;

/// RESP encoding of a command.
fn encode_command(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

struct Conn {
    rd: Reader,
    wr: Writer,
    buf: Vec<u8>,
    address: String,
    timeout: Duration,
}

impl Conn {
    async fn connect(
        endpoint: &Endpoint,
        timeout: Duration,
        tls: &crate::tls::TlsFiles,
    ) -> Result<Conn, LinkError> {
        let address = endpoint.address();
        let stream = tokio::time::timeout(timeout, TcpStream::connect(&address))
            .await
            .map_err(|_| {
                LinkError::Transient(format!(
                    "source {address}: connect timed out after {timeout:?}"
                ))
            })?
            .map_err(|e| LinkError::Transient(format!("source {address}: cannot connect: {e}")))?;
        let _ = stream.set_nodelay(true);
        let (rd, wr): (Reader, Writer) = if endpoint.tls {
            let config = tls
                .client_config()
                .map_err(|e| LinkError::Fatal(format!("source {address}: {e}")))?;
            let stream =
                tokio::time::timeout(timeout, crate::tls::connect(config, &endpoint.host, stream))
                    .await
                    .map_err(|_| {
                        LinkError::Transient(format!("source {address}: TLS handshake timed out"))
                    })?
                    .map_err(|e| {
                        // A certificate the configured CA did not sign does not fix itself.
                        let fatal = e.kind() == std::io::ErrorKind::InvalidData;
                        let message = format!("source {address}: TLS handshake failed: {e}");
                        if fatal {
                            LinkError::Fatal(message)
                        } else {
                            LinkError::Transient(message)
                        }
                    })?;
            let (rd, wr) = tokio::io::split(stream);
            (Box::new(rd), Box::new(wr))
        } else {
            let (rd, wr) = stream.into_split();
            (Box::new(rd), Box::new(wr))
        };
        Ok(Conn {
            rd,
            wr,
            buf: Vec::with_capacity(READ_CHUNK),
            address,
            timeout,
        })
    }

    async fn send(&mut self, args: &[&[u8]]) -> Result<(), LinkError> {
        self.wr.write_all(&encode_command(args)).await.map_err(|e| {
            LinkError::Transient(format!("source {}: write failed: {e}", self.address))
        })
    }

    /// Reads more bytes into the buffer; fails on EOF or timeout.
    async fn fill(&mut self, timeout: Duration) -> Result<usize, LinkError> {
        let mut chunk = vec![0u8; READ_CHUNK];
        let n = tokio::time::timeout(timeout, self.rd.read(&mut chunk))
            .await
            .map_err(|_| {
                LinkError::Transient(format!(
                    "source {}: nothing received for {timeout:?}",
                    self.address
                ))
            })?
            .map_err(|e| {
                LinkError::Transient(format!("source {}: read failed: {e}", self.address))
            })?;
        if n == 0 {
            return Err(LinkError::Transient(format!(
                "source {}: connection closed by the master",
                self.address
            )));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// One reply line of the handshake (keep-alive newlines skipped).
    async fn reply_line(&mut self) -> Result<String, LinkError> {
        loop {
            let skip = transfer::skip_newlines(&self.buf);
            if let Some(i) = self.buf[skip..].iter().position(|&b| b == b'\n') {
                let line = String::from_utf8_lossy(&self.buf[skip..skip + i])
                    .trim_end_matches('\r')
                    .to_owned();
                self.buf.drain(..skip + i + 1);
                return Ok(line);
            }
            self.fill(self.timeout).await?;
        }
    }

    /// Sends a handshake command and expects `+OK` (or anything not an error).
    async fn command(&mut self, what: &str, args: &[&[u8]]) -> Result<String, LinkError> {
        self.send(args).await?;
        let line = self.reply_line().await?;
        if let Some(err) = line.strip_prefix('-') {
            let code = err.split(' ').next().unwrap_or_default();
            let message = format!("source {}: {what} refused: {err}", self.address);
            return Err(match code {
                "NOAUTH" | "WRONGPASS" | "NOPERM" | "ERR" if is_auth_problem(err) => {
                    LinkError::Fatal(message)
                }
                "NOAUTH" | "WRONGPASS" | "NOPERM" => LinkError::Fatal(message),
                _ => LinkError::Transient(message),
            });
        }
        Ok(line)
    }
}

/// An error reply saying the master does not know a command (masters before 2.8 and PSYNC or
/// REPLCONF).
fn is_unknown_command(message: &str) -> bool {
    message.to_ascii_lowercase().contains("unknown command")
}

fn is_auth_problem(err: &str) -> bool {
    let e = err.to_ascii_lowercase();
    e.contains("password") || e.contains("auth") || e.contains("permission")
}

/// `sync.mode = "full"`: the snapshot is in Kafka, the connector's work is done.
fn snapshot_only_done(cfg: &Config, epoch: u64, builder: &Builder) -> Result<(), LinkError> {
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

    // Handshake.
    if let Some(password) = shared.endpoint.password.clone() {
        match shared.endpoint.user.clone() {
            Some(user) => {
                conn.command("AUTH", &[b"AUTH", user.as_bytes(), password.as_bytes()])
                    .await?
            }
            None => {
                conn.command("AUTH", &[b"AUTH", password.as_bytes()])
                    .await?
            }
        };
    }
    let port = cfg.redis.listening_port.to_string();
    // The names the master knows the replication commands by (`redis.rename_commands`).
    let replconf = cfg.command("REPLCONF");
    let psync = cfg.command("PSYNC");
    let sync = cfg.command("SYNC");
    // Whether the master takes REPLCONF, and so REPLCONF ACK (masters before 2.8 answer it
    // with an error in the middle of the stream). A master that does waits for the first ACK
    // after a diskless transfer before it streams writes, whether the sync was PSYNC or SYNC.
    let mut acks = replconf.is_some();
    for (what, args) in replconf.iter().flat_map(|replconf| {
        [
            (
                "REPLCONF listening-port",
                vec![replconf.as_bytes(), b"listening-port", port.as_bytes()],
            ),
            (
                "REPLCONF capa",
                vec![replconf.as_bytes(), b"capa", b"eof", b"capa", b"psync2"],
            ),
        ]
    }) {
        match conn.command(what, &args).await {
            Ok(_) => {}
            // Masters before 2.8 have no REPLCONF: SYNC follows.
            Err(LinkError::Transient(m)) if is_unknown_command(&m) => {
                tracing::warn!(shard = %shard, "{m}: a master before 2.8, or REPLCONF renamed there (redis.rename_commands)");
                acks = false;
            }
            Err(e) => return Err(e),
        }
    }
    let reply = match psync {
        Some(psync) => {
            let (replid, offset) = Checkpoint::psync_args(shared.checkpoint.as_ref());
            tracing::info!(shard = %shard, source = %address, %replid, offset = %offset, "{psync} {replid} {offset}");
            conn.send(&[psync.as_bytes(), replid.as_bytes(), offset.as_bytes()])
                .await?;
            loop {
                match transfer::psync_reply(&conn.buf) {
                    Ok(Some((reply, used))) => {
                        conn.buf.drain(..used);
                        break reply;
                    }
                    Ok(None) => {
                        conn.fill(timeout).await?;
                    }
                    Err(e) => return Err(LinkError::Transient(format!("source {address}: {e}"))),
                }
            }
        }
        // PSYNC disabled on the master: SYNC it is.
        None => PsyncReply::Error {
            code: "ERR".into(),
            message: "unknown command 'PSYNC' (disabled in redis.rename_commands)".into(),
        },
    };

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
        PsyncReply::Error { message, .. } if is_unknown_command(&message) => {
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
                    Err(LinkError::Transient(m)) if is_unknown_command(&m) => {
                        return Err(LinkError::Fatal(format!(
                            "{m}: the master knows neither PSYNC as {:?} nor SYNC as {sync:?}; set redis.rename_commands to the names its rename-command gives them",
                            psync.unwrap_or_default()
                        )))
                    }
                    other => other?,
                };
            snapshot_only_done(&cfg, epoch, &builder)?;
            (builder, String::new(), offset)
        }
        PsyncReply::Error { code, message } => {
            let message = format!("source {address}: PSYNC refused: {message}");
            return Err(match code.as_str() {
                "NOAUTH" | "WRONGPASS" | "NOPERM" => LinkError::Fatal(message),
                _ => LinkError::Transient(message),
            });
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
        replconf.unwrap_or("REPLCONF").to_owned(),
        shutdown,
    )
    .await;
    gauge!("source_link_up", "shard" => shard.clone()).set(0.0);
    result
}

async fn save_checkpoint(
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

/// Receives the RDB and publishes the snapshot. Returns the builder and the offset the command
/// stream starts at.
async fn full_sync(
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
            Err(e) => return Err(LinkError::Transient(format!("source {address}: {e}"))),
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

/// The command stream: publish writes, answer GETACK, acknowledge durable progress every
/// second, heartbeat every second and checkpoint what Kafka acknowledged.
async fn stream(
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
                    if crate::cluster::Migrations::is_import(&cmd.args) {
                        // Published after the old owner's delete, and remembered in the
                        // checkpoint topic first (ADR 0007); imports that follow at once are
                        // written together.
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
async fn publish_imports(
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
async fn ack_loop(
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
