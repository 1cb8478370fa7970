//! Membership by gossip (chitchat, the scuttlebutt + phi-accrual library Quickwit uses). Each node
//! publishes its id, generation (start time), gRPC address, state and ring epoch/digest; the
//! failure detector says who is alive. Liveness decides only where requests are routed, never
//! placement (see `ring`). A node that comes back is routed to again only after it has stayed
//! alive for `flap_debounce`, so a resumed or flapping node does not bounce traffic around.
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
/// The whole ring spec (JSON, a few hundred bytes): a newer table spreads by gossip.
const K_SPEC: &str = "ring_spec";
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
    /// The ring spec it publishes (JSON).
    pub ring_spec: String,
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
        let kvs = vec![
            (K_GRPC.to_string(), s.advertise.to_string()),
            (K_STATE.to_string(), initial_state.as_str().to_string()),
            (K_EPOCH.to_string(), "0".to_string()),
            (K_DIGEST.to_string(), String::new()),
            (K_SPEC.to_string(), String::new()),
            (K_DONE.to_string(), String::new()),
            (K_MOVES.to_string(), String::new()),
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
        self.chitchat.lock().await.self_node_state().set(K_STATE, state.as_str());
        self.refresh().await;
    }

    /// Publishes the ring this node runs (epoch, digest and the spec itself).
    pub async fn set_ring(&self, epoch: u64, digest: &str, spec_json: &str) {
        {
            let mut c = self.chitchat.lock().await;
            let me = c.self_node_state();
            me.set(K_EPOCH, epoch.to_string());
            me.set(K_DIGEST, digest);
            me.set(K_SPEC, spec_json);
        }
        self.refresh().await;
    }

    /// Publishes the partitions received complete in the change at `epoch`, and the moves running.
    pub async fn set_moves(&self, done: &str, moves: &str) {
        let mut c = self.chitchat.lock().await;
        let me = c.self_node_state();
        me.set(K_DONE, done);
        me.set(K_MOVES, moves);
    }

    /// Publishes this process's resident memory and CPU time (status of the other nodes).
    pub async fn set_load(&self, resident_bytes: u64, cpu_seconds: f64) {
        let mut c = self.chitchat.lock().await;
        let me = c.self_node_state();
        me.set(K_RSS, resident_bytes.to_string());
        me.set(K_CPU, format!("{cpu_seconds:.2}"));
    }

    /// Re-reads the gossip state into the routing view (also run every gossip tick).
    async fn refresh(&self) {
        let fresh: Vec<MemberInfo> = {
            let c = self.chitchat.lock().await;
            let live: std::collections::HashSet<ChitchatId> = c.live_nodes().cloned().collect();
            let mut best: BTreeMap<String, MemberInfo> = BTreeMap::new();
            for (cid, st) in c.node_states() {
                let info = MemberInfo {
                    node_id: cid.node_id.to_string(),
                    generation: cid.generation_id,
                    grpc_addr: st.get(K_GRPC).unwrap_or_default().to_string(),
                    state: st.get(K_STATE).and_then(MemberState::parse).unwrap_or(MemberState::Joining),
                    ring_epoch: st.get(K_EPOCH).and_then(|v| v.parse().ok()).unwrap_or(0),
                    ring_digest: st.get(K_DIGEST).unwrap_or_default().to_string(),
                    live: live.contains(cid),
                    ring_spec: st.get(K_SPEC).unwrap_or_default().to_string(),
                    moves_done: st.get(K_DONE).unwrap_or_default().to_string(),
                    moves: st.get(K_MOVES).unwrap_or_default().to_string(),
                    resident_bytes: st.get(K_RSS).and_then(|v| v.parse().ok()).unwrap_or(0),
                    cpu_seconds: st.get(K_CPU).and_then(|v| v.parse().ok()).unwrap_or(0.0),
                };
                // A restarted node appears under a new generation: the newest one counts.
                match best.get(&info.node_id) {
                    Some(b) if b.generation > info.generation => {}
                    _ => {
                        best.insert(info.node_id.clone(), info);
                    }
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
