//! Admin.InjectFault on real node processes: refused unless `[chaos] enabled = true`, every field
//! validated (INVALID_ARGUMENT naming it, NOT_FOUND for a partition or scorer not on the node), a
//! killed partition actor is restarted by its supervisor (counted) while reads go to its replica,
//! delays and failing RPCs are listed in ClusterStatus and expire. The CLI says the same.
#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::Cluster;
use recsys::api::pb;
use recsys::api::pb::admin_client::AdminClient;
use recsys::api::pb::ingest_client::IngestClient;
use recsys::api::pb::inject_fault_request::Fault;
use recsys::api::pb::recommender_client::RecommenderClient;

const OVERRIDES: &str = "[cluster]\nreplication_factor = 1\n[scoring]\nscorers = 1\n[store]\ncache_capacity_mb = 16\n";

async fn admin(addr: &str) -> AdminClient<tonic::transport::Channel> {
    AdminClient::new(recsys::cli::connect(addr).await.unwrap())
}

async fn inject(addr: &str, f: Fault) -> Result<pb::InjectFaultResponse, tonic::Status> {
    admin(addr).await.inject_fault(pb::InjectFaultRequest { fault: Some(f) }).await.map(|r| r.into_inner())
}

fn kill(role: &str, partition: u32, index: u32) -> Fault {
    Fault::KillActor(pb::KillActorFault { role: role.into(), partition, index })
}

fn metric(addr: &str, series: &str) -> f64 {
    let (_, _, body) = common::http_get(addr, "/metrics").unwrap();
    body.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inject_fault_is_refused_unless_enabled() {
    let cluster = Cluster::start("fault-off", 1, OVERRIDES);
    cluster.wait_serving().await;
    let e = inject(&cluster.addrs[0], Fault::FailRpcs(pb::FailRpcsFault { duration_ms: 1000, outbound: false }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    assert_eq!(e.message(), "chaos.enabled is false on n1");
    let s = admin(&cluster.addrs[0]).await.cluster_status(pb::ClusterStatusRequest {}).await.unwrap().into_inner();
    assert!(!s.chaos_enabled && s.active_faults.is_empty());
    // The CLI: one line, the code spelled as gRPC spells it, exit code 1.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_recsys"))
        .args(["fault", "--addr", &cluster.addrs[0], "kill", "--role", "feature", "--partition", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr).trim(), "error: FAILED_PRECONDITION: chaos.enabled is false on n1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_are_validated_applied_restarted_and_expire() {
    let cluster = Cluster::start("fault-on", 2, &format!("{OVERRIDES}[chaos]\nenabled = true\n"));
    cluster.wait_serving().await;
    let n1 = cluster.addrs[0].clone();
    let s = admin(&n1).await.cluster_status(pb::ClusterStatusRequest {}).await.unwrap().into_inner();
    assert!(s.chaos_enabled);
    let held = |role: &str, here: bool| {
        s.partitions
            .iter()
            .find(|p| p.role == role && p.replicas.iter().any(|r| r == "n1") == here)
            .map(|p| p.partition)
            .unwrap()
    };
    let (mine, theirs) = (held("feature", true), held("feature", false));

    // Validation: the field is named; a partition or scorer not on this node is NOT_FOUND.
    let cases = [
        (None, tonic::Code::InvalidArgument, "fault: missing"),
        (Some(kill("bogus", 0, 0)), tonic::Code::InvalidArgument, "kill_actor.role: `bogus`"),
        (Some(kill("feature", 999, 0)), tonic::Code::InvalidArgument, "kill_actor.partition: 999 is outside"),
        (Some(kill("feature", theirs, 0)), tonic::Code::NotFound, "kill_actor: feature/"),
        (Some(kill("scorer", 0, 7)), tonic::Code::NotFound, "kill_actor.index: scorer 7 is not on n1"),
        (
            Some(Fault::DelayPartition(pb::DelayPartitionFault {
                role: "feature".into(),
                partition: mine,
                delay_ms: 0,
                duration_ms: 1000,
            })),
            tonic::Code::InvalidArgument,
            "delay_partition.delay_ms",
        ),
        (
            Some(Fault::FailRpcs(pb::FailRpcsFault { duration_ms: 700_000, outbound: false })),
            tonic::Code::InvalidArgument,
            "fail_rpcs.duration_ms: 700000 is outside",
        ),
        (
            Some(Fault::ClockOffset(pb::ClockOffsetFault { offset_ms: 0, duration_ms: 1000 })),
            tonic::Code::InvalidArgument,
            "clock_offset.offset_ms: 0 is outside",
        ),
        (
            Some(Fault::ClockOffset(pb::ClockOffsetFault { offset_ms: -5000, duration_ms: 0 })),
            tonic::Code::InvalidArgument,
            "clock_offset.duration_ms: 0 is outside",
        ),
    ];
    for (f, code, msg) in cases {
        let e = admin(&n1).await.inject_fault(pb::InjectFaultRequest { fault: f }).await.unwrap_err();
        assert_eq!(e.code(), code, "{}", e.message());
        assert!(e.message().starts_with(msg), "{} (wanted {msg})", e.message());
    }

    // A kill: the supervisor rebuilds the actor and counts it; requests keep being answered.
    let restarts = "recsys_actor_restarts_total{role=\"feature\"}";
    let before = metric(&cluster.metrics[0], restarts);
    let r = inject(&n1, kill("feature", mine, 0)).await.unwrap();
    assert_eq!(r.fault, format!("killed feature/{mine} on n1"));
    let end = Instant::now() + Duration::from_secs(10);
    while metric(&cluster.metrics[0], restarts) < before + 1.0 {
        assert!(Instant::now() < end, "the killed actor was not restarted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(metric(&cluster.metrics[0], "recsys_faults_injected_total{kind=\"kill_actor\"}"), 1.0);
    let mut rec = RecommenderClient::new(recsys::cli::connect(&n1).await.unwrap());
    let mut req = tonic::Request::new(pb::RecommendRequest {
        user_id: "u1".into(),
        surface: "home".into(),
        k: 5,
        ..Default::default()
    });
    req.set_timeout(Duration::from_millis(500));
    rec.recommend(req).await.expect("answered after the restart");

    // Delay and failing RPCs: listed while active, gone once expired.
    let d = pb::DelayPartitionFault { role: "feature".into(), partition: mine, delay_ms: 50, duration_ms: 1500 };
    let r = inject(&n1, Fault::DelayPartition(d)).await.unwrap();
    assert!(r.fault.starts_with(&format!("delay feature/{mine} by 50 ms")), "{}", r.fault);
    let r = inject(&n1, Fault::FailRpcs(pb::FailRpcsFault { duration_ms: 1500, outbound: true })).await.unwrap();
    assert_eq!(r.active_faults.len(), 2, "{:?}", r.active_faults);
    // n2 asks n1 for its partitions: UNAVAILABLE from n1 → degraded (R = 1), never an error.
    let mut rec2 = RecommenderClient::new(recsys::cli::connect(&cluster.addrs[1]).await.unwrap());
    let mut req = tonic::Request::new(pb::RecommendRequest {
        user_id: "u2".into(),
        surface: "home".into(),
        k: 5,
        ..Default::default()
    });
    req.set_timeout(Duration::from_millis(500));
    let t = Instant::now();
    rec2.recommend(req).await.expect("degraded, not failed");
    assert!(t.elapsed() < Duration::from_millis(500));
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let s = admin(&n1).await.cluster_status(pb::ClusterStatusRequest {}).await.unwrap().into_inner();
        if s.active_faults.is_empty() {
            break;
        }
        assert!(Instant::now() < end, "faults did not expire: {:?}", s.active_faults);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A stepped clock: n1 runs ten minutes behind, so an event stamped now is beyond its accepted
    // skew (refused, naming the field); once the step ends, the same event is taken.
    let world = recsys::world::World::generate(recsys::cli::load::synthetic_spec(3, 5, 2, 0));
    let item = pb::Item { in_stock: true, ..recsys::cli::load::to_pb_item(&world.items[0]) };
    let mut ing = IngestClient::new(recsys::cli::connect(&n1).await.unwrap());
    let r = ing.upsert_items(pb::UpsertItemsRequest { items: vec![item.clone()] }).await.unwrap().into_inner();
    assert_eq!(r.accepted, 1, "{r:?}");
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    let event = pb::Event {
        event_id: "clock-step-1".into(),
        user_id: "u1".into(),
        item_id: item.item_id.clone(),
        action: pb::Action::Click as i32,
        event_time_ms: now_ms,
        geo: "us".into(),
        request_id: String::new(),
    };
    let r =
        inject(&n1, Fault::ClockOffset(pb::ClockOffsetFault { offset_ms: -600_000, duration_ms: 1500 })).await.unwrap();
    assert!(r.fault.starts_with("clock off by -600000 ms"), "{}", r.fault);
    let r = ing.log_events(pb::LogEventsRequest { events: vec![event.clone()] }).await.unwrap().into_inner();
    assert_eq!((r.accepted, r.rejected), (0, 1), "{r:?}");
    assert!(
        r.rejections[0].starts_with("events[0].event_time_ms") && r.rejections[0].contains("ahead of the node's clock")
    );
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let s = admin(&n1).await.cluster_status(pb::ClusterStatusRequest {}).await.unwrap().into_inner();
        if s.active_faults.is_empty() {
            break;
        }
        assert!(Instant::now() < end, "the clock step did not end: {:?}", s.active_faults);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = ing.log_events(pb::LogEventsRequest { events: vec![event] }).await.unwrap().into_inner();
    assert_eq!((r.accepted, r.rejected), (1, 0), "taken once the clock is back: {r:?}");
}
