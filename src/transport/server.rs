//! The internal service a node answers for its peers: reads and writes of the partitions it
//! holds, scoring on its scorers, later pages of the ranked lists it holds, and anti-entropy.
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tonic::{Request, Response, Status};

use super::client::result_part;
use super::{decode, encode, pb, ReadQuery, Transport};
use crate::auth::ClusterKey;
use crate::cluster::metalog::{MetaLog, MetaMsg};
use crate::cluster::replication::{self, PullAsk};
use crate::domain::{LoggedOp, Part};
use crate::pipeline::Pipeline;

pub struct InternalService {
    pub transport: Arc<OnceLock<Arc<Transport>>>,
    pub pipeline: Arc<OnceLock<Arc<Pipeline>>>,
    /// The metadata log: answered from the start (a restarting cluster confirms its ring
    /// through it before any node has a transport).
    pub meta: Arc<OnceLock<Arc<MetaLog>>>,
    /// Signs metadata replies for their caller.
    pub key: Option<ClusterKey>,
}

impl InternalService {
    /// The transport once the ring has formed, and the caller's deadline. Tables may differ for
    /// a moment while a membership change spreads: a caller with a newer one wakes this node's
    /// ring sync, and each partition is answered only where it is held (reads: complete; writes:
    /// owned under this node's table, current or target), so no placement is mixed up.
    fn check(&self, env: Option<&pb::Envelope>) -> Result<(Arc<Transport>, Duration), Status> {
        let t = self.transport.get().ok_or_else(|| Status::unavailable("node is starting: no ring yet"))?;
        if t.local.faults().serving_fails() {
            return Err(Status::unavailable(format!("{}: internal rpcs fail (injected fault)", t.node_id)));
        }
        let env = env.ok_or_else(|| Status::invalid_argument("envelope: missing"))?;
        let ring = t.ring();
        if env.epoch > ring.epoch || (env.epoch == ring.epoch && env.digest != ring.digest) {
            tracing::debug!(caller = %env.from_node, epoch = env.epoch, mine = ring.epoch, "caller has another table");
            t.ring_changed.notify_one();
        }
        let deadline = Duration::from_millis(u64::from(env.deadline_ms.max(1)));
        Ok((t.clone(), deadline))
    }
}

fn failed(part: Part, error: String) -> pb::PartitionResult {
    pb::PartitionResult { role: part.role as u32, partition: part.partition, error, body: vec![] }
}

fn done(part: Part, body: Vec<u8>) -> pb::PartitionResult {
    pb::PartitionResult { role: part.role as u32, partition: part.partition, error: String::new(), body }
}

fn parts_of(asks: &[pb::PartitionAsk]) -> Result<Vec<Part>, Status> {
    asks.iter()
        .map(|a| {
            let r = pb::PartitionResult { role: a.role, partition: a.partition, ..Default::default() };
            result_part(&r).ok_or_else(|| Status::invalid_argument(format!("asks: unknown role {}", a.role)))
        })
        .collect()
}

/// Decodes each ask's body for the partitions open here; a closed partition or an undecodable
/// body is answered at once in the returned results.
fn open_asks<'de, T: serde::Deserialize<'de>>(
    t: &Transport,
    parts: Vec<Part>,
    asks: &'de [pb::PartitionAsk],
) -> (Vec<(Part, T)>, Vec<pb::PartitionResult>) {
    let mut jobs = Vec::new();
    let mut results = Vec::new();
    for (part, a) in parts.into_iter().zip(asks) {
        if !t.local.is_open(part) {
            results.push(failed(part, format!("{part} is not open on {}", t.node_id)));
            continue;
        }
        match decode::<T>(&a.body) {
            Ok(p) => jobs.push((part, p)),
            Err(e) => results.push(failed(part, e)),
        }
    }
    (jobs, results)
}

#[tonic::async_trait]
impl pb::internal_server::Internal for InternalService {
    async fn read(&self, req: Request<pb::ReadRequest>) -> Result<Response<pb::ReadReply>, Status> {
        let req = req.into_inner();
        let (t, deadline) = self.check(req.envelope.as_ref())?;
        let parts = parts_of(&req.asks)?;
        let calls = parts.into_iter().zip(req.asks).map(|(part, a)| {
            let t = t.clone();
            async move {
                let q: ReadQuery = match decode(&a.body) {
                    Ok(q) => q,
                    Err(e) => return failed(part, e),
                };
                match t.local.read(part, q, deadline).await {
                    Ok(r) => done(part, encode(&r)),
                    Err(e) => failed(part, e.to_string()),
                }
            }
        });
        let results = futures::future::join_all(calls).await;
        Ok(Response::new(pb::ReadReply { results }))
    }

    async fn apply(&self, req: Request<pb::ApplyRequest>) -> Result<Response<pb::ApplyReply>, Status> {
        let req = req.into_inner();
        let (t, _) = self.check(req.envelope.as_ref())?;
        let parts = parts_of(&req.asks)?;
        let mut asks = Vec::with_capacity(parts.len());
        let mut results = Vec::new();
        for (part, a) in parts.into_iter().zip(req.asks) {
            match decode::<Vec<LoggedOp>>(&a.body) {
                Ok(ops) => asks.push((part, Arc::new(ops))),
                Err(e) => results.push(failed(part, e)),
            }
        }
        let ring = t.ring();
        let me = t.node_id.clone();
        let (applied, flush_micros) =
            t.local.apply(asks, |p| ring.owns_write(p.role, p.partition, &me) || t.local.is_open(p)).await;
        results.extend(applied.into_iter().map(|(part, r)| match r {
            Ok(flags) => done(part, encode(&flags)),
            Err(e) => failed(part, e),
        }));
        Ok(Response::new(pb::ApplyReply { results, flush_micros }))
    }

    async fn score(&self, req: Request<pb::ScoreRequest>) -> Result<Response<pb::ScoreReply>, Status> {
        let req = req.into_inner();
        let (_, deadline) = self.check(req.envelope.as_ref())?;
        let p = self.pipeline.get().ok_or_else(|| Status::unavailable("node is starting"))?;
        let scores = p.score_here(&req, deadline).await?;
        Ok(Response::new(pb::ScoreReply { scores }))
    }

    async fn page(&self, req: Request<pb::PageRequest>) -> Result<Response<pb::PageReply>, Status> {
        let req = req.into_inner();
        let (_, deadline) = self.check(req.envelope.as_ref())?;
        let p = self.pipeline.get().ok_or_else(|| Status::unavailable("node is starting"))?;
        let page = p.page_here(&req, deadline).await?;
        Ok(Response::new(pb::PageReply { body: encode(&page) }))
    }

    async fn digests(&self, req: Request<pb::DigestsRequest>) -> Result<Response<pb::DigestsReply>, Status> {
        let req = req.into_inner();
        let (t, _) = self.check(req.envelope.as_ref())?;
        let results = parts_of(&req.asks)?
            .into_iter()
            .map(|part| {
                if t.local.is_open(part) {
                    done(part, encode(&t.local.store.digest(part)))
                } else {
                    failed(part, format!("{part} is not open on {}", t.node_id))
                }
            })
            .collect();
        Ok(Response::new(pb::DigestsReply { results }))
    }

    async fn pull(&self, req: Request<pb::PullRequest>) -> Result<Response<pb::PullReply>, Status> {
        let req = req.into_inner();
        let (t, _) = self.check(req.envelope.as_ref())?;
        let parts = parts_of(&req.asks)?;
        let (jobs, mut results) = open_asks::<PullAsk>(&t, parts, &req.asks);
        let store = t.local.store.clone();
        // Bucket scans read sled: blocking work.
        let pulled = tokio::task::spawn_blocking(move || {
            jobs.into_iter().map(|(part, p)| (part, replication::missing_ops(&store, part, &p))).collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        results.extend(pulled.into_iter().map(|(part, r)| match r {
            Ok(ops) => done(part, encode(&ops)),
            Err(e) => failed(part, e.to_string()),
        }));
        Ok(Response::new(pb::PullReply { results }))
    }

    async fn stream(&self, req: Request<pb::StreamRequest>) -> Result<Response<pb::StreamReply>, Status> {
        let req = req.into_inner();
        let (t, _) = self.check(req.envelope.as_ref())?;
        let r = pb::PartitionResult { role: req.role, partition: req.partition, ..Default::default() };
        let part =
            result_part(&r).ok_or_else(|| Status::invalid_argument(format!("role: unknown role {}", req.role)))?;
        if req.partition >= t.local.partitions {
            return Err(Status::invalid_argument(format!("partition: {} is out of range", req.partition)));
        }
        // A source must hold the partition complete (not itself receiving it).
        if !t.local.is_ready(part) {
            return Err(Status::unavailable(format!("{part} is not held complete on {}", t.node_id)));
        }
        let store = t.local.store.clone();
        let max = (req.max_bytes as usize).clamp(4 * 1024, 16 * 1024 * 1024);
        let from = req.from_batch;
        let (ops, next_batch, done) = tokio::task::spawn_blocking(move || store.chunk(part, from, max))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::StreamReply {
            body: encode(&ops),
            next_batch,
            done,
            ops_total: t.local.store.op_count(part),
        }))
    }

    async fn meta(&self, req: Request<pb::MetaRequest>) -> Result<Response<pb::MetaReply>, Status> {
        // With a secret, the reply is signed for the authenticated caller and the request's digest.
        let caller = req.extensions().get::<crate::auth::Caller>().cloned();
        let req = req.into_inner();
        let log = self.meta.get().ok_or_else(|| Status::unavailable("node is starting: no metadata log yet"))?.clone();
        let me = log.node_id().to_string();
        let msg: MetaMsg = serde_json::from_slice(&req.body)
            .map_err(|e| Status::invalid_argument(format!("body: not a metadata message ({e})")))?;
        let reply = tokio::task::spawn_blocking(move || log.handle(msg))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
        let body = serde_json::to_vec(&reply).map_err(|e| Status::internal(e.to_string()))?;
        let mac = match (&self.key, &caller) {
            (Some(k), Some(c)) => k.sign_body(&c.node, &me, &c.body, &body),
            (Some(_), None) => return Err(Status::unauthenticated("metadata call without an authenticated caller")),
            (None, _) => vec![],
        };
        Ok(Response::new(pb::MetaReply { body, mac }))
    }

    async fn state_hashes(&self, req: Request<pb::DigestsRequest>) -> Result<Response<pb::DigestsReply>, Status> {
        let req = req.into_inner();
        let (t, budget) = self.check(req.envelope.as_ref())?;
        let parts = parts_of(&req.asks)?;
        let timeout = budget.min(Duration::from_secs(10));
        let calls = parts.into_iter().map(|part| {
            let t = t.clone();
            async move {
                match t.local.state_hash(part, timeout).await {
                    Ok(h) => done(part, h.to_vec()),
                    Err(e) => failed(part, e.to_string()),
                }
            }
        });
        Ok(Response::new(pb::DigestsReply { results: futures::future::join_all(calls).await }))
    }

    async fn holds(&self, req: Request<pb::DigestsRequest>) -> Result<Response<pb::DigestsReply>, Status> {
        let req = req.into_inner();
        let (t, _) = self.check(req.envelope.as_ref())?;
        let parts = parts_of(&req.asks)?;
        let (jobs, mut results) = open_asks::<Vec<u32>>(&t, parts, &req.asks);
        let store = t.local.store.clone();
        // Bucket scans read sled: blocking work. Nothing is written.
        let held = tokio::task::spawn_blocking(move || {
            jobs.into_iter()
                .map(|(part, buckets)| {
                    let wanted: Vec<usize> =
                        buckets.into_iter().map(|b| b as usize).filter(|b| *b < crate::store::BUCKETS).collect();
                    let ids: Vec<(u32, Vec<u64>)> =
                        store.bucket_ids_many(part, &wanted).into_iter().map(|(b, ids)| (b as u32, ids)).collect();
                    (part, ids)
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        results.extend(held.into_iter().map(|(part, ids)| done(part, encode(&ids))));
        Ok(Response::new(pb::DigestsReply { results }))
    }
}
