//! Proposing a membership change (join, drain, remove) to the metadata log, or refusing it.
use super::super::metalog::Entry;
use super::super::{Ring, RingSpec};
use super::{Change, ChangeError, Controller};

impl Controller {
    /// Names the change in progress for a refused proposal (the log says which one won).
    pub(super) fn in_progress(&self, ring: &Ring) -> String {
        let what = self.meta.last_ring_change().map(|(i, c)| format!("`{c}`, log entry {i}")).unwrap_or_default();
        format!(
            "a membership change is in progress ({what}: {} → {}); try again when it completes",
            ring.members().join(","),
            ring.target_members().join(",")
        )
    }

    /// A node started with `--join` proposes itself once no other change is in progress.
    pub(super) async fn ask_to_join(&self) {
        let ring = self.t.ring();
        if ring.members().iter().any(|m| m == self.me()) || ring.target_members().iter().any(|m| m == self.me()) {
            return;
        }
        if ring.in_transition() || !self.all_live_caught_up(&ring) {
            return;
        }
        match self.propose(Change::Join(self.me().to_string())).await {
            Ok(s) => tracing::info!(epoch = s.epoch, "asked to join: the ring now moves partitions here"),
            Err(e) => tracing::debug!(error = %e, "join not proposed yet"),
        }
    }

    /// Begins a membership change: decided in the metadata log by a majority of the members,
    /// or refused naming the change that won the slot (the Admin RPCs and joins).
    pub async fn propose(&self, change: Change) -> Result<RingSpec, ChangeError> {
        let _one = self.adopting.lock().await;
        // Build on the newest decided ring this node knows.
        let logged = self.meta.ring();
        if logged.epoch > self.t.ring().epoch {
            self.adopt_locked(logged).await?;
        }
        let ring = self.t.ring();
        let spec = &ring.spec;
        let members = &spec.members;
        let target: Vec<String> = match &change {
            Change::Join(n) => {
                if members.contains(n) || ring.target_members().contains(n) {
                    return Ok(spec.clone());
                }
                if ring.in_transition() {
                    return Err(ChangeError::Refused(self.in_progress(&ring)));
                }
                members.iter().cloned().chain([n.clone()]).collect()
            }
            Change::Drain(n) => {
                if !members.contains(n) {
                    if ring.target_members().contains(n) {
                        return Err(ChangeError::Refused(format!("node: `{n}` is still joining")));
                    }
                    return Err(ChangeError::NotMember(n.clone()));
                }
                if ring.in_transition() {
                    if !ring.target_members().contains(n) {
                        return Ok(spec.clone()); // already draining: idempotent
                    }
                    return Err(ChangeError::Refused(self.in_progress(&ring)));
                }
                if !self.t.membership.is_live(n) {
                    return Err(ChangeError::Refused(format!(
                        "node: `{n}` is down; a dead node is taken out with `recsys remove`"
                    )));
                }
                members.iter().filter(|m| *m != n).cloned().collect()
            }
            Change::Remove(n) => {
                let in_target = ring.target_members().contains(n);
                if !members.contains(n) && !in_target {
                    return Err(ChangeError::NotMember(n.clone()));
                }
                if self.t.membership.is_live(n) {
                    return Err(ChangeError::Refused(format!(
                        "node: `{n}` is alive; drain it instead (`recsys drain`), or stop it first"
                    )));
                }
                if ring.in_transition() && !in_target {
                    return Ok(spec.clone()); // already being removed
                }
                // Also replaces a change in progress that still counts on the dead node.
                ring.target_members().iter().filter(|m| *m != n).cloned().collect()
            }
        };
        if target.is_empty() {
            return Err(ChangeError::Invalid("node: the last member of a cluster cannot leave it".into()));
        }
        let mut next = spec.begin(&target);
        if let Change::Remove(n) = &change {
            if !next.removed.contains(n) {
                next.removed.push(n.clone());
                next.removed.sort();
            }
        }
        let what = match &change {
            Change::Join(n) => format!("join {n}"),
            Change::Drain(n) => format!("drain {n}"),
            Change::Remove(n) => format!("remove {n}"),
        };
        let decided = self.meta.propose(Entry::Ring(next.clone()), &what, Some(spec.epoch)).await;
        if let Err(e) = &decided {
            metrics::counter!("recsys_membership_changes_refused_total").increment(1);
            tracing::warn!(change = %what, error = %e, "membership change not decided");
        }
        decided?;
        self.adopt_locked(next.clone()).await?;
        metrics::counter!("recsys_membership_changes_begun_total").increment(1);
        Ok(next)
    }
}
