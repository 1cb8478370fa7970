//! Hedged reads, measured end to end (ignored by default: it compares timings, which a noisy
//! 2-core machine does not make reliable enough to assert). Three real nodes, R = 2; Recommend at
//! a fixed rate through n1 while n3 is SIGSTOPped for 600 ms, three times; the same with hedging
//! off. Run: `cargo test --release --test hedging -- --ignored --nocapture`.
mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::Cluster;
use recsys::api::pb;
use recsys::api::pb::recommender_client::RecommenderClient;
use recsys::cli::load::{load_world, synthetic_spec};
use recsys::world::World;

const OVERRIDES: &str = r#"
[cluster]
replication_factor = 2
anti_entropy_interval_ms = 2000
[scoring]
scorers = 1
[store]
cache_capacity_mb = 16
"#;

fn metric(metrics_addr: &str, name: &str) -> f64 {
    let (_, _, body) = common::http_get(metrics_addr, "/metrics").unwrap();
    body.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[derive(Default, Debug)]
struct Tally {
    sent: u64,
    errors: u64,
    degraded: u64,
    from_replica: u64,
    freeze_ms: Vec<f64>,
}

async fn run(hedge_ratio: f64) -> (Tally, f64, f64) {
    let overrides = format!("{OVERRIDES}[serving]\nhedge_max_ratio = {hedge_ratio}\n");
    let mut cluster = Cluster::start(&format!("hedging-{hedge_ratio}"), 3, &overrides);
    cluster.wait_serving().await;
    let world = Arc::new(World::generate(synthetic_spec(31, 3000, 300, 20_000)));
    load_world(recsys::cli::connect(&cluster.addrs[0]).await.unwrap(), world.clone(), 2000, true).await.unwrap();
    let users: Arc<Vec<String>> = Arc::new(world.users.iter().map(|u| u.id.clone()).collect());
    let rec = RecommenderClient::new(recsys::cli::connect(&cluster.addrs[0]).await.unwrap());
    let ask = |i: usize| {
        let mut rec = rec.clone();
        let user = users[i % users.len()].clone();
        async move {
            let mut r = tonic::Request::new(pb::RecommendRequest {
                user_id: user,
                surface: "home".into(),
                k: 10,
                ..Default::default()
            });
            r.set_timeout(Duration::from_millis(250));
            let t = Instant::now();
            let res = rec.recommend(r).await.map(|r| r.into_inner());
            (t.elapsed().as_secs_f64() * 1000.0, res)
        }
    };
    // Warm up: every peer gets enough samples for a p95 per read kind.
    for i in 0..300 {
        let _ = ask(i).await;
    }
    let hedges_before = metric(&cluster.metrics[0], "recsys_hedged_calls_total");
    let wins_before = metric(&cluster.metrics[0], "recsys_hedge_wins_total");
    let mut tally = Tally::default();
    for round in 0..3 {
        // 50 requests per second for 1.6 s; n3 frozen from 0.5 s to 1.1 s.
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let start = Instant::now();
        let mut tasks = Vec::new();
        let mut frozen = false;
        let mut resumed = false;
        for i in 0..80 {
            tick.tick().await;
            let at = start.elapsed();
            if !frozen && at >= Duration::from_millis(500) {
                cluster.signal(2, "STOP");
                frozen = true;
            }
            if frozen && !resumed && at >= Duration::from_millis(1100) {
                cluster.signal(2, "CONT");
                resumed = true;
            }
            let in_freeze = frozen && !resumed;
            tasks.push((in_freeze, tokio::spawn(ask(round * 1000 + i))));
        }
        if !resumed {
            cluster.signal(2, "CONT");
        }
        for (in_freeze, t) in tasks {
            let (ms, res) = t.await.unwrap();
            tally.sent += 1;
            match res {
                Ok(r) => {
                    let c = r.coverage.unwrap_or_default();
                    tally.degraded += u64::from(c.degraded);
                    tally.from_replica += u64::from(c.stages.iter().any(|s| !s.replica_partitions.is_empty()));
                    if in_freeze {
                        tally.freeze_ms.push(ms);
                    }
                }
                Err(_) => tally.errors += 1,
            }
        }
        // Let n3 catch up and be routable again before the next round (bounded polling).
        cluster.wait_serving().await;
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            let (_, _, body) = common::http_get(&cluster.metrics[0], "/status.json").unwrap();
            if !body.contains("\"live\":false") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let hedges = metric(&cluster.metrics[0], "recsys_hedged_calls_total") - hedges_before;
    let wins = metric(&cluster.metrics[0], "recsys_hedge_wins_total") - wins_before;
    cluster.kill9(2);
    (tally, hedges, wins)
}

fn pct(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement (timings on a shared machine), run by hand"]
async fn hedging_under_a_frozen_replica() {
    for ratio in [0.05, 0.0] {
        let (mut t, hedges, wins) = run(ratio).await;
        println!(
            "hedge_max_ratio={ratio}: {} requests, {} errors, {} degraded, {} with a partition from a replica; \
             during the freezes ({} requests) p50 {:.1} ms p99 {:.1} ms max {:.1} ms; hedged calls {hedges}, hedge \
             wins {wins}",
            t.sent,
            t.errors,
            t.degraded,
            t.from_replica,
            t.freeze_ms.len(),
            pct(&mut t.freeze_ms, 0.5),
            pct(&mut t.freeze_ms, 0.99),
            pct(&mut t.freeze_ms, 1.0),
        );
        if ratio > 0.0 {
            assert!(hedges > 0.0, "no hedges while a replica was frozen");
        } else {
            assert_eq!(hedges, 0.0, "hedging off sends no hedges");
        }
    }
}
