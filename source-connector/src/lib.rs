//! The source connector: poses as a Redis replica and publishes what it receives to Kafka.
//!
//! Layout follows the data:
//! - [`resp`]: the RESP command stream after the snapshot, with byte-exact replication offsets;
//! - [`rdb`]: the streaming RDB decoder (snapshot);
//! - [`transfer`]: the PSYNC reply and RDB transfer framing;
//! - [`dump`]: `rdb-dump`, the logical content of an RDB file as JSON.
//!
//! `resp` and `rdb` do no I/O: bytes in, values out.

pub mod dump;
pub mod rdb;
pub mod resp;
pub mod transfer;
