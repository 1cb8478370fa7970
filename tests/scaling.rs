//! Elastic scaling with real node processes: the cluster grows 3 → 5 nodes by `--join` and shrinks
//! back to 3 by draining, while Recommend calls arrive at a fixed rate and event batches are
//! written with a ledger of acknowledged ids. No call may fail, no acknowledged write may be lost
//! (re-sent afterwards through two nodes, every event must come back a duplicate: it is logged on
//! every replica of its partitions), and every partition ends with R live, identical copies.
//! A dead node is then taken out with `RemoveNode` and its partitions re-replicated.
mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::Cluster;
use recsys::api::pb;
use recsys::api::pb::admin_client::AdminClient;
use recsys::api::pb::ingest_client::IngestClient;
use recsys::api::pb::recommender_client::RecommenderClient;
use recsys::cli::load::{load_world, synthetic_spec};
use recsys::world::World;

const RATE: f64 = 20.0;
const DEADLINE: Duration = Duration::from_millis(300);
const OVERRIDES: &str =
    "[cluster]\nreplication_factor = 2\npartitions_per_role = 16\nanti_entropy_interval_ms = 2000\n\
     [scoring]\nscorers = 1\n[store]\ncache_capacity_mb = 16\n[ingest]\nreplica_timeout_ms = 2000\n";

use common::status;

async fn wait_settled(addr: &str, members: &[&str], limit: Duration) -> pb::ClusterStatusResponse {
    common::wait_settled(addr, members, 2, limit).await
}

#[derive(Default)]
struct Outcome {
    /// (latency, sent while a membership change was in progress)
    calls: Vec<(Duration, bool)>,
    degraded: usize,
    errors: Vec<String>,
    ledger: Vec<Vec<pb::Event>>,
    write_errors: Vec<String>,
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(((v.len() as f64 * 0.99) as usize).min(v.len().saturating_sub(1))).copied().unwrap_or_default()
}

/// Every partition is held by exactly two of the running nodes, with one fingerprint.
async fn replicas_identical(cluster: &Cluster, limit: Duration) {
    let end = Instant::now() + limit;
    loop {
        let mut fps: HashMap<(String, u32), HashSet<String>> = HashMap::new();
        let mut holders: HashMap<(String, u32), usize> = HashMap::new();
        for (i, addr) in cluster.addrs.iter().enumerate() {
            if cluster.nodes[i].is_none() {
                continue;
            }
            for p in status(addr).await.partitions.into_iter().filter(|p| !p.fingerprint_here.is_empty()) {
                fps.entry((p.role.clone(), p.partition)).or_default().insert(p.fingerprint_here);
                *holders.entry((p.role, p.partition)).or_default() += 1;
            }
        }
        let differ: Vec<_> = fps.iter().filter(|(_, f)| f.len() > 1).map(|(k, _)| k.clone()).collect();
        let r = holders.values().all(|n| *n == 2) && holders.len() == 32;
        if differ.is_empty() && r {
            return;
        }
        assert!(Instant::now() < end, "replicas differ after {limit:?}: {differ:?}; holders {holders:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_to_five_to_three_nodes_under_load_loses_nothing() {
    let mut cluster = Cluster::start("scale", 3, OVERRIDES);
    cluster.wait_serving().await;
    let world = Arc::new(World::generate(synthetic_spec(23, 3000, 300, 20_000)));
    load_world(recsys::cli::connect(&cluster.addrs[0]).await.unwrap(), world.clone(), 2000, true).await.unwrap();

    // The load goes to n1..n3, which stay members throughout.
    let outcome = Arc::new(Mutex::new(Outcome::default()));
    let moving = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut recs = Vec::new();
    let mut ings = Vec::new();
    for a in &cluster.addrs[..3] {
        let ch = recsys::cli::connect(a).await.unwrap();
        recs.push(RecommenderClient::new(ch.clone()));
        ings.push(IngestClient::new(ch));
    }
    let writer = {
        let (o, w, stop) = (outcome.clone(), world.clone(), stop.clone());
        tokio::spawn(async move {
            // Bounded: at most 10 minutes of batches even if the test body hangs.
            for batch in 0..2400 {
                if stop.load(std::sync::atomic::Ordering::Acquire) {
                    break;
                }
                let evs = common::ledger_events(&w, "scale", batch);
                let mut c = ings[batch % 3].clone();
                let mut r = tonic::Request::new(pb::LogEventsRequest { events: evs.clone() });
                r.set_timeout(Duration::from_secs(10));
                match c.log_events(r).await {
                    Ok(_) => o.lock().unwrap().ledger.push(evs),
                    Err(e) => o.lock().unwrap().write_errors.push(format!("{:?}: {}", e.code(), e.message())),
                }
                // The writer's pace (a schedule, not a synchronisation).
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        })
    };
    let loader = {
        let (o, w, stop, moving) = (outcome.clone(), world.clone(), stop.clone(), moving.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / RATE));
            let mut calls = Vec::new();
            for n in 0..12_000usize {
                if stop.load(std::sync::atomic::Ordering::Acquire) {
                    break;
                }
                tick.tick().await;
                let mut c = recs[n % 3].clone();
                let user = w.users[(n * 37) % w.users.len()].id.clone();
                let during = moving.load(std::sync::atomic::Ordering::Acquire);
                let o = o.clone();
                calls.push(tokio::spawn(async move {
                    let mut r = tonic::Request::new(pb::RecommendRequest {
                        user_id: user,
                        surface: "home".into(),
                        k: 10,
                        ..Default::default()
                    });
                    r.set_timeout(DEADLINE);
                    let t = Instant::now();
                    let res = tokio::time::timeout(DEADLINE * 3, c.recommend(r)).await;
                    let mut o = o.lock().unwrap();
                    match res {
                        Ok(Ok(r)) => {
                            o.calls.push((t.elapsed(), during));
                            o.degraded += usize::from(r.into_inner().coverage.is_some_and(|c| c.degraded));
                        }
                        Ok(Err(e)) => o.errors.push(format!("{:?}: {}", e.code(), e.message())),
                        Err(_) => o.errors.push("no reply within 3× the deadline".into()),
                    }
                }));
            }
            for c in calls {
                c.await.unwrap();
            }
        })
    };
    let steady = Instant::now();
    while steady.elapsed() < Duration::from_secs(4) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let t0 = Instant::now();
    moving.store(true, std::sync::atomic::Ordering::Release);
    // Grow: n4, then n5, each joining while the load runs.
    let n4 = cluster.join();
    wait_settled(&cluster.addrs[0], &["n1", "n2", "n3", "n4"], Duration::from_secs(120)).await;
    common::wait_health(&cluster.addrs[n4], Duration::from_secs(30)).await;
    let n5 = cluster.join();
    wait_settled(&cluster.addrs[0], &["n1", "n2", "n3", "n4", "n5"], Duration::from_secs(120)).await;
    common::wait_health(&cluster.addrs[n5], Duration::from_secs(30)).await;
    let grown = t0.elapsed();
    // The new nodes serve reads of their partitions.
    let mut rec5 = RecommenderClient::new(recsys::cli::connect(&cluster.addrs[n5]).await.unwrap());
    let r = rec5
        .recommend(pb::RecommendRequest { user_id: "u7".into(), surface: "home".into(), k: 5, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert!(!r.items.is_empty() && !r.coverage.unwrap().degraded, "n5 answers whole");
    // Shrink: drain n5, then n4 (asked of different nodes); each stops by itself.
    let t1 = Instant::now();
    for (i, via) in [(n5, 1usize), (n4, 2usize)] {
        let id = cluster.ids[i].clone();
        let ch = recsys::cli::connect(&cluster.addrs[via]).await.unwrap();
        let r = AdminClient::new(ch).drain(pb::DrainRequest { node_id: id.clone() }).await.unwrap().into_inner();
        assert!(!r.target_members.contains(&id) && r.partitions_moving > 0, "{r:?}");
        let st = cluster.wait_exit(i, Duration::from_secs(120)).await;
        assert!(st.success(), "{id} stopped cleanly after the drain: {st:?}");
    }
    wait_settled(&cluster.addrs[0], &["n1", "n2", "n3"], Duration::from_secs(60)).await;
    let shrunk = t1.elapsed();
    moving.store(false, std::sync::atomic::Ordering::Release);
    let after = Instant::now();
    while after.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    loader.await.unwrap();
    writer.await.unwrap();

    let o = std::mem::take(&mut *outcome.lock().unwrap());
    let steady: Vec<Duration> = o.calls.iter().filter(|(_, m)| !m).map(|(d, _)| *d).collect();
    let during: Vec<Duration> = o.calls.iter().filter(|(_, m)| *m).map(|(d, _)| *d).collect();
    let (ps, pm) = (p99(steady.clone()), p99(during.clone()));
    println!(
        "3→5 in {:.1} s, 5→3 in {:.1} s; {} calls ({} steady, {} during moves), {} degraded, {} errors {:?}; \
         p99 steady {:.1} ms, during moves {:.1} ms ({:.2}×); {} batches acknowledged, {} write errors {:?}",
        grown.as_secs_f64(),
        shrunk.as_secs_f64(),
        o.calls.len() + o.errors.len(),
        steady.len(),
        during.len(),
        o.degraded,
        o.errors.len(),
        o.errors.iter().take(3).collect::<Vec<_>>(),
        ps.as_secs_f64() * 1e3,
        pm.as_secs_f64() * 1e3,
        pm.as_secs_f64() / ps.as_secs_f64().max(1e-6),
        o.ledger.len(),
        o.write_errors.len(),
        o.write_errors.iter().take(3).collect::<Vec<_>>()
    );
    assert!(o.errors.is_empty(), "failed Recommend calls: {:?}", o.errors);
    assert!(during.len() >= 40, "the load ran during the moves: {}", during.len());
    assert!(o.write_errors.is_empty(), "failed writes: {:?}", o.write_errors);
    assert!(o.ledger.len() >= 20, "writes went on during the moves: {}", o.ledger.len());
    common::check_ledger(&cluster.addrs[0], &o.ledger, "n1").await;
    common::check_ledger(&cluster.addrs[2], &o.ledger, "n3").await;
    replicas_identical(&cluster, Duration::from_secs(30)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_node_is_removed_and_every_partition_gets_r_copies_again() {
    let mut cluster = Cluster::start("remove", 3, OVERRIDES);
    cluster.wait_serving().await;
    let world = Arc::new(World::generate(synthetic_spec(29, 2000, 200, 10_000)));
    load_world(recsys::cli::connect(&cluster.addrs[0]).await.unwrap(), world.clone(), 2000, true).await.unwrap();
    let mut ing = IngestClient::new(recsys::cli::connect(&cluster.addrs[0]).await.unwrap());
    let mut ledger = Vec::new();
    for b in 0..10 {
        let evs = common::ledger_events(&world, "scale", b);
        ing.log_events(pb::LogEventsRequest { events: evs.clone() }).await.unwrap();
        ledger.push(evs);
    }
    let mut admin = AdminClient::new(recsys::cli::connect(&cluster.addrs[0]).await.unwrap());
    // Refused while n3 is alive, and for a node that is not a member.
    let e = admin.remove_node(pb::RemoveNodeRequest { node_id: "n3".into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{}", e.message());
    let e = admin.remove_node(pb::RemoveNodeRequest { node_id: "n9".into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound, "{}", e.message());
    let e = admin.drain(pb::DrainRequest { node_id: " ".into() }).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    cluster.kill9(2);
    // Until the failure detector marks it down, removal is refused; then it begins.
    let end = Instant::now() + Duration::from_secs(20);
    let r = loop {
        match admin.remove_node(pb::RemoveNodeRequest { node_id: "n3".into() }).await {
            Ok(r) => break r.into_inner(),
            Err(e) if e.code() == tonic::Code::FailedPrecondition && Instant::now() < end => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("remove n3: {e}"),
        }
    };
    assert_eq!(r.target_members, vec!["n1".to_string(), "n2".to_string()]);
    // Idempotent: asked again, the same change.
    let again = admin.remove_node(pb::RemoveNodeRequest { node_id: "n3".into() }).await;
    assert!(again.is_ok() || again.unwrap_err().code() == tonic::Code::NotFound);
    wait_settled(&cluster.addrs[0], &["n1", "n2"], Duration::from_secs(60)).await;
    replicas_identical(&cluster, Duration::from_secs(30)).await;
    // Every acknowledged write is still there, on both remaining replicas.
    common::check_ledger(&cluster.addrs[0], &ledger, "n1").await;
    common::check_ledger(&cluster.addrs[1], &ledger, "n2").await;
}

/// Waits (bounded) until some partition is being streamed to `to`; returns its source.
async fn wait_streaming(addr: &str, to: &str, limit: Duration) -> String {
    let end = Instant::now() + limit;
    loop {
        if let Some(m) = status(addr).await.moves.into_iter().find(|m| m.to == to && m.bytes_done > 0) {
            return m.from;
        }
        assert!(Instant::now() < end, "no move to {to} seen within {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_resumes_after_its_receiver_and_a_source_crash() {
    // Throttled to the minimum so the moves are still running when the crashes come.
    let cfg = OVERRIDES.replace(
        "[cluster]\n",
        "[cluster]\nmove_bytes_per_sec = 65536\nmove_chunk_bytes = 4096\nmove_concurrency = 1\n",
    );
    let mut cluster = Cluster::start("resume", 3, &cfg);
    cluster.wait_serving().await;
    let world = Arc::new(World::generate(synthetic_spec(31, 2000, 200, 10_000)));
    load_world(recsys::cli::connect(&cluster.addrs[0]).await.unwrap(), world.clone(), 2000, true).await.unwrap();
    let mut ing = IngestClient::new(recsys::cli::connect(&cluster.addrs[0]).await.unwrap());
    let mut ledger = Vec::new();
    let mut write = |b: usize| {
        let evs = common::ledger_events(&world, "scale", b);
        ledger.push(evs.clone());
        pb::LogEventsRequest { events: evs }
    };
    for b in 0..5 {
        ing.log_events(write(b)).await.unwrap();
    }
    let n4 = cluster.join();
    wait_streaming(&cluster.addrs[0], "n4", Duration::from_secs(60)).await;
    // The receiver dies mid-stream and comes back: it resumes from its persisted ring.
    cluster.kill9(n4);
    for b in 5..10 {
        ing.log_events(write(b)).await.unwrap();
    }
    cluster.restart(n4);
    let source = wait_streaming(&cluster.addrs[0], "n4", Duration::from_secs(60)).await;
    // Then the node it streams from dies: the move goes on from another replica; the dead source
    // is removed (it was a member of the old and the new table).
    let si = cluster.ids.iter().position(|i| *i == source).unwrap();
    assert!(si < 3, "the source is one of the first members");
    let ingest_via = if si == 0 { 1 } else { 0 };
    cluster.kill9(si);
    let mut ing = IngestClient::new(recsys::cli::connect(&cluster.addrs[ingest_via]).await.unwrap());
    for b in 10..15 {
        ing.log_events(write(b)).await.unwrap();
    }
    let mut admin = AdminClient::new(recsys::cli::connect(&cluster.addrs[ingest_via]).await.unwrap());
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        match admin.remove_node(pb::RemoveNodeRequest { node_id: source.clone() }).await {
            Ok(_) => break,
            Err(e) if e.code() == tonic::Code::FailedPrecondition && Instant::now() < end => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("remove {source}: {e}"),
        }
    }
    let mut members: Vec<&str> = vec!["n1", "n2", "n3", "n4"];
    members.retain(|m| *m != source);
    wait_settled(&cluster.addrs[ingest_via], &members, Duration::from_secs(240)).await;
    replicas_identical(&cluster, Duration::from_secs(30)).await;
    common::check_ledger(&cluster.addrs[n4], &ledger, "n4, the joined node").await;
    common::check_ledger(&cluster.addrs[ingest_via], &ledger, "a surviving member").await;
}
