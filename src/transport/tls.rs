//! TLS on the gRPC port (rustls through tonic, `tls-ring`), for clients and peers alike.
//!
//! - **Server**: with `[tls] cert, key, ca` the one gRPC port serves TLS only (a plaintext
//!   client's handshake fails). With `mutual = true` the handshake asks for a client certificate
//!   but does not require one (Recommend clients without a certificate still work); a
//!   certificate that is presented must verify against `ca`, else the handshake fails. Every
//!   internal-API call then needs one ([`RequireClientCert`]): a caller without it is answered
//!   UNAUTHENTICATED before the request body is read. The cluster secret's MAC (`auth`) stays on
//!   top: the certificate says "signed by the cluster's CA", the MAC which node calls.
//! - **Dialling**: one process dials with one [`ClientTls`] (a node: its `ca`, and with `mutual`
//!   its own certificate; a CLI: `--tls-ca`, `--tls-cert`, `--tls-key`), installed once per
//!   process ([`install`]); [`endpoint`] turns a `host:port` into an https endpoint with it, or
//!   plain http without. The server's certificate must carry `server_name` when one is set,
//!   else the host of the address dialled (a peer's advertise address: an IP SAN or DNS name).
//! - **Start**: every file is read and parsed before anything is served, and the node's own
//!   certificate must verify against `ca` for the name its peers will check (and, with
//!   `mutual`, as a client certificate): a missing or bad file refuses start naming the key.
use std::convert::Infallible;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use tonic::body::Body;
use tonic::codegen::{http, Service};
use tonic::server::NamedService;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
use tonic::Status;

use crate::config::TlsConfig;

/// A TLS handshake that has not finished by then is dropped (server and client side).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{key}: cannot read {}: {source}", path.display())]
    Read { key: &'static str, path: PathBuf, source: std::io::Error },
    #[error("{key}: {}: {message}", path.display())]
    Bad { key: &'static str, path: PathBuf, message: String },
    #[error("{0}")]
    Other(String),
}

/// The names the settings go by where they were given (config keys or CLI flags), for errors.
#[derive(Clone, Copy)]
pub struct Keys {
    pub cert: &'static str,
    pub key: &'static str,
    pub ca: &'static str,
}

pub const CONFIG_KEYS: Keys = Keys { cert: "tls.cert", key: "tls.key", ca: "tls.ca" };
pub const FLAG_KEYS: Keys = Keys { cert: "--tls-cert", key: "--tls-key", ca: "--tls-ca" };

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { key, path: path.to_path_buf(), source })
}

fn certs(key: &'static str, path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |message: String| TlsError::Bad { key, path: path.to_path_buf(), message };
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(format!("not a PEM certificate file ({e})")))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into()));
    }
    Ok(certs)
}

fn private_key(key: &'static str, path: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| TlsError::Bad {
        key,
        path: path.to_path_buf(),
        message: format!("holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {e}"),
    })
}

fn roots(keys: Keys, path: &Path, ca: &[CertificateDer<'static>]) -> Result<Arc<rustls::RootCertStore>, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(ca.iter().cloned());
    if added == 0 {
        return Err(TlsError::Bad {
            key: keys.ca,
            path: path.to_path_buf(),
            message: "no usable CA certificate".into(),
        });
    }
    Ok(Arc::new(roots))
}

/// The provider the server and client configs are built with (`tls-ring`: the crate-feature
/// default, which tonic's builders pick too); used here only to check certificates at start.
#[allow(deprecated)] // rustls 0.23.48 marks it for lacking post-quantum key exchange; still tonic's.
fn ring_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// How this process dials gRPC servers over TLS: the CA their certificates must chain to,
/// the identity it presents (when it has one) and the name it checks (None: the host dialled).
#[derive(Clone)]
pub struct ClientTls {
    ca: Certificate,
    identity: Option<Identity>,
    server_name: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("identity", &self.identity.is_some())
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Reads and checks the PEM files (`cert` and `key` together or neither).
    pub fn from_files(
        keys: Keys,
        ca: &Path,
        cert: Option<&Path>,
        key: Option<&Path>,
        server_name: Option<String>,
    ) -> Result<Self, TlsError> {
        let ca_pem = read(keys.ca, ca)?;
        roots(keys, ca, &certs(keys.ca, ca, &ca_pem)?)?;
        let identity = match (cert, key) {
            (None, None) => None,
            (Some(c), Some(k)) => {
                let (c_pem, k_pem) = (read(keys.cert, c)?, read(keys.key, k)?);
                certs(keys.cert, c, &c_pem)?;
                private_key(keys.key, k, &k_pem)?;
                Some(Identity::from_pem(c_pem, k_pem))
            }
            (Some(_), None) => return Err(TlsError::Other(format!("{} needs {}", keys.cert, keys.key))),
            (None, Some(_)) => return Err(TlsError::Other(format!("{} needs {}", keys.key, keys.cert))),
        };
        if let Some(n) = &server_name {
            ServerName::try_from(n.as_str())
                .map_err(|_| TlsError::Other(format!("server name `{n}` is neither a DNS name nor an IP address")))?;
        }
        Ok(Self { ca: Certificate::from_pem(ca_pem), identity, server_name: server_name.filter(|n| !n.is_empty()) })
    }

    pub fn has_identity(&self) -> bool {
        self.identity.is_some()
    }

    fn config(&self) -> ClientTlsConfig {
        let mut c = ClientTlsConfig::new().ca_certificate(self.ca.clone()).timeout(HANDSHAKE_TIMEOUT);
        if let Some(id) = &self.identity {
            c = c.identity(id.clone());
        }
        if let Some(n) = &self.server_name {
            c = c.domain_name(n.clone());
        }
        c
    }
}

/// The TLS of this process's outgoing gRPC calls (a node's to its peers, a CLI's to its node).
static OUTBOUND: OnceLock<ClientTls> = OnceLock::new();

/// Sets this process's outgoing TLS, once: a second node in one process (the in-process test
/// harness) cannot dial with another identity, so that is refused.
pub fn install(tls: ClientTls) -> Result<(), TlsError> {
    OUTBOUND.set(tls).map_err(|_| {
        TlsError::Other("TLS for outgoing calls is set once per process: run one TLS node per process".into())
    })
}

/// This process's outgoing TLS, when installed.
pub fn outbound() -> Option<&'static ClientTls> {
    OUTBOUND.get()
}

/// An endpoint for `addr` (`host:port`, or a `http://` / `https://` URL) dialled with this
/// process's TLS: https when installed, plain http otherwise.
pub fn endpoint(addr: &str) -> Result<Endpoint, String> {
    endpoint_with(addr, outbound())
}

/// [`endpoint`] with explicit TLS settings (None: plaintext).
pub fn endpoint_with(addr: &str, tls: Option<&ClientTls>) -> Result<Endpoint, String> {
    let hostport = addr.strip_prefix("https://").or_else(|| addr.strip_prefix("http://")).unwrap_or(addr);
    match tls {
        None if addr.starts_with("https://") => Err(format!("{addr}: an https address needs a CA (--tls-ca)")),
        None => Endpoint::from_shared(format!("http://{hostport}")).map_err(|e| format!("address `{addr}`: {e}")),
        Some(t) => Endpoint::from_shared(format!("https://{hostport}"))
            .map_err(|e| format!("address `{addr}`: {e}"))?
            .tls_config(t.config())
            .map_err(|e| format!("TLS for {addr}: {e}")),
    }
}

/// A node's TLS: what its port serves and how it dials its peers.
pub struct NodeTls {
    server: ServerTlsConfig,
    pub mutual: bool,
    pub outbound: ClientTls,
}

impl NodeTls {
    /// Reads and checks `[tls]` (None when TLS is off). `host` is the host peers dial this node
    /// at (its advertise address): its certificate must verify for it (or for `server_name`).
    pub fn load(cfg: &TlsConfig, host: &str) -> Result<Option<Self>, TlsError> {
        if !cfg.enabled() {
            return Ok(None);
        }
        let k = CONFIG_KEYS;
        let missing =
            |key: &'static str| TlsError::Other(format!("{key}: missing (TLS needs tls.cert, tls.key, tls.ca)"));
        let (cert_p, key_p, ca_p) = (
            cfg.cert.as_deref().ok_or_else(|| missing(k.cert))?,
            cfg.key.as_deref().ok_or_else(|| missing(k.key))?,
            cfg.ca.as_deref().ok_or_else(|| missing(k.ca))?,
        );
        let (cert_pem, key_pem, ca_pem) = (read(k.cert, cert_p)?, read(k.key, key_p)?, read(k.ca, ca_p)?);
        let chain = certs(k.cert, cert_p, &cert_pem)?;
        let key = private_key(k.key, key_p, &key_pem)?;
        let ca = certs(k.ca, ca_p, &ca_pem)?;
        let roots = roots(k, ca_p, &ca)?;
        let provider = ring_provider();

        // The key must be the certificate's: rustls checks when it builds the server config.
        rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .and_then(|b| b.with_no_client_auth().with_single_cert(chain.clone(), key))
            .map_err(|e| {
                TlsError::Other(format!("tls.cert ({}) and tls.key ({}): {e}", cert_p.display(), key_p.display()))
            })?;

        // Peers verify this node's certificate against the CA for the name they dial: check it
        // here, where the error can name the files, rather than as failed handshakes later.
        let name = if cfg.server_name.is_empty() { host } else { cfg.server_name.as_str() };
        let server_name = ServerName::try_from(name.to_string()).map_err(|_| {
            TlsError::Other(format!("TLS server name `{name}` is neither a DNS name nor an IP address"))
        })?;
        let not_for = |what: &str, e: rustls::Error| TlsError::Bad {
            key: k.cert,
            path: cert_p.to_path_buf(),
            message: format!("does not verify {what} against tls.ca ({}): {e}", ca_p.display()),
        };
        let (leaf, rest) = chain.split_first().ok_or_else(|| missing(k.cert))?;
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Other(format!("tls.ca ({}): {e}", ca_p.display())))?;
        use rustls::client::danger::ServerCertVerifier;
        verifier
            .verify_server_cert(leaf, rest, &server_name, &[], UnixTime::now())
            .map_err(|e| not_for(&format!("as a server certificate for `{name}`"), e))?;
        if cfg.mutual {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
                .build()
                .map_err(|e| TlsError::Other(format!("tls.ca ({}): {e}", ca_p.display())))?;
            verifier
                .verify_client_cert(leaf, rest, UnixTime::now())
                .map_err(|e| not_for("as a client certificate (tls.mutual: it needs clientAuth use too)", e))?;
        }

        let ca = Certificate::from_pem(ca_pem);
        let identity = Identity::from_pem(cert_pem, key_pem);
        let mut server = ServerTlsConfig::new().identity(identity.clone()).timeout(HANDSHAKE_TIMEOUT);
        if cfg.mutual {
            server = server.client_ca_root(ca.clone()).client_auth_optional(true);
        }
        let server_name = (!cfg.server_name.is_empty()).then(|| cfg.server_name.clone());
        let outbound = ClientTls { ca, identity: cfg.mutual.then_some(identity), server_name };
        Ok(Some(Self { server, mutual: cfg.mutual, outbound }))
    }
}

/// The gRPC server builder: serving TLS only when `tls` is set.
pub fn server_builder(tls: Option<&NodeTls>) -> Result<tonic::transport::Server, TlsError> {
    let b = tonic::transport::Server::builder();
    match tls {
        None => Ok(b),
        Some(t) => b.tls_config(t.server.clone()).map_err(|e| TlsError::Other(format!("TLS server: {e}"))),
    }
}

/// Whether the connection a request came on presented a client certificate (one that the
/// handshake verified against the CA: an unverifiable one fails the handshake).
pub fn has_client_cert<B>(req: &http::Request<B>) -> bool {
    req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|i| i.peer_certs()).is_some_and(|c| !c.is_empty())
}

/// With mutual TLS, refuses a call to the wrapped service (the internal API) from a connection
/// without a verified client certificate: UNAUTHENTICATED, before the body is read. Without
/// mutual TLS it passes every call through.
#[derive(Clone)]
pub struct RequireClientCert<S> {
    inner: S,
    required: bool,
}

impl<S> RequireClientCert<S> {
    pub fn new(inner: S, required: bool) -> Self {
        Self { inner, required }
    }
}

impl<S: NamedService> NamedService for RequireClientCert<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for RequireClientCert<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if self.required && !has_client_cert(&req) {
            metrics::counter!("recsys_auth_failures_total", "credential" => "client_cert").increment(1);
            tracing::debug!(path = req.uri().path(), "refused: internal call without a client certificate");
            let resp = Status::unauthenticated(format!(
                "{}: internal calls need a client certificate signed by the cluster CA (tls.mutual is on; the \
                 connection presented none)",
                req.uri().path()
            ))
            .into_http();
            return Box::pin(async move { Ok(resp) });
        }
        Box::pin(self.inner.call(req))
    }
}

/// The host peers dial this node at: that of `node.advertise_addr`, else of `node.listen`.
fn advertise_host(cfg: &crate::config::Config) -> String {
    let addr = cfg.node.advertise_addr.as_deref().unwrap_or(&cfg.node.listen);
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']').to_string()
}

/// A node's `[tls]`, read and checked, its outgoing side installed for this process (None: TLS
/// off). Reads files: call it off the async workers.
pub fn for_node(cfg: &crate::config::Config) -> Result<Option<NodeTls>, TlsError> {
    let Some(t) = NodeTls::load(&cfg.tls, &advertise_host(cfg))? else { return Ok(None) };
    install(t.outbound.clone())?;
    tracing::info!(
        mutual = t.mutual,
        server_name = %if cfg.tls.server_name.is_empty() { "the peer's advertise host" } else { &cfg.tls.server_name },
        "TLS on: the gRPC port serves TLS only; peers are dialled over https"
    );
    Ok(Some(t))
}
