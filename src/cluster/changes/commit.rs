//! Committing a membership change once every new owner holds its incoming partitions.
use std::collections::BTreeSet;

use super::super::metalog::{Entry, MetaMsg, MetaReply};
use super::Controller;
use crate::domain::Part;

impl Controller {
    /// The lowest-id live node of the change commits it once every new owner is done.
    pub(super) async fn try_commit(&self) {
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
}
