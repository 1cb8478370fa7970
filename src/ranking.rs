//! Ranking: author spacing over the scored list, then delivery — the ranked list is cached and
//! pages are cut from it with opaque tokens, so page 2 never repeats page 1.
use std::sync::Arc;
use std::time::{Duration, Instant};

use dashmap::DashMap;

#[derive(Debug, Clone)]
pub struct Scored {
    pub item: Arc<str>,
    pub author: Arc<str>,
    pub score: f32,
    pub sources: u8,
    pub stage1: f32,
    /// Stage-2 head probabilities, in the order of the manifest's `stage2.heads`.
    pub heads: Vec<f32>,
    pub scored_by: &'static str,
    pub defaulted: u32,
}

/// Greedy author spacing: at each position take the best remaining item whose author differs from
/// the previous one; when only that author is left, take the best remaining and report it.
pub fn diversify(mut items: Vec<Scored>) -> (Vec<Scored>, bool) {
    items.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut out: Vec<Scored> = Vec::with_capacity(items.len());
    let mut relaxed = false;
    while !items.is_empty() {
        let pick = match out.last() {
            None => 0,
            Some(prev) => match items.iter().position(|c| c.author != prev.author) {
                Some(i) => i,
                None => {
                    relaxed = true;
                    0
                }
            },
        };
        out.push(items.remove(pick));
    }
    (out, relaxed)
}

/// True when no two neighbours share an author.
#[cfg(test)]
fn is_spaced(items: &[Scored]) -> bool {
    items.windows(2).all(|w| w[0].author != w[1].author)
}

pub struct RankedList {
    pub request_id: String,
    pub user: String,
    pub items: Vec<Scored>,
    pub diversity_relaxed: bool,
    pub stage1_version: String,
    pub stage2_version: String,
    /// Stage-2 head names of the model version that ranked this list.
    pub head_names: Arc<[String]>,
    pub created: Instant,
    /// The feature row each ranked item was scored with, for logging whichever page is served.
    pub features: Vec<Vec<f32>>,
    /// The region (`key_of(geo)`) the list was filtered for (None: unknown); later pages are
    /// re-filtered for it unless their request names its own.
    pub region: Option<crate::ids::Key>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TokenError {
    #[error("malformed")]
    Malformed,
    #[error("belongs to another user or was altered")]
    WrongUser,
    #[error("expired or unknown to the node holding its ranking")]
    Expired,
}

const TOKEN_VERSION: &str = "p2";

/// Largest offset a token may carry: far above any ranked list (`serving.ranked_list_len`), and
/// small enough that no offset arithmetic or `u32` conversion on the way can wrap.
pub const MAX_PAGE_OFFSET: usize = 1 << 20;

/// Page tokens: `p2.<node>.<request>.<offset>.<mac>`, signed with the cluster's key (HMAC-SHA256,
/// truncated to 64 bits) so a client can neither forge one nor move it to another user. The node
/// named is the one holding the ranked list; any node serves the page by asking it.
#[derive(Clone)]
pub struct PageTokens {
    key: Arc<[u8]>,
}

impl PageTokens {
    pub fn new(key: &[u8]) -> Self {
        Self { key: Arc::from(key) }
    }

    fn mac(&self, node: &str, request_id: &str, offset: usize, user: &str) -> String {
        use hmac::{Mac, SimpleHmac};
        let mut m = <SimpleHmac<sha2::Sha256> as Mac>::new_from_slice(&self.key).expect("hmac takes any key length");
        m.update(format!("{node}\n{request_id}\n{offset}\n{user}").as_bytes());
        let tag = m.finalize().into_bytes();
        tag[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    pub fn make(&self, node: &str, request_id: &str, offset: usize, user: &str) -> String {
        format!("{TOKEN_VERSION}.{node}.{request_id}.{offset}.{}", self.mac(node, request_id, offset, user))
    }

    /// Returns (node, request id, offset) of a token minted for `user`.
    pub fn parse(&self, token: &str, user: &str) -> Result<(String, String, usize), TokenError> {
        if token.len() > 512 {
            return Err(TokenError::Malformed);
        }
        let Some(rest) = token.strip_prefix("p2.") else { return Err(TokenError::Malformed) };
        // The node id may itself contain dots: the last three fields are fixed.
        let mut tail = rest.rsplitn(4, '.');
        let (Some(sum), Some(off), Some(rid), Some(node)) = (tail.next(), tail.next(), tail.next(), tail.next()) else {
            return Err(TokenError::Malformed);
        };
        if node.is_empty() || node.len() > 64 || rid.is_empty() || rid.len() > 64 {
            return Err(TokenError::Malformed);
        }
        // Digits only, canonical (no sign, no leading zero): one offset has exactly one spelling.
        if off.is_empty()
            || off.len() > 7
            || !off.bytes().all(|b| b.is_ascii_digit())
            || (off.len() > 1 && off.starts_with('0'))
        {
            return Err(TokenError::Malformed);
        }
        let offset: usize = off.parse().map_err(|_| TokenError::Malformed)?;
        if offset > MAX_PAGE_OFFSET {
            return Err(TokenError::Malformed);
        }
        if sum.len() != 16 || !sum.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(TokenError::Malformed);
        }
        // Constant-time comparison: timing must not reveal how much of a forged tag matched.
        let want = self.mac(node, rid, offset, user);
        let diff = sum.bytes().zip(want.bytes()).fold(0u8, |d, (a, b)| d | (a ^ b));
        if diff != 0 || sum.len() != want.len() {
            return Err(TokenError::WrongUser);
        }
        Ok((node.to_string(), rid.to_string(), offset))
    }
}

/// A ranked item as it travels between nodes (a later page served by the node holding the list).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ScoredWire {
    pub item: Arc<str>,
    pub author: Arc<str>,
    pub score: f32,
    pub sources: u8,
    pub stage1: f32,
    pub heads: Vec<f32>,
    pub scored_by: String,
    pub defaulted: u32,
}

impl From<&Scored> for ScoredWire {
    fn from(s: &Scored) -> Self {
        Self {
            item: s.item.clone(),
            author: s.author.clone(),
            score: s.score,
            sources: s.sources,
            stage1: s.stage1,
            heads: s.heads.clone(),
            scored_by: s.scored_by.to_string(),
            defaulted: s.defaulted,
        }
    }
}

impl From<ScoredWire> for Scored {
    fn from(s: ScoredWire) -> Self {
        let scored_by = match s.scored_by.as_str() {
            "value_model" => "value_model",
            "stage1" => "stage1",
            _ => "heuristic",
        };
        Self {
            item: s.item,
            author: s.author,
            score: s.score,
            sources: s.sources,
            stage1: s.stage1,
            heads: s.heads,
            scored_by,
            defaulted: s.defaulted,
        }
    }
}

/// Ranked lists by request id, bounded in count and age.
pub struct PageCache {
    lists: DashMap<String, Arc<RankedList>>,
    ttl: Duration,
    capacity: usize,
}

impl PageCache {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self { lists: DashMap::new(), ttl, capacity: capacity.max(1) }
    }

    pub fn insert(&self, list: Arc<RankedList>) {
        if self.lists.len() >= self.capacity {
            let ttl = self.ttl;
            self.lists.retain(|_, l| l.created.elapsed() < ttl);
            if self.lists.len() >= self.capacity {
                // Still full of live lists: drop the oldest tenth.
                let mut ages: Vec<(Instant, String)> =
                    self.lists.iter().map(|e| (e.value().created, e.key().clone())).collect();
                ages.sort();
                for (_, k) in ages.into_iter().take(self.capacity / 10 + 1) {
                    self.lists.remove(&k);
                }
            }
        }
        self.lists.insert(list.request_id.clone(), list);
    }

    pub fn get(&self, request_id: &str) -> Option<Arc<RankedList>> {
        let l = self.lists.get(request_id)?.clone();
        (l.created.elapsed() < self.ttl).then_some(l)
    }

    pub fn len(&self) -> usize {
        self.lists.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lists.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(item: &str, author: &str, score: f32) -> Scored {
        Scored {
            item: item.into(),
            author: author.into(),
            score,
            sources: 1,
            stage1: score,
            heads: vec![],
            scored_by: "stage1",
            defaulted: 0,
        }
    }

    #[test]
    fn spaces_authors_when_possible() {
        let (out, relaxed) = diversify(vec![s("a", "x", 3.0), s("b", "x", 2.9), s("c", "y", 1.0), s("d", "x", 0.5)]);
        let ids: Vec<_> = out.iter().map(|i| i.item.to_string()).collect();
        assert_eq!(ids, ["a", "c", "b", "d"]);
        assert!(relaxed); // b and d are both by x: the tail cannot be spaced
        let (out, relaxed) = diversify(vec![s("a", "x", 3.0), s("b", "x", 2.0), s("c", "y", 1.0)]);
        assert!(is_spaced(&out) && !relaxed);
    }

    #[test]
    fn tokens_reject_garbage_and_other_users() {
        let tokens = PageTokens::new(b"cluster key");
        let t = tokens.make("n1.eu", "r1", 10, "u1");
        assert_eq!(tokens.parse(&t, "u1"), Ok(("n1.eu".to_string(), "r1".to_string(), 10)));
        assert_eq!(tokens.parse(&t, "u2"), Err(TokenError::WrongUser));
        assert_eq!(PageTokens::new(b"other key").parse(&t, "u1"), Err(TokenError::WrongUser), "another cluster's key");
        assert_eq!(tokens.parse(&t.replace(".10.", ".11."), "u1"), Err(TokenError::WrongUser));
        assert_eq!(tokens.parse("garbage", "u1"), Err(TokenError::Malformed));
        assert_eq!(tokens.parse("p2.n1.r1.x.0000000000000000", "u1"), Err(TokenError::Malformed));
    }

    mod token_props {
        use super::super::*;
        use proptest::prelude::*;

        fn tokens() -> PageTokens {
            PageTokens::new(b"cluster secret")
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

            /// Any string: no panic; whatever parses is canonical (re-made, it is the same token)
            /// with a bounded offset.
            #[test]
            fn parsing_never_panics_and_accepts_only_canonical_bounded_tokens(
                t in prop_oneof![
                    "\\PC{0,600}",
                    "p2\\.[a-z0-9.]{0,12}\\.[0-9a-f]{0,20}\\.[-+0-9]{0,22}\\.[0-9a-fA-F]{0,18}",
                ],
                user in "[a-z0-9]{1,8}",
            ) {
                if let Ok((node, rid, off)) = tokens().parse(&t, &user) {
                    prop_assert!(off <= MAX_PAGE_OFFSET);
                    prop_assert_eq!(tokens().make(&node, &rid, off, &user), t);
                }
            }

            /// A minted token parses back for its user only, and changing any one character of it
            /// (or signing with another key) makes it refused.
            #[test]
            fn minted_tokens_round_trip_and_any_change_is_refused(
                node in "[a-z0-9][a-z0-9.-]{0,20}", rid in "[0-9a-f]{1,16}", off in 0usize..=MAX_PAGE_OFFSET,
                user in "[a-z0-9]{1,8}", pos in any::<prop::sample::Index>(), ch in any::<char>(),
            ) {
                let t = tokens().make(&node, &rid, off, &user);
                prop_assert_eq!(tokens().parse(&t, &user), Ok((node.clone(), rid.clone(), off)));
                let other = format!("{user}x");
                prop_assert!(tokens().parse(&t, &other).is_err());
                prop_assert!(PageTokens::new(b"another key").parse(&t, &user).is_err());
                let mut chars: Vec<char> = t.chars().collect();
                let i = pos.index(chars.len());
                if chars[i] != ch {
                    chars[i] = ch;
                    let forged: String = chars.into_iter().collect();
                    prop_assert!(tokens().parse(&forged, &user).is_err(), "{forged} accepted");
                }
            }

            /// Offsets beyond the bound are refused even when correctly signed.
            #[test]
            fn signed_offsets_beyond_the_bound_are_refused(off in (MAX_PAGE_OFFSET + 1)..usize::MAX) {
                let t = tokens().make("n1", "abc", off, "u");
                prop_assert_eq!(tokens().parse(&t, "u"), Err(TokenError::Malformed));
            }
        }
    }

    #[test]
    fn cache_is_bounded() {
        let c = PageCache::new(Duration::from_secs(60), 10);
        for i in 0..25 {
            c.insert(Arc::new(RankedList {
                request_id: format!("r{i}"),
                user: "u".into(),
                items: vec![],
                diversity_relaxed: false,
                stage1_version: String::new(),
                stage2_version: String::new(),
                created: Instant::now(),
                head_names: Arc::from(Vec::new()),
                features: vec![],
                region: None,
            }));
        }
        assert!(c.len() <= 10);
        assert!(c.get("r24").is_some());
    }
}
