//! How a stage reaches a partition wherever it lives. Stages never build actor messages: they
//! hand the transport (role, partition, query) asks, and it calls each node once per stage —
//! directly into the local actors for this node's partitions (no serialization), over one tonic
//! call carrying every partition asked of a peer otherwise (the shape of Quickwit's
//! `SearchServiceClient { Local, Grpc }`). Each call carries the remaining deadline and the ring
//! epoch; a partition that does not answer is retried on its next replica while time remains.
pub mod client;
pub mod fanout;
pub mod hedge;
pub mod hints;
pub mod local;
pub mod server;
pub mod tls;

use std::sync::Arc;

use serde::{Deserialize, Serialize};

pub use client::{NodeClient, Transport};
pub use fanout::{ReadOutcome, StageCoverage, WriteError, WriteResult};
pub use local::LocalPartitions;

use crate::domain::Part;
use crate::features::shard::{BriefWants, ItemBrief, ItemFeatureRows, UserSnapshot};
use crate::features::ItemFeat;
use crate::generators::{Candidate, RetrieveQuery};
use crate::ids::Key;

pub use crate::proto::internal as pb;

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum CallError {
    #[error("partition {part} did not answer within its deadline")]
    Timeout { part: Part },
    #[error("partition {part} is unavailable: {reason}")]
    Unavailable { part: Part, reason: String },
    /// RESOURCE_EXHAUSTED: `queued` reads wait on the partition already (see `local`).
    #[error("RESOURCE_EXHAUSTED: partition {part} has {queued} reads waiting; refused instead of queued")]
    Overloaded { part: Part, queued: usize },
}

/// What a read stage asks of one partition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ReadQuery {
    Profile(Key),
    Retrieve(Arc<RetrieveQuery>),
    Briefs(Vec<Key>, BriefWants),
    /// Item state and item feature rows of the same keys (filtering and features in one call).
    Hydrate {
        keys: Vec<Key>,
        feats: Arc<Vec<ItemFeat>>,
        user_emb: Arc<[f32]>,
        now: i64,
    },
    RecentLikes(Vec<Key>),
}

impl ReadQuery {
    pub fn kind(&self) -> &'static str {
        match self {
            ReadQuery::Profile(_) => "profile",
            ReadQuery::Retrieve(_) => "retrieve",
            ReadQuery::Briefs(..) => "briefs",
            ReadQuery::Hydrate { .. } => "hydrate",
            ReadQuery::RecentLikes(_) => "recent_likes",
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub enum ReadReply {
    Profile(Box<UserSnapshot>),
    Retrieve(Vec<Candidate>),
    Briefs(Vec<Option<ItemBrief>>),
    Hydrate(Vec<Option<ItemBrief>>, ItemFeatureRows),
    RecentLikes(Vec<Vec<Key>>),
}

impl std::fmt::Debug for UserSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserSnapshot").field("known", &self.known).field("geo", &self.geo).finish_non_exhaustive()
    }
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Encoding plain in-memory values into a Vec cannot fail.
    postcard::to_allocvec(v).unwrap_or_default()
}

pub fn decode<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T, String> {
    postcard::from_bytes(b).map_err(|e| format!("undecodable body: {e}"))
}
