//! The `/metrics` (Prometheus text) and `/health` endpoint of a connector.
//!
//! `/health` answers 200 with a JSON body while the process is healthy and 503 when a component
//! reported a problem (for example a halted sink lane), so orchestrators and operators see the
//! same thing.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Health of named components; the process is healthy when all are.
#[derive(Debug, Clone, Default)]
pub struct Health {
    inner: Arc<Mutex<BTreeMap<String, Result<String, String>>>>,
}

impl Health {
    /// Marks `component` healthy with a short status text.
    pub fn ok(&self, component: &str, status: impl Into<String>) {
        self.set(component, Ok(status.into()));
    }

    /// Marks `component` failing, with the reason.
    pub fn fail(&self, component: &str, reason: impl Into<String>) {
        self.set(component, Err(reason.into()));
    }

    pub fn remove(&self, component: &str) {
        self.lock().remove(component);
    }

    fn set(&self, component: &str, state: Result<String, String>) {
        self.lock().insert(component.to_owned(), state);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Result<String, String>>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// (healthy, JSON body).
    pub fn report(&self) -> (bool, String) {
        let map = self.lock();
        let healthy = map.values().all(Result::is_ok);
        let components: serde_json::Map<String, serde_json::Value> = map
            .iter()
            .map(|(k, v)| {
                let v = match v {
                    Ok(s) => serde_json::json!({"ok": true, "status": s}),
                    Err(s) => serde_json::json!({"ok": false, "error": s}),
                };
                (k.clone(), v)
            })
            .collect();
        let body = serde_json::json!({"healthy": healthy, "components": components});
        (healthy, body.to_string())
    }
}

/// Histogram buckets (seconds) of durations that span milliseconds to minutes.
const BUCKETS: [f64; 15] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Installs the Prometheus recorder; the histograms named in `latencies` get the replication
/// latency buckets ([`crate::latency::BUCKETS`]), and the metrics `reference` (docs/metrics.md,
/// compiled in) lists under `prefix` their help text and unit ([`describe`]). Call once per
/// process, before any metric is touched. [`crate::latency`] histograms are rendered after the
/// exporter's metrics.
pub fn install_recorder(
    reference: &str,
    prefix: &str,
    latencies: &[&str],
) -> anyhow::Result<PrometheusHandle> {
    let mut builder = PrometheusBuilder::new().set_buckets(&BUCKETS)?;
    for name in latencies {
        builder = builder
            .set_buckets_for_metric(Matcher::Full((*name).to_owned()), &crate::latency::BUCKETS)?;
    }
    let handle = builder.install_recorder()?;
    describe(reference, prefix);
    Ok(handle)
}

/// A metric as the reference documents it.
#[derive(Debug, PartialEq, Eq)]
pub struct Documented<'a> {
    pub name: &'a str,
    /// `counter`, `gauge` or `histogram`.
    pub kind: &'a str,
    pub meaning: String,
}

/// The metrics of docs/metrics.md's tables (rows `| `name` | type | labels | meaning |`).
pub fn documented(reference: &str) -> Vec<Documented<'_>> {
    reference
        .lines()
        .filter_map(|line| {
            let mut cells = line.splitn(5, '|').map(str::trim);
            let (_, name, kind, _labels) =
                (cells.next()?, cells.next()?, cells.next()?, cells.next()?);
            let name = name.strip_prefix('`')?.strip_suffix('`')?;
            let meaning = cells.next()?.trim_end_matches('|').trim().replace('`', "");
            Some(Documented {
                name,
                kind,
                meaning,
            })
        })
        .collect()
}

/// Gives every metric the reference lists under `prefix` its help text (`# HELP` on
/// `/metrics`) and unit: the reference is the one place a metric is explained, and the compose
/// test keeps it equal to the metrics the code records.
pub fn describe(reference: &str, prefix: &str) {
    for m in documented(reference)
        .into_iter()
        .filter(|m| m.name.starts_with(prefix))
    {
        let unit = if m.name.ends_with("_seconds") || m.name.contains("_seconds_") {
            Some(metrics::Unit::Seconds)
        } else if m.name.ends_with("_bytes") || m.name.contains("_bytes_") {
            Some(metrics::Unit::Bytes)
        } else {
            None
        };
        let name = m.name.to_owned();
        match (m.kind, unit) {
            ("counter", Some(u)) => metrics::describe_counter!(name, u, m.meaning),
            ("counter", None) => metrics::describe_counter!(name, m.meaning),
            ("gauge", Some(u)) => metrics::describe_gauge!(name, u, m.meaning),
            ("gauge", None) => metrics::describe_gauge!(name, m.meaning),
            ("histogram", unit) => {
                crate::latency::describe(&name, &m.meaning);
                match unit {
                    Some(u) => metrics::describe_histogram!(name, u, m.meaning),
                    None => metrics::describe_histogram!(name, m.meaning),
                }
            }
            _ => {}
        }
    }
}

/// How often recorded histogram values are folded into their buckets. The exporter keeps every
/// value recorded since the last upkeep or scrape (about 8 bytes each): a sink applying 400k
/// records/s with its four per-record latency histograms held 30 MB more at the former 5 s, with
/// Prometheus scraping less often than that (docs/benchmarks.md). Each value is folded once
/// however often this runs.
const UPKEEP_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Serves `/metrics` and `/health` on `listen` until the process ends.
pub async fn serve(
    listen: SocketAddr,
    handle: PrometheusHandle,
    health: Health,
) -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {listen} (metrics.listen): {e}"))?;
    let local = listener.local_addr()?;
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut every = tokio::time::interval(UPKEEP_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            let handle = handle.clone();
            let health = health.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let mut used = 0;
                // Read the request head (we only need the request line).
                while used < buf.len() {
                    match stream.read(&mut buf[used..]).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => used += n,
                    }
                    if buf[..used].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let head = String::from_utf8_lossy(&buf[..used]);
                let path = head.split_whitespace().nth(1).unwrap_or("/");
                let (status, ctype, body) = match path {
                    "/metrics" => (
                        "200 OK",
                        "text/plain; version=0.0.4",
                        handle.render() + &crate::latency::render(),
                    ),
                    "/health" | "/health/ready" | "/health/live" => {
                        let (ok, body) = health.report();
                        let status = if ok || path == "/health/live" {
                            "200 OK"
                        } else {
                            "503 Service Unavailable"
                        };
                        (status, "application/json", body)
                    }
                    _ => (
                        "404 Not Found",
                        "text/plain",
                        "try /metrics or /health\n".into(),
                    ),
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = stream.write_all(response.as_bytes()).await;
                let _ = stream.shutdown().await;
            });
        }
    });
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reference_tables_give_each_metric_its_type_and_meaning() {
        let table = "| metric | type | labels | meaning |\n| --- | --- | --- | --- |\n| `a_total` | counter | shard | Things done (`x | y`). |\ntext `b` | not a row\n";
        assert_eq!(
            documented(table),
            vec![Documented {
                name: "a_total",
                kind: "counter",
                meaning: "Things done (x | y).".to_owned(),
            }]
        );
        let reference = include_str!("../../docs/metrics.md");
        let all = documented(reference);
        assert!(all.len() > 60, "{} metrics documented", all.len());
        for m in &all {
            assert!(
                ["counter", "gauge", "histogram"].contains(&m.kind) && !m.meaning.is_empty(),
                "{m:?}"
            );
        }
    }
}
