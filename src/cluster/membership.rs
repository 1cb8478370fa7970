//! Membership by gossip (chitchat, the scuttlebutt + phi-accrual library Quickwit uses). Each node
//! publishes its id, generation (start time), gRPC address, state and ring epoch/digest; the
//! failure detector says who is alive. Liveness decides only where requests are routed, never
//! placement: the ring and the members' addresses come from the metadata log (`metalog`), and
//! nothing gossiped is adopted as placement. A node that comes back is routed to again only after
//! it has stayed alive for `flap_debounce`, so a resumed or flapping node does not bounce traffic.
//!
//! With a cluster secret every value is signed (HMAC over node id, generation, key and value);
//! a node entry with any value unsigned or wrongly signed is ignored whole and counted
//! (`recsys_gossip_rejected_total`), so a process that speaks chitchat with the cluster's name but
//! lacks the secret is invisible. Without a secret the node warns at start that it runs
//! unprotected; even then a second entry under a live node's id (a higher generation from a
//! forger) does not replace the entry already bound while that one stays alive.
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chitchat::transport::UdpTransport;
use chitchat::{spawn_chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig};
use tokio::sync::watch;

use super::MemberState;

const K_GRPC: &str = "grpc_addr";
const K_STATE: &str = "state";
const K_EPOCH: &str = "ring_epoch";
const K_DIGEST: &str = "ring_digest";
/// The last index of this node's metadata log: a hint that a peer should read the log from it.
const K_META: &str = "meta_index";
/// Partitions this node has received complete in the change in progress: `epoch:i,i,…`.
const K_DONE: &str = "moves_done";
/// Moves in progress to this node (JSON list of `MoveReport`), for status.
const K_MOVES: &str = "moves";
const K_RSS: &str = "resident_bytes";
const K_CPU: &str = "cpu_seconds";

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("gossip: {0}")]
    Gossip(String),
}

#[derive(Debug, Clone)]
pub struct MembershipSettings {
    pub node_id: String,
    pub cluster_name: String,
    /// UDP address gossip binds (the gRPC port, on UDP).
    pub listen: SocketAddr,
    /// Address peers use for gossip and gRPC.
    pub advertise: SocketAddr,
    pub seeds: Vec<String>,
    pub gossip_interval: Duration,
    pub phi_threshold: f64,
    pub flap_debounce: Duration,
    /// Signs and checks every gossiped value (None: unprotected).
    pub key: Option<crate::auth::ClusterKey>,
}

/// What this node knows of one peer (or itself).
#[derive(Debug, Clone, PartialEq)]
pub struct MemberInfo {
    pub node_id: String,
    pub generation: u64,
    pub grpc_addr: String,
    pub state: MemberState,
    pub ring_epoch: u64,
    pub ring_digest: String,
    /// Seen alive by the failure detector (and past the flap debounce).
    pub live: bool,
    /// The last index of its metadata log.
    pub meta_index: u64,
    pub moves_done: String,
    pub moves: String,
    pub resident_bytes: u64,
    pub cpu_seconds: f64,
}

#[derive(Default)]
struct View {
    members: BTreeMap<String, MemberInfo>,
    /// When each node was last seen coming alive, for the flap debounce.
    alive_since: HashMap<String, Instant>,
}

pub struct Membership {
    pub node_id: String,
    pub generation: u64,
    handle: tokio::sync::Mutex<Option<ChitchatHandle>>,
    chitchat: Arc<tokio::sync::Mutex<chitchat::Chitchat>>,
    view: RwLock<View>,
    debounce: Duration,
    /// Bumped on every change of who is routable; waiters (startup, anti-entropy) watch it.
    changed: watch::Sender<u64>,
    key: Option<crate::auth::ClusterKey>,
}

impl Membership {
    pub async fn start(s: MembershipSettings, initial_state: MemberState) -> Result<Arc<Self>, MembershipError> {
        let generation = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let id = ChitchatId::new(s.node_id.clone(), generation, s.advertise);
        let fd = FailureDetectorConfig {
            phi_threshold: s.phi_threshold,
            sampling_window_size: 1000,
            max_interval: Duration::from_secs(2),
            initial_interval: s.gossip_interval,
            dead_node_grace_period: Duration::from_secs(3600),
        };
        let config = ChitchatConfig {
            chitchat_id: id,
            cluster_id: s.cluster_name.clone(),
            gossip_interval: s.gossip_interval,
            listen_addr: s.listen,
            seed_nodes: s.seeds.clone(),
            failure_detector_config: fd,
            marked_for_deletion_grace_period: Duration::from_secs(3600),
            catchup_callback: None,
            extra_liveness_predicate: None,
            protocol_version: chitchat::ProtocolVersion::V0,
        };
        let sign = |k: &str, v: String| (k.to_string(), signed(s.key.as_ref(), &s.node_id, generation, k, v));
        let kvs = vec![
            sign(K_GRPC, s.advertise.to_string()),
            sign(K_STATE, initial_state.as_str().to_string()),
            sign(K_EPOCH, "0".to_string()),
            sign(K_DIGEST, String::new()),
            sign(K_META, "0".to_string()),
            sign(K_DONE, String::new()),
            sign(K_MOVES, String::new()),
        ];
        let handle =
            spawn_chitchat(config, kvs, &UdpTransport).await.map_err(|e| MembershipError::Gossip(e.to_string()))?;
        let chitchat = handle.chitchat();
        let (changed, _) = watch::channel(0);
        let m = Arc::new(Self {
            node_id: s.node_id.clone(),
            generation,
            handle: tokio::sync::Mutex::new(Some(handle)),
            chitchat,
            view: RwLock::new(View::default()),
            debounce: s.flap_debounce,
            changed,
            key: s.key.clone(),
        });
        m.refresh().await;
        let weak = Arc::downgrade(&m);
        let tick = s.gossip_interval.min(Duration::from_millis(100));
        tokio::spawn(async move {
            let mut every = tokio::time::interval(tick);
            every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                every.tick().await;
                let Some(m) = weak.upgrade() else { break };
                m.refresh().await;
            }
        });
        Ok(m)
    }

    /// Publishes this node's state (joining, serving, leaving).
    pub async fn set_state(&self, state: MemberState) {
        self.publish(&[(K_STATE, state.as_str().to_string())]).await;
        self.refresh().await;
    }

    /// Sets this node's values, signed.
    async fn publish(&self, kvs: &[(&str, String)]) {
        let mut c = self.chitchat.lock().await;
        let me = c.self_node_state();
        for (k, v) in kvs {
            me.set(*k, signed(self.key.as_ref(), &self.node_id, self.generation, k, v.clone()));
        }
    }

    /// Publishes the ring this node runs (epoch and digest: what peers compare before moving
    /// data, never a table to adopt) and its metadata log's last index.
    pub async fn set_ring(&self, epoch: u64, digest: &str, meta_index: u64) {
        self.publish(&[(K_EPOCH, epoch.to_string()), (K_DIGEST, digest.to_string()), (K_META, meta_index.to_string())])
            .await;
        self.refresh().await;
    }

    /// Publishes the partitions received complete in the change at `epoch`, and the moves running
    /// (for status; the commit asks each new owner directly).
    pub async fn set_moves(&self, done: &str, moves: &str) {
        self.publish(&[(K_DONE, done.to_string()), (K_MOVES, moves.to_string())]).await;
    }

    /// Publishes this process's resident memory and CPU time (status of the other nodes).
    pub async fn set_load(&self, resident_bytes: u64, cpu_seconds: f64) {
        self.publish(&[(K_RSS, resident_bytes.to_string()), (K_CPU, format!("{cpu_seconds:.2}"))]).await;
    }

    /// Re-reads the gossip state into the routing view (also run every gossip tick).
    async fn refresh(&self) {
        let fresh: Vec<MemberInfo> = {
            let c = self.chitchat.lock().await;
            let live: std::collections::HashSet<ChitchatId> = c.live_nodes().cloned().collect();
            let bound: HashMap<String, u64> = {
                let v = self.view.read().unwrap_or_else(|p| p.into_inner());
                v.members.iter().map(|(k, m)| (k.clone(), m.generation)).collect()
            };
            let mut best: BTreeMap<String, MemberInfo> = BTreeMap::new();
            for (cid, st) in c.node_states() {
                let node: &str = &cid.node_id;
                let gen = cid.generation_id;
                // Every value this entry carries must be signed for this node id and generation.
                let mut ok = true;
                let mut get = |k: &str| -> String {
                    match st.get(k) {
                        None => String::new(),
                        Some(raw) => match verified(self.key.as_ref(), node, gen, k, raw) {
                            Some(v) => v.to_string(),
                            None => {
                                ok = false;
                                String::new()
                            }
                        },
                    }
                };
                let info = MemberInfo {
                    node_id: node.to_string(),
                    generation: gen,
                    grpc_addr: get(K_GRPC),
                    state: MemberState::parse(&get(K_STATE)).unwrap_or(MemberState::Joining),
                    ring_epoch: get(K_EPOCH).parse().unwrap_or(0),
                    ring_digest: get(K_DIGEST),
                    live: live.contains(cid),
                    meta_index: get(K_META).parse().unwrap_or(0),
                    moves_done: get(K_DONE),
                    moves: get(K_MOVES),
                    resident_bytes: get(K_RSS).parse().unwrap_or(0),
                    cpu_seconds: get(K_CPU).parse().unwrap_or(0.0),
                };
                if !ok || (node == self.node_id && gen != self.generation) {
                    // Unsigned or wrongly signed (a participant without the secret), or another
                    // process claiming this node's own id: ignored whole.
                    metrics::counter!("recsys_gossip_rejected_total").increment(1);
                    continue;
                }
                let replace = match best.get(node) {
                    None => true,
                    // The entry bound already stays while it is alive: a second entry under a
                    // live node's id (a forger's higher generation) does not take its place. A
                    // restarted node's old entry dies within the failure detector's time.
                    Some(b) if b.live != info.live => info.live,
                    Some(b) if bound.get(node) == Some(&b.generation) && b.live => false,
                    Some(_) if bound.get(node) == Some(&info.generation) && info.live => true,
                    Some(b) => info.generation > b.generation,
                };
                if replace {
                    best.insert(node.to_string(), info);
                }
            }
            best.into_values().collect()
        };
        let now = Instant::now();
        let mut changed = false;
        {
            let mut v = self.view.write().unwrap_or_else(|p| p.into_inner());
            let mut next = BTreeMap::new();
            for mut m in fresh {
                let alive = m.live;
                if alive {
                    let since = *v.alive_since.entry(m.node_id.clone()).or_insert(now);
                    // Self is always live; peers only after the debounce.
                    m.live = m.node_id == self.node_id || now.duration_since(since) >= self.debounce;
                } else {
                    v.alive_since.remove(&m.node_id);
                }
                let old = v.members.get(&m.node_id);
                let routable = |x: &MemberInfo| x.live && x.state == MemberState::Serving;
                if old.map(routable) != Some(routable(&m)) || old.map(|o| o.generation) != Some(m.generation) {
                    changed = true;
                    if let Some(o) = old {
                        let change = if routable(&m) { "up" } else { "down" };
                        if routable(o) != routable(&m) {
                            tracing::info!(node = %m.node_id, change, state = m.state.as_str(), "membership change");
                            metrics::counter!("recsys_membership_changes_total", "change" => change).increment(1);
                        }
                    }
                }
                next.insert(m.node_id.clone(), m);
            }
            for gone in v.members.keys().filter(|k| !next.contains_key(*k)) {
                tracing::info!(node = %gone, "membership change: forgotten");
                changed = true;
            }
            let live = next.values().filter(|m| m.live && m.state == MemberState::Serving).count();
            metrics::gauge!("recsys_live_nodes").set(live as f64);
            v.members = next;
        }
        if changed {
            self.changed.send_modify(|n| *n += 1);
        }
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn members(&self) -> Vec<MemberInfo> {
        self.view.read().unwrap_or_else(|p| p.into_inner()).members.values().cloned().collect()
    }

    /// Tests a member under the read lock (called per partition per stage: no clones).
    fn check(&self, node: &str, f: impl Fn(&MemberInfo) -> bool) -> bool {
        self.view.read().unwrap_or_else(|p| p.into_inner()).members.get(node).is_some_and(f)
    }

    /// Alive (past the debounce) and serving: requests may be routed to it.
    pub fn is_routable(&self, node: &str) -> bool {
        self.check(node, |m| m.live && m.state == MemberState::Serving)
    }

    /// Alive and not leaving: writes go to it (a joining node takes writes while it catches up).
    pub fn takes_writes(&self, node: &str) -> bool {
        self.check(node, |m| m.live && m.state != MemberState::Leaving)
    }

    pub fn member(&self, node: &str) -> Option<MemberInfo> {
        self.view.read().unwrap_or_else(|p| p.into_inner()).members.get(node).cloned()
    }

    /// Alive (past the debounce), whatever its state.
    pub fn is_live(&self, node: &str) -> bool {
        self.check(node, |m| m.live)
    }

    pub fn addr_of(&self, node: &str) -> Option<String> {
        let v = self.view.read().unwrap_or_else(|p| p.into_inner());
        v.members.get(node).map(|m| m.grpc_addr.clone()).filter(|a| !a.is_empty())
    }

    pub async fn shutdown(&self) {
        if let Some(h) = self.handle.lock().await.take() {
            let _ = h.shutdown().await;
        }
    }
}

/// `value` as published: with a key, `value~<signature>` (the signature binds node, generation
/// and key, so a value cannot be replayed under another).
fn signed(key: Option<&crate::auth::ClusterKey>, node: &str, generation: u64, k: &str, value: String) -> String {
    match key {
        Some(key) => {
            let sig = key.sign_gossip(node, generation, k, &value);
            format!("{value}~{sig}")
        }
        None => value,
    }
}

/// The value of a published `raw` when its signature holds (any value without a key).
fn verified<'a>(
    key: Option<&crate::auth::ClusterKey>,
    node: &str,
    generation: u64,
    k: &str,
    raw: &'a str,
) -> Option<&'a str> {
    let Some(key) = key else { return Some(raw) };
    let (value, sig) = raw.rsplit_once('~')?;
    crate::auth::ct_eq(key.sign_gossip(node, generation, k, value).as_bytes(), sig.as_bytes()).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gossip_values_are_bound_to_node_generation_and_key() {
        let k = crate::auth::ClusterKey::new("s");
        let raw = signed(Some(&k), "n2", 7, K_GRPC, "127.0.0.1:1".into());
        assert_eq!(verified(Some(&k), "n2", 7, K_GRPC, &raw), Some("127.0.0.1:1"));
        assert_eq!(verified(Some(&k), "n2", 8, K_GRPC, &raw), None, "another generation");
        assert_eq!(verified(Some(&k), "n3", 7, K_GRPC, &raw), None, "another node");
        assert_eq!(verified(Some(&k), "n2", 7, K_STATE, &raw), None, "another key");
        assert_eq!(verified(Some(&k), "n2", 7, K_GRPC, "127.0.0.1:1"), None, "unsigned");
        let other = crate::auth::ClusterKey::new("t");
        assert_eq!(verified(Some(&other), "n2", 7, K_GRPC, &raw), None, "another secret");
        assert_eq!(verified(None, "n2", 7, K_GRPC, "x"), Some("x"));
    }
}
