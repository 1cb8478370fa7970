//! Who may call what. Two credentials, both optional (a laptop cluster runs without them):
//! - the **cluster secret** (`cluster.secret`, env `RECSYS_CLUSTER_SECRET`) guards the internal
//!   service (`recsys.internal.v1.Internal`): a caller sends `x-recsys-auth: <unix seconds>.<hex
//!   HMAC-SHA256(secret, "internal" ‖ from_node ‖ to_node ‖ method ‖ unix seconds)>.<from_node>`,
//!   never the secret itself; a node accepts it within ±5 minutes of its own clock (checked in
//!   constant time), only for the method it was made for and only when addressed to this node, so
//!   a captured header works neither for another method (a Read's header as an Apply or Stream)
//!   nor on another node. Replies of the metadata protocol carry a MAC over their body.
//! - the **operator token** (`cluster.operator_token`, env `RECSYS_OPERATOR_TOKEN`) guards
//!   `recsys.v1.Ingest` and `recsys.v1.Admin`: `authorization: Bearer <token>`.
//!
//! `Recommender`, health and reflection stay open. The checks run in a tower wrapper around a
//! generated service (`Guard`), before the request body is read.
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{SystemTime, UNIX_EPOCH};

use hmac::{Mac, SimpleHmac};
use sha2::Sha256;
use tonic::body::Body;
use tonic::codegen::{http, Service};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::server::NamedService;
use tonic::Status;

use crate::config::Config;

pub const INTERNAL_HEADER: &str = "x-recsys-auth";
/// How far a caller's clock may be from ours (the window a captured header stays valid in).
pub const MAX_SKEW_SECS: i64 = 300;
pub const SECRET_ENV: &str = "RECSYS_CLUSTER_SECRET";
pub const TOKEN_ENV: &str = "RECSYS_OPERATOR_TOKEN";

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AuthError {
    #[error(
        "internal call without x-recsys-auth: this node requires the cluster secret (cluster.secret or \
         RECSYS_CLUSTER_SECRET, the same on every node)"
    )]
    MissingInternal,
    #[error("internal call with a malformed x-recsys-auth (expected <unix seconds>.<hex hmac>.<node id>)")]
    Malformed,
    #[error(
        "internal call from {node}: its x-recsys-auth is {skew} s away from this node's clock (±{MAX_SKEW_SECS} s \
         allowed; check the clocks)"
    )]
    Skew { node: String, skew: i64 },
    #[error("internal call from {node}: x-recsys-auth does not match: the caller has another cluster secret")]
    WrongSecret { node: String },
    #[error(
        "{method} needs the operator token: authorization: Bearer <token> (recsys … --token, or \
         RECSYS_OPERATOR_TOKEN)"
    )]
    MissingToken { method: String },
    #[error("{method}: the operator token does not match this cluster's (cluster.operator_token)")]
    WrongToken { method: String },
    #[error("{what} must be printable ASCII without spaces (it travels in a gRPC header)")]
    NotHeaderSafe { what: &'static str },
}

/// The env var when set and non-empty, else the config value; None when both are empty.
fn env_or(env: &str, configured: &str) -> Option<String> {
    let v = std::env::var(env).ok().filter(|s| !s.is_empty()).unwrap_or_else(|| configured.to_string());
    (!v.is_empty()).then_some(v)
}

pub fn cluster_secret(cfg: &Config) -> Option<String> {
    env_or(SECRET_ENV, &cfg.cluster.secret)
}

pub fn operator_token(cfg: &Config) -> Option<String> {
    env_or(TOKEN_ENV, &cfg.cluster.operator_token)
}

pub fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.is_ascii() {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok()).collect()
}

/// Byte equality whose time does not depend on where the inputs differ.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The cluster secret as a MAC key.
#[derive(Clone)]
pub struct ClusterKey(Arc<[u8]>);

/// Never prints the secret.
impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClusterKey(set)")
    }
}

impl ClusterKey {
    pub fn new(secret: &str) -> Self {
        Self(Arc::from(secret.as_bytes()))
    }

    fn keyed(&self) -> SimpleHmac<Sha256> {
        <SimpleHmac<Sha256> as Mac>::new_from_slice(&self.0).expect("hmac takes any key length")
    }

    /// Fields are separated by a 0 byte (no field holds one), so no two calls share an input.
    fn mac(&self, from_node: &str, to_node: &str, method: &str, ts: i64) -> SimpleHmac<Sha256> {
        let mut m = self.keyed();
        m.update(b"internal\0");
        for f in [from_node, to_node, method] {
            m.update(f.as_bytes());
            m.update(b"\0");
        }
        m.update(ts.to_string().as_bytes());
        m
    }

    /// The `x-recsys-auth` value `from_node` sends to `to_node` for `method` (the gRPC path,
    /// `/recsys.internal.v1.Internal/Read`) at `ts`.
    pub fn header(&self, from_node: &str, to_node: &str, method: &str, ts: i64) -> String {
        format!("{ts}.{}.{from_node}", hex(&self.mac(from_node, to_node, method, ts).finalize().into_bytes()))
    }

    /// A MAC over a reply body sent to `to_node` (metadata protocol replies).
    pub fn sign_body(&self, to_node: &str, body: &[u8]) -> Vec<u8> {
        let mut m = self.keyed();
        m.update(b"reply\0");
        m.update(to_node.as_bytes());
        m.update(b"\0");
        m.update(body);
        m.finalize().into_bytes().to_vec()
    }

    /// The signature of one gossiped value (a node's key/value under its id and generation):
    /// 16 bytes of HMAC, hex. A participant without the secret cannot publish a value peers
    /// believe, nor move a signed value to another node id or generation.
    pub fn sign_gossip(&self, node: &str, generation: u64, key: &str, value: &str) -> String {
        let mut m = self.keyed();
        m.update(b"gossip\0");
        for f in [node, &generation.to_string(), key, value] {
            m.update(f.as_bytes());
            m.update(b"\0");
        }
        hex(&m.finalize().into_bytes()[..16])
    }

    pub fn verify_body(&self, to_node: &str, body: &[u8], tag: &[u8]) -> bool {
        ct_eq(&self.sign_body(to_node, body), tag)
    }

    /// Checks a received `x-recsys-auth` for a call of `method` to this node (`me`) at our
    /// time `now`; returns the caller's node id.
    pub fn verify(&self, value: Option<&str>, me: &str, method: &str, now: i64) -> Result<String, AuthError> {
        let v = value.ok_or(AuthError::MissingInternal)?;
        let mut it = v.splitn(3, '.');
        let (Some(ts), Some(tag), Some(node)) = (it.next(), it.next(), it.next()) else {
            return Err(AuthError::Malformed);
        };
        let ts: i64 = ts.parse().map_err(|_| AuthError::Malformed)?;
        let tag = unhex(tag).ok_or(AuthError::Malformed)?;
        if node.is_empty() {
            return Err(AuthError::Malformed);
        }
        let skew = ts.saturating_sub(now);
        if skew.unsigned_abs() > MAX_SKEW_SECS as u64 {
            return Err(AuthError::Skew { node: node.to_string(), skew });
        }
        // verify_slice compares in constant time.
        self.mac(node, me, method, ts)
            .verify_slice(&tag)
            .map_err(|_| AuthError::WrongSecret { node: node.to_string() })?;
        Ok(node.to_string())
    }
}

/// Client side of internal calls: signs each call with the cluster secret (no-op without one).
/// One pointer wide: it sits in every peer client.
#[derive(Clone)]
pub struct InternalAuth(Option<Arc<(ClusterKey, String, String)>>);

impl InternalAuth {
    pub fn new(key: Option<ClusterKey>, from_node: &str) -> Self {
        Self(key.map(|k| Arc::new((k, from_node.to_string(), String::new()))))
    }

    pub fn none() -> Self {
        Self(None)
    }

    /// The same credentials for calls to `to_node` (the receiver is covered by the MAC).
    pub fn to(&self, to_node: &str) -> Self {
        Self(self.0.as_ref().map(|a| Arc::new((a.0.clone(), a.1.clone(), to_node.to_string()))))
    }
}

impl tonic::service::Interceptor for InternalAuth {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(a) = &self.0 {
            let (k, from, to) = &**a;
            // The generated client names the method in the request's extensions.
            let method = r
                .extensions()
                .get::<tonic::GrpcMethod>()
                .map(|m| format!("/{}/{}", m.service(), m.method()))
                .ok_or_else(|| Status::internal("internal call without a method name"))?;
            let v: AsciiMetadataValue = k
                .header(from, to, &method, unix_now())
                .parse()
                .map_err(|_| Status::internal("node id is not header-safe ASCII"))?;
            r.metadata_mut().insert(INTERNAL_HEADER, v);
        }
        Ok(r)
    }
}

/// Client side of Ingest and Admin calls: `authorization: Bearer <token>` when a token is given.
#[derive(Clone, Default)]
pub struct OperatorToken(Option<AsciiMetadataValue>);

/// Never prints the token.
impl std::fmt::Debug for OperatorToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "OperatorToken(set)" } else { "OperatorToken(none)" })
    }
}

impl OperatorToken {
    pub fn new(token: Option<&str>) -> Result<Self, AuthError> {
        match token.filter(|t| !t.is_empty()) {
            None => Ok(Self(None)),
            Some(t) if t.chars().all(|c| c.is_ascii_graphic()) => MetadataValue::try_from(format!("Bearer {t}"))
                .map(|v| Self(Some(v)))
                .map_err(|_| AuthError::NotHeaderSafe { what: "the operator token" }),
            Some(_) => Err(AuthError::NotHeaderSafe { what: "the operator token" }),
        }
    }

    /// From `RECSYS_OPERATOR_TOKEN` (none when unset or not header-safe).
    pub fn from_env() -> Self {
        Self::new(std::env::var(TOKEN_ENV).ok().as_deref()).unwrap_or_default()
    }
}

impl tonic::service::Interceptor for OperatorToken {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            r.metadata_mut().insert("authorization", v.clone());
        }
        Ok(r)
    }
}

/// What a guarded service requires.
pub enum Check {
    /// The cluster secret's MAC on calls to this node `me` (None: no secret configured, every
    /// call accepted).
    Internal(Option<ClusterKey>, String),
    /// The operator token (None: no token configured, every call accepted).
    Operator(Option<Vec<u8>>),
}

impl Check {
    /// `path` is the gRPC path (`/recsys.v1.Admin/ClusterStatus`).
    pub fn verify(&self, headers: &http::HeaderMap, path: &str) -> Result<(), AuthError> {
        match self {
            Check::Internal(None, _) | Check::Operator(None) => Ok(()),
            Check::Internal(Some(k), me) => {
                let v = headers.get(INTERNAL_HEADER).map(|v| v.to_str().unwrap_or(""));
                k.verify(v, me, path, unix_now()).map(|_| ())
            }
            Check::Operator(Some(token)) => {
                let method = path.trim_start_matches('/').trim_start_matches("recsys.v1.").to_string();
                let got = headers
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .ok_or_else(|| AuthError::MissingToken { method: method.clone() })?;
                if ct_eq(got.trim().as_bytes(), token) {
                    Ok(())
                } else {
                    Err(AuthError::WrongToken { method })
                }
            }
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Check::Internal(..) => "internal",
            Check::Operator(_) => "operator",
        }
    }
}

/// Wraps one generated gRPC service: a call that fails `check` is answered UNAUTHENTICATED
/// without reaching the service (its body is never read).
#[derive(Clone)]
pub struct Guard<S> {
    inner: S,
    check: Arc<Check>,
}

impl<S> Guard<S> {
    pub fn new(inner: S, check: Check) -> Self {
        Self { inner, check: Arc::new(check) }
    }
}

impl<S: NamedService> NamedService for Guard<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, B> Service<http::Request<B>> for Guard<S>
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
        if let Err(e) = self.check.verify(req.headers(), req.uri().path()) {
            metrics::counter!("recsys_auth_failures_total", "credential" => self.check.label()).increment(1);
            tracing::debug!(path = req.uri().path(), error = %e, "refused: unauthenticated");
            let resp = Status::unauthenticated(e.to_string()).into_http();
            return Box::pin(async move { Ok(resp) });
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_mac_round_trip_and_refusals() {
        let k = ClusterKey::new("s3cret");
        let now = 1_700_000_000;
        let read = "/recsys.internal.v1.Internal/Read";
        let h = k.header("n1", "n2", read, now);
        assert!(!h.contains("s3cret"));
        assert_eq!(k.verify(Some(&h), "n2", read, now + 10).unwrap(), "n1");
        assert_eq!(k.verify(None, "n2", read, now), Err(AuthError::MissingInternal));
        assert_eq!(k.verify(Some("garbage"), "n2", read, now), Err(AuthError::Malformed));
        let far = format!("{}.00.n1", i64::MIN);
        assert!(matches!(k.verify(Some(&far), "n2", read, now), Err(AuthError::Skew { .. })));
        assert!(matches!(k.verify(Some(&h), "n2", read, now + 301), Err(AuthError::Skew { .. })));
        assert!(matches!(k.verify(Some(&h), "n2", read, now - 301), Err(AuthError::Skew { .. })));
        let other = ClusterKey::new("other").header("n1", "n2", read, now);
        assert!(matches!(k.verify(Some(&other), "n2", read, now), Err(AuthError::WrongSecret { .. })));
        // The node id is covered by the MAC: a header replayed under another name fails.
        let forged = h.replace(".n1", ".n2");
        assert!(matches!(k.verify(Some(&forged), "n2", read, now), Err(AuthError::WrongSecret { .. })));
        // So are the method and the receiver: a captured Read header is no Apply or Stream,
        // and it is refused by any other node.
        for m in ["/recsys.internal.v1.Internal/Apply", "/recsys.internal.v1.Internal/Stream"] {
            assert!(matches!(k.verify(Some(&h), "n2", m, now), Err(AuthError::WrongSecret { .. })));
        }
        assert!(matches!(k.verify(Some(&h), "n3", read, now), Err(AuthError::WrongSecret { .. })));
        let tag = k.sign_body("n1", b"body");
        assert!(k.verify_body("n1", b"body", &tag));
        assert!(!k.verify_body("n1", b"bodY", &tag) && !k.verify_body("n3", b"body", &tag));
    }

    #[test]
    fn operator_token_checks() {
        let c = Check::Operator(Some(b"tok".to_vec()));
        let mut h = http::HeaderMap::new();
        let e = c.verify(&h, "/recsys.v1.Admin/ClusterStatus").unwrap_err();
        assert!(e.to_string().starts_with("Admin/ClusterStatus needs the operator token"), "{e}");
        h.insert("authorization", "Bearer nope".parse().unwrap());
        assert!(matches!(c.verify(&h, "/recsys.v1.Ingest/LogEvents"), Err(AuthError::WrongToken { .. })));
        h.insert("authorization", "Bearer tok".parse().unwrap());
        assert!(c.verify(&h, "/recsys.v1.Ingest/LogEvents").is_ok());
        assert!(Check::Operator(None).verify(&http::HeaderMap::new(), "/x").is_ok());
        assert!(OperatorToken::new(Some("has space")).is_err());
        assert!(ct_eq(b"abc", b"abc") && !ct_eq(b"abc", b"abd") && !ct_eq(b"abc", b"ab"));
    }
}
