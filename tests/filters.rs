//! The filters the seed names, through the public gRPC API against a real `recsys node` process:
//! geo licensing (page 2 included, even when page 2 names another geo than page 1), topics and
//! authors the user hid (a user field and hide events), reported/spam items by report rate; and
//! the new fields' input rules. A hand-made world small enough that every surviving item is
//! served across the pages, so each test compares exact sets.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::{start_node, temp_dir, wait_health};
use recsys::api::pb;
use recsys::api::pb::ingest_client::IngestClient;
use recsys::api::pb::recommender_client::RecommenderClient;
use tonic::transport::Channel;
use tonic::Code;

const ITEMS: usize = 40;

fn now_secs() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64
}

/// `f{i}`: author `au{i % 8}`, topic `i % 5`.
fn item(id: &str, author: &str, topic: u32) -> pb::Item {
    pb::Item {
        item_id: id.into(),
        author_id: author.into(),
        topic,
        geo: "de".into(),
        price: 1.0,
        quality: 0.5,
        duration_secs: 30.0,
        in_stock: true,
        created_at: now_secs() - 3600,
        ..Default::default()
    }
}

struct Events {
    list: Vec<pb::Event>,
    at: i64,
}

impl Events {
    fn add(&mut self, user: &str, item: &str, action: pb::Action, n: usize) {
        for _ in 0..n {
            let id = format!("e{}", self.list.len());
            self.at += 1;
            self.list.push(pb::Event {
                event_id: id,
                user_id: user.into(),
                item_id: item.into(),
                action: action as i32,
                event_time_ms: self.at,
                ..Default::default()
            });
        }
    }
}

/// Every item served to `user` in `geo` over all pages (page 1 with `k`, later pages in
/// `later_geo`), with page 1's per-filter removals.
async fn served(
    ch: &Channel,
    user: &str,
    geo: &str,
    k: u32,
    later_geo: &str,
) -> (Vec<String>, Vec<String>, BTreeMap<String, u32>) {
    let mut rec = RecommenderClient::new(ch.clone());
    let req = |geo: &str, k: u32, token: String| pb::RecommendRequest {
        user_id: user.into(),
        surface: "home".into(),
        k,
        page_token: token,
        context: Some(pb::RequestContext { geo: geo.into() }),
        explain: false,
    };
    let p1 = rec.recommend(req(geo, k, String::new())).await.unwrap().into_inner();
    let cov = p1.coverage.unwrap();
    assert!(!cov.degraded, "{cov:?}");
    let first: Vec<String> = p1.items.iter().map(|i| i.item_id.clone()).collect();
    let mut later = Vec::new();
    let mut token = p1.next_page_token;
    for _ in 0..100 {
        if token.is_empty() {
            break;
        }
        let p = rec.recommend(req(later_geo, 10, token)).await.unwrap().into_inner();
        later.extend(p.items.iter().map(|i| i.item_id.clone()));
        token = p.next_page_token;
    }
    assert!(token.is_empty(), "the pages end");
    let removed: BTreeMap<String, u32> = cov.filter_removed.into_iter().collect();
    (first, later, removed)
}

fn set(a: &[String], b: &[String]) -> BTreeSet<String> {
    a.iter().chain(b).cloned().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn geo_hidden_and_reported_filters_hold_on_every_page() {
    let dir = temp_dir("filters");
    let node = start_node(&dir, &[]).expect("node starts");
    wait_health(&node.addr, Duration::from_secs(60)).await;
    let ch = recsys::cli::connect(&node.addr).await.unwrap();
    let mut ing = IngestClient::new(ch.clone());

    let mut items: Vec<pb::Item> =
        (0..ITEMS).map(|i| item(&format!("f{i}"), &format!("au{}", i % 8), (i % 5) as u32)).collect();
    items.push(pb::Item { blocked_regions: vec!["de".into()], ..item("not-in-de", "au-x", 0) });
    items.push(pb::Item { allowed_regions: vec!["us".into()], ..item("only-us", "au-y", 0) });
    items.push(item("spam", "au-s", 4));
    items.push(item("reported-once", "au-r", 4));
    let all: BTreeSet<String> = items.iter().map(|i| i.item_id.clone()).collect();
    let r = ing.upsert_items(pb::UpsertItemsRequest { items }).await.unwrap().into_inner();
    assert_eq!((r.accepted, r.rejected), (all.len() as u32, 0), "{:?}", r.rejections);
    let users = vec![
        pb::User { user_id: "viewer".into(), geo: "de".into(), ..Default::default() },
        pb::User { user_id: "hider".into(), geo: "de".into(), hidden_topics: vec![1], ..Default::default() },
        pb::User { user_id: "hider2".into(), geo: "de".into(), ..Default::default() },
    ];
    let r = ing.upsert_users(pb::UpsertUsersRequest { users }).await.unwrap().into_inner();
    assert_eq!(r.accepted, 3, "{:?}", r.rejections);

    // Every item trends (three clicks from the crowd); the spam item is clicked a lot too, and
    // reported 5 times in 20 impressions; the control item once in 50.
    let mut ev = Events { list: vec![], at: now_secs() * 1000 - 600_000 };
    for it in &all {
        ev.add(&format!("crowd-{it}"), it, pb::Action::Click, 3);
    }
    ev.add("crowd-s1", "spam", pb::Action::Click, 30);
    ev.add("crowd-s2", "spam", pb::Action::Impression, 20);
    ev.add("crowd-s3", "spam", pb::Action::Report, 5);
    ev.add("crowd-r1", "reported-once", pb::Action::Impression, 50);
    ev.add("crowd-r2", "reported-once", pb::Action::Report, 1);
    // hider2 hides two items of author au3 (f3, f11: the author is hidden at 2) and three of
    // topic 2 by three other authors (f2, f7, f12: the topic is hidden at 3, the authors not).
    for it in ["f3", "f11", "f2", "f7", "f12"] {
        ev.add("hider2", it, pb::Action::Hide, 1);
    }
    let r = ing.log_events(pb::LogEventsRequest { events: ev.list.clone() }).await.unwrap().into_inner();
    assert_eq!((r.accepted, r.rejected), (ev.list.len() as u32, 0), "{:?}", r.rejections);

    let without =
        |gone: &[&str]| -> BTreeSet<String> { all.iter().filter(|i| !gone.contains(&i.as_str())).cloned().collect() };

    // Geo licensing for the profile's geo (de): neither the item blocked in de nor the one
    // licensed to us only, on any page; the spam item is gone too, the control item is not.
    let (p1, later, removed) = served(&ch, "viewer", "", 10, "").await;
    assert_eq!(set(&p1, &later), without(&["not-in-de", "only-us", "spam"]));
    assert_eq!(removed["geo_licence"], 2, "{removed:?}");
    assert_eq!(removed["reported"], 1, "{removed:?}");

    // The same user asking for us: both licensed items are served (the filter judges the geo).
    let (p1, later, removed) = served(&ch, "viewer", "us", 10, "us").await;
    assert_eq!(set(&p1, &later), without(&["spam"]));
    assert_eq!(removed["geo_licence"], 0);

    // A list built for us, its later pages asked for de: never the item blocked in de, nor the one
    // licensed to us only (the page re-filter judges the later request's geo).
    let (p1, later, _) = served(&ch, "viewer", "us", 1, "de").await;
    let us_only: BTreeSet<String> = ["not-in-de", "only-us"].iter().map(|s| s.to_string()).collect();
    assert!(later.iter().all(|i| !us_only.contains(i)), "page 2+ in de served {later:?}");
    let mut want: BTreeSet<String> = without(&["spam"]).difference(&us_only).cloned().collect();
    want.extend(p1.iter().cloned());
    assert_eq!(set(&p1, &later), want, "everything else is still served");

    // Unknown region (a user the node never saw, no geo): an allow-listed item is never served.
    let (p1, later, _) = served(&ch, "nobody", "", 10, "").await;
    assert_eq!(set(&p1, &later), without(&["only-us", "spam"]));

    // Topics the user hid in their profile.
    let (p1, later, removed) = served(&ch, "hider", "", 10, "").await;
    let topic1: Vec<String> = (0..ITEMS).filter(|i| i % 5 == 1).map(|i| format!("f{i}")).collect();
    let mut gone: Vec<&str> = topic1.iter().map(|s| s.as_str()).collect();
    gone.extend(["not-in-de", "only-us", "spam"]);
    assert_eq!(set(&p1, &later), without(&gone));
    assert_eq!(removed["hidden_topic"], topic1.len() as u32, "{removed:?}");

    // Topics and authors hidden by hide events: author au3 (2 hides), topic 2 (3 hides); the
    // authors hidden once (au2, au7, au4) keep their other items.
    let (p1, later, removed) = served(&ch, "hider2", "", 10, "").await;
    let hidden: BTreeSet<String> = (0..ITEMS).filter(|i| i % 8 == 3 || i % 5 == 2).map(|i| format!("f{i}")).collect();
    let mut gone: Vec<&str> = hidden.iter().map(|s| s.as_str()).collect();
    gone.extend(["not-in-de", "only-us", "spam"]);
    assert_eq!(set(&p1, &later), without(&gone));
    let by_topic = (0..ITEMS).filter(|i| i % 5 == 2).count() as u32;
    let by_author_only = (0..ITEMS).filter(|i| i % 8 == 3 && i % 5 != 2).count() as u32;
    assert_eq!((removed["hidden_topic"], removed["hidden_author"]), (by_topic, by_author_only), "{removed:?}");
    assert!(["f10", "f15", "f4"].iter().all(|i| set(&p1, &later).contains(*i)), "authors hidden once stay");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_fields_are_validated_and_named() {
    let dir = temp_dir("filters-input");
    let node = start_node(&dir, &[]).expect("node starts");
    wait_health(&node.addr, Duration::from_secs(60)).await;
    let ch = recsys::cli::connect(&node.addr).await.unwrap();
    let mut ing = IngestClient::new(ch.clone());
    let items = vec![
        pb::Item { allowed_regions: vec!["us".into(), "d\u{1}e".into()], ..item("bad1", "a", 0) },
        pb::Item { blocked_regions: vec![String::new()], ..item("bad2", "a", 0) },
        pb::Item { blocked_regions: vec!["x".repeat(65)], ..item("bad3", "a", 0) },
        pb::Item { allowed_regions: vec!["us".into()], blocked_regions: vec!["de".into()], ..item("good", "a", 0) },
    ];
    let r = ing.upsert_items(pb::UpsertItemsRequest { items }).await.unwrap().into_inner();
    assert_eq!((r.accepted, r.rejected), (1, 3), "{:?}", r.rejections);
    assert!(r.rejections[0].starts_with("items[0].allowed_regions[1]: "), "{:?}", r.rejections);
    assert!(r.rejections[1].starts_with("items[1].blocked_regions[0]: "), "{:?}", r.rejections);
    assert!(r.rejections[2].starts_with("items[2].blocked_regions[0]: "), "{:?}", r.rejections);
    let users = vec![
        pb::User { user_id: "u1".into(), hidden_topics: vec![0, 20], ..Default::default() },
        pb::User { user_id: "u2".into(), hidden_topics: vec![19], ..Default::default() },
    ];
    let r = ing.upsert_users(pb::UpsertUsersRequest { users }).await.unwrap().into_inner();
    assert_eq!((r.accepted, r.rejected), (1, 1), "{:?}", r.rejections);
    assert!(r.rejections[0].starts_with("users[0].hidden_topics[1]: 20 is outside [0, 20)"), "{:?}", r.rejections);

    let mut rec = RecommenderClient::new(ch);
    let bad = pb::RecommendRequest {
        user_id: "u2".into(),
        surface: "home".into(),
        k: 5,
        context: Some(pb::RequestContext { geo: "d\u{0}e".into() }),
        ..Default::default()
    };
    let e = rec.recommend(bad).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().starts_with("context.geo: "), "{}", e.message());
}
