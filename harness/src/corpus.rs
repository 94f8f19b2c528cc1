//! The shared corpus of RDB files and replication captures (`../shared/corpus`).

use std::path::PathBuf;

/// `$REDIS_REPL_CORPUS`, else `shared/corpus` beside the repository.
pub fn dir() -> PathBuf {
    if let Some(p) = std::env::var_os("REDIS_REPL_CORPUS") {
        return p.into();
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus")
}

/// Server labels in the corpus, e.g. `7.0.15`, `valkey-8.0.1`.
pub fn labels() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir().join("capture"))
        .map(|rd| {
            rd.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A capture's `.bin` and `.json` paths: `name` is `stream` or `stream-diskless`.
pub fn capture(label: &str, name: &str) -> (PathBuf, PathBuf) {
    let base = dir().join("capture").join(label);
    (
        base.join(format!("{name}.bin")),
        base.join(format!("{name}.json")),
    )
}

/// Every `rdb/<label>/<profile>.rdb` with its JSON.
pub fn rdb_files() -> Vec<(PathBuf, PathBuf)> {
    let mut out = Vec::new();
    for label in labels() {
        let base = dir().join("rdb").join(&label);
        let Ok(rd) = std::fs::read_dir(&base) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "rdb") {
                out.push((p.clone(), p.with_extension("json")));
            }
        }
    }
    out.sort();
    out
}
