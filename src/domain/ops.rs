//! Partition ops: what a write becomes once it is routed (`ingest::ops` plans a batch into
//! them), their ids, their last-writer-wins versions and the node's version clock. Every layer
//! that logs, sends, moves or applies ops names them from here.
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::placement::Part;
use super::records::{Action, ItemRecord, ItemRecordV1, UserRecord, UserRecordV1};
use crate::ids::Key;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Op {
    // Feature partitions. `seq` is the logical part of the coordinator's hybrid logical clock
    // (`Hlc`): records of one batch take consecutive values, so of two records for one key in one
    // batch the later one wins, and the version (`at`, `seq`, id) is a total order.
    /// Read from logs written before items carried regions; never planned now.
    UpsertItemV1 {
        item: ItemRecordV1,
        seq: u32,
    },
    DeleteItem {
        item: Key,
        seq: u32,
    },
    /// Read from logs written before users carried hidden topics; never planned now.
    UpsertUserV1 {
        user: UserRecordV1,
        seq: u32,
    },
    ItemEvent {
        item: Key,
        action: Action,
        ts: i64,
    },
    UserEvent(UserEvent),
    // Generator partitions.
    AuthorItem {
        author: Key,
        item: Key,
        created_at: i64,
    },
    Engagement {
        geo: Key,
        item: Key,
        action: Action,
        ts: i64,
    },
    Pair {
        a: Key,
        b: Key,
    },
    // Appended, so the variants above keep their positions in logs written before these existed.
    UpsertItem {
        item: ItemRecord,
        seq: u32,
    },
    UpsertUser {
        user: UserRecord,
        seq: u32,
    },
    /// Generator partitions: an item in its topic's freshness list.
    TopicItem {
        topic: u32,
        item: Key,
        created_at: i64,
    },
}

/// One write to one partition, as logged: `id` makes it idempotent (a retried event maps to the
/// same id), `at` orders replay (event time for events, the coordinator's clock for upserts,
/// which also decides last-writer-wins between two upserts of one record).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoggedOp {
    pub id: u64,
    pub at: i64,
    pub op: Op,
}

/// One engagement as it lands on the user's partition, with the item facts it needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UserEvent {
    pub user: Key,
    pub user_id: String,
    pub item: Key,
    pub author_key: Key,
    pub topic: u32,
    pub embedding: Arc<[f32]>,
    pub action: Action,
    pub ts: i64,
}

/// Ops per partition, ready to send to each partition's replicas.
pub type Plan = BTreeMap<Part, Vec<LoggedOp>>;

/// Last-writer-wins version of an upsert or delete: (`at` ms, `seq`, op id), a total order.
pub type Version = (i64, u32, u64);

impl Op {
    /// A digest of the op's content (its serialized form): what anti-entropy may compare beside
    /// the id, and what the id itself covers.
    pub fn content_hash(&self) -> u64 {
        digest64(&[], self)
    }

    /// The LWW version of an upsert or delete logged as `o`; None for other ops.
    pub fn version(o: &LoggedOp) -> Option<Version> {
        match &o.op {
            Op::UpsertItem { seq, .. }
            | Op::UpsertItemV1 { seq, .. }
            | Op::DeleteItem { seq, .. }
            | Op::UpsertUser { seq, .. }
            | Op::UpsertUserV1 { seq, .. } => Some((o.at, *seq, o.id)),
            _ => None,
        }
    }
}

impl LoggedOp {
    /// A digest of everything the op carries besides its id (`at` and the op's content). Equal
    /// ids with unequal content hashes would mean a corrupt or forged op.
    pub fn content_hash(&self) -> u64 {
        digest64(&self.at.to_le_bytes(), &self.op)
    }
}

/// A stable 64-bit hash of `prefix` and the op's postcard form: FNV-1a over the bytes, then a
/// full-avalanche finaliser (the same in every process and build of one format). Not SHA: it runs
/// for every op of every write (tens per event), where a cryptographic hash cost a visible share
/// of a core; op ids were never secrets, the cluster secret authenticates who sends ops.
fn digest64(prefix: &[u8], op: &Op) -> u64 {
    // Serializing plain data into a Vec cannot fail; an empty body would still hash the prefix.
    let body = postcard::to_allocvec(op).unwrap_or_default();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in prefix.iter().chain(&body) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    crate::ids::mix(h ^ body.len() as u64)
}

/// The id of an op: its origin (`slot`: event id and place in the event, or an upsert's nonce)
/// and its content, hashed together.
pub fn op_id(slot: u64, op: &Op) -> u64 {
    digest64(&slot.to_le_bytes(), op)
}

/// A hybrid logical clock: (wall ms, logical counter). `tick` never goes back and never repeats,
/// even when the wall clock steps back; `observe` moves it past a version seen from another
/// coordinator (replicas observe the upserts they apply), so a write that follows one it saw
/// gets a larger version even when this node's wall clock is behind the other's. A version more
/// than `MAX_AHEAD_MS` ahead of the wall clock is not observed (a broken peer clock must not
/// drag every later write into the future).
pub struct Hlc {
    last: Mutex<(i64, u32)>,
}

impl Hlc {
    pub const MAX_AHEAD_MS: i64 = 300_000;

    pub const fn new() -> Self {
        Self { last: Mutex::new((i64::MIN, 0)) }
    }

    /// Reserves `n` consecutive versions at one wall time: (ms, first seq). Record `i` of a batch
    /// takes (ms, first + i).
    pub fn tick(&self, wall_ms: i64, n: u32) -> (i64, u32) {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        let n = n.max(1);
        let (ms, first) = if wall_ms > last.0 {
            (wall_ms, 0)
        } else if let Some(next) = last.1.checked_add(1).filter(|f| f.checked_add(n).is_some()) {
            (last.0, next)
        } else {
            // The logical counter is spent for this millisecond: move to the next one.
            (last.0 + 1, 0)
        };
        *last = (ms, first + (n - 1));
        (ms, first)
    }

    /// Moves the clock past a version seen elsewhere (bounded, see the type's doc).
    pub fn observe(&self, wall_ms: i64, at: i64, seq: u32) {
        if at > wall_ms.saturating_add(Self::MAX_AHEAD_MS) {
            return;
        }
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if (at, seq) > *last {
            *last = (at, seq);
        }
    }
}

impl Default for Hlc {
    fn default() -> Self {
        Self::new()
    }
}

/// The node's clock for upsert versions (one per process: every coordinator and replica role of
/// the node shares it).
pub static CLOCK: Hlc = Hlc::new();

#[cfg(test)]
mod tests {
    use super::*;

    /// The op enum as it was before items carried regions and users hidden topics.
    #[derive(Serialize)]
    enum OpBefore {
        UpsertItem { item: ItemRecordV1, seq: u32 },
        DeleteItem { item: Key, seq: u32 },
        UpsertUser { user: UserRecordV1, seq: u32 },
    }

    #[test]
    fn ops_logged_before_the_new_fields_still_decode() {
        let item = ItemRecordV1 {
            id: "i1".into(),
            author: "a".into(),
            topic: 3,
            geo: "de".into(),
            price: 1.0,
            quality: 0.5,
            duration_secs: 9.0,
            is_video: true,
            in_stock: true,
            created_at: 1_700_000_000,
            embedding: vec![0.5, -0.5],
            deleted: false,
        };
        let user = UserRecordV1 {
            id: "u".into(),
            geo: "us".into(),
            signup_at: 5,
            follows: vec!["a".into()],
            blocked_authors: vec![],
        };
        let old = postcard::to_allocvec(&OpBefore::UpsertItem { item: item.clone(), seq: 4 }).unwrap();
        let op: Op = postcard::from_bytes(&old).unwrap();
        assert_eq!(op, Op::UpsertItemV1 { item: item.clone(), seq: 4 });
        let new = ItemRecord::from(&item);
        assert!(new.allowed_regions.is_empty() && new.blocked_regions.is_empty() && new.id == "i1");
        let old = postcard::to_allocvec(&OpBefore::UpsertUser { user: user.clone(), seq: 1 }).unwrap();
        assert_eq!(postcard::from_bytes::<Op>(&old).unwrap(), Op::UpsertUserV1 { user, seq: 1 });
        let old = postcard::to_allocvec(&OpBefore::DeleteItem { item: 9, seq: 2 }).unwrap();
        assert_eq!(postcard::from_bytes::<Op>(&old).unwrap(), Op::DeleteItem { item: 9, seq: 2 });
    }

    #[test]
    fn the_clock_orders_a_batch_and_never_goes_back() {
        let c = Hlc::new();
        assert_eq!(c.tick(1000, 3), (1000, 0));
        assert_eq!(c.tick(1000, 2), (1000, 3), "same millisecond: the next batch continues");
        assert_eq!(c.tick(900, 1), (1000, 5), "the wall clock stepped back: the clock does not");
        c.observe(1000, 4000, 7);
        assert_eq!(c.tick(1001, 1), (4000, 8), "a version seen from a node ahead is passed");
        c.observe(1001, 1001 + Hlc::MAX_AHEAD_MS + 1, 0);
        assert_eq!(c.tick(1002, 1), (4000, 9), "a version far in the future is not observed");
        assert_eq!(c.tick(5000, 1), (5000, 0));
    }
}
