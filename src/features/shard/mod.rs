//! A feature partition: item rows and user profiles for the entities hashed to it, held in
//! dense in-memory blocks (one `Vec` per column family, indexed by row number). Runs as a ractor
//! actor; sled is the durable copy and is replayed into it on start.
//!
//! Where things are: `state.rs` (the partition's state and its hash), `apply.rs` (ops into the
//! state), `extract.rs` (briefs, feature rows, snapshots out of it), `profile.rs` and `seen.rs`
//! (a user's profile and seen filter), `actor.rs` (the actor and its messages).
mod actor;
mod apply;
mod extract;
mod profile;
mod seen;
mod state;

pub(crate) use actor::log_ops;
pub use actor::{FeatureActorState, FeatureMsg, FeatureShard, FeatureShardArgs};
pub use extract::{BriefWants, ItemBrief, ItemFeatureRows, ItemMeta};
pub use profile::{UserSnapshot, UserState, AUTHOR_AFFINITY_CAP, EMB_SCALE};
pub use seen::{SeenFilter, SEEN_GENERATION_SECS};
pub use state::{FeatureShardState, ItemRegions, ShardCounts, ShardSettings};

#[cfg(test)]
mod tests;
