//! TLS on the control plane (rustls through tonic), mutual: each side presents a certificate
//! signed by the cluster's CA and accepts only peers whose certificate that CA signed. Workers
//! take `--tls-cert`, `--tls-key` and `--tls-ca`; the coordinator the same options or
//! `tls_cert`, `tls_key`, `tls_ca` in hosts.toml. A worker's certificate must name the host
//! part of the address the coordinator uses for it (DNS name or IP address).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// A certificate, its key and the CA that signs the cluster's certificates, read into memory.
#[derive(Clone)]
pub struct TlsFiles {
    certificate: Vec<u8>,
    key: Vec<u8>,
    ca: Vec<u8>,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsFiles(…)")
    }
}

fn read_pem(path: &Path, what: &str) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read the TLS {what} {}", path.display()))?;
    if !bytes.windows(10).any(|w| w == b"-----BEGIN") {
        bail!("{}: the TLS {what} is not in PEM format", path.display());
    }
    Ok(bytes)
}

impl TlsFiles {
    /// All three paths or none: anything in between is an error naming what is missing.
    pub fn from_paths(
        cert: Option<&PathBuf>,
        key: Option<&PathBuf>,
        ca: Option<&PathBuf>,
    ) -> anyhow::Result<Option<TlsFiles>> {
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(TlsFiles {
                certificate: read_pem(cert, "certificate")?,
                key: read_pem(key, "key")?,
                ca: read_pem(ca, "CA certificate")?,
            })),
            _ => bail!("TLS needs all of --tls-cert, --tls-key and --tls-ca (or none of them)"),
        }
    }

    fn identity(&self) -> Identity {
        Identity::from_pem(&self.certificate, &self.key)
    }

    /// A worker's server side: its identity, and only clients with a certificate from the CA.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(self.identity())
            .client_ca_root(Certificate::from_pem(&self.ca))
    }

    /// A coordinator's client side for the worker at `address` (host:port).
    pub fn client(&self, address: &str) -> ClientTlsConfig {
        let host = address
            .rsplit_once(':')
            .map_or(address, |(host, _)| host)
            .trim_start_matches('[')
            .trim_end_matches(']');
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca))
            .identity(self.identity())
            .domain_name(host)
    }
}
