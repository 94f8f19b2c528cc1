//! The topic contract between `source-connector` and `sink-connector` (DESIGN §4).
//!
//! - [`v1`]: the protobuf envelope ([`v1::Record`]) and every body, generated from
//!   `schemas/redis_repl/v1/record.proto` at build time (protox, no system `protoc`).
//! - [`slot`]: the cluster slot of a key (CRC16/XMODEM with hash tags).
//! - [`position`]: `(epoch, replication offset, sequence)` and its total order.
//! - [`topic`]: record keys, slot → partition, header names, encoding and decoding of messages.
//! - [`chunk`]: how big values are split into records below a size limit.
//!
//! Every client of the topic goes through this crate, so producer and consumer cannot disagree.

pub mod chunk;
pub mod position;
pub mod slot;
pub mod topic;

/// Generated protobuf types of package `redis_repl.v1`.
#[allow(missing_debug_implementations, clippy::all)]
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/redis_repl.v1.rs"));
}

/// The schema version written in every record and in the `redis-repl-schema-version` header.
/// Consumers refuse records with a newer major version rather than misreading them.
pub const SCHEMA_VERSION: u32 = 1;

/// Descriptor set compiled from `schemas/` in this build (used by the compatibility test and by
/// tools that decode records without generated code).
pub const DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/redis_repl_v1.binpb"));

pub use position::Position;
pub use slot::{key_slot, Slot};
pub use topic::{Partition, RecordKey};
