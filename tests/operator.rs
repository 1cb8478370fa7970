//! What an operator sees, against real node processes: every metric described and present at zero
//! from start-up (`promtool check metrics` clean), the Prometheus configs and the Grafana dashboard
//! valid and naming only metrics a node exports, the status page and its JSON over HTTP (nodes,
//! ring, replicas going down), logs without colour codes when redirected, and the CLI's errors as
//! one line with a non-zero exit and no backtrace.
mod common;

use std::collections::{BTreeSet, HashSet};
use std::io::Read;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{free_port, http_get, repo, start_node, temp_dir, Cluster};
use recsys::api::pb;
use recsys::api::pb::recommender_client::RecommenderClient;
use recsys::cli::load::{load_world, synthetic_spec};
use recsys::world::World;

const OVERRIDES: &str = r#"
[cluster]
replication_factor = 2
[scoring]
scorers = 1
[store]
cache_capacity_mb = 16
"#;

fn promtool() -> Command {
    let found = Command::new("promtool").arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
    assert!(found, "promtool not found: scripts/setup.sh installs it (Debian package `prometheus`)");
    Command::new("promtool")
}

/// Runs promtool with `input` on stdin; panics with its output unless it succeeds.
fn promtool_ok(args: &[&str], input: Option<&str>) {
    let mut child = promtool()
        .args(args)
        .current_dir(repo())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(text) = input {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?} failed:\n{said}");
}

/// Metric families a /metrics text declares (`# TYPE name kind`).
fn families(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(String::from)
        .collect()
}

async fn start_with_metrics(name: &str) -> (common::TempDir, common::NodeProc, String) {
    let dir = temp_dir(name);
    let metrics = format!("127.0.0.1:{}", free_port());
    let node = start_node(&dir.join("data"), &["--metrics-listen", &metrics]).expect("node starts");
    common::wait_health(&node.addr, Duration::from_secs(60)).await;
    (dir, node, metrics)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_is_described_and_present_from_startup() {
    let (_dir, node, metrics) = start_with_metrics("metrics-startup").await;
    let (code, ctype, text) = http_get(&metrics, "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(ctype.starts_with("text/plain"), "{ctype}");

    // A node that has served nothing exports every metric, each with HELP and TYPE.
    let have = families(&text);
    for (name, kind, unit, _) in recsys::metrics::DESCRIPTIONS {
        if recsys::metrics::LAZY.contains(name) {
            continue;
        }
        assert!(have.contains(*name), "{name} missing from /metrics at start-up");
        assert!(text.contains(&format!("# HELP {name} ")), "{name} has no HELP");
        let t = match kind {
            recsys::metrics::Kind::Counter => "counter",
            recsys::metrics::Kind::Gauge => "gauge",
            recsys::metrics::Kind::Histogram => "histogram",
        };
        assert!(text.contains(&format!("# TYPE {name} {t}")), "{name} is not a {t}");
        if unit.is_some() {
            assert!(name.ends_with("_seconds"), "{name}: the unit is in the name");
        }
    }
    for name in recsys::metrics::EXTRA {
        assert!(have.contains(name) && text.contains(&format!("# HELP {name} ")), "{name} missing");
    }
    assert!(text.contains("recsys_requests_total{outcome=\"ok\"} 0"), "requests at zero:\n{text}");
    assert!(text.contains("recsys_build_info{version=\"0.1.0\""), "build info");
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("models/manifest.json")).unwrap()).unwrap();
    let version = manifest["version"].as_str().unwrap();
    assert!(text.contains(&format!("recsys_model_info{{version=\"{version}\"}} 1")), "model version exported");
    let rss = text.lines().find_map(|l| l.strip_prefix("process_resident_memory_bytes ")).unwrap();
    assert!(rss.parse::<f64>().unwrap() > 1e6, "resident memory {rss}");
    promtool_ok(&["check", "metrics"], Some(&text));

    // gRPC replies are counted by status code: one bad request shows up as INVALID_ARGUMENT.
    let mut rec = RecommenderClient::new(recsys::cli::connect(&node.addr).await.unwrap());
    let bad = pb::RecommendRequest { user_id: "u1".into(), surface: "home".into(), k: 0, ..Default::default() };
    assert_eq!(rec.recommend(bad).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    let (_, _, text) = http_get(&metrics, "/metrics").unwrap();
    let line = "recsys_grpc_requests_total{method=\"recsys.v1.Recommender/Recommend\",code=\"INVALID_ARGUMENT\"} 1";
    assert!(text.contains(line), "no `{line}` in:\n{text}");
    promtool_ok(&["check", "metrics"], Some(&text));

    // Logs (JSON here, see common::start_node): every line one JSON object with ts, level, message.
    let lines: Vec<String> = node.lines.try_iter().collect();
    assert!(!lines.is_empty());
    for l in &lines {
        let l = l.strip_prefix("stderr: ").unwrap_or_else(|| panic!("node printed to stdout: {l}"));
        let v: serde_json::Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v["ts"].is_string() && v["level"].is_string() && v["message"].is_string(), "{l}");
    }
    node.stop();
}

/// Metric names a PromQL expression mentions (recsys_* and process_*), histogram series suffixes
/// stripped.
fn metric_names(expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    let bytes: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == '_' || bytes[i] == ':') {
                i += 1;
            }
            let word: String = bytes[start..i].iter().collect();
            if word.starts_with("recsys_") || word.starts_with("process_") {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| word.strip_suffix(s))
                    .map(String::from)
                    .unwrap_or(word);
                out.push(base);
            }
        } else {
            i += 1;
        }
    }
    out
}

fn exprs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("expr", serde_json::Value::String(e)) => out.push(e.clone()),
                    _ => exprs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| exprs(x, out)),
        _ => {}
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrape_configs_and_dashboard_are_valid_and_name_exported_metrics() {
    promtool_ok(&["check", "config", "cluster/monitoring/prometheus.yml"], None);
    promtool_ok(&["check", "config", "cluster/monitoring/prometheus-k8s.yml"], None);

    let path = repo().join("cluster/monitoring/grafana/dashboards/recsys.json");
    let dash: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(dash["uid"].is_string() && dash["title"].is_string(), "provisionable: uid and title");
    let mut queries = Vec::new();
    exprs(&dash["panels"], &mut queries);
    assert!(queries.len() >= 20, "{} queries", queries.len());

    // Every query is valid PromQL: promtool parses them as recording rules (Grafana's variables
    // replaced by what they expand to).
    let dir = temp_dir("dashboard-rules");
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, q) in queries.iter().enumerate() {
        let q = q.replace("$__rate_interval", "1m").replace("$node", ".*");
        rules.push_str(&format!(
            "      - record: dashboard:q{i}\n        expr: {}\n",
            serde_json::to_string(&q).unwrap()
        ));
    }
    let file = dir.join("rules.yml");
    std::fs::write(&file, rules).unwrap();
    promtool_ok(&["check", "rules", file.to_str().unwrap()], None);

    // Every metric a query names is one a node exports (from a real node's /metrics).
    let (_d, node, metrics) = start_with_metrics("dashboard").await;
    let (_, _, text) = http_get(&metrics, "/metrics").unwrap();
    let exported = families(&text);
    let named: BTreeSet<String> = queries.iter().flat_map(|q| metric_names(q)).collect();
    let unknown: Vec<&String> = named.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(unknown.is_empty(), "dashboard names metrics the node does not export: {unknown:?}");
    // The golden signals the dashboard must show.
    for want in [
        "recsys_requests_total",
        "recsys_grpc_requests_total",
        "recsys_grpc_seconds",
        "recsys_stage_seconds",
        "recsys_fallbacks_total",
        "recsys_partition_misses_total",
        "recsys_scoring_queue_chunks",
        "recsys_scoring_shed_total",
        "recsys_ingest_records_total",
        "recsys_flush_seconds",
        "recsys_model_info",
        "process_resident_memory_bytes",
    ] {
        assert!(named.contains(want), "the dashboard does not show {want}");
    }
    node.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_nodes_ring_counts_models_and_latency() {
    let mut cluster = Cluster::start("status-page", 3, OVERRIDES);
    cluster.wait_serving().await;
    let world = Arc::new(World::generate(synthetic_spec(5, 2000, 200, 20_000)));
    load_world(recsys::cli::connect(&cluster.addrs[0]).await.unwrap(), world, 2000, true).await.unwrap();
    let mut rec = RecommenderClient::new(recsys::cli::connect(&cluster.addrs[0]).await.unwrap());
    for u in 0..20 {
        let r = pb::RecommendRequest { user_id: format!("u{u}"), surface: "home".into(), k: 10, ..Default::default() };
        rec.recommend(r).await.unwrap();
    }

    let m1 = cluster.metrics[0].clone();
    let (code, ctype, html) = http_get(&m1, "/status").unwrap();
    assert_eq!(code, 200);
    assert!(ctype.starts_with("text/html"), "{ctype}");
    for needle in
        ["<title>recsys status</title>", "fetch(\"status.json\"", "id=\"nodes\"", "id=\"rings\"", "id=\"latency\""]
    {
        assert!(html.contains(needle), "status page lacks {needle}");
    }
    assert_eq!(http_get(&m1, "/nope").unwrap().0, 404);

    // Gossip tells each node the others' state: poll (bounded) until n1 sees all three serving.
    let status = |addr: &str| -> serde_json::Value {
        let (code, ctype, body) = http_get(addr, "/status.json").unwrap();
        assert_eq!((code, ctype.as_str()), (200, "application/json"));
        serde_json::from_str(&body).unwrap()
    };
    let serving = |s: &serde_json::Value| {
        s["nodes"]
            .as_array()
            .is_some_and(|n| n.len() == 3 && n.iter().all(|n| n["state"] == "serving" && n["live"] == true))
    };
    let end = Instant::now() + Duration::from_secs(20);
    let mut s = status(&m1);
    while !serving(&s) && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
        s = status(&m1);
    }
    assert!(serving(&s), "{s}");
    assert_eq!(s["node"], "n1");
    assert_eq!(s["ready"], true);
    let ids: HashSet<&str> = s["nodes"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap()).collect();
    assert_eq!(ids, HashSet::from(["n1", "n2", "n3"]));
    let per_role = s["ring"]["partitions_per_role"].as_u64().unwrap();
    let parts = s["partitions"].as_array().unwrap();
    assert_eq!(parts.len() as u64, 2 * per_role);
    for p in parts {
        assert_eq!(p["replicas"].as_array().unwrap().len(), 2, "{p}");
        assert!(p["live"].as_array().unwrap().iter().all(|l| l == true), "{p}");
    }
    let items = s["counts"]["items"].as_u64().unwrap();
    assert!(items > 0 && items < 2000, "n1 holds some of the 2000 items: {items}");
    assert!(s["models"]["stage1"].as_str().unwrap().ends_with("/stage1"), "{}", s["models"]);
    let stages = s["recent"]["stages"].as_array().unwrap();
    let retrieval = stages.iter().find(|x| x["stage"] == "retrieval").unwrap();
    assert_eq!(retrieval["count"].as_u64().unwrap(), 20, "{retrieval}");
    assert!(retrieval["p50_ms"].as_f64().unwrap() > 0.0, "{retrieval}");
    assert_eq!(s["recent"]["requests"]["ok"].as_u64().unwrap(), 20, "{}", s["recent"]);

    // n3 crashes: n1's page shows it down and its replicas not live (bounded polling).
    cluster.kill9(2);
    let down = |s: &serde_json::Value| {
        let n3 = s["nodes"].as_array().and_then(|n| n.iter().find(|n| n["id"] == "n3").cloned());
        let parts_ok = s["partitions"].as_array().is_some_and(|ps| {
            ps.iter().all(|p| {
                let reps = p["replicas"].as_array().unwrap();
                let live = p["live"].as_array().unwrap();
                reps.iter().zip(live).all(|(r, l)| (r == "n3") != (l == true))
            })
        });
        n3.is_some_and(|n| n["state"] == "down" && n["live"] == false) && parts_ok
    };
    let end = Instant::now() + Duration::from_secs(30);
    let mut s = status(&m1);
    while !down(&s) && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(200)).await;
        s = status(&m1);
    }
    assert!(down(&s), "n3 not shown down with its replicas not live: {}", s["nodes"]);
}

fn recsys(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_recsys"));
    c.args(args).current_dir(repo()).env("RUST_BACKTRACE", "1").env_remove("RUST_LOG");
    c
}

/// stderr of a failed command: exactly one line, `error: ...`, no backtrace, exit code 1.
fn one_line_error(args: &[&str]) -> String {
    let out = recsys(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{args:?}: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: one line expected:\n{err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(!err.contains("acktrace") && !err.contains("panicked") && !err.contains("Some("), "{err}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_output_is_for_people() {
    // Nothing listens on a fresh port: one line, exit 1, even with RUST_BACKTRACE set.
    let closed = format!("127.0.0.1:{}", free_port());
    let err = one_line_error(&["recommend", "--addr", &closed, "--user", "u1"]);
    assert!(err.contains("connection refused") && err.matches("efused").count() == 1, "{err}");
    // A wrong flag: clap's message, exit 2, no backtrace.
    let out = recsys(&["recommend", "--user", "u1", "--no-such-flag"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("acktrace"));

    // A node logging as text with stderr redirected: no colour codes, nothing on stdout.
    let dir = temp_dir("cli-output");
    let mut node = recsys(&["node", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.join("data"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(node.stderr.take().unwrap());
    let mut logged = Vec::new();
    let end = Instant::now() + Duration::from_secs(60);
    let addr = loop {
        let mut l = String::new();
        assert!(std::io::BufRead::read_line(&mut stderr, &mut l).unwrap() > 0, "node exited: {logged:?}");
        logged.push(l.clone());
        if l.contains(" SERVING ") || l.ends_with(" SERVING\n") || l.contains("INFO recsys::node: SERVING") {
            break l.split("local=").nth(1).unwrap().split_whitespace().next().unwrap().to_string();
        }
        assert!(Instant::now() < end, "no SERVING line: {logged:?}");
    };
    assert!(logged.iter().all(|l| !l.contains('\u{1b}')), "colour codes in redirected logs: {logged:?}");
    assert!(logged.iter().all(|l| l.split_whitespace().nth(1).is_some_and(|lv| ["INFO", "WARN"].contains(&lv))));

    // The gRPC code as the gRPC spec names it, and the node's message, on one line.
    let err = one_line_error(&["recommend", "--addr", &addr, "--user", "u1", "--page-token", "garbage"]);
    assert!(err.starts_with("error: INVALID_ARGUMENT: page_token"), "{err}");

    // Some data, so rankings have authors to space.
    let load = recsys(&["load", "--addr", &addr, "--items", "3000", "--users", "300", "--events", "30000", "--quiet"])
        .output()
        .unwrap();
    assert!(load.status.success(), "{}", String::from_utf8_lossy(&load.stderr));

    // A lower score above a higher one says why (author spacing); no Rust Debug text anywhere.
    let mut inversions = 0;
    for u in ["u1", "u2", "u3", "u4", "u5", "u6", "u7", "u8"] {
        let out = recsys(&["recommend", "--addr", &addr, "--user", u, "--k", "20", "--explain"]).output().unwrap();
        assert!(out.status.success());
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(!text.contains("Some(") && !text.contains("[\"") && !text.contains("{}"), "{text}");
        let mut last: Option<f64> = None;
        for l in text.lines().filter(|l| l.trim_start().starts_with('#')) {
            let score: f64 = l.split("score=").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
            if last.is_some_and(|p| score > p) {
                inversions += 1;
                assert!(l.contains("author spacing"), "a higher score below a lower one without a word why:\n{text}");
            }
            last = Some(score);
        }
    }
    assert!(inversions > 0, "no ranking had author spacing reorder anything: the check above proved nothing");

    // A reader that goes away (`| head`): no panic, no error text.
    let mut child = recsys(&["recommend", "--addr", &addr, "--user", "u1", "--k", "20", "--explain"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert!(status.success() || status.signal() == Some(libc::SIGPIPE), "{status:?}: {err}");
    assert!(!err.contains("panicked") && !err.contains("Broken pipe"), "{err}");

    let _ = Command::new("kill").arg("-TERM").arg(node.id().to_string()).status();
    let mut rest = String::new();
    let _ = stderr.read_to_string(&mut rest);
    assert!(node.wait().unwrap().success());
    assert!(!rest.contains('\u{1b}'), "{rest}");
    let mut out = String::new();
    node.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(out.is_empty(), "a node logs to stderr only (one line per event), stdout had: {out}");
}
