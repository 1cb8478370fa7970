//! A three-node cluster of real `recsys node` processes on loopback: the nodes agree on one ring,
//! every partition lives on two of them and no node holds them all, data written through one
//! node is recommended through another, and a page token minted on one node works on another.
mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use common::Cluster;
use recsys::api::pb;
use recsys::api::pb::admin_client::AdminClient;
use recsys::api::pb::recommender_client::RecommenderClient;
use recsys::cli::load::{load_world, synthetic_spec};
use recsys::world::World;

/// Small world, one scorer per node, short gossip: what a 2-core machine runs three of.
pub const OVERRIDES: &str = r#"
[cluster]
replication_factor = 2
anti_entropy_interval_ms = 2000
[scoring]
scorers = 1
[store]
cache_capacity_mb = 16
"#;

fn req(user: &str, k: u32) -> pb::RecommendRequest {
    pb::RecommendRequest { user_id: user.into(), surface: "home".into(), k, explain: true, ..Default::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_partitions_and_serve_each_others_data() {
    let cluster = Cluster::start("cluster3", 3, OVERRIDES);
    cluster.wait_serving().await;

    // Every node names all three, under the same epoch and digest.
    let mut digests = HashSet::new();
    let mut status = Vec::new();
    for addr in &cluster.addrs {
        let ch = recsys::cli::connect(addr).await.unwrap();
        // Each node learns of the others' SERVING state by gossip: poll (bounded) until it has.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let s = loop {
            let s =
                AdminClient::new(ch.clone()).cluster_status(pb::ClusterStatusRequest {}).await.unwrap().into_inner();
            if s.nodes.iter().all(|n| n.state == "serving" && n.live) || std::time::Instant::now() > end {
                break s;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        };
        let names: HashSet<&str> = s.nodes.iter().map(|n| n.node_id.as_str()).collect();
        assert_eq!(names, HashSet::from(["n1", "n2", "n3"]), "{addr}");
        assert!(s.nodes.iter().all(|n| n.state == "serving" && n.live), "{:?}", s.nodes);
        assert!(s.nodes.iter().all(|n| n.ring_epoch == s.ring_epoch && n.ring_digest == s.ring_digest));
        digests.insert((s.ring_epoch, s.ring_digest.clone()));
        status.push(s);
    }
    assert_eq!(digests.len(), 1, "one ring: {digests:?}");
    let s = &status[0];
    assert_eq!(s.replication_factor, 2);
    assert_eq!(s.partitions.len(), 2 * s.partitions_per_role as usize);
    let mut held: HashMap<&str, usize> = HashMap::new();
    for p in &s.partitions {
        assert_eq!(p.replicas.len(), 2, "{}/{} on {:?}", p.role, p.partition, p.replicas);
        assert_ne!(p.replicas[0], p.replicas[1]);
        assert!(p.live.iter().all(|l| *l));
        for r in &p.replicas {
            *held.entry(r.as_str()).or_default() += 1;
        }
    }
    for (node, n) in &held {
        assert!(*n < s.partitions.len(), "{node} holds every partition");
    }
    assert_eq!(held.len(), 3, "every node holds some partitions: {held:?}");

    // Write through n1, read through n3.
    let world = Arc::new(World::generate(synthetic_spec(11, 3000, 300, 30_000)));
    let ch1 = recsys::cli::connect(&cluster.addrs[0]).await.unwrap();
    let loaded = load_world(ch1, world.clone(), 2000, true).await.unwrap();
    assert_eq!(loaded.events, 30_000);
    let mut counts = Vec::new();
    for (i, addr) in cluster.addrs.iter().enumerate() {
        let ch = recsys::cli::connect(addr).await.unwrap();
        let s = AdminClient::new(ch).cluster_status(pb::ClusterStatusRequest {}).await.unwrap().into_inner();
        assert!(s.items > 0 && s.items < 3000, "n{} holds {} of 3000 items: only its partitions", i + 1, s.items);
        counts.push(s.items);
        println!(
            "n{}: {} items, {} users, {} events held; resident memory {:.0} MiB",
            i + 1,
            s.items,
            s.users,
            s.events,
            common::rss_mib(cluster.pid(i))
        );
    }
    // R = 2 over 3 nodes: each item is held twice in all.
    assert_eq!(counts.iter().sum::<u64>(), 2 * 3000);

    let user = world.users.iter().max_by_key(|u| u.follows.len()).unwrap().id.clone();
    let mut rec3 = RecommenderClient::new(recsys::cli::connect(&cluster.addrs[2]).await.unwrap());
    let p1 = rec3.recommend(req(&user, 10)).await.unwrap().into_inner();
    assert_eq!(p1.items.len(), 10);
    let cov = p1.coverage.clone().unwrap();
    assert!(!cov.degraded, "{cov:?}");
    assert!(p1.items.iter().all(|i| i.explanation.as_ref().unwrap().scored_by == "value_model"));
    // Every stage asked partitions held on other nodes too (the fan-out is real).
    let features = cov.stages.iter().find(|s| s.stage == "filtering").unwrap();
    assert!(features.partitions_asked > 10, "{features:?}");
    assert!(p1.next_page_token.contains(".n3."), "the token names the node holding the list");

    // Page 2 through n2: cut from n3's list, no repeats, ranks continue.
    let mut rec2 = RecommenderClient::new(recsys::cli::connect(&cluster.addrs[1]).await.unwrap());
    let p2 = rec2
        .recommend(pb::RecommendRequest { page_token: p1.next_page_token.clone(), ..req(&user, 10) })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(p2.request_id, p1.request_id);
    assert!(!p2.items.is_empty());
    let first: HashSet<&str> = p1.items.iter().map(|i| i.item_id.as_str()).collect();
    assert!(p2.items.iter().all(|i| !first.contains(i.item_id.as_str())), "page 2 repeats page 1");
    assert!(p2.items[0].rank > 10);

    // Later pages are re-filtered: delete the next page's first item through n1, then page 2
    // (through n1 this time) must not serve it.
    let doomed = p2.items[0].item_id.clone();
    let mut ing =
        recsys::api::pb::ingest_client::IngestClient::new(recsys::cli::connect(&cluster.addrs[0]).await.unwrap());
    let d = ing.delete_items(pb::DeleteItemsRequest { item_ids: vec![doomed.clone()] }).await.unwrap().into_inner();
    assert_eq!(d.accepted, 1);
    let mut rec1 = RecommenderClient::new(recsys::cli::connect(&cluster.addrs[0]).await.unwrap());
    let again = rec1
        .recommend(pb::RecommendRequest { page_token: p1.next_page_token.clone(), ..req(&user, 10) })
        .await
        .unwrap()
        .into_inner();
    assert!(again.items.iter().all(|i| i.item_id != doomed), "a deleted item was served on page 2");
    assert_eq!(again.coverage.unwrap().filter_removed.get("page_refilter"), Some(&1));
}

/// Big models on some nodes only: scorers run on n1 alone; n2 and n3 send their matrices there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scorers_on_one_node_of_three_serve_the_others() {
    let overrides = OVERRIDES.replace("[cluster]\n", "[cluster]\nscorer_nodes = [\"n1\"]\n");
    let cluster = Cluster::start("cluster-scorers", 3, &overrides);
    cluster.wait_serving().await;
    let world = Arc::new(World::generate(synthetic_spec(12, 2000, 200, 10_000)));
    load_world(recsys::cli::connect(&cluster.addrs[1]).await.unwrap(), world.clone(), 2000, true).await.unwrap();
    let s3 = AdminClient::new(recsys::cli::connect(&cluster.addrs[2]).await.unwrap())
        .cluster_status(pb::ClusterStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s3.scorer_nodes, vec!["n1"]);
    let me = s3.nodes.iter().find(|n| n.node_id == "n3").unwrap();
    assert_eq!(me.scorers, 0, "n3 runs no scorers");
    let user = world.users.iter().max_by_key(|u| u.follows.len()).unwrap().id.clone();
    for addr in &cluster.addrs[1..] {
        let mut rec = RecommenderClient::new(recsys::cli::connect(addr).await.unwrap());
        let r = rec.recommend(req(&user, 10)).await.unwrap().into_inner();
        let cov = r.coverage.unwrap();
        assert!(!cov.degraded, "{addr}: {cov:?}");
        assert!(
            r.items.iter().all(|i| i.explanation.as_ref().unwrap().scored_by == "value_model"),
            "{addr}: scored by the models on n1"
        );
    }
}
