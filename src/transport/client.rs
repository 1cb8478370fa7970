//! The per-node client: `Local` reaches this node's actors directly, `Remote` one peer over one
//! HTTP/2 channel (kept per peer, re-made when the peer's address changes after a restart).
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tonic::transport::Channel;

use super::local::ApplyResults;
use super::pb::internal_client::InternalClient;
use super::{decode, encode, pb, CallError, LocalPartitions, ReadQuery, ReadReply};
use crate::auth::InternalAuth;
use crate::cluster::{Membership, Ring};
use crate::domain::{LoggedOp, Part, Role};

const MAX_MESSAGE: usize = 64 * 1024 * 1024;
/// Ops a coordinator holds on disk for one peer that missed them (~100 bytes each): beyond it,
/// writes owed to that peer fail instead of being acknowledged on one disk.
const HINT_CAP_OPS: usize = 2_000_000;

/// A peer's internal-API client: every call signed with the cluster secret (see `auth`).
pub type PeerClient = InternalClient<crate::auth::Signed<Channel>>;

pub struct Transport {
    pub node_id: String,
    /// The table in effect here; swapped when a newer one arrives by gossip.
    ring: std::sync::RwLock<Arc<Ring>>,
    pub local: Arc<LocalPartitions>,
    pub membership: Arc<Membership>,
    peers: Mutex<HashMap<String, (String, PeerClient)>>,
    /// Writes owed to replicas that did not acknowledge them.
    pub hints: Arc<super::hints::Hints>,
    /// Woken when a caller shows a newer ring than this node's (the ring sync looks at gossip).
    pub ring_changed: tokio::sync::Notify,
    /// Signs this node's calls to its peers (no-op without a cluster secret).
    auth: InternalAuth,
    /// Hedged reads: recent latencies per peer and kind, and the hedge budget.
    pub hedge: super::hedge::Policy,
    /// The metadata log: where each member runs (gossip's address only for nodes it lacks).
    meta: std::sync::OnceLock<Arc<crate::cluster::metalog::MetaLog>>,
    /// Owners of a partition that must take a write before it is acknowledged
    /// (`ingest.write_quorum`; hints stand in for the others).
    pub write_quorum: usize,
}

pub enum NodeClient<'a> {
    Local(&'a LocalPartitions),
    Remote { node: String, client: PeerClient, transport: &'a Transport },
}

/// A whole call to a node failed (connect, deadline, epoch): every partition in it is missing.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{node}: {message}")]
pub struct NodeError {
    pub node: String,
    pub code: tonic::Code,
    pub message: String,
}

impl Transport {
    /// Fails only when the hints kept in the node's store cannot be opened.
    pub fn new(
        node_id: String,
        ring: Arc<Ring>,
        local: Arc<LocalPartitions>,
        membership: Arc<Membership>,
    ) -> Result<Self, super::hints::HintError> {
        let hints = Arc::new(super::hints::Hints::open(&local.store, HINT_CAP_OPS)?);
        Ok(Self {
            node_id,
            ring: std::sync::RwLock::new(ring),
            local,
            membership,
            peers: Mutex::new(HashMap::new()),
            hints,
            ring_changed: tokio::sync::Notify::new(),
            auth: InternalAuth::none(),
            hedge: super::hedge::Policy::new(0.05, Duration::from_millis(2)),
            meta: std::sync::OnceLock::new(),
            write_quorum: 1,
        })
    }

    /// Owners that must take a write before it is acknowledged (`ingest.write_quorum`).
    pub fn with_write_quorum(mut self, w: usize) -> Self {
        self.write_quorum = w.max(1);
        self
    }

    pub fn with_meta(self, meta: Arc<crate::cluster::metalog::MetaLog>) -> Self {
        let _ = self.meta.set(meta);
        self
    }

    /// Where `node` is reached: the metadata log's address, else gossip's.
    pub fn addr_of(&self, node: &str) -> Option<String> {
        match self.meta.get() {
            Some(m) => m.addr_of(node),
            None => self.membership.addr_of(node),
        }
    }

    /// The table in effect (a snapshot: a stage call keeps the one it started with).
    pub fn ring(&self) -> Arc<Ring> {
        self.ring.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set_ring(&self, ring: Arc<Ring>) {
        *self.ring.write().unwrap_or_else(|p| p.into_inner()) = ring;
    }

    /// Hedged reads: at most `max_ratio` extra calls, never before `min_delay` (0: no hedging).
    pub fn with_hedging(mut self, max_ratio: f64, min_delay: Duration) -> Self {
        self.hedge = super::hedge::Policy::new(max_ratio, min_delay);
        self
    }

    /// Signs calls to peers with the cluster secret (`None`: unsigned, for a cluster without one).
    pub fn with_cluster_key(mut self, key: Option<crate::auth::ClusterKey>) -> Self {
        self.auth = InternalAuth::new(key, &self.node_id);
        self
    }

    pub fn envelope(&self, timeout: Duration) -> pb::Envelope {
        let ring = self.ring();
        pb::Envelope {
            from_node: self.node_id.clone(),
            epoch: ring.epoch,
            digest: ring.digest.clone(),
            deadline_ms: timeout.as_millis().min(u128::from(u32::MAX)) as u32,
        }
    }

    /// The internal-API client of a peer (None when gossip has no address for it yet).
    pub fn peer(&self, node: &str) -> Option<PeerClient> {
        if self.local.faults().outbound_fails() {
            // Injected network partition (chaos tests): no peer is reachable from here.
            return None;
        }
        let addr = self.addr_of(node)?;
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((a, c)) = peers.get(node) {
            if *a == addr {
                return Some(c.clone());
            }
        }
        // https with this node's TLS when it has one (transport/tls.rs).
        let ep = super::tls::endpoint(&addr)
            .ok()?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(2))
            .keep_alive_while_idle(true)
            // Feature batches are large: bigger windows saved ~30 % per call in a loopback test.
            .initial_connection_window_size(Some(8 * 1024 * 1024))
            .initial_stream_window_size(Some(4 * 1024 * 1024));
        let client = InternalClient::new(self.auth.to(node).sign(ep.connect_lazy()))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        peers.insert(node.to_string(), (addr, client.clone()));
        Some(client)
    }

    pub fn client(&self, node: &str) -> Option<NodeClient<'_>> {
        if node == self.node_id {
            return Some(NodeClient::Local(&self.local));
        }
        let client = self.peer(node)?;
        Some(NodeClient::Remote { node: node.to_string(), client, transport: self })
    }

    pub fn request<T>(&self, body: T, timeout: Duration) -> tonic::Request<T> {
        let mut r = tonic::Request::new(body);
        r.set_timeout(timeout);
        r
    }

    /// Records a peer call's latency and outcome.
    pub fn observe(&self, node: &str, method: &'static str, t: Instant, ok: bool) {
        metrics::histogram!("recsys_peer_rpc_seconds", "peer" => node.to_string(), "method" => method)
            .record(t.elapsed().as_secs_f64());
        if !ok {
            metrics::counter!("recsys_peer_rpc_errors_total", "peer" => node.to_string(), "method" => method)
                .increment(1);
        }
    }
}

fn node_error(node: &str, s: tonic::Status) -> NodeError {
    NodeError { node: node.to_string(), code: s.code(), message: s.message().to_string() }
}

pub fn ask(part: Part, body: Vec<u8>) -> pb::PartitionAsk {
    pb::PartitionAsk { role: part.role as u32, partition: part.partition, body }
}

pub fn result_part(r: &pb::PartitionResult) -> Option<Part> {
    Some(Part::new(Role::from_u32(r.role)?, r.partition))
}

impl NodeClient<'_> {
    pub async fn read(
        &self,
        asks: Vec<(Part, ReadQuery)>,
        timeout: Duration,
    ) -> Result<Vec<(Part, Result<ReadReply, CallError>)>, NodeError> {
        match self {
            NodeClient::Local(l) => {
                let calls = asks.into_iter().map(|(part, q)| async move { (part, l.read(part, q, timeout).await) });
                Ok(futures::future::join_all(calls).await)
            }
            NodeClient::Remote { node, client, transport } => {
                let kind = asks.first().map(|(_, q)| q.kind()).unwrap_or("read");
                let req = pb::ReadRequest {
                    envelope: Some(transport.envelope(timeout)),
                    kind: kind.to_string(),
                    asks: asks.iter().map(|(p, q)| ask(*p, encode(q))).collect(),
                };
                let t = Instant::now();
                let res = client.clone().read(transport.request(req, timeout)).await;
                transport.observe(node, "read", t, res.is_ok());
                if res.is_ok() {
                    transport.hedge.latencies.record(node, kind, t.elapsed());
                }
                let reply = res.map_err(|s| node_error(node, s))?.into_inner();
                let mut by_part: HashMap<Part, pb::PartitionResult> =
                    reply.results.into_iter().filter_map(|r| Some((result_part(&r)?, r))).collect();
                Ok(asks
                    .into_iter()
                    .map(|(part, _)| {
                        let r = match by_part.remove(&part) {
                            None => Err(CallError::Unavailable { part, reason: format!("{node} did not answer it") }),
                            Some(r) if !r.error.is_empty() => Err(CallError::Unavailable { part, reason: r.error }),
                            Some(r) => {
                                decode::<ReadReply>(&r.body).map_err(|reason| CallError::Unavailable { part, reason })
                            }
                        };
                        (part, r)
                    })
                    .collect())
            }
        }
    }

    pub async fn apply(
        &self,
        asks: Vec<(Part, Arc<Vec<LoggedOp>>)>,
        timeout: Duration,
    ) -> Result<(ApplyResults, u64), NodeError> {
        match self {
            NodeClient::Local(l) => {
                let ring_owner = |p: Part| true_owner(l, p);
                Ok(l.apply(asks, ring_owner).await)
            }
            NodeClient::Remote { node, client, transport } => {
                let req = pb::ApplyRequest {
                    envelope: Some(transport.envelope(timeout)),
                    asks: asks.iter().map(|(p, ops)| ask(*p, encode(&**ops))).collect(),
                };
                let t = Instant::now();
                let res = client.clone().apply(transport.request(req, timeout)).await;
                transport.observe(node, "apply", t, res.is_ok());
                let reply = res.map_err(|s| node_error(node, s))?.into_inner();
                let results = reply
                    .results
                    .into_iter()
                    .filter_map(|r| {
                        let part = result_part(&r)?;
                        Some((part, if r.error.is_empty() { decode::<Vec<bool>>(&r.body) } else { Err(r.error) }))
                    })
                    .collect();
                Ok((results, reply.flush_micros))
            }
        }
    }
}

/// Local applies come from this node's own coordinator or catch-up, which already routed by the
/// ring; the server checks ownership for remote callers.
fn true_owner(_l: &LocalPartitions, _p: Part) -> bool {
    true
}
