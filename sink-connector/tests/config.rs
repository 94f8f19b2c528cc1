//! Configuration: the shipped example loads, and bad input gives a one-line error naming the key.

use sink_connector::config::{Config, OnError};
use std::path::Path;

fn example() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../compose/sink.toml"))
}

fn error(text: &str) -> String {
    let f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(f.path(), text).unwrap();
    let msg = format!("{:#}", Config::load(Some(f.path())).unwrap_err());
    assert!(!msg.contains('\n'), "one line: {msg}");
    msg
}

#[test]
fn example_loads_and_environment_overrides() {
    bad_files();
    let c = Config::load(Some(example())).unwrap();
    assert_eq!(c.kafka.topic, "redis-repl");
    assert_eq!(c.apply.on_error, OnError::Halt);
    std::env::set_var("SINK_APPLY__BATCH_RECORDS", "64");
    let c = Config::load(Some(example())).unwrap();
    assert_eq!(c.apply.batch_records, 64);
    std::env::set_var("SINK_APPLY__BATCH_RECORDS", "lots");
    let e = format!("{:#}", Config::load(Some(example())).unwrap_err());
    assert!(e.contains("batch_records"), "{e}");
    std::env::remove_var("SINK_APPLY__BATCH_RECORDS");
}

/// Called from the single test below: environment variables are process-wide, so nothing may
/// run in parallel with the cases that set them.
fn bad_files() {
    let base =
        "[redis]\nurl = \"redis://h:1\"\n[kafka]\nbootstrap_servers = \"k:9092\"\ntopic = \"t\"\n";
    let e = error(&format!("{base}[apply]\nflush = \"sometimes\"\n"));
    assert!(e.contains("sometimes") || e.contains("flush"), "{e}");
    assert!(
        error(&format!("{base}[apply]\non_error = \"dead-letter\"\n"))
            .contains("dead_letter_topic")
    );
    assert!(error(&format!("{base}[redis.db_map]\nx = 1\n")).contains("db_map"));
    assert!(error(&base.replace("redis://h:1", "redis://h:0")).contains("out of range"));
    assert!(error(&format!("{base}[kafka.extra]\n")).contains("extra"));
}
