//! The connectors' `check` commands against real processes: green on a healthy pipeline, and a
//! `FAIL` line that names the problem (with a non-zero exit) for a wrong password, an evicting
//! target, a replica as target, a wrong partition count and records bigger than the topic takes.

use harness::connector::{binary, Kind};
use harness::pipeline::{Options, Pipeline};
use harness::redis::{RedisConfig, RedisServer};
use std::path::Path;
use std::time::Duration;

/// Runs `<connector> check --config <file>`: (succeeded, stdout).
fn check(kind: Kind, config: &Path, env: &[(&str, &str)]) -> (bool, String) {
    let out = std::process::Command::new(binary(kind))
        .args(["check", "--config"])
        .arg(config)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    (out.status.success(), stdout)
}

fn fail_lines(stdout: &str) -> Vec<&str> {
    stdout.lines().filter(|l| l.starts_with("FAIL")).collect()
}

#[test]
fn checks_pass_on_a_running_pipeline_and_name_what_is_wrong() {
    let p = Pipeline::start(Options {
        source: RedisConfig::default().with("repl-backlog-size", "64mb"),
        ..Options::default()
    })
    .unwrap();
    p.wait_running().unwrap();
    for i in 0..100 {
        p.source.cmd::<()>(&["SET", &format!("k{i}"), "v"]).unwrap();
    }
    p.wait_equal(Duration::from_secs(60)).unwrap();
    // Wait for the source to checkpoint everything written.
    let written = p.source.repl_offset().unwrap();
    harness::wait_for(
        "a checkpoint covering the writes",
        Duration::from_secs(30),
        || {
            let at = p.source_connector.metric("source_checkpoint_offset", &[])?;
            (at >= written).then_some(())
        },
    )
    .unwrap();
    let source_cfg = p.source_connector.config_path().to_path_buf();
    let sink_cfg = p.sink.config_path().to_path_buf();

    let (ok, out) = check(Kind::Source, &source_cfg, &[]);
    assert!(ok, "{out}");
    assert!(fail_lines(&out).is_empty(), "{out}");
    assert!(out.contains("a restart continues with PSYNC"), "{out}");
    assert!(
        !out.contains("offset 0 ("),
        "the checkpoint covers the stream: {out}"
    );
    assert!(out.contains("has 4 partitions"), "{out}");
    // The connector created the topic for the records it is configured to write.
    assert!(out.contains("accepts records up to 1000000 bytes"), "{out}");
    // Configured for bigger records than the topic takes.
    let (ok, out) = check(
        Kind::Source,
        &source_cfg,
        &[("SOURCE_KAFKA__MAX_MESSAGE_BYTES", "2000000")],
    );
    assert!(!ok, "{out}");
    let fails = fail_lines(&out);
    assert_eq!(fails.len(), 1, "{out}");
    assert!(
        fails[0].contains("max.message.bytes") && fails[0].contains("2000000"),
        "{out}"
    );
    let (ok, out) = check(Kind::Sink, &sink_cfg, &[]);
    assert!(ok, "{out}");
    assert!(out.contains("maxmemory-policy noeviction"), "{out}");
    assert!(
        out.contains("4 of 4 partitions have applied records"),
        "{out}"
    );

    // A wrong password on the source.
    let wrong = format!("redis://:nope@{}", p.source.addr());
    let secured = RedisServer::start(RedisConfig {
        password: Some("right".into()),
        ..RedisConfig::default()
    })
    .unwrap();
    let wrong_pw = format!("redis://:wrong@{}", secured.addr());
    for url in [wrong.as_str(), wrong_pw.as_str()] {
        let (ok, out) = check(Kind::Source, &source_cfg, &[("SOURCE_REDIS__URL", url)]);
        assert!(!ok, "{out}");
        let fails = fail_lines(&out);
        assert_eq!(fails.len(), 1, "{out}");
        assert!(fails[0].contains("source redis://:***@"), "{out}");
        assert!(
            !out.contains("nope") && !out.contains("wrong@"),
            "secrets leak: {out}"
        );
    }

    // Something that is not Redis on the port.
    let http = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let http_url = format!("redis://{}", http.local_addr().unwrap());
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for mut stream in http.incoming().flatten() {
            let mut buf = [0u8; 512];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n<html>no</html>\n");
        }
    });
    let (ok, out) = check(
        Kind::Source,
        &source_cfg,
        &[("SOURCE_REDIS__URL", &http_url)],
    );
    assert!(!ok);
    let fails = fail_lines(&out);
    assert_eq!(fails.len(), 1, "{out}");
    assert!(fails[0].contains("right port"), "{out}");

    // The wrong partition count.
    let (ok, out) = check(
        Kind::Source,
        &source_cfg,
        &[("SOURCE_KAFKA__PARTITIONS", "8")],
    );
    assert!(!ok);
    assert!(
        out.contains("has 4 partitions but kafka.partitions is 8"),
        "{out}"
    );

    // An evicting target, and a replica as target.
    let lru =
        RedisServer::start(RedisConfig::default().with("maxmemory-policy", "allkeys-lru")).unwrap();
    let (ok, out) = check(Kind::Sink, &sink_cfg, &[("SINK_REDIS__URL", &lru.url())]);
    assert!(!ok);
    assert!(out.contains("maxmemory-policy is allkeys-lru"), "{out}");
    let replica = RedisServer::start(
        RedisConfig::default()
            .with("maxmemory-policy", "noeviction")
            .with("replicaof", &format!("127.0.0.1 {}", lru.port())),
    )
    .unwrap();
    let (ok, out) = check(
        Kind::Sink,
        &sink_cfg,
        &[("SINK_REDIS__URL", &replica.url())],
    );
    assert!(!ok);
    assert!(out.contains("role slave"), "{out}");

    // Kafka unreachable.
    let (ok, out) = check(
        Kind::Sink,
        &sink_cfg,
        &[("SINK_KAFKA__BOOTSTRAP_SERVERS", "127.0.0.1:1")],
    );
    assert!(!ok);
    assert!(
        fail_lines(&out).iter().any(|l| l.contains("kafka")),
        "{out}"
    );
}
