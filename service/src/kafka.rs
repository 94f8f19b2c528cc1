//! Kafka client settings shared by both connectors.

use rdkafka::ClientConfig;
use std::collections::BTreeMap;

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
