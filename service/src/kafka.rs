//! Kafka client settings shared by both connectors.

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::ClientConfig;
use std::collections::BTreeMap;
use std::time::Duration;

/// Builds a client config from the bootstrap servers and the operator's passthrough
/// properties (which win over our defaults, except where noted by the caller).
pub fn client_config(
    bootstrap_servers: &str,
    defaults: &[(&str, &str)],
    properties: &BTreeMap<String, String>,
) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", bootstrap_servers);
    for (k, v) in defaults {
        c.set(*k, *v);
    }
    for (k, v) in properties {
        c.set(k, v);
    }
    c
}

/// Partitions of `topic`, or `None` when it does not exist.
pub fn partition_count(client: &rdkafka::ClientConfig, topic: &str) -> anyhow::Result<Option<u32>> {
    let consumer: BaseConsumer = client
        .create()
        .map_err(|e| anyhow::anyhow!("cannot create a Kafka client: {e}"))?;
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot reach Kafka at {}: {e}",
                client.get("bootstrap.servers").unwrap_or("?")
            )
        })?;
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    if t.error().is_some() || t.partitions().is_empty() {
        return Ok(None);
    }
    Ok(Some(t.partitions().len() as u32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::producer::BaseProducer;

    /// librdkafka is built with OpenSSL: TLS and SASL SCRAM settings (what managed Kafka services
    /// require) are accepted. Without the `ssl` feature, creating this client fails with
    /// "Unsupported value … (build with OpenSSL)".
    #[test]
    fn tls_and_sasl_scram_are_built_in() {
        let properties: BTreeMap<String, String> = [
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanism", "SCRAM-SHA-512"),
            ("sasl.username", "u"),
            ("sasl.password", "p"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let client = client_config("127.0.0.1:1", &[], &properties);
        let producer: Result<BaseProducer, _> = client.create();
        assert!(producer.is_ok(), "{:?}", producer.err());
    }
}
