//! Configuration: the shipped example loads, environment overrides apply, and bad input gives a
//! one-line error naming the key.

use source_connector::config::Config;
use std::path::Path;

fn example() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../compose/source.toml"
    ))
}

fn write(text: &str) -> tempfile::NamedTempFile {
    let f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(f.path(), text).unwrap();
    f
}

fn error(text: &str) -> String {
    let f = write(text);
    let e = Config::load(Some(f.path())).unwrap_err();
    let msg = format!("{e:#}");
    assert!(!msg.contains('\n'), "one line: {msg}");
    msg
}

#[test]
fn example_loads_and_environment_overrides() {
    bad_files();
    let c = Config::load(Some(example())).unwrap();
    assert_eq!(c.kafka.topic, "redis-repl");
    assert_eq!(c.kafka.partitions, 16);
    assert_eq!(
        c.kafka.properties.get("linger.ms").map(String::as_str),
        Some("5")
    );

    std::env::set_var("SOURCE_KAFKA__PARTITIONS", "32");
    std::env::set_var("SOURCE_REDIS__URL", "redis://u:secret@h:7000");
    let c = Config::load(Some(example())).unwrap();
    assert_eq!(c.kafka.partitions, 32);
    assert_eq!(c.redis.url, "redis://u:secret@h:7000");

    std::env::set_var("SOURCE_KAFKA__PARTITIONS", "many");
    let e = format!("{:#}", Config::load(Some(example())).unwrap_err());
    assert!(e.contains("partitions") && e.contains("SOURCE_"), "{e}");
    std::env::remove_var("SOURCE_KAFKA__PARTITIONS");

    std::env::set_var("SOURCE_REDIS__URL", "redis://u:secret@h:99999");
    let e = format!("{:#}", Config::load(Some(example())).unwrap_err());
    assert!(e.contains("port 99999 is out of range"), "{e}");
    assert!(!e.contains("secret"), "no password in errors: {e}");
    std::env::remove_var("SOURCE_REDIS__URL");
}

/// Called from the single test below: environment variables are process-wide, so nothing may
/// run in parallel with the cases that set them.
fn bad_files() {
    let base = "[redis]\nurl = \"redis://h:1\"\n[kafka]\nbootstrap_servers = \"k:9092\"\ntopic = \"t\"\npartitions = 4\n";
    assert!(error(&format!("{base}bogus = 1\n")).contains("bogus"));
    assert!(error(&base.replace("partitions = 4", "partitions = \"x\"")).contains("partitions"));
    assert!(error(&base.replace("partitions = 4\n", "")).contains("partitions"));
    assert!(error(&base.replace("partitions = 4", "partitions = 0")).contains("out of range"));
    assert!(error(&base.replace("redis://h:1", "http://h:1")).contains("unknown scheme"));
    assert!(error("[redis\n").contains("invalid configuration"));
    assert!(
        error(&base.replace("[redis]\n", "[redis]\nshard_name = \"kafka:offset\"\n"))
            .contains("reserved")
    );
    let missing = Config::load(Some(Path::new("/nonexistent/source.toml"))).unwrap_err();
    assert!(missing.to_string().contains("does not exist"));
}
