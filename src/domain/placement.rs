//! Where data lives, as every layer names it: a (role, partition) pair, and which generator
//! partitions hold the trending lists (the ring decides which nodes hold a partition).
use serde::{Deserialize, Serialize};

use crate::ids::{self, key_of, partition_of, Key};

/// The partitioned roles. Scorers are placed on the ring too, but as replicas of one model
/// rather than as partitions of data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    Generator = 0,
    Feature = 1,
}

impl Role {
    pub const ALL: [Role; 2] = [Role::Generator, Role::Feature];
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Generator => "generator",
            Role::Feature => "feature",
        }
    }
    pub fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Role::Generator),
            1 => Some(Role::Feature),
            _ => None,
        }
    }
}

/// A (role, partition) pair: the unit of placement, replication and catch-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Part {
    pub role: Role,
    pub partition: u32,
}

impl Part {
    pub fn new(role: Role, partition: u32) -> Self {
        Self { role, partition }
    }
    /// Dense index for per-partition tables: role-major.
    pub fn index(self, partitions: u32) -> usize {
        self.role as usize * partitions as usize + self.partition as usize
    }

    /// The inverse of `index` (None when out of range).
    pub fn from_index(i: u32, partitions: u32) -> Option<Self> {
        let role = Role::from_u32(i.checked_div(partitions)?)?;
        Some(Self::new(role, i % partitions))
    }
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.role.as_str(), self.partition)
    }
}

pub const GLOBAL_GEO: &str = "global";

/// The generator partition holding a geo's trending list. The global list is hit by every event
/// and every request, so it is spread over `global_shards` partitions by item; a request asks
/// them all (one call per node) and merges.
pub fn trending_partition(geo: Key, item: Key, global_shards: u32, parts: u32) -> u32 {
    if geo == key_of(GLOBAL_GEO) && global_shards > 1 {
        partition_of(ids::GEO, geo ^ global_shard_salt(item % u64::from(global_shards)), parts)
    } else {
        partition_of(ids::GEO, geo, parts)
    }
}

/// The partitions holding the global trending list's shards.
pub fn global_trending_partitions(global_shards: u32, parts: u32) -> Vec<u32> {
    let g = key_of(GLOBAL_GEO);
    if global_shards <= 1 {
        return vec![partition_of(ids::GEO, g, parts)];
    }
    (0..u64::from(global_shards)).map(|s| partition_of(ids::GEO, g ^ global_shard_salt(s), parts)).collect()
}

fn global_shard_salt(shard: u64) -> Key {
    if shard == 0 {
        0
    } else {
        key_of(&format!("global-shard-{shard}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn global_trending_is_spread_over_shards() {
        let parts = global_trending_partitions(8, 32);
        assert_eq!(parts.len(), 8);
        let g = key_of(GLOBAL_GEO);
        for item in 0..100u64 {
            assert!(parts.contains(&trending_partition(g, item, 8, 32)));
        }
        let distinct: std::collections::HashSet<_> = parts.iter().collect();
        assert!(distinct.len() >= 4, "shards land on several partitions: {parts:?}");
        assert_eq!(global_trending_partitions(1, 32), vec![partition_of(ids::GEO, g, 32)]);
    }
}
