//! `recsys load`: a synthetic world (deterministic seed) or JSON-lines files, through the Ingest API.
use std::path::Path;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use tonic::transport::Channel;

use crate::api::pb;
use crate::api::pb::ingest_client::IngestClient;
use crate::store::{Action, EventRecord, ItemRecord, UserRecord};
use crate::world::{World, WorldSpec};

pub fn to_pb_item(i: &ItemRecord) -> pb::Item {
    pb::Item {
        item_id: i.id.clone(),
        author_id: i.author.clone(),
        topic: i.topic,
        geo: i.geo.clone(),
        price: i.price,
        quality: i.quality,
        duration_secs: i.duration_secs,
        is_video: i.is_video,
        in_stock: i.in_stock,
        created_at: i.created_at,
        embedding: i.embedding.clone(),
    }
}

pub fn to_pb_user(u: &UserRecord) -> pb::User {
    pb::User {
        user_id: u.id.clone(),
        geo: u.geo.clone(),
        signup_at: u.signup_at,
        follows: u.follows.clone(),
        blocked_authors: u.blocked_authors.clone(),
    }
}

pub fn to_pb_action(a: Action) -> pb::Action {
    match a {
        Action::Impression => pb::Action::Impression,
        Action::Click => pb::Action::Click,
        Action::Like => pb::Action::Like,
        Action::Share => pb::Action::Share,
        Action::Hide => pb::Action::Hide,
        Action::Report => pb::Action::Report,
    }
}

pub fn to_pb_event(e: &EventRecord) -> pb::Event {
    pb::Event {
        event_id: e.event_id.clone(),
        user_id: e.user.clone(),
        item_id: e.item.clone(),
        action: to_pb_action(e.action) as i32,
        event_time_ms: e.ts_ms,
        geo: e.geo.clone(),
        request_id: e.request_id.clone(),
    }
}

fn bar(len: u64, what: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::new(len);
    b.set_style(
        ProgressStyle::with_template(&format!("{what:>7} [{{bar:40}}] {{pos}}/{{len}} {{per_sec}} eta {{eta}}"))
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    b
}

#[derive(Debug, Default)]
pub struct LoadSummary {
    pub items: u64,
    pub users: u64,
    pub events: u64,
    pub duplicates: u64,
    pub rejected: u64,
    pub seconds: f64,
}

/// Sends a world through the API in batches; a retried batch is safe (event ids are stable).
pub async fn load_world(
    ch: Channel,
    world: std::sync::Arc<World>,
    batch: usize,
    quiet: bool,
) -> anyhow::Result<LoadSummary> {
    let mut c = IngestClient::new(ch).max_encoding_message_size(64 << 20);
    let t = Instant::now();
    let mut s = LoadSummary::default();
    let b = bar(world.items.len() as u64, "items", quiet);
    for chunk in world.items.chunks(batch) {
        let r = c
            .upsert_items(pb::UpsertItemsRequest { items: chunk.iter().map(to_pb_item).collect() })
            .await?
            .into_inner();
        s.items += u64::from(r.accepted);
        s.rejected += u64::from(r.rejected);
        b.inc(chunk.len() as u64);
    }
    b.finish();
    let b = bar(world.users.len() as u64, "users", quiet);
    for chunk in world.users.chunks(batch) {
        let r = c
            .upsert_users(pb::UpsertUsersRequest { users: chunk.iter().map(to_pb_user).collect() })
            .await?
            .into_inner();
        s.users += u64::from(r.accepted);
        b.inc(chunk.len() as u64);
    }
    b.finish();
    let b = bar(world.spec.events as u64, "events", quiet);
    let mut pending: Vec<pb::Event> = Vec::with_capacity(batch);
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<pb::Event>>(4);
    // Generation on a blocking thread, sending through a bounded channel: memory stays flat.
    let w = world.clone();
    let producer = tokio::task::spawn_blocking(move || {
        w.events(|e| {
            pending.push(to_pb_event(&e));
            if pending.len() >= batch {
                let _ = tx.blocking_send(std::mem::take(&mut pending));
            }
        });
        if !pending.is_empty() {
            let _ = tx.blocking_send(pending);
        }
    });
    while let Some(events) = rx.recv().await {
        let n = events.len() as u64;
        let r = c.log_events(pb::LogEventsRequest { events }).await?.into_inner();
        s.events += u64::from(r.accepted);
        s.duplicates += u64::from(r.duplicates);
        s.rejected += u64::from(r.rejected);
        b.inc(n);
    }
    producer.await?;
    b.finish();
    s.seconds = t.elapsed().as_secs_f64();
    Ok(s)
}

pub fn synthetic_spec(seed: u64, items: usize, users: usize, events: usize) -> WorldSpec {
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    WorldSpec { seed, items, users, events, topics: 20, emb_dim: 8, now }
}

/// Loads JSON-lines files of items, users and events (same field names as the records).
pub async fn load_files(
    ch: Channel,
    items: Option<&Path>,
    users: Option<&Path>,
    batch: usize,
) -> anyhow::Result<LoadSummary> {
    let mut c = IngestClient::new(ch).max_encoding_message_size(64 << 20);
    let mut s = LoadSummary::default();
    let t = Instant::now();
    if let Some(p) = items {
        let text = std::fs::read_to_string(p)?;
        let recs: Vec<ItemRecord> =
            text.lines().filter(|l| !l.trim().is_empty()).map(serde_json::from_str).collect::<Result<_, _>>()?;
        for chunk in recs.chunks(batch) {
            let r = c
                .upsert_items(pb::UpsertItemsRequest { items: chunk.iter().map(to_pb_item).collect() })
                .await?
                .into_inner();
            s.items += u64::from(r.accepted);
        }
    }
    if let Some(p) = users {
        let text = std::fs::read_to_string(p)?;
        let recs: Vec<UserRecord> =
            text.lines().filter(|l| !l.trim().is_empty()).map(serde_json::from_str).collect::<Result<_, _>>()?;
        for chunk in recs.chunks(batch) {
            let r = c
                .upsert_users(pb::UpsertUsersRequest { users: chunk.iter().map(to_pb_user).collect() })
                .await?
                .into_inner();
            s.users += u64::from(r.accepted);
        }
    }
    s.seconds = t.elapsed().as_secs_f64();
    Ok(s)
}
