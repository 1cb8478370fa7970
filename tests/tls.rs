//! TLS between clients and nodes and between nodes, with real node processes over real sockets:
//! certificates are made here (rcgen), a three-node cluster with `tls.mutual` forms and answers
//! Recommend over TLS, a plaintext client and a client of another CA are refused, a client
//! without a certificate reaches Recommend but not the internal API, the cluster secret's MAC
//! still applies on top, and a node whose CA is another cannot join. A bad `[tls]` refuses start.
mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::{metric, Cluster};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use recsys::api::pb;
use recsys::api::pb::admin_client::AdminClient;
use recsys::api::pb::recommender_client::RecommenderClient;
use recsys::auth::{unary_body_digest, unix_now, ClusterKey, INTERNAL_HEADER};
use recsys::cli::load::{load_world_with, synthetic_spec};
use recsys::cli::{connect_with, ClientTls, OperatorToken};
use recsys::transport::pb as ipb;
use recsys::transport::pb::internal_client::InternalClient;
use recsys::transport::tls::FLAG_KEYS;
use recsys::world::World;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const SECRET: &str = "tls-test-cluster-secret-77c1";

/// A test CA: its certificate on disk, and the issuer that signs leaves.
struct Ca {
    pem: PathBuf,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

fn ca(dir: &Path, name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, format!("recsys test CA {name}"));
    let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let pem = dir.join(format!("{name}-ca.pem"));
    std::fs::write(&pem, issuer.pem()).unwrap();
    Ca { pem, issuer }
}

/// A leaf certificate for `names` (IPs become IP SANs) signed by `ca`: (cert, key) PEM paths.
/// No extended key usage: good for both server and client authentication.
fn leaf(dir: &Path, ca: &Ca, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
    let mut params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, stem);
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &*ca.issuer).unwrap();
    let (c, k) = (dir.join(format!("{stem}.pem")), dir.join(format!("{stem}-key.pem")));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

fn client(ca: &Ca, id: Option<&(PathBuf, PathBuf)>) -> ClientTls {
    ClientTls::from_files(FLAG_KEYS, &ca.pem, id.map(|i| i.0.as_path()), id.map(|i| i.1.as_path()), None).unwrap()
}

fn tls_toml(ca: Option<&Path>, id: &(PathBuf, PathBuf)) -> String {
    let ca = ca.map(|c| format!("ca = {:?}\n", c.display().to_string())).unwrap_or_default();
    format!("[tls]\n{ca}cert = {:?}\nkey = {:?}\n", id.0.display().to_string(), id.1.display().to_string())
}

fn digests_request() -> ipb::DigestsRequest {
    ipb::DigestsRequest {
        envelope: Some(ipb::Envelope { from_node: "n2".into(), epoch: 1, digest: "x".into(), deadline_ms: 1000 }),
        asks: vec![ipb::PartitionAsk { role: 1, partition: 0, body: vec![] }],
    }
}

/// An internal Digests call to n1 from a client with `tls` (signed with the secret when `sign`).
async fn internal_digests(addr: &str, tls: Option<&ClientTls>, sign: bool) -> Result<(), tonic::Status> {
    let ch = connect_with(addr, tls).await.map_err(|e| tonic::Status::unavailable(format!("{e:#}")))?;
    let mut r = tonic::Request::new(digests_request());
    r.set_timeout(Duration::from_secs(5));
    if sign {
        let body = unary_body_digest(&digests_request());
        let h = ClusterKey::new(SECRET).header("n2", "n1", "/recsys.internal.v1.Internal/Digests", unix_now(), &body);
        r.metadata_mut().insert(INTERNAL_HEADER, h.parse().unwrap());
    }
    InternalClient::new(ch).digests(r).await.map(|_| ())
}

async fn health(addr: &str, tls: Option<&ClientTls>) -> Result<i32, String> {
    let ch = connect_with(addr, tls).await.map_err(|e| format!("{e:#}"))?;
    let mut r = tonic::Request::new(HealthCheckRequest { service: String::new() });
    r.set_timeout(Duration::from_secs(5));
    HealthClient::new(ch).check(r).await.map(|r| r.into_inner().status).map_err(|s| format!("{s:?}"))
}

fn recsys_cli(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_recsys"))
        .args(args)
        .current_dir(common::repo())
        .env_remove("RECSYS_TLS_CA")
        .env_remove("RECSYS_TLS_CERT")
        .env_remove("RECSYS_TLS_KEY")
        .env_remove("RUST_LOG")
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_cluster_serves_tls_only_and_guards_the_internal_api() {
    let pki = common::temp_dir("tls-pki");
    let good = ca(&pki, "cluster");
    let rogue = ca(&pki, "rogue");
    let ids: Vec<_> = (1..=3).map(|i| leaf(&pki, &good, &format!("n{i}"), &["127.0.0.1", "localhost"])).collect();
    let overrides = format!(
        r#"
[cluster]
replication_factor = 2
anti_entropy_interval_ms = 1000
scorer_nodes = ["n1"]
secret = "{SECRET}"
[scoring]
scorers = 1
[store]
cache_capacity_mb = 16
[tls]
ca = {:?}
mutual = true
"#,
        good.pem.display().to_string()
    );
    // Scorers on n1 only: Recommend through n3 makes Score calls between peers, over mutual TLS.
    let mut cluster = Cluster::start_with("tls3", 3, &overrides, |i| Some(tls_toml(None, &ids[i])));
    let ca_only = client(&good, None);
    for a in &cluster.addrs {
        recsys::cli::wait_serving_with(a, Some(&ca_only), Duration::from_secs(90)).await.unwrap();
    }
    let (n1, n3) = (cluster.addrs[0].clone(), cluster.addrs[2].clone());

    // Writes replicate and reads fan out between the nodes, all over mutual TLS.
    let ch1 = connect_with(&n1, Some(&ca_only)).await.unwrap();
    let world = Arc::new(World::generate(synthetic_spec(5, 2000, 200, 10_000)));
    let loaded = load_world_with(ch1.clone(), &OperatorToken::default(), world.clone(), 2000, true).await.unwrap();
    assert_eq!(loaded.events, 10_000);
    let user = world.users.iter().max_by_key(|u| u.follows.len()).unwrap().id.clone();
    let req = pb::RecommendRequest { user_id: user.clone(), surface: "home".into(), k: 10, ..Default::default() };
    // A client without a certificate (only the CA) is served Recommend.
    let mut rec3 = RecommenderClient::new(connect_with(&n3, Some(&ca_only)).await.unwrap());
    let r = rec3.recommend(req.clone()).await.unwrap().into_inner();
    assert_eq!(r.items.len(), 10);
    assert!(!r.coverage.clone().unwrap().degraded, "{:?}", r.coverage);

    // A plaintext client is refused: the port speaks TLS only.
    let plain = health(&n1, None).await;
    assert!(plain.is_err(), "a plaintext health check was answered: {plain:?}");
    println!("plaintext client: {}", plain.unwrap_err());

    // No client certificate: the internal API refuses, naming why (before the MAC is looked at).
    let e = internal_digests(&n1, Some(&ca_only), true).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("client certificate signed by the cluster CA"), "{}", e.message());

    // A certificate of another CA: the handshake fails, so no call (internal or other) is served.
    let stranger = leaf(&pki, &rogue, "stranger", &["127.0.0.1"]);
    let rogue_client = ClientTls::from_files(FLAG_KEYS, &good.pem, Some(&stranger.0), Some(&stranger.1), None).unwrap();
    let e = internal_digests(&n1, Some(&rogue_client), true).await.unwrap_err();
    assert_ne!(e.code(), Code::Ok);
    println!("client with another CA's certificate: {e:?}");
    assert!(health(&n1, Some(&rogue_client)).await.is_err(), "another CA's certificate was accepted");

    // A client trusting another CA does not accept the node's certificate.
    let e = health(&n1, Some(&client(&rogue, None))).await.unwrap_err();
    println!("client trusting another CA: {e}");

    // The cluster's certificate gets past TLS; the cluster secret's MAC still applies on top.
    let member = leaf(&pki, &good, "operator-tool", &["localhost"]);
    let with_cert = client(&good, Some(&member));
    let e = internal_digests(&n1, Some(&with_cert), false).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("x-recsys-auth"), "{}", e.message());
    internal_digests(&n1, Some(&with_cert), true).await.expect("certificate and MAC: the call is answered");

    // Only our one certificate-less probe was refused for a missing client certificate: the
    // nodes' own internal calls all presented theirs.
    for (i, m) in cluster.metrics.iter().enumerate() {
        let refused = metric(m, "recsys_auth_failures_total", "credential=\"client_cert\"");
        assert_eq!(refused, [1.0, 0.0, 0.0][i], "n{}: internal calls refused for no client certificate", i + 1);
    }

    // The CLI: --tls-ca (or RECSYS_TLS_CA) reaches the node; without it, one line and exit ≠ 0.
    let ca_path = good.pem.display().to_string();
    let out = recsys_cli(&["recommend", "--addr", &n3, "--tls-ca", &ca_path, "--user", &user]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("#1"), "{}", String::from_utf8_lossy(&out.stdout));
    let out = recsys_cli(&["health", "--addr", &n1]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.lines().count() == 1, "{err}");
    assert!(err.contains("--tls-ca"), "{err}");
    println!("recsys health without --tls-ca: {err}");
    let out = Command::new(env!("CARGO_BIN_EXE_recsys"))
        .args(["status", "--addr", &n1])
        .env("RECSYS_TLS_CA", &ca_path)
        .current_dir(common::repo())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("cluster seen from n1"));

    // A node whose CA is another (its own certificate valid under it) cannot join: it cannot
    // verify the members, nor they it. It keeps asking, never serves, and the ring stays as it was.
    let outsider = leaf(&pki, &rogue, "n4", &["127.0.0.1", "localhost"]);
    let i4 = cluster.join_with(Some(&tls_toml(Some(&rogue.pem), &outsider)));
    let waiting = cluster.nodes[i4]
        .as_ref()
        .unwrap()
        .wait_line("waiting for a node to share the metadata log", Duration::from_secs(60));
    assert!(waiting.is_some(), "n4 neither joined nor reported failing to reach a member");
    println!("n4: {}", waiting.unwrap());
    let n4 = cluster.addrs[i4].clone();
    let st = health(&n4, Some(&client(&rogue, None))).await.unwrap();
    assert_eq!(st, ServingStatus::NotServing as i32, "n4 serves without having joined");
    let s = AdminClient::new(ch1).cluster_status(pb::ClusterStatusRequest {}).await.unwrap().into_inner();
    let holding: Vec<_> = s
        .nodes
        .iter()
        .filter(|n| n.generator_partitions + n.feature_partitions > 0)
        .map(|n| n.node_id.as_str())
        .collect();
    assert_eq!(holding, ["n1", "n2", "n3"], "{s:?}");
    assert!(s.target_members.is_empty(), "a change began: {:?}", s.target_members);
    // The cluster still answers.
    rec3.recommend(req).await.unwrap();
}

/// `[tls]` is checked before anything is served: each mistake refuses start, naming the key
/// and the file.
#[test]
fn a_bad_tls_config_refuses_start_naming_the_key() {
    let dir = common::temp_dir("tls-refuse");
    let good = ca(&dir, "cluster");
    let rogue = ca(&dir, "rogue");
    let id = leaf(&dir, &good, "n1", &["127.0.0.1"]);
    let other_name = leaf(&dir, &good, "elsewhere", &["10.9.8.7"]);
    let foreign = leaf(&dir, &rogue, "foreign", &["127.0.0.1"]);
    let missing = dir.join("nope.pem");
    let s = |p: &Path| p.display().to_string();
    let cases: Vec<(String, Vec<String>)> = vec![
        (format!("[tls]\ncert = {:?}\nkey = {:?}\n", s(&id.0), s(&id.1)), vec!["tls.ca".into(), "missing".into()]),
        (
            format!("[tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n", s(&missing), s(&id.1), s(&good.pem)),
            vec!["tls.cert".into(), s(&missing), "cannot read".into()],
        ),
        (
            format!("[tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n", s(&id.0), s(&id.0), s(&good.pem)),
            vec!["tls.key".into(), s(&id.0), "no PEM private key".into()],
        ),
        (
            format!("[tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n", s(&id.1), s(&id.1), s(&good.pem)),
            vec!["tls.cert".into(), s(&id.1), "no PEM certificate".into()],
        ),
        (
            format!("[tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n", s(&id.0), s(&other_name.1), s(&good.pem)),
            vec!["tls.cert".into(), "tls.key".into()],
        ),
        (
            format!("[tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n", s(&foreign.0), s(&foreign.1), s(&good.pem)),
            vec!["tls.cert".into(), s(&foreign.0), "does not verify".into()],
        ),
        (
            format!("[tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n", s(&other_name.0), s(&other_name.1), s(&good.pem)),
            vec!["tls.cert".into(), "127.0.0.1".into(), "does not verify".into()],
        ),
    ];
    for (n, (toml, wants)) in cases.iter().enumerate() {
        let cfg = dir.join(format!("case{n}.toml"));
        std::fs::write(&cfg, toml).unwrap();
        let data = dir.join(format!("data{n}"));
        let cfg = s(&cfg);
        let out = common::node_fails(&data, &["--config", "config/node.toml", "--config", &cfg]);
        for w in wants {
            assert!(out.contains(w.as_str()), "case {n}: `{w}` not in:\n{out}");
        }
    }
}
