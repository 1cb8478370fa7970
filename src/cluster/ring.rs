//! Partition placement: a fixed number of partitions per role, each mapped to an ordered list of
//! distinct owner nodes by a consistent-hash ring with virtual nodes. Built over the *joined*
//! nodes (the persisted `RingSpec`), never over momentary liveness, so a node that dies or flaps
//! moves nothing: its partitions are served by their other replicas until an operator removes it.
//!
//! A membership change (join, drain, remove) is two ring steps, each one epoch: `begin` sets a
//! target member set beside the current one (reads keep going to the current owners; writes go to
//! the union, so a partition's new owner receives every write while it streams the history), and
//! `commit` makes the target current once every new owner has its partitions complete. Old owners
//! drop what they no longer own only after every live node runs the committed table.
use std::path::Path;

use consistent_hash::{DefaultHash, Node, StaticHashRing};
use serde::{Deserialize, Serialize};

use crate::domain::{Part, Role};

#[derive(Debug, thiserror::Error)]
pub enum RingError {
    #[error("cluster table {path}: {message}")]
    Persist { path: String, message: String },
}

/// What the ring is built from; persisted in each node's data dir so a restarted node rejoins
/// with the same table even while some members are down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RingSpec {
    /// Raised on every change of the joined set.
    pub epoch: u64,
    /// The joined node ids, sorted.
    pub members: Vec<String>,
    pub partitions: u32,
    pub replication: u32,
    pub vnodes: u32,
    /// Nodes that run scorers; empty means every member.
    #[serde(default)]
    pub scorer_nodes: Vec<String>,
    /// While a membership change is in progress: the member set it moves to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<Vec<String>>,
    /// Nodes an operator removed as dead in the change in progress: only their copies count as
    /// lost (a drained node that is merely unreachable for a moment still holds its data).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<String>,
}

impl RingSpec {
    pub fn new(epoch: u64, members: &[String], partitions: u32, replication: u32, vnodes: u32) -> Self {
        let mut members = members.to_vec();
        members.sort();
        members.dedup();
        Self { epoch, members, partitions, replication, vnodes, scorer_nodes: vec![], target: None, removed: vec![] }
    }

    /// The first step of a membership change: `target` beside the current members, epoch + 1.
    pub fn begin(&self, target: &[String]) -> Self {
        let mut t = target.to_vec();
        t.sort();
        t.dedup();
        Self { epoch: self.epoch + 1, target: Some(t), ..self.clone() }
    }

    /// The second step: the target becomes the member set, epoch + 1. Every node that commits
    /// the same change computes the same spec (same digest), so two committers agree.
    pub fn commit(&self) -> Self {
        match &self.target {
            Some(t) => {
                Self { epoch: self.epoch + 1, members: t.clone(), target: None, removed: vec![], ..self.clone() }
            }
            None => self.clone(),
        }
    }

    /// Whether `other` is a newer table: higher epoch, or the same epoch and a greater digest
    /// (two changes begun at once: every node settles on the same one).
    pub fn newer_than(&self, other: &RingSpec) -> bool {
        (self.epoch, self.digest()) > (other.epoch, other.digest())
    }

    pub fn with_scorers(mut self, scorers: &[String]) -> Self {
        let mut s = scorers.to_vec();
        s.sort();
        s.dedup();
        self.scorer_nodes = s;
        self
    }

    /// Covers everything placement depends on: two nodes with the same digest place every
    /// partition on the same owners.
    pub fn digest(&self) -> String {
        let mut text = format!(
            "members={};partitions={};replication={};vnodes={};scorers={}",
            self.members.join(","),
            self.partitions,
            self.replication,
            self.vnodes,
            self.scorer_nodes.join(",")
        );
        if let Some(t) = &self.target {
            text.push_str(&format!(";target={}", t.join(",")));
        }
        if !self.removed.is_empty() {
            text.push_str(&format!(";removed={}", self.removed.join(",")));
        }
        format!("{:016x}", crate::ids::key_of(&text))
    }

    pub fn load(path: &Path) -> Result<Option<Self>, RingError> {
        let err = |m: String| RingError::Persist { path: path.display().to_string(), message: m };
        match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map(Some).map_err(|e| err(e.to_string())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(err(e.to_string())),
        }
    }

    /// Written to a temporary file and renamed: a crash leaves the old table or the new one.
    pub fn save(&self, path: &Path) -> Result<(), RingError> {
        let err = |m: String| RingError::Persist { path: path.display().to_string(), message: m };
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec_pretty(self).map_err(|e| err(e.to_string()))?;
        std::fs::write(&tmp, body).map_err(|e| err(e.to_string()))?;
        std::fs::File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| err(e.to_string()))?;
        std::fs::rename(&tmp, path).map_err(|e| err(e.to_string()))
    }
}

#[derive(Debug, Clone)]
pub struct Ring {
    pub spec: RingSpec,
    pub epoch: u64,
    pub digest: String,
    pub partitions: u32,
    /// Effective replication (at most the number of members).
    pub replication: u32,
    /// owners[role][partition] = node ids, preferred first.
    generator_owners: Vec<Vec<String>>,
    feature_owners: Vec<Vec<String>>,
    /// Scorer nodes in ring order of the request key space.
    scorers: Vec<String>,
    /// Owners under the target member set while a change is in progress.
    next: Option<Placement>,
}

/// Owners per partition, for generators and for features.
type Placement = (Vec<Vec<String>>, Vec<Vec<String>>);

fn place(members: &[String], partitions: u32, replication: u32, vnodes: u32) -> Placement {
    let ring =
        StaticHashRing::new(DefaultHash, members.iter().map(|n| Node::new(n.clone()).quantity(vnodes.max(1) as usize)));
    let r = (replication.max(1) as usize).min(members.len().max(1));
    let owners = |role: &str| -> Vec<Vec<String>> {
        (0..partitions).map(|p| ring.calc_candidates(&(role, p)).take(r).map(|n| n.key.clone()).collect()).collect()
    };
    (owners("generator"), owners("feature"))
}

impl Ring {
    pub fn build(epoch: u64, nodes: &[String], partitions: u32, replication: u32, vnodes: u32) -> Self {
        Self::from_spec(RingSpec::new(epoch, nodes, partitions, replication, vnodes))
    }

    pub fn from_spec(spec: RingSpec) -> Self {
        let (generator_owners, feature_owners) = place(&spec.members, spec.partitions, spec.replication, spec.vnodes);
        let r = (spec.replication.max(1) as usize).min(spec.members.len().max(1));
        let next = spec.target.as_ref().map(|t| place(t, spec.partitions, spec.replication, spec.vnodes));
        let scorers = if spec.scorer_nodes.is_empty() { spec.members.clone() } else { spec.scorer_nodes.clone() };
        Self {
            epoch: spec.epoch,
            digest: spec.digest(),
            partitions: spec.partitions,
            replication: r as u32,
            generator_owners,
            feature_owners,
            scorers,
            next,
            spec,
        }
    }

    /// A membership change is in progress.
    pub fn in_transition(&self) -> bool {
        self.next.is_some()
    }

    /// The member set the change moves to (the current one when none is in progress).
    pub fn target_members(&self) -> &[String] {
        self.spec.target.as_deref().unwrap_or(&self.spec.members)
    }

    /// Owners under the target member set (the current owners when no change is in progress).
    pub fn target_owners(&self, role: Role, partition: u32) -> &[String] {
        let Some((g, f)) = &self.next else { return self.owners(role, partition) };
        let table = match role {
            Role::Generator => g,
            Role::Feature => f,
        };
        table.get(partition as usize).map(|v| v.as_slice()).unwrap_or(&[])
    }

    /// Where a partition's writes go: its current owners, then its new owners during a change.
    pub fn write_owners(&self, role: Role, partition: u32) -> Vec<String> {
        let mut out = self.owners(role, partition).to_vec();
        for n in self.target_owners(role, partition) {
            if !out.contains(n) {
                out.push(n.clone());
            }
        }
        out
    }

    /// The node takes writes of the partition (a current or a new owner).
    pub fn owns_write(&self, role: Role, partition: u32, node: &str) -> bool {
        self.owns(role, partition, node) || self.target_owners(role, partition).iter().any(|n| n == node)
    }

    /// Partitions a node owns now (reads may go to it), both roles.
    pub fn owned_by(&self, node: &str) -> Vec<Part> {
        Role::ALL
            .into_iter()
            .flat_map(|role| self.partitions_of(role, node).into_iter().map(move |p| Part::new(role, p)))
            .collect()
    }

    /// Partitions a node must hold under this table: those it owns now and those it receives.
    pub fn held_by(&self, node: &str) -> Vec<Part> {
        Role::ALL
            .into_iter()
            .flat_map(|role| (0..self.partitions).map(move |p| Part::new(role, p)))
            .filter(|p| self.owns_write(p.role, p.partition, node))
            .collect()
    }

    /// Partitions a node receives in the change in progress (new owner, not a current one).
    pub fn incoming(&self, node: &str) -> Vec<Part> {
        if self.next.is_none() {
            return vec![];
        }
        Role::ALL
            .into_iter()
            .flat_map(|role| (0..self.partitions).map(move |p| Part::new(role, p)))
            .filter(|p| !self.owns(p.role, p.partition, node))
            .filter(|p| self.target_owners(p.role, p.partition).iter().any(|n| n == node))
            .collect()
    }

    pub fn members(&self) -> &[String] {
        &self.spec.members
    }

    pub fn owners(&self, role: Role, partition: u32) -> &[String] {
        let table = match role {
            Role::Generator => &self.generator_owners,
            Role::Feature => &self.feature_owners,
        };
        table.get(partition as usize).map(|v| v.as_slice()).unwrap_or(&[])
    }

    pub fn owns(&self, role: Role, partition: u32, node: &str) -> bool {
        self.owners(role, partition).iter().any(|n| n == node)
    }

    /// Partitions of a role whose owner list contains `node`.
    pub fn partitions_of(&self, role: Role, node: &str) -> Vec<u32> {
        (0..self.partitions).filter(|p| self.owns(role, *p, node)).collect()
    }

    /// Nodes that may run scorers.
    pub fn scorer_nodes(&self) -> &[String] {
        &self.scorers
    }

    pub fn is_scorer(&self, node: &str) -> bool {
        self.scorers.iter().any(|n| n == node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn placement_is_deterministic_and_moves_little() {
        let three = names(&["n1", "n2", "n3"]);
        let a = Ring::build(1, &three, 256, 2, 64);
        let mut shuffled = three.clone();
        shuffled.reverse();
        let b = Ring::build(1, &shuffled, 256, 2, 64);
        for p in 0..256 {
            assert_eq!(a.owners(Role::Feature, p), b.owners(Role::Feature, p));
            let o = a.owners(Role::Feature, p);
            assert_eq!(o.len(), 2);
            assert_ne!(o[0], o[1]);
        }
        let mut four = three.clone();
        four.push("n4".into());
        let c = Ring::build(2, &four, 256, 2, 64);
        let moved = (0..256).filter(|p| a.owners(Role::Feature, *p)[0] != c.owners(Role::Feature, *p)[0]).count();
        assert!(moved < 110, "moved {moved} of 256 primaries");
        assert_ne!(a.digest, c.digest);
    }

    #[test]
    fn three_nodes_share_partitions_and_none_holds_all() {
        let r = Ring::build(1, &names(&["n1", "n2", "n3"]), 32, 2, 64);
        for n in ["n1", "n2", "n3"] {
            for role in Role::ALL {
                let held = r.partitions_of(role, n).len();
                assert!(held > 0 && held < 32, "{n} holds {held} {role:?} partitions");
            }
        }
    }

    #[test]
    fn digest_covers_settings_not_order() {
        let a = RingSpec::new(1, &names(&["b", "a"]), 32, 2, 64);
        let b = RingSpec::new(1, &names(&["a", "b"]), 32, 2, 64);
        assert_eq!(a.digest(), b.digest());
        assert_ne!(a.digest(), RingSpec::new(1, &names(&["a", "b"]), 32, 1, 64).digest());
        assert_ne!(a.digest(), RingSpec::new(1, &names(&["a", "b"]), 64, 2, 64).digest());
        assert_ne!(a.digest(), a.clone().with_scorers(&names(&["a"])).digest());
    }

    #[test]
    fn spec_persists() {
        let dir = std::env::temp_dir().join(format!("recsys-ring-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("cluster.json");
        assert_eq!(RingSpec::load(&path).unwrap(), None);
        let s = RingSpec::new(3, &names(&["n1", "n2"]), 16, 2, 64).with_scorers(&names(&["n2"]));
        s.save(&path).unwrap();
        assert_eq!(RingSpec::load(&path).unwrap(), Some(s.clone()));
        let r = Ring::from_spec(s);
        assert!(r.is_scorer("n2") && !r.is_scorer("n1"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_change_writes_to_both_tables_and_reads_the_current_one() {
        let three = RingSpec::new(1, &names(&["n1", "n2", "n3"]), 32, 2, 64);
        let begun = three.begin(&names(&["n1", "n2", "n3", "n4"]));
        assert_eq!(begun.epoch, 2);
        assert!(begun.newer_than(&three) && !three.newer_than(&begun));
        let r = Ring::from_spec(begun.clone());
        assert!(r.in_transition());
        let now = Ring::from_spec(three.clone());
        let incoming = r.incoming("n4");
        assert!(!incoming.is_empty() && incoming.len() < 64, "n4 receives some partitions: {}", incoming.len());
        for role in Role::ALL {
            for p in 0..32 {
                assert_eq!(r.owners(role, p), now.owners(role, p), "reads stay on the current owners");
                let w = r.write_owners(role, p);
                assert!(now.owners(role, p).iter().all(|o| w.contains(o)));
                assert!(r.target_owners(role, p).iter().all(|o| w.contains(o)));
            }
        }
        assert!(r.incoming("n1").iter().all(|p| !now.owns(p.role, p.partition, "n1")));
        let committed = begun.commit();
        assert_eq!((committed.epoch, committed.target.clone()), (3, None));
        assert_eq!(committed.members, names(&["n1", "n2", "n3", "n4"]));
        assert_eq!(committed.digest(), begun.commit().digest(), "two committers agree");
        let c = Ring::from_spec(committed);
        for p in &incoming {
            assert!(c.owns(p.role, p.partition, "n4"));
        }
        // Two changes begun at one epoch: every node settles on the same one.
        let other = three.begin(&names(&["n1", "n2"]));
        assert_ne!(other.newer_than(&begun), begun.newer_than(&other));
    }

    #[test]
    fn single_node_owns_everything() {
        let r = Ring::build(1, &["solo".to_string()], 16, 2, 64);
        assert_eq!(r.replication, 1);
        assert_eq!(r.partitions_of(Role::Generator, "solo").len(), 16);
    }
}
