//! TLS on gRPC links: a node serves over TLS when given a certificate and key, and every client
//! (relays and edges following senders, the SDK, the CLI) speaks TLS to an `https://` URL,
//! trusting the CA it is given or, without one, the system's roots. A node given a client CA
//! serves only clients that present a certificate it signed (mutual TLS); nodes present their
//! own certificate when they follow a sender.

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
    /// PEM CA certificate(s) whose client certificates this node requires (mutual TLS): a client
    /// that presents none signed by them is refused during the handshake.
    pub client_ca: Option<PathBuf>,
}

/// Why a TLS setting cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(String);

fn read(what: &str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| TlsError(format!("cannot read {what} {}: {e}", path.display())))
}

impl TlsConfig {
    /// Both or neither of `cert` and `key`; `client_ca` only on a node serving TLS.
    pub fn validate(&self) -> Result<(), TlsError> {
        match (&self.cert, &self.key) {
            (Some(_), None) => Err(TlsError("tls.cert needs tls.key".into())),
            (None, Some(_)) => Err(TlsError("tls.key needs tls.cert".into())),
            (None, None) if self.client_ca.is_some() => Err(TlsError(
                "tls.client_ca needs tls.cert and tls.key (client certificates are asked for only over TLS)"
                    .into(),
            )),
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
        let identity = identity(read("tls.cert", cert)?, read("tls.key", key)?)?;
        let server = ServerTlsConfig::new().identity(identity);
        Ok(Some(match &self.client_ca {
            Some(ca) => server.client_ca_root(Certificate::from_pem(certificates(
                "tls.client_ca",
                read("tls.client_ca", ca)?,
            )?)),
            None => server,
        }))
    }

    /// The client side, read once: the CA trusted for `https://` senders and, when this node has
    /// a certificate, that certificate to present to senders that ask for one.
    pub fn client(&self) -> Result<ClientTls, TlsError> {
        self.validate()?;
        let tls = match &self.ca {
            Some(ca) => ClientTls::with_ca_pem(read("tls.ca", ca)?)?,
            None => ClientTls::default(),
        };
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                tls.with_identity_pem(read("tls.cert", cert)?, read("tls.key", key)?)
            }
            _ => Ok(tls),
        }
    }
}

fn certificates(what: &str, pem: Vec<u8>) -> Result<Vec<u8>, TlsError> {
    if String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        Ok(pem)
    } else {
        Err(TlsError(format!("{what} holds no PEM certificate")))
    }
}

/// A certificate chain and its key, checked for the PEM blocks rustls will look for, so that a
/// swapped or empty file is named at start rather than failing every handshake.
fn identity(cert: Vec<u8>, key: Vec<u8>) -> Result<Identity, TlsError> {
    let cert = certificates("the certificate file", cert)?;
    if !String::from_utf8_lossy(&key).contains("PRIVATE KEY-----") {
        return Err(TlsError("the key file holds no PEM private key".into()));
    }
    Ok(Identity::from_pem(cert, key))
}

/// How clients speak TLS to `https://` URLs: the CA they trust (or the system's roots) and the
/// certificate they present to nodes that require one (mutual TLS).
#[derive(Clone, Default)]
pub struct ClientTls {
    ca_pem: Option<Arc<Vec<u8>>>,
    identity: Option<Identity>,
}

// By hand: the derived form would print the private key.
impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca", &self.ca_pem.as_ref().map(|_| "pem"))
            .field("identity", &self.identity.as_ref().map(|_| "pem"))
            .finish()
    }
}

impl ClientTls {
    /// Trust these PEM CA certificate(s) for `https://` URLs.
    pub fn with_ca_pem(pem: Vec<u8>) -> Result<ClientTls, TlsError> {
        Ok(ClientTls {
            ca_pem: Some(Arc::new(certificates("the CA file", pem)?)),
            identity: None,
        })
    }

    /// Present this PEM certificate chain and private key to nodes that require a client
    /// certificate (`tls.client_ca`).
    pub fn with_identity_pem(self, cert: Vec<u8>, key: Vec<u8>) -> Result<ClientTls, TlsError> {
        Ok(ClientTls {
            identity: Some(identity(cert, key)?),
            ..self
        })
    }

    /// Whether this client presents a certificate.
    pub fn has_identity(&self) -> bool {
        self.identity.is_some()
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
        let cfg = match &self.identity {
            Some(id) => cfg.identity(id.clone()),
            None => cfg,
        };
        ep.tls_config(cfg)
            .map_err(|e| TlsError(format!("TLS for {url}: {}", crate::with_causes(&e))))
    }
}

/// What to try when a connection to `url` failed (`why`, with its causes) the way a TLS
/// mismatch makes it fail; empty otherwise. The flags named are those of every `dci` command.
pub fn mismatch_hint(why: &str, url: &str, tls: &ClientTls) -> &'static str {
    let https = url.starts_with("https://");
    if !https && why.contains("transport error") {
        // A plaintext client reads a TLS server's first bytes as a bad frame, or finds the
        // connection closed or broken.
        " (if the node serves TLS, its URL is https://)"
    } else if https && why.contains("InvalidContentType") {
        " (if the node serves plaintext, its URL is http://)"
    } else if https
        && (why.contains("received fatal alert")
            || why.contains("broken pipe")
            || why.contains("connection closed"))
    {
        // A node requiring client certificates sends an alert and ends the connection after
        // the handshake; which of these the client sees first depends on timing.
        if tls.has_identity() {
            " (if the node requires client certificates: is this one signed by its --tls-client-ca?)"
        } else {
            " (if the node requires a client certificate, give --tls-cert and --tls-key)"
        }
    } else {
        ""
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

#[cfg(test)]
mod tests {
    use super::*;

    fn file(name: &str) -> PathBuf {
        format!("{}/../tests/tls/{name}", env!("CARGO_MANIFEST_DIR")).into()
    }

    #[test]
    fn a_client_ca_needs_a_served_certificate_and_files_must_hold_what_they_are_for() {
        let served = TlsConfig {
            cert: Some(file("node.pem")),
            key: Some(file("node.key")),
            ..Default::default()
        };
        let bare = TlsConfig {
            client_ca: Some(file("ca.pem")),
            ..Default::default()
        };
        let e = bare.validate().unwrap_err().to_string();
        assert!(e.contains("tls.client_ca needs tls.cert"), "{e}");
        assert!(bare.server().is_err() && bare.client().is_err());
        let mutual = TlsConfig {
            client_ca: Some(file("ca.pem")),
            ..served.clone()
        };
        assert!(mutual.server().unwrap().is_some());
        // A node presents its own certificate when it follows a sender.
        assert!(mutual.client().unwrap().has_identity());
        let swapped = TlsConfig {
            cert: Some(file("node.key")),
            key: Some(file("node.pem")),
            ..Default::default()
        };
        let e = swapped.server().unwrap_err().to_string();
        assert!(e.contains("holds no PEM certificate"), "{e}");
        let keyless = TlsConfig {
            key: Some(file("ca.pem")),
            ..served.clone()
        };
        let e = keyless.client().unwrap_err().to_string();
        assert!(e.contains("no PEM private key"), "{e}");
        let e = TlsConfig {
            client_ca: Some(file("node.key")),
            ..served
        }
        .server()
        .unwrap_err()
        .to_string();
        assert!(e.contains("tls.client_ca holds no PEM certificate"), "{e}");
    }

    #[test]
    fn a_client_tls_prints_no_key() {
        let key = std::fs::read(file("node.key")).unwrap();
        let tls = ClientTls::default()
            .with_identity_pem(std::fs::read(file("node.pem")).unwrap(), key.clone())
            .unwrap();
        let printed = format!("{tls:?}");
        let body = String::from_utf8_lossy(&key)
            .lines()
            .nth(1)
            .unwrap()
            .to_string();
        assert!(!printed.contains(&body[..16]), "{printed}");
        // "-----BEGIN" as a derived Debug of the PEM's bytes would print it.
        assert!(!printed.contains("45, 45, 45, 45, 45, 66"), "{printed}");
    }

    #[test]
    fn mismatch_hints_name_what_to_check() {
        let none = ClientTls::default();
        let with_cert = none
            .clone()
            .with_identity_pem(
                std::fs::read(file("node.pem")).unwrap(),
                std::fs::read(file("node.key")).unwrap(),
            )
            .unwrap();
        let cases = [
            (
                "http://h:1",
                &none,
                "transport error",
                "its URL is https://",
            ),
            (
                "https://h:1",
                &none,
                "InvalidContentType",
                "its URL is http://",
            ),
            (
                "https://h:1",
                &none,
                "received fatal alert: CertificateRequired",
                "give --tls-cert",
            ),
            ("https://h:1", &none, "broken pipe", "give --tls-cert"),
            (
                "https://h:1",
                &with_cert,
                "received fatal alert: UnknownCA",
                "--tls-client-ca?",
            ),
            (
                "https://h:1",
                &with_cert,
                "connection closed",
                "--tls-client-ca?",
            ),
            (
                "https://h:1",
                &none,
                "invalid peer certificate: UnknownIssuer",
                "",
            ),
            ("http://h:1", &none, "status: InvalidArgument", ""),
        ];
        for (url, tls, why, hint) in cases {
            let got = mismatch_hint(why, url, tls);
            assert_eq!(got.is_empty(), hint.is_empty(), "{url} {why}: {got}");
            assert!(got.contains(hint), "{url} {why}: {got}");
        }
    }
}
