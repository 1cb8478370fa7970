//! The records clients write (items, users, events) and the actions an event names: what ingest
//! validates, the store logs inside ops, the partitions apply and the synthetic world generates.
use serde::{Deserialize, Serialize};

use crate::ids::Key;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ItemRecord {
    pub id: String,
    pub author: String,
    pub topic: u32,
    pub geo: String,
    pub price: f32,
    pub quality: f32,
    pub duration_secs: f32,
    pub is_video: bool,
    pub in_stock: bool,
    pub created_at: i64,
    pub embedding: Vec<f32>,
    #[serde(default)]
    pub deleted: bool,
    /// Geo licensing: when not empty, the item is served only to these regions (request geos).
    #[serde(default)]
    pub allowed_regions: Vec<String>,
    /// Regions the item is never served to.
    #[serde(default)]
    pub blocked_regions: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UserRecord {
    pub id: String,
    pub geo: String,
    pub signup_at: i64,
    pub follows: Vec<String>,
    pub blocked_authors: Vec<String>,
    /// Topics the user asked not to see.
    #[serde(default)]
    pub hidden_topics: Vec<u32>,
}

/// An item as logged before items carried regions: op logs written then still decode (postcard
/// is positional, so the new fields cannot be appended to the old record).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ItemRecordV1 {
    pub id: String,
    pub author: String,
    pub topic: u32,
    pub geo: String,
    pub price: f32,
    pub quality: f32,
    pub duration_secs: f32,
    pub is_video: bool,
    pub in_stock: bool,
    pub created_at: i64,
    pub embedding: Vec<f32>,
    pub deleted: bool,
}

impl From<&ItemRecordV1> for ItemRecord {
    fn from(v: &ItemRecordV1) -> Self {
        Self {
            id: v.id.clone(),
            author: v.author.clone(),
            topic: v.topic,
            geo: v.geo.clone(),
            price: v.price,
            quality: v.quality,
            duration_secs: v.duration_secs,
            is_video: v.is_video,
            in_stock: v.in_stock,
            created_at: v.created_at,
            embedding: v.embedding.clone(),
            deleted: v.deleted,
            allowed_regions: vec![],
            blocked_regions: vec![],
        }
    }
}

/// A user as logged before users carried hidden topics (see `ItemRecordV1`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UserRecordV1 {
    pub id: String,
    pub geo: String,
    pub signup_at: i64,
    pub follows: Vec<String>,
    pub blocked_authors: Vec<String>,
}

impl From<&UserRecordV1> for UserRecord {
    fn from(v: &UserRecordV1) -> Self {
        Self {
            id: v.id.clone(),
            geo: v.geo.clone(),
            signup_at: v.signup_at,
            follows: v.follows.clone(),
            blocked_authors: v.blocked_authors.clone(),
            hidden_topics: vec![],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[repr(u8)]
pub enum Action {
    Impression = 1,
    Click = 2,
    Like = 3,
    Share = 4,
    Hide = 5,
    Report = 6,
}

impl Action {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => Action::Impression,
            2 => Action::Click,
            3 => Action::Like,
            4 => Action::Share,
            5 => Action::Hide,
            6 => Action::Report,
            _ => return None,
        })
    }
    /// Counter slot: hide and report share the "negative feedback" counter.
    pub fn counter(self) -> usize {
        match self {
            Action::Impression => 0,
            Action::Click => 1,
            Action::Like => 2,
            Action::Share => 3,
            Action::Hide | Action::Report => 4,
        }
    }
    pub const COUNTERS: usize = 5;
    pub fn name(self) -> &'static str {
        match self {
            Action::Impression => "impression",
            Action::Click => "click",
            Action::Like => "like",
            Action::Share => "share",
            Action::Hide => "hide",
            Action::Report => "report",
        }
    }
}

/// One engagement event as stored; `pairs` are the co-engagement partners derived at ingest
/// (the user's recent likes), kept so that a replay rebuilds exactly the same index.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRecord {
    pub event_id: String,
    pub user: String,
    pub item: String,
    pub action: Action,
    pub ts_ms: i64,
    pub geo: String,
    pub request_id: String,
    pub pairs: Vec<Key>,
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend_from_slice(&(s.len() as u32).to_le_bytes());
    buf.extend_from_slice(s.as_bytes());
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.buf.len() < n {
            return None;
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Some(a)
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn str(&mut self) -> Option<String> {
        let n = self.u32()? as usize;
        String::from_utf8(self.take(n)?.to_vec()).ok()
    }
}

impl EventRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + self.pairs.len() * 8);
        b.push(1); // format version
        b.push(self.action as u8);
        b.extend_from_slice(&self.ts_ms.to_le_bytes());
        put_str(&mut b, &self.event_id);
        put_str(&mut b, &self.user);
        put_str(&mut b, &self.item);
        put_str(&mut b, &self.geo);
        put_str(&mut b, &self.request_id);
        b.extend_from_slice(&(self.pairs.len() as u32).to_le_bytes());
        for p in &self.pairs {
            b.extend_from_slice(&p.to_le_bytes());
        }
        b
    }

    pub fn decode(buf: &[u8]) -> Option<Self> {
        let mut r = Reader { buf };
        let head = r.take(2)?;
        if head[0] != 1 {
            return None;
        }
        let action = Action::from_u8(head[1])?;
        let ts_ms = r.u64()? as i64;
        let event_id = r.str()?;
        let user = r.str()?;
        let item = r.str()?;
        let geo = r.str()?;
        let request_id = r.str()?;
        let n = r.u32()? as usize;
        let mut pairs = Vec::with_capacity(n.min(1024));
        for _ in 0..n {
            pairs.push(r.u64()?);
        }
        Some(Self { event_id, user, item, action, ts_ms, geo, request_id, pairs })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_roundtrip() {
        let e = EventRecord {
            event_id: "e1".into(),
            user: "u1".into(),
            item: "i9".into(),
            action: Action::Like,
            ts_ms: 1_700_000_000_123,
            geo: "de".into(),
            request_id: "r".into(),
            pairs: vec![1, 2, u64::MAX],
        };
        assert_eq!(EventRecord::decode(&e.encode()), Some(e));
        assert_eq!(EventRecord::decode(&[9, 9, 9]), None);
    }
}
