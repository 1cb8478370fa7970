//! Cluster shape: which nodes have joined and which are alive (membership, gossip), where each
//! partition lives (ring: placement over the joined set, never over momentary liveness), and how
//! a partition's copies stay identical (replication: op log, anti-entropy).
pub mod changes;
pub mod membership;
pub mod metalog;
pub mod replication;
pub mod ring;

pub use membership::Membership;
pub use ring::{Ring, RingSpec};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberState {
    /// Started, loading or catching up; not serving reads yet.
    Joining,
    Serving,
    /// Shutting down (SIGTERM): peers stop routing to it at once.
    Leaving,
    /// In the ring but not seen alive by the failure detector.
    Down,
}

impl MemberState {
    pub fn as_str(self) -> &'static str {
        match self {
            MemberState::Joining => "joining",
            MemberState::Serving => "serving",
            MemberState::Leaving => "leaving",
            MemberState::Down => "down",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "joining" => MemberState::Joining,
            "serving" => MemberState::Serving,
            "leaving" => MemberState::Leaving,
            "down" => MemberState::Down,
            _ => return None,
        })
    }
}

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
