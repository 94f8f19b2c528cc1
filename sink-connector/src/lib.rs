//! The sink connector: consumes the replication topic and applies it to a target Redis.
//!
//! - [`config`]: the TOML/environment configuration;
//! - [`convert`]: what a record means as Redis commands (RESTORE, or rebuilt values);
//! - [`filter`]: key, db and command filters, and the rate limit;
//! - [`target`]: the target connection, `MULTI/EXEC` batches (`write`), cluster routing
//!   (`routed`), the key scan (`keys`) and error classification (`error`);
//! - [`cluster`]: routing writes and checkpoints on a Redis Cluster target;
//! - [`lane`]: one ordered lane per partition, checkpoints in the target, barriers;
//! - [`run`]: the consumer group and rebalances;
//! - [`verify`]: source and target compared key by key.

pub mod check;
pub mod cluster;
pub mod config;
pub mod convert;
pub mod filter;
pub mod incoming;
pub mod lane;
pub mod run;
pub mod target;
pub mod verify;
