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
