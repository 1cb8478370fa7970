//! The node's operator listener (`--metrics-listen`): `/metrics` (Prometheus text), `/status` (a
//! read-only page: nodes and states, the ring, data counts, model versions, recent latency by
//! stage) and `/status.json`, which the page's script polls. Plain HTML + JS + SVG, no build step.
use std::collections::{BTreeMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::{json, Value};

use crate::api::admin::{AdminService, AdminState};
use crate::api::pb;
use crate::api::pb::admin_server::Admin;

const PAGE: &str = include_str!("page.html");
/// How far back "recent" latency and request rates reach.
pub const WINDOW: Duration = Duration::from_secs(60);
const SAMPLE_EVERY: Duration = Duration::from_secs(5);
/// Connections served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("bind {0}: {1}")]
    Bind(SocketAddr, std::io::Error),
}

pub struct Ops {
    pub node_id: String,
    pub handle: PrometheusHandle,
    pub admin: Arc<OnceLock<Arc<AdminState>>>,
    started: Instant,
    window: Mutex<VecDeque<Sample>>,
}

/// Cumulative counts read from the recorder at one instant: stage histogram buckets and requests
/// by outcome. Recent figures are differences between the newest and the oldest sample kept.
#[derive(Clone, Debug, Default)]
struct Sample {
    at: Option<Instant>,
    /// stage -> (upper bound in seconds, cumulative count), ascending; +Inf last.
    buckets: BTreeMap<String, Vec<(f64, u64)>>,
    requests: BTreeMap<String, u64>,
}

impl Ops {
    pub fn new(node_id: String, handle: PrometheusHandle, admin: Arc<OnceLock<Arc<AdminState>>>) -> Arc<Self> {
        Arc::new(Self { node_id, handle, admin, started: Instant::now(), window: Mutex::new(VecDeque::new()) })
    }

    fn model_version(&self) -> Option<String> {
        let st = self.admin.get()?;
        st.models.current().manifest.as_ref().map(|m| m.version.clone())
    }

    pub fn metrics_text(&self) -> String {
        crate::metrics::render(&self.handle, self.model_version().as_deref())
    }

    /// Takes a sample now and drops the ones older than the window (keeping one at or beyond it
    /// as the baseline).
    fn sample(&self) {
        let mut s = parse_sample(&self.handle.render());
        s.at = Some(Instant::now());
        let mut w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        w.push_back(s);
        while w.len() > 2 && w.get(1).and_then(|x| x.at).is_some_and(|t| t.elapsed() >= WINDOW) {
            w.pop_front();
        }
    }

    /// Latency quantiles by stage and requests by outcome over the window (since start-up while
    /// the node is younger than the window).
    fn recent(&self) -> Value {
        self.sample();
        let w = self.window.lock().unwrap_or_else(|e| e.into_inner());
        let (Some(old), Some(new)) = (w.front(), w.back()) else { return Value::Null };
        let first = w.len() == 1;
        let base = if first { Sample::default() } else { old.clone() };
        let secs = if first {
            self.started.elapsed().as_secs_f64()
        } else {
            old.at.zip(new.at).map_or(0.0, |(a, b)| (b - a).as_secs_f64())
        };
        let mut stages = Vec::new();
        for stage in crate::metrics::STAGES {
            let now = new.buckets.get(stage).cloned().unwrap_or_default();
            let then = base.buckets.get(stage).cloned().unwrap_or_default();
            let delta: Vec<(f64, u64)> = now
                .iter()
                .map(|(le, c)| (*le, c - then.iter().find(|(l, _)| l == le).map_or(0, |(_, c0)| (*c0).min(*c))))
                .collect();
            let count = delta.last().map_or(0, |(_, c)| *c);
            let q = |p: f64| quantile(&delta, p).map(|s| (s * 1e6).round() / 1e3);
            stages
                .push(json!({"stage": stage, "count": count, "p50_ms": q(0.5), "p95_ms": q(0.95), "p99_ms": q(0.99)}));
        }
        let mut requests = serde_json::Map::new();
        for (outcome, n) in &new.requests {
            let d = n - base.requests.get(outcome).copied().unwrap_or(0).min(*n);
            requests.insert(outcome.clone(), json!(d));
        }
        let total: u64 = requests.values().filter_map(Value::as_u64).sum();
        json!({
            "window_seconds": (secs * 10.0).round() / 10.0,
            "stages": stages,
            "requests": requests,
            "requests_per_second": if secs > 0.0 { ((total as f64 / secs) * 100.0).round() / 100.0 } else { 0.0 },
        })
    }

    /// What `/status.json` returns: this node's view of the cluster.
    pub async fn status_json(&self) -> Value {
        let recent = self.recent();
        let base = json!({
            "node": self.node_id,
            "version": env!("CARGO_PKG_VERSION"),
            "uptime_seconds": self.started.elapsed().as_secs(),
            "recent": recent,
        });
        let svc = AdminService { state: self.admin.clone() };
        let s = match svc.cluster_status(tonic::Request::new(pb::ClusterStatusRequest {})).await {
            Ok(r) => r.into_inner(),
            Err(e) => {
                let mut v = base;
                v["ready"] = json!(false);
                v["message"] = json!(e.message());
                return v;
            }
        };
        let mut v = base;
        v["ready"] = json!(true);
        v["ring"] = json!({
            "epoch": s.ring_epoch,
            "digest": s.ring_digest,
            "partitions_per_role": s.partitions_per_role,
            "replication_factor": s.replication_factor,
            "scorer_nodes": s.scorer_nodes,
        });
        v["nodes"] = s
            .nodes
            .iter()
            .map(|n| {
                json!({
                    "id": n.node_id,
                    "address": n.address,
                    "state": n.state,
                    "live": n.live,
                    "generation": n.generation,
                    "generator_partitions": n.generator_partitions,
                    "feature_partitions": n.feature_partitions,
                    "scorers": n.scorers,
                    "incoming_partitions": n.incoming_partitions,
                    "resident_bytes": n.resident_bytes,
                    "same_ring": n.ring_epoch == s.ring_epoch && n.ring_digest == s.ring_digest,
                })
            })
            .collect();
        v["partitions"] = s
            .partitions
            .iter()
            .map(|p| json!({"role": p.role, "partition": p.partition, "replicas": p.replicas, "live": p.live}))
            .collect();
        v["target_members"] = json!(s.target_members);
        v["moves"] = s
            .moves
            .iter()
            .map(|m| {
                json!({"role": m.role, "partition": m.partition, "from": m.from, "to": m.to,
                       "bytes_done": m.bytes_done, "bytes_total": m.bytes_total, "eta_ms": m.eta_ms})
            })
            .collect();
        v["counts"] = json!({"items": s.items, "users": s.users, "events": s.events});
        v["models"] = match &s.models {
            Some(m) => json!({"stage1": m.stage1, "stage2": m.stage2}),
            None => Value::Null,
        };
        v["catch_up_rounds"] = json!(s.catch_up_rounds);
        v["process"] = json!({"cpu_seconds": s.cpu_seconds, "resident_bytes": s.resident_bytes});
        v
    }
}

/// Reads the stage histograms and request counters out of the recorder's own Prometheus text.
fn parse_sample(text: &str) -> Sample {
    let mut s = Sample::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("recsys_stage_seconds_bucket{") {
            let (Some(stage), Some(le)) = (label(rest, "stage"), label(rest, "le")) else { continue };
            let Some(n) = value(rest) else { continue };
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::INFINITY) };
            s.buckets.entry(stage.to_string()).or_default().push((le, n));
        } else if let Some(rest) = line.strip_prefix("recsys_requests_total{") {
            if let (Some(o), Some(n)) = (label(rest, "outcome"), value(rest)) {
                s.requests.insert(o.to_string(), n);
            }
        }
    }
    for b in s.buckets.values_mut() {
        b.sort_by(|x, y| x.0.total_cmp(&y.0));
    }
    s
}

fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let start = labels.find(&format!("{name}=\""))? + name.len() + 2;
    let len = labels[start..].find('"')?;
    Some(&labels[start..start + len])
}

fn value(rest: &str) -> Option<u64> {
    rest.rsplit_once(' ').and_then(|(_, v)| v.trim().parse::<f64>().ok()).map(|v| v as u64)
}

/// The p-quantile of a cumulative histogram (upper bounds in seconds), interpolated linearly in
/// its bucket as Prometheus' histogram_quantile does; None without observations.
fn quantile(cum: &[(f64, u64)], p: f64) -> Option<f64> {
    let total = cum.last()?.1;
    if total == 0 {
        return None;
    }
    let rank = p * total as f64;
    let (mut lo, mut below) = (0.0, 0u64);
    for &(le, c) in cum {
        if c as f64 >= rank {
            if le.is_infinite() {
                // Beyond the last finite bound: report that bound, as histogram_quantile does.
                return Some(lo);
            }
            let in_bucket = (c - below) as f64;
            return Some(if in_bucket > 0.0 { lo + (le - lo) * (rank - below as f64) / in_bucket } else { le });
        }
        lo = le;
        below = c;
    }
    Some(lo)
}

/// Serves the listener until the task is aborted; samples the latency window in the background.
pub async fn serve(addr: SocketAddr, ops: Arc<Ops>) -> Result<tokio::task::JoinHandle<()>, StatusError> {
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| StatusError::Bind(addr, e))?;
    let sampler = ops.clone();
    Ok(tokio::spawn(async move {
        let _sampler = AbortOnDrop(tokio::spawn(async move {
            let mut every = tokio::time::interval(SAMPLE_EVERY);
            loop {
                every.tick().await;
                sampler.sample();
            }
        }));
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            let Ok(permit) = slots.clone().acquire_owned().await else { return };
            let (stream, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics listener accept failed");
                    continue;
                }
            };
            let ops = ops.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let ops = ops.clone();
                    async move { Ok::<_, Infallible>(route(&ops, req).await) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc);
                let _ = conn.await;
                drop(permit);
            });
        }
    }))
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn route(ops: &Ops, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != hyper::Method::GET && req.method() != hyper::Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain; charset=utf-8", "read-only: GET only\n".into());
    }
    match req.uri().path() {
        "/metrics" => reply(StatusCode::OK, "text/plain; version=0.0.4; charset=utf-8", ops.metrics_text()),
        "/status" | "/status/" | "/" => reply(StatusCode::OK, "text/html; charset=utf-8", PAGE.to_string()),
        "/status.json" => {
            let body = serde_json::to_string(&ops.status_json().await).unwrap_or_else(|_| "{}".into());
            reply(StatusCode::OK, "application/json", body)
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain; charset=utf-8", "not found: try /status or /metrics\n".into()),
    }
}

fn reply(code: StatusCode, content_type: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = code;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r.headers_mut().insert(http::header::CACHE_CONTROL, http::HeaderValue::from_static("no-store"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let cum = [(0.001, 50), (0.002, 90), (0.005, 100), (f64::INFINITY, 100)];
        assert_eq!(quantile(&cum, 0.5), Some(0.001));
        let p95 = quantile(&cum, 0.95).unwrap();
        assert!((p95 - 0.0035).abs() < 1e-9, "{p95}");
        assert_eq!(quantile(&[(0.001, 0), (f64::INFINITY, 0)], 0.5), None);
        assert_eq!(quantile(&[(0.001, 0), (f64::INFINITY, 3)], 0.5), Some(0.001));
    }

    #[test]
    fn samples_are_read_from_prometheus_text() {
        let text = "recsys_stage_seconds_bucket{stage=\"retrieval\",le=\"0.001\"} 3\n\
                    recsys_stage_seconds_bucket{stage=\"retrieval\",le=\"+Inf\"} 4\n\
                    recsys_requests_total{outcome=\"ok\"} 7\n";
        let s = parse_sample(text);
        assert_eq!(s.buckets["retrieval"], vec![(0.001, 3), (f64::INFINITY, 4)]);
        assert_eq!(s.requests["ok"], 7);
    }
}
