//! The control plane against real node processes: what gossip cannot do (a forged participant
//! changes nothing), what the metadata log decides (two changes at once: one wins, the other is
//! told which), and what a ring change cannot lose (a join while a replica is down waits for it;
//! acknowledged writes are on every owner afterwards, checked read-only before anything is
//! re-sent).
//!
//! On 7741852 (gossip-decided rings) each of these fails: the forged ring spec is adopted (every
//! node drops its partitions and exits), both concurrent changes return OK, and the join commits
//! without the down replica, which then drops the only copies of the writes it acknowledged.
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chitchat::transport::UdpTransport;
use chitchat::{spawn_chitchat, ChitchatConfig, ChitchatId, FailureDetectorConfig};
use common::{status, Cluster};
use recsys::api::pb;
use recsys::api::pb::admin_client::AdminClient;
use recsys::api::pb::ingest_client::IngestClient;
use recsys::api::pb::recommender_client::RecommenderClient;
use recsys::cli::load::{load_world, synthetic_spec};
use recsys::world::World;

const PARTITIONS: u32 = 16;

fn overrides(secret: Option<&str>) -> String {
    let secret = secret.map(|s| format!("secret = \"{s}\"\n")).unwrap_or_default();
    format!(
        "[cluster]\nreplication_factor = 2\npartitions_per_role = {PARTITIONS}\nanti_entropy_interval_ms = 2000\n{secret}\
         [scoring]\nscorers = 1\n[store]\ncache_capacity_mb = 16\n[ingest]\nreplica_timeout_ms = 2000\n"
    )
}

/// Waits (bounded, polling status) until the node at `via` sees `node` with the given liveness.
async fn sees_node(via: &str, node: &str, live: bool) {
    let end = Instant::now() + Duration::from_secs(30);
    while !status(via).await.nodes.iter().any(|n| n.node_id == node && n.live == live) {
        assert!(Instant::now() < end, "{via} never saw {node} live={live}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A gossip participant outside the cluster: chitchat with the cluster's name.
async fn forger(id: ChitchatId, seeds: Vec<String>, kvs: Vec<(String, String)>) -> chitchat::ChitchatHandle {
    let listen = id.gossip_advertise_addr;
    let config = ChitchatConfig {
        chitchat_id: id,
        cluster_id: "recsys".into(),
        gossip_interval: Duration::from_millis(100),
        listen_addr: listen,
        seed_nodes: seeds,
        failure_detector_config: FailureDetectorConfig {
            phi_threshold: 8.0,
            sampling_window_size: 1000,
            max_interval: Duration::from_secs(2),
            initial_interval: Duration::from_millis(100),
            dead_node_grace_period: Duration::from_secs(3600),
        },
        marked_for_deletion_grace_period: Duration::from_secs(3600),
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: chitchat::ProtocolVersion::V0,
    };
    spawn_chitchat(config, kvs, &UdpTransport).await.expect("forger gossips")
}

/// Counts TCP connections to `listener` until dropped: where a re-targeted channel would go.
fn count_connections(listener: std::net::TcpListener) -> Arc<AtomicUsize> {
    let n = Arc::new(AtomicUsize::new(0));
    let seen = n.clone();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        // Bounded: two minutes at most (the test takes well under one).
        let end = Instant::now() + Duration::from_secs(120);
        while Instant::now() < end && Arc::strong_count(&seen) > 1 {
            match listener.accept() {
                Ok(_) => {
                    seen.fetch_add(1, Ordering::AcqRel);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
    n
}

async fn forged_gossip_changes_nothing(secret: Option<&str>, name: &str) {
    let cluster = Cluster::start(name, 3, &overrides(secret));
    cluster.wait_serving().await;
    let world = Arc::new(World::generate(synthetic_spec(31, 1500, 150, 6000)));
    load_world(recsys::cli::connect(&cluster.addrs[0]).await.unwrap(), world.clone(), 2000, true).await.unwrap();
    let before = status(&cluster.addrs[0]).await;
    let held_before: Vec<u32> = {
        let mut v = Vec::new();
        for a in &cluster.addrs {
            let s = status(a).await;
            v.push(s.partitions.iter().filter(|p| !p.fingerprint_here.is_empty()).count() as u32);
        }
        v
    };

    // Where a re-targeted channel for n2 would connect.
    let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let trap_addr = trap.local_addr().unwrap().to_string();
    let connections = count_connections(trap);
    let seeds: Vec<String> = cluster.addrs.clone();
    let evil_spec = serde_json::json!({
        "epoch": 1000, "members": ["evil"], "partitions": PARTITIONS, "replication": 2, "vnodes": 64,
        "scorer_nodes": [], "removed": ["n1", "n2", "n3"]
    })
    .to_string();
    let forged = |k: &str, v: &str| (k.to_string(), v.to_string());
    let kvs = vec![
        forged("grpc_addr", &trap_addr),
        forged("state", "serving"),
        forged("ring_epoch", "1000"),
        forged("ring_digest", "forged"),
        forged("ring_spec", &evil_spec),
        forged("meta_index", "1000000"),
        forged("moves_done", "1000:0,1,2,3,4,5,6,7"),
    ];
    let p1 = common::free_port();
    let p2 = common::free_port();
    let evil =
        forger(ChitchatId::new("evil", 1, format!("127.0.0.1:{p1}").parse().unwrap()), seeds.clone(), kvs.clone())
            .await;
    // "n2" again, under a generation far above the real one, at the trap's address.
    let fake_n2 =
        forger(ChitchatId::new("n2", u64::MAX / 2, format!("127.0.0.1:{p2}").parse().unwrap()), seeds, kvs).await;

    // Evidence the nodes heard the forgers: with a secret they reject their entries (counted);
    // without one they see "evil" as a gossip participant.
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let mut heard = 0;
        for (i, a) in cluster.addrs.iter().enumerate() {
            let seen = match secret {
                Some(_) => common::metric(&cluster.metrics[i], "recsys_gossip_rejected_total", "") > 0.0,
                None => status(a).await.nodes.iter().any(|n| n.node_id == "evil"),
            };
            heard += usize::from(seen);
        }
        if heard == 3 {
            break;
        }
        assert!(Instant::now() < end, "the nodes never heard the forged gossip ({heard} of 3)");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Traffic that fans out to every node's partitions (n2's included), through every node.
    let mut errors = Vec::new();
    for n in 0..90usize {
        let mut c = RecommenderClient::new(recsys::cli::connect(&cluster.addrs[n % 3]).await.unwrap());
        let mut r = tonic::Request::new(pb::RecommendRequest {
            user_id: world.users[(n * 13) % world.users.len()].id.clone(),
            surface: "home".into(),
            k: 10,
            ..Default::default()
        });
        r.set_timeout(Duration::from_millis(500));
        match c.recommend(r).await {
            Ok(r) if r.get_ref().coverage.as_ref().is_some_and(|c| c.degraded) => errors.push("degraded".to_string()),
            Ok(_) => {}
            Err(e) => errors.push(format!("{:?}: {}", e.code(), e.message())),
        }
    }
    assert!(errors.is_empty(), "calls failed or degraded beside the forgers: {errors:?}");
    assert_eq!(connections.load(Ordering::Acquire), 0, "a node connected to the forged address of n2");
    for (i, a) in cluster.addrs.iter().enumerate() {
        let s = status(a).await;
        assert_eq!(
            (s.ring_epoch, &s.ring_digest),
            (before.ring_epoch, &before.ring_digest),
            "n{}'s ring changed",
            i + 1
        );
        let held = s.partitions.iter().filter(|p| !p.fingerprint_here.is_empty()).count() as u32;
        assert_eq!(held, held_before[i], "n{} holds other partitions", i + 1);
        assert_eq!(common::metric(&cluster.metrics[i], "recsys_partitions_dropped_total", ""), 0.0);
        let n2 = s.nodes.iter().find(|n| n.node_id == "n2").expect("n2 listed");
        assert_ne!(n2.address, trap_addr, "n{} routes n2 to the forger", i + 1);
    }
    let _ = evil.shutdown().await;
    let _ = fake_n2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_gossip_participant_changes_nothing_with_a_secret() {
    forged_gossip_changes_nothing(Some("cp-secret"), "cp-forged-secret").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_gossip_participant_changes_nothing_without_a_secret() {
    forged_gossip_changes_nothing(None, "cp-forged-open").await;
}

/// `drain n3` through n1 and `drain n2` through n2 at the same moment: the metadata log decides
/// one; the other caller gets FAILED_PRECONDITION naming the change that won.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_changes_at_once_one_wins_and_the_other_is_told_which() {
    let mut cluster = Cluster::start("cp-concurrent", 3, &overrides(None));
    cluster.wait_serving().await;
    let mut a1 = AdminClient::new(recsys::cli::connect(&cluster.addrs[0]).await.unwrap());
    let mut a2 = AdminClient::new(recsys::cli::connect(&cluster.addrs[1]).await.unwrap());
    let (r1, r2) = tokio::join!(
        a1.drain(pb::DrainRequest { node_id: "n3".into() }),
        a2.drain(pb::DrainRequest { node_id: "n2".into() })
    );
    let (won, lost, winner, loser_name) = match (&r1, &r2) {
        (Ok(_), Err(e)) => ("n3", e, 2usize, "n2"),
        (Err(e), Ok(_)) => ("n2", e, 1usize, "n3"),
        other => panic!("exactly one change must win: {other:?}"),
    };
    assert_eq!(lost.code(), tonic::Code::FailedPrecondition, "{lost:?}");
    assert!(lost.message().contains(&format!("drain {won}")), "the loser is told which change won: {}", lost.message());
    // The winner's drain runs to its end; the loser is still a member.
    let st = cluster.wait_exit(winner, Duration::from_secs(120)).await;
    assert!(st.success(), "{won} stopped after its drain: {st:?}");
    let remaining: Vec<&str> = ["n1", "n2", "n3"].into_iter().filter(|n| *n != won).collect();
    let s = common::wait_settled(&cluster.addrs[0], &remaining, 2, Duration::from_secs(60)).await;
    assert!(s.nodes.iter().any(|n| n.node_id == loser_name && n.live));
}

/// Finding 1 of the control-plane review: partition p on [n1, n2]; n1 frozen; writes to p acked
/// by n2 alone; n2 killed; n1 resumed; n4 joins. The join must wait for n2 (a previous owner
/// that was not removed) before it commits, and once n2 is back every acknowledged write is on
/// every owner, checked read-only before anything is re-sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_while_a_replica_is_down_loses_no_acknowledged_write() {
    let mut cluster = Cluster::start("cp-join-down", 3, &overrides(None));
    cluster.wait_serving().await;
    let world = Arc::new(World::generate(synthetic_spec(37, 1500, 150, 6000)));
    load_world(recsys::cli::connect(&cluster.addrs[2]).await.unwrap(), world.clone(), 2000, true).await.unwrap();
    let via = cluster.addrs[2].clone();
    let sees = |node: &'static str, live: bool| sees_node(&via, node, live);
    cluster.signal(0, "STOP");
    sees("n1", false).await;
    let mut ing = IngestClient::new(recsys::cli::connect(&via).await.unwrap());
    let mut ledger = Vec::new();
    for batch in 0..15 {
        let evs = common::ledger_events(&world, "cp-join", batch);
        let mut r = tonic::Request::new(pb::LogEventsRequest { events: evs.clone() });
        r.set_timeout(Duration::from_secs(10));
        ing.log_events(r).await.unwrap_or_else(|e| panic!("batch {batch}: {e:?}"));
        ledger.push(evs);
    }
    cluster.kill9(1);
    sees("n2", false).await;
    cluster.signal(0, "CONT");
    sees("n1", true).await;
    let n4 = cluster.join();
    // The join's moves of partitions n2 held wait for n2: evidence, then n2 comes back.
    let end = Instant::now() + Duration::from_secs(60);
    while common::metric(&cluster.metrics[n4], "recsys_move_failures_total", "") == 0.0 {
        assert!(Instant::now() < end, "no move waited for the down previous owner n2");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = status(&cluster.addrs[0]).await;
    assert!(!s.target_members.is_empty(), "the join committed while n2, a previous owner, was down");
    cluster.restart(1);
    common::wait_settled(&cluster.addrs[0], &["n1", "n2", "n3", "n4"], 2, Duration::from_secs(120)).await;
    common::wait_health(&cluster.addrs[n4], Duration::from_secs(30)).await;
    let nodes: Vec<(String, String)> = (0..4).map(|i| (cluster.ids[i].clone(), cluster.addrs[i].clone())).collect();
    let missing = common::ledger_missing(&nodes, &ledger, PARTITIONS, 2, None).await;
    assert!(missing.is_empty(), "acknowledged writes missing after the join: {missing:#?}");
}

/// Data plane, finding 2: an acknowledged write is on two disks. n1 is frozen (gossip calls it
/// down), so writes through n3 to partitions on [n1, n2] are taken by n2 alone and owed to n1 as
/// a durable hint on n3. n3 and n2 are then SIGKILLed: only n3's disk holds n1's share. n1
/// resumes, n3 restarts, and n1 must end up holding every acknowledged event of its partitions
/// shared with n2 (still dead) — which only the hints kept across n3's restart can give it. On
/// 7741852 a replica gossip called down got no hint, and hints lived in memory only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hints_for_a_down_replica_are_durable_and_survive_the_coordinators_restart() {
    let mut cluster = Cluster::start("dp-hints", 3, &overrides(None));
    cluster.wait_serving().await;
    let world = Arc::new(World::generate(synthetic_spec(41, 1500, 150, 6000)));
    load_world(recsys::cli::connect(&cluster.addrs[2]).await.unwrap(), world.clone(), 2000, true).await.unwrap();
    let with_n2: Vec<u32> = status(&cluster.addrs[0])
        .await
        .partitions
        .iter()
        .filter(|p| p.role == "feature" && p.replicas.iter().any(|r| r == "n1") && p.replicas.iter().any(|r| r == "n2"))
        .map(|p| p.partition)
        .collect();
    assert!(!with_n2.is_empty(), "some feature partition lives on n1 and n2");
    cluster.signal(0, "STOP");
    sees_node(&cluster.addrs[2], "n1", false).await;
    let mut ing = IngestClient::new(recsys::cli::connect(&cluster.addrs[2]).await.unwrap());
    let mut ledger = Vec::new();
    for batch in 0..15 {
        let evs = common::ledger_events(&world, "dp-hints", batch);
        let mut r = tonic::Request::new(pb::LogEventsRequest { events: evs.clone() });
        r.set_timeout(Duration::from_secs(10));
        ing.log_events(r).await.unwrap_or_else(|e| panic!("batch {batch}: {e:?}"));
        ledger.push(evs);
    }
    cluster.kill9(2);
    cluster.kill9(1);
    cluster.signal(0, "CONT");
    cluster.restart(2);
    common::wait_health(&cluster.addrs[2], Duration::from_secs(60)).await;
    // The events of n1's partitions shared with n2: n1 must come to hold every one of them.
    let wanted: Vec<recsys::api::pb::Event> = ledger
        .iter()
        .flatten()
        .filter(|e| recsys::verify::event_item_op(e, PARTITIONS).is_some_and(|(p, _)| with_n2.contains(&p.partition)))
        .cloned()
        .collect();
    assert!(!wanted.is_empty(), "the ledger touches n1's partitions shared with n2");
    let n1 = vec![(cluster.ids[0].clone(), cluster.addrs[0].clone())];
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let check = recsys::verify::ledger(&n1, wanted.iter(), PARTITIONS, 1, None).await.unwrap();
        if check.missing == 0 && check.problems.is_empty() {
            break;
        }
        assert!(
            Instant::now() < end,
            "n1 lacks {} of {} acknowledged events it owns with n2 (dead): {:?}",
            check.missing,
            check.acked,
            check.problems.iter().take(3).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(common::metric(&cluster.metrics[2], "recsys_hints_delivered_total", "") > 0.0, "n3 delivered hints");
}

/// A node joins a cluster that has a cluster secret: it learns the metadata log from the nodes
/// gossip shows (signed entries), signing each call for that node, and the join commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_a_cluster_with_a_secret() {
    let mut cluster = Cluster::start("cp-join-secret", 3, &overrides(Some("cp-join-secret")));
    cluster.wait_serving().await;
    let n4 = cluster.join();
    common::wait_settled(&cluster.addrs[0], &["n1", "n2", "n3", "n4"], 2, Duration::from_secs(120)).await;
    common::wait_health(&cluster.addrs[n4], Duration::from_secs(30)).await;
}

/// Finding 3, its other half: the minority side of a partition cannot change the ring. n1 and
/// n2 frozen (SIGSTOP): n3 alone sees them down and is asked to remove n1; it cannot reach a
/// majority of the ring's voters and answers UNAVAILABLE (at 7741852 the remove was accepted
/// and, once the partition healed, evicted a healthy node). After n1 and n2 resume, the ring is
/// the one before and n1 serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_minority_side_cannot_remove_a_node() {
    let cluster = Cluster::start("cp-minority", 3, &overrides(None));
    cluster.wait_serving().await;
    let via = cluster.addrs[2].clone();
    let before = status(&via).await;
    cluster.signal(0, "STOP");
    cluster.signal(1, "STOP");
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let s = status(&via).await;
        if s.nodes.iter().filter(|n| (n.node_id == "n1" || n.node_id == "n2") && !n.live).count() == 2 {
            break;
        }
        assert!(Instant::now() < end, "n3 never saw n1 and n2 down");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut admin = AdminClient::new(recsys::cli::connect(&via).await.unwrap());
    let mut r = tonic::Request::new(pb::RemoveNodeRequest { node_id: "n1".into() });
    r.set_timeout(Duration::from_secs(60));
    let e = admin.remove_node(r).await.expect_err("a minority must not remove a node");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("no quorum"), "{}", e.message());
    cluster.signal(0, "CONT");
    cluster.signal(1, "CONT");
    let s = common::wait_settled(&via, &["n1", "n2", "n3"], 2, Duration::from_secs(60)).await;
    assert_eq!(s.ring_epoch, before.ring_epoch, "the ring did not change");
    assert!(s.nodes.iter().any(|n| n.node_id == "n1" && n.live), "{:?}", s.nodes);
}

/// Whether `node`'s address is decided in the metadata log persisted in `data_dir`.
fn logged_addr_of(data_dir: &std::path::Path, node: &str) -> bool {
    let Ok(bytes) = std::fs::read(data_dir.join("meta.json")) else { return false };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) else { return false };
    v["log"].as_array().is_some_and(|log| log.iter().any(|d| d["proposal"]["entry"]["Addr"]["node"] == node))
}

/// A node that lost its data dir must not vote again with no memory of its votes (a voter that
/// forgot an accepted value lets a later proposer decide another in the same slot). Restarted
/// empty, n3 would form the same genesis as before and vote; it is refused, naming the cause and
/// the fix, whether it starts plainly or with --join, and persists no log (a second plain start
/// is refused too). Before this check, n3 formed the genesis again and served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_lost_its_data_dir_is_refused_a_vote() {
    let mut cluster = Cluster::start("cp-lost-dir", 3, &overrides(Some("cp-lost-dir")));
    cluster.wait_serving().await;
    let n1_dir = cluster.dir.join("n1");
    let end = Instant::now() + Duration::from_secs(30);
    while !logged_addr_of(&n1_dir, "n3") {
        assert!(Instant::now() < end, "n3's address never reached n1's metadata log");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    cluster.kill9(2);
    let n3_dir = cluster.dir.join("n3");
    std::fs::remove_dir_all(&n3_dir).unwrap();
    for join in [false, true, false] {
        if join {
            cluster.restart_joining(2);
        } else {
            cluster.restart(2);
        }
        let line = cluster.wait_line(2, "data dir was lost or replaced", Duration::from_secs(60));
        let line = line.unwrap_or_else(|| panic!("n3 (join: {join}) was not refused for its lost data dir"));
        assert!(line.contains("recsys remove n3") && line.contains("--join"), "{line}");
        let st = cluster.wait_exit(2, Duration::from_secs(30)).await;
        assert!(!st.success(), "n3 exits with an error");
        assert!(!n3_dir.join("meta.json").exists(), "the refused node persisted a metadata log");
    }
    // The others go on serving the ring they had.
    common::wait_health(&cluster.addrs[0], Duration::from_secs(10)).await;
}

/// `ingest.write_quorum = 2` with R = 2: a write is acknowledged only when both owners of each
/// partition took it; no hint stands in. With n1 frozen and seen down, a batch touching its
/// partitions is refused (UNAVAILABLE naming the partition and the setting); once n1 is back
/// the same batch is acknowledged and every copy holds it (read-only check). With the default
/// (1) the same situation acknowledges on one owner plus a durable hint (the test above).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_quorum_of_two_refuses_what_one_owner_alone_took() {
    let cluster = Cluster::start("dp-write-quorum", 3, &format!("{}write_quorum = 2\n", overrides(None)));
    cluster.wait_serving().await;
    let world = Arc::new(World::generate(synthetic_spec(43, 1000, 100, 2000)));
    load_world(recsys::cli::connect(&cluster.addrs[2]).await.unwrap(), world.clone(), 2000, true).await.unwrap();
    cluster.signal(0, "STOP");
    sees_node(&cluster.addrs[2], "n1", false).await;
    let mut ing = IngestClient::new(recsys::cli::connect(&cluster.addrs[2]).await.unwrap());
    let evs = common::ledger_events(&world, "dp-write-quorum", 0);
    let mut r = tonic::Request::new(pb::LogEventsRequest { events: evs.clone() });
    r.set_timeout(Duration::from_secs(10));
    let e = ing.log_events(r).await.expect_err("one owner alone must not acknowledge with write_quorum = 2");
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("write_quorum") && e.message().contains("partition"), "{}", e.message());
    cluster.signal(0, "CONT");
    sees_node(&cluster.addrs[2], "n1", true).await;
    let mut r = tonic::Request::new(pb::LogEventsRequest { events: evs.clone() });
    r.set_timeout(Duration::from_secs(10));
    ing.log_events(r).await.expect("both owners up: acknowledged");
    let nodes: Vec<(String, String)> = cluster.ids.iter().cloned().zip(cluster.addrs.iter().cloned()).collect();
    let check = recsys::verify::ledger(&nodes, evs.iter(), PARTITIONS, 2, None).await.unwrap();
    assert_eq!(check.missing, 0, "{:?}", check.problems.iter().take(3).collect::<Vec<_>>());
    assert!(check.problems.is_empty(), "{:?}", check.problems.iter().take(3).collect::<Vec<_>>());
    // The copies converge to one op set and, per partition, one full state (read-only checks).
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let d = recsys::verify::divergent(&nodes, PARTITIONS, None).await.unwrap();
        if d.is_empty() {
            break;
        }
        assert!(Instant::now() < end, "copies never converged: {:?}", d.iter().take(3).collect::<Vec<_>>());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let parts: Vec<recsys::domain::Part> =
        (0..PARTITIONS).map(|p| recsys::domain::Part::new(recsys::domain::Role::Feature, p)).collect();
    let hashes = recsys::verify::state_hashes(&nodes, &parts, None).await.unwrap();
    assert_eq!(hashes.len(), PARTITIONS as usize, "every feature partition answered: {hashes:?}");
    assert!(hashes.values().all(|c| c.len() == 2), "every feature partition has its two copies hashed: {hashes:?}");
    assert!(recsys::verify::differing_states(&hashes).is_empty());
}
