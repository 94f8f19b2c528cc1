//! The target connection against a real redis-server: transactions, error classification.

use bytes::Bytes;
use harness::redis::{RedisConfig, RedisServer};
use sink_connector::config::Config;
use sink_connector::target::{self, ApplyError, Op, Target};

/// A configuration for a target at `url`, with `redis` settings besides the URL.
fn config(url: &str, redis: &str) -> Config {
    let text = format!(
        "[redis]\nurl = \"{url}\"\n{redis}\n[kafka]\nbootstrap_servers = \"127.0.0.1:1\"\ntopic = \"t\"\n"
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
    let mut t = Target::new(&config(&server.url(), "")).unwrap();
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

/// A transaction left without replies (the target paused) is given up after the response
/// timeout, and one abandoned half-way (its future dropped) makes the connection unusable: in
/// both cases the next write reconnects, is refused until the lane verified the target, and the
/// old connection is closed on the target before it could run what it carried.
#[tokio::test]
async fn a_request_without_replies_or_abandoned_reconnects_and_fences_the_old_connection() {
    let server = RedisServer::start(RedisConfig::default()).unwrap();
    let mut t = Target::new(&config(&server.url(), "timeout_s = 1")).unwrap();
    t.exec(&[op(&["INCR", "n"])]).await.unwrap();

    // No replies: writes are held by CLIENT PAUSE for longer than the response timeout (6 s).
    server
        .cmd::<()>(&["CLIENT", "PAUSE", "60000", "WRITE"])
        .unwrap();
    let started = std::time::Instant::now();
    let e = t.exec(&[op(&["INCR", "n"])]).await.unwrap_err();
    assert_eq!(e.code(), "CONNECTION", "{e:?}");
    assert!(
        started.elapsed() >= std::time::Duration::from_secs(5),
        "{e:?}"
    );
    // The transaction held by the pause never ran: 1, then the one after the reconnection.
    reconnect_fenced(&mut t, &server, 2).await;

    // Abandoned half-way: the connection is given up, not reused with a reply still due.
    server
        .cmd::<()>(&["CLIENT", "PAUSE", "60000", "WRITE"])
        .unwrap();
    let dropped = tokio::time::timeout(
        std::time::Duration::from_millis(200),
        t.exec(&[op(&["INCR", "n"])]),
    )
    .await;
    assert!(dropped.is_err(), "the paused write answered: {dropped:?}");
    let e = t.exec(&[op(&["INCR", "n"])]).await.unwrap_err();
    assert_eq!(e.code(), "CONNECTION", "{e:?}");
    reconnect_fenced(&mut t, &server, 3).await;
}

/// After a connection was given up while writes are paused: the next write reconnects, which
/// closes the old connection (CLIENT KILL does not wait for the pause), and is refused until the
/// lane has checked the target; unpaused and verified, one more INCR leaves `n` at `expected`.
async fn reconnect_fenced(t: &mut Target, server: &RedisServer, expected: i64) {
    let e = t.exec(&[op(&["INCR", "n"])]).await.unwrap_err();
    assert_eq!(e.code(), "RECONNECTED", "{e:?}");
    server.cmd::<()>(&["CLIENT", "UNPAUSE"]).unwrap();
    t.verified();
    t.exec(&[op(&["INCR", "n"])]).await.unwrap();
    assert_eq!(server.cmd::<i64>(&["GET", "n"]).unwrap(), expected);
}
