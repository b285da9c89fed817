//! TLS on gRPC links: a node serves over TLS when given a certificate and key, and every client
//! (relays and edges following senders, the SDK, the CLI) speaks TLS to an `https://` URL,
//! trusting the CA it is given or, without one, the system's roots.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// The `tls` section of a node's config (flags `--tls-cert`, `--tls-key`, `--tls-ca`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain this node serves gRPC with (with `key`): TLS on its port.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    pub key: Option<PathBuf>,
    /// PEM CA certificate(s) trusted for `https://` senders (default: the system's roots).
    pub ca: Option<PathBuf>,
}

/// Why a TLS setting cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

fn read(what: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError(format!("cannot read {what} {}: {e}", path.display())))
}

impl TlsConfig {
    /// Both or neither of `cert` and `key`.
    pub fn validate(&self) -> Result<(), TlsError> {
        match (&self.cert, &self.key) {
            (Some(_), None) => Err(TlsError("tls.cert needs tls.key".into())),
            (None, Some(_)) => Err(TlsError("tls.key needs tls.cert".into())),
            _ => Ok(()),
        }
    }

    /// The scheme of this node's URL: "https" when it serves TLS.
    pub fn scheme(&self) -> &'static str {
        if self.cert.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The server side: `None` serves plaintext.
    pub fn server(&self) -> Result<Option<ServerTlsConfig>, TlsError> {
        self.validate()?;
        let (Some(cert), Some(key)) = (&self.cert, &self.key) else {
            return Ok(None);
        };
        let identity = Identity::from_pem(read("tls.cert", cert)?, read("tls.key", key)?);
        Ok(Some(ServerTlsConfig::new().identity(identity)))
    }

    /// The client side, read once.
    pub fn client(&self) -> Result<ClientTls, TlsError> {
        match &self.ca {
            Some(ca) => ClientTls::with_ca_pem(read("tls.ca", ca)?),
            None => Ok(ClientTls::default()),
        }
    }
}

/// How clients speak TLS to `https://` URLs: the CA they trust (or the system's roots).
#[derive(Clone, Debug, Default)]
pub struct ClientTls {
    ca_pem: Option<Arc<Vec<u8>>>,
}

impl ClientTls {
    /// Trust these PEM CA certificate(s) for `https://` URLs.
    pub fn with_ca_pem(pem: Vec<u8>) -> Result<ClientTls, TlsError> {
        if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
            return Err(TlsError("the CA file holds no PEM certificate".into()));
        }
        Ok(ClientTls {
            ca_pem: Some(Arc::new(pem)),
        })
    }

    /// An endpoint for `url`: TLS for `https://`, with this CA (or the system's roots).
    pub fn endpoint(&self, url: &str) -> Result<Endpoint, TlsError> {
        let ep = Endpoint::from_shared(url.to_string())
            .map_err(|e| TlsError(format!("invalid URL: {e}")))?;
        if !url.starts_with("https://") {
            return Ok(ep);
        }
        let cfg = match &self.ca_pem {
            Some(pem) => {
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem.as_slice()))
            }
            None => ClientTlsConfig::new().with_native_roots(),
        };
        ep.tls_config(cfg)
            .map_err(|e| TlsError(format!("TLS for {url}: {}", crate::with_causes(&e))))
    }
}

/// The gRPC server settings every dci node uses, over TLS when `tls` has a certificate.
pub fn grpc_server(tls: &TlsConfig) -> Result<tonic::transport::Server, TlsError> {
    let server = crate::grpc_server();
    match tls.server()? {
        Some(cfg) => server
            .tls_config(cfg)
            .map_err(|e| TlsError(format!("TLS: {}", crate::with_causes(&e)))),
        None => Ok(server),
    }
}
