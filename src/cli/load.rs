//! `recsys load`: a synthetic world (deterministic seed) or JSON-lines files, through the Ingest API.
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use tonic::transport::Channel;

use super::OperatorToken;
use crate::api::pb;
use crate::domain::{Action, EventRecord, ItemRecord, UserRecord};
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
        allowed_regions: i.allowed_regions.clone(),
        blocked_regions: i.blocked_regions.clone(),
    }
}

pub fn to_pb_user(u: &UserRecord) -> pb::User {
    pb::User {
        user_id: u.id.clone(),
        geo: u.geo.clone(),
        signup_at: u.signup_at,
        follows: u.follows.clone(),
        blocked_authors: u.blocked_authors.clone(),
        hidden_topics: u.hidden_topics.clone(),
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
    load_world_with(ch, &OperatorToken::default(), world, batch, quiet).await
}

/// `load_world` with the operator token (a cluster with `cluster.operator_token` set).
pub async fn load_world_with(
    ch: Channel,
    token: &OperatorToken,
    world: std::sync::Arc<World>,
    batch: usize,
    quiet: bool,
) -> anyhow::Result<LoadSummary> {
    let mut c = super::ingest_client(ch, token).max_encoding_message_size(64 << 20);
    let t = Instant::now();
    let mut s = LoadSummary::default();
    let b = bar(world.items.len() as u64, "items", quiet);
    for chunk in world.items.chunks(batch) {
        let r = c
            .upsert_items(pb::UpsertItemsRequest { items: chunk.iter().map(to_pb_item).collect() })
            .await
            .map_err(super::output::status_error)?
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
            .await
            .map_err(super::output::status_error)?
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
        let r = c.log_events(pb::LogEventsRequest { events }).await.map_err(super::output::status_error)?.into_inner();
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

/// One line of an events file. `action` is one of impression, click, like, share, hide, report;
/// `event_id` makes a re-run of the same file count each event once.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventLine {
    pub event_id: String,
    pub user: String,
    pub item: String,
    pub action: String,
    pub ts_ms: i64,
    #[serde(default)]
    pub geo: String,
    #[serde(default)]
    pub request_id: String,
}

impl EventLine {
    fn to_pb(&self) -> Result<pb::Event, String> {
        let action = match self.action.as_str() {
            "impression" => pb::Action::Impression,
            "click" => pb::Action::Click,
            "like" => pb::Action::Like,
            "share" => pb::Action::Share,
            "hide" => pb::Action::Hide,
            "report" => pb::Action::Report,
            other => return Err(format!("action: unknown `{other}` (impression, click, like, share, hide, report)")),
        };
        Ok(pb::Event {
            event_id: self.event_id.clone(),
            user_id: self.user.clone(),
            item_id: self.item.clone(),
            action: action as i32,
            event_time_ms: self.ts_ms,
            geo: self.geo.clone(),
            request_id: self.request_id.clone(),
        })
    }
}

/// Reads a JSON-lines file in batches of `batch` parsed lines; a line that does not parse stops
/// the load with its file and line number (nothing after it is sent).
fn read_batches<T: serde::de::DeserializeOwned>(
    path: &Path,
    batch: usize,
    mut send: impl FnMut(Vec<T>, u64) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    use std::io::BufRead;
    let file = std::fs::File::open(path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut pending = Vec::with_capacity(batch);
    let mut bytes = 0u64;
    for (n, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), n + 1))?;
        bytes += line.len() as u64 + 1;
        if line.trim().is_empty() {
            continue;
        }
        pending.push(serde_json::from_str(&line).map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), n + 1))?);
        if pending.len() == batch {
            send(std::mem::take(&mut pending), bytes)?;
        }
    }
    if !pending.is_empty() {
        send(pending, bytes)?;
    }
    Ok(())
}

/// Loads JSON-lines files of items, users and events (items and users with the fields of
/// `ItemRecord` / `UserRecord`, events as `EventLine`), in that order, with a progress bar per file.
/// Files are read by a blocking thread and sent as they are read; the node's own validation
/// decides each record (rejections are counted and the first reasons printed).
pub async fn load_files(
    ch: Channel,
    token: &OperatorToken,
    items: Option<&Path>,
    users: Option<&Path>,
    events: Option<&Path>,
    batch: usize,
    quiet: bool,
) -> anyhow::Result<LoadSummary> {
    enum Batch {
        Items(Vec<ItemRecord>),
        Users(Vec<UserRecord>),
        Events(Vec<EventLine>),
    }
    let mut c = super::ingest_client(ch, token).max_encoding_message_size(64 << 20);
    let mut s = LoadSummary::default();
    let t = Instant::now();
    let files: Vec<(&'static str, PathBuf)> = [("items", items), ("users", users), ("events", events)]
        .into_iter()
        .filter_map(|(k, p)| p.map(|p| (k, p.to_path_buf())))
        .collect();
    for (kind, path) in files {
        let size = std::fs::metadata(&path).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?.len();
        let b = bar(size, kind, quiet);
        // Bounded: the reader runs at most four batches ahead of the sender.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<(Batch, u64)>(4);
        let reader = tokio::task::spawn_blocking(move || {
            let send = |batch: Batch, bytes: u64| {
                tx.blocking_send((batch, bytes)).map_err(|_| anyhow::anyhow!("load stopped"))
            };
            match kind {
                "items" => read_batches(&path, batch, |v, n| send(Batch::Items(v), n)),
                "users" => read_batches(&path, batch, |v, n| send(Batch::Users(v), n)),
                _ => read_batches(&path, batch, |v, n| send(Batch::Events(v), n)),
            }
        });
        let mut reasons: Vec<String> = Vec::new();
        while let Some((batch, bytes)) = rx.recv().await {
            let r = match batch {
                Batch::Items(v) => {
                    let r = c.upsert_items(pb::UpsertItemsRequest { items: v.iter().map(to_pb_item).collect() });
                    let r = r.await.map_err(super::output::status_error)?.into_inner();
                    s.items += u64::from(r.accepted);
                    r
                }
                Batch::Users(v) => {
                    let r = c.upsert_users(pb::UpsertUsersRequest { users: v.iter().map(to_pb_user).collect() });
                    let r = r.await.map_err(super::output::status_error)?.into_inner();
                    s.users += u64::from(r.accepted);
                    r
                }
                Batch::Events(v) => {
                    let mut evs = Vec::with_capacity(v.len());
                    for e in &v {
                        match e.to_pb() {
                            Ok(pe) => evs.push(pe),
                            Err(why) => {
                                s.rejected += 1;
                                if reasons.len() < 5 {
                                    reasons.push(format!("event {}: {why}", e.event_id));
                                }
                            }
                        }
                    }
                    let r = c
                        .log_events(pb::LogEventsRequest { events: evs })
                        .await
                        .map_err(super::output::status_error)?
                        .into_inner();
                    s.events += u64::from(r.accepted);
                    r
                }
            };
            s.duplicates += u64::from(r.duplicates);
            s.rejected += u64::from(r.rejected);
            reasons.extend(r.rejections.into_iter().take(5usize.saturating_sub(reasons.len())));
            b.set_position(bytes);
        }
        reader.await??;
        b.finish();
        for why in &reasons {
            eprintln!("  rejected: {why}");
        }
    }
    s.seconds = t.elapsed().as_secs_f64();
    Ok(s)
}
