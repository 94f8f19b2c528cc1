//! The deployment files an operator starts from are checked here, since no Docker engine runs in
//! CI: `compose/compose.yaml` against the Compose specification's JSON schema (installed by
//! `scripts/dev-env.sh`), the files it mounts and builds from, Prometheus's scrape targets against
//! the connectors' `metrics.listen`, and every metric the Grafana dashboard queries against
//! `docs/metrics.md`, which in turn must list exactly the metrics the code registers.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value;
use yaml_rust2::{Yaml, YamlLoader};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// YAML to JSON as Compose reads it: anchors resolved, `<<` merge keys applied (explicit keys
/// win), scalars kept as YAML typed them.
fn to_json(yaml: &Yaml) -> Value {
    match yaml {
        Yaml::Real(s) => s
            .parse::<f64>()
            .map(Value::from)
            .unwrap_or_else(|_| s.clone().into()),
        Yaml::Integer(i) => (*i).into(),
        Yaml::String(s) => s.clone().into(),
        Yaml::Boolean(b) => (*b).into(),
        Yaml::Array(items) => items.iter().map(to_json).collect(),
        Yaml::Hash(map) => {
            let mut object = serde_json::Map::new();
            let mut merged = serde_json::Map::new();
            for (k, v) in map {
                let key = match k {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    other => panic!("unsupported mapping key {other:?}"),
                };
                if key == "<<" {
                    let Value::Object(base) = to_json(v) else {
                        panic!("<< needs a mapping")
                    };
                    merged.extend(base);
                } else {
                    object.insert(key, to_json(v));
                }
            }
            for (k, v) in merged {
                object.entry(k).or_insert(v);
            }
            Value::Object(object)
        }
        Yaml::Null => Value::Null,
        other => panic!("unsupported YAML node {other:?}"),
    }
}

fn load_yaml(path: &Path) -> Value {
    let docs = YamlLoader::load_from_str(&read(path))
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(docs.len(), 1, "{}: one YAML document", path.display());
    to_json(&docs[0])
}

fn compose() -> Value {
    load_yaml(&repo().join("compose/compose.yaml"))
}

#[test]
fn compose_file_follows_the_compose_specification() {
    let schema_path = harness::cache_dir().join("compose-spec.json");
    let mut schema: Value = serde_json::from_str(&read(&schema_path))
        .unwrap_or_else(|e| panic!("{}: {e} (run scripts/dev-env.sh)", schema_path.display()));
    // Its `$schema` names the 2019-09 meta-schema by an http:// URI that would be fetched; the
    // draft is chosen explicitly instead.
    schema.as_object_mut().unwrap().remove("$schema");
    let validator = jsonschema::draft201909::new(&schema).expect("the Compose schema compiles");
    let compose = compose();
    let errors: Vec<String> = validator
        .iter_errors(&compose)
        .map(|e| format!("{}: {e}", e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "compose/compose.yaml:\n{}",
        errors.join("\n")
    );

    let services = compose["services"].as_object().unwrap();
    for name in [
        "kafka",
        "source-redis",
        "target-redis",
        "source-connector",
        "sink-connector",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains_key(name), "service {name} missing");
    }
    let target = services["target-redis"]["command"].as_array().unwrap();
    let policy = target
        .iter()
        .position(|a| a == "--maxmemory-policy")
        .unwrap();
    assert_eq!(
        target[policy + 1],
        "noeviction",
        "the target runs with noeviction"
    );
}

#[test]
fn compose_mounts_and_builds_from_files_in_the_repository() {
    let dir = repo().join("compose");
    let compose = compose();
    for (name, service) in compose["services"].as_object().unwrap() {
        for volume in service["volumes"].as_array().into_iter().flatten() {
            let source = volume.as_str().unwrap().split(':').next().unwrap();
            if source.starts_with('.') {
                assert!(
                    dir.join(source).exists(),
                    "{name} mounts {source}, which does not exist"
                );
            }
        }
        if let Some(build) = service.get("build") {
            let context = dir.join(build["context"].as_str().unwrap());
            let dockerfile = context.join(build["dockerfile"].as_str().unwrap());
            assert!(
                dockerfile.is_file(),
                "{name} builds from {}",
                dockerfile.display()
            );
        }
    }
    // Secrets are never written in the file: every password is an interpolated variable.
    let text = read(&dir.join("compose.yaml"));
    for line in text
        .lines()
        .filter(|l| l.to_lowercase().contains("password"))
    {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        assert!(
            line.contains("${") || line.contains("$$"),
            "compose/compose.yaml has a literal secret: {line}"
        );
    }
    assert!(dir.join(".env.example").is_file());
}

#[test]
fn prometheus_scrapes_both_connectors_where_they_listen() {
    let dir = repo().join("compose");
    let prometheus = load_yaml(&dir.join("prometheus/prometheus.yml"));
    let targets: BTreeSet<String> = prometheus["scrape_configs"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|job| job["static_configs"].as_array().unwrap().clone())
        .flat_map(|c| c["targets"].as_array().unwrap().clone())
        .map(|t| t.as_str().unwrap().to_string())
        .collect();
    for (service, config) in [
        ("source-connector", "source.toml"),
        ("sink-connector", "sink.toml"),
    ] {
        let text = read(&dir.join(config));
        let listen = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("listen = "))
            .unwrap_or_else(|| panic!("{config}: no metrics.listen"))
            .trim_matches('"');
        let port = listen.rsplit(':').next().unwrap();
        let target = format!("{service}:{port}");
        assert!(
            targets.contains(&target),
            "prometheus.yml does not scrape {target}: {targets:?}"
        );
    }
}

/// `docs/metrics.md`'s tables: metric name → type.
fn documented_metrics() -> BTreeMap<String, String> {
    read(&repo().join("docs/metrics.md"))
        .lines()
        .filter_map(|line| {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            Some((name.to_string(), cells.get(2)?.to_string()))
        })
        .collect()
}

/// Metrics the connectors register: `counter!("name"`, `gauge!(…)`, `histogram!(…)` literals.
fn registered_metrics() -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    let mut stack: Vec<PathBuf> = ["source-connector/src", "sink-connector/src", "service/src"]
        .iter()
        .map(|d| repo().join(d))
        .collect();
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            stack.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
            continue;
        }
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = read(&path);
        // `service::latency` histograms: `Histogram::register("name"`.
        for (kind, opener) in [
            ("counter", "counter!("),
            ("gauge", "gauge!("),
            ("histogram", "histogram!("),
            ("histogram", "Histogram::register("),
        ] {
            for (at, _) in text.match_indices(&opener) {
                let rest = text[at + opener.len()..].trim_start();
                if let Some(rest) = rest.strip_prefix('"') {
                    let name = &rest[..rest.find('"').unwrap()];
                    found.insert(name.to_string(), kind.to_string());
                }
            }
        }
    }
    found
}

#[test]
fn metrics_reference_lists_exactly_the_registered_metrics() {
    let documented = documented_metrics();
    let registered = registered_metrics();
    assert!(
        registered.len() > 40,
        "found only {} registered metrics",
        registered.len()
    );
    let mut problems = Vec::new();
    for (name, kind) in &registered {
        match documented.get(name) {
            None => problems.push(format!("{name} ({kind}) is registered but not documented")),
            Some(doc) if doc != kind => {
                problems.push(format!("{name} is a {kind} but documented as {doc}"))
            }
            Some(_) => {}
        }
    }
    for name in documented.keys().filter(|n| !registered.contains_key(*n)) {
        problems.push(format!("{name} is documented but never registered"));
    }
    assert!(
        problems.is_empty(),
        "docs/metrics.md:\n{}",
        problems.join("\n")
    );
}

#[test]
fn dashboard_queries_only_documented_metrics_and_covers_what_operators_watch() {
    let path = repo().join("compose/grafana/dashboards/redis-repl.json");
    let dashboard: Value = serde_json::from_str(&read(&path)).unwrap();
    let documented = documented_metrics();
    let mut used = BTreeSet::new();
    let mut titles = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        if panel["type"] == "row" {
            continue;
        }
        titles.insert(panel["title"].as_str().unwrap().to_string());
        assert_eq!(
            panel["datasource"]["uid"], "prometheus",
            "{}",
            panel["title"]
        );
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if !(word.starts_with("source_") || word.starts_with("sink_")) {
                    continue;
                }
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s))
                    .filter(|b| documented.get(*b).is_some_and(|t| t == "histogram"))
                    .unwrap_or(word);
                assert!(
                    documented.contains_key(base),
                    "panel {:?} queries {word}, which docs/metrics.md does not list",
                    panel["title"]
                );
                used.insert(base.to_string());
            }
        }
    }
    // The list: lag in seconds and bytes, throughput, snapshot progress, retries by error
    // code, stalled lanes, end-to-end latency and full resyncs.
    for needed in [
        "sink_lag_seconds",
        "source_offset_acked",
        "sink_records_applied_total",
        "source_records_produced_total",
        "source_snapshot_progress_ratio",
        "sink_retries_total",
        "sink_lane_stalled",
        "sink_end_to_end_seconds",
        "source_full_syncs_total",
    ] {
        assert!(
            used.contains(needed),
            "the dashboard has no panel on {needed}"
        );
    }
    assert!(titles.len() >= 15, "{titles:?}");
}
