//! Move progress: what this node has streamed and is streaming, published by gossip for the
//! status page and read back by `moves`.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::Controller;
use crate::domain::Part;

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

#[derive(Default)]
pub(super) struct Progress {
    /// Incoming partitions streamed complete here (for the change in progress).
    pub(super) streamed: BTreeSet<Part>,
    /// Streams running: partition → report.
    pub(super) running: BTreeMap<Part, MoveReport>,
    /// When a failed stream may be tried again, and how many times it failed (picks the next
    /// source in turn).
    pub(super) retry_at: HashMap<Part, (Instant, usize)>,
    /// The epoch `streamed` belongs to (what `MoveStatus` answers for).
    pub(super) epoch: u64,
    /// When a copy whose hand-off failed may be tried again.
    pub(super) handoff_at: HashMap<Part, Instant>,
}

impl Controller {
    pub(super) async fn publish(&self) {
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
    use crate::domain::Role;

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
}
