//! The topic freshness source through the public API against a real `recsys node` process: a
//! user's engagement makes a topic theirs, and that topic's newest items — which nothing else
//! would retrieve (no engagement, no follows) — are served, tagged `topic_fresh`, and counted in
//! coverage; older items of the topic beyond `retrieval.topic_fresh_per_topic` are not.
mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{start_node, temp_dir, wait_health};
use recsys::api::pb;
use recsys::api::pb::ingest_client::IngestClient;
use recsys::api::pb::recommender_client::RecommenderClient;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_top_topic_brings_its_newest_items() {
    let dir = temp_dir("topic-fresh");
    let node = start_node(&dir, &[]).expect("node starts");
    wait_health(&node.addr, Duration::from_secs(60)).await;
    let ch = recsys::cli::connect(&node.addr).await.unwrap();
    let mut ing = IngestClient::new(ch.clone());
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    // Topic 3: 60 items, t0 the newest; topic 4: 10 items, as fresh. Authors nobody follows.
    let item = |id: String, topic: u32, age_min: i64| pb::Item {
        item_id: id,
        author_id: format!("author-{topic}"),
        topic,
        in_stock: true,
        quality: 0.5,
        created_at: now - 60 * age_min - 60,
        ..Default::default()
    };
    let mut items: Vec<pb::Item> = (0..60).map(|i| item(format!("t{i}"), 3, i)).collect();
    items.extend((0..10).map(|i| item(format!("o{i}"), 4, i)));
    let r = ing.upsert_items(pb::UpsertItemsRequest { items }).await.unwrap().into_inner();
    assert_eq!((r.accepted, r.rejected), (70, 0), "{:?}", r.rejections);
    // The reader likes the three oldest items of topic 3: topic 3 is their top topic.
    let events: Vec<pb::Event> = ["t57", "t58", "t59"]
        .iter()
        .enumerate()
        .map(|(i, it)| pb::Event {
            event_id: format!("like-{i}"),
            user_id: "reader".into(),
            item_id: it.to_string(),
            action: pb::Action::Like as i32,
            event_time_ms: now * 1000 - 60_000 + i as i64,
            ..Default::default()
        })
        .collect();
    let r = ing.log_events(pb::LogEventsRequest { events }).await.unwrap().into_inner();
    assert_eq!(r.accepted, 3, "{:?}", r.rejections);

    let mut rec = RecommenderClient::new(ch);
    let mut served = Vec::new();
    let mut token = String::new();
    let mut first = None;
    for _ in 0..20 {
        let req = pb::RecommendRequest {
            user_id: "reader".into(),
            surface: "home".into(),
            k: 20,
            page_token: token.clone(),
            ..Default::default()
        };
        let page = rec.recommend(req).await.unwrap().into_inner();
        first.get_or_insert(page.coverage.clone().unwrap());
        served.extend(page.items);
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    let cov = first.unwrap();
    assert!(!cov.degraded, "{cov:?}");
    let per_topic = 50; // retrieval.topic_fresh_per_topic
    assert_eq!(cov.generator_candidates["topic_fresh"], per_topic, "{cov:?}");
    let fresh: BTreeSet<String> =
        served.iter().filter(|i| i.sources.iter().any(|s| s == "topic_fresh")).map(|i| i.item_id.clone()).collect();
    let newest: BTreeSet<String> = (0..per_topic).map(|i| format!("t{i}")).collect();
    assert_eq!(fresh, newest, "the topic's 50 newest items, each tagged topic_fresh");
    assert!(served.iter().all(|i| !i.item_id.starts_with('o')), "topic 4 is not the reader's");
    // Without engagement, nothing but trending (empty here) would have found them.
    assert!(served.iter().filter(|i| fresh.contains(&i.item_id)).all(|i| i.sources == ["topic_fresh"]));
}
