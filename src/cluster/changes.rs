//! Membership changes while traffic flows: join, drain, remove, and the partition moves they
//! cause (Cassandra's bootstrap / decommission / removenode, Qdrant's shard transfer).
//!
//! Every node runs one `Controller`. A change is two ring steps, each an entry of the cluster
//! metadata log (`metalog`: decided once, in one order, by a majority of the members; gossip
//! decides nothing here):
//! 1. **begin** (epoch + 1): a target member set beside the current one. Reads keep going to the
//!    current owners; writes go to current and new owners. Each new owner opens its incoming
//!    partitions empty and, once every live node runs this table (so every coordinator sends it
//!    writes), streams each partition's op log from a current replica (chunked, throttled: at
//!    most `move_concurrency` at once and `move_bytes_per_sec`), then runs one anti-entropy
//!    round against the current owners for anything written around the stream. It then publishes
//!    the partition as done.
//!    A stream is complete only when the new copy also holds every op of every previous owner
//!    that was not removed (Cassandra's consistent range movement): a move whose previous owner
//!    is down waits for it, unless the operator set `cluster.consistent_range_movement = false`
//!    (logged and counted).
//! 2. **commit** (epoch + 1): when every new owner answers (over the authenticated internal API,
//!    not gossip) that it holds all its partitions, the lowest-id live node proposes the commit.
//!    The new owners' partitions become readable. An old owner drops a copy only after every new
//!    owner has confirmed it holds every op of that copy (ops it lacks are pushed to it first),
//!    so a de-owned copy holding the only replica of an acknowledged write hands it over before
//!    it goes. A drained node, owning nothing, then stops.
//!
//! Everything is derived from the persisted spec and the gossiped progress, so a crash of any
//! node involved resumes: a restarted new owner streams again from the start (ops are
//! idempotent by id), a lost committer is replaced by the next lowest id.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::ActorRef;
use serde::{Deserialize, Serialize};

use super::metalog::{Entry, MetaError, MetaLog, MetaMsg, MetaReply};
use super::{replication, Part, Ring, RingSpec, Role};
use crate::store::LoggedOp;
use crate::transport::{decode, pb, Transport};

#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("node: `{0}` is not a member of the cluster")]
    NotMember(String),
    #[error("{0}")]
    Refused(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Internal(String),
    /// Another change won the metadata log's slot.
    #[error("{0}")]
    Conflict(String),
    /// No majority of the members answered: this side of a partition cannot change the ring.
    #[error("{0}")]
    NoQuorum(String),
}

impl From<MetaError> for ChangeError {
    fn from(e: MetaError) -> Self {
        match e {
            MetaError::Conflict { .. } => ChangeError::Conflict(e.to_string()),
            MetaError::NoQuorum(_) => ChangeError::NoQuorum(e.to_string()),
            other => ChangeError::Internal(other.to_string()),
        }
    }
}

/// Opens and closes partitions on this node (the partition supervisor).
pub enum PartitionCmd {
    /// Starts the partition's actor from its op log (empty for a partition new here). Replies
    /// false when it was open already.
    Open(Part, ractor::RpcReplyPort<bool>),
    /// Stops the partition's actor and forgets its op log.
    Close(Part, ractor::RpcReplyPort<()>),
}

#[derive(Debug, Clone)]
pub struct MoveSettings {
    pub concurrency: usize,
    pub bytes_per_sec: u64,
    pub chunk_bytes: u32,
    /// Cassandra's `consistent.rangemovement`: a new copy waits for every previous owner that
    /// was not removed. Off only by an explicit operator setting (logged and counted).
    pub consistent: bool,
}

/// One move in progress, as published by gossip and shown by status.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct MoveReport {
    pub role: String,
    pub partition: u32,
    pub from: String,
    pub to: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub eta_ms: u64,
}

/// What an operator asked for.
#[derive(Debug, Clone)]
pub enum Change {
    Join(String),
    Drain(String),
    Remove(String),
}

/// A shared token bucket over the bytes this node streams in.
struct Throttle {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl Throttle {
    fn new(bytes_per_sec: u64) -> Self {
        Self { rate: bytes_per_sec as f64, state: Mutex::new((bytes_per_sec as f64, Instant::now())) }
    }

    /// Charges `bytes`; returns how long to wait before the next chunk (the debt at `rate`).
    fn charge(&self, bytes: usize) -> Duration {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let refill = now.duration_since(s.1).as_secs_f64() * self.rate;
        s.0 = (s.0 + refill).min(self.rate) - bytes as f64;
        s.1 = now;
        if s.0 >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-s.0 / self.rate)
        }
    }
}

#[derive(Default)]
struct Progress {
    /// Incoming partitions streamed complete here (for the change in progress).
    streamed: BTreeSet<Part>,
    /// Streams running: partition → report.
    running: BTreeMap<Part, MoveReport>,
    /// When a failed stream may be tried again, and how many times it failed (picks the next
    /// source in turn).
    retry_at: HashMap<Part, (Instant, usize)>,
    /// The epoch `streamed` belongs to (what `MoveStatus` answers for).
    epoch: u64,
    /// When a copy whose hand-off failed may be tried again.
    handoff_at: HashMap<Part, Instant>,
}

pub struct Controller {
    t: Arc<Transport>,
    meta: Arc<MetaLog>,
    partitions: ActorRef<PartitionCmd>,
    table: PathBuf,
    settings: MoveSettings,
    throttle: Throttle,
    progress: Mutex<Progress>,
    /// This node was started to join and has not been taken in yet (cleared once it is a
    /// member: a node drained later must not ask to join again).
    joining: std::sync::atomic::AtomicBool,
    /// Set when this node is no longer a member and holds nothing: the node stops.
    pub removed: tokio::sync::watch::Sender<bool>,
    last_load: Mutex<Instant>,
    /// A stream ended: the loop runs again at once (the next one starts without waiting a tick).
    wake: tokio::sync::Notify,
    /// Serialises table changes here (proposals and adoptions): a table only ever moves forward.
    adopting: tokio::sync::Mutex<()>,
}

impl Controller {
    pub fn new(
        t: Arc<Transport>,
        meta: Arc<MetaLog>,
        partitions: ActorRef<PartitionCmd>,
        table: PathBuf,
        settings: MoveSettings,
        joining: bool,
    ) -> Arc<Self> {
        let (removed, _) = tokio::sync::watch::channel(false);
        let c = Arc::new(Self {
            throttle: Throttle::new(settings.bytes_per_sec),
            meta: meta.clone(),
            t,
            partitions,
            table,
            settings,
            progress: Mutex::new(Progress::default()),
            joining: std::sync::atomic::AtomicBool::new(joining),
            removed,
            last_load: Mutex::new(Instant::now() - Duration::from_secs(60)),
            wake: tokio::sync::Notify::new(),
            adopting: tokio::sync::Mutex::new(()),
        });
        // A committer asks this node, over the authenticated API, what it holds complete.
        let weak = Arc::downgrade(&c);
        meta.set_move_status(move |epoch| {
            let c = weak.upgrade()?;
            let p = c.progress.lock().unwrap_or_else(|e| e.into_inner());
            (p.epoch == epoch).then(|| p.streamed.iter().copied().collect())
        });
        c
    }

    fn me(&self) -> &str {
        &self.t.node_id
    }

    /// The loop: adopt newer tables, open and drop partitions, run moves, commit, publish.
    pub async fn run(self: Arc<Self>) {
        let mut changes = self.t.membership.subscribe();
        let mut grown = self.meta.subscribe();
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = changes.changed() => {}
                _ = grown.changed() => {}
                _ = self.t.ring_changed.notified() => {}
                _ = self.wake.notified() => {}
            }
            self.step().await;
            if *self.removed.borrow() {
                return;
            }
        }
    }

    /// One round of the loop.
    async fn step(self: &Arc<Self>) {
        self.sync_log().await;
        self.sync_ring().await;
        if self.joining.load(std::sync::atomic::Ordering::Acquire) {
            if self.t.ring().members().iter().any(|m| m == self.me()) {
                self.joining.store(false, std::sync::atomic::Ordering::Release);
            } else {
                self.ask_to_join().await;
            }
        }
        self.reconcile().await;
        self.start_moves();
        self.try_commit().await;
        self.publish().await;
    }

    /// Adopts the ring the metadata log ends with, when newer than the one in effect.
    async fn sync_ring(&self) {
        let spec = self.meta.ring();
        if spec.epoch > self.t.ring().epoch {
            tracing::info!(epoch = spec.epoch, members = %spec.members.join(","),
                target = %spec.target.as_ref().map(|t| t.join(",")).unwrap_or_default(), "adopting the ring decided in the metadata log");
            if let Err(e) = self.adopt(spec).await {
                tracing::warn!(error = %e, "could not adopt the newer ring");
            }
        }
    }

    /// Reads the metadata log from members whose gossip hints at a longer one (the decision is
    /// also pushed to every node when made; this catches up a node that missed it). Only ring
    /// members and target members are asked, at the log's addresses: a gossip participant
    /// outside the ring is never read from.
    pub async fn sync_log(&self) {
        let mine = self.meta.last();
        let ring = self.t.ring();
        let involved: BTreeSet<&String> = ring.members().iter().chain(ring.target_members()).collect();
        for m in self.t.membership.members() {
            if m.meta_index > mine && m.live && involved.contains(&m.node_id) && m.node_id != self.me() {
                if let Err(e) = self.meta.read_from(&m.node_id, None).await {
                    tracing::debug!(peer = %m.node_id, error = %e, "reading the metadata log failed");
                } else {
                    break;
                }
            }
        }
    }

    /// Makes `spec` this node's table, when newer than the one in effect.
    async fn adopt(&self, spec: RingSpec) -> Result<(), ChangeError> {
        let _one = self.adopting.lock().await;
        self.adopt_locked(spec).await
    }

    /// Persisted first, then in effect, then published. Partitions this node owns from now on
    /// and cannot serve yet (streamed here, or found unready after a restart) first catch up
    /// with every copy the previous table had, so nothing written around the change is missing
    /// when they turn readable; the old owners drop theirs only once this node publishes the
    /// new table (after that catch-up).
    async fn adopt_locked(&self, spec: RingSpec) -> Result<(), ChangeError> {
        let previous = self.t.ring();
        if !spec.newer_than(&previous.spec) {
            return Ok(());
        }
        let table = self.table.clone();
        let s = spec.clone();
        tokio::task::spawn_blocking(move || s.save(&table))
            .await
            .map_err(|e| ChangeError::Internal(e.to_string()))?
            .map_err(|e| ChangeError::Internal(e.to_string()))?;
        let ring = Arc::new(Ring::from_spec(spec));
        self.t.set_ring(ring.clone());
        let incoming = ring.incoming(self.me());
        {
            let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
            p.streamed.retain(|part| incoming.contains(part));
            p.epoch = ring.epoch;
        }
        let newly: Vec<(Part, Vec<String>)> = ring
            .owned_by(self.me())
            .into_iter()
            .filter(|p| self.t.local.is_open(*p) && !self.t.local.is_ready(*p))
            .map(|p| {
                let mut peers = previous.write_owners(p.role, p.partition);
                peers.extend(ring.owners(p.role, p.partition).iter().cloned());
                (p, peers)
            })
            .collect();
        if !newly.is_empty() {
            let c = replication::catch_up_from(&self.t, &newly, Duration::from_secs(60), replication::Mode::Full).await;
            tracing::info!(
                partitions = newly.len(),
                ops = c.ops_pulled,
                "partitions owned from now on caught up; readable"
            );
            for (p, _) in &newly {
                self.t.local.set_ready(*p, true);
            }
        }
        metrics::gauge!("recsys_ring_epoch").set(ring.epoch as f64);
        self.t.membership.set_ring(ring.epoch, &ring.digest, self.meta.last()).await;
        Ok(())
    }

    /// Every live node runs at least this node's epoch: nobody routes by an older table.
    fn all_live_caught_up(&self, ring: &Ring) -> bool {
        let involved: BTreeSet<&String> = ring.members().iter().chain(ring.target_members()).collect();
        self.t
            .membership
            .members()
            .iter()
            .filter(|m| m.live && involved.contains(&m.node_id))
            .all(|m| m.ring_epoch > ring.epoch || (m.ring_epoch == ring.epoch && m.ring_digest == ring.digest))
    }

    /// Names the change in progress for a refused proposal (the log says which one won).
    fn in_progress(&self, ring: &Ring) -> String {
        let what = self.meta.last_ring_change().map(|(i, c)| format!("`{c}`, log entry {i}")).unwrap_or_default();
        format!(
            "a membership change is in progress ({what}: {} → {}); try again when it completes",
            ring.members().join(","),
            ring.target_members().join(",")
        )
    }

    /// A node started with `--join` proposes itself once no other change is in progress.
    async fn ask_to_join(&self) {
        let ring = self.t.ring();
        if ring.members().iter().any(|m| m == self.me()) || ring.target_members().iter().any(|m| m == self.me()) {
            return;
        }
        if ring.in_transition() || !self.all_live_caught_up(&ring) {
            return;
        }
        match self.propose(Change::Join(self.me().to_string())).await {
            Ok(s) => tracing::info!(epoch = s.epoch, "asked to join: the ring now moves partitions here"),
            Err(e) => tracing::debug!(error = %e, "join not proposed yet"),
        }
    }

    /// Begins a membership change: decided in the metadata log by a majority of the members,
    /// or refused naming the change that won the slot (the Admin RPCs and joins).
    pub async fn propose(&self, change: Change) -> Result<RingSpec, ChangeError> {
        let _one = self.adopting.lock().await;
        // Build on the newest decided ring this node knows.
        let logged = self.meta.ring();
        if logged.epoch > self.t.ring().epoch {
            self.adopt_locked(logged).await?;
        }
        let ring = self.t.ring();
        let spec = &ring.spec;
        let members = &spec.members;
        let target: Vec<String> = match &change {
            Change::Join(n) => {
                if members.contains(n) || ring.target_members().contains(n) {
                    return Ok(spec.clone());
                }
                if ring.in_transition() {
                    return Err(ChangeError::Refused(self.in_progress(&ring)));
                }
                members.iter().cloned().chain([n.clone()]).collect()
            }
            Change::Drain(n) => {
                if !members.contains(n) {
                    if ring.target_members().contains(n) {
                        return Err(ChangeError::Refused(format!("node: `{n}` is still joining")));
                    }
                    return Err(ChangeError::NotMember(n.clone()));
                }
                if ring.in_transition() {
                    if !ring.target_members().contains(n) {
                        return Ok(spec.clone()); // already draining: idempotent
                    }
                    return Err(ChangeError::Refused(self.in_progress(&ring)));
                }
                if !self.t.membership.is_live(n) {
                    return Err(ChangeError::Refused(format!(
                        "node: `{n}` is down; a dead node is taken out with `recsys remove`"
                    )));
                }
                members.iter().filter(|m| *m != n).cloned().collect()
            }
            Change::Remove(n) => {
                let in_target = ring.target_members().contains(n);
                if !members.contains(n) && !in_target {
                    return Err(ChangeError::NotMember(n.clone()));
                }
                if self.t.membership.is_live(n) {
                    return Err(ChangeError::Refused(format!(
                        "node: `{n}` is alive; drain it instead (`recsys drain`), or stop it first"
                    )));
                }
                if ring.in_transition() && !in_target {
                    return Ok(spec.clone()); // already being removed
                }
                // Also replaces a change in progress that still counts on the dead node.
                ring.target_members().iter().filter(|m| *m != n).cloned().collect()
            }
        };
        if target.is_empty() {
            return Err(ChangeError::Invalid("node: the last member of a cluster cannot leave it".into()));
        }
        let mut next = spec.begin(&target);
        if let Change::Remove(n) = &change {
            if !next.removed.contains(n) {
                next.removed.push(n.clone());
                next.removed.sort();
            }
        }
        let what = match &change {
            Change::Join(n) => format!("join {n}"),
            Change::Drain(n) => format!("drain {n}"),
            Change::Remove(n) => format!("remove {n}"),
        };
        let decided = self.meta.propose(Entry::Ring(next.clone()), &what, Some(spec.epoch)).await;
        if let Err(e) = &decided {
            metrics::counter!("recsys_membership_changes_refused_total").increment(1);
            tracing::warn!(change = %what, error = %e, "membership change not decided");
        }
        decided?;
        self.adopt_locked(next.clone()).await?;
        metrics::counter!("recsys_membership_changes_begun_total").increment(1);
        Ok(next)
    }

    /// Opens the partitions this node must hold; drops those it no longer owns once every live
    /// node runs the table that moved them away. A drained node then stops.
    async fn reconcile(&self) {
        let ring = self.t.ring();
        let held: BTreeSet<Part> = ring.held_by(self.me()).into_iter().collect();
        for part in &held {
            if !self.t.local.is_open(*part) {
                let r = self.partitions.call(|rp| PartitionCmd::Open(*part, rp), Some(Duration::from_secs(60))).await;
                if !matches!(r, Ok(ractor::rpc::CallResult::Success(_))) {
                    tracing::warn!(part = %part, "could not open the partition here");
                }
            }
        }
        // Owned here but not readable (a partition whose move finished in an earlier process,
        // a commit adopted before its stream's progress was known): catch up with the other
        // owners, then serve it. Without this it would stay unreadable for good.
        let stuck: Vec<Part> = held
            .iter()
            .copied()
            .filter(|p| ring.owns(p.role, p.partition, self.me()))
            .filter(|p| self.t.local.is_open(*p) && !self.t.local.is_ready(*p))
            .collect();
        if !stuck.is_empty() {
            let c = replication::catch_up(&self.t, &stuck, Duration::from_secs(60)).await;
            if c.peers_failed == 0 {
                for p in &stuck {
                    self.t.local.set_ready(*p, true);
                }
                tracing::info!(partitions = stuck.len(), ops = c.ops_pulled, "owned partitions caught up; readable");
            }
        }
        let safe = self.all_live_caught_up(&ring);
        let mut dropped = 0;
        let mut kept = 0;
        for role in Role::ALL {
            for p in 0..ring.partitions {
                let part = Part::new(role, p);
                if held.contains(&part) || !self.t.local.is_open(part) || !safe {
                    continue;
                }
                if !self.handed_off(&ring, part).await {
                    kept += 1;
                    continue;
                }
                let r = self.partitions.call(|rp| PartitionCmd::Close(part, rp), Some(Duration::from_secs(60))).await;
                if matches!(r, Ok(ractor::rpc::CallResult::Success(_))) {
                    dropped += 1;
                    metrics::counter!("recsys_partitions_dropped_total").increment(1);
                }
            }
        }
        if dropped > 0 {
            tracing::info!(dropped, epoch = ring.epoch, "dropped partitions this node no longer owns");
        }
        metrics::gauge!("recsys_partitions_awaiting_handoff").set(kept as f64);
        let member =
            ring.members().iter().any(|m| m == self.me()) || ring.target_members().iter().any(|m| m == self.me());
        if !member && !self.joining.load(std::sync::atomic::Ordering::Acquire) && held.is_empty() && safe {
            let open = Role::ALL.iter().any(|r| (0..ring.partitions).any(|p| self.t.local.is_open(Part::new(*r, p))));
            if !open {
                tracing::info!(epoch = ring.epoch, "this node is no longer a member and holds nothing: stopping");
                self.removed.send_replace(true);
            }
        }
    }

    /// Whether every owner of `part` under `ring` holds every op of this node's copy, pushing
    /// what one lacks first: only then may the copy be dropped. A copy that cannot be handed off
    /// now (an owner down or unreachable) is kept and tried again later.
    async fn handed_off(&self, ring: &Ring, part: Part) -> bool {
        {
            let p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
            if p.handoff_at.get(&part).is_some_and(|at| *at > Instant::now()) {
                return false;
            }
        }
        let owners: Vec<String> =
            ring.owners(part.role, part.partition).iter().filter(|o| *o != self.me()).cloned().collect();
        let r = replication::hand_off(&self.t, part, &owners, Duration::from_secs(30)).await;
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        match r {
            Ok(pushed) => {
                p.handoff_at.remove(&part);
                if pushed > 0 {
                    tracing::info!(part = %part, pushed, "pushed ops the new owners lacked before dropping the copy");
                    metrics::counter!("recsys_handoff_ops_pushed_total").increment(pushed);
                }
                true
            }
            Err(e) => {
                tracing::info!(part = %part, error = %e, "copy kept: not every owner confirmed holding its ops yet");
                metrics::counter!("recsys_handoff_failures_total").increment(1);
                p.handoff_at.insert(part, Instant::now() + Duration::from_secs(2));
                false
            }
        }
    }

    /// Starts streams for incoming partitions, within the concurrency bound.
    fn start_moves(self: &Arc<Self>) {
        let ring = self.t.ring();
        if !ring.in_transition() || !self.all_live_caught_up(&ring) {
            return;
        }
        let incoming = ring.incoming(self.me());
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        for part in incoming {
            if p.running.len() >= self.settings.concurrency {
                break;
            }
            if p.streamed.contains(&part) || p.running.contains_key(&part) {
                continue;
            }
            if p.retry_at.get(&part).is_some_and(|(at, _)| *at > now) {
                continue;
            }
            let failures = p.retry_at.get(&part).map_or(0, |(_, n)| *n);
            // A current owner that is alive and serving reads of it.
            let sources: Vec<String> = ring
                .owners(part.role, part.partition)
                .iter()
                .filter(|o| *o != self.me() && self.t.membership.is_routable(o))
                .cloned()
                .collect();
            let Some(from) = (!sources.is_empty()).then(|| sources[failures % sources.len()].clone()) else {
                // No live copy: when every current owner is gone for good (removed), there is
                // nothing to stream; the partition starts empty here and the loss is counted.
                let gone = ring.owners(part.role, part.partition).iter().all(|o| ring.spec.removed.contains(o));
                if gone {
                    tracing::error!(part = %part, "no live replica holds this partition: it starts empty here");
                    metrics::counter!("recsys_partitions_lost_total").increment(1);
                    p.streamed.insert(part);
                }
                continue;
            };
            let report = MoveReport {
                role: part.role.as_str().to_string(),
                partition: part.partition,
                from: from.clone(),
                to: self.me().to_string(),
                ..Default::default()
            };
            p.running.insert(part, report);
            metrics::gauge!("recsys_moves_in_progress").set(p.running.len() as f64);
            let me = self.clone();
            let epoch = ring.epoch;
            tokio::spawn(async move {
                let started = Instant::now();
                let r = me.stream(part, &from, epoch).await;
                let mut p = me.progress.lock().unwrap_or_else(|e| e.into_inner());
                let report = p.running.remove(&part);
                match r {
                    Ok(()) => {
                        let bytes = report.map(|r| r.bytes_done).unwrap_or(0);
                        tracing::info!(part = %part, from = %from, bytes, ms = started.elapsed().as_millis() as u64, "partition streamed here");
                        metrics::counter!("recsys_moves_completed_total").increment(1);
                        p.streamed.insert(part);
                        p.retry_at.remove(&part);
                    }
                    Err(e) => {
                        tracing::warn!(part = %part, from = %from, error = %e, "partition stream failed; trying again");
                        metrics::counter!("recsys_move_failures_total").increment(1);
                        let n = p.retry_at.get(&part).map_or(0, |(_, n)| *n) + 1;
                        p.retry_at.insert(part, (Instant::now() + Duration::from_secs(1), n));
                    }
                }
                metrics::gauge!("recsys_moves_in_progress").set(p.running.len() as f64);
                drop(p);
                me.wake.notify_one();
            });
        }
    }

    /// Streams one partition's op log from `from`, then closes the gap with one anti-entropy
    /// round against the current owners.
    async fn stream(&self, part: Part, from: &str, epoch: u64) -> Result<(), String> {
        let client = self.t.peer(from).ok_or_else(|| format!("no address for {from}"))?;
        let mut batch = 0u64;
        let (mut bytes_done, mut ops_done) = (0u64, 0u64);
        let started = Instant::now();
        // Bounded: a partition of n batches takes n / (batches per chunk) rounds; the bound only
        // guards against a source whose log never ends (reaching it is a failure, not a success).
        let mut ended = false;
        for _ in 0..1_000_000 {
            if self.t.ring().epoch != epoch {
                // The change was replaced or committed meanwhile: stop; the loop decides again.
                if !self.t.ring().incoming(self.me()).contains(&part) {
                    return Err("the membership change moved on".into());
                }
            }
            let timeout = Duration::from_secs(10);
            let req = pb::StreamRequest {
                envelope: Some(self.t.envelope(timeout)),
                role: part.role as u32,
                partition: part.partition,
                from_batch: batch,
                max_bytes: self.settings.chunk_bytes,
            };
            let t0 = Instant::now();
            let reply = client.clone().stream(self.t.request(req, timeout)).await;
            self.t.observe(from, "stream", t0, reply.is_ok());
            let reply = reply.map_err(|s| format!("{from}: {}", s.message()))?.into_inner();
            let size = reply.body.len();
            let ops: Vec<LoggedOp> = decode(&reply.body)?;
            ops_done += ops.len() as u64;
            bytes_done += size as u64;
            metrics::counter!("recsys_move_bytes_total").increment(size as u64);
            if !ops.is_empty() {
                let (results, _) = self.t.local.apply(vec![(part, Arc::new(ops))], |_| true).await;
                for (_, r) in results {
                    r.map_err(|e| format!("applying streamed ops: {e}"))?;
                }
            }
            let total = if ops_done > 0 && reply.ops_total > ops_done {
                bytes_done * reply.ops_total / ops_done
            } else {
                bytes_done
            };
            let rate = bytes_done as f64 / started.elapsed().as_secs_f64().max(1e-3);
            {
                let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(r) = p.running.get_mut(&part) {
                    r.bytes_done = bytes_done;
                    r.bytes_total = total;
                    r.eta_ms = ((total.saturating_sub(bytes_done)) as f64 / rate * 1000.0) as u64;
                }
            }
            if reply.done {
                ended = true;
                break;
            }
            batch = reply.next_batch;
            let wait = self.throttle.charge(size);
            if !wait.is_zero() {
                // The throttle itself: a pause between chunks, not a synchronisation.
                tokio::time::sleep(wait).await;
            }
        }
        if !ended {
            return Err(format!("the stream from {from} did not end"));
        }
        // Consistent range movement: every previous owner that was not removed, alive or not.
        let ring = self.t.ring();
        let previous: Vec<String> = ring
            .owners(part.role, part.partition)
            .iter()
            .filter(|o| *o != self.me() && !ring.spec.removed.contains(o))
            .cloned()
            .collect();
        let down: Vec<&String> = previous.iter().filter(|o| !self.t.membership.takes_writes(o)).collect();
        if !down.is_empty() {
            if self.settings.consistent {
                return Err(format!(
                    "previous owner(s) {} down: the move waits for them (they may hold acknowledged writes)",
                    down.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",")
                ));
            }
            tracing::warn!(part = %part, down = ?down, "consistent_range_movement is off: completing without a down previous owner");
            metrics::counter!("recsys_inconsistent_moves_total").increment(1);
        }
        let c =
            replication::catch_up_from(&self.t, &[(part, previous)], Duration::from_secs(30), replication::Mode::Full)
                .await;
        if c.peers_failed > 0 {
            return Err(format!("closing catch-up: {} replica(s) did not answer", c.peers_failed));
        }
        Ok(())
    }

    /// The lowest-id live node of the change commits it once every new owner is done.
    async fn try_commit(&self) {
        let ring = self.t.ring();
        if !ring.in_transition() {
            return;
        }
        let involved: BTreeSet<&String> = ring.members().iter().chain(ring.target_members()).collect();
        let committer = involved.iter().find(|n| **n == self.me() || self.t.membership.is_live(n));
        if committer.map(|c| c.as_str()) != Some(self.me()) {
            return;
        }
        for n in ring.target_members() {
            let incoming = ring.incoming(n);
            if incoming.is_empty() {
                continue;
            }
            let done = if n == self.me() {
                let p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
                p.epoch == ring.epoch && incoming.iter().all(|x| p.streamed.contains(x))
            } else {
                // Asked over the authenticated internal API: gossip's progress is for display.
                match self.meta.call(n, None, MetaMsg::MoveStatus { epoch: ring.epoch }).await {
                    Ok(MetaReply::MoveStatus { epoch, done }) if epoch == ring.epoch => {
                        let set: BTreeSet<Part> = done.into_iter().collect();
                        incoming.iter().all(|x| set.contains(x))
                    }
                    _ => false,
                }
            };
            if !done {
                return;
            }
        }
        let next = ring.spec.commit();
        let _one = self.adopting.lock().await;
        if self.t.ring().epoch != ring.epoch {
            return; // the ring moved on meanwhile
        }
        tracing::info!(epoch = next.epoch, members = %next.members.join(","), "every partition has reached its new owners: committing the ring");
        let what = format!("commit epoch {} ({})", next.epoch, next.members.join(","));
        match self.meta.propose(Entry::Ring(next.clone()), &what, Some(ring.epoch)).await {
            Ok(_) => {
                metrics::counter!("recsys_membership_changes_committed_total").increment(1);
                if let Err(e) = self.adopt_locked(next).await {
                    tracing::warn!(error = %e, "commit failed");
                }
            }
            Err(e) => tracing::info!(error = %e, "commit not decided here"),
        }
    }

    async fn publish(&self) {
        let ring = self.t.ring();
        let (done, moves) = {
            let p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
            let done = format_done(ring.epoch, p.streamed.iter().copied(), ring.partitions);
            let moves = serde_json::to_string(&p.running.values().collect::<Vec<_>>()).unwrap_or_default();
            (done, moves)
        };
        self.t.membership.set_moves(&done, &moves).await;
        let due = {
            let mut l = self.last_load.lock().unwrap_or_else(|e| e.into_inner());
            let due = l.elapsed() >= Duration::from_secs(2);
            if due {
                *l = Instant::now();
            }
            due
        };
        if due {
            let (cpu, rss) = crate::metrics::process_stats();
            self.t.membership.set_load(rss, cpu).await;
        }
    }

    /// This node is a member with every partition it owns readable (a joined node serves).
    pub fn serving_member(&self) -> bool {
        let ring = self.t.ring();
        ring.members().iter().any(|m| m == self.me())
            && Role::ALL
                .iter()
                .all(|r| ring.partitions_of(*r, self.me()).into_iter().all(|p| self.t.local.is_ready(Part::new(*r, p))))
    }

    /// Moves in progress in the cluster, as the live nodes publish them.
    pub fn moves(&self) -> Vec<MoveReport> {
        let mut out = Vec::new();
        for m in self.t.membership.members() {
            if !m.live || m.moves.is_empty() {
                continue;
            }
            if let Ok(v) = serde_json::from_str::<Vec<MoveReport>>(&m.moves) {
                out.extend(v);
            }
        }
        out.sort_by(|a, b| (&a.to, &a.role, a.partition).cmp(&(&b.to, &b.role, b.partition)));
        out
    }
}

/// `epoch:i,i,…` with i = the partition's dense index.
fn format_done(epoch: u64, parts: impl Iterator<Item = Part>, partitions: u32) -> String {
    let idx: Vec<String> = parts.map(|p| p.index(partitions).to_string()).collect();
    format!("{epoch}:{}", idx.join(","))
}

#[cfg(test)]
fn parse_done(s: &str, epoch: u64, partitions: u32) -> Option<BTreeSet<Part>> {
    let (e, rest) = s.split_once(':')?;
    if e.parse::<u64>().ok()? != epoch {
        return Some(BTreeSet::new());
    }
    rest.split(',').filter(|x| !x.is_empty()).map(|i| Part::from_index(i.parse().ok()?, partitions)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_sets_round_trip_and_ignore_other_epochs() {
        let parts = [Part::new(Role::Generator, 3), Part::new(Role::Feature, 0), Part::new(Role::Feature, 15)];
        let s = format_done(7, parts.iter().copied(), 16);
        let back = parse_done(&s, 7, 16).unwrap();
        assert_eq!(back, parts.iter().copied().collect());
        assert!(parse_done(&s, 8, 16).unwrap().is_empty(), "progress of another change does not count");
        assert_eq!(parse_done("", 7, 16), None);
        assert_eq!(parse_done("7:999", 7, 16), None, "an index out of range is refused");
    }

    #[test]
    fn throttle_charges_debt_at_its_rate() {
        let t = Throttle::new(1_000_000);
        assert_eq!(t.charge(500_000), Duration::ZERO, "within the first second's allowance");
        let wait = t.charge(1_500_000);
        assert!(wait >= Duration::from_millis(900) && wait <= Duration::from_millis(1100), "{wait:?}");
    }
}
