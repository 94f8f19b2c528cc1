//! TLS to Redis (`rediss://`), with rustls: the replica link's own connector, and redis-rs
//! clients (discovery, `check`, the sink's target) built from the same files.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// PEM files of a `rediss://` connection (all optional): the `[redis.tls]` table of both
/// connectors.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    /// CA certificate(s) that sign the server's certificate; without it, the public web PKI
    /// roots are trusted.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key, for servers that require them (`tls-auth-clients yes`).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

/// Makes ring rustls's process-wide provider (redis-rs asks for the default one).
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

fn read(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| anyhow::anyhow!("{what} {}: {e}", path.display()))
}

impl TlsFiles {
    /// Checks that the files exist and parse, for a clear error at start.
    pub fn validate(&self, section: &str) -> anyhow::Result<()> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) | (None, Some(_)) => {
                anyhow::bail!("{section}.tls.cert_file and {section}.tls.key_file go together")
            }
            _ => {}
        }
        self.client_config()
            .map(|_| ())
            .map_err(|e| anyhow::anyhow!("{section}: {e}"))
    }

    /// The rustls configuration for the replica link.
    pub fn client_config(&self) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let mut roots = rustls::RootCertStore::empty();
        match &self.ca_file {
            Some(path) => {
                let certs: Vec<CertificateDer<'static>> =
                    CertificateDer::pem_slice_iter(&read(path, "tls.ca_file")?)
                        .collect::<Result<_, _>>()
                        .map_err(|e| anyhow::anyhow!("tls.ca_file {}: {e}", path.display()))?;
                anyhow::ensure!(
                    !certs.is_empty(),
                    "tls.ca_file {}: no certificate in it",
                    path.display()
                );
                for c in certs {
                    roots
                        .add(c)
                        .map_err(|e| anyhow::anyhow!("tls.ca_file {}: {e}", path.display()))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let builder = rustls::ClientConfig::builder().with_root_certificates(roots);
        let config = match (&self.cert_file, &self.key_file) {
            (Some(cert), Some(key)) => {
                let chain: Vec<CertificateDer<'static>> =
                    CertificateDer::pem_slice_iter(&read(cert, "tls.cert_file")?)
                        .collect::<Result<_, _>>()
                        .map_err(|e| anyhow::anyhow!("tls.cert_file {}: {e}", cert.display()))?;
                let key = PrivateKeyDer::from_pem_slice(&read(key, "tls.key_file")?)
                    .map_err(|e| anyhow::anyhow!("tls.key_file {}: {e}", key.display()))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| anyhow::anyhow!("tls.cert_file/tls_key_file: {e}"))?
            }
            _ => builder.with_no_client_auth(),
        };
        Ok(Arc::new(config))
    }

    /// A redis-rs client for `url` that trusts these files (plain `Client::open` when none).
    pub fn redis_client(&self, url: &str) -> redis::RedisResult<redis::Client> {
        if self.ca_file.is_none() && self.cert_file.is_none() {
            return redis::Client::open(url);
        }
        let load = |p: &Path| {
            std::fs::read(p).map_err(|e| {
                redis::RedisError::from((
                    redis::ErrorKind::InvalidClientConfig,
                    "cannot read a TLS file",
                    format!("{}: {e}", p.display()),
                ))
            })
        };
        let client_tls = match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => Some(redis::ClientTlsConfig {
                client_cert: load(c)?,
                client_key: load(k)?,
            }),
            _ => None,
        };
        let root_cert = self.ca_file.as_deref().map(load).transpose()?;
        redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls,
                root_cert,
            },
        )
    }
}

/// Connects `stream` with TLS to `host`.
pub async fn connect(
    config: Arc<rustls::ClientConfig>,
    host: &str,
    stream: tokio::net::TcpStream,
) -> std::io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let name = ServerName::try_from(host.to_owned())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    tokio_rustls::TlsConnector::from(config)
        .connect(name, stream)
        .await
}
