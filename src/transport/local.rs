//! This node's partition actors, reached directly (no serialization). Also the node-side half of
//! the write path: ops are logged in sled (atomically per op id), flushed once per call, then
//! applied to the actors.
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use ractor::rpc::CallResult;
use ractor::{ActorRef, RpcReplyPort};

use super::{CallError, ReadQuery, ReadReply};
use crate::domain::{LoggedOp, Part, Role};
use crate::features::shard::FeatureMsg;
use crate::generators::GeneratorMsg;
use crate::store::Store;
use crate::supervision::ReadTicket;

/// Applying logged ops to an actor is local work; a generous bound only guards a wedged actor.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// Reads waiting on one partition's actor at once. Beyond it a read is refused at once
/// (RESOURCE_EXHAUSTED: the coordinator goes to a replica or degrades) instead of queueing
/// behind work whose callers may have given up: a slow partition's mailbox stays bounded.
pub const MAX_QUEUED_READS: usize = 1024;

/// Per-partition admission of reads: a count of the reads each partition's mailbox holds. A
/// read's `ReadTicket` travels in its message and frees the slot when the actor has handled it
/// (or skipped it: its caller gave up), so the count is what the mailbox holds.
struct ReadSlots(Vec<Arc<AtomicUsize>>);

impl ReadSlots {
    fn new(n: usize) -> Self {
        Self((0..n).map(|_| Arc::new(AtomicUsize::new(0))).collect())
    }

    /// A slot of partition `i`, or None when `MAX_QUEUED_READS` reads are queued on it already.
    fn admit(&self, i: usize) -> Option<ReadTicket> {
        ReadTicket::admit(self.0.get(i)?, MAX_QUEUED_READS)
    }
}

pub struct LocalPartitions {
    pub node_id: String,
    pub partitions: u32,
    pub store: Store,
    // Swapped when a supervisor restarts a partition; never held across an await.
    generators: RwLock<Vec<Option<ActorRef<GeneratorMsg>>>>,
    features: RwLock<Vec<Option<ActorRef<FeatureMsg>>>>,
    /// Serves reads: false while the partition catches up with its replicas.
    ready: Vec<AtomicBool>,
    /// Reads each partition's actor owes (bounded: `MAX_QUEUED_READS`).
    queued: ReadSlots,
    /// Completed anti-entropy rounds (status: lets an operator or a test see catch-up progress).
    pub catch_up_rounds: std::sync::atomic::AtomicU64,
    /// Injected faults (chaos tests); none until the node sets its registry.
    faults: std::sync::OnceLock<Arc<crate::chaos::Faults>>,
}

pub type ApplyResults = Vec<(Part, Result<Vec<bool>, String>)>;

impl LocalPartitions {
    pub fn new(node_id: String, partitions: u32, store: Store) -> Self {
        let n = partitions as usize;
        Self {
            node_id,
            partitions,
            store,
            generators: RwLock::new(vec![None; n]),
            features: RwLock::new(vec![None; n]),
            ready: (0..2 * n).map(|_| AtomicBool::new(false)).collect(),
            queued: ReadSlots::new(2 * n),
            catch_up_rounds: Default::default(),
            faults: std::sync::OnceLock::new(),
        }
    }

    /// Installs the node's fault registry (once, at start).
    pub fn set_faults(&self, f: Arc<crate::chaos::Faults>) {
        let _ = self.faults.set(f);
    }

    /// The node's fault registry (a disabled one before `set_faults`).
    pub fn faults(&self) -> &crate::chaos::Faults {
        static NONE: std::sync::OnceLock<crate::chaos::Faults> = std::sync::OnceLock::new();
        self.faults.get().map(|f| &**f).unwrap_or_else(|| NONE.get_or_init(crate::chaos::Faults::disabled))
    }

    pub fn set_generator(&self, p: u32, a: Option<ActorRef<GeneratorMsg>>) {
        self.generators.write().unwrap_or_else(|e| e.into_inner())[p as usize] = a;
    }
    pub fn set_feature(&self, p: u32, a: Option<ActorRef<FeatureMsg>>) {
        self.features.write().unwrap_or_else(|e| e.into_inner())[p as usize] = a;
    }
    pub fn generator_actor(&self, p: u32) -> Option<ActorRef<GeneratorMsg>> {
        self.generators.read().unwrap_or_else(|e| e.into_inner()).get(p as usize).cloned().flatten()
    }
    pub fn feature_actor(&self, p: u32) -> Option<ActorRef<FeatureMsg>> {
        self.features.read().unwrap_or_else(|e| e.into_inner()).get(p as usize).cloned().flatten()
    }

    /// An actor runs for the partition (writes can be applied).
    pub fn is_open(&self, part: Part) -> bool {
        match part.role {
            Role::Feature => self.feature_actor(part.partition).is_some(),
            Role::Generator => self.generator_actor(part.partition).is_some(),
        }
    }

    /// Open and caught up: reads may be served from it.
    pub fn is_ready(&self, part: Part) -> bool {
        self.ready.get(part.index(self.partitions)).is_some_and(|r| r.load(Ordering::Acquire)) && self.is_open(part)
    }

    pub fn set_ready(&self, part: Part, ready: bool) {
        if let Some(r) = self.ready.get(part.index(self.partitions)) {
            r.store(ready, Ordering::Release);
        }
    }

    pub async fn read(&self, part: Part, q: ReadQuery, timeout: Duration) -> Result<ReadReply, CallError> {
        if !self.is_ready(part) {
            let why = if self.is_open(part) { "catching up" } else { "not open on this node" };
            return Err(CallError::Unavailable { part, reason: format!("{why} ({})", self.node_id) });
        }
        let Some(ticket) = self.queued.admit(part.index(self.partitions)) else {
            metrics::counter!("recsys_partition_reads_shed_total", "role" => part.role.as_str()).increment(1);
            return Err(CallError::Overloaded { part, queued: MAX_QUEUED_READS });
        };
        if let Some(d) = self.faults().read_delay(part) {
            // An injected delay (chaos tests) is part of the reply time; the caller's deadline
            // still bounds the whole call.
            if d >= timeout {
                tokio::time::sleep(timeout).await;
                return Err(CallError::Timeout { part });
            }
            tokio::time::sleep(d).await;
        }
        let p = part.partition;
        match (part.role, q) {
            (Role::Feature, ReadQuery::Profile(user)) => self
                .feature(part, timeout, move |rp| FeatureMsg::Profile(user, rp, ticket))
                .await
                .map(|s| ReadReply::Profile(Box::new(s))),
            (Role::Feature, ReadQuery::Briefs(keys, wants)) => self
                .feature(part, timeout, move |rp| FeatureMsg::Briefs(keys, wants, rp, ticket))
                .await
                .map(ReadReply::Briefs),
            (Role::Feature, ReadQuery::Hydrate { keys, feats, user_emb, now }) => self
                .feature(part, timeout, move |reply| FeatureMsg::Hydrate { keys, feats, user_emb, now, reply, ticket })
                .await
                .map(|(b, r)| ReadReply::Hydrate(b, r)),
            (Role::Feature, ReadQuery::RecentLikes(users)) => self
                .feature(part, timeout, move |rp| FeatureMsg::RecentLikes(users, rp, ticket))
                .await
                .map(ReadReply::RecentLikes),
            (Role::Generator, ReadQuery::Retrieve(q)) => {
                let actor = self.generator_actor(p).ok_or_else(|| self.not_here(part))?;
                call(&actor, part, timeout, move |rp| GeneratorMsg::Retrieve(q, rp, ticket))
                    .await
                    .map(ReadReply::Retrieve)
            }
            (_, q) => Err(CallError::Unavailable {
                part,
                reason: format!("{} is not a {} query", q.kind(), part.role.as_str()),
            }),
        }
    }

    /// A hash of the partition's whole state (read-only checks; the partition must be open).
    pub async fn state_hash(&self, part: Part, timeout: Duration) -> Result<[u8; 32], CallError> {
        match part.role {
            Role::Feature => self
                .feature(part, timeout, FeatureMsg::StateHash)
                .await?
                .map_err(|reason| CallError::Unavailable { part, reason }),
            Role::Generator => {
                let actor = self.generator_actor(part.partition).ok_or_else(|| self.not_here(part))?;
                call(&actor, part, timeout, GeneratorMsg::StateHash).await
            }
        }
    }

    async fn feature<T: Send + 'static>(
        &self,
        part: Part,
        timeout: Duration,
        build: impl FnOnce(RpcReplyPort<T>) -> FeatureMsg,
    ) -> Result<T, CallError> {
        let actor = self.feature_actor(part.partition).ok_or_else(|| self.not_here(part))?;
        call(&actor, part, timeout, build).await
    }

    fn not_here(&self, part: Part) -> CallError {
        CallError::Unavailable { part, reason: format!("no partition actor on {}", self.node_id) }
    }

    /// Each partition's actor logs (idempotently by op id) and applies its ops in one handler;
    /// then one flush for the whole call, before the caller acknowledges anything. Partitions
    /// without a running actor are refused (the write reaches them later by hinted handoff or
    /// anti-entropy).
    pub async fn apply(
        &self,
        asks: Vec<(Part, Arc<Vec<LoggedOp>>)>,
        owned: impl Fn(Part) -> bool,
    ) -> (ApplyResults, u64) {
        let calls = asks.into_iter().map(|(part, ops)| {
            let owned = owned(part);
            async move {
                if !owned {
                    return (part, Err(format!("{part} is not owned by {}", self.node_id)));
                }
                let r = match part.role {
                    Role::Feature => match self.feature_actor(part.partition) {
                        Some(a) => call(&a, part, APPLY_TIMEOUT, move |rp| FeatureMsg::Apply(ops, rp)).await,
                        None => Err(self.not_here(part)),
                    },
                    Role::Generator => match self.generator_actor(part.partition) {
                        Some(a) => call(&a, part, APPLY_TIMEOUT, move |rp| GeneratorMsg::Apply(ops, rp)).await,
                        None => Err(self.not_here(part)),
                    },
                };
                (part, r.map_err(|e| e.to_string()).and_then(|inner| inner))
            }
        });
        let mut results: ApplyResults = futures::future::join_all(calls).await;
        if !results.iter().any(|(_, r)| r.is_ok()) {
            return (results, 0);
        }
        let t = Instant::now();
        if let Err(e) = self.store.flush().await {
            for (_, r) in results.iter_mut() {
                if r.is_ok() {
                    *r = Err(format!("flush failed: {e}"));
                }
            }
            return (results, 0);
        }
        let flush = t.elapsed();
        metrics::histogram!("recsys_flush_seconds").record(flush.as_secs_f64());
        (results, flush.as_micros() as u64)
    }
}

async fn call<M: ractor::Message, T: Send + 'static>(
    actor: &ActorRef<M>,
    part: Part,
    timeout: Duration,
    build: impl FnOnce(RpcReplyPort<T>) -> M,
) -> Result<T, CallError> {
    match actor.call(build, Some(timeout)).await {
        Ok(CallResult::Success(v)) => Ok(v),
        Ok(CallResult::Timeout) => Err(CallError::Timeout { part }),
        Ok(CallResult::SenderError) => {
            Err(CallError::Unavailable { part, reason: "partition actor dropped the call".into() })
        }
        Err(e) => Err(CallError::Unavailable { part, reason: e.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_admits_a_bounded_number_of_reads_and_frees_each_slot() {
        let slots = ReadSlots::new(2);
        let held: Vec<_> = (0..MAX_QUEUED_READS).map(|_| slots.admit(0).expect("within the bound")).collect();
        assert!(slots.admit(0).is_none(), "one more read than the bound is refused");
        assert!(slots.admit(1).is_some(), "another partition is not affected");
        drop(held);
        assert_eq!(slots.0[0].load(Ordering::Acquire), 0);
        assert!(slots.admit(0).is_some());
        assert!(slots.admit(7).is_none(), "no such partition");
    }

    /// An actor that takes 300 ms per message: a read queued on it outlives its caller's wait.
    struct Slow;

    impl ractor::Actor for Slow {
        type Msg = (RpcReplyPort<()>, ReadTicket);
        type State = ();
        type Arguments = ();
        async fn pre_start(&self, _: ActorRef<Self::Msg>, _: ()) -> Result<(), ractor::ActorProcessingErr> {
            Ok(())
        }
        async fn handle(
            &self,
            _: ActorRef<Self::Msg>,
            (reply, _ticket): Self::Msg,
            _: &mut (),
        ) -> Result<(), ractor::ActorProcessingErr> {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let _ = reply.send(());
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_reads_slot_is_held_until_the_partition_handled_it_not_until_its_caller_gave_up() {
        let slots = ReadSlots::new(1);
        let (actor, handle) = ractor::Actor::spawn(None, Slow, ()).await.unwrap();
        let part = Part::new(Role::Feature, 0);
        let ticket = slots.admit(0).unwrap();
        let r = call(&actor, part, Duration::from_millis(20), move |rp| (rp, ticket)).await;
        assert!(matches!(r, Err(CallError::Timeout { .. })), "{r:?}");
        assert_eq!(slots.0[0].load(Ordering::Acquire), 1, "the caller gave up, the mailbox still holds the read");
        let end = Instant::now() + Duration::from_secs(5);
        while slots.0[0].load(Ordering::Acquire) != 0 {
            assert!(Instant::now() < end, "the slot was never given back");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        actor.stop(None);
        handle.await.unwrap();
    }
}
