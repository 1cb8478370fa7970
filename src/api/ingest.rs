use std::sync::{Arc, OnceLock};

use tonic::{Request, Response, Status};

use super::pb;
use super::recommender::ready;
use crate::domain::{EventRecord, ItemRecord, UserRecord};
use crate::ingest::{validate, WriteOutcome, Writer};
use crate::logging::{EventRow, FeatureLogger, LogLine};

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
                allowed_regions: i.allowed_regions,
                blocked_regions: i.blocked_regions,
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
                hidden_topics: u.hidden_topics,
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
        w.check_size("events", events.len())?;
        // Decoding rejects only what has no internal form (the action); every other check is the
        // validation layer's (`ingest::validate`), run by the writer.
        let mut out = WriteOutcome::default();
        let mut records = Vec::with_capacity(events.len());
        for (i, e) in events.into_iter().enumerate() {
            match validate::action(i, e.action) {
                Err(r) => out.reject(r.to_string()),
                Ok(action) => records.push((
                    i,
                    EventRecord {
                        event_id: e.event_id,
                        user: e.user_id,
                        item: e.item_id,
                        action,
                        ts_ms: e.event_time_ms,
                        geo: e.geo,
                        request_id: e.request_id,
                        pairs: vec![],
                    },
                )),
            }
        }
        let (out, applied) = w.log_events(records, out).await?;
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
