//! The Redis wire formats both connectors read, without I/O: RESP, the RDB snapshot, the command
//! table (which arguments are keys, which slot and partition a command goes to) and the merging
//! of decoded values into topic values. No tokio, Kafka or Redis client here: bytes in, values
//! out, so every piece is tested on its own and fuzzed.

pub mod commands;
pub mod merge;
pub mod rdb;
pub mod refusal;
pub mod resp;
