//! Opening the partitions this node holds, making stuck owned ones readable, and dropping the
//! copies it no longer owns once every new owner holds their ops (hand-off).
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::super::{replication, Ring};
use super::{Controller, PartitionCmd};
use crate::domain::{Part, Role};

impl Controller {
    /// Opens the partitions this node must hold; drops those it no longer owns once every live
    /// node runs the table that moved them away. A drained node then stops.
    pub(super) async fn reconcile(&self) {
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
    pub(super) async fn handed_off(&self, ring: &Ring, part: Part) -> bool {
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
}
