//! Latency histograms fed by the thousand: a lane tallies the latencies of a whole transaction
//! locally and adds the tally to shared bucket counters once.
//!
//! The Prometheus exporter keeps every value recorded until it folds them into buckets (an
//! atomic push and a clock read per value): recorded per applied record, the sink's four
//! latency histograms were a tenth of its CPU (docs/benchmarks.md). Here a value costs a bucket
//! lookup in a local array, and a transaction a few atomic additions. The series are rendered
//! in the Prometheus text format after the exporter's own (`/metrics`), with the same shape: a
//! cumulative `_bucket` per bound in [`BUCKETS`] and `+Inf`, `_sum` and `_count`.
//!
//! Values are whole milliseconds (the pipeline's timestamps are Unix ms), so sums are exact.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock};

/// Bucket bounds (seconds) of replication latencies: fine around the tens of milliseconds a
/// healthy pipeline takes, so that a p99 reads as 55 ms rather than "between 50 and 100", and up
/// to the minutes a stalled one shows.
pub const BUCKETS: [f64; 24] = [
    0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.075, 0.1,
    0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// One labelled series of a histogram.
#[derive(Debug)]
struct Series {
    name: &'static str,
    /// `key="value"` pairs, comma-separated, already escaped.
    labels: String,
    /// Values in each bucket (not cumulative); the last is above every bound.
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_ms: AtomicU64,
}

#[derive(Debug, Default)]
struct Registry {
    series: Vec<Arc<Series>>,
    /// Help text by histogram name.
    help: Vec<(String, String)>,
}

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    static REGISTRY: OnceLock<Mutex<Registry>> = OnceLock::new();
    REGISTRY
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// A histogram series; clones and handles registered with the same name and labels share it.
#[derive(Debug, Clone)]
pub struct Histogram(Arc<Series>);

impl Histogram {
    /// The series `name{labels}`, registered on first use.
    pub fn register(name: &'static str, labels: &[(&str, &str)]) -> Histogram {
        let labels = labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
            .collect::<Vec<_>>()
            .join(",");
        let mut registry = registry();
        if let Some(s) = registry
            .series
            .iter()
            .find(|s| s.name == name && s.labels == labels)
        {
            return Histogram(s.clone());
        }
        let series = Arc::new(Series {
            name,
            labels,
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_ms: AtomicU64::new(0),
        });
        registry.series.push(series.clone());
        Histogram(series)
    }

    /// Adds what `tally` holds to the series and empties it.
    pub fn add(&self, tally: &mut Tally) {
        for (shared, local) in self.0.counts.iter().zip(&tally.counts) {
            if *local > 0 {
                shared.fetch_add(*local, Relaxed);
            }
        }
        if tally.sum_ms > 0 {
            self.0.sum_ms.fetch_add(tally.sum_ms, Relaxed);
        }
        *tally = Tally::default();
    }
}

/// Latencies counted locally, to be added to a [`Histogram`] at once.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    counts: [u64; BUCKETS.len() + 1],
    sum_ms: u64,
}

impl Tally {
    /// Counts one latency of `ms` milliseconds (negative: 0, a clock step between hosts).
    pub fn record_ms(&mut self, ms: i64) {
        let ms = ms.max(0) as u64;
        let secs = ms as f64 / 1000.0;
        self.counts[BUCKETS.partition_point(|&bound| bound < secs)] += 1;
        self.sum_ms += ms;
    }
}

/// Gives the histogram `name` its help text (`# HELP` on `/metrics`, once it has a series).
pub fn describe(name: &str, help: &str) {
    let mut registry = registry();
    registry.help.retain(|(n, _)| n != name);
    registry
        .help
        .push((name.to_owned(), help.replace('\n', " ")));
}

/// Every registered series in the Prometheus text format.
pub fn render() -> String {
    let registry = registry();
    let mut out = String::new();
    let mut names: Vec<&'static str> = registry.series.iter().map(|s| s.name).collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        if let Some((_, help)) = registry.help.iter().find(|(n, _)| n == name) {
            let _ = writeln!(out, "# HELP {name} {help}");
        }
        let _ = writeln!(out, "# TYPE {name} histogram");
        for s in registry.series.iter().filter(|s| s.name == name) {
            let sep = if s.labels.is_empty() { "" } else { "," };
            let mut cumulative = 0;
            for (i, count) in s.counts.iter().enumerate() {
                cumulative += count.load(Relaxed);
                let le = BUCKETS.get(i).map_or("+Inf".to_owned(), f64::to_string);
                let _ = writeln!(
                    out,
                    "{name}_bucket{{{}{sep}le=\"{le}\"}} {cumulative}",
                    s.labels
                );
            }
            let braces = if s.labels.is_empty() {
                String::new()
            } else {
                format!("{{{}}}", s.labels)
            };
            let sum = s.sum_ms.load(Relaxed) as f64 / 1000.0;
            let _ = writeln!(out, "{name}_sum{braces} {sum}");
            let _ = writeln!(out, "{name}_count{braces} {cumulative}");
        }
        out.push('\n');
    }
    out
}

fn escape(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tallies_render_as_cumulative_buckets_with_exact_sums() {
        const NAME: &str = "test_latency_seconds";
        let h = Histogram::register(NAME, &[("stage", "a\"b")]);
        let same = Histogram::register(NAME, &[("stage", "a\"b")]);
        describe(NAME, "How long.\nReally.");
        let mut t = Tally::default();
        for ms in [0, 1, 2, 40, 40, 1_000_000, -3] {
            t.record_ms(ms);
        }
        h.add(&mut t);
        same.add(&mut t); // emptied: adds nothing
        let mut t = Tally::default();
        t.record_ms(7);
        same.add(&mut t);
        let text = render();
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("test_latency_seconds"))
            .collect();
        assert_eq!(lines[0], "# HELP test_latency_seconds How long. Really.");
        assert_eq!(lines[1], "# TYPE test_latency_seconds histogram");
        let line =
            |le: &str| format!("test_latency_seconds_bucket{{stage=\"a\\\"b\",le=\"{le}\"}}");
        let value = |le: &str| -> u64 {
            let prefix = line(le);
            let l = lines.iter().find(|l| l.starts_with(&prefix)).unwrap();
            l.rsplit(' ').next().unwrap().parse().unwrap()
        };
        // 0, 1 and -3 (as 0) are ≤ 1 ms; 2 ≤ 2.5 ms; 7 ≤ 7.5 ms; 40 ≤ 40 ms; 1000 s above all.
        assert_eq!(value("0.001"), 3);
        assert_eq!(value("0.0025"), 4);
        assert_eq!(value("0.005"), 4);
        assert_eq!(value("0.0075"), 5);
        assert_eq!(value("0.04"), 7);
        assert_eq!(value("300"), 7);
        assert_eq!(value("+Inf"), 8);
        assert!(lines.contains(&"test_latency_seconds_sum{stage=\"a\\\"b\"} 1000.09"));
        assert!(lines.contains(&"test_latency_seconds_count{stage=\"a\\\"b\"} 8"));
    }
}
