//! The one validation layer of the write path: every record of every ingest call passes here
//! before anything is planned, deduplicated or stored. The ranges are documented in
//! `proto/recsys/v1/recsys.proto` and the README ("Input ranges"); keep the three in step.
use crate::config::Config;
use crate::domain::{Action, EventRecord, ItemRecord, UserRecord};

/// 2000-01-01T00:00:00Z: no item or account of this service is older.
pub const EARLIEST_SECS: i64 = 946_684_800;
pub const MAX_ID_BYTES: usize = 256;
pub const MAX_EVENT_ID_BYTES: usize = 128;
pub const MAX_REQUEST_ID_BYTES: usize = 128;
pub const MAX_GEO_BYTES: usize = 64;
pub const MAX_PRICE: f32 = 1e9;
/// One day: longer "durations" are data errors, not content.
pub const MAX_DURATION_SECS: f32 = 86_400.0;
pub const MAX_EMBEDDING_ABS: f32 = 1e3;
pub const MAX_FOLLOWS: usize = 10_000;
pub const MAX_REGIONS: usize = 256;

/// One rejected record: the record and field it names, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{record}[{index}].{field}: {why}")]
pub struct Rejection {
    pub record: &'static str,
    pub index: usize,
    pub field: String,
    pub why: String,
}

/// The limits that come from configuration and the node's clock.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub topics: u32,
    pub embedding_dim: usize,
    pub max_skew_ms: i64,
    pub max_age_ms: i64,
    /// The node's clock, unix milliseconds, read once per batch.
    pub now_ms: i64,
}

impl Limits {
    pub fn new(cfg: &Config, now_ms: i64) -> Self {
        Self {
            topics: cfg.ingest.topics,
            embedding_dim: cfg.ingest.embedding_dim,
            max_skew_ms: cfg.ingest.max_event_skew_ms,
            max_age_ms: cfg.ingest.max_event_age_ms,
            now_ms,
        }
    }
    /// Latest creation or signup time accepted, unix seconds.
    fn latest_secs(&self) -> i64 {
        self.now_ms.saturating_add(self.max_skew_ms).div_euclid(1000)
    }
}

/// The rule for every entity id, ingest and Recommend alike: 1..=`max` bytes, not only
/// whitespace, no control characters. The reason never quotes the value.
pub fn check_id(s: &str, max: usize) -> Result<(), String> {
    if s.is_empty() || s.len() > max {
        return Err(format!("must be 1..={max} bytes (got {})", s.len()));
    }
    if s.trim().is_empty() {
        return Err("must not be only whitespace".into());
    }
    if s.chars().any(char::is_control) {
        return Err("must not contain control characters".into());
    }
    Ok(())
}

struct Check {
    record: &'static str,
    index: usize,
}

impl Check {
    fn no(&self, field: impl Into<String>, why: impl Into<String>) -> Rejection {
        Rejection { record: self.record, index: self.index, field: field.into(), why: why.into() }
    }

    fn id(&self, field: &str, s: &str, max: usize) -> Result<(), Rejection> {
        check_id(s, max).map_err(|why| self.no(field, why))
    }

    fn geo(&self, field: &str, s: &str) -> Result<(), Rejection> {
        if s.len() > MAX_GEO_BYTES {
            return Err(self.no(field, format!("must be at most {MAX_GEO_BYTES} bytes (got {})", s.len())));
        }
        if s.chars().any(char::is_control) {
            return Err(self.no(field, "must not contain control characters"));
        }
        Ok(())
    }

    fn range(&self, field: &str, v: f32, lo: f32, hi: f32) -> Result<(), Rejection> {
        if !v.is_finite() || v < lo || v > hi {
            return Err(self.no(field, format!("{v} is outside [{lo}, {hi}]")));
        }
        Ok(())
    }

    fn time_secs(&self, field: &str, v: i64, lim: &Limits) -> Result<(), Rejection> {
        let hi = lim.latest_secs();
        if v < EARLIEST_SECS || v > hi {
            return Err(
                self.no(field, format!("{v} is outside [{EARLIEST_SECS}, {hi}] (unix seconds, up to now + skew)"))
            );
        }
        Ok(())
    }
}

pub fn item(index: usize, it: &ItemRecord, lim: &Limits) -> Result<(), Rejection> {
    let c = Check { record: "items", index };
    c.id("item_id", &it.id, MAX_ID_BYTES)?;
    c.id("author_id", &it.author, MAX_ID_BYTES)?;
    c.geo("geo", &it.geo)?;
    if it.topic >= lim.topics {
        return Err(c.no("topic", format!("{} is outside [0, {})", it.topic, lim.topics)));
    }
    c.range("price", it.price, 0.0, MAX_PRICE)?;
    c.range("quality", it.quality, 0.0, 1.0)?;
    c.range("duration_secs", it.duration_secs, 0.0, MAX_DURATION_SECS)?;
    c.time_secs("created_at", it.created_at, lim)?;
    if !it.embedding.is_empty() && it.embedding.len() != lim.embedding_dim {
        return Err(
            c.no("embedding", format!("has {} values; must have {} or none", it.embedding.len(), lim.embedding_dim))
        );
    }
    for (d, v) in it.embedding.iter().enumerate() {
        c.range(&format!("embedding[{d}]"), *v, -MAX_EMBEDDING_ABS, MAX_EMBEDDING_ABS)?;
    }
    for (field, list) in [("allowed_regions", &it.allowed_regions), ("blocked_regions", &it.blocked_regions)] {
        if list.len() > MAX_REGIONS {
            return Err(c.no(field, format!("has {} entries; at most {MAX_REGIONS}", list.len())));
        }
        for (j, g) in list.iter().enumerate() {
            if g.is_empty() {
                return Err(c.no(format!("{field}[{j}]"), "must not be empty"));
            }
            c.geo(&format!("{field}[{j}]"), g)?;
        }
    }
    Ok(())
}

pub fn user(index: usize, u: &UserRecord, lim: &Limits) -> Result<(), Rejection> {
    let c = Check { record: "users", index };
    c.id("user_id", &u.id, MAX_ID_BYTES)?;
    c.geo("geo", &u.geo)?;
    // 0 means "signup time unknown": user_age_days then takes its feature default.
    if u.signup_at != 0 {
        c.time_secs("signup_at", u.signup_at, lim)?;
    }
    for (field, list) in [("follows", &u.follows), ("blocked_authors", &u.blocked_authors)] {
        if list.len() > MAX_FOLLOWS {
            return Err(c.no(field, format!("has {} entries; at most {MAX_FOLLOWS}", list.len())));
        }
        for (j, a) in list.iter().enumerate() {
            c.id(&format!("{field}[{j}]"), a, MAX_ID_BYTES)?;
        }
    }
    if u.hidden_topics.len() > lim.topics as usize {
        return Err(c.no("hidden_topics", format!("has {} entries; at most {}", u.hidden_topics.len(), lim.topics)));
    }
    for (j, t) in u.hidden_topics.iter().enumerate() {
        if *t >= lim.topics {
            return Err(c.no(format!("hidden_topics[{j}]"), format!("{t} is outside [0, {})", lim.topics)));
        }
    }
    Ok(())
}

pub fn item_id(index: usize, id: &str) -> Result<(), Rejection> {
    Check { record: "item_ids", index }.id("item_id", id, MAX_ID_BYTES)
}

/// The wire action of an event: unspecified and unknown values are rejected.
pub fn action(index: usize, raw: i32) -> Result<Action, Rejection> {
    use crate::proto::public::Action as P;
    let a = match P::try_from(raw) {
        Ok(P::Impression) => Action::Impression,
        Ok(P::Click) => Action::Click,
        Ok(P::Like) => Action::Like,
        Ok(P::Share) => Action::Share,
        Ok(P::Hide) => Action::Hide,
        Ok(P::Report) => Action::Report,
        Ok(P::Unspecified) | Err(_) => {
            return Err(Check { record: "events", index }.no("action", format!("{raw} is unspecified or unknown")))
        }
    };
    Ok(a)
}

/// Event time must lie in [now - max_age, now + max_skew] of the node's clock: an event from the
/// future would otherwise move every window it lands in ahead of real time.
pub fn event(index: usize, e: &EventRecord, lim: &Limits) -> Result<(), Rejection> {
    let c = Check { record: "events", index };
    c.id("event_id", &e.event_id, MAX_EVENT_ID_BYTES)?;
    c.id("user_id", &e.user, MAX_ID_BYTES)?;
    c.id("item_id", &e.item, MAX_ID_BYTES)?;
    c.geo("geo", &e.geo)?;
    if e.request_id.len() > MAX_REQUEST_ID_BYTES {
        return Err(c.no("request_id", format!("must be at most {MAX_REQUEST_ID_BYTES} bytes")));
    }
    let hi = lim.now_ms.saturating_add(lim.max_skew_ms);
    let lo = lim.now_ms.saturating_sub(lim.max_age_ms).max(EARLIEST_SECS * 1000);
    if e.ts_ms > hi {
        return Err(c.no(
            "event_time_ms",
            format!(
                "{} is {} ms ahead of the node's clock; at most {} ms of skew is accepted",
                e.ts_ms,
                e.ts_ms.saturating_sub(lim.now_ms),
                lim.max_skew_ms
            ),
        ));
    }
    if e.ts_ms < lo {
        return Err(c.no("event_time_ms", format!("{} is before {lo} (older than the accepted age)", e.ts_ms)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: i64 = 1_800_000_000_000;

    fn lim() -> Limits {
        Limits { topics: 20, embedding_dim: 4, max_skew_ms: 300_000, max_age_ms: 30 * 86_400_000, now_ms: NOW }
    }

    const ITEM_FIELDS: &[&str] = &[
        "item_id",
        "author_id",
        "geo",
        "topic",
        "price",
        "quality",
        "duration_secs",
        "created_at",
        "embedding",
        "allowed_regions",
        "blocked_regions",
    ];
    const USER_FIELDS: &[&str] = &["user_id", "geo", "signup_at", "follows", "blocked_authors", "hidden_topics"];
    const EVENT_FIELDS: &[&str] = &["event_id", "user_id", "item_id", "geo", "request_id", "event_time_ms", "action"];

    /// The rejection names its record, index and one of the record's fields, in that order.
    fn names_field(r: &Rejection, record: &str, index: usize, fields: &[&str]) -> bool {
        let text = r.to_string();
        let head = format!("{record}[{index}].");
        text.starts_with(&head)
            && fields.iter().any(|f| r.field == *f || r.field.starts_with(&format!("{f}[")))
            && text[head.len()..].starts_with(&r.field)
            && !r.why.is_empty()
    }

    fn any_string() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-z0-9_-]{1,20}",
            "\\PC{0,300}",
            "[ \t\n\u{0}\u{7f}]{0,4}",
            Just(String::new()),
            Just("x".repeat(257)),
        ]
    }

    fn any_f32() -> impl Strategy<Value = f32> {
        prop_oneof![-2.0f32..2.0, any::<f32>(), Just(f32::NAN), Just(f32::INFINITY), Just(-0.0), Just(7.0), Just(1e12)]
    }

    fn any_time_secs() -> impl Strategy<Value = i64> {
        prop_oneof![any::<i64>(), (NOW / 1000 - 400 * 86_400)..(NOW / 1000 + 86_400), Just(0i64)]
    }

    prop_compose! {
        fn any_item()(id in any_string(), author in any_string(), geo in any_string(), topic in 0u32..40,
                      price in any_f32(), quality in any_f32(), duration in any_f32(),
                      created_at in any_time_secs(),
                      embedding in prop::collection::vec(any_f32(), 0..6),
                      allowed_regions in prop::collection::vec(any_string(), 0..3),
                      blocked_regions in prop::collection::vec(any_string(), 0..3)) -> ItemRecord {
            ItemRecord { id, author, topic, geo, price, quality, duration_secs: duration, is_video: false,
                         in_stock: true, created_at, embedding, deleted: false, allowed_regions, blocked_regions }
        }
    }

    prop_compose! {
        fn any_event()(event_id in any_string(), user in any_string(), item in any_string(), geo in any_string(),
                       request_id in any_string(),
                       ts_ms in prop_oneof![any::<i64>(), (NOW - 40 * 86_400_000)..(NOW + 86_400_000)]) -> EventRecord {
            EventRecord { event_id, user, item, action: Action::Like, ts_ms, geo, request_id, pairs: vec![] }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn items_are_accepted_only_in_range_and_rejections_name_a_field(i in 0usize..5000, it in any_item()) {
            match item(i, &it, &lim()) {
                Ok(()) => {
                    prop_assert!((0.0..=1.0).contains(&it.quality));
                    prop_assert!((0.0..=MAX_PRICE).contains(&it.price));
                    prop_assert!((0.0..=MAX_DURATION_SECS).contains(&it.duration_secs));
                    prop_assert!(it.created_at >= EARLIEST_SECS && it.created_at <= NOW / 1000 + 300);
                    prop_assert!(it.topic < 20 && !it.id.trim().is_empty() && !it.author.trim().is_empty());
                    prop_assert!(it.embedding.is_empty() || it.embedding.len() == 4);
                    prop_assert!(it.embedding.iter().all(|v| v.is_finite()));
                    prop_assert!(it.allowed_regions.iter().chain(&it.blocked_regions)
                        .all(|g| !g.is_empty() && g.len() <= MAX_GEO_BYTES && !g.chars().any(char::is_control)));
                }
                Err(r) => prop_assert!(names_field(&r, "items", i, ITEM_FIELDS), "{r}"),
            }
        }

        #[test]
        fn events_are_accepted_only_within_skew_and_age(i in 0usize..5000, e in any_event()) {
            match event(i, &e, &lim()) {
                Ok(()) => {
                    prop_assert!(e.ts_ms <= NOW + 300_000 && e.ts_ms >= NOW - 30 * 86_400_000);
                    prop_assert!(!e.event_id.trim().is_empty() && e.event_id.len() <= MAX_EVENT_ID_BYTES);
                    prop_assert!(!e.user.trim().is_empty() && !e.item.trim().is_empty());
                }
                Err(r) => prop_assert!(names_field(&r, "events", i, EVENT_FIELDS), "{r}"),
            }
        }

        #[test]
        fn users_and_actions_rejections_name_a_field(i in 0usize..5000, id in any_string(), geo in any_string(),
                                                     signup in any_time_secs(),
                                                     follows in prop::collection::vec(any_string(), 0..4),
                                                     hidden_topics in prop::collection::vec(0u32..40, 0..4),
                                                     raw in any::<i32>()) {
            let u = UserRecord { id, geo, signup_at: signup, follows, blocked_authors: vec![], hidden_topics };
            if let Err(r) = user(i, &u, &lim()) {
                prop_assert!(names_field(&r, "users", i, USER_FIELDS), "{r}");
            } else {
                prop_assert!(u.signup_at == 0 || u.signup_at >= EARLIEST_SECS);
                prop_assert!(u.hidden_topics.iter().all(|t| *t < 20));
            }
            match action(i, raw) {
                Ok(_) => prop_assert!((1..=6).contains(&raw)),
                Err(r) => prop_assert!(names_field(&r, "events", i, EVENT_FIELDS), "{r}"),
            }
        }
    }

    #[test]
    fn messages_quote_value_and_range() {
        let mut it = ItemRecord {
            id: "i1".into(),
            author: "a1".into(),
            topic: 1,
            geo: "us".into(),
            price: 1.0,
            quality: 7.0,
            duration_secs: 1.0,
            is_video: false,
            in_stock: true,
            created_at: NOW / 1000,
            embedding: vec![],
            deleted: false,
            allowed_regions: vec![],
            blocked_regions: vec![],
        };
        assert_eq!(item(3, &it, &lim()).unwrap_err().to_string(), "items[3].quality: 7 is outside [0, 1]");
        it.quality = 0.5;
        it.id = "   ".into();
        assert_eq!(item(0, &it, &lim()).unwrap_err().field, "item_id");
        it.id = "i1".into();
        it.blocked_regions = vec!["de".into(), "x\u{7}".into()];
        assert_eq!(
            item(2, &it, &lim()).unwrap_err().to_string(),
            "items[2].blocked_regions[1]: must not contain control characters"
        );
    }
}
