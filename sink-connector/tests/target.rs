//! The target connection against a real redis-server: transactions, error classification.

use bytes::Bytes;
use harness::redis::{RedisConfig, RedisServer};
use sink_connector::config::Config;
use sink_connector::target::{self, ApplyError, Op, Target};

fn config(url: &str) -> Config {
    let text = format!(
        "[redis]\nurl = \"{url}\"\n[kafka]\nbootstrap_servers = \"127.0.0.1:1\"\ntopic = \"t\"\n"
    );
    let f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    std::fs::write(f.path(), text).unwrap();
    Config::load(Some(f.path())).unwrap()
}

fn op(args: &[&str]) -> Op {
    Op::data(
        Some(0),
        args.iter()
            .map(|a| Bytes::copy_from_slice(a.as_bytes()))
            .collect(),
    )
}

#[tokio::test]
async fn runtime_errors_oom_and_queue_errors() {
    let server = RedisServer::start(RedisConfig::default()).unwrap();
    let mut t = Target::new(&config(&server.url())).unwrap();
    let ops = vec![op(&["INCR", "n"]), op(&["XADD", "s", "1-1", "a", "b"])];
    let r = t.exec(&ops).await.unwrap();
    assert!(target::runtime_error(&r, |_| false).is_none());
    // Again: INCR runs, XADD fails at run time inside EXEC.
    let r = t.exec(&ops).await.unwrap();
    let e = target::runtime_error(&r, |_| false).expect("the second XADD fails");
    assert!(
        matches!(
            e,
            ApplyError::Permanent {
                op: Some(1),
                applied: true,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(server.cmd::<i64>(&["GET", "n"]).unwrap(), 2);

    // A command the server does not know: refused at queue time, nothing runs.
    let e = t
        .exec(&[op(&["INCR", "n"]), op(&["NOSUCHCOMMAND", "x"])])
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            ApplyError::Permanent {
                op: Some(1),
                applied: false,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(server.cmd::<i64>(&["GET", "n"]).unwrap(), 2);

    // Out of memory under noeviction: transient, nothing runs, and the connection is usable.
    server
        .cmd::<()>(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
        .unwrap();
    server
        .cmd::<()>(&["CONFIG", "SET", "maxmemory", "1"])
        .unwrap();
    let e = t.exec(&[op(&["INCR", "n"])]).await.unwrap_err();
    assert_eq!(e.code(), "OOM", "{e:?}");
    assert!(matches!(e, ApplyError::Transient { .. }));
    server
        .cmd::<()>(&["CONFIG", "SET", "maxmemory", "0"])
        .unwrap();
    t.exec(&[op(&["INCR", "n"])]).await.unwrap();
    assert_eq!(server.cmd::<i64>(&["GET", "n"]).unwrap(), 3);
}
