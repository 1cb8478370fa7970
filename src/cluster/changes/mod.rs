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
//!
//! Where things are: `mod.rs` (the controller and its loop), `propose.rs` (begin a change),
//! `adopt.rs` (follow the decided ring), `moves.rs` (stream partitions here), `reconcile.rs`
//! (open, hand off and drop copies), `commit.rs` (end a change), `progress.rs` (what is moving).
mod adopt;
mod commit;
mod moves;
mod progress;
mod propose;
mod reconcile;

pub use progress::MoveReport;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::ActorRef;

use super::metalog::{MetaError, MetaLog};
use crate::domain::{Part, Role};
use crate::transport::Transport;

use moves::Throttle;
use progress::Progress;

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

/// What an operator asked for.
#[derive(Debug, Clone)]
pub enum Change {
    Join(String),
    Drain(String),
    Remove(String),
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

    /// This node is a member with every partition it owns readable (a joined node serves).
    pub fn serving_member(&self) -> bool {
        let ring = self.t.ring();
        ring.members().iter().any(|m| m == self.me())
            && Role::ALL
                .iter()
                .all(|r| ring.partitions_of(*r, self.me()).into_iter().all(|p| self.t.local.is_ready(Part::new(*r, p))))
    }
}
