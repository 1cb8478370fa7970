//! The feature partition as a ractor actor: its messages, logging ops before applying them,
//! and the rebuild from the op log when incremental application cannot decide.
use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

use super::super::ItemFeat;
use super::extract::{BriefWants, ItemBrief, ItemFeatureRows};
use super::profile::UserSnapshot;
use super::state::{FeatureShardState, ShardCounts};
use crate::domain::{LoggedOp, Op};
use crate::ids::Key;
use crate::supervision::ReadTicket;

pub enum FeatureMsg {
    /// Ops to log (those whose ids the partition has not seen) and apply; replies per op
    /// whether it was new. Logging and applying happen in this one handler, so a crash between
    /// them is repaired by the rebuild's replay and nothing else can interleave.
    Apply(Arc<Vec<LoggedOp>>, RpcReplyPort<Result<Vec<bool>, String>>),
    /// Item state per key, with the optional parts asked for.
    Briefs(Vec<Key>, BriefWants, RpcReplyPort<Vec<Option<ItemBrief>>>, ReadTicket),
    /// Per user, the recent likes with their event times, flattened as
    /// `[item, ts as u64, item, ts, ...]` newest first (`timed_likes`): the write path derives an
    /// event's partners from the likes *older* than it, which a retry derives again.
    RecentLikes(Vec<Key>, RpcReplyPort<Vec<Vec<Key>>>, ReadTicket),
    Profile(Key, RpcReplyPort<UserSnapshot>, ReadTicket),
    /// Item state (for the filters) and item feature rows (for the survivors) of the same keys in
    /// one call: the filter and feature stages ask the same partitions for the same candidates.
    Hydrate {
        keys: Vec<Key>,
        feats: Arc<Vec<ItemFeat>>,
        /// The requesting user's embedding, for the cosine cross feature.
        user_emb: Arc<[f32]>,
        now: i64,
        reply: RpcReplyPort<(Vec<Option<ItemBrief>>, ItemFeatureRows)>,
        /// Held until this message is handled (the partition's bounded read queue).
        ticket: ReadTicket,
    },
    /// Records held by the partition and its unknown-user bookkeeping.
    Counts(RpcReplyPort<ShardCounts>),
    /// A hash of the whole partition state (`FeatureShardState::state_hash`) as it is served:
    /// copies holding one op set answer the same (read-only checks compare them). An error while
    /// a rebuild is pending (the state is not yet the op set's).
    StateHash(RpcReplyPort<Result<[u8; 32], String>>),
    /// Runs a rebuild deferred by `REBUILD_SPACING` (sent to itself, so a partition that stops
    /// receiving writes still gets it).
    Rebuild,
    /// Test hook for supervision: the handler panics, the supervisor restarts the partition.
    Crash,
}

/// Arguments: the partition number and a loader that rebuilds the partition's state from the
/// durable store (used at first start and after a crash restart).
pub struct FeatureShardArgs {
    pub partition: u32,
    /// The node's store: `Apply` logs here before applying (None: apply only, for tests).
    pub log: Option<crate::store::Store>,
    /// State built by the node's startup replay; None rebuilds this partition from the store.
    pub initial: Option<FeatureShardState>,
    pub load: Arc<dyn Fn(u32) -> FeatureShardState + Send + Sync>,
}

pub struct FeatureShard;

/// The actor's state: the partition and where its op log lives.
pub struct FeatureActorState {
    pub state: FeatureShardState,
    log: Option<(crate::store::Store, crate::domain::Part)>,
    partition: u32,
    load: Arc<dyn Fn(u32) -> FeatureShardState + Send + Sync>,
    /// When the state was last rebuilt for `needs_rebuild` (rebuilds are spaced by
    /// `REBUILD_SPACING`; the flag stays set in between).
    rebuilt_at: Option<std::time::Instant>,
    /// A `Rebuild` is on its way (sent to itself after the spacing).
    rebuild_scheduled: bool,
}

/// Least time between two rebuilds of one partition for `needs_rebuild` (each replays the
/// partition's log): a burst of promotions costs one rebuild, not one each.
const REBUILD_SPACING: std::time::Duration = std::time::Duration::from_secs(2);

/// Moves the node's clock past the upsert versions a replica applies (see `domain::ops::Hlc`).
fn observe_versions(ops: &[LoggedOp]) {
    let wall = crate::clock::unix_ms();
    if let Some((at, seq, _)) = ops.iter().filter_map(Op::version).max() {
        crate::domain::ops::CLOCK.observe(wall, at, seq);
    }
}

/// Logs the new ops (blocking sled work, moved off the async worker) and returns the new flags.
pub(crate) fn log_ops(
    log: &Option<(crate::store::Store, crate::domain::Part)>,
    ops: &[LoggedOp],
) -> Result<Vec<bool>, String> {
    match log {
        None => Ok(vec![true; ops.len()]),
        Some((store, part)) => tokio::task::block_in_place(|| store.append(*part, ops)).map_err(|e| e.to_string()),
    }
}

impl FeatureActorState {
    /// Rebuilds the state from the partition's op log. The log holds every op applied (logged
    /// before applying): the rebuilt state is this op set's, as any replica holding it has.
    fn rebuild(&mut self) {
        metrics::counter!("recsys_partition_rebuilds_total").increment(1);
        let (load, p) = (self.load.clone(), self.partition);
        let fresh = tokio::task::block_in_place(|| load(p));
        metrics::gauge!("recsys_unknown_users").increment(fresh.unknown_live as f64 - self.state.unknown_live as f64);
        self.state = fresh;
        self.rebuilt_at = Some(std::time::Instant::now());
    }
}

impl Actor for FeatureShard {
    type Msg = FeatureMsg;
    type State = FeatureActorState;
    type Arguments = FeatureShardArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: Self::Arguments,
    ) -> Result<Self::State, ActorProcessingErr> {
        let log = args.log.map(|s| (s, crate::domain::Part::new(crate::domain::Role::Feature, args.partition)));
        let (partition, load) = (args.partition, args.load.clone());
        let state = match args.initial {
            Some(state) => state,
            None => {
                let load = args.load.clone();
                let p = args.partition;
                // The reload scans sled: blocking work, off the async workers.
                tokio::task::spawn_blocking(move || load(p)).await?
            }
        };
        metrics::gauge!("recsys_unknown_users").increment(state.unknown_live as f64);
        Ok(FeatureActorState { state, log, partition, load, rebuilt_at: None, rebuild_scheduled: false })
    }

    async fn post_stop(&self, _myself: ActorRef<Self::Msg>, actor: &mut Self::State) -> Result<(), ActorProcessingErr> {
        metrics::gauge!("recsys_unknown_users").decrement(actor.state.unknown_live as f64);
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        actor: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let st = &mut actor.state;
        match msg {
            FeatureMsg::Apply(ops, reply) => {
                let res = log_ops(&actor.log, &ops);
                let before = (st.unknown_live, st.unknown_evicted);
                if let Ok(flags) = &res {
                    for (o, _) in ops.iter().zip(flags).filter(|(_, new)| **new) {
                        st.apply(o);
                    }
                    observe_versions(&ops);
                }
                let _ = reply.send(res);
                if (st.unknown_live, st.unknown_evicted) != before {
                    metrics::gauge!("recsys_unknown_users").increment(st.unknown_live as f64 - before.0 as f64);
                    metrics::counter!("recsys_unknown_users_evicted_total")
                        .increment(st.unknown_evicted.saturating_sub(before.1));
                }
                if st.needs_rebuild() {
                    match actor.rebuilt_at.map(|t| t.elapsed()) {
                        Some(since) if since < REBUILD_SPACING => {
                            if !actor.rebuild_scheduled {
                                actor.rebuild_scheduled = true;
                                myself.send_after(REBUILD_SPACING - since, || FeatureMsg::Rebuild);
                            }
                        }
                        _ => actor.rebuild(),
                    }
                }
            }
            FeatureMsg::Rebuild => {
                actor.rebuild_scheduled = false;
                if st.needs_rebuild() {
                    actor.rebuild();
                }
            }
            FeatureMsg::Briefs(keys, wants, reply, _ticket) => {
                if crate::supervision::caller_gone(&reply, "feature") {
                    return Ok(());
                }
                let _ = reply.send(keys.iter().map(|k| st.brief(*k, wants)).collect());
            }
            FeatureMsg::RecentLikes(users, reply, _ticket) => {
                if crate::supervision::caller_gone(&reply, "feature") {
                    return Ok(());
                }
                let _ = reply.send(users.iter().map(|u| st.timed_likes(*u)).collect());
            }
            FeatureMsg::Profile(user, reply, _ticket) => {
                if crate::supervision::caller_gone(&reply, "feature") {
                    return Ok(());
                }
                let _ = reply.send(st.snapshot(user));
            }
            FeatureMsg::Hydrate { keys, feats, user_emb, now, reply, ticket: _ticket } => {
                if crate::supervision::caller_gone(&reply, "feature") {
                    return Ok(());
                }
                let briefs = keys.iter().map(|k| st.brief(*k, BriefWants::default())).collect();
                let _ = reply.send((briefs, st.item_features(&keys, &feats, &user_emb, now)));
            }
            FeatureMsg::Counts(reply) => {
                let _ = reply.send(st.counts());
            }
            FeatureMsg::StateHash(reply) => {
                if reply.is_closed() {
                    return Ok(());
                }
                let r = if st.needs_rebuild() {
                    Err("a rebuild is pending (the state is not yet its op set's)".to_string())
                } else {
                    // Hashing the whole partition is CPU work of a few ms per 10k records.
                    Ok(tokio::task::block_in_place(|| st.state_hash()))
                };
                let _ = reply.send(r);
            }
            FeatureMsg::Crash => panic!("crash requested for a supervision test"),
        }
        Ok(())
    }
}
