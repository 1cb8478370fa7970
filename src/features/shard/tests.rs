use std::sync::Arc;

use super::profile::rank;
use super::*;
use crate::counters::Window;
use crate::domain::{Action, ItemRecord, LoggedOp, Op, UserEvent, UserRecord};
use crate::features::{ItemFeat, UserFeat};
use crate::ids::key_of;

fn settings() -> ShardSettings {
    ShardSettings { emb_dim: 4, topics: 3, recent_likes: 2, seen_capacity: 4, seen_fp: 0.01, unknown_cap: 3 }
}

fn item(id: &str) -> ItemRecord {
    ItemRecord {
        id: id.into(),
        author: "a1".into(),
        topic: 1,
        geo: "us".into(),
        price: 9.5,
        quality: 0.5,
        duration_secs: 30.0,
        is_video: true,
        in_stock: true,
        created_at: 1000,
        embedding: vec![1.0, 0.0, 0.0, 0.0],
        deleted: false,
        allowed_regions: vec![],
        blocked_regions: vec![],
    }
}

#[test]
fn cached_window_sums_follow_events_and_time() {
    let mut s = FeatureShardState::new(settings());
    s.upsert_item(&item("i1"));
    let k = key_of("i1");
    let feats =
        [ItemFeat::Count { counter: 1, window: Window::Hour }, ItemFeat::Count { counter: 1, window: Window::Day }];
    let t = 1_700_000_000;
    s.apply_item_event(k, Action::Click, t - 100);
    assert_eq!(s.item_features(&[k], &feats, &[], t).values, vec![1.0, 1.0]);
    s.apply_item_event(k, Action::Click, t - 50); // invalidates the cached sums
    assert_eq!(s.item_features(&[k], &feats, &[], t).values, vec![2.0, 2.0]);
    // Two hours later the clicks left the 1h window but not the 1d one.
    assert_eq!(s.item_features(&[k], &feats, &[], t + 7200).values, vec![0.0, 2.0]);
}

#[test]
fn item_features_come_from_dense_rows() {
    let mut s = FeatureShardState::new(settings());
    s.upsert_item(&item("i1"));
    let k = key_of("i1");
    s.apply_item_event(k, Action::Click, 4500);
    s.apply_item_event(k, Action::Impression, 4500);
    let feats =
        [ItemFeat::Price, ItemFeat::Emb(0), ItemFeat::Count { counter: 1, window: Window::Hour }, ItemFeat::AgeHours];
    let rows = s.item_features(&[k, key_of("missing")], &feats, &[1.0, 0.0, 0.0, 0.0], 4600);
    assert_eq!(&rows.values[..4], &[9.5, 1.0, 1.0, 1.0]);
    assert!(rows.meta[1].is_none());
    // item("i1") has embedding [1, 0, 0, 0]: identical direction to the user's.
    assert!((rows.meta[0].as_ref().unwrap().emb_cosine - 1.0).abs() < 1e-6);
}

#[test]
fn events_before_their_item_are_kept_and_deletes_are_versioned() {
    let mut s = FeatureShardState::new(settings());
    let k = key_of("i1");
    let op = |id: u64, at: i64, op: Op| LoggedOp { id, at, op };
    // Catch-up or replay may deliver an item's events before the item itself.
    s.apply(&op(1, 10, Op::ItemEvent { item: k, action: Action::Click, ts: 4500 }));
    assert!(s.brief(k, BriefWants::default()).is_none(), "a placeholder is not an item");
    assert_eq!(s.item_count(), 0);
    s.apply(&op(2, 20, Op::UpsertItem { item: item("i1"), seq: 0 }));
    let feats = [ItemFeat::Count { counter: 1, window: Window::Hour }];
    assert_eq!(s.item_features(&[k], &feats, &[], 4600).values, vec![1.0], "the early click counts");
    assert_eq!(s.item_count(), 1);
    // A delete newer than an upsert that arrives after it wins.
    s.apply(&op(4, 40, Op::DeleteItem { item: k, seq: 0 }));
    s.apply(&op(3, 30, Op::UpsertItem { item: item("i1"), seq: 0 }));
    assert!(s.brief(k, BriefWants::default()).unwrap().deleted);
}

/// Finding 4 of issue 15: two records for one key in one batch shared a time and a random
/// op id decided which one stayed. The version is now (time, position in batch, id).
#[test]
fn the_later_record_of_a_batch_wins_whatever_the_ids() {
    for (first_id, second_id) in [(1u64, 2u64), (2, 1)] {
        let mut s = FeatureShardState::new(settings());
        let a = LoggedOp {
            id: first_id,
            at: 50,
            op: Op::UpsertItem { item: ItemRecord { price: 1.0, ..item("i1") }, seq: 0 },
        };
        let b = LoggedOp {
            id: second_id,
            at: 50,
            op: Op::UpsertItem { item: ItemRecord { price: 2.0, ..item("i1") }, seq: 1 },
        };
        s.apply(&b);
        s.apply(&a);
        let rows = s.item_features(&[key_of("i1")], &[ItemFeat::Price], &[], 4600);
        assert_eq!(rows.values, vec![2.0], "ids {first_id}, {second_id}");
    }
}

/// Finding 4 of issue 15: a delete through a node whose clock is 2 s behind lost to the
/// upsert it followed. The coordinator observes the brief's version before stamping.
#[test]
fn a_delete_from_a_clock_behind_still_follows_the_upsert_it_saw() {
    let t = 1_800_000_000_000i64;
    let ahead = crate::domain::ops::Hlc::new();
    let (at, seq) = ahead.tick(t + 2000, 1);
    let up = LoggedOp { id: 5, at, op: Op::UpsertItem { item: item("i1"), seq } };
    let mut s = FeatureShardState::new(settings());
    s.apply(&up);
    let k = key_of("i1");
    let seen = s.brief(k, BriefWants::default()).unwrap().version;
    assert_eq!(seen, (at, seq));
    let behind = crate::domain::ops::Hlc::new();
    behind.observe(t, seen.0, seen.1);
    let (dat, dseq) = behind.tick(t, 1);
    let del = LoggedOp { id: 1, at: dat, op: Op::DeleteItem { item: k, seq: dseq } };
    for order in [[&up, &del], [&del, &up]] {
        let mut r = FeatureShardState::new(settings());
        order.iter().for_each(|o| r.apply(o));
        assert!(r.brief(k, BriefWants::default()).unwrap().deleted, "the delete wins");
    }
    // Without observing, the node behind stamps a version below the upsert's: it loses.
    let (lat, lseq) = crate::domain::ops::Hlc::new().tick(t, 1);
    assert!((lat, lseq) < (at, seq));
}

/// Finding 5: a delete newer than an upsert that arrives first and one that arrives after it
/// leave the same state.
#[test]
fn a_delete_and_an_older_upsert_commute() {
    let k = key_of("i1");
    let up = LoggedOp { id: 9, at: 30, op: Op::UpsertItem { item: item("i1"), seq: 0 } };
    let del = LoggedOp { id: 3, at: 40, op: Op::DeleteItem { item: k, seq: 0 } };
    let mut a = FeatureShardState::new(settings());
    a.apply(&up);
    a.apply(&del);
    let mut b = FeatureShardState::new(settings());
    b.apply(&del);
    b.apply(&up);
    assert!(b.brief(k, BriefWants::default()).unwrap().deleted);
    assert_eq!(a.state_hash(), b.state_hash());
}

fn like(user: &str, item: &str, ts: i64) -> UserEvent {
    UserEvent {
        user: key_of(user),
        user_id: user.into(),
        item: key_of(item),
        author_key: key_of("a1"),
        topic: 0,
        embedding: Arc::from(Vec::new()),
        action: Action::Like,
        ts,
    }
}

#[test]
fn unknown_users_are_capped_by_rank_and_upserted_ones_stay() {
    let mut s = FeatureShardState::new(settings());
    s.upsert_user(&UserRecord {
        id: "known".into(),
        geo: String::new(),
        signup_at: 0,
        follows: vec![],
        blocked_authors: vec![],
        hidden_topics: vec![],
    });
    s.apply_user_event(&like("known", "i1", 100));
    for u in 0..10 {
        s.apply_user_event(&like(&format!("u{u}"), "i1", 100));
    }
    let c = s.counts();
    assert_eq!((c.unknown_users, c.users), (3, 4));
    assert!(c.unknown_evicted >= 7, "{c:?}");
    assert!(s.snapshot(key_of("known")).known);
    // The three of smallest rank are kept, whatever order the ten arrived in.
    let mut ranked: Vec<String> = (0..10).map(|u| format!("u{u}")).collect();
    ranked.sort_by_key(|u| rank(key_of(u)));
    for (i, u) in ranked.iter().enumerate() {
        assert_eq!(s.snapshot(key_of(u)).known, i < 3, "{u}");
    }
    let mut r = FeatureShardState::new(settings());
    r.upsert_user(&UserRecord {
        id: "known".into(),
        geo: String::new(),
        signup_at: 0,
        follows: vec![],
        blocked_authors: vec![],
        hidden_topics: vec![],
    });
    r.apply_user_event(&like("known", "i1", 100));
    for u in (0..10).rev() {
        r.apply_user_event(&like(&format!("u{u}"), "i1", 100));
    }
    assert_eq!(r.state_hash(), s.state_hash(), "the reverse order keeps the same users");
    // Signup unknown: the age feature takes its default instead of ~56 years.
    assert_eq!(s.snapshot(key_of("known")).feature(UserFeat::AgeDays, 1_800_000_000), None);
}

#[test]
fn recent_likes_follow_event_time_in_any_apply_order() {
    let likes = [("i1", 300), ("i2", 100), ("i3", 200), ("i1", 50)];
    let mut orders = vec![];
    for perm in [[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]] {
        let mut s = FeatureShardState::new(settings());
        for i in perm {
            s.apply_user_event(&like("u", likes[i].0, likes[i].1));
        }
        orders.push(s.recent_likes(key_of("u")));
    }
    assert_eq!(orders[0], vec![key_of("i1"), key_of("i3")], "newest first, capped at 2");
    assert!(orders.iter().all(|o| *o == orders[0]), "{orders:?}");
}

#[test]
fn a_colliding_id_never_writes_into_anothers_record() {
    let mut s = FeatureShardState::new(settings());
    // A second id under u1's key, as a hash collision would give.
    s.apply_user_event(&like("u1", "i1", 5));
    s.apply_user_event(&UserEvent { user_id: "intruder".into(), ..like("u1", "i2", 6) });
    assert_eq!(s.recent_likes(key_of("u1")), vec![key_of("i1")], "the intruder's like is dropped");
    s.upsert_item(&ItemRecord { price: 99.0, ..item("i1") });
    let r = s.index[&key_of("i1")];
    s.index.insert(key_of("i1-twin"), r); // i1-twin now shares i1's row, as a collision would
    s.upsert_item(&ItemRecord { id: "i1-twin".into(), price: 1.0, ..item("i1") });
    let rows = s.item_features(&[key_of("i1")], &[ItemFeat::Price], &[], 4600);
    assert_eq!(rows.values, vec![99.0], "i1 keeps its own attributes");
    assert_eq!(&*s.heads[r as usize].id, "i1");
}

#[test]
fn seen_filter_keeps_two_generations_in_any_order() {
    let day = SEEN_GENERATION_SECS;
    let t = 1_700_000_000 - 1_700_000_000 % day;
    let seen = [(1u64, t), (2, t + day), (3, t + 2 * day), (4, t + 2 * day + 5)];
    let mut a = SeenFilter::new(4, 0.01);
    let mut b = SeenFilter::new(4, 0.01);
    seen.iter().for_each(|(i, ts)| a.insert(*i, *ts));
    seen.iter().rev().for_each(|(i, ts)| b.insert(*i, *ts));
    for f in [&a, &b] {
        assert!(f.contains(2) && f.contains(3) && f.contains(4));
        assert!(!f.contains(1), "the oldest generation was dropped");
    }
    assert_eq!(postcard::to_allocvec(&a).unwrap(), postcard::to_allocvec(&b).unwrap());
}

#[test]
fn user_events_update_profile() {
    let mut s = FeatureShardState::new(settings());
    let ev = |item: &str, action| UserEvent {
        user: key_of("u1"),
        user_id: "u1".into(),
        item: key_of(item),
        author_key: key_of("a1"),
        topic: 2,
        embedding: Arc::from(vec![0.0, 1.0, 0.0, 0.0]),
        action,
        ts: 100,
    };
    let events = [("i1", Action::Impression), ("i1", Action::Like), ("i2", Action::Like), ("i3", Action::Like)];
    for (n, (i, a)) in events.into_iter().enumerate() {
        s.apply_user_event(&UserEvent { ts: 100 + n as i64, ..ev(i, a) });
    }
    let snap = s.snapshot(key_of("u1"));
    assert!(snap.seen.as_ref().unwrap().contains(key_of("i1")));
    assert_eq!(snap.recent_likes, vec![key_of("i3"), key_of("i2")]);
    assert_eq!(snap.topic_affinity[2], 6.0);
    assert_eq!(snap.embedding[1], 1.0);
}
