//! Fan-out with per-node budgets and replica retry. Reads: each partition goes to its preferred
//! replica (this node when it holds one, else the first live owner in ring order), one call per
//! node; a node that errors or misses its budget has its partitions retried on the next replica
//! while time remains; what is still missing is reported, never waited for. Writes: every live
//! replica of each partition, acknowledged when all that were asked answered and at least one
//! made it durable.
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{CallError, ReadQuery, ReadReply, Transport};
use crate::cluster::Ring;
use crate::domain::{LoggedOp, Part, Plan, Role};
use crate::features::shard::{BriefWants, ItemBrief};
use crate::ids::{self, partition_of, Key, KeyMap};

/// What one stage asked and got, for the reply's coverage.
#[derive(Debug, Default, Clone)]
pub struct StageCoverage {
    pub stage: &'static str,
    pub asked: u32,
    pub answered: u32,
    pub missing: Vec<u32>,
    /// Answered by a replica other than the preferred one.
    pub from_replica: Vec<u32>,
    pub failed_nodes: Vec<String>,
}

pub struct ReadOutcome {
    pub replies: Vec<(Part, ReadReply)>,
    pub coverage: StageCoverage,
}

/// Share of the time left that a first attempt may use when a partition has another replica to
/// fall back on: a slow node then still leaves time for the retry.
const FIRST_TRY_SHARE: f64 = 0.6;

/// Node ids borrow from the ring: no allocation per partition per stage.
struct Pending<'r> {
    part: Part,
    /// Taken (not cloned) by the attempt on the last candidate: no copy of the keys unless a
    /// retry is possible.
    query: Option<ReadQuery>,
    candidates: VecDeque<&'r str>,
    preferred: &'r str,
}

impl Transport {
    /// Replicas to try for a read, best first: this node when it holds the partition and is
    /// caught up, then the owners that are alive and serving, ordered by a per-call `seed`. One
    /// seed for all partitions of a stage makes them prefer the same peers, so a stage calls as
    /// few nodes as it can (with three nodes and R = 2, every partition this node lacks is on both
    /// others: one call instead of two), while different requests spread over the replicas.
    pub fn read_candidates<'r>(&'r self, ring: &'r Ring, part: Part, seed: u64) -> (&'r str, VecDeque<&'r str>) {
        let owners = ring.owners(part.role, part.partition);
        let me_owner = owners.contains(&self.node_id);
        let rank = |n: &str| {
            let mut h = crate::ids::key_of(n) ^ seed;
            h ^= h >> 33;
            h.wrapping_mul(0xff51_afd7_ed55_8ccd)
        };
        let mut others: Vec<&str> = owners.iter().map(|o| o.as_str()).filter(|o| *o != self.node_id).collect();
        others.sort_by_key(|o| rank(o));
        let preferred = if me_owner { self.node_id.as_str() } else { others.first().copied().unwrap_or("") };
        let mut c = VecDeque::with_capacity(owners.len());
        if me_owner && self.local.is_ready(part) {
            c.push_back(self.node_id.as_str());
        }
        c.extend(others.into_iter().filter(|o| self.membership.is_routable(o)));
        (preferred, c)
    }

    pub async fn read_fanout(
        &self,
        stage: &'static str,
        asks: Vec<(Part, ReadQuery)>,
        deadline: Instant,
    ) -> ReadOutcome {
        let mut cov = StageCoverage { stage, asked: asks.len() as u32, ..Default::default() };
        let mut replies = Vec::with_capacity(asks.len());
        let seed: u64 = rand::random();
        let ring = self.ring();
        let mut pending: Vec<Pending> = asks
            .into_iter()
            .map(|(part, query)| {
                let (preferred, candidates) = self.read_candidates(&ring, part, seed);
                Pending { part, query: Some(query), candidates, preferred }
            })
            .collect();
        let mut first = true;
        loop {
            let (ready, none): (Vec<Pending>, Vec<Pending>) =
                pending.into_iter().partition(|p| !p.candidates.is_empty());
            cov.missing.extend(none.iter().map(|p| p.part.partition));
            pending = ready;
            let left = deadline.saturating_duration_since(Instant::now());
            if pending.is_empty() || left < Duration::from_micros(200) {
                break;
            }
            let try_share = first;
            first = false;
            let mut by_node: HashMap<&str, Vec<Pending>> = HashMap::new();
            for p in pending {
                by_node.entry(p.candidates[0]).or_default().push(p);
            }
            let calls = by_node.into_iter().map(|(node, mut ps)| async move {
                // A node whose partitions have another replica gets a share of the time left, so a
                // slow node still leaves time for the retry; one with no fallback gets all of it.
                let fallback = ps.iter().any(|p| p.candidates.len() > 1);
                let budget = if try_share && fallback { left.mul_f64(FIRST_TRY_SHARE) } else { left };
                let asks: Vec<(Part, ReadQuery)> = ps
                    .iter_mut()
                    .filter_map(|p| {
                        let q = if p.candidates.len() > 1 { p.query.clone() } else { p.query.take() };
                        Some((p.part, q?))
                    })
                    .collect();
                let kind = asks.first().map(|(_, q)| q.kind()).unwrap_or("read");
                let end = Instant::now() + budget;
                let primary = self.call_read(node, asks, budget);
                // A remote call slower than the peer's recent p95 is also sent to the next replica
                // of its partitions (within the hedge budget); the first answer per partition wins.
                let delay = if node != self.node_id {
                    self.hedge.budget.primary();
                    self.hedge.delay(node, kind).filter(|d| *d < budget && fallback)
                } else {
                    None
                };
                let mut won = HashMap::new();
                let res = match delay {
                    None => primary.await,
                    Some(d) => self.hedged(stage, &ps, primary, d, end, &mut won).await,
                };
                (node, ps, res, won)
            });
            let mut retry = Vec::new();
            for (node, ps, res, mut won) in futures::future::join_all(calls).await {
                // Partitions a hedge answered first: from a replica, whatever the primary did.
                let ps: Vec<Pending> = ps
                    .into_iter()
                    .filter_map(|p| match won.remove(&p.part) {
                        Some(r) => {
                            cov.from_replica.push(p.part.partition);
                            replies.push((p.part, r));
                            None
                        }
                        None => Some(p),
                    })
                    .collect();
                if ps.is_empty() {
                    continue;
                }
                match res {
                    Ok(results) => {
                        let mut by_part: HashMap<Part, Result<ReadReply, CallError>> = results.into_iter().collect();
                        for mut p in ps {
                            match by_part.remove(&p.part) {
                                Some(Ok(r)) => {
                                    if node != p.preferred {
                                        cov.from_replica.push(p.part.partition);
                                    }
                                    replies.push((p.part, r));
                                }
                                other => {
                                    let why = other.map(|r| r.err().map(|e| e.to_string()).unwrap_or_default());
                                    tracing::debug!(stage, node = %node, part = %p.part, error = ?why, "partition failed; next replica");
                                    p.candidates.pop_front();
                                    retry.push(p);
                                }
                            }
                        }
                    }
                    Err(e) => {
                        tracing::warn!(stage, node = %node, error = %e, "node call failed; its partitions go to their next replica");
                        metrics::counter!("recsys_partition_misses_total", "stage" => stage, "node" => node.to_string())
                            .increment(ps.len() as u64);
                        if !cov.failed_nodes.iter().any(|f| f == node) {
                            cov.failed_nodes.push(node.to_string());
                        }
                        for mut p in ps {
                            p.candidates.pop_front();
                            retry.push(p);
                        }
                    }
                }
            }
            pending = retry;
        }
        cov.missing.extend(pending.iter().map(|p| p.part.partition));
        cov.answered = replies.len() as u32;
        if !cov.from_replica.is_empty() {
            metrics::counter!("recsys_replica_fallbacks_total", "stage" => stage)
                .increment(cov.from_replica.len() as u64);
        }
        cov.missing.sort_unstable();
        cov.from_replica.sort_unstable();
        ReadOutcome { replies, coverage: cov }
    }

    /// One node's call for a stage, bounded by `budget`.
    async fn call_read(&self, node: &str, asks: Vec<(Part, ReadQuery)>, budget: Duration) -> NodeRead {
        match self.client(node) {
            None => Err(format!("no address for {node}")),
            Some(c) => match tokio::time::timeout(budget, c.read(asks, budget)).await {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err(format!("{node} missed its {} ms budget", budget.as_millis())),
            },
        }
    }

    /// Waits `delay` for `primary`; then sends its partitions that have a next replica there too
    /// (one call per next node, each paid from the hedge budget) and keeps the first answer per
    /// partition in `won`. Returns once the primary answered (hedges still running are dropped,
    /// which cancels them), or every partition was won (the primary is dropped), or the primary
    /// failed and no hedge is left running.
    async fn hedged<'r>(
        &'r self,
        stage: &'static str,
        ps: &[Pending<'r>],
        primary: impl std::future::Future<Output = NodeRead>,
        delay: Duration,
        end: Instant,
        won: &mut HashMap<Part, ReadReply>,
    ) -> NodeRead {
        use futures::StreamExt;
        tokio::pin!(primary);
        tokio::select! {
            r = &mut primary => return r,
            _ = tokio::time::sleep(delay) => {}
        }
        let mut by_alt: HashMap<&'r str, Vec<(Part, ReadQuery)>> = HashMap::new();
        for p in ps {
            if let (Some(alt), Some(q)) = (p.candidates.get(1), &p.query) {
                by_alt.entry(*alt).or_default().push((p.part, q.clone()));
            }
        }
        let left = end.saturating_duration_since(Instant::now());
        let mut hedges = futures::stream::FuturesUnordered::new();
        for (alt, asks) in by_alt {
            if left.is_zero() || !self.hedge.budget.try_hedge() {
                break;
            }
            metrics::counter!("recsys_hedged_calls_total", "stage" => stage).increment(1);
            hedges.push(async move { self.call_read(alt, asks, left).await });
        }
        if hedges.is_empty() {
            return primary.await;
        }
        let mut primary_res: Option<NodeRead> = None;
        loop {
            tokio::select! {
                r = &mut primary, if primary_res.is_none() => primary_res = Some(r),
                Some(r) = hedges.next(), if !hedges.is_empty() => {
                    let mut first = false;
                    for (part, reply) in r.into_iter().flatten() {
                        if let (Ok(reply), std::collections::hash_map::Entry::Vacant(v)) = (reply, won.entry(part)) {
                            v.insert(reply);
                            first = true;
                        }
                    }
                    if first {
                        metrics::counter!("recsys_hedge_wins_total", "stage" => stage).increment(1);
                    }
                }
                else => break,
            }
            match &primary_res {
                Some(Ok(_)) => break,
                Some(Err(_)) if hedges.is_empty() => break,
                None if ps.iter().all(|p| won.contains_key(&p.part)) => return Ok(Vec::new()),
                _ => {}
            }
        }
        primary_res.unwrap_or_else(|| Ok(Vec::new()))
    }

    /// Groups `keys` of a key space by their feature partition, asks each partition the query
    /// `ask` builds from its keys, and returns every answered partition's keys with its reply.
    pub async fn read_keyed(
        &self,
        stage: &'static str,
        space: &str,
        keys: impl IntoIterator<Item = Key>,
        deadline: Instant,
        ask: impl Fn(Vec<Key>) -> ReadQuery,
    ) -> (Vec<(Vec<Key>, ReadReply)>, StageCoverage) {
        let mut by_part: HashMap<u32, Vec<Key>> = HashMap::new();
        for k in keys {
            by_part.entry(partition_of(space, k, self.ring().partitions)).or_default().push(k);
        }
        let mut asked: HashMap<Part, Vec<Key>> = HashMap::with_capacity(by_part.len());
        let asks: Vec<(Part, ReadQuery)> = by_part
            .into_iter()
            .map(|(p, mut ks)| {
                ks.sort_unstable();
                ks.dedup();
                let part = Part::new(Role::Feature, p);
                asked.insert(part, ks.clone());
                (part, ask(ks))
            })
            .collect();
        let out = self.read_fanout(stage, asks, deadline).await;
        let replies = out.replies.into_iter().filter_map(|(part, r)| Some((asked.remove(&part)?, r))).collect();
        (replies, out.coverage)
    }

    /// Item state per key from the items' feature partitions (replicas on failure).
    pub async fn briefs(
        &self,
        stage: &'static str,
        keys: &[Key],
        wants: BriefWants,
        deadline: Instant,
    ) -> (KeyMap<ItemBrief>, StageCoverage) {
        let (replies, cov) =
            self.read_keyed(stage, ids::ITEM, keys.iter().copied(), deadline, |ks| ReadQuery::Briefs(ks, wants)).await;
        let mut briefs = KeyMap::with_capacity_and_hasher(keys.len(), Default::default());
        for (ks, reply) in replies {
            if let ReadReply::Briefs(bs) = reply {
                briefs.extend(ks.into_iter().zip(bs).filter_map(|(k, b)| b.map(|b| (k, b))));
            }
        }
        (briefs, cov)
    }

    /// Sends each partition's ops to every replica that takes writes. Per partition, the result
    /// is durable on every replica that answered and on at least `write_quorum` of them (capped at
    /// the owner count), and every owner that did not take it (down, or it failed) has a durable
    /// hint on this node: an acknowledged write is on two disks when R >= 2. `new` says per op
    /// whether any replica had not seen it before (false on all: a retried duplicate).
    pub async fn write(&self, plan: Plan, timeout: Duration) -> Result<WriteResult, WriteError> {
        let mut by_node: BTreeMap<String, NodeOps> = BTreeMap::new();
        let mut state: BTreeMap<Part, PartWrite> = BTreeMap::new();
        // Owners that did not take a partition's ops: each gets a durable hint before the ack.
        let mut owed: Vec<(String, Part, Arc<Vec<LoggedOp>>)> = Vec::new();
        let ring = self.ring();
        for (part, ops) in plan {
            // During a membership change the new owners take writes too (they stream the rest).
            let owners = ring.write_owners(part.role, part.partition);
            let (targets, down): (Vec<&String>, Vec<&String>) =
                owners.iter().partition(|o| **o == self.node_id || self.membership.takes_writes(o));
            if targets.is_empty() {
                return Err(WriteError::Unavailable {
                    part,
                    reason: format!("no replica is reachable (owners: {})", owners.join(", ")),
                });
            }
            let n = ops.len();
            let ops = Arc::new(ops);
            for t in targets {
                by_node.entry(t.clone()).or_default().push((part, ops.clone()));
            }
            owed.extend(down.into_iter().map(|d| (d.clone(), part, ops.clone())));
            let need = self.write_quorum.min(owners.len()).max(1) as u32;
            state.insert(part, PartWrite { new: vec![false; n], ok: 0, need, errors: vec![] });
        }
        let calls = by_node.into_iter().map(|(node, asks)| async move {
            let parts: Vec<(Part, Arc<Vec<LoggedOp>>)> = asks.iter().map(|(p, o)| (*p, o.clone())).collect();
            let res = match self.client(&node) {
                None => Err(format!("no address for {node}")),
                Some(c) => match tokio::time::timeout(timeout, c.apply(asks, timeout)).await {
                    Ok(Ok(r)) => Ok(r),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err(format!("{node} did not acknowledge within {} ms", timeout.as_millis())),
                },
            };
            (node, parts, res)
        });
        let mut flush_micros = 0;
        let mut replica_failures = 0u32;
        for (node, parts, res) in futures::future::join_all(calls).await {
            match res {
                Ok((results, flush)) => {
                    flush_micros = flush_micros.max(flush);
                    let ops_of: HashMap<Part, Arc<Vec<LoggedOp>>> = parts.into_iter().collect();
                    for (part, r) in results {
                        let Some(s) = state.get_mut(&part) else { continue };
                        match r {
                            Ok(flags) => {
                                s.ok += 1;
                                s.new.iter_mut().zip(flags).for_each(|(n, f)| *n |= f);
                            }
                            Err(e) => {
                                replica_failures += 1;
                                s.errors.push(format!("{node}: {e}"));
                                if let Some(ops) = ops_of.get(&part) {
                                    owed.push((node.clone(), part, ops.clone()));
                                }
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!(node = %node, error = %e, "replica write failed; the ops are kept for it (hinted handoff)");
                    for (part, ops) in parts {
                        replica_failures += 1;
                        owed.push((node.clone(), part, ops));
                        if let Some(s) = state.get_mut(&part) {
                            s.errors.push(e.clone());
                        }
                    }
                }
            }
        }
        if replica_failures > 0 {
            metrics::counter!("recsys_replica_write_failures_total").increment(u64::from(replica_failures));
        }
        let mut new = BTreeMap::new();
        let mut short = None;
        for (part, s) in state {
            if s.ok == 0 {
                return Err(WriteError::Unavailable { part, reason: s.errors.join("; ") });
            }
            if s.ok < s.need {
                let why = if s.errors.is_empty() { "the others are down".to_string() } else { s.errors.join("; ") };
                short = short.or(Some((
                    part,
                    format!("{} of the {} owners ingest.write_quorum asks for took the write ({why})", s.ok, s.need),
                )));
            }
            new.insert(part, s.new);
        }
        if let Some((_, first, _)) = owed.first() {
            let first = *first;
            let hints = self.hints.clone();
            let refused = tokio::task::spawn_blocking(move || hints.add(&owed))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()))
                .map_err(|reason| WriteError::Unavailable {
                    part: first,
                    reason: format!("keeping hints: {reason}"),
                })?;
            if let Some((node, part)) = refused.first() {
                return Err(WriteError::Unavailable {
                    part: *part,
                    reason: format!(
                        "owner {node} did not take the write and the hints kept for it are full; not acknowledged \
                         on one disk (restore {node} or remove it)"
                    ),
                });
            }
            self.local
                .store
                .flush()
                .await
                .map_err(|e| WriteError::Unavailable { part: first, reason: format!("flushing hints: {e}") })?;
        }
        // Not acknowledged, but what owners took stays (a retry of the same events is a no-op
        // there) and the others' hints are kept: replicas converge either way.
        if let Some((part, reason)) = short {
            return Err(WriteError::Unavailable { part, reason });
        }
        Ok(WriteResult { new, flush_micros, replica_failures })
    }
}

/// One node's answer for a stage: per partition, or the whole call failed.
type NodeRead = Result<Vec<(Part, Result<ReadReply, CallError>)>, String>;

/// The ops one node is sent, per partition.
type NodeOps = Vec<(Part, Arc<Vec<LoggedOp>>)>;

struct PartWrite {
    new: Vec<bool>,
    ok: u32,
    /// Owners that must take it (`write_quorum`, capped at the owner count).
    need: u32,
    errors: Vec<String>,
}

pub struct WriteResult {
    pub new: BTreeMap<Part, Vec<bool>>,
    pub flush_micros: u64,
    pub replica_failures: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("partition {part}: {reason}")]
    Unavailable { part: Part, reason: String },
}
