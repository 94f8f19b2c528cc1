//! DUMP payloads built from corpus RDB bytes are accepted by RESTORE on a real server, and the
//! restored keys equal the corpus content. The server is Debian's redis 7.0 (RDB 10), so payloads
//! from RDB ≤ 10 must restore and newer ones must be refused (the sink then rebuilds the value
//! with commands).

use harness::dataset::{self, CompareOptions, Dataset};
use harness::redis::{RedisConfig, RedisServer};
use source_connector::rdb::{self, assemble};

fn server_rdb_version(server: &RedisServer) -> u32 {
    let v = server.info_field("server", "redis_version").unwrap();
    let major: u32 = v.split('.').next().unwrap().parse().unwrap();
    let minor: u32 = v.split('.').nth(1).unwrap().parse().unwrap();
    match (major, minor) {
        (7, 4..) | (8.., _) => 12,
        (7, 2..) => 11,
        (7, _) => 10,
        _ => 9,
    }
}

#[test]
fn dump_payloads_restore_on_a_real_server() {
    let server = RedisServer::start(RedisConfig::default()).unwrap();
    let accepts = server_rdb_version(&server);
    let mut restored_versions = 0;
    for label in harness::corpus::labels() {
        let path = harness::corpus::dir()
            .join("rdb")
            .join(&label)
            .join("full.rdb");
        let expected_json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(path.with_extension("json")).unwrap()).unwrap();
        let data = std::fs::read(&path).unwrap();
        let config = rdb::Config {
            dump_limit_bytes: 4 << 20,
            ..Default::default()
        };
        let contents = assemble::decode_all(&data, config, 65536).unwrap();
        let mut conn = server.conn();
        let _: () = redis::cmd("FLUSHALL").query(&mut conn).unwrap();
        let mut refused = 0;
        for key in &contents.keys {
            let h = &key.header;
            let payload = key
                .dump
                .as_ref()
                .expect("every corpus value fits the dump limit");
            let _: () = redis::cmd("SELECT").arg(h.db).query(&mut conn).unwrap();
            let mut cmd = redis::cmd("RESTORE");
            cmd.arg(&h.key[..])
                .arg(h.expire_ms.unwrap_or(0))
                .arg(&payload[..])
                .arg("REPLACE");
            if h.expire_ms.is_some() {
                cmd.arg("ABSTTL");
            }
            match cmd.query::<()>(&mut conn) {
                Ok(()) => {}
                Err(e) if contents.version > accepts => {
                    // Refused by version, as the sink expects; nothing else may fail.
                    assert!(
                        e.to_string()
                            .contains("DUMP payload version or checksum are wrong"),
                        "{label}: {e}"
                    );
                    refused += 1;
                }
                Err(e) => panic!(
                    "{label}: RESTORE of db {} key {:?} failed: {e}",
                    h.db, h.key
                ),
            }
        }
        if contents.version > accepts {
            assert_eq!(
                refused,
                contents.keys.len(),
                "{label}: every newer payload refused"
            );
            continue;
        }
        // Expired keys were restored with a past ABSTTL, so the server drops them, as it should.
        let expected = Dataset::from_corpus_keys(&expected_json["keys"])
            .unwrap()
            .without_expired();
        let actual = dataset::read(&mut [server.conn()]).unwrap();
        let report = expected.compare(&actual, &CompareOptions::default());
        assert!(report.is_equal(), "{label}: {report}");
        restored_versions += 1;
    }
    assert!(
        restored_versions >= 4,
        "payloads of 5.0, 6.0, 6.2 and 7.0 restore on 7.0"
    );
}
