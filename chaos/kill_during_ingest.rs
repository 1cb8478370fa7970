//! Fault scenario: SIGKILL a node while event batches are being written, restart it on the same
//! data dir, and check that every batch it acknowledged survived (acks wait for sled's flush).
#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;

use recsys::api::pb;
use recsys::api::pb::ingest_client::IngestClient;
use recsys::cli::load::{to_pb_item, to_pb_user};
use recsys::world::World;

fn batch(world: &World, n: usize, size: usize) -> Vec<pb::Event> {
    (0..size)
        .map(|j| {
            let i = (n * size + j) % world.items.len();
            pb::Event {
                event_id: format!("chaos-{n}-{j}"),
                user_id: format!("u{}", j % world.users.len()),
                item_id: world.items[i].id.clone(),
                action: if j % 3 == 0 { pb::Action::Like } else { pb::Action::Impression } as i32,
                event_time_ms: world.spec.now * 1000,
                geo: "us".into(),
                request_id: String::new(),
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    let dir = common::temp_dir("chaos-kill");
    let world = Arc::new(World::generate(recsys::cli::load::synthetic_spec(5, 500, 50, 0)));
    let node = common::start_node(&dir, &[]).expect("node starts");
    recsys::cli::wait_serving(&node.addr, std::time::Duration::from_secs(60)).await.unwrap();
    let ch = recsys::cli::connect(&node.addr).await.unwrap();
    let mut ing = IngestClient::new(ch);
    ing.upsert_items(pb::UpsertItemsRequest { items: world.items.iter().map(to_pb_item).collect() }).await.unwrap();
    ing.upsert_users(pb::UpsertUsersRequest { users: world.users.iter().map(to_pb_user).collect() }).await.unwrap();

    // Writer task: sends batches back to back and records the ones acknowledged.
    let acked = Arc::new(std::sync::Mutex::new(Vec::<usize>::new()));
    let (w, a) = (world.clone(), acked.clone());
    let (count_tx, mut count_rx) = tokio::sync::watch::channel(0usize);
    let mut client = ing.clone();
    let writer = tokio::spawn(async move {
        for n in 0..400 {
            match client.log_events(pb::LogEventsRequest { events: batch(&w, n, 200) }).await {
                Ok(r) => {
                    assert_eq!(r.into_inner().accepted, 200);
                    let len = {
                        let mut g = a.lock().unwrap();
                        g.push(n);
                        g.len()
                    };
                    let _ = count_tx.send(len);
                }
                Err(_) => break, // the node died under this batch: not acknowledged
            }
        }
    });
    // Kill once a good number of batches are acknowledged, while more are in flight.
    count_rx.wait_for(|n| *n >= 15).await.expect("writer acknowledged 15 batches");
    node.kill9();
    writer.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(acked.len() >= 15);

    let node = common::start_node(&dir, &[]).expect("node restarts after SIGKILL");
    recsys::cli::wait_serving(&node.addr, std::time::Duration::from_secs(60)).await.unwrap();
    let mut ing = IngestClient::new(recsys::cli::connect(&node.addr).await.unwrap());
    // Re-sending an acknowledged batch must find every event already stored.
    for n in &acked {
        let r = ing.log_events(pb::LogEventsRequest { events: batch(&world, *n, 200) }).await.unwrap().into_inner();
        assert_eq!((r.accepted, r.duplicates), (0, 200), "batch {n} was acknowledged but lost");
    }
    assert!(node.stop().success());
    let _ = std::fs::remove_dir_all(&dir);
}
