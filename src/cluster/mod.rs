//! Cluster shape: which nodes have joined (membership), where each partition lives (ring), and
//! how a stage reaches a partition (router). This node-local version has one member; the
//! stages only ever talk to the router, so spreading partitions over nodes changes the router.
pub mod ring;
pub mod router;

pub use ring::Ring;
pub use router::{CallError, Router};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub node_id: String,
    pub address: String,
    pub state: MemberState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberState {
    Joining,
    Serving,
    Leaving,
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Generator,
    Feature,
}
