//! Who may call what. Two credentials, both optional (a laptop cluster runs without them):
//! - the **cluster secret** (`cluster.secret`, env `RECSYS_CLUSTER_SECRET`) guards the internal
//!   service (`recsys.internal.v1.Internal`): a caller sends `x-recsys-auth: <unix seconds>.<hex
//!   SHA-256 of the request body>.<hex HMAC-SHA256(secret, "internal" ‖ from_node ‖ to_node ‖ method
//!   ‖ unix seconds ‖ that digest)>.<from_node>`, never the secret itself; a node accepts it within ±5 minutes of
//!   its own clock (checked in constant time), only for the method and body it was made for and
//!   only when addressed to this node, so a captured header works neither for another method (a
//!   Read's header as an Apply or Stream), nor with another body (a captured Apply's header
//!   carrying other ops), nor on another node. Replies of the metadata protocol carry a MAC over
//!   their body and the request they answer (an old reply cannot be replayed as a new one).
//! - the **operator token** (`cluster.operator_token`, env `RECSYS_OPERATOR_TOKEN`) guards
//!   `recsys.v1.Ingest` and `recsys.v1.Admin`: `authorization: Bearer <token>`.
//!
//! `Recommender`, health and reflection stay open. The checks run in a tower wrapper around a
//! generated service (`Guard`): the header's form, time and MAC before the body is read (a
//! caller without the secret makes the node read nothing), then the (size-bounded) body against
//! the digest the MAC covers.
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hmac::{Mac, SimpleHmac};
use http_body_util::{BodyExt, Full, Limited};
use sha2::{Digest, Sha256};
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
/// The largest internal request body a node reads (the transport's message cap, plus framing).
pub const MAX_INTERNAL_BODY: usize = 64 * 1024 * 1024 + 5;

/// SHA-256 of a request body as it travels (the gRPC frames).
pub type BodyDigest = [u8; 32];

pub fn body_digest(body: &[u8]) -> BodyDigest {
    Sha256::digest(body).into()
}

/// The digest of a unary call's body carrying `msg` uncompressed (one gRPC frame: flag byte,
/// big-endian length, the message): what a hand-made client signs.
pub fn unary_body_digest(msg: &impl prost::Message) -> BodyDigest {
    let bytes = msg.encode_to_vec();
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update((bytes.len() as u32).to_be_bytes());
    h.update(&bytes);
    h.finalize().into()
}

/// Who made an authenticated internal call, and the digest of its body: put in the request's
/// extensions by `Guard` (absent when no secret is configured).
#[derive(Debug, Clone)]
pub struct Caller {
    pub node: String,
    pub body: BodyDigest,
}

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
    #[error("internal call from {node}: body larger than {MAX_INTERNAL_BODY} bytes or cut off: {reason}")]
    Body { node: String, reason: String },
    #[error("internal call from {node}: the body is not the one its x-recsys-auth was signed for")]
    BodyMismatch { node: String },
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
    crate::clock::unix_secs()
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
    fn mac(&self, from_node: &str, to_node: &str, method: &str, ts: i64, body: &BodyDigest) -> SimpleHmac<Sha256> {
        let mut m = self.keyed();
        m.update(b"internal\0");
        for f in [from_node, to_node, method, &ts.to_string()] {
            m.update(f.as_bytes());
            m.update(b"\0");
        }
        m.update(body);
        m
    }

    /// The `x-recsys-auth` value `from_node` sends to `to_node` for `method` (the gRPC path,
    /// `/recsys.internal.v1.Internal/Read`) at `ts`, with a request body of digest `body`.
    pub fn header(&self, from_node: &str, to_node: &str, method: &str, ts: i64, body: &BodyDigest) -> String {
        let tag = self.mac(from_node, to_node, method, ts, body).finalize().into_bytes();
        format!("{ts}.{}.{}.{from_node}", hex(body), hex(&tag))
    }

    /// A MAC over a reply body that `from_node` sends to `to_node` in answer to the request of
    /// digest `request` (metadata protocol replies): one voter's reply cannot stand in for
    /// another's, nor answer another request.
    pub fn sign_body(&self, to_node: &str, from_node: &str, request: &BodyDigest, body: &[u8]) -> Vec<u8> {
        let mut m = self.keyed();
        m.update(b"reply\0");
        for f in [to_node, from_node] {
            m.update(f.as_bytes());
            m.update(b"\0");
        }
        m.update(request);
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

    pub fn verify_body(&self, to_node: &str, from_node: &str, request: &BodyDigest, body: &[u8], tag: &[u8]) -> bool {
        ct_eq(&self.sign_body(to_node, from_node, request, body), tag)
    }

    /// Checks a received `x-recsys-auth` for a call of `method` to this node (`me`) at our
    /// time `now` with a body of digest `body`; returns the caller's node id.
    pub fn verify(
        &self,
        value: Option<&str>,
        me: &str,
        method: &str,
        now: i64,
        body: &BodyDigest,
    ) -> Result<String, AuthError> {
        let h = SignedHeader::parse(value, now)?;
        let node = h.verify(self, me, method)?;
        h.check_body(body)?;
        Ok(node)
    }
}

/// A received `x-recsys-auth`, well formed and within the clock window: its MAC is checked
/// before the body is read, the body against `digest` after.
#[derive(Debug)]
pub struct SignedHeader {
    ts: i64,
    digest: BodyDigest,
    tag: Vec<u8>,
    pub node: String,
}

impl SignedHeader {
    pub fn parse(value: Option<&str>, now: i64) -> Result<Self, AuthError> {
        let v = value.ok_or(AuthError::MissingInternal)?;
        let mut it = v.splitn(4, '.');
        let (Some(ts), Some(digest), Some(tag), Some(node)) = (it.next(), it.next(), it.next(), it.next()) else {
            return Err(AuthError::Malformed);
        };
        let ts: i64 = ts.parse().map_err(|_| AuthError::Malformed)?;
        let digest: BodyDigest = unhex(digest).and_then(|d| d.try_into().ok()).ok_or(AuthError::Malformed)?;
        let tag = unhex(tag).filter(|t| t.len() == 32).ok_or(AuthError::Malformed)?;
        if node.is_empty() {
            return Err(AuthError::Malformed);
        }
        let skew = ts.saturating_sub(now);
        if skew.unsigned_abs() > MAX_SKEW_SECS as u64 {
            return Err(AuthError::Skew { node: node.to_string(), skew });
        }
        Ok(Self { ts, digest, tag, node: node.to_string() })
    }

    /// The MAC check (constant time, by `verify_slice`) over the header alone, the body digest
    /// it names included; returns the caller's node id.
    pub fn verify(&self, key: &ClusterKey, me: &str, method: &str) -> Result<String, AuthError> {
        key.mac(&self.node, me, method, self.ts, &self.digest)
            .verify_slice(&self.tag)
            .map_err(|_| AuthError::WrongSecret { node: self.node.clone() })?;
        Ok(self.node.clone())
    }

    /// The body received is the one the MAC covers.
    pub fn check_body(&self, body: &BodyDigest) -> Result<(), AuthError> {
        if ct_eq(&self.digest, body) {
            Ok(())
        } else {
            Err(AuthError::BodyMismatch { node: self.node.clone() })
        }
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

pub type StdError = Box<dyn std::error::Error + Send + Sync>;

impl InternalAuth {
    /// `inner` (a channel to the receiver) with every call signed.
    pub fn sign<S>(self, inner: S) -> Signed<S> {
        Signed { inner, auth: self }
    }
}

/// A channel whose calls carry `x-recsys-auth`. The body is read before the call is sent (the
/// MAC covers its digest): internal calls are unary, their bodies already in memory.
#[derive(Clone)]
pub struct Signed<S> {
    inner: S,
    auth: InternalAuth,
}

impl<S> Service<http::Request<Body>> for Signed<S>
where
    S: Service<http::Request<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<StdError>,
{
    type Response = S::Response;
    type Error = StdError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, StdError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), StdError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The service made ready is the one called; a clone takes its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let Some(a) = self.auth.0.clone() else {
            let call = inner.call(req);
            return Box::pin(async move { call.await.map_err(Into::into) });
        };
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            let bytes = Limited::new(body, MAX_INTERNAL_BODY)
                .collect()
                .await
                .map_err(|e| -> StdError { format!("internal request body: {e}").into() })?
                .to_bytes();
            let (k, from, to) = &*a;
            let h = k.header(from, to, parts.uri.path(), unix_now(), &body_digest(&bytes));
            let v = http::HeaderValue::from_str(&h)
                .map_err(|_| -> StdError { "node id is not header-safe ASCII".into() })?;
            parts.headers.insert(INTERNAL_HEADER, v);
            inner.call(http::Request::from_parts(parts, Body::new(Full::new(bytes)))).await.map_err(Into::into)
        })
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
    /// What can be checked from the headers alone; `path` is the gRPC path
    /// (`/recsys.v1.Admin/ClusterStatus`). An internal call's MAC is checked once its body is
    /// read (the returned header).
    pub fn verify(&self, headers: &http::HeaderMap, path: &str) -> Result<Option<SignedHeader>, AuthError> {
        match self {
            Check::Internal(None, _) | Check::Operator(None) => Ok(None),
            Check::Internal(Some(_), _) => {
                let v = headers.get(INTERNAL_HEADER).map(|v| v.to_str().unwrap_or(""));
                SignedHeader::parse(v, unix_now()).map(Some)
            }
            Check::Operator(Some(token)) => {
                let method = path.trim_start_matches('/').trim_start_matches("recsys.v1.").to_string();
                let got = headers
                    .get(http::header::AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .ok_or_else(|| AuthError::MissingToken { method: method.clone() })?;
                if ct_eq(got.trim().as_bytes(), token) {
                    Ok(None)
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

impl<S> Service<http::Request<Body>> for Guard<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let check = self.check.clone();
        let refuse = move |e: AuthError| {
            metrics::counter!("recsys_auth_failures_total", "credential" => check.label()).increment(1);
            tracing::debug!(error = %e, "refused: unauthenticated");
            Ok(Status::unauthenticated(e.to_string()).into_http())
        };
        let header = match self.check.verify(req.headers(), req.uri().path()) {
            Err(e) => return Box::pin(async move { refuse(e) }),
            Ok(h) => h,
        };
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let (Some(header), Check::Internal(Some(key), me)) = (header, &*self.check) else {
            return Box::pin(inner.call(req));
        };
        // The MAC first: a caller without the secret makes this node read no body at all.
        let node = match header.verify(key, me, req.uri().path()) {
            Ok(node) => node,
            Err(e) => return Box::pin(async move { refuse(e) }),
        };
        Box::pin(async move {
            let (mut parts, body) = req.into_parts();
            let bytes = match Limited::new(body, MAX_INTERNAL_BODY).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return refuse(AuthError::Body { node, reason: e.to_string() }),
            };
            let digest = body_digest(&bytes);
            if let Err(e) = header.check_body(&digest) {
                return refuse(e);
            }
            parts.extensions.insert(Caller { node, body: digest });
            inner.call(http::Request::from_parts(parts, Body::new(Full::new(bytes)))).await
        })
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
        let b = body_digest(b"a read's body");
        let h = k.header("n1", "n2", read, now, &b);
        assert!(!h.contains("s3cret"));
        assert_eq!(k.verify(Some(&h), "n2", read, now + 10, &b).unwrap(), "n1");
        assert_eq!(k.verify(None, "n2", read, now, &b), Err(AuthError::MissingInternal));
        assert_eq!(k.verify(Some("garbage"), "n2", read, now, &b), Err(AuthError::Malformed));
        let far = format!("{}.{}.{}.n1", i64::MIN, hex(&b), "00".repeat(32));
        assert!(matches!(k.verify(Some(&far), "n2", read, now, &b), Err(AuthError::Skew { .. })));
        assert!(matches!(k.verify(Some(&h), "n2", read, now + 301, &b), Err(AuthError::Skew { .. })));
        assert!(matches!(k.verify(Some(&h), "n2", read, now - 301, &b), Err(AuthError::Skew { .. })));
        let other = ClusterKey::new("other").header("n1", "n2", read, now, &b);
        assert!(matches!(k.verify(Some(&other), "n2", read, now, &b), Err(AuthError::WrongSecret { .. })));
        // The node id is covered by the MAC: a header replayed under another name fails.
        let forged = h.replace(".n1", ".n2");
        assert!(matches!(k.verify(Some(&forged), "n2", read, now, &b), Err(AuthError::WrongSecret { .. })));
        // So are the method, the receiver and the body: a captured Read header is no Apply or
        // Stream, it is refused by any other node, and it does not carry another body.
        for m in ["/recsys.internal.v1.Internal/Apply", "/recsys.internal.v1.Internal/Stream"] {
            assert!(matches!(k.verify(Some(&h), "n2", m, now, &b), Err(AuthError::WrongSecret { .. })));
        }
        assert!(matches!(k.verify(Some(&h), "n3", read, now, &b), Err(AuthError::WrongSecret { .. })));
        let other_body = body_digest(b"an apply's body");
        assert!(matches!(k.verify(Some(&h), "n2", read, now, &other_body), Err(AuthError::BodyMismatch { .. })));
        // A header naming another body's digest under the captured MAC fails the MAC itself.
        let swapped = h.replacen(&hex(&b), &hex(&other_body), 1);
        assert!(matches!(k.verify(Some(&swapped), "n2", read, now, &other_body), Err(AuthError::WrongSecret { .. })));
        // A tag that is not a whole HMAC is malformed.
        let short = format!("{now}.{}.ab.n1", hex(&b));
        assert_eq!(k.verify(Some(&short), "n2", read, now, &b), Err(AuthError::Malformed));
        // A reply is bound to its receiver and to the request it answers.
        let tag = k.sign_body("n1", "n2", &b, b"body");
        assert!(k.verify_body("n1", "n2", &b, b"body", &tag));
        assert!(!k.verify_body("n1", "n2", &b, b"bodY", &tag) && !k.verify_body("n3", "n2", &b, b"body", &tag));
        assert!(!k.verify_body("n1", "n2", &other_body, b"body", &tag));
        // Nor can one responder's reply pass as another's.
        assert!(!k.verify_body("n1", "n3", &b, b"body", &tag));
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
