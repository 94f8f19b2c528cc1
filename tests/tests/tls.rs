//! TLS to Redis on both sides (`rediss://`, rustls): a source that requires client certificates
//! (mutual TLS) and a target that only serves TLS, through the whole pipeline; and a certificate
//! the configured CA did not sign, refused with a clear error.

use harness::broker::{random_topic, Broker, Storage};
use harness::connector::{Connector, Kind};
use harness::dataset;
use harness::pipeline::{self, Options};
use harness::redis::{exec, RedisConfig, RedisServer};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use std::path::{Path, PathBuf};
use std::time::Duration;

struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

/// A CA, a server certificate for 127.0.0.1 and a client certificate, written as PEM files.
fn pki(dir: &Path, name: &str) -> Pki {
    let write = |file: &str, pem: String| {
        let path = dir.join(format!("{name}-{file}"));
        std::fs::write(&path, pem).unwrap();
        path
    };
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, format!("redis-repl test CA {name}"));
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca, &ca_key)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["127.0.0.1".into(), "localhost".into()]);
    let (client_cert, client_key) = leaf(vec!["redis-repl-client".into()]);
    Pki {
        ca: write("ca.pem", ca.pem()),
        server_cert: write("server.pem", server_cert),
        server_key: write("server.key", server_key),
        client_cert: write("client.pem", client_cert),
        client_key: write("client.key", client_key),
    }
}

/// A server with its usual plain port (for the test's own reads) and a TLS port.
fn tls_server(pki: &Pki, clients: &str, config: RedisConfig) -> (RedisServer, u16) {
    let port = harness::ports::free_port();
    let path = |p: &Path| p.display().to_string();
    let server = RedisServer::start(
        config
            .with("tls-port", &port.to_string())
            .with("tls-cert-file", &path(&pki.server_cert))
            .with("tls-key-file", &path(&pki.server_key))
            .with("tls-ca-cert-file", &path(&pki.ca))
            .with("tls-auth-clients", clients),
    )
    .unwrap();
    (server, port)
}

/// The `[redis.tls]` table, inline under `[redis]`.
fn tls_lines(ca: &Path, client: Option<(&Path, &Path)>) -> String {
    let mut table = format!("ca_file = \"{}\"", ca.display());
    if let Some((cert, key)) = client {
        table += &format!(
            ", cert_file = \"{}\", key_file = \"{}\"",
            cert.display(),
            key.display()
        );
    }
    format!("tls = {{ {table} }}\n")
}

#[test]
fn tls_on_both_sides_with_client_certificates_at_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "good");
    let (source, source_tls) = tls_server(&pki, "yes", RedisConfig::default());
    let (target, target_tls) = tls_server(
        &pki,
        "no",
        RedisConfig::default().with("maxmemory-policy", "noeviction"),
    );
    let mut conn = source.conn();
    for i in 0..500 {
        exec(&mut conn, &[b"SET", format!("k:{i}").as_bytes(), b"v"]);
    }
    exec(&mut conn, &[b"XADD", b"stream", b"1-1", b"f", b"v"]);
    let broker = Broker::start(Storage::Memory).unwrap();
    let topic = random_topic("tls");
    let options = Options::default();
    let source_connector = Connector::start(
        Kind::Source,
        &pipeline::source_config(
            &format!("rediss://127.0.0.1:{source_tls}"),
            &broker.bootstrap(),
            &topic,
            &options,
        )
        .replace(
            "[redis]\n",
            &format!(
                "[redis]\n{}",
                tls_lines(&pki.ca, Some((&pki.client_cert, &pki.client_key)))
            ),
        ),
        &[],
    )
    .unwrap();
    let sink = Connector::start(
        Kind::Sink,
        &pipeline::sink_config(
            &format!("rediss://127.0.0.1:{target_tls}"),
            &broker.bootstrap(),
            &topic,
            &options,
        )
        .replace(
            "[redis]\n",
            &format!("[redis]\n{}", tls_lines(&pki.ca, None)),
        ),
        &[],
    )
    .unwrap();
    let expected = || dataset::read(&mut [source.conn()]).unwrap();
    let actual = || dataset::read(&mut [target.conn()]).unwrap();
    tests::wait_datasets_equal(
        expected,
        actual,
        Duration::from_secs(60),
        &[&source_connector, &sink],
    );
    for i in 0..300 {
        exec(&mut conn, &[b"INCR", b"counter"]);
        exec(&mut conn, &[b"RPUSH", b"list", format!("{i}").as_bytes()]);
    }
    tests::wait_datasets_equal(
        expected,
        actual,
        Duration::from_secs(60),
        &[&source_connector, &sink],
    );
    // Both connectors really use the TLS ports.
    let replicas = source
        .info_field("replication", "connected_slaves")
        .unwrap();
    assert_eq!(replicas, "1");
    assert!(source_connector
        .log()
        .contains(&format!("rediss://127.0.0.1:{source_tls}")));
}

#[test]
fn a_certificate_from_another_ca_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let server_pki = pki(dir.path(), "server");
    let other = pki(dir.path(), "other");
    let (_source, source_tls) = tls_server(&server_pki, "no", RedisConfig::default());
    let broker = Broker::start(Storage::Memory).unwrap();
    let topic = random_topic("tls-bad");
    let mut source_connector = Connector::start(
        Kind::Source,
        &pipeline::source_config(
            &format!("rediss://127.0.0.1:{source_tls}"),
            &broker.bootstrap(),
            &topic,
            &Options::default(),
        )
        .replace(
            "[redis]\n",
            &format!("[redis]\n{}", tls_lines(&other.ca, None)),
        ),
        &[],
    )
    .unwrap();
    let status = harness::wait_for("the connector to stop", Duration::from_secs(30), || {
        source_connector.process().exit_status()
    })
    .unwrap();
    assert!(!status.success());
    let log = source_connector.log();
    assert!(log.contains("TLS handshake failed"), "{log}");
    assert!(
        log.contains("UnknownIssuer")
            || log.contains("unknown issuer")
            || log.contains("invalid peer certificate"),
        "{log}"
    );
}
