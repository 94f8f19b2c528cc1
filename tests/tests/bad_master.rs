//! A master that sends bad bytes: a fake master plays the Redis 7.0 corpus capture with a fault —
//! a truncated RDB transfer, a corrupt CRC64, an absurd length inside the RDB, garbage in the
//! command stream. Each gives the source connector one error line naming the source and what is
//! wrong, counted in a metric; the connector neither panics nor exits, it retries the session
//! with backoff, and it never declares the broken snapshot complete.

use harness::broker::{random_topic, Broker, Storage};
use harness::connector::{Connector, Kind};
use harness::fake_master::{FakeMaster, Fault, Playback};
use harness::pipeline::{source_config, Options};
use proto::v1::record::Body;
use std::time::Duration;

struct Case {
    name: &'static str,
    fault: Fault,
    /// Text the error line must contain.
    says: &'static str,
    /// The metric that counts it.
    metric: &'static str,
}

#[test]
fn bad_bytes_from_the_master_give_one_line_errors_and_retries() {
    let (bin, json) = harness::corpus::capture("7.0.15", "stream");
    let capture: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let rdb_at = capture["rdb_payload"]["payload_offset"].as_u64().unwrap() as usize;
    let rdb_len = capture["rdb_payload"]["length"].as_u64().unwrap() as usize;
    let cases = [
        Case {
            name: "truncated RDB transfer",
            fault: Fault::TruncateAt(rdb_at + rdb_len / 2),
            says: "closed by the master during the RDB transfer, after",
            metric: "source_link_errors_total",
        },
        Case {
            name: "corrupt CRC64",
            fault: Fault::FlipByte(rdb_at + rdb_len - 3),
            says: "checksum",
            metric: "source_rdb_errors_total",
        },
        Case {
            // The first AUX field's name gets a 32-bit length of 4 GiB.
            name: "absurd length",
            fault: Fault::Overwrite {
                at: rdb_at + 10,
                bytes: vec![0x80, 0xFF, 0xFF, 0xFF, 0xFF],
            },
            says: "byte",
            metric: "source_rdb_errors_total",
        },
        Case {
            name: "garbage in the command stream",
            fault: Fault::Append(b"*x\r\n".to_vec()),
            says: "offset",
            metric: "source_stream_errors_total",
        },
    ];
    let broker = Broker::start(Storage::Memory).unwrap();
    for case in cases {
        eprintln!("---- {}", case.name);
        let mut playback = Playback::from_file(&bin).unwrap();
        playback.fault = case.fault;
        let master = FakeMaster::start(playback).unwrap();
        let topic = random_topic("bad-master");
        let mut source = Connector::start(
            Kind::Source,
            &source_config(
                &master.url(),
                &broker.bootstrap(),
                &topic,
                &Options::default(),
            ),
            &[("SOURCE_REDIS__MAX_BACKOFF_S", "1")],
        )
        .unwrap();
        harness::wait_for(case.name, Duration::from_secs(60), || {
            let n = source.metric(case.metric, &[])?;
            // At least two sessions: the error is retried, not fatal.
            (n >= 2.0 && master.observed().connections >= 2).then_some(())
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", source.log()));
        assert!(
            source.process().exit_status().is_none(),
            "{}: the connector exited:\n{}",
            case.name,
            source.log()
        );
        let log = source.log();
        assert!(!log.contains("panicked"), "{}: {log}", case.name);
        let error = log
            .lines()
            .find(|l| {
                l.contains("ERROR") && l.contains(&format!("source {}", master_addr(&master)))
            })
            .unwrap_or_else(|| panic!("{}: no error line naming the source:\n{log}", case.name));
        assert!(error.contains(case.says), "{}: {error}", case.name);
        eprintln!("{}: {error}", case.name);
        // Whatever was published, no snapshot was declared complete unless the RDB was whole.
        if case.metric != "source_stream_errors_total" {
            let ends = broker
                .read_records(&topic)
                .unwrap_or_default()
                .into_iter()
                .filter(
                    |m| matches!(&m.record, Ok(r) if matches!(r.body, Some(Body::SnapshotEnd(_)))),
                )
                .count();
            assert_eq!(
                ends, 0,
                "{}: a broken snapshot was declared complete",
                case.name
            );
        }
    }
}

fn master_addr(master: &FakeMaster) -> String {
    format!("127.0.0.1:{}", master.port())
}
