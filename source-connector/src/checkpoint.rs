//! The source's durable position, stored in a compacted Kafka topic keyed by source shard.
//!
//! A checkpoint is written only for a [`Mark`](crate::records::Mark) that Kafka has acknowledged
//! with every record before it, so resuming from it never leaves a gap. Before the first record
//! of a new epoch is published, the epoch itself is checkpointed (with `snapshot_done = false`),
//! so an interrupted snapshot is always redone under a newer epoch and positions keep growing.

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Replication id the offset belongs to.
    pub replid: String,
    /// Everything before this replication offset is in Kafka.
    pub offset: u64,
    pub epoch: u64,
    /// The epoch's snapshot is completely in Kafka; when false, the next sync must be full.
    pub snapshot_done: bool,
    /// When it was written (Unix ms), for operators.
    #[serde(default)]
    pub written_ms: i64,
    /// Cluster sources: node ids of the shard's master and replicas (ADR 0007).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<String>,
}

impl Checkpoint {
    /// Arguments for `PSYNC`: resume after the checkpoint, or ask for a full sync.
    pub fn psync_args(this: Option<&Checkpoint>) -> (String, String) {
        match this {
            Some(c) if c.snapshot_done && c.replid.len() == 40 => {
                (c.replid.clone(), (c.offset + 1).to_string())
            }
            _ => ("?".into(), "-1".into()),
        }
    }
}

/// Reads the latest checkpoint of `shard` from the checkpoint topic (partition 0).
pub fn load(
    client: &rdkafka::ClientConfig,
    topic: &str,
    shard: &str,
) -> anyhow::Result<Option<Checkpoint>> {
    Ok(load_all(client, topic)?.checkpoints.remove(shard))
}

/// Everything the checkpoint topic holds, latest record per key.
#[derive(Debug, Default)]
pub struct Stored {
    /// Per source shard.
    pub checkpoints: std::collections::HashMap<String, Checkpoint>,
    /// Keys a cluster shard imported (`RESTORE-ASKING`) whose old owner's delete may still be
    /// replayed: key → importing shard (ADR 0007).
    pub imports: std::collections::HashMap<bytes::Bytes, String>,
}

/// Where the record of an imported key is kept: its own compacted key, so a later import of the
/// same key replaces it and a tombstone removes it. A shard name cannot start with NUL.
const IMPORT_PREFIX: &[u8] = b"\0import\0";

/// The checkpoint-topic key of an imported key's record.
pub fn import_key(key: &[u8]) -> Vec<u8> {
    [IMPORT_PREFIX, key].concat()
}

#[derive(Debug, Serialize, Deserialize)]
struct Import {
    /// The shard that imported the key.
    shard: String,
    written_ms: i64,
}

/// The value of an imported key's record.
pub fn encode_import(shard: &str) -> Vec<u8> {
    serde_json::to_vec(&Import {
        shard: shard.to_owned(),
        written_ms: service::now_ms(),
    })
    .expect("an import serializes")
}

/// The latest checkpoint of every shard, and the imported keys, in the checkpoint topic
/// (partition 0).
pub fn load_all(client: &rdkafka::ClientConfig, topic: &str) -> anyhow::Result<Stored> {
    let mut latest = Stored::default();
    let mut c = client.clone();
    c.set("group.id", "redis-repl-source-checkpoint-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false");
    let consumer: BaseConsumer = c
        .create()
        .map_err(|e| anyhow::anyhow!("cannot create a Kafka consumer to read {topic}: {e}"))?;
    let (low, high) = consumer
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .map_err(|e| anyhow::anyhow!("cannot read the checkpoint topic {topic}: {e}"))?;
    if high <= low {
        return Ok(latest);
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(low))?;
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut next = low;
    while next < high {
        anyhow::ensure!(
            Instant::now() < deadline,
            "reading the checkpoint topic {topic} timed out at offset {next} of {high}"
        );
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = msg.map_err(|e| anyhow::anyhow!("reading {topic}: {e}"))?;
        next = msg.offset() + 1;
        let Some(key) = msg.key() else {
            continue;
        };
        if let Some(imported) = key.strip_prefix(IMPORT_PREFIX) {
            let imported = bytes::Bytes::copy_from_slice(imported);
            match msg.payload() {
                Some(p) => {
                    let i: Import = serde_json::from_slice(p).map_err(|e| {
                        anyhow::anyhow!(
                            "imported-key record at {topic} offset {} is not valid: {e}",
                            msg.offset()
                        )
                    })?;
                    latest.imports.insert(imported, i.shard);
                }
                None => {
                    latest.imports.remove(&imported);
                }
            }
            continue;
        }
        let shard = String::from_utf8_lossy(key).into_owned();
        match msg.payload() {
            Some(p) => {
                let c: Checkpoint = serde_json::from_slice(p).map_err(|e| {
                    anyhow::anyhow!(
                        "checkpoint of shard {shard} at {topic} offset {} is not valid: {e}",
                        msg.offset()
                    )
                })?;
                latest.checkpoints.insert(shard, c);
            }
            None => {
                latest.checkpoints.remove(&shard);
            }
        }
    }
    Ok(latest)
}

pub fn encode(c: &Checkpoint) -> Vec<u8> {
    serde_json::to_vec(c).expect("a checkpoint serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psync_arguments() {
        assert_eq!(Checkpoint::psync_args(None), ("?".into(), "-1".into()));
        let mut c = Checkpoint {
            replid: "a".repeat(40),
            offset: 100,
            epoch: 3,
            snapshot_done: true,
            written_ms: 0,
            nodes: vec!["n1".into()],
        };
        assert_eq!(
            Checkpoint::psync_args(Some(&c)),
            ("a".repeat(40), "101".into())
        );
        c.snapshot_done = false;
        assert_eq!(Checkpoint::psync_args(Some(&c)), ("?".into(), "-1".into()));
        let back: Checkpoint = serde_json::from_slice(&encode(&c)).unwrap();
        assert_eq!(back, c);
    }
}
