use std::sync::{Arc, OnceLock};

use tonic::{Request, Response, Status};

use super::pb;
use super::recommender::ready;
use crate::ingest::{WriteOutcome, Writer};
use crate::logging::{EventRow, FeatureLogger, LogLine};
use crate::store::{Action, EventRecord, ItemRecord, UserRecord};

pub struct IngestService {
    pub writer: Arc<OnceLock<Arc<Writer>>>,
    pub logger: Arc<OnceLock<FeatureLogger>>,
}

fn reply(o: WriteOutcome) -> Response<pb::WriteResponse> {
    Response::new(pb::WriteResponse {
        accepted: o.accepted,
        duplicates: o.duplicates,
        rejected: o.rejected,
        rejections: o.rejections,
        flush_micros: o.flush_micros,
    })
}

fn action(a: i32) -> Option<Action> {
    match pb::Action::try_from(a).ok()? {
        pb::Action::Unspecified => None,
        pb::Action::Impression => Some(Action::Impression),
        pb::Action::Click => Some(Action::Click),
        pb::Action::Like => Some(Action::Like),
        pb::Action::Share => Some(Action::Share),
        pb::Action::Hide => Some(Action::Hide),
        pb::Action::Report => Some(Action::Report),
    }
}

#[tonic::async_trait]
impl pb::ingest_server::Ingest for IngestService {
    async fn upsert_items(&self, req: Request<pb::UpsertItemsRequest>) -> Result<Response<pb::WriteResponse>, Status> {
        let w = ready(&self.writer)?;
        let items = req
            .into_inner()
            .items
            .into_iter()
            .map(|i| ItemRecord {
                id: i.item_id,
                author: i.author_id,
                topic: i.topic,
                geo: i.geo,
                price: i.price,
                quality: i.quality,
                duration_secs: i.duration_secs,
                is_video: i.is_video,
                in_stock: i.in_stock,
                created_at: i.created_at,
                embedding: i.embedding,
                deleted: false,
            })
            .collect();
        Ok(reply(w.upsert_items(items).await?))
    }

    async fn upsert_users(&self, req: Request<pb::UpsertUsersRequest>) -> Result<Response<pb::WriteResponse>, Status> {
        let w = ready(&self.writer)?;
        let users = req
            .into_inner()
            .users
            .into_iter()
            .map(|u| UserRecord {
                id: u.user_id,
                geo: u.geo,
                signup_at: u.signup_at,
                follows: u.follows,
                blocked_authors: u.blocked_authors,
            })
            .collect();
        Ok(reply(w.upsert_users(users).await?))
    }

    async fn delete_items(&self, req: Request<pb::DeleteItemsRequest>) -> Result<Response<pb::WriteResponse>, Status> {
        let w = ready(&self.writer)?;
        Ok(reply(w.delete_items(req.into_inner().item_ids).await?))
    }

    async fn log_events(&self, req: Request<pb::LogEventsRequest>) -> Result<Response<pb::WriteResponse>, Status> {
        let w = ready(&self.writer)?;
        let events = req.into_inner().events;
        if events.len() > w.cfg.ingest.max_batch {
            return Err(Status::resource_exhausted(format!(
                "events: batch of {} exceeds the limit of {}",
                events.len(),
                w.cfg.ingest.max_batch
            )));
        }
        let mut pre_rejected = WriteOutcome::default();
        let mut records = Vec::with_capacity(events.len());
        for (i, e) in events.into_iter().enumerate() {
            let why = if e.event_id.is_empty() || e.event_id.len() > 128 {
                Some("event_id: must be 1..=128 bytes")
            } else if e.user_id.is_empty() || e.user_id.len() > 256 {
                Some("user_id: must be 1..=256 bytes")
            } else if e.item_id.is_empty() || e.item_id.len() > 256 {
                Some("item_id: must be 1..=256 bytes")
            } else if e.geo.len() > 64 {
                Some("geo: longer than 64 bytes")
            } else if e.request_id.len() > 128 {
                Some("request_id: longer than 128 bytes")
            } else if e.event_time_ms <= 0 {
                Some("event_time_ms: must be a positive unix time in milliseconds")
            } else {
                None
            };
            match (why, action(e.action)) {
                (Some(w), _) => pre_rejected.reject(format!("events[{i}].{w}")),
                (None, None) => {
                    pre_rejected.reject(format!("events[{i}].action: unspecified or unknown action {}", e.action))
                }
                (None, Some(a)) => records.push(EventRecord {
                    event_id: e.event_id,
                    user: e.user_id,
                    item: e.item_id,
                    action: a,
                    ts_ms: e.event_time_ms,
                    geo: e.geo,
                    request_id: e.request_id,
                    pairs: vec![],
                }),
            }
        }
        if records.is_empty() {
            if pre_rejected.rejected > 0 {
                return Ok(reply(pre_rejected));
            }
            return Err(Status::invalid_argument("events: batch is empty"));
        }
        let (mut out, applied) = w.log_events(records).await?;
        out.rejected += pre_rejected.rejected;
        let mut rej = pre_rejected.rejections;
        rej.extend(out.rejections);
        rej.truncate(10);
        out.rejections = rej;
        if let Some(l) = self.logger.get() {
            for e in applied {
                l.log(LogLine::Event(EventRow {
                    event_id: e.event_id,
                    user_id: e.user,
                    item_id: e.item,
                    action: e.action.name(),
                    event_time_ms: e.ts_ms,
                    request_id: e.request_id,
                }));
            }
        }
        Ok(reply(out))
    }
}
