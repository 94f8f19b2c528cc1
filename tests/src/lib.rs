//! End-to-end scenarios live in `tests/tests/`; this holds what several of them share.

use harness::cluster::ClusterClient;
use harness::connector::Connector;
use harness::dataset::Dataset;
use harness::pipeline::Recovery;
use std::time::{Duration, Instant};

/// Waits until `actual()` equals `expected()` (checkpoint keys ignored), or panics with the
/// last differences and the connectors' logs. Returns how long that took and the worst
/// `sink_lag_seconds` seen meanwhile.
pub fn wait_datasets_equal(
    expected: impl Fn() -> Dataset,
    actual: impl Fn() -> Dataset,
    timeout: Duration,
    logs: &[&Connector],
) -> Recovery {
    let opts = harness::pipeline::compare_options();
    let started = Instant::now();
    let mut worst_lag_s: f64 = 0.0;
    loop {
        for c in logs {
            for p in 0..16 {
                let lag = c.metric("sink_lag_seconds", &[("partition", &p.to_string())]);
                worst_lag_s = worst_lag_s.max(lag.unwrap_or(0.0));
            }
        }
        let report = expected().compare(&actual(), &opts);
        if report.is_equal() {
            return Recovery {
                seconds: started.elapsed().as_secs_f64(),
                worst_lag_s,
            };
        }
        if started.elapsed() > timeout {
            let logs: Vec<String> = logs
                .iter()
                .map(|c| {
                    let log = c.log();
                    let mut start = log.len().saturating_sub(8000);
                    while !log.is_char_boundary(start) {
                        start += 1;
                    }
                    log[start..].to_owned()
                })
                .collect();
            panic!(
                "target still differs after {timeout:?}:\n{report}\n{}",
                logs.join("\n----\n")
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `ds` with every key moved to db 0 (a cluster target with `redis.db_map`).
pub fn in_db0(ds: Dataset) -> Dataset {
    Dataset {
        keys: ds.keys.into_iter().map(|((_, k), e)| ((0, k), e)).collect(),
    }
}

/// Counters, lists, appended strings and streams spread over every shard of a cluster.
pub fn cluster_writes(client: &mut ClusterClient<'_>, round: u32, n: u32) {
    for i in 0..n {
        let item = format!("{round}:{i}");
        client.exec(&[b"INCR", format!("c:{}", i % 50).as_bytes()]);
        client.exec(&[
            b"RPUSH",
            format!("l:{}", i % 20).as_bytes(),
            item.as_bytes(),
        ]);
        client.exec(&[
            b"APPEND",
            format!("log:{}", i % 5).as_bytes(),
            item.as_bytes(),
        ]);
        if i % 10 == 0 {
            client.exec(&[
                b"XADD",
                format!("s:{}", i % 4).as_bytes(),
                b"*",
                b"i",
                item.as_bytes(),
            ]);
        }
    }
}

/// Runs `sink-connector verify` with `sink`'s configuration against `source_url`: whether it
/// reported a match (exit code 0), and its output.
pub fn verify(sink: &Connector, source_url: &str) -> (bool, String) {
    let out =
        std::process::Command::new(harness::connector::binary(harness::connector::Kind::Sink))
            .args(["verify", "--config"])
            .arg(sink.config_path())
            .args(["--source", source_url])
            .output()
            .expect("run sink-connector verify");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}
