//! Partition placement: a fixed number of partitions per role, each mapped to an ordered list of
//! distinct owner nodes by a consistent-hash ring with virtual nodes. Built over the *joined*
//! nodes, never over momentary liveness, so a flapping node does not move partitions.
use consistent_hash::{DefaultHash, Node, StaticHashRing};

use super::Role;

#[derive(Debug, Clone)]
pub struct Ring {
    pub epoch: u64,
    pub digest: String,
    pub partitions: u32,
    pub replication: u32,
    /// owners[role][partition] = node ids, primary first.
    generator_owners: Vec<Vec<String>>,
    feature_owners: Vec<Vec<String>>,
}

impl Ring {
    pub fn build(epoch: u64, nodes: &[String], partitions: u32, replication: u32, vnodes: u32) -> Self {
        let mut sorted = nodes.to_vec();
        sorted.sort();
        sorted.dedup();
        let ring = StaticHashRing::new(
            DefaultHash,
            sorted.iter().map(|n| Node::new(n.clone()).quantity(vnodes.max(1) as usize)),
        );
        let r = (replication.max(1) as usize).min(sorted.len().max(1));
        let owners = |role: &str| -> Vec<Vec<String>> {
            (0..partitions).map(|p| ring.calc_candidates(&(role, p)).take(r).map(|n| n.key.clone()).collect()).collect()
        };
        let digest = format!("{:016x}", crate::ids::key_of(&sorted.join(",")));
        Self {
            epoch,
            digest,
            partitions,
            replication: r as u32,
            generator_owners: owners("generator"),
            feature_owners: owners("feature"),
        }
    }

    pub fn owners(&self, role: Role, partition: u32) -> &[String] {
        let table = match role {
            Role::Generator => &self.generator_owners,
            Role::Feature => &self.feature_owners,
        };
        &table[partition as usize]
    }

    /// Partitions of a role whose owner list contains `node`.
    pub fn partitions_of(&self, role: Role, node: &str) -> Vec<u32> {
        (0..self.partitions).filter(|p| self.owners(role, *p).iter().any(|n| n == node)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placement_is_deterministic_and_moves_little() {
        let three: Vec<String> = ["n1", "n2", "n3"].iter().map(|s| s.to_string()).collect();
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
    fn single_node_owns_everything() {
        let r = Ring::build(1, &["solo".to_string()], 16, 2, 64);
        assert_eq!(r.replication, 1);
        assert_eq!(r.partitions_of(Role::Generator, "solo").len(), 16);
    }
}
