//! Every corpus replication capture (Redis 5.0 to 8.0 and Valkey 8, disk-based and diskless)
//! replayed by the fake master through the whole pipeline into a Debian 7.0 target: the target
//! ends equal to the capture's `final_dataset` (what a real replica of that version held).
//! Captures whose RDB version the target cannot RESTORE (7.2 and later, Valkey) go through the
//! sink's rebuild path (values recreated with type commands). Captures that use commands the
//! target does not know are skipped, and say why.

use harness::broker::{random_topic, Broker, Storage};
use harness::connector::{Connector, Kind};
use harness::dataset::{self, CompareOptions, Dataset};
use harness::fake_master::{FakeMaster, Playback};
use harness::pipeline::{sink_config, source_config, Options};
use harness::redis::{RedisConfig, RedisServer};
use std::time::{Duration, Instant};

/// Commands of the capture's stream that the target does not know.
fn unknown_commands(target: &RedisServer, capture: &serde_json::Value) -> Vec<String> {
    let mut names: Vec<String> = capture["commands"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| {
            c["cmd"]
                .as_array()?
                .first()?
                .as_str()
                .map(str::to_ascii_uppercase)
        })
        .collect();
    names.sort();
    names.dedup();
    names
        .into_iter()
        .filter(|n| {
            let info: redis::Value = redis::cmd("COMMAND")
                .arg("INFO")
                .arg(n)
                .query(&mut target.conn())
                .unwrap();
            matches!(info, redis::Value::Array(ref v) if v.first() == Some(&redis::Value::Nil))
        })
        .collect()
}

/// Keys whose TTL ends within a minute of now (or already has): the target may or may not hold
/// them depending on timing, so they are left out of the comparison on both sides.
fn without_expiring(mut d: Dataset, now_ms: i64, relative_ttls: bool) -> Dataset {
    if !relative_ttls {
        d.keys
            .retain(|_, e| e.ttl_ms.is_none_or(|t| t > now_ms + 60_000));
    }
    d
}

/// RDB version a corpus label writes (what the target must read to RESTORE its payloads).
fn rdb_version(label: &str) -> u32 {
    match label {
        l if l.starts_with("valkey") => 11,
        l if l.starts_with("7.2") => 11,
        l if l.starts_with("7.4") || l.starts_with('8') => 12,
        l if l.starts_with("7.0") => 10,
        _ => 9,
    }
}

#[test]
fn every_capture_through_the_pipeline() {
    let broker = Broker::start(Storage::Memory).unwrap();
    let mut ran = 0;
    let mut skipped = Vec::new();
    for label in harness::corpus::labels() {
        // The oldest version's disk capture is also replayed the way a master before 2.8 serves
        // it: PSYNC unknown, SYNC only.
        let oldest = label == harness::corpus::labels()[0];
        let variants = [
            ("stream", false),
            ("stream-diskless", false),
            ("stream", true),
        ];
        for (name, before_psync) in variants.into_iter().filter(|v| !v.1 || oldest) {
            let (bin, json) = harness::corpus::capture(&label, name);
            if !bin.exists() {
                continue;
            }
            let capture: serde_json::Value =
                serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
            let target =
                RedisServer::start(RedisConfig::default().with("maxmemory-policy", "noeviction"))
                    .unwrap();
            let unknown = unknown_commands(&target, &capture);
            if !unknown.is_empty() {
                skipped.push(format!("{label}/{name}: the 7.0 target lacks {unknown:?}"));
                continue;
            }
            let master = FakeMaster::start(Playback {
                before_psync,
                ..Playback::from_file(&bin).unwrap()
            })
            .unwrap();
            let name = if before_psync {
                "stream via SYNC"
            } else {
                name
            };
            let topic = random_topic("corpus");
            let options = Options::default();
            let source = Connector::start(
                Kind::Source,
                &source_config(&master.url(), &broker.bootstrap(), &topic, &options),
                &[],
            )
            .unwrap();
            let sink = Connector::start(
                Kind::Sink,
                &sink_config(&target.url(), &broker.bootstrap(), &topic, &options),
                &[],
            )
            .unwrap();
            let expected = Dataset::from_corpus_keys(&capture["final_dataset"]).unwrap();
            // The Debian target reads RDB 10: newer captures' values are rebuilt with commands.
            let rebuilt = rdb_version(&label) > 10;
            // Before 7.0, Redis propagates relative expiries (SETEX, SET EX, EXPIRE) as they
            // were written, so a replica's TTLs count from when it applies them: replaying a
            // capture days later gives later absolute TTLs, exactly as a native replica attached
            // today would. For those versions only the presence of a TTL is compared.
            let major: u32 = label
                .trim_start_matches("valkey-")
                .split('.')
                .next()
                .and_then(|m| m.parse().ok())
                .unwrap_or(0);
            let relative_ttls = !label.starts_with("valkey") && major < 7;
            let opts = CompareOptions {
                ignore_prefix: Some(harness::pipeline::CHECKPOINT_PREFIX.as_bytes().to_vec()),
                // The final dataset comes from a real replica; see harness::pipeline.
                stream_entries_read: false,
                ttl_tolerance_ms: if relative_ttls { i64::MAX / 4 } else { 2_000 },
                approx_ttl_tolerance_ms: if relative_ttls { i64::MAX / 4 } else { 10_000 },
            };
            let started = Instant::now();
            loop {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis() as i64;
                let want = without_expiring(expected.clone(), now, relative_ttls);
                let mut got = without_expiring(
                    dataset::read(&mut [target.conn()]).unwrap(),
                    now,
                    relative_ttls,
                );
                // Keys whose captured absolute expiry is already past (the corpus ages): the sink
                // defers such expiries by `apply.expired_grace_ms` instead of deleting at once
                // (docs/semantics.md), so they are left out on both sides.
                got.keys
                    .retain(|k, _| want.keys.contains_key(k) || !expected.keys.contains_key(k));
                let report = want.compare(&got, &opts);
                if report.is_equal() {
                    eprintln!(
                        "{label}/{name}: {} keys equal after {:?}{}",
                        report.compared,
                        started.elapsed(),
                        if rebuilt {
                            " (values rebuilt with commands)"
                        } else {
                            ""
                        }
                    );
                    break;
                }
                if started.elapsed() > Duration::from_secs(60) {
                    panic!(
                        "{label}/{name}: target differs from final_dataset:\n{report}\n---- source ----\n{}\n---- sink ----\n{}",
                        source.log(),
                        sink.log()
                    );
                }
                std::thread::sleep(Duration::from_millis(300));
            }
            if before_psync {
                // SYNC was used, and no REPLCONF ACK went to a master that does not know it.
                let observed = master.observed();
                assert!(
                    observed.commands.iter().any(|c| c[0] == "SYNC"),
                    "{observed:?}"
                );
                assert_eq!(observed.last_ack, None);
                ran += 1;
                continue;
            }
            // The connector acknowledged the whole stream to the master.
            let end = capture["command_stream"]["master_repl_offset_end"]
                .as_u64()
                .unwrap();
            harness::wait_for("the final ACK", Duration::from_secs(10), || {
                (master.observed().last_ack? >= end).then_some(())
            })
            .unwrap_or_else(|e| panic!("{label}/{name}: {e}"));
            ran += 1;
        }
    }
    for s in &skipped {
        eprintln!("skipped {s}");
    }
    // 5.0, 6.0, 6.2 and 7.0, disk-based and diskless, and 5.0 through SYNC.
    assert!(ran >= 13, "only {ran} captures ran; skipped: {skipped:?}");
}
