//! Hinted handoff: a replica that was routed a write but did not acknowledge it (a node dying
//! before the failure detector noticed, a partition actor rebuilding) is owed those ops. The
//! coordinator keeps them, bounded, and delivers them when the replica answers again, so the
//! replica does not serve reads without them until the next anti-entropy round. Anti-entropy
//! remains the backstop when hints are dropped (bound reached, coordinator restarted).
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Transport;
use crate::cluster::Part;
use crate::store::LoggedOp;

pub struct Hint {
    pub node: String,
    pub part: Part,
    pub ops: Arc<Vec<LoggedOp>>,
}

pub struct Hints {
    queue: Mutex<VecDeque<Hint>>,
    /// Bound on ops held, over all hints.
    cap: usize,
}

impl Hints {
    pub fn new(cap: usize) -> Self {
        Self { queue: Mutex::new(VecDeque::new()), cap }
    }

    fn held(q: &VecDeque<Hint>) -> usize {
        q.iter().map(|h| h.ops.len()).sum()
    }

    pub fn add(&self, node: &str, part: Part, ops: Arc<Vec<LoggedOp>>) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.push_back(Hint { node: node.to_string(), part, ops });
        let mut dropped = 0u64;
        while Self::held(&q) > self.cap {
            if let Some(h) = q.pop_front() {
                dropped += h.ops.len() as u64;
            }
        }
        if dropped > 0 {
            metrics::counter!("recsys_hints_dropped_total").increment(dropped);
        }
        metrics::gauge!("recsys_hints_pending_ops").set(Self::held(&q) as f64);
    }

    pub fn len(&self) -> usize {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Takes the hints of nodes `ready` says can take writes now.
    fn take(&self, ready: impl Fn(&str) -> bool) -> Vec<Hint> {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let (go, stay): (VecDeque<Hint>, VecDeque<Hint>) = q.drain(..).partition(|h| ready(&h.node));
        *q = stay;
        go.into()
    }

    /// Drops the hints `keep` refuses; returns the ops dropped.
    fn retain(&self, keep: impl Fn(&Hint) -> bool) -> u64 {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        let before = Self::held(&q);
        q.retain(|h| keep(h));
        let after = Self::held(&q);
        metrics::gauge!("recsys_hints_pending_ops").set(after as f64);
        (before - after) as u64
    }

    fn put_back(&self, hints: Vec<Hint>) {
        for h in hints {
            self.add(&h.node.clone(), h.part, h.ops);
        }
    }
}

impl Transport {
    /// Delivers pending hints to the replicas that take writes again (one call per node). Each
    /// partition is judged alone: a delivered one is done, a refused one stays; a hint for a
    /// partition the node no longer takes writes of (it moved away) is dropped: its new owners got
    /// the ops with the write itself or streamed them.
    pub async fn deliver_hints(&self, timeout: Duration) {
        let ring = self.ring();
        let stale = self.hints.retain(|h| ring.owns_write(h.part.role, h.part.partition, &h.node));
        if stale > 0 {
            metrics::counter!("recsys_hints_dropped_total").increment(stale);
        }
        let hints = self.hints.take(|n| self.membership.takes_writes(n));
        if hints.is_empty() {
            return;
        }
        let mut by_node: std::collections::BTreeMap<String, Vec<Hint>> = Default::default();
        for h in hints {
            by_node.entry(h.node.clone()).or_default().push(h);
        }
        for (node, hs) in by_node {
            let asks: Vec<(Part, Arc<Vec<LoggedOp>>)> = hs.iter().map(|h| (h.part, h.ops.clone())).collect();
            let done: std::collections::HashSet<Part> = match self.client(&node) {
                Some(c) => match c.apply(asks, timeout).await {
                    Ok((results, _)) => results.into_iter().filter(|(_, r)| r.is_ok()).map(|(p, _)| p).collect(),
                    Err(_) => Default::default(),
                },
                None => Default::default(),
            };
            let (delivered, left): (Vec<Hint>, Vec<Hint>) = hs.into_iter().partition(|h| done.contains(&h.part));
            if !delivered.is_empty() {
                let n: usize = delivered.iter().map(|h| h.ops.len()).sum();
                metrics::counter!("recsys_hints_delivered_total").increment(n as u64);
                tracing::info!(node = %node, ops = n, "delivered hinted writes");
            }
            if !left.is_empty() {
                self.hints.put_back(left);
            }
        }
    }
}
