//! The handshake of a replica: `AUTH`, `REPLCONF listening-port` and `capa`, then `PSYNC` with
//! the checkpoint's position (or what stands for it on masters that lack some of them).

use super::connection::Conn;
use super::{LinkError, Shared};
use crate::checkpoint::Checkpoint;
use crate::transfer::{self, PsyncReply};
use wire::refusal::Refusal;

/// What the handshake settled.
pub(super) struct Handshake {
    /// The master's answer to `PSYNC`.
    pub(super) reply: PsyncReply,
    /// Whether the master takes `REPLCONF`, and so `REPLCONF ACK` (masters before 2.8 answer it
    /// with an error in the middle of the stream). A master that does waits for the first ACK
    /// after a diskless transfer before it streams writes, whether the sync was PSYNC or SYNC.
    pub(super) acks: bool,
    /// The names the master knows `REPLCONF`, `PSYNC` and `SYNC` by (`redis.rename_commands`;
    /// none where disabled).
    pub(super) replconf: Option<String>,
    pub(super) psync: Option<String>,
    pub(super) sync: Option<String>,
}

/// Authenticates, announces the replica and asks to resume from the checkpoint.
pub(super) async fn run(conn: &mut Conn, shared: &Shared) -> Result<Handshake, LinkError> {
    let shard = &shared.shard;
    let address = conn.address.clone();
    let timeout = conn.timeout;
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
    let cfg = &shared.config;
    let port = cfg.redis.listening_port.to_string();
    // The names the master knows the replication commands by (`redis.rename_commands`).
    let replconf = cfg.command("REPLCONF");
    let psync = cfg.command("PSYNC");
    let sync = cfg.command("SYNC");
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
            Err(e) if e.unknown_command() => {
                tracing::warn!(shard = %shard, "{e}: a master before 2.8, or REPLCONF renamed there (redis.rename_commands)");
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
                    Err(e) => return Err(LinkError::sync_reply(&address, e)),
                }
            }
        }
        // PSYNC disabled on the master: SYNC it is.
        None => PsyncReply::Refused(Refusal {
            code: "ERR".into(),
            message: "unknown command 'PSYNC' (disabled in redis.rename_commands)".into(),
        }),
    };

    Ok(Handshake {
        reply,
        acks,
        replconf: replconf.map(str::to_owned),
        psync: psync.map(str::to_owned),
        sync: sync.map(str::to_owned),
    })
}
