//! Loading a connector's configuration: a TOML file, then environment variables
//! `<PREFIX>_<SECTION>__<KEY>` overriding it. Unknown keys are errors (the config structs use
//! `deny_unknown_fields`), and every error names the key and where its value came from.

use serde::de::DeserializeOwned;
use std::path::Path;

/// Reads `path` (TOML) and applies environment overrides with `env_prefix` (`SOURCE`, `SINK`).
pub fn load<T: DeserializeOwned>(path: Option<&Path>, env_prefix: &str) -> anyhow::Result<T> {
    let mut builder = config::Config::builder();
    if let Some(path) = path {
        anyhow::ensure!(
            path.exists(),
            "config file {} does not exist",
            path.display()
        );
        builder = builder.add_source(
            config::File::from(path)
                .format(config::FileFormat::Toml)
                .required(true),
        );
    }
    let env = config::Environment::with_prefix(env_prefix)
        .prefix_separator("_")
        .separator("__")
        .try_parsing(true);
    let where_ = match path {
        Some(p) => format!("{} and {env_prefix}_* environment variables", p.display()),
        None => format!("{env_prefix}_* environment variables"),
    };
    let merged = builder.add_source(env).build().map_err(|e| {
        anyhow::anyhow!(
            "invalid configuration in {where_}: {}",
            one_line(&e.to_string())
        )
    })?;
    merged.try_deserialize().map_err(|e| {
        anyhow::anyhow!(
            "invalid configuration in {where_}: {}",
            one_line(&e.to_string())
        )
    })
}

/// Folds a multi-line parser message (with its source snippet) into one line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.chars().all(|c| matches!(c, '|' | '^' | ' ' | '-')))
        .map(|l| l.trim_start_matches("| ").trim_start_matches('|').trim())
        .collect::<Vec<_>>()
        .join("; ")
}

/// Hides the password of a `redis://user:password@host` URL for logs.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        kafka: Kafka,
    }
    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Kafka {
        partitions: u32,
        #[serde(default)]
        topic: String,
    }

    fn write(text: &str) -> tempfile::NamedTempFile {
        let f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        std::fs::write(f.path(), text).unwrap();
        f
    }

    #[test]
    fn file_and_errors() {
        let f = write("[kafka]\npartitions = 4\ntopic = \"t\"\n");
        let s: Sample = load(Some(f.path()), "SVCTEST_A").unwrap();
        assert_eq!(s.kafka.partitions, 4);
        assert_eq!(s.kafka.topic, "t");

        let f = write("[kafka]\npartitions = 4\ntopik = \"t\"\n");
        let e = load::<Sample>(Some(f.path()), "SVCTEST_B").unwrap_err();
        assert!(format!("{e:#}").contains("topik"), "{e:#}");

        let f = write("[kafka]\npartitions = \"four\"\n");
        let e = load::<Sample>(Some(f.path()), "SVCTEST_C").unwrap_err();
        assert!(format!("{e:#}").contains("partitions"), "{e:#}");
    }

    #[test]
    fn redacts() {
        assert_eq!(redact_url("redis://u:secret@h:1"), "redis://u:***@h:1");
        assert_eq!(redact_url("redis://:secret@h:1"), "redis://:***@h:1");
        assert_eq!(redact_url("redis://h:1"), "redis://h:1");
    }
}
