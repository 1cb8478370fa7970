//! Security between nodes, with real node processes over real sockets: internal calls need the
//! cluster secret (an HMAC of it, never the secret itself), Ingest and Admin need the operator
//! token when one is configured, Recommend stays open, and the CLI sends `--token`.
mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::Cluster;
use recsys::api::pb;
use recsys::api::pb::admin_client::AdminClient;
use recsys::api::pb::ingest_client::IngestClient;
use recsys::api::pb::recommender_client::RecommenderClient;
use recsys::auth::{unary_body_digest, unix_now, ClusterKey, INTERNAL_HEADER};
use recsys::cli::load::{load_world_with, synthetic_spec};
use recsys::cli::OperatorToken;
use recsys::transport::pb as ipb;
use recsys::transport::pb::internal_client::InternalClient;
use recsys::world::World;
use tonic::Code;

const SECRET: &str = "test-cluster-secret-5f1c";
const TOKEN: &str = "test-operator-token-9a2e";

fn overrides() -> String {
    format!(
        r#"
[cluster]
replication_factor = 2
anti_entropy_interval_ms = 1000
scorer_nodes = ["n1"]
secret = "{SECRET}"
operator_token = "{TOKEN}"
[scoring]
scorers = 1
[store]
cache_capacity_mb = 16
"#
    )
}

fn digests_request() -> ipb::DigestsRequest {
    ipb::DigestsRequest {
        envelope: Some(ipb::Envelope { from_node: "n9".into(), epoch: 1, digest: "x".into(), deadline_ms: 1000 }),
        asks: vec![ipb::PartitionAsk { role: 1, partition: 0, body: vec![] }],
    }
}

fn with_header<T>(body: T, header: Option<String>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(body);
    r.set_timeout(Duration::from_secs(5));
    if let Some(h) = header {
        r.metadata_mut().insert(INTERNAL_HEADER, h.parse().unwrap());
    }
    r
}

fn bearer<T>(body: T, token: Option<&str>) -> tonic::Request<T> {
    let mut r = tonic::Request::new(body);
    if let Some(t) = token {
        r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    r
}

fn recsys_cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_recsys"))
        .args(args)
        .current_dir(common::repo())
        .env_remove("RECSYS_OPERATOR_TOKEN")
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

use common::metric;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_and_operator_token_guard_a_three_node_cluster() {
    // Scorers on n1 only: Recommend through n3 also makes Score calls between peers.
    let cluster = Cluster::start("security3", 3, &overrides());
    cluster.wait_serving().await;
    let token = OperatorToken::new(Some(TOKEN)).unwrap();

    // (a) Internal calls without the secret's MAC, or with a MAC of another secret, are refused.
    let mut internal = InternalClient::new(recsys::cli::connect(&cluster.addrs[0]).await.unwrap());
    let e = internal.digests(with_header(digests_request(), None)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("cluster secret"), "{}", e.message());
    const DIGESTS: &str = "/recsys.internal.v1.Internal/Digests";
    let digests_body = unary_body_digest(&digests_request());
    const READ: &str = "/recsys.internal.v1.Internal/Read";
    let wrong = ClusterKey::new("not-the-secret").header("n2", "n1", DIGESTS, unix_now(), &digests_body);
    let e = internal.digests(with_header(digests_request(), Some(wrong))).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("another cluster secret"), "{}", e.message());
    let read = ipb::ReadRequest { envelope: digests_request().envelope, kind: "profile".into(), asks: vec![] };
    let e = internal.read(with_header(read.clone(), None)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // A header signed long ago (or by a clock far off) is refused too.
    let stale = ClusterKey::new(SECRET).header("n2", "n1", READ, unix_now() - 3600, &unary_body_digest(&read));
    let e = internal.read(with_header(read.clone(), Some(stale))).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    // With the right secret the call gets past authentication and is answered.
    let right = ClusterKey::new(SECRET).header("n2", "n1", DIGESTS, unix_now(), &digests_body);
    let r = internal.digests(with_header(digests_request(), Some(right.clone()))).await;
    assert!(r.is_ok(), "the right secret is accepted: {r:?}");
    // The MAC covers the body: the captured header carrying another request is refused.
    let mut other = digests_request();
    other.asks[0].partition = 1;
    let e = internal.digests(with_header(other, Some(right.clone()))).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "another body: {e:?}");
    // The MAC binds the method and the receiver: a captured Digests header is refused as a
    // Read (or Apply, Stream), and by another node.
    let e = internal.read(with_header(read.clone(), Some(right.clone()))).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "another method: {e:?}");
    let mut internal2 = InternalClient::new(recsys::cli::connect(&cluster.addrs[1]).await.unwrap());
    let e = internal2.digests(with_header(digests_request(), Some(right))).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "another receiver: {e:?}");

    // (c) Admin and Ingest need the operator token.
    let ch1 = recsys::cli::connect(&cluster.addrs[0]).await.unwrap();
    let mut admin = AdminClient::new(ch1.clone());
    let e = admin.cluster_status(bearer(pb::ClusterStatusRequest {}, None)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(
        e.message().starts_with("Admin/ClusterStatus needs the operator token: authorization: Bearer"),
        "{}",
        e.message()
    );
    let e = admin.cluster_status(bearer(pb::ClusterStatusRequest {}, Some("wrong"))).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("does not match"), "{}", e.message());
    admin.cluster_status(bearer(pb::ClusterStatusRequest {}, Some(TOKEN))).await.unwrap();
    let mut ing = IngestClient::new(ch1.clone());
    let ev = || pb::LogEventsRequest { events: vec![] };
    let e = ing.log_events(bearer(ev(), None)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().starts_with("Ingest/LogEvents needs the operator token"), "{}", e.message());
    let e = ing.log_events(bearer(ev(), Some("wrong"))).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    // With the token the call reaches the service (which refuses an empty batch); the world loaded
    // below is ingested with the token for real.
    let e = ing.log_events(bearer(ev(), Some(TOKEN))).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");

    // (b) The peers authenticate each other: replicated writes through n1, reads (with remote
    // scoring on n1 and a page held on another node) through n3, all answered in full.
    let world = Arc::new(World::generate(synthetic_spec(21, 2000, 200, 10_000)));
    let loaded = load_world_with(ch1.clone(), &token, world.clone(), 2000, true).await.unwrap();
    assert_eq!(loaded.events, 10_000);
    let user = world.users.iter().max_by_key(|u| u.follows.len()).unwrap().id.clone();
    let req = |page_token: String| pb::RecommendRequest {
        user_id: user.clone(),
        surface: "home".into(),
        k: 10,
        explain: true,
        page_token,
        ..Default::default()
    };
    // Recommend stays open: no token.
    let mut rec3 = RecommenderClient::new(recsys::cli::connect(&cluster.addrs[2]).await.unwrap());
    let p1 = rec3.recommend(req(String::new())).await.unwrap().into_inner();
    assert_eq!(p1.items.len(), 10);
    let cov = p1.coverage.clone().unwrap();
    assert!(!cov.degraded, "{cov:?}");
    assert!(p1.items.iter().all(|i| i.explanation.as_ref().unwrap().scored_by == "value_model"));
    let mut rec2 = RecommenderClient::new(recsys::cli::connect(&cluster.addrs[1]).await.unwrap());
    let p2 = rec2.recommend(req(p1.next_page_token.clone())).await.unwrap().into_inner();
    assert!(!p2.items.is_empty() && p2.items[0].rank > 10);
    // Every node has seen its peers' calls and refused none of them (only our probes above, on n1).
    for (i, m) in cluster.metrics.iter().enumerate() {
        let refused = metric(m, "recsys_auth_failures_total", "credential=\"internal\"");
        // n1: the six probes above; n2: the Digests header made for n1.
        let expected = [6.0, 1.0, 0.0][i];
        assert_eq!(refused, expected, "n{}: internal calls refused", i + 1);
    }

    // The CLI: `recsys status --token` works; without it, one line and exit ≠ 0.
    let addr = cluster.addrs[1].as_str();
    let out = recsys_cli(&["status", "--addr", addr, "--token", TOKEN]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cluster seen from n2"));
    for args in [vec!["status", "--addr", addr], vec!["status", "--addr", addr, "--token", "nope"]] {
        let out = recsys_cli(&args);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.starts_with("error: UNAUTHENTICATED: Admin/ClusterStatus"), "{err}");
    }
    // The status page reads ClusterStatus in-process: no token needed there.
    let (code, _, body) = common::http_get(&cluster.metrics[1], "/status.json").unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"n3\""), "{body}");
}

/// No secret configured: internal calls are accepted as before, and the node says so at start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_secret_internal_calls_are_open_with_a_warning() {
    let dir = common::temp_dir("security-open");
    let node = common::start_node(&dir.join("n1"), &[]).expect("node starts");
    let warned = node.wait_line("internal calls between nodes are NOT authenticated", Duration::from_secs(30));
    assert!(warned.is_some(), "no start-up warning about the missing cluster secret");
    common::wait_health(&node.addr, Duration::from_secs(60)).await;
    let mut internal = InternalClient::new(recsys::cli::connect(&node.addr).await.unwrap());
    let r = internal.digests(with_header(digests_request(), None)).await;
    assert!(r.is_ok(), "without a secret an unsigned internal call is answered: {r:?}");
    // No operator token either: Admin is open.
    let mut admin = AdminClient::new(recsys::cli::connect(&node.addr).await.unwrap());
    admin.cluster_status(pb::ClusterStatusRequest {}).await.unwrap();
}
