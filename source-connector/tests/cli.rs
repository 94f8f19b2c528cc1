//! `source-connector rdb-dump` as an operator runs it.

use std::io::Write;
use std::process::{Command, Stdio};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_source-connector"))
}

fn corpus(label: &str, profile: &str) -> std::path::PathBuf {
    harness::corpus::dir()
        .join("rdb")
        .join(label)
        .join(format!("{profile}.rdb"))
}

#[test]
fn rdb_dump_prints_the_corpus_format() {
    let out = bin()
        .args(["rdb-dump"])
        .arg(corpus("7.4.1", "full"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["rdb_version"], 12);
    assert_eq!(doc["functions"].as_array().unwrap().len(), 2);
    let keys = doc["keys"].as_array().unwrap();
    let big = keys.iter().find(|k| k["key"] == "str:big:random").unwrap();
    assert!(big["value"].is_null() && big["value_digest"]["len"] == 1 << 20);
    let sorted = keys
        .windows(2)
        .all(|w| w[0]["db"].as_u64() <= w[1]["db"].as_u64());
    assert!(sorted);
}

#[test]
fn rdb_dump_reads_stdin() {
    let data = std::fs::read(corpus("6.2.16", "small")).unwrap();
    let mut child = bin()
        .args(["rdb-dump", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["rdb_version"], 9);
    assert!(doc["functions"].is_null(), "no functions before RDB 10");
}

#[test]
fn rdb_dump_errors_are_one_line_with_the_offset() {
    let dir = tempfile::tempdir().unwrap();
    let data = std::fs::read(corpus("7.0.15", "small")).unwrap();
    let cut = dir.path().join("cut.rdb");
    std::fs::write(&cut, &data[..1000]).unwrap();
    let out = bin().args(["rdb-dump"]).arg(&cut).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("cut.rdb") && err.contains("rdb byte 1000") && err.contains("truncated"),
        "{err}"
    );

    let out = bin()
        .args(["rdb-dump", "/nonexistent.rdb"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot open /nonexistent.rdb"));
}

#[test]
fn help_explains_rdb_dump() {
    let out = bin().args(["rdb-dump", "--help"]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("logical content of an RDB file") && text.contains("standard input"),
        "{text}"
    );
}
