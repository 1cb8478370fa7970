//! Hinted handoff, durable: an owner of a partition that did not take a write (down by gossip,
//! or it failed to acknowledge) is owed those ops, and the coordinator writes them to its own
//! sled (`hints` tree) and flushes **before** the write is acknowledged, so an acknowledged write
//! is on two disks when R >= 2: a replica's and the coordinator's hint (or two replicas'). Hints
//! survive the coordinator's restart and are delivered, on their own task, when the owner takes
//! writes again. They are bounded per peer (`HINT_CAP_OPS`): when a peer's queue is full the
//! write fails for the partitions owed to it (UNAVAILABLE, naming the partition) instead of
//! being acknowledged on one disk. Anti-entropy remains the backstop.
//!
//! Key: `node ‖ 0 ‖ role ‖ partition BE ‖ sequence BE`; value: op count (u32 BE) ‖ postcard ops.
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{decode, encode, Transport};
use crate::domain::{LoggedOp, Part, Role};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum HintError {
    #[error("hints: {0}")]
    Store(#[from] StoreError),
    #[error("hints: {0}")]
    Sled(#[from] sled::Error),
}

/// One owed write, as read back.
pub struct Hint {
    key: sled::IVec,
    pub part: Part,
    pub ops: Vec<LoggedOp>,
}

pub struct Hints {
    tree: sled::Tree,
    /// Ops held per peer (rebuilt from the tree at open).
    held: Mutex<HashMap<String, usize>>,
    cap: usize,
    seq: AtomicU64,
}

fn key(node: &str, part: Part, seq: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(node.len() + 14);
    k.extend_from_slice(node.as_bytes());
    k.push(0);
    k.push(part.role as u8);
    k.extend_from_slice(&part.partition.to_be_bytes());
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

fn parse_key(k: &[u8]) -> Option<(String, Part)> {
    let z = k.iter().position(|b| *b == 0)?;
    let rest = &k[z + 1..];
    if rest.len() != 13 {
        return None;
    }
    let role = Role::from_u32(u32::from(rest[0]))?;
    let partition = u32::from_be_bytes(rest[1..5].try_into().ok()?);
    Some((String::from_utf8(k[..z].to_vec()).ok()?, Part::new(role, partition)))
}

fn count_of(v: &[u8]) -> usize {
    v.get(..4).and_then(|b| b.try_into().ok()).map_or(0, |b| u32::from_be_bytes(b) as usize)
}

impl Hints {
    /// Opens the hints kept in `store` (what a previous run of this node still owed).
    pub fn open(store: &Store, cap: usize) -> Result<Self, HintError> {
        let tree = store.tree("hints")?;
        let mut held: HashMap<String, usize> = HashMap::new();
        let mut seq = 0u64;
        for kv in tree.iter() {
            let (k, v) = kv?;
            if let Some((node, _)) = parse_key(&k) {
                *held.entry(node).or_default() += count_of(&v);
                seq = seq.max(u64::from_be_bytes(k[k.len() - 8..].try_into().unwrap_or([0; 8])) + 1);
            }
        }
        let h = Self { tree, held: Mutex::new(held), cap, seq: AtomicU64::new(seq) };
        h.gauge();
        Ok(h)
    }

    fn gauge(&self) {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        metrics::gauge!("recsys_hints_pending_ops").set(held.values().sum::<usize>() as f64);
        for (peer, n) in held.iter() {
            metrics::gauge!("recsys_hints_pending_ops_by_peer", "peer" => peer.clone()).set(*n as f64);
        }
    }

    /// Writes hints (not yet flushed: the caller flushes the store once for the whole write).
    /// Returns the (node, partition) pairs refused because that peer's queue is full. Blocking.
    pub fn add(&self, owed: &[(String, Part, Arc<Vec<LoggedOp>>)]) -> Result<Vec<(String, Part)>, HintError> {
        let mut refused = Vec::new();
        for (node, part, ops) in owed {
            {
                let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
                let n = held.entry(node.clone()).or_default();
                if *n + ops.len() > self.cap {
                    refused.push((node.clone(), *part));
                    metrics::counter!("recsys_hints_refused_total").increment(ops.len() as u64);
                    continue;
                }
                *n += ops.len();
            }
            let mut v = (ops.len() as u32).to_be_bytes().to_vec();
            v.extend_from_slice(&encode(&**ops));
            let seq = self.seq.fetch_add(1, Ordering::Relaxed);
            self.tree.insert(key(node, *part, seq), v)?;
        }
        self.gauge();
        Ok(refused)
    }

    /// Peers owed something.
    pub fn pending_nodes(&self) -> Vec<String> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.iter().filter(|(_, n)| **n > 0).map(|(k, _)| k.clone()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.pending_nodes().is_empty()
    }

    /// Up to `limit` hints owed to `node`, oldest first. Blocking.
    pub fn read(&self, node: &str, limit: usize) -> Result<Vec<Hint>, HintError> {
        let mut prefix = node.as_bytes().to_vec();
        prefix.push(0);
        let mut out = Vec::new();
        for kv in self.tree.scan_prefix(&prefix).take(limit) {
            let (k, v) = kv?;
            let Some((_, part)) = parse_key(&k) else { continue };
            // An undecodable hint (a format change) is dropped rather than retried forever.
            let ops: Vec<LoggedOp> = decode(v.get(4..).unwrap_or_default()).unwrap_or_default();
            out.push(Hint { key: k, part, ops });
        }
        Ok(out)
    }

    /// Forgets delivered (or no longer owed) hints of `node`. Blocking.
    pub fn remove(&self, node: &str, hints: &[Hint]) -> Result<(), HintError> {
        let mut n = 0;
        for h in hints {
            if self.tree.remove(&h.key)?.is_some() {
                n += h.ops.len();
            }
        }
        {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            let e = held.entry(node.to_string()).or_default();
            *e = e.saturating_sub(n);
        }
        self.gauge();
        Ok(())
    }
}

impl Transport {
    /// Delivers pending hints to the owners that take writes again (one call per node, a bounded
    /// number of hints per round). Each partition is judged alone: a delivered one is done, a
    /// refused one stays; a hint for a partition the node no longer takes writes of (it moved
    /// away) is dropped: its new owners got the ops with the write itself or streamed them.
    pub async fn deliver_hints(self: &Arc<Self>, timeout: Duration) {
        let ring = self.ring();
        for node in self.hints.pending_nodes() {
            let in_ring = ring.members().contains(&node) || ring.target_members().contains(&node);
            if in_ring && !self.membership.takes_writes(&node) {
                continue;
            }
            let me = self.clone();
            let n = node.clone();
            let Ok(Ok(hints)) = tokio::task::spawn_blocking(move || me.hints.read(&n, 256)).await else { continue };
            let (stale, live): (Vec<Hint>, Vec<Hint>) =
                hints.into_iter().partition(|h| !ring.owns_write(h.part.role, h.part.partition, &node));
            let dropped: usize = stale.iter().map(|h| h.ops.len()).sum();
            let mut done: Vec<Hint> = stale;
            if dropped > 0 {
                metrics::counter!("recsys_hints_dropped_total").increment(dropped as u64);
            }
            let mut by_part: BTreeMap<Part, Vec<LoggedOp>> = BTreeMap::new();
            for h in &live {
                by_part.entry(h.part).or_default().extend(h.ops.iter().cloned());
            }
            let asks: Vec<(Part, Arc<Vec<LoggedOp>>)> = by_part.into_iter().map(|(p, o)| (p, Arc::new(o))).collect();
            let delivered: std::collections::HashSet<Part> = match (asks.is_empty(), self.client(&node)) {
                (false, Some(c)) => match c.apply(asks, timeout).await {
                    Ok((results, _)) => results.into_iter().filter(|(_, r)| r.is_ok()).map(|(p, _)| p).collect(),
                    Err(_) => Default::default(),
                },
                _ => Default::default(),
            };
            let (ok, _left): (Vec<Hint>, Vec<Hint>) = live.into_iter().partition(|h| delivered.contains(&h.part));
            let n_ok: usize = ok.iter().map(|h| h.ops.len()).sum();
            if n_ok > 0 {
                metrics::counter!("recsys_hints_delivered_total").increment(n_ok as u64);
                tracing::info!(node = %node, ops = n_ok, "delivered hinted writes");
            }
            done.extend(ok);
            if !done.is_empty() {
                let me = self.clone();
                let n = node.clone();
                let _ = tokio::task::spawn_blocking(move || me.hints.remove(&n, &done)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Op;

    #[tokio::test]
    async fn hints_survive_a_reopen_and_are_bounded_per_peer() {
        let dir = std::env::temp_dir().join(format!("recsys-hints-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let part = Part::new(Role::Feature, 3);
        let ops = |n: u64| Arc::new((0..n).map(|i| LoggedOp { id: i, at: 1, op: Op::Pair { a: i, b: 1 } }).collect());
        {
            let store = Store::open(&dir, 8, 4).unwrap();
            let h = Hints::open(&store, 10).unwrap();
            let refused = h.add(&[("n2".into(), part, ops(6)), ("n3".into(), part, ops(4))]).unwrap();
            assert!(refused.is_empty());
            // n2 holds 6 of 10: 5 more do not fit, and the write must not be acked on one disk.
            let refused = h.add(&[("n2".into(), part, ops(5))]).unwrap();
            assert_eq!(refused, vec![("n2".to_string(), part)]);
            drop(h);
            store.flush().await.unwrap();
        }
        let store = Store::open(&dir, 8, 4).unwrap();
        let h = Hints::open(&store, 10).unwrap();
        let mut nodes = h.pending_nodes();
        nodes.sort();
        assert_eq!(nodes, vec!["n2", "n3"]);
        let got = h.read("n2", 10).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].part, got[0].ops.len()), (part, 6));
        h.remove("n2", &got).unwrap();
        assert_eq!(h.pending_nodes(), vec!["n3"]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
