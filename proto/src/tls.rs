//! TLS on gRPC links: a node serves over TLS when given a certificate and key, and every client
//! (relays and edges following senders, the SDK, the CLI) speaks TLS to an `https://` URL,
//! trusting the CA it is given or, without one, the system's roots. A node given a client CA
//! serves only clients that present a certificate it signed (mutual TLS); nodes present their
//! own certificate when they follow a sender.
//!
//! Certificates are renewed while nodes run (cert-manager rewrites a Secret's files): a server
//! looks at its files' modification times at most once a second as connections arrive and,
//! when they changed, serves the new ones from the next handshake on (keeping the old ones if
//! the new cannot be used, as in the middle of a rewrite); a node reads its files anew each
//! time it connects to a sender.

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};

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
    /// Under mutual TLS, which clients may call which API, by the names their certificates
    /// carry; an empty list lets every client `client_ca` signed.
    pub allow: Allow,
}

/// Which clients may call each API: patterns of the DNS and URI names (subject alternative
/// names) a client certificate carries, where `*` stands for any run of characters
/// (`relay-*.eu.example`, `spiffe://prod/ns/orders/*`). An empty list lets every client that
/// `client_ca` signed; a list of an API the node does not serve is not used. Health and
/// reflection answer every client.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Allow {
    /// `Publisher` (writers, `dci publish`).
    #[serde(deserialize_with = "crate::types::de_list")]
    pub publish: Vec<String>,
    /// `Subscribe` (relays, edges, near caches following this node).
    #[serde(deserialize_with = "crate::types::de_list")]
    pub subscribe: Vec<String>,
    /// `Cache` (applications reading through an edge, `dci get/set/delete`).
    #[serde(deserialize_with = "crate::types::de_list")]
    pub cache: Vec<String>,
    /// `Admin` (`dci status`).
    #[serde(deserialize_with = "crate::types::de_list")]
    pub admin: Vec<String>,
}

impl Allow {
    fn is_empty(&self) -> bool {
        self.lists().iter().all(|(_, l)| l.is_empty())
    }

    fn lists(&self) -> [(&'static str, &[String]); 4] {
        [
            ("publish", &self.publish),
            ("subscribe", &self.subscribe),
            ("cache", &self.cache),
            ("admin", &self.admin),
        ]
    }

    /// The list that guards a gRPC method's path, and its key, if any.
    fn guarding(&self, path: &str) -> Option<(&'static str, &[String])> {
        let service = path.strip_prefix("/dci.v1.")?.split('/').next()?;
        let i = match service {
            "Publisher" => 0,
            "Subscribe" => 1,
            "Cache" => 2,
            "Admin" => 3,
            _ => return None,
        };
        let (key, list) = self.lists()[i];
        (!list.is_empty()).then_some((key, list))
    }

    /// Why a call to `path` by a client whose certificate carries `names` is refused, if it is.
    pub fn refuses(&self, path: &str, names: Option<&[String]>) -> Option<String> {
        let (key, list) = self.guarding(path)?;
        let names = names.unwrap_or_default();
        if names
            .iter()
            .any(|n| list.iter().any(|p| name_matches(p, n)))
        {
            return None;
        }
        let shown = if names.is_empty() {
            "none".to_string()
        } else {
            names.join(", ")
        };
        Some(format!(
            "this client's certificate is not allowed to call {} here (its names: {shown}; \
             see the node's tls.allow.{key})",
            path.trim_start_matches('/')
        ))
    }
}

/// Does `name` match `pattern`, where `*` in the pattern stands for any run of characters?
/// DNS names are compared without regard to ASCII case, as DNS does; URIs (SPIFFE IDs, whose
/// paths are case-sensitive) exactly.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    let (pattern, name) = if name.contains("://") {
        (pattern.to_string(), name.to_string())
    } else {
        (pattern.to_ascii_lowercase(), name.to_ascii_lowercase())
    };
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = name.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
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
            _ if !self.allow.is_empty() && self.client_ca.is_none() => Err(TlsError(
                "tls.allow needs tls.client_ca (clients are known by their certificates)".into(),
            )),
            _ => {
                for (key, list) in self.allow.lists() {
                    if list.iter().any(|p| p.trim().is_empty()) {
                        return Err(TlsError(format!("tls.allow.{key} holds an empty name")));
                    }
                }
                Ok(())
            }
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

    /// The server side as its files are now: `None` serves plaintext.
    pub fn server(&self) -> Result<Option<Arc<rustls::ServerConfig>>, TlsError> {
        self.validate()?;
        let (Some(cert), Some(key)) = (&self.cert, &self.key) else {
            return Ok(None);
        };
        let chain = read("tls.cert", cert)?;
        let chain = CertificateDer::pem_slice_iter(&certificates("tls.cert", chain)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError(format!("tls.cert {}: {e}", cert.display())))?;
        let key = PrivateKeyDer::from_pem_slice(&read("tls.key", key)?).map_err(|e| {
            TlsError(format!(
                "tls.key {} holds no PEM private key: {e}",
                key.display()
            ))
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError(format!("TLS: {e}")))?;
        let builder = match &self.client_ca {
            Some(ca) => {
                let pem = certificates("tls.client_ca", read("tls.client_ca", ca)?)?;
                let mut roots = rustls::RootCertStore::empty();
                for c in CertificateDer::pem_slice_iter(&pem) {
                    let c = c.map_err(|e| TlsError(format!("tls.client_ca: {e}")))?;
                    roots
                        .add(c)
                        .map_err(|e| TlsError(format!("tls.client_ca: {e}")))?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots.into(),
                    provider,
                )
                .build()
                .map_err(|e| TlsError(format!("tls.client_ca: {e}")))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| TlsError(format!("tls.cert and tls.key: {e}")))?;
        // gRPC is HTTP/2 only.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Some(Arc::new(config)))
    }

    /// When each of this node's TLS files last changed (`None`: not readable).
    fn stamp(&self) -> Vec<Option<(SystemTime, u64)>> {
        [&self.cert, &self.key, &self.client_ca]
            .into_iter()
            .map(|p| {
                let m = std::fs::metadata(p.as_ref()?).ok()?;
                Some((m.modified().ok()?, m.len()))
            })
            .collect()
    }

    /// The client side: the CA trusted for `https://` senders and, when this node has a
    /// certificate, that certificate to present to senders that ask for one; read now, and again
    /// for each connection (the files may have been renewed).
    pub fn client(&self) -> Result<ClientTls, TlsError> {
        let mut tls = self.read_client()?;
        if self.ca.is_some() || self.cert.is_some() {
            tls.files = Some(Arc::new(self.clone()));
        }
        Ok(tls)
    }

    fn read_client(&self) -> Result<ClientTls, TlsError> {
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

/// A client's certificate chain and its key, checked for the PEM blocks rustls will look for, so
/// that a swapped or empty file is named at start rather than failing every handshake.
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
    /// Where `ca_pem` and `identity` were read from, to read them again.
    files: Option<Arc<TlsConfig>>,
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
            ..Default::default()
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
        let renewed;
        let this = match self.files.as_ref().map(|f| f.read_client()) {
            Some(Ok(tls)) => {
                renewed = tls;
                &renewed
            }
            // Files in the middle of being rewritten: what was read before.
            Some(Err(e)) => {
                tracing::warn!(error = %e, "TLS files cannot be read again; using those read before");
                self
            }
            None => self,
        };
        let cfg = match &this.ca_pem {
            Some(pem) => {
                ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem.as_slice()))
            }
            None => ClientTlsConfig::new().with_native_roots(),
        };
        let cfg = match &this.identity {
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
    if !https
        && [
            "transport error",
            "h2 protocol error",
            "frame with invalid size",
            "connection closed",
            "broken pipe",
        ]
        .iter()
        .any(|w| why.contains(w))
    {
        // A plaintext client reads a TLS server's first bytes as a bad frame, or finds the
        // connection closed or broken; which, and how tonic words it, depends on timing.
        " (if the node serves TLS, its URL is https://)"
    } else if https && why.contains("InvalidContentType") {
        " (if the node serves plaintext, its URL is http://)"
    } else if https
        && [
            "received fatal alert",
            "broken pipe",
            "connection closed",
            "connection was not ready",
        ]
        .iter()
        .any(|w| why.contains(w))
    {
        // A node requiring client certificates sends an alert and ends the connection after
        // the handshake; which of these the client sees first depends on timing.
        if tls.has_identity() {
            " (if the node requires client certificates: is this one signed by its --tls-client-ca, for client authentication? The node logs why it refused one)"
        } else {
            " (if the node requires a client certificate, give --tls-cert and --tls-key)"
        }
    } else {
        ""
    }
}

/// The gRPC server settings every dci node uses (TLS, when configured, is in [`incoming`]), with
/// the `tls.allow` lists enforced.
pub fn grpc_server(
    tls: &TlsConfig,
    refused: Arc<std::sync::atomic::AtomicU64>,
) -> Result<
    tonic::transport::Server<
        tower::layer::util::Stack<AuthorizeLayer, tower::layer::util::Identity>,
    >,
    TlsError,
> {
    tls.validate()?;
    Ok(crate::grpc_server().layer(AuthorizeLayer {
        allow: Arc::new(tls.allow.clone()),
        refusals: Arc::new(Refusals {
            said: Mutex::new(None),
            count: refused,
        }),
    }))
}

/// How often, at most, a node warns of calls its `tls.allow` lists refused.
const REFUSALS_WARNING_EVERY: Duration = Duration::from_secs(10);

/// Calls refused, and when a warning last said so: a client that keeps retrying costs one line
/// every [`REFUSALS_WARNING_EVERY`], not one per call.
#[derive(Debug)]
struct Refusals {
    /// When the last warning was given, and the count then.
    said: Mutex<Option<(Instant, u64)>>,
    /// Calls refused (the node's `dci_calls_refused_total`).
    count: Arc<std::sync::atomic::AtomicU64>,
}

impl Refusals {
    fn note(&self, peer: Option<&Peer>, why: &str) {
        let count = self
            .count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        let mut said = crate::upstream::lock(&self.said);
        if said.is_some_and(|(at, _)| at.elapsed() < REFUSALS_WARNING_EVERY) {
            return;
        }
        let before = said.map_or(0, |(_, n)| n);
        *said = Some((Instant::now(), count));
        let client = peer
            .and_then(|p| p.tcp.remote_addr())
            .map_or_else(|| "unknown".to_string(), |a| a.to_string());
        tracing::warn!(%client, refused = count - before, %why, "call refused (tls.allow)");
    }
}

/// Refuses, with `PERMISSION_DENIED`, a call whose client is not on its API's `tls.allow` list.
#[derive(Clone, Debug)]
pub struct AuthorizeLayer {
    allow: Arc<Allow>,
    refusals: Arc<Refusals>,
}

impl<S> tower::Layer<S> for AuthorizeLayer {
    type Service = Authorize<S>;

    fn layer(&self, inner: S) -> Authorize<S> {
        Authorize {
            inner,
            allow: self.allow.clone(),
            refusals: self.refusals.clone(),
        }
    }
}

/// See [`AuthorizeLayer`].
#[derive(Clone, Debug)]
pub struct Authorize<S> {
    inner: S,
    allow: Arc<Allow>,
    refusals: Arc<Refusals>,
}

impl<S, B, R> tower::Service<http::Request<B>> for Authorize<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    R: Default,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        futures::future::Either<S::Future, futures::future::Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let peer = req.extensions().get::<Peer>();
        match self
            .allow
            .refuses(req.uri().path(), peer.and_then(|p| p.names.as_deref()))
        {
            None => futures::future::Either::Left(self.inner.call(req)),
            Some(why) => {
                self.refusals.note(peer, &why);
                let status = tonic::Status::permission_denied(why);
                futures::future::Either::Right(futures::future::ready(Ok(status.into_http())))
            }
        }
    }
}

/// What a server knows of a connection's client: its address and, over TLS, the names its
/// certificate carries.
#[derive(Clone, Debug)]
pub struct Peer {
    /// The TCP connection.
    pub tcp: TcpConnectInfo,
    /// DNS and URI subject alternative names of the client's certificate (`None`: no TLS, or
    /// no certificate).
    pub names: Option<Arc<[String]>>,
}

/// The DNS and URI names a certificate carries (none if it does not parse).
fn certificate_names(der: &CertificateDer<'_>) -> Vec<String> {
    match webpki::EndEntityCert::try_from(der) {
        Ok(cert) => cert
            .valid_dns_names()
            .chain(cert.valid_uri_names())
            .map(str::to_string)
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// How long a client may take over its TLS handshake, or to send its first bytes without TLS.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How often, at most, a server looks whether its TLS files changed.
const RELOAD_CHECK: Duration = Duration::from_secs(1);

/// A server's TLS settings, reloaded when their files change.
struct ServerTls {
    files: TlsConfig,
    state: Mutex<Loaded>,
}

struct Loaded {
    stamp: Vec<Option<(SystemTime, u64)>>,
    checked: Instant,
    config: Arc<rustls::ServerConfig>,
}

impl ServerTls {
    /// What the next handshake uses: the files as they are, or as last usable.
    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        let mut st = crate::upstream::lock(&self.state);
        if st.checked.elapsed() >= RELOAD_CHECK {
            st.checked = Instant::now();
            let stamp = self.files.stamp();
            if stamp != st.stamp {
                st.stamp = stamp;
                match self.files.server() {
                    Ok(Some(config)) => {
                        st.config = config;
                        tracing::info!("TLS files changed: serving them from now on");
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!(
                        error = %e,
                        "TLS files changed but cannot be used; serving the ones read before"
                    ),
                }
            }
        }
        tokio_rustls::TlsAcceptor::from(st.config.clone())
    }
}

/// A connection a node accepted: plaintext, or TLS once its handshake is done.
pub enum Conn {
    /// Plaintext.
    Plain(TcpStream),
    /// TLS.
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Connected for Conn {
    type ConnectInfo = Peer;

    fn connect_info(&self) -> Peer {
        match self {
            Conn::Plain(s) => Peer {
                tcp: s.connect_info(),
                names: None,
            },
            Conn::Tls(s) => {
                let (tcp, tls) = s.get_ref();
                Peer {
                    tcp: tcp.connect_info(),
                    names: tls
                        .peer_certificates()
                        .and_then(|c| c.first())
                        .map(|c| certificate_names(c).into()),
                }
            }
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The connections of a bound listener as a gRPC server takes them, with Nagle off (batches
/// are small and latency-bound) and, with a certificate in `tls`, after a TLS handshake each
/// (done apart, so a slow client delays no other). Accepting stops when the stream is dropped.
pub fn incoming(
    listener: TcpListener,
    tls: &TlsConfig,
) -> Result<tokio_stream::wrappers::ReceiverStream<std::io::Result<Conn>>, TlsError> {
    let server = tls.server()?.map(|config| {
        Arc::new(ServerTls {
            files: tls.clone(),
            state: Mutex::new(Loaded {
                stamp: tls.stamp(),
                checked: Instant::now(),
                config,
            }),
        })
    });
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        let mut warned = None::<Instant>;
        loop {
            let (stream, peer) = tokio::select! {
                _ = tx.closed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    // Out of file descriptors, a connection reset before it was taken: the
                    // listener still works. Said once in a while, not per attempt.
                    Err(e) => {
                        if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                            warned = Some(Instant::now());
                            tracing::warn!(error = %e, "accepting a connection failed");
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = stream.set_nodelay(true);
            let Some(server) = &server else {
                // A connection that says nothing would hold its descriptor for ever (HTTP/2's
                // pings start only after the client's preface): enough of them, from anywhere,
                // and no relay or publisher could connect any more. A client speaks first.
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut first = [0u8; 1];
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, stream.peek(&mut first)).await {
                        Ok(Ok(n)) if n > 0 => {
                            let _ = tx.send(Ok(Conn::Plain(stream))).await;
                        }
                        Ok(_) => {}
                        Err(_) => {
                            tracing::debug!(%peer, "connection silent since it opened; closed")
                        }
                    }
                });
                continue;
            };
            let (acceptor, tx) = (server.acceptor(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => {
                        let _ = tx.send(Ok(Conn::Tls(Box::new(s)))).await;
                    }
                    // A refused certificate is worth an operator's eye; a probe that opened
                    // and closed a connection is not.
                    Ok(Err(e)) if e.to_string().contains("certificate") => {
                        tracing::info!(%peer, error = %e, "TLS handshake refused")
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    Ok(tokio_stream::wrappers::ReceiverStream::new(rx))
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
    fn names_match_patterns_where_a_star_is_any_run() {
        let cases = [
            ("orders.svc.example", "orders.svc.example", true),
            ("orders.svc.example", "ORDERS.svc.example", true),
            ("orders.svc.example", "orders.svc.example.evil", false),
            ("orders.svc.example", "xorders.svc.example", false),
            ("relay-*.eu.example", "relay-0.eu.example", true),
            ("relay-*.eu.example", "relay-.eu.example", true),
            ("relay-*.eu.example", "relay-0.us.example", false),
            ("relay-*.eu.example", "relay-0.eu.example.us", false),
            (
                "spiffe://prod/ns/*/sa/writer",
                "spiffe://prod/ns/orders/sa/writer",
                true,
            ),
            (
                "spiffe://prod/ns/*/sa/writer",
                "spiffe://prod/ns/orders/sa/reader",
                false,
            ),
            (
                "spiffe://prod/ns/orders/*",
                "spiffe://prod/ns/Orders/sa/w",
                false,
            ),
            ("*", "anything", true),
            ("*", "", true),
            ("a*b*c", "abc", true),
            ("a*b*c", "a-b-b-c", true),
            ("a*b*c", "acb", false),
            // The last part must not reuse what the middle ones took.
            ("*ab*ab", "ab", false),
            ("*ab*ab", "abab", true),
            ("", "", true),
            ("", "x", false),
        ];
        for (pattern, name, want) in cases {
            assert_eq!(name_matches(pattern, name), want, "{pattern} ~ {name}");
        }
    }

    #[test]
    fn each_api_is_refused_to_names_off_its_list() {
        let allow = Allow {
            publish: vec!["orders.svc.example".into()],
            admin: vec!["spiffe://example.test/*".into()],
            ..Default::default()
        };
        let writer = ["orders.svc.example".to_string()];
        let node = ["localhost".to_string()];
        let publish = "/dci.v1.Publisher/PublishStream";
        assert_eq!(allow.refuses(publish, Some(&writer)), None);
        let why = allow.refuses(publish, Some(&node)).unwrap();
        assert!(why.contains("dci.v1.Publisher/PublishStream"), "{why}");
        assert!(why.contains("its names: localhost"), "{why}");
        assert!(why.contains("tls.allow.publish"), "{why}");
        let why = allow.refuses(publish, None).unwrap();
        assert!(why.contains("its names: none"), "{why}");
        assert!(allow
            .refuses("/dci.v1.Admin/Status", Some(&writer))
            .is_some());
        // Empty lists, health and reflection: every client.
        assert_eq!(allow.refuses("/dci.v1.Subscribe/Subscribe", None), None);
        assert_eq!(allow.refuses("/grpc.health.v1.Health/Check", None), None);
        assert_eq!(
            allow.refuses(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                None
            ),
            None
        );
    }

    #[test]
    fn allow_lists_need_a_client_ca_and_certificates_give_their_names() {
        let mutual = TlsConfig {
            cert: Some(file("node.pem")),
            key: Some(file("node.key")),
            client_ca: Some(file("ca.pem")),
            ..Default::default()
        };
        let listed = Allow {
            cache: vec!["localhost".into()],
            ..Default::default()
        };
        let e = TlsConfig {
            client_ca: None,
            allow: listed.clone(),
            ..mutual.clone()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("tls.allow needs tls.client_ca"), "{e}");
        let e = TlsConfig {
            allow: Allow {
                admin: vec![" ".into()],
                ..Default::default()
            },
            ..mutual.clone()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("tls.allow.admin holds an empty name"), "{e}");
        TlsConfig {
            allow: listed,
            ..mutual
        }
        .validate()
        .unwrap();

        let pem = std::fs::read(file("writer.pem")).unwrap();
        let der = CertificateDer::pem_slice_iter(&pem)
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(
            certificate_names(&der),
            [
                "orders.svc.example",
                "spiffe://example.test/ns/orders/sa/writer"
            ]
        );
        assert!(certificate_names(&CertificateDer::from(vec![0u8; 10])).is_empty());
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
                &none,
                "operation was canceled: transport error: connection was not ready",
                "give --tls-cert",
            ),
            (
                "https://h:1",
                &with_cert,
                "received fatal alert: UnknownCA",
                "signed by its --tls-client-ca",
            ),
            (
                "https://h:1",
                &with_cert,
                "connection closed",
                "signed by its --tls-client-ca",
            ),
            (
                "https://h:1",
                &none,
                "invalid peer certificate: UnknownIssuer",
                "",
            ),
            (
                "http://h:1",
                &none,
                "h2 protocol error: http2 error: connection error detected: frame with invalid size",
                "its URL is https://",
            ),
            (
                "http://h:1",
                &none,
                "operation was canceled: connection closed",
                "its URL is https://",
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
