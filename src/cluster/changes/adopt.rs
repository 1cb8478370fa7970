//! Adopting the ring the metadata log decided: reading the log from peers, persisting the new
//! table, catching up partitions owned from now on, publishing the epoch.
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use super::super::{replication, Ring, RingSpec};
use super::{ChangeError, Controller};
use crate::domain::Part;

impl Controller {
    /// Adopts the ring the metadata log ends with, when newer than the one in effect.
    pub(super) async fn sync_ring(&self) {
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
    pub(super) async fn adopt(&self, spec: RingSpec) -> Result<(), ChangeError> {
        let _one = self.adopting.lock().await;
        self.adopt_locked(spec).await
    }

    /// Persisted first, then in effect, then published. Partitions this node owns from now on
    /// and cannot serve yet (streamed here, or found unready after a restart) first catch up
    /// with every copy the previous table had, so nothing written around the change is missing
    /// when they turn readable; the old owners drop theirs only once this node publishes the
    /// new table (after that catch-up).
    pub(super) async fn adopt_locked(&self, spec: RingSpec) -> Result<(), ChangeError> {
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
    pub(super) fn all_live_caught_up(&self, ring: &Ring) -> bool {
        let involved: BTreeSet<&String> = ring.members().iter().chain(ring.target_members()).collect();
        self.t
            .membership
            .members()
            .iter()
            .filter(|m| m.live && involved.contains(&m.node_id))
            .all(|m| m.ring_epoch > ring.epoch || (m.ring_epoch == ring.epoch && m.ring_digest == ring.digest))
    }
}
