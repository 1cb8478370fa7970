//! `recsys bench`: a closed-loop (concurrency) or open-loop (fixed rate) load generator against
//! a node's Recommend, bounded in requests and time. Prints p50/p90/p99/max, QPS, errors, and the
//! per-stage breakdown reported by the responses.
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use rand::Rng;
use tokio::sync::Mutex;

use crate::api::pb;
use crate::api::pb::recommender_client::RecommenderClient;

#[derive(Debug, Clone)]
pub struct BenchSpec {
    pub addr: String,
    pub concurrency: usize,
    pub rate: Option<f64>,
    pub requests: usize,
    pub max_duration: Duration,
    pub users: usize,
    pub k: u32,
    pub deadline_ms: u64,
    pub warmup: usize,
    /// For the cluster status reads (Admin) when the cluster has an operator token.
    pub token: super::OperatorToken,
}

#[derive(Default)]
struct Acc {
    latency: Option<Histogram<u64>>,
    stages: BTreeMap<String, Histogram<u64>>,
    candidates: Vec<u64>,
    errors: BTreeMap<String, u64>,
    degraded: u64,
    ok: u64,
}

pub struct BenchReport {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub qps: f64,
    pub ok: u64,
    pub errors: u64,
    pub text: String,
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

async fn one(
    client: &mut RecommenderClient<tonic::transport::Channel>,
    spec: &BenchSpec,
    acc: &Mutex<Acc>,
    record: bool,
) {
    let user = format!("u{}", rand::rng().random_range(0..spec.users.max(1)));
    let mut req = tonic::Request::new(pb::RecommendRequest {
        user_id: user,
        surface: "home".into(),
        k: spec.k,
        page_token: String::new(),
        context: None,
        explain: false,
    });
    req.set_timeout(Duration::from_millis(spec.deadline_ms));
    let t = Instant::now();
    let res = client.recommend(req).await;
    let us = t.elapsed().as_micros() as u64;
    if !record {
        return;
    }
    let mut a = acc.lock().await;
    match res {
        Ok(r) => {
            let r = r.into_inner();
            a.ok += 1;
            a.latency.get_or_insert_with(hist).record(us.max(1)).ok();
            for s in &r.timings {
                a.stages.entry(s.stage.clone()).or_insert_with(hist).record(s.micros.max(1)).ok();
            }
            if let Some(c) = &r.coverage {
                a.degraded += u64::from(c.degraded);
                a.candidates.push(c.generator_candidates.values().map(|v| u64::from(*v)).sum());
            }
        }
        Err(e) => *a.errors.entry(super::output::code_name(e.code()).to_string()).or_default() += 1,
    }
}

/// CPU seconds and resident bytes of every live node of the cluster `addr` belongs to.
async fn cluster_usage(addr: &str, token: &super::OperatorToken) -> Vec<(String, f64, u64)> {
    let status = |a: String| async move {
        let ch = super::connect(&a).await.ok()?;
        let s = super::admin_client(ch, token).cluster_status(pb::ClusterStatusRequest {}).await.ok()?.into_inner();
        Some(s)
    };
    let Some(first) = status(addr.to_string()).await else { return vec![] };
    let mut out = Vec::new();
    for n in first.nodes.iter().filter(|n| n.live && !n.address.is_empty()) {
        if let Some(s) = status(n.address.clone()).await {
            out.push((s.self_node_id, s.cpu_seconds, s.resident_bytes));
        }
    }
    out
}

pub async fn run(spec: BenchSpec) -> anyhow::Result<BenchReport> {
    let ch = super::connect(&spec.addr).await?;
    let acc = Arc::new(Mutex::new(Acc::default()));
    // Warm-up: connections, caches, ORT first-run allocations.
    {
        let mut c = RecommenderClient::new(ch.clone());
        for _ in 0..spec.warmup {
            one(&mut c, &spec, &acc, false).await;
        }
    }
    let before = cluster_usage(&spec.addr, &spec.token).await;
    let start = Instant::now();
    let deadline = start + spec.max_duration;
    let issued = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    match spec.rate {
        None => {
            let mut tasks = Vec::new();
            for _ in 0..spec.concurrency.max(1) {
                let (ch, spec, acc, issued) = (ch.clone(), spec.clone(), acc.clone(), issued.clone());
                tasks.push(tokio::spawn(async move {
                    let mut c = RecommenderClient::new(ch);
                    while Instant::now() < deadline
                        && issued.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < spec.requests
                    {
                        one(&mut c, &spec, &acc, true).await;
                    }
                }));
            }
            for t in tasks {
                t.await?;
            }
        }
        Some(rate) => {
            // Open loop: requests start on schedule whether or not earlier ones finished, so a
            // slow server shows up as latency instead of being hidden by coordinated omission.
            let interval = Duration::from_secs_f64(1.0 / rate.max(0.1));
            let sem = Arc::new(tokio::sync::Semaphore::new(1024));
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut tasks = Vec::new();
            for _ in 0..spec.requests {
                tick.tick().await;
                if Instant::now() >= deadline {
                    break;
                }
                let permit = sem.clone().acquire_owned().await?;
                let (ch, spec, acc) = (ch.clone(), spec.clone(), acc.clone());
                tasks.push(tokio::spawn(async move {
                    let mut c = RecommenderClient::new(ch);
                    one(&mut c, &spec, &acc, true).await;
                    drop(permit);
                }));
            }
            for t in tasks {
                t.await?;
            }
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let after = cluster_usage(&spec.addr, &spec.token).await;
    let a = acc.lock().await;
    let lat = a.latency.clone().unwrap_or_else(hist);
    let ms = |v: u64| v as f64 / 1000.0;
    let errors: u64 = a.errors.values().sum();
    let mut text = String::new();
    let mode = match spec.rate {
        Some(r) => format!("rate {r}/s"),
        None => format!("concurrency {}", spec.concurrency),
    };
    let mut cands = a.candidates.clone();
    cands.sort_unstable();
    let med_cands = cands.get(cands.len() / 2).copied().unwrap_or(0);
    let by_code: Vec<String> = a.errors.iter().map(|(c, n)| format!("{c} {n}")).collect();
    let by_code = if by_code.is_empty() { String::new() } else { format!(" ({})", by_code.join(", ")) };
    text.push_str(&format!(
        "{mode}: {} ok, {errors} errors{by_code}, {} degraded in {elapsed:.1}s → {:.0} req/s\n",
        a.ok,
        a.degraded,
        a.ok as f64 / elapsed
    ));
    text.push_str(&format!(
        "latency ms: p50 {:.2}  p90 {:.2}  p99 {:.2}  max {:.2}   (median candidates/request: {med_cands})\n",
        ms(lat.value_at_quantile(0.5)),
        ms(lat.value_at_quantile(0.9)),
        ms(lat.value_at_quantile(0.99)),
        ms(lat.max())
    ));
    text.push_str("per stage (server-side) ms:");
    for (s, h) in &a.stages {
        text.push_str(&format!(
            "  {s} p50 {:.2}/p99 {:.2}",
            ms(h.value_at_quantile(0.5)),
            ms(h.value_at_quantile(0.99))
        ));
    }
    text.push('\n');
    // The price of the fan-out: CPU of every node, summed, per answered request.
    if !before.is_empty() && before.len() == after.len() && a.ok > 0 {
        let cpu: f64 = after.iter().zip(&before).map(|(x, y)| x.1 - y.1).sum();
        let per_node: Vec<String> = after
            .iter()
            .zip(&before)
            .map(|(x, y)| {
                format!("{} {:.2} ms, {:.0} MiB", x.0, 1000.0 * (x.1 - y.1) / a.ok as f64, x.2 as f64 / 1048576.0)
            })
            .collect();
        text.push_str(&format!(
            "node CPU per request: {:.2} ms summed over {} node(s) ({})\n",
            1000.0 * cpu / a.ok as f64,
            after.len(),
            per_node.join("; ")
        ));
    }
    Ok(BenchReport {
        p50_ms: ms(lat.value_at_quantile(0.5)),
        p90_ms: ms(lat.value_at_quantile(0.9)),
        p99_ms: ms(lat.value_at_quantile(0.99)),
        max_ms: ms(lat.max()),
        qps: a.ok as f64 / elapsed,
        ok: a.ok,
        errors,
        text,
    })
}
