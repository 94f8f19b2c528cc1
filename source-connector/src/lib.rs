//! The source connector: poses as a Redis replica and publishes what it receives to Kafka.
//!
//! Layout follows the data:
//! - [`resp`]: the RESP command stream after the snapshot, with byte-exact replication offsets;
//! - [`rdb`]: the streaming RDB decoder (snapshot);
//! - [`transfer`]: the PSYNC reply and RDB transfer framing;
//! - [`dump`]: `rdb-dump`, the logical content of an RDB file as JSON;
//! - [`commands`]: which slots a command touches, and so how it is published;
//! - [`records`]: RDB items and commands into topic records;
//! - [`publish`]: producing to Kafka and tracking what it acknowledged;
//! - [`checkpoint`]: the durable resume position;
//! - [`replica`]: the replica link (handshake, sync, stream, ACKs);
//! - [`cluster`]: the masters of a cluster source, found again after failovers;
//! - [`migration`]: keys moving between the shards of a cluster source (ADR 0007);
//! - [`sentinel`]: the master of a source behind Redis Sentinel, followed across failovers;
//! - [`run`]: topic preparation, one reconnect loop per source shard (cluster and Sentinel
//!   sources in their own parts).
//!
//! `resp`, `rdb`, `commands` and `records` do no I/O: bytes in, values out.

pub mod check;
pub mod checkpoint;
pub mod cluster;

pub mod config;
pub mod dump;
pub mod migration;
pub mod publish;
pub mod records;
pub mod replica;
pub mod run;
pub mod sentinel;
pub mod transfer;

pub use service::tls;
pub use wire::{commands, rdb, resp};
