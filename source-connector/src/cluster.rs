//! Cluster sources: find the master of every shard from any node, and find it again after a
//! failover.
//!
//! A shard is named after the lowest slot its master served when the connector first saw it
//! (`<shard_name>/<slot>`). That slot is the shard's *anchor*: whichever node serves it is the
//! shard's master, so after a failover the promoted replica is found under the same name, with
//! the same checkpoint, and PSYNC continues from the old replid and offset.

use crate::config::Endpoint;
pub use service::endpoint::{at, client_url, refused_credentials};
use std::time::Duration;

/// A master of the cluster as `CLUSTER NODES` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Master {
    pub id: String,
    pub host: String,
    pub port: u16,
    /// Slot ranges it serves, ascending.
    pub slots: Vec<(u16, u16)>,
    /// Node ids of its replicas.
    pub replicas: Vec<String>,
}

impl Master {
    /// The lowest slot it serves.
    pub fn anchor(&self) -> Option<u16> {
        self.slots.iter().map(|r| r.0).min()
    }

    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }

    pub fn address(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Masters with slots in a `CLUSTER NODES` reply. Failed masters, masters without an address
/// and nodes in handshake are left out; importing/migrating markers (`[…]`) are not slots.
pub fn parse_nodes(text: &str) -> Vec<Master> {
    let mut masters = Vec::new();
    let mut replicas: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            continue;
        }
        let flags: Vec<&str> = fields[2].split(',').collect();
        if flags.iter().any(|f| matches!(*f, "slave" | "replica")) {
            replicas.push((fields[3].to_owned(), fields[0].to_owned()));
            continue;
        }
        if !flags.contains(&"master")
            || flags
                .iter()
                .any(|f| matches!(*f, "fail" | "fail?" | "noaddr" | "handshake"))
        {
            continue;
        }
        // ip:port@cport[,hostname]
        let addr = fields[1].split('@').next().unwrap_or_default();
        let Some((host, port)) = addr.rsplit_once(':') else {
            continue;
        };
        let Ok(port) = port.parse::<u16>() else {
            continue;
        };
        if host.is_empty() || port == 0 {
            continue;
        }
        let mut slots: Vec<(u16, u16)> = fields[8..]
            .iter()
            .filter(|s| !s.starts_with('['))
            .filter_map(|s| match s.split_once('-') {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => s.parse().ok().map(|n| (n, n)),
            })
            .collect();
        if slots.is_empty() {
            continue;
        }
        slots.sort_unstable();
        masters.push(Master {
            id: fields[0].to_owned(),
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            slots,
            replicas: Vec::new(),
        });
    }
    for (master, replica) in replicas {
        if let Some(m) = masters.iter_mut().find(|m| m.id == master) {
            m.replicas.push(replica);
        }
    }
    masters.sort_by_key(|m| m.anchor());
    masters
}

/// What one node says about the cluster: `None` when it is not in cluster mode.
pub fn discover(
    endpoint: &Endpoint,
    tls: &crate::tls::TlsFiles,
    timeout: Duration,
) -> Result<Option<Vec<Master>>, String> {
    let address = endpoint.address();
    let conn = tls
        .redis_client(&client_url(endpoint))
        .and_then(|c| c.get_connection_with_timeout(timeout));
    let mut conn = match conn {
        Ok(c) => c,
        // Wrong credentials or certificates: the replica link's handshake reports them (and
        // stops) the same way for a standalone server and a cluster node.
        Err(e) if refused_credentials(&e) || (endpoint.tls && is_tls_failure(&e)) => {
            tracing::debug!("source {address}: {e}");
            return Ok(None);
        }
        Err(e) => return Err(format!("source {address}: {e}")),
    };
    let _ = conn.set_read_timeout(Some(timeout));
    // `CLUSTER NODES` answers "ERR This instance has cluster support disabled" on a standalone
    // server; INFO may be forbidden to a least-privilege user, so ask the cluster directly.
    let nodes: redis::RedisResult<String> = redis::cmd("CLUSTER").arg("NODES").query(&mut conn);
    match nodes {
        Ok(text) => Ok(Some(parse_nodes(&text))),
        // The TLS handshake runs with the first command (redis-rs sends none on connecting):
        // a certificate problem is the replica link's to report, as above.
        Err(e) if endpoint.tls && is_tls_failure(&e) => {
            tracing::debug!("source {address}: {e}");
            Ok(None)
        }
        // No answer: retry later.
        Err(e) if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() => {
            Err(format!("source {address}: {e}"))
        }
        Err(e) if e.code() == Some("NOPERM") => {
            tracing::warn!("source {address}: CLUSTER NODES refused ({e}); cannot tell whether the source is a cluster, so only this node is replicated (grant +cluster|nodes, docs/security.md)");
            Ok(None)
        }
        // "cluster support disabled", or a server without the command (before 3.0, some
        // proxies): a standalone source.
        Err(e) => {
            tracing::debug!("source {address}: CLUSTER NODES: {e}: a standalone source");
            Ok(None)
        }
    }
}

/// A TLS handshake that failed on the certificates (the replica link reports it as fatal).
fn is_tls_failure(e: &redis::RedisError) -> bool {
    let text = e.to_string().to_ascii_lowercase();
    text.contains("certificate") || text.contains("handshake") || text.contains("tls")
}

/// Asks each known node in turn until one answers with a topology.
pub fn discover_any(
    seeds: &[Endpoint],
    tls: &crate::tls::TlsFiles,
    timeout: Duration,
) -> Result<Vec<Master>, String> {
    let mut errors = Vec::new();
    for seed in seeds {
        match discover(seed, tls, timeout) {
            Ok(Some(masters)) if !masters.is_empty() => return Ok(masters),
            Ok(Some(_)) => errors.push(format!("{}: no master with slots", seed.address())),
            Ok(None) => errors.push(format!("{}: not in cluster mode", seed.address())),
            Err(e) => errors.push(e),
        }
    }
    Err(format!("no cluster node answered: {}", errors.join("; ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODES: &str = "\
07c37dfeb235213a872192d90877d0cd55635b91 127.0.0.1:30004@31004,host-4 slave e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 0 1426238317239 4 connected
67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1 127.0.0.1:30002@31002 master - 0 1426238316232 2 connected 5461-10922
292f8b365bb7edb5e285caf0b7e6ddc7265d2f4f 127.0.0.1:30003@31003 master - 0 1426238318243 3 connected 10923-16383 [10923->-67ed2db8d677e59ec4a4cefb06858cf2a1a89fa1]
6ec23923021cf3ffec47632106199cb7f496ce01 127.0.0.1:30005@31005 master,fail - 0 1426238316232 5 connected 100
e7d1eecce10fd6bb5eb35b9f99a514335d9ba9ca 127.0.0.1:30001@31001 myself,master - 0 0 1 connected 0-5460
a1 :0@0 master,noaddr - 0 0 0 disconnected 200
";

    #[test]
    fn masters_with_slots_sorted_by_anchor() {
        let masters = parse_nodes(NODES);
        let summary: Vec<(u16, Option<u16>)> =
            masters.iter().map(|m| (m.port, m.anchor())).collect();
        assert_eq!(
            summary,
            vec![(30001, Some(0)), (30002, Some(5461)), (30003, Some(10923))]
        );
        assert_eq!(masters[2].slots, vec![(10923, 16383)]);
        assert!(masters[1].serves(10922) && !masters[1].serves(10923));
        assert_eq!(
            masters[0].replicas,
            vec!["07c37dfeb235213a872192d90877d0cd55635b91"]
        );
    }

    #[test]
    fn single_slots_and_several_ranges() {
        let m = parse_nodes("id 10.0.0.1:7000@17000 master - 0 0 1 connected 7 0-3 9-10\n");
        assert_eq!(m[0].slots, vec![(0, 3), (7, 7), (9, 10)]);
        assert_eq!(m[0].anchor(), Some(0));
        assert_eq!(m[0].address(), "10.0.0.1:7000");
    }

    #[test]
    fn credentials_survive_in_the_client_url() {
        let e = Endpoint::parse("redis://repl:p%40ss@127.0.0.1:7000").unwrap();
        assert_eq!(client_url(&at(&e, "h", 1)), "redis://repl:p%40ss@h:1");
    }
}
