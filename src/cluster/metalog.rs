//! Cluster metadata as a replicated log: ring specs (the begin and commit of every join, drain
//! and remove, with the removed set) and the internal address each member runs at are entries
//! of one log that every node holds, decided once and in one order.
//!
//! Decision: each log slot is one single-decree Paxos instance (Lamport's "Paxos made simple";
//! what Cassandra's LWT and CEP-21's metadata log build on) whose voters are the members of the
//! ring in effect before that slot. A value is decided when a majority of those voters accepted
//! it; a proposer first collects promises from a majority and must re-propose the highest-ballot
//! value any of them already accepted, so two changes proposed at once can never both be
//! decided: one wins, the other proposer learns which. The minority side of a network partition
//! cannot reach a majority, so it cannot change the ring. Why not openraft: membership changes
//! are rare (a few per day), the log is a few kilobytes, and the ring already names who votes;
//! a leader, heartbeats, terms and snapshot transfer buy nothing here that per-slot Paxos lacks,
//! and its API surface (log storage, state machine, network, membership) would be more code and
//! more failure modes than the ~500 lines below. Gossip no longer carries any value that decides
//! placement: only liveness, load, move progress and a hint that a node has a longer log.
//!
//! The log, the acceptor's promises and accepted values are persisted (written to a temporary
//! file, fsynced, renamed) before any reply leaves the node. Entry 0, the genesis, is the first
//! ring every initial node computes alike from `cluster.initial_nodes`.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rand::Rng;
use serde::{Deserialize, Serialize};
use tonic::transport::Channel;

use super::RingSpec;
use crate::auth::{ClusterKey, InternalAuth};
use crate::domain::Part;
use crate::proto::internal as pb;
use crate::proto::internal::internal_client::InternalClient;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MetaError {
    /// Another change was decided in the slot this one was proposed for.
    #[error("another membership change was decided first (log entry {index}: {change}); nothing was changed")]
    Conflict { index: u64, change: String },
    #[error("no quorum: {0}")]
    NoQuorum(String),
    #[error("metadata log {path}: {message}")]
    Persist { path: String, message: String },
    #[error("metadata log: {0}")]
    Invalid(String),
    /// This node starts without a log the cluster knows it had: it may have voted, and a voter
    /// that forgot its votes can decide two values for one slot.
    #[error(
        "this node `{node}` starts without a metadata log, but {peer}'s log (entry {index}) shows it had one: \
         its data dir was lost or replaced. A node that forgot its votes must not vote again: remove it \
         (`recsys remove {node}` through another node), then start it with an empty data dir and --join"
    )]
    Forgotten { node: String, peer: String, index: u64 },
}

/// One decided change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Entry {
    Ring(RingSpec),
    /// The internal address a member serves at (proposed by that member itself).
    Addr {
        node: String,
        addr: String,
    },
    /// The key page tokens are signed with when no cluster secret is set: random, decided once,
    /// so every node signs and checks with the same key and nobody can derive it from the
    /// cluster's name.
    PageKey {
        key: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Proposal {
    pub entry: Entry,
    /// What an operator would call it ("drain n4", "commit epoch 7", "address of n2").
    pub change: String,
    /// The node that proposed it.
    pub by: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decided {
    pub index: u64,
    pub proposal: Proposal,
}

/// Ordered by round, then node id: two proposers never share a ballot.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Ballot {
    pub round: u64,
    pub node: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct SlotState {
    promised: Ballot,
    accepted: Option<(Ballot, Proposal)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Persisted {
    genesis: RingSpec,
    log: Vec<Decided>,
    /// Acceptor state of slots not decided here yet.
    slots: BTreeMap<u64, SlotState>,
}

/// A message of the metadata protocol (the body of `Internal.Meta`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MetaMsg {
    /// `genesis` is the digest of the proposer's genesis: voters of another genesis (another
    /// cluster, or a node bootstrapped apart) refuse, so two logs never share a decision.
    Prepare {
        genesis: String,
        index: u64,
        ballot: Ballot,
    },
    Accept {
        genesis: String,
        index: u64,
        ballot: Ballot,
        proposal: Proposal,
    },
    /// Decided entries (a proposer tells everyone; also answers to `Read`).
    Learn {
        genesis: RingSpec,
        entries: Vec<Decided>,
    },
    /// The log after `after`, and the genesis.
    Read {
        after: u64,
    },
    /// The partitions this node holds complete for the change at `epoch` (the commit's check).
    MoveStatus {
        epoch: u64,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MetaReply {
    Promise { ok: bool, promised: Ballot, accepted: Option<(Ballot, Proposal)> },
    Accepted { ok: bool, promised: Ballot },
    AlreadyDecided(Decided),
    Log { genesis: RingSpec, entries: Vec<Decided>, last: u64, undecided: bool },
    Ack,
    MoveStatus { epoch: u64, done: Vec<Part> },
}

type MoveStatusFn = Box<dyn Fn(u64) -> Option<Vec<Part>> + Send + Sync>;
type AddrFn = Box<dyn Fn(&str) -> Option<String> + Send + Sync>;
type MetaClient = InternalClient<crate::auth::Signed<Channel>>;

struct State {
    p: Persisted,
    /// The cluster's name and `p.genesis.digest()`, hashed (`genesis_digest`): every Prepare and
    /// Accept is checked against it, so two clusters formed from equal configs never vote in
    /// each other's logs.
    genesis_digest: String,
    /// Addresses decided in the log.
    addrs: BTreeMap<String, String>,
    /// The highest round seen in any reply: the next ballot goes above it.
    max_round: u64,
}

pub struct MetaLog {
    me: String,
    path: PathBuf,
    state: Mutex<State>,
    key: Option<ClusterKey>,
    /// Bumped whenever the log grows (the controller adopts the ring it ends with).
    grown: tokio::sync::watch::Sender<u64>,
    /// Gossip's address of a node, for members whose address is not in the log yet.
    gossip_addr: OnceLock<AddrFn>,
    move_status: OnceLock<MoveStatusFn>,
    clients: Mutex<BTreeMap<(String, String), MetaClient>>,
    call_timeout: Duration,
}

/// Majority of `n` voters.
pub fn quorum(n: usize) -> usize {
    n / 2 + 1
}

impl MetaLog {
    /// Opens the log persisted at `path`, or starts one from `genesis` (None: nothing persisted
    /// and no genesis yet: `open` returns None and the caller learns the log from its seeds).
    pub fn open(
        me: &str,
        cluster: &str,
        path: &Path,
        genesis: Option<RingSpec>,
        key: Option<ClusterKey>,
    ) -> Result<Option<Arc<Self>>, MetaError> {
        let err = |m: String| MetaError::Persist { path: path.display().to_string(), message: m };
        let persisted = match std::fs::read(path) {
            Ok(b) => Some(serde_json::from_slice::<Persisted>(&b).map_err(|e| err(e.to_string()))?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(err(e.to_string())),
        };
        let p = match (persisted, genesis) {
            (Some(p), _) => p,
            (None, Some(g)) => Persisted { genesis: g, log: vec![], slots: BTreeMap::new() },
            (None, None) => return Ok(None),
        };
        let log = Self::with_state(me, cluster, path, p, key);
        log.persist()?;
        Ok(Some(log))
    }

    fn with_state(me: &str, cluster: &str, path: &Path, p: Persisted, key: Option<ClusterKey>) -> Arc<Self> {
        let mut addrs = BTreeMap::new();
        for d in &p.log {
            if let Entry::Addr { node, addr } = &d.proposal.entry {
                addrs.insert(node.clone(), addr.clone());
            }
        }
        let last = p.log.len() as u64;
        let (grown, _) = tokio::sync::watch::channel(last);
        Arc::new(Self {
            me: me.to_string(),
            path: path.to_path_buf(),
            state: Mutex::new(State { genesis_digest: genesis_digest(cluster, &p.genesis), p, addrs, max_round: 0 }),
            key,
            grown,
            gossip_addr: OnceLock::new(),
            move_status: OnceLock::new(),
            clients: Mutex::new(BTreeMap::new()),
            call_timeout: Duration::from_millis(1500),
        })
    }

    /// A log learned from a peer (a node joining with an empty data dir).
    pub fn from_learned(
        me: &str,
        cluster: &str,
        path: &Path,
        genesis: RingSpec,
        entries: Vec<Decided>,
        key: Option<ClusterKey>,
    ) -> Result<Arc<Self>, MetaError> {
        let log = Self::with_state(me, cluster, path, Persisted { genesis, log: vec![], slots: BTreeMap::new() }, key);
        log.learn(entries)?;
        log.persist()?;
        Ok(log)
    }

    pub fn set_gossip_addr(&self, f: impl Fn(&str) -> Option<String> + Send + Sync + 'static) {
        let _ = self.gossip_addr.set(Box::new(f));
    }

    pub fn set_move_status(&self, f: impl Fn(u64) -> Option<Vec<Part>> + Send + Sync + 'static) {
        let _ = self.move_status.set(Box::new(f));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// This node's id (the responder named in its signed replies).
    pub fn node_id(&self) -> &str {
        &self.me
    }

    /// Index of the last decided entry (0: the genesis only).
    pub fn last(&self) -> u64 {
        self.lock().p.log.len() as u64
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.grown.subscribe()
    }

    /// The ring in effect after the whole log: the last ring entry, or the genesis.
    pub fn ring(&self) -> RingSpec {
        ring_of(&self.lock().p)
    }

    pub fn genesis(&self) -> RingSpec {
        self.lock().p.genesis.clone()
    }

    /// How many times each ring epoch was decided (every epoch once, by construction; the
    /// nemesis checks it from the outside).
    pub fn epochs_decided(&self) -> BTreeMap<u64, usize> {
        let s = self.lock();
        let mut out: BTreeMap<u64, usize> = BTreeMap::new();
        for d in &s.p.log {
            if let Entry::Ring(r) = &d.proposal.entry {
                *out.entry(r.epoch).or_default() += 1;
            }
        }
        out
    }

    /// The change that produced the ring in effect ("drain n3"), with its log index.
    pub fn last_ring_change(&self) -> Option<(u64, String)> {
        let s = self.lock();
        s.p.log.iter().rev().find_map(|d| match &d.proposal.entry {
            Entry::Ring(_) => Some((d.index, d.proposal.change.clone())),
            _ => None,
        })
    }

    /// The address the log records for `node`.
    pub fn logged_addr(&self, node: &str) -> Option<String> {
        self.lock().addrs.get(node).cloned()
    }

    /// The page-token key decided in the log, if any.
    pub fn page_key(&self) -> Option<String> {
        page_key_of(&self.lock().p)
    }

    /// The page-token key, deciding a random one first when the log has none (every node that
    /// starts without a cluster secret asks; the first decided is the cluster's). Waits for a
    /// quorum as long as it takes, as a restart does.
    pub async fn ensure_page_key(self: &Arc<Self>) -> String {
        let mut last_log = Instant::now();
        loop {
            if let Some(k) = self.page_key() {
                return k;
            }
            let key: String = (0..32).map(|_| format!("{:02x}", rand::rng().random::<u8>())).collect();
            match self.propose(Entry::PageKey { key }, "page-token key", None).await {
                Ok(_) => continue,
                // Another key won the slot: it is in the log now (learned), unless learning
                // failed; a pause keeps that case from spinning rounds against the quorum.
                Err(MetaError::Conflict { .. }) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => {
                    if last_log.elapsed() > Duration::from_secs(5) {
                        tracing::warn!(error = %e, "waiting for a quorum to decide the page-token key");
                        last_log = Instant::now();
                    }
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
            }
        }
    }

    /// Where to reach `node`: the log's address, else gossip's (members that have not logged
    /// one yet, and nodes still joining).
    pub fn addr_of(&self, node: &str) -> Option<String> {
        self.logged_addr(node).or_else(|| self.gossip_addr.get().and_then(|f| f(node)))
    }

    fn persist_locked(&self, s: &State) -> Result<(), MetaError> {
        let err = |m: String| MetaError::Persist { path: self.path.display().to_string(), message: m };
        let bytes = serde_json::to_vec(&s.p).map_err(|e| err(e.to_string()))?;
        let tmp = self.path.with_extension("tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(|e| err(e.to_string()))?;
            f.write_all(&bytes).map_err(|e| err(e.to_string()))?;
            f.sync_all().map_err(|e| err(e.to_string()))?;
        }
        std::fs::rename(&tmp, &self.path).map_err(|e| err(e.to_string()))?;
        Ok(())
    }

    fn persist(&self) -> Result<(), MetaError> {
        let s = self.lock();
        self.persist_locked(&s)
    }

    /// Appends decided entries that extend this log (an entry already held must be the same:
    /// a difference would mean two values decided in one slot, which is reported loudly).
    pub fn learn(&self, entries: Vec<Decided>) -> Result<bool, MetaError> {
        let mut s = self.lock();
        let mut grew = false;
        // What grew before a refused entry is kept (persisted, announced) all the same.
        let mut refused = None;
        let mut sorted = entries;
        sorted.sort_by_key(|d| d.index);
        for d in sorted {
            let have = s.p.log.len() as u64;
            if d.index == 0 {
                continue;
            }
            if d.index <= have {
                let mine = &s.p.log[(d.index - 1) as usize];
                if mine.proposal != d.proposal {
                    metrics::counter!("recsys_meta_divergence_total").increment(1);
                    tracing::error!(index = d.index, mine = %mine.proposal.change, theirs = %d.proposal.change,
                        "two different entries for one metadata slot: refusing the peer's");
                    refused = Some(MetaError::Invalid(format!("entry {} differs from this node's", d.index)));
                    break;
                }
                continue;
            }
            if d.index != have + 1 {
                break; // a gap: the rest comes with the next read
            }
            if let Err(e) = valid_next(&s.p, &d.proposal) {
                refused = Some(MetaError::Invalid(format!("entry {}: {e}", d.index)));
                break;
            }
            if let Entry::Addr { node, addr } = &d.proposal.entry {
                s.addrs.insert(node.clone(), addr.clone());
            }
            s.p.slots.remove(&d.index);
            s.p.log.push(d);
            grew = true;
        }
        if grew {
            self.persist_locked(&s)?;
            let last = s.p.log.len() as u64;
            drop(s);
            metrics::gauge!("recsys_meta_log_index").set(last as f64);
            self.grown.send_replace(last);
        }
        match refused {
            Some(e) => Err(e),
            None => Ok(grew),
        }
    }

    /// `learn` off the async workers (it fsyncs when the log grows).
    pub async fn learn_off(self: &Arc<Self>, entries: Vec<Decided>) -> Result<bool, MetaError> {
        let me = self.clone();
        tokio::task::spawn_blocking(move || me.learn(entries))
            .await
            .map_err(|e| MetaError::Invalid(format!("learning stopped: {e}")))?
    }

    /// The acceptor and learner side: answers one message (blocking: it may fsync).
    pub fn handle(&self, msg: MetaMsg) -> Result<MetaReply, MetaError> {
        match msg {
            MetaMsg::Prepare { genesis, index, ballot } => {
                let mut s = self.lock();
                same_genesis(&s, &genesis)?;
                if let Some(done) = open_slot(&mut s, index, &ballot) {
                    return done;
                }
                let slot = s.p.slots.entry(index).or_default();
                let ok = ballot > slot.promised;
                if ok {
                    slot.promised = ballot;
                }
                let reply = MetaReply::Promise { ok, promised: slot.promised.clone(), accepted: slot.accepted.clone() };
                if ok {
                    self.persist_locked(&s)?;
                }
                Ok(reply)
            }
            MetaMsg::Accept { genesis, index, ballot, proposal } => {
                let mut s = self.lock();
                same_genesis(&s, &genesis)?;
                if let Some(done) = open_slot(&mut s, index, &ballot) {
                    return done;
                }
                let slot = s.p.slots.entry(index).or_default();
                let ok = ballot >= slot.promised;
                if ok {
                    slot.promised = ballot.clone();
                    slot.accepted = Some((ballot, proposal));
                }
                let reply = MetaReply::Accepted { ok, promised: slot.promised.clone() };
                if ok {
                    self.persist_locked(&s)?;
                }
                Ok(reply)
            }
            MetaMsg::Learn { genesis, entries } => {
                if genesis != self.genesis() {
                    return Err(MetaError::Invalid("the peer's log starts from another genesis".into()));
                }
                self.learn(entries)?;
                Ok(MetaReply::Ack)
            }
            MetaMsg::Read { after } => {
                let s = self.lock();
                let entries: Vec<Decided> = s.p.log.iter().skip(after as usize).cloned().collect();
                let last = s.p.log.len() as u64;
                let undecided = s.p.slots.range(last + 1..).any(|(_, v)| v.accepted.is_some());
                Ok(MetaReply::Log { genesis: s.p.genesis.clone(), entries, last, undecided })
            }
            MetaMsg::MoveStatus { epoch } => {
                let done = self.move_status.get().and_then(|f| f(epoch)).unwrap_or_default();
                Ok(MetaReply::MoveStatus { epoch, done })
            }
        }
    }

    fn client(&self, node: &str, addr: &str) -> Option<MetaClient> {
        let mut c = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        let k = (node.to_string(), addr.to_string());
        if let Some(x) = c.get(&k) {
            return Some(x.clone());
        }
        let ep = crate::transport::tls::endpoint(addr).ok()?.connect_timeout(Duration::from_millis(500));
        let auth = InternalAuth::new(self.key.clone(), &self.me).to(node);
        let client = InternalClient::new(auth.sign(ep.connect_lazy()));
        c.insert(k, client.clone());
        Some(client)
    }

    /// Sends `msg` to `node` (answered here when it is this node), or to an address for a seed.
    pub async fn call(self: &Arc<Self>, node: &str, addr: Option<&str>, msg: MetaMsg) -> Result<MetaReply, String> {
        if node == self.me && addr.is_none() {
            let me = self.clone();
            return tokio::task::spawn_blocking(move || me.handle(msg))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string());
        }
        let addr = match addr {
            Some(a) => a.to_string(),
            None => self.addr_of(node).ok_or_else(|| format!("{node}: no address known"))?,
        };
        let client = self.client(node, &addr).ok_or_else(|| format!("{node}: bad address {addr}"))?;
        let body = serde_json::to_vec(&msg).map_err(|e| e.to_string())?;
        let nonce: Vec<u8> = (0..16).map(|_| rand::rng().random::<u8>()).collect();
        let request = pb::MetaRequest { from_node: self.me.clone(), body, nonce };
        // The reply's MAC covers the request it answers: an old reply cannot be replayed.
        let request_digest = crate::auth::unary_body_digest(&request);
        let mut req = tonic::Request::new(request);
        req.set_timeout(self.call_timeout);
        let reply = client.clone().meta(req).await.map_err(|s| format!("{node}: {}", s.message()))?.into_inner();
        if let Some(k) = &self.key {
            if !k.verify_body(&self.me, node, &request_digest, &reply.body, &reply.mac) {
                return Err(format!("{node}: reply not signed with the cluster secret"));
            }
        }
        serde_json::from_slice(&reply.body).map_err(|e| format!("{node}: undecodable reply: {e}"))
    }

    /// Decides `entry` in the next slot. Returns the decided entry when it is this proposal;
    /// `Conflict` naming the change decided instead when another won the slot. A ring entry is
    /// built on the ring of epoch `base_epoch`: once the log holds a newer ring, the proposal is
    /// refused (it would undo or repeat that change) naming the change that got there first.
    pub async fn propose(
        self: &Arc<Self>,
        entry: Entry,
        change: &str,
        base_epoch: Option<u64>,
    ) -> Result<Decided, MetaError> {
        let proposal = Proposal { entry, change: change.to_string(), by: self.me.clone() };
        let started = Instant::now();
        let mut last_err = String::new();
        'attempt: for attempt in 0..30u32 {
            if attempt > 0 {
                // Two proposers outbidding each other back off by a random amount (Paxos's
                // liveness needs one of them to pause).
                let ms = rand::rng().random_range(20..120u64) * u64::from(attempt.min(5));
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            if started.elapsed() > Duration::from_secs(15) {
                break;
            }
            let (index, voters, round, genesis) = {
                let s = self.lock();
                let ring = ring_of(&s.p);
                if base_epoch.is_some_and(|b| b != ring.epoch) {
                    drop(s);
                    let (index, change) = self.last_ring_change().unwrap_or((0, "the genesis".into()));
                    return Err(MetaError::Conflict { index, change });
                }
                // A value every learner would refuse must never be decided (it would stall the log).
                valid_next(&s.p, &proposal).map_err(MetaError::Invalid)?;
                (s.p.log.len() as u64 + 1, ring.members.clone(), s.max_round + 1, s.genesis_digest.clone())
            };
            let ballot = Ballot { round, node: self.me.clone() };
            let need = quorum(voters.len());
            // Phase 1: promises from a majority, with what they accepted already.
            let replies = self
                .ask_all(&voters, MetaMsg::Prepare { genesis: genesis.clone(), index, ballot: ballot.clone() })
                .await;
            let mut promised = 0;
            let mut highest: Option<(Ballot, Proposal)> = None;
            for r in &replies {
                match r {
                    Ok(MetaReply::AlreadyDecided(d)) => match self.lost_to(d.clone(), &proposal).await {
                        Retry::Next => continue 'attempt,
                        Retry::Done(r) => return r,
                    },
                    Ok(MetaReply::Promise { ok, promised: p, accepted }) => {
                        self.saw_round(p.round);
                        if *ok {
                            promised += 1;
                            if let Some((b, v)) = accepted {
                                if highest.as_ref().is_none_or(|(hb, _)| b > hb) {
                                    highest = Some((b.clone(), v.clone()));
                                }
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => last_err = e.clone(),
                }
            }
            if promised < need {
                last_err = format!("{promised} of {} voters promised slot {index} ({last_err})", voters.len());
                continue;
            }
            let value = highest.map(|(_, v)| v).unwrap_or_else(|| proposal.clone());
            // Phase 2.
            let replies = self
                .ask_all(&voters, MetaMsg::Accept { genesis, index, ballot: ballot.clone(), proposal: value.clone() })
                .await;
            let mut accepted = 0;
            for r in &replies {
                match r {
                    Ok(MetaReply::AlreadyDecided(d)) => match self.lost_to(d.clone(), &proposal).await {
                        Retry::Next => continue 'attempt,
                        Retry::Done(r) => return r,
                    },
                    Ok(MetaReply::Accepted { ok, promised: p }) => {
                        self.saw_round(p.round);
                        if *ok {
                            accepted += 1;
                        }
                    }
                    Ok(_) => {}
                    Err(e) => last_err = e.clone(),
                }
            }
            if accepted < need {
                last_err = format!("{accepted} of {} voters accepted slot {index} ({last_err})", voters.len());
                continue;
            }
            let d = Decided { index, proposal: value };
            self.learn_off(vec![d.clone()]).await?;
            metrics::counter!("recsys_meta_decided_total").increment(1);
            tracing::info!(index, change = %d.proposal.change, by = %d.proposal.by, "metadata log: decided");
            self.spread(voters);
            match self.lost_to(d, &proposal).await {
                Retry::Next => continue 'attempt,
                Retry::Done(r) => return r,
            }
        }
        Err(MetaError::NoQuorum(format!(
            "could not decide `{change}` in {:.1} s: {last_err}",
            started.elapsed().as_secs_f64()
        )))
    }

    fn saw_round(&self, round: u64) {
        let mut s = self.lock();
        s.max_round = s.max_round.max(round);
    }

    /// What a proposer does once slot `d.index` is decided: done when it is this proposal; a
    /// ring change that won the slot refuses this one (it was built on the ring before); an
    /// address entry that won it leaves the next slot to try.
    async fn lost_to(self: &Arc<Self>, d: Decided, mine: &Proposal) -> Retry {
        let _ = self.learn_off(vec![d.clone()]).await;
        if d.proposal == *mine {
            return Retry::Done(Ok(d));
        }
        // Of two ring changes (or two page keys) built on one log, one wins; anything else that
        // took the slot leaves the next one to try.
        match (&d.proposal.entry, &mine.entry) {
            (Entry::Ring(_), Entry::Ring(_)) | (Entry::PageKey { .. }, Entry::PageKey { .. }) => {
                Retry::Done(Err(MetaError::Conflict { index: d.index, change: d.proposal.change }))
            }
            _ => Retry::Next,
        }
    }

    async fn ask_all(self: &Arc<Self>, nodes: &[String], msg: MetaMsg) -> Vec<Result<MetaReply, String>> {
        let calls = nodes.iter().map(|n| {
            let msg = msg.clone();
            async move { self.call(n, None, msg).await }
        });
        futures::future::join_all(calls).await
    }

    /// Tells every node it knows of (members, target, and `extra`) what the log holds, without
    /// waiting (a node that misses it reads it later).
    pub fn spread(self: &Arc<Self>, extra: Vec<String>) {
        let me = self.clone();
        tokio::spawn(async move {
            let (genesis, entries, ring) = {
                let s = me.lock();
                (s.p.genesis.clone(), s.p.log.clone(), ring_of(&s.p))
            };
            let mut nodes: BTreeSet<String> = extra.into_iter().collect();
            nodes.extend(ring.members.iter().cloned());
            nodes.extend(ring.target.iter().flatten().cloned());
            nodes.extend(ring.removed.iter().cloned());
            nodes.remove(&me.me);
            let msg = MetaMsg::Learn { genesis, entries };
            let calls = nodes.iter().map(|n| me.call(n, None, msg.clone()));
            let _ = futures::future::join_all(calls).await;
        });
    }

    /// Reads the log of `node` (or a seed address) and learns what extends this one. Returns
    /// the peer's last index and whether it has an accepted but undecided value beyond it.
    pub async fn read_from(self: &Arc<Self>, node: &str, addr: Option<&str>) -> Result<(u64, bool), String> {
        let after = self.last();
        match self.call(node, addr, MetaMsg::Read { after }).await? {
            MetaReply::Log { genesis, entries, last, undecided } => {
                if genesis != self.genesis() {
                    return Err(format!("{node}: its log starts from another genesis (another cluster?)"));
                }
                self.learn_off(entries).await.map_err(|e| e.to_string())?;
                Ok((last, undecided))
            }
            other => Err(format!("{node}: unexpected reply {other:?}")),
        }
    }

    /// Waits until a majority of the voters of this node's ring (itself included) has answered
    /// in one round with nothing newer than what this node then holds: only then does it know
    /// the ring it restarts with is the cluster's (a node removed while it was away learns it
    /// here). No timeout: a node that cannot reach a quorum does not serve a ring it cannot
    /// confirm.
    pub async fn confirm_with_quorum(self: &Arc<Self>) {
        let mut last_log = Instant::now();
        let mut round = 0u32;
        loop {
            round += 1;
            let before = self.last();
            let voters = self.ring().members;
            let need = quorum(voters.len());
            let others: Vec<String> = voters.iter().filter(|v| **v != self.me).cloned().collect();
            let calls = others.iter().map(|n| async move { (n.clone(), self.read_from(n, None).await) });
            let results = futures::future::join_all(calls).await;
            let mut answered = usize::from(voters.contains(&self.me));
            let mut newer = false;
            let mut pending = false;
            let mut failures = Vec::new();
            for (n, r) in results {
                match r {
                    Ok((last, undecided)) => {
                        answered += 1;
                        newer |= last > before;
                        pending |= undecided;
                    }
                    Err(e) => failures.push(format!("{n} ({e})")),
                }
            }
            if answered >= need && !newer && (!pending || round > 20) {
                tracing::info!(
                    index = self.last(),
                    epoch = self.ring().epoch,
                    answered,
                    of = voters.len(),
                    "metadata log confirmed by a quorum"
                );
                return;
            }
            if last_log.elapsed() > Duration::from_secs(5) {
                tracing::warn!(answered, need, unreachable = %failures.join(", "),
                    "waiting for a quorum of the ring's members to confirm the metadata log");
                last_log = Instant::now();
            }
            if !newer {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }

    /// Before a node with no metadata log forms the genesis ring (a cluster's first start),
    /// asks the `peers` (node id and address) that answer within the call timeout whether their
    /// logs already hold an address this node logged: then it had a log and lost it, and it is
    /// refused (`Forgotten`) before it persists anything or votes. Best effort: peers that do
    /// not answer are not waited for (on a cluster's first start none may be up yet).
    pub async fn check_not_forgotten(
        me: &str,
        cluster: &str,
        genesis: &RingSpec,
        peers: Vec<(String, String)>,
        key: Option<ClusterKey>,
    ) -> Result<(), MetaError> {
        let probe = Self::with_state(
            me,
            cluster,
            Path::new("/nonexistent/probe-meta.json"),
            Persisted { genesis: genesis.clone(), log: vec![], slots: BTreeMap::new() },
            key,
        );
        let calls = peers.iter().map(|(node, addr)| {
            let probe = probe.clone();
            async move { (node.clone(), probe.call(node, Some(addr), MetaMsg::Read { after: 0 }).await) }
        });
        for (peer, reply) in futures::future::join_all(calls).await {
            let Ok(MetaReply::Log { genesis: theirs, entries, .. }) = reply else { continue };
            if theirs.members.is_empty() {
                continue;
            }
            if theirs != *genesis {
                // The cluster runs from another genesis than the one this node would form (a
                // config changed since, or a legacy table): forming it would split the cluster.
                return Err(MetaError::Invalid(format!(
                    "{peer}'s metadata log starts from another genesis ({}) than this node's config forms ({}); \
                     start this node with an empty data dir and --join",
                    theirs.digest(),
                    genesis.digest()
                )));
            }
            if let Some(d) =
                entries.iter().find(|d| matches!(&d.proposal.entry, Entry::Addr { node, .. } if node == me))
            {
                return Err(MetaError::Forgotten { node: me.to_string(), peer, index: d.index });
            }
        }
        Ok(())
    }

    /// Learns the log of the cluster this node joins from the nodes gossip shows alive
    /// (`peers()`: node id and address; with a secret those entries are signed, and the call is
    /// signed for that node id, as every internal call is).
    /// A node the learned ring still names as a member (or a change's target) lost the log it
    /// voted with: it is refused (`Forgotten`) before anything is persisted.
    pub async fn learn_from_peers(
        me: &str,
        cluster: &str,
        path: &Path,
        peers: impl Fn() -> Vec<(String, String)>,
        key: Option<ClusterKey>,
    ) -> Result<Arc<Self>, MetaError> {
        // A placeholder log to make the calls with (its genesis is replaced by the seed's).
        let probe = Self::with_state(
            me,
            cluster,
            path,
            Persisted { genesis: RingSpec::new(0, &[], 1, 1, 1), log: vec![], slots: BTreeMap::new() },
            key.clone(),
        );
        let mut last_log = Instant::now();
        loop {
            let known = peers();
            if known.is_empty() && last_log.elapsed() > Duration::from_secs(5) {
                tracing::warn!("waiting for gossip to show a node of the cluster (check --seeds)");
                last_log = Instant::now();
            }
            // Every peer gossip shows is asked; the longest log counts, once a majority of its
            // ring's members answered: one stale peer cannot hide that this node is a member.
            let calls = known.iter().map(|(node, addr)| {
                let probe = probe.clone();
                async move { (node.clone(), probe.call(node, Some(addr), MetaMsg::Read { after: 0 }).await) }
            });
            let mut logs = Vec::new();
            for (node, reply) in futures::future::join_all(calls).await {
                match reply {
                    Ok(MetaReply::Log { genesis, entries, .. }) if !genesis.members.is_empty() => {
                        logs.push((node, genesis, entries))
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if last_log.elapsed() > Duration::from_secs(5) {
                            tracing::warn!(peer = %node, error = %e, "waiting for a node to share the metadata log");
                            last_log = Instant::now();
                        }
                    }
                }
            }
            for (node, genesis, entries) in &logs {
                let ring =
                    ring_of(&Persisted { genesis: genesis.clone(), log: entries.clone(), slots: BTreeMap::new() });
                if ring.members.iter().chain(ring.target.iter().flatten()).any(|m| m == me) {
                    let index = entries
                        .iter()
                        .rev()
                        .find(|d| matches!(&d.proposal.entry, Entry::Ring(r) if r.members.iter().any(|m| m == me)))
                        .map_or(0, |d| d.index);
                    return Err(MetaError::Forgotten { node: me.to_string(), peer: node.clone(), index });
                }
            }
            if let Some(longest) = logs.iter().max_by_key(|(_, _, e)| e.len()) {
                let (node, genesis, entries) = longest.clone();
                let ring =
                    ring_of(&Persisted { genesis: genesis.clone(), log: entries.clone(), slots: BTreeMap::new() });
                let answered = logs.iter().filter(|(n, _, _)| ring.members.contains(n)).count();
                if answered >= quorum(ring.members.len()) {
                    tracing::info!(peer = %node, entries = entries.len(), answered, "learned the cluster's metadata log");
                    let (me, cluster, path, key) =
                        (me.to_string(), cluster.to_string(), path.to_path_buf(), key.clone());
                    // Writing the learned log fsyncs: off the async workers.
                    return tokio::task::spawn_blocking(move || {
                        Self::from_learned(&me, &cluster, &path, genesis, entries, key)
                    })
                    .await
                    .map_err(|e| MetaError::Invalid(format!("learning stopped: {e}")))?;
                }
                if last_log.elapsed() > Duration::from_secs(5) {
                    tracing::warn!(
                        answered,
                        of = ring.members.len(),
                        "waiting for a majority of the members to share the metadata log"
                    );
                    last_log = Instant::now();
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
}

/// The acceptor's answer when `index` is not an open slot (decided already, or the genesis);
/// otherwise notes the ballot's round and returns None.
fn open_slot(s: &mut State, index: u64, ballot: &Ballot) -> Option<Result<MetaReply, MetaError>> {
    if let Some(d) = s.p.log.get((index as usize).wrapping_sub(1)) {
        return Some(Ok(MetaReply::AlreadyDecided(d.clone())));
    }
    if index == 0 {
        return Some(Err(MetaError::Invalid("slot 0 is the genesis".into())));
    }
    s.max_round = s.max_round.max(ballot.round);
    None
}

fn same_genesis(s: &State, theirs: &str) -> Result<(), MetaError> {
    if s.genesis_digest == theirs {
        Ok(())
    } else {
        Err(MetaError::Invalid("the proposer's log starts from another genesis (another cluster?)".into()))
    }
}

/// Whether `p` may follow the log `log`: a ring entry keeps the placement settings and raises
/// the epoch; an address entry is proposed by the node it names; a page-token key is decided
/// once.
fn valid_next(log: &Persisted, p: &Proposal) -> Result<(), String> {
    let cur = ring_of(log);
    match &p.entry {
        Entry::Ring(r) => {
            if (r.partitions, r.replication, r.vnodes) != (cur.partitions, cur.replication, cur.vnodes) {
                return Err("a ring entry may not change placement settings".into());
            }
            if r.epoch <= cur.epoch {
                return Err(format!("ring epoch {} does not follow epoch {}", r.epoch, cur.epoch));
            }
            Ok(())
        }
        Entry::Addr { node, .. } if *node != p.by => Err(format!("{} may not log the address of {node}", p.by)),
        Entry::Addr { .. } => Ok(()),
        Entry::PageKey { .. } if page_key_of(log).is_some() => Err("the page-token key is decided already".into()),
        Entry::PageKey { key } if key.len() < 32 => Err("a page-token key of fewer than 32 characters".into()),
        Entry::PageKey { .. } => Ok(()),
    }
}

fn page_key_of(p: &Persisted) -> Option<String> {
    p.log.iter().find_map(|d| match &d.proposal.entry {
        Entry::PageKey { key } => Some(key.clone()),
        _ => None,
    })
}

enum Retry {
    Next,
    Done(Result<Decided, MetaError>),
}

/// What a Prepare or Accept names its log by: the cluster's name and its genesis ring.
fn genesis_digest(cluster: &str, genesis: &RingSpec) -> String {
    format!("{:016x}", crate::ids::key_of(&format!("{cluster}\0{}", genesis.digest())))
}

fn ring_of(p: &Persisted) -> RingSpec {
    p.log
        .iter()
        .rev()
        .find_map(|d| match &d.proposal.entry {
            Entry::Ring(r) => Some(r.clone()),
            _ => None,
        })
        .unwrap_or_else(|| p.genesis.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("recsys-meta-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn genesis() -> RingSpec {
        RingSpec::new(1, &["a".into(), "b".into(), "c".into()], 8, 2, 16)
    }

    fn prop(change: &str, epoch: u64) -> Proposal {
        let mut r = genesis();
        r.epoch = epoch;
        Proposal { entry: Entry::Ring(r), change: change.into(), by: "x".into() }
    }

    #[test]
    fn an_acceptor_keeps_its_promises_across_restarts() {
        let d = tmp("acceptor");
        let path = d.join("meta.json");
        let log = MetaLog::open("a", "test", &path, Some(genesis()), None).unwrap().unwrap();
        let b = |r: u64, n: &str| Ballot { round: r, node: n.into() };
        let g = genesis_digest("test", &genesis());
        // A proposer whose log starts from another genesis, or from this genesis in another
        // cluster, is refused outright.
        let other = genesis_digest("test", &RingSpec::new(1, &["a".into(), "b".into()], 8, 2, 16));
        assert!(log.handle(MetaMsg::Prepare { genesis: other, index: 1, ballot: b(2, "b") }).is_err());
        let elsewhere = genesis_digest("another", &genesis());
        assert!(log.handle(MetaMsg::Prepare { genesis: elsewhere, index: 1, ballot: b(2, "b") }).is_err());
        assert!(matches!(
            log.handle(MetaMsg::Prepare { genesis: g.clone(), index: 1, ballot: b(2, "b") }).unwrap(),
            MetaReply::Promise { ok: true, .. }
        ));
        let r = log
            .handle(MetaMsg::Accept { genesis: g.clone(), index: 1, ballot: b(2, "b"), proposal: prop("drain c", 2) })
            .unwrap();
        assert!(matches!(r, MetaReply::Accepted { ok: true, .. }));
        drop(log);
        // Restarted: a lower ballot is refused, and a higher one is told what was accepted.
        let log = MetaLog::open("a", "test", &path, None, None).unwrap().unwrap();
        assert!(matches!(
            log.handle(MetaMsg::Prepare { genesis: g.clone(), index: 1, ballot: b(1, "z") }).unwrap(),
            MetaReply::Promise { ok: false, .. }
        ));
        match log.handle(MetaMsg::Prepare { genesis: g.clone(), index: 1, ballot: b(3, "c") }).unwrap() {
            MetaReply::Promise { ok: true, accepted: Some((_, p)), .. } => assert_eq!(p.change, "drain c"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            log.handle(MetaMsg::Accept { genesis: g, index: 1, ballot: b(2, "b"), proposal: prop("remove b", 2) })
                .unwrap(),
            MetaReply::Accepted { ok: false, .. }
        ));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn learning_refuses_a_different_entry_for_a_decided_slot_and_stale_epochs() {
        let d = tmp("learn");
        let log = MetaLog::open("a", "test", &d.join("meta.json"), Some(genesis()), None).unwrap().unwrap();
        assert!(log.learn(vec![Decided { index: 1, proposal: prop("drain c", 2) }]).unwrap());
        assert_eq!(log.ring().epoch, 2);
        assert!(log.learn(vec![Decided { index: 1, proposal: prop("remove b", 2) }]).is_err());
        assert!(log.learn(vec![Decided { index: 2, proposal: prop("old", 2) }]).is_err(), "epoch must rise");
        // A gap is not filled from a later entry.
        assert!(!log.learn(vec![Decided { index: 5, proposal: prop("later", 9) }]).unwrap());
        assert_eq!(log.last(), 1);
        let g = genesis_digest("test", &genesis());
        match log
            .handle(MetaMsg::Prepare { genesis: g, index: 1, ballot: Ballot { round: 9, node: "z".into() } })
            .unwrap()
        {
            MetaReply::AlreadyDecided(x) => assert_eq!(x.proposal.change, "drain c"),
            other => panic!("{other:?}"),
        }
        assert_eq!(log.epochs_decided().get(&2), Some(&1));
        // A member logs only its own address.
        let addr = |by: &str| Proposal {
            entry: Entry::Addr { node: "b".into(), addr: "127.0.0.1:9".into() },
            change: "address of b".into(),
            by: by.into(),
        };
        assert!(log.learn(vec![Decided { index: 2, proposal: addr("c") }]).is_err());
        assert!(log.learn(vec![Decided { index: 2, proposal: addr("b") }]).unwrap());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[tokio::test]
    async fn a_single_voter_decides_alone_and_a_second_proposal_for_the_slot_loses() {
        let d = tmp("single");
        let g = RingSpec::new(1, &["a".into()], 8, 1, 16);
        let log = MetaLog::open("a", "test", &d.join("meta.json"), Some(g.clone()), None).unwrap().unwrap();
        let mut next = g.clone();
        next.epoch = 2;
        let won = log.propose(Entry::Ring(next.clone()), "join b", Some(1)).await.unwrap();
        assert_eq!(won.index, 1);
        assert_eq!(log.ring().epoch, 2);
        // A change built on the ring before that one is refused, naming the one that won.
        let stale = log.propose(Entry::Ring(next), "drain a", Some(1)).await;
        assert_eq!(stale, Err(MetaError::Conflict { index: 1, change: "join b".into() }));
        let addr =
            log.propose(Entry::Addr { node: "a".into(), addr: "127.0.0.1:1".into() }, "address of a", None).await;
        assert_eq!(addr.unwrap().index, 2);
        assert_eq!(log.logged_addr("a").as_deref(), Some("127.0.0.1:1"));
        // The page-token key: decided once, random, and a second is refused.
        let k = log.ensure_page_key().await;
        assert_eq!(k.len(), 64);
        assert_eq!(log.ensure_page_key().await, k);
        let again = log.propose(Entry::PageKey { key: "f".repeat(64) }, "page-token key", None).await;
        assert!(matches!(again, Err(MetaError::Invalid(_))), "{again:?}");
        let _ = std::fs::remove_dir_all(&d);
    }
}
