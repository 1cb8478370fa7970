//! End-to-end against a real `recsys node` process: ingest a small synthetic world over gRPC,
//! recommend through all five stages on the committed ONNX models, check the serving rules and
//! the error mapping, restart the node and check the data survived.
mod common;

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use common::{node_fails, start_node, temp_dir};
use recsys::api::pb;
use recsys::api::pb::admin_client::AdminClient;
use recsys::api::pb::ingest_client::IngestClient;
use recsys::api::pb::recommender_client::RecommenderClient;
use recsys::cli::load::{load_world, synthetic_spec, to_pb_event};
use recsys::domain::Action;
use recsys::world::World;
use tonic::Code;

const ITEMS: usize = 3000;
const USERS: usize = 300;
const EVENTS: usize = 40_000;

fn req(user: &str, k: u32) -> pb::RecommendRequest {
    pb::RecommendRequest { user_id: user.into(), surface: "home".into(), k, explain: true, ..Default::default() }
}

async fn health(addr: &str) -> Option<i32> {
    let ch = recsys::cli::connect(addr).await.ok()?;
    let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
    Some(h.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.ok()?.into_inner().status)
}

async fn wait_serving(addr: &str) -> Vec<i32> {
    // Records every status seen until SERVING, so the test can check the NOT_SERVING → SERVING order.
    let mut seen = Vec::new();
    for _ in 0..600 {
        if let Some(s) = health(addr).await {
            if seen.last() != Some(&s) {
                seen.push(s);
            }
            if s == tonic_health::pb::health_check_response::ServingStatus::Serving as i32 {
                return seen;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("node never became SERVING; saw {seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_serves_recommendations_and_survives_restart() {
    let dir = temp_dir("serving");
    let node = start_node(&dir, &[]).expect("node starts");
    wait_serving(&node.addr).await;
    let ch = recsys::cli::connect(&node.addr).await.unwrap();

    // Reflection lists the public services.
    let mut refl = tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(ch.clone());
    let list = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut stream = refl.server_reflection_info(tokio_stream::iter(vec![list])).await.unwrap().into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let services: Vec<String> = match resp.message_response.unwrap() {
        tonic_reflection::pb::v1::server_reflection_response::MessageResponse::ListServicesResponse(l) => {
            l.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection reply {other:?}"),
    };
    for s in ["recsys.v1.Recommender", "recsys.v1.Ingest", "recsys.v1.Admin", "grpc.health.v1.Health"] {
        assert!(services.iter().any(|x| x == s), "{s} missing from {services:?}");
    }

    // Ingest a small world through the API.
    let world = Arc::new(World::generate(synthetic_spec(11, ITEMS, USERS, EVENTS)));
    let s = load_world(ch.clone(), world.clone(), 2000, true).await.unwrap();
    assert_eq!((s.items, s.users, s.events, s.rejected), (ITEMS as u64, USERS as u64, EVENTS as u64, 0));

    // Idempotency: the same events again are duplicates, not new counts.
    let mut again = Vec::new();
    world.events(|e| {
        if again.len() < 500 {
            again.push(to_pb_event(&e));
        }
    });
    let mut ing = IngestClient::new(ch.clone());
    let r = ing.log_events(pb::LogEventsRequest { events: again }).await.unwrap().into_inner();
    assert_eq!((r.accepted, r.duplicates), (0, 500));

    // A known, active user: what they have seen (impressions) and blocked.
    let mut impressions: std::collections::HashMap<String, HashSet<String>> = Default::default();
    world.events(|e| {
        if e.action == Action::Impression {
            impressions.entry(e.user.clone()).or_default().insert(e.item.clone());
        }
    });
    let (user, seen) = impressions.iter().max_by_key(|(_, s)| s.len()).map(|(u, s)| (u.clone(), s.clone())).unwrap();
    let uidx = World::user_index(&user).unwrap();
    let blocked: HashSet<String> = world.users[uidx].blocked_authors.iter().cloned().collect();

    let mut rec = RecommenderClient::new(ch.clone());
    let p1 = rec.recommend(req(&user, 10)).await.unwrap().into_inner();
    assert_eq!(p1.items.len(), 10, "k items for a known user");
    let cov = p1.coverage.clone().unwrap();
    assert!(!cov.degraded, "healthy node must not degrade: {cov:?}");
    assert!(cov.filter_removed["seen"] > 0, "the seen filter removed nothing for a heavy user: {cov:?}");
    assert!(p1.models.as_ref().is_some_and(|m| !m.stage2.is_empty()), "served by the deployed models");
    for it in &p1.items {
        assert!(!seen.contains(&it.item_id), "{} was already seen", it.item_id);
        assert!(!blocked.contains(&it.author_id), "{} is by a blocked author", it.item_id);
        assert!(!it.sources.is_empty(), "{} has no source", it.item_id);
        let ex = it.explanation.as_ref().unwrap();
        assert_eq!(ex.scored_by, "value_model");
        assert_eq!(ex.heads.len(), 4, "per-head scores when explain is set");
    }
    let spaced = p1.items.windows(2).all(|w| w[0].author_id != w[1].author_id);
    assert!(spaced || p1.diversity_relaxed, "two consecutive items by one author without the flag");
    assert!(!p1.diversity_relaxed, "a world with hundreds of authors should be spaceable");
    let stages: Vec<&str> = p1.timings.iter().map(|t| t.stage.as_str()).collect();
    assert_eq!(stages, ["profile", "retrieval", "filtering", "features", "scoring", "ranking"]);

    // Page 2 continues the ranking and repeats nothing.
    let mut r2 = req(&user, 10);
    r2.page_token = p1.next_page_token.clone();
    let p2 = rec.recommend(r2).await.unwrap().into_inner();
    assert!(p2.from_page_cache);
    let first: HashSet<_> = p1.items.iter().map(|i| i.item_id.clone()).collect();
    assert!(!p2.items.is_empty());
    assert!(p2.items.iter().all(|i| !first.contains(&i.item_id)), "page 2 repeats page 1");
    assert_eq!(p2.items[0].rank, 11);

    // No cluster secret here: page tokens are signed with a random key decided in the metadata
    // log, so a token forged with a key derived from the cluster's name (what signed them before)
    // is refused.
    let token = p1.next_page_token.clone();
    let fields: Vec<&str> = token.rsplitn(4, '.').collect();
    let (rid, minted_by) = (fields[2], fields[3].strip_prefix("p2.").unwrap());
    let forged = recsys::ranking::PageTokens::new(b"recsys-default-page-key/recsys").make(minted_by, rid, 20, &user);
    let mut r3 = req(&user, 10);
    r3.page_token = forged;
    let e = rec.recommend(r3).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().starts_with("page_token"), "{e:?}");

    // Writes are visible at once: impressions of page 1 hide those items; a deleted item is gone.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let imp: Vec<pb::Event> = p1
        .items
        .iter()
        .map(|i| pb::Event {
            event_id: format!("t-{}-{}", p1.request_id, i.item_id),
            user_id: user.clone(),
            item_id: i.item_id.clone(),
            action: pb::Action::Impression as i32,
            event_time_ms: now,
            geo: String::new(),
            request_id: p1.request_id.clone(),
        })
        .collect();
    assert_eq!(ing.log_events(pb::LogEventsRequest { events: imp }).await.unwrap().into_inner().accepted, 10);
    let victim = p2.items[0].item_id.clone();
    let d = ing
        .delete_items(pb::DeleteItemsRequest { item_ids: vec![victim.clone(), "no-such-item".into()] })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((d.accepted, d.rejected), (1, 1));
    assert!(d.rejections[0].contains("item_ids[1]"), "{:?}", d.rejections);
    let p3 = rec.recommend(req(&user, 30)).await.unwrap().into_inner();
    for it in &p3.items {
        assert!(!first.contains(&it.item_id), "{} was impressed and must be filtered", it.item_id);
        assert_ne!(it.item_id, victim, "deleted item served");
    }

    // An unknown user gets a cold-start answer, not an error.
    let cold = rec.recommend(req("someone-new", 5)).await.unwrap().into_inner();
    assert_eq!(cold.items.len(), 5);
    assert!(cold.coverage.unwrap().fallbacks.contains(&"cold_start".to_string()));
    assert!(cold.items.iter().all(|i| i.sources == ["trending"]));

    // Bad input: the right code, a message naming the field.
    let bad = [
        (req("", 5), "user_id"),
        (req(&user, 0), "k"),
        (req(&user, 1000), "k"),
        (pb::RecommendRequest { surface: "nope".into(), ..req(&user, 5) }, "surface"),
        (pb::RecommendRequest { page_token: "garbage".into(), ..req(&user, 5) }, "page_token"),
    ];
    for (r, field) in bad {
        let e = rec.recommend(r).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{field}: {e:?}");
        assert!(e.message().contains(field), "message {:?} does not name {field}", e.message());
    }
    // A token is signed for its user: another user presenting it is refused.
    let e = rec
        .recommend(pb::RecommendRequest { page_token: p1.next_page_token.clone(), ..req("someone-else", 5) })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("page_token"), "{}", e.message());
    let big: Vec<pb::Event> = (0..5001)
        .map(|i| pb::Event {
            event_id: format!("big{i}"),
            user_id: "u1".into(),
            item_id: "i1".into(),
            action: 1,
            event_time_ms: now,
            ..Default::default()
        })
        .collect();
    let e = ing.log_events(pb::LogEventsRequest { events: big }).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(e.message().contains("events"), "{}", e.message());
    let unknown = vec![
        pb::Event {
            event_id: "x1".into(),
            user_id: "u1".into(),
            item_id: "ghost".into(),
            action: 2,
            event_time_ms: now,
            ..Default::default()
        },
        pb::Event {
            event_id: "x2".into(),
            user_id: "u1".into(),
            item_id: "i1".into(),
            action: 0,
            event_time_ms: now,
            ..Default::default()
        },
        pb::Event {
            event_id: "x3".into(),
            user_id: "u1".into(),
            item_id: "i1".into(),
            action: 2,
            event_time_ms: now,
            ..Default::default()
        },
    ];
    let r = ing.log_events(pb::LogEventsRequest { events: unknown }).await.unwrap().into_inner();
    assert_eq!((r.accepted, r.rejected), (1, 2), "{r:?}");
    assert!(r.rejections.iter().any(|m| m.contains("events[0].item_id")), "{:?}", r.rejections);
    assert!(r.rejections.iter().any(|m| m.contains("events[1].action")), "{:?}", r.rejections);
    let e = ing
        .upsert_items(pb::UpsertItemsRequest {
            items: vec![pb::Item { item_id: "z".into(), author_id: "a".into(), topic: 999, ..Default::default() }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(e.rejected, 1);
    assert!(e.rejections[0].contains("items[0].topic"), "{:?}", e.rejections);

    // A second node on the same data dir is refused.
    let out = node_fails(&dir, &[]);
    assert!(out.contains("locked"), "{out}");

    // Restart: everything acknowledged is still there, and the seen filter still applies.
    let before = AdminClient::new(ch.clone()).cluster_status(pb::ClusterStatusRequest {}).await.unwrap().into_inner();
    drop(rec);
    drop(ing);
    drop(ch);
    assert!(node.stop().success(), "clean shutdown on SIGTERM");
    let node = start_node(&dir, &[]).expect("node restarts");
    let statuses = wait_serving(&node.addr).await;
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    assert_eq!(statuses.first(), Some(&not_serving), "health must say NOT_SERVING while replaying; saw {statuses:?}");
    let ch = recsys::cli::connect(&node.addr).await.unwrap();
    let after = AdminClient::new(ch.clone()).cluster_status(pb::ClusterStatusRequest {}).await.unwrap().into_inner();
    assert_eq!((after.items, after.users, after.events), (before.items, before.users, before.events));
    let mut rec = RecommenderClient::new(ch);
    let p4 = rec.recommend(req(&user, 30)).await.unwrap().into_inner();
    assert_eq!(p4.items.len(), 30);
    for it in &p4.items {
        assert!(!first.contains(&it.item_id) && !seen.contains(&it.item_id), "{} seen before the restart", it.item_id);
        assert_ne!(it.item_id, victim, "deletion lost in restart");
    }
    assert!(node.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn node_refuses_bad_config_and_bad_models() {
    let dir = temp_dir("refuse");
    let cfg = dir.join("bad.toml");
    let base = std::fs::read_to_string(common::repo().join("config/node.toml")).unwrap();
    std::fs::write(&cfg, base.replace("[serving]\n", "[serving]\nmax_kk = 3\n")).unwrap();
    let out = node_fails(&dir.join("d1"), &["--config", cfg.to_str().unwrap()]);
    assert!(out.contains("max_kk"), "unknown config key not named: {out}");
    // An impossible limit refuses to start, naming the key and the value (issue 15, finding 8:
    // `max_in_flight = 0` started a node that refused every call).
    let zero = base.replace("max_in_flight = 256", "max_in_flight = 0");
    assert_ne!(zero, base, "config/node.toml sets serving.max_in_flight");
    std::fs::write(&cfg, zero).unwrap();
    let out = node_fails(&dir.join("d0"), &["--config", cfg.to_str().unwrap()]);
    assert!(out.contains("serving.max_in_flight") && out.contains("0 is below 1"), "not named: {out}");

    let models = dir.join("models");
    std::fs::create_dir_all(&models).unwrap();
    for f in ["stage1_gbdt.onnx", "stage2_mlp.onnx"] {
        std::fs::copy(common::repo().join("models").join(f), models.join(f)).unwrap();
    }
    let manifest = std::fs::read_to_string(common::repo().join("models/manifest.json")).unwrap();
    std::fs::write(models.join("manifest.json"), manifest.replacen("\"item_price\"", "\"bogus_feature\"", 1)).unwrap();
    let out = node_fails(&dir.join("d2"), &["--models-dir", models.to_str().unwrap()]);
    assert!(out.contains("bogus_feature"), "unknown model input not named: {out}");
    // The batch-order hint must name a declared feature too.
    let order = manifest.replacen(
        "\"batch_order\": [\n      \"cross_emb_cosine\"",
        "\"batch_order\": [\n      \"no_such_col\"",
        1,
    );
    assert_ne!(order, manifest, "the committed manifest carries stage1.batch_order");
    std::fs::write(models.join("manifest.json"), order).unwrap();
    let out = node_fails(&dir.join("d3"), &["--models-dir", models.to_str().unwrap()]);
    assert!(out.contains("stage1.batch_order") && out.contains("no_such_col"), "bad batch_order not named: {out}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Copies the committed models into `dir`, with `edit` applied to the manifest text.
fn model_copy(dir: &std::path::Path, edit: impl Fn(String) -> String) -> String {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["stage1_gbdt.onnx", "stage2_mlp.onnx"] {
        std::fs::copy(common::repo().join("models").join(f), dir.join(f)).unwrap();
    }
    let manifest = std::fs::read_to_string(common::repo().join("models/manifest.json")).unwrap();
    std::fs::write(dir.join("manifest.json"), edit(manifest)).unwrap();
    dir.to_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_reload_live_and_a_bad_model_leaves_the_old_one_serving() {
    let dir = temp_dir("reload");
    // ReloadModels loads only under the models root: this test's versions live in its temp dir.
    let root = dir.join("root.toml");
    std::fs::write(&root, format!("[scoring]\nmodels_root = {:?}\n", dir.to_str().unwrap())).unwrap();
    let node = start_node(&dir.join("data"), &["--config", "config/node.toml", "--config", root.to_str().unwrap()])
        .expect("node starts");
    wait_serving(&node.addr).await;
    let ch = recsys::cli::connect(&node.addr).await.unwrap();
    let world = Arc::new(World::generate(synthetic_spec(5, 800, 100, 8000)));
    load_world(ch.clone(), world.clone(), 2000, true).await.unwrap();
    let user = world.users[0].id.clone();
    let mut admin = AdminClient::new(ch.clone());
    let mut rec = RecommenderClient::new(ch.clone());
    let version = |r: &pb::RecommendResponse| r.models.as_ref().map(|m| m.stage1.clone()).unwrap_or_default();
    let before = rec.recommend(req(&user, 10)).await.unwrap().into_inner();
    let original = version(&before);
    assert!(original.ends_with("/stage1") && before.items[0].explanation.as_ref().unwrap().heads.len() == 4);

    // Each bad version is refused with a message naming the problem; the old one keeps serving.
    let unknown = model_copy(&dir.join("unknown-feature"), |m| m.replacen("\"item_price\"", "\"bogus_feature\"", 1));
    let corrupt = model_copy(&dir.join("corrupt-onnx"), |m| m);
    std::fs::write(dir.join("corrupt-onnx/stage1_gbdt.onnx"), b"this is not an onnx model").unwrap();
    // Consistent manifest, but the model has four heads where it declares three: the canary catches it.
    let wrong_width = model_copy(&dir.join("wrong-width"), |m| {
        m.replacen("\"output_width\": 4", "\"output_width\": 3", 1).replacen(",\n      \"hide\"", "", 1)
    });
    // A valid ONNX model ort could run, but not a tree ensemble the native stage-1 engine evaluates.
    let not_trees = model_copy(&dir.join("not-trees"), |m| m);
    std::fs::copy(common::repo().join("models/stage2_mlp.onnx"), dir.join("not-trees/stage1_gbdt.onnx")).unwrap();
    let missing = dir.join("no-such-dir").to_str().unwrap().to_string();
    for (models_dir, code, needle) in [
        (not_trees, Code::InvalidArgument, "not supported by the native engine"),
        (unknown, Code::InvalidArgument, "bogus_feature"),
        (corrupt, Code::InvalidArgument, "stage1_gbdt.onnx"),
        (wrong_width, Code::InvalidArgument, "canary"),
        (missing, Code::NotFound, "not a directory"),
    ] {
        let e = admin.reload_models(pb::ReloadModelsRequest { models_dir: models_dir.clone() }).await.unwrap_err();
        assert_eq!(e.code(), code, "{models_dir}: {}", e.message());
        assert!(e.message().contains(needle), "{models_dir}: message `{}` should name `{needle}`", e.message());
        let r = rec.recommend(req(&user, 10)).await.unwrap().into_inner();
        assert_eq!(version(&r), original, "a refused reload changed the serving version");
        assert!(!r.coverage.unwrap().degraded);
    }

    // A good version swaps in while requests keep flowing: none fails, each is served whole by one
    // version, and once the reload has answered every new request gets the new one.
    let good = model_copy(&dir.join("good"), |m| {
        let v: serde_json::Value = serde_json::from_str(&m).unwrap();
        m.replacen(v["version"].as_str().unwrap(), "m-reloaded-in-test", 1)
    });
    let traffic = {
        let (mut rec, user) = (rec.clone(), user.clone());
        tokio::spawn(async move {
            let mut versions = Vec::new();
            for _ in 0..60 {
                let r = rec.recommend(req(&user, 10)).await.expect("no request fails during a reload").into_inner();
                assert_eq!(r.items.len(), 10);
                versions.push(r.models.unwrap().stage1);
            }
            versions
        })
    };
    let done = admin.reload_models(pb::ReloadModelsRequest { models_dir: good }).await.unwrap().into_inner();
    assert_eq!(done.version, "m-reloaded-in-test");
    assert_eq!(format!("{}/stage1", done.previous_version), original);
    let after = rec.recommend(req(&user, 10)).await.unwrap().into_inner();
    assert_eq!(version(&after), "m-reloaded-in-test/stage1");
    assert!(after.items.iter().all(|i| i.explanation.as_ref().unwrap().scored_by == "value_model"));
    let versions = traffic.await.unwrap();
    assert!(versions.iter().all(|v| *v == original || v == "m-reloaded-in-test/stage1"), "{versions:?}");
    // Two reloads at once: never both running; the loser is told UNAVAILABLE, not queued.
    let again = || {
        let mut a = admin.clone();
        let d = dir.join("good").to_str().unwrap().to_string();
        async move { a.reload_models(pb::ReloadModelsRequest { models_dir: d }).await }
    };
    let (x, y) = tokio::join!(again(), again());
    for r in [&x, &y] {
        if let Err(e) = r {
            assert_eq!(e.code(), Code::Unavailable, "{}", e.message());
            assert!(e.message().contains("in progress"), "{}", e.message());
        }
    }
    assert!(x.is_ok() || y.is_ok(), "one of two concurrent reloads deploys");
    let status = admin.cluster_status(pb::ClusterStatusRequest {}).await.unwrap().into_inner();
    let models = status.models.unwrap();
    assert_eq!(models.stage1, "m-reloaded-in-test/stage1");
    assert_eq!(models.stage1_engine, "native", "the default stage-1 engine");
    assert_eq!(status.nodes[0].scorers, 2, "the new version runs its own two scorers");
    assert!(node.stop().success());
}

/// `scoring.stage1_engine = "ort"`: stage 1 through ONNX Runtime (the reference engine) serves
/// and reloads like the native default (whose scores and rankings `tests/native_trees.rs` checks
/// against it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage1_on_onnx_runtime_serves_and_reloads() {
    let dir = temp_dir("ort-engine");
    std::fs::create_dir_all(&dir).unwrap();
    let ort_cfg = dir.join("ort.toml");
    // Reloads only from under the models root: this test's directory.
    std::fs::write(
        &ort_cfg,
        format!("[scoring]\nstage1_engine = \"ort\"\nmodels_root = {:?}\n", dir.to_str().unwrap()),
    )
    .unwrap();
    let base = common::repo().join("config/node.toml");
    let args = ["--config", base.to_str().unwrap(), "--config", ort_cfg.to_str().unwrap()];
    let node = start_node(&dir.join("data"), &args).expect("node starts");
    wait_serving(&node.addr).await;
    let ch = recsys::cli::connect(&node.addr).await.unwrap();
    let world = Arc::new(World::generate(synthetic_spec(6, 800, 100, 8000)));
    load_world(ch.clone(), world.clone(), 2000, true).await.unwrap();
    let mut rec = RecommenderClient::new(ch.clone());
    let got = rec.recommend(req(&world.users[1].id, 20)).await.unwrap().into_inner();
    assert_eq!(got.items.len(), 20);
    assert!(got.items.iter().all(|i| i.explanation.as_ref().unwrap().scored_by == "value_model"));
    let good = model_copy(&dir.join("good"), |m| {
        let v: serde_json::Value = serde_json::from_str(&m).unwrap();
        m.replacen(v["version"].as_str().unwrap(), "m-ort-reload", 1)
    });
    let mut admin = AdminClient::new(ch.clone());
    admin.reload_models(pb::ReloadModelsRequest { models_dir: good }).await.unwrap();
    let after = rec.recommend(req(&world.users[1].id, 10)).await.unwrap().into_inner();
    assert_eq!(after.models.unwrap().stage1, "m-ort-reload/stage1");
    assert!(after.items.iter().all(|i| i.explanation.as_ref().unwrap().scored_by == "value_model"));
    let status = admin.cluster_status(pb::ClusterStatusRequest {}).await.unwrap().into_inner();
    assert_eq!(status.models.unwrap().stage1_engine, "ort");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_reads_json_lines_files_and_names_a_bad_line() {
    let dir = temp_dir("load-files");
    let node = start_node(&dir.join("data"), &[]).expect("node starts");
    wait_serving(&node.addr).await;
    let world = World::generate(synthetic_spec(3, 300, 50, 3000));
    let lines = |v: Vec<String>| v.join("\n") + "\n";
    let items = dir.join("items.jsonl");
    std::fs::write(&items, lines(world.items.iter().map(|i| serde_json::to_string(i).unwrap()).collect())).unwrap();
    let users = dir.join("users.jsonl");
    std::fs::write(&users, lines(world.users.iter().map(|u| serde_json::to_string(u).unwrap()).collect())).unwrap();
    let mut evs = Vec::new();
    world.events(|e| {
        let action = format!("{:?}", e.action).to_lowercase();
        let line = serde_json::json!({"event_id": e.event_id, "user": e.user, "item": e.item, "action": action, "ts_ms": e.ts_ms});
        evs.push(line.to_string());
    });
    let total = evs.len() as u64;
    let user = world.users[0].id.clone();
    evs.push(
        serde_json::json!({"event_id": "bad-1", "user": user, "item": "i0", "action": "liek", "ts_ms": 1}).to_string(),
    );
    evs.push(
        serde_json::json!({"event_id": "bad-2", "user": user, "item": "nope", "action": "click", "ts_ms": world.spec.now * 1000})
            .to_string(),
    );
    let events = dir.join("events.jsonl");
    std::fs::write(&events, lines(evs)).unwrap();

    let load = |args: &[&std::path::Path]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_recsys"));
        cmd.args(["load", "--quiet", "--batch", "700", "--addr", &node.addr]);
        for (flag, p) in ["--items-file", "--users-file", "--events-file"].iter().zip(args) {
            if !p.as_os_str().is_empty() {
                cmd.arg(flag).arg(p);
            }
        }
        let out = cmd.output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (ok, out, err) = load(&[&items, &users, &events]);
    assert!(ok, "{out}{err}");
    assert!(out.contains(&format!("loaded 300 items, 50 users, {total} events (0 duplicates, 2 rejected)")), "{out}");
    assert!(err.contains("action: unknown `liek`") && err.contains("unknown item"), "reasons shown: {err}");
    // The same events again: every one a duplicate, none counted twice.
    let none = std::path::Path::new("");
    let (ok, out, _) = load(&[none, none, &events]);
    assert!(ok && out.contains(&format!("0 events ({total} duplicates, 2 rejected)")), "{out}");
    // A line that is not JSON stops the load and names the file and line.
    let broken = dir.join("broken.jsonl");
    std::fs::write(&broken, "{\"event_id\":\"x\"}\n\n{not json\n").unwrap();
    let (ok, _, err) = load(&[none, none, &broken]);
    assert!(!ok && err.contains("broken.jsonl:1:"), "the first bad line is named: {err}");
    let mut rec = RecommenderClient::new(recsys::cli::connect(&node.addr).await.unwrap());
    let r = rec.recommend(req(&user, 5)).await.unwrap().into_inner();
    assert_eq!(r.items.len(), 5, "a loaded user gets recommendations");
    assert!(node.stop().success());
}
