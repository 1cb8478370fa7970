//! Item state (for the filters) and item feature rows (for the features stage) of the
//! candidates, in one call per node: both come from the items' feature partitions.
use std::sync::Arc;
use std::time::Instant;

use super::super::components::{BoxFuture, ComponentError, Hydrated, Hydrator, Query};
use super::super::{Coverage, Pipeline};
use crate::generators::Candidate;
use crate::ids;
use crate::transport::{ReadQuery, ReadReply};

pub struct ItemState;

impl Hydrator for ItemState {
    fn name(&self) -> &'static str {
        "item_state"
    }

    fn hydrate<'a>(
        &'a self,
        p: &'a Pipeline,
        q: &'a Query<'a>,
        cands: &'a [Candidate],
        deadline: Instant,
        cov: &'a mut Coverage,
        out: &'a mut Hydrated,
    ) -> BoxFuture<'a, Result<(), ComponentError>> {
        Box::pin(async move {
            let user_emb: Arc<[f32]> = Arc::from(q.profile.embedding.as_slice());
            let feats = &p.plan.item_feats;
            let now = q.now;
            let (replies, c) =
                p.transport
                    .read_keyed("filtering", ids::ITEM, cands.iter().map(|c| c.item), deadline, |keys| {
                        ReadQuery::Hydrate { keys, feats: feats.clone(), user_emb: user_emb.clone(), now }
                    })
                    .await;
            cov.stage(c);
            out.briefs.reserve(cands.len());
            out.rows.reserve(cands.len());
            for (keys, reply) in replies {
                let ReadReply::Hydrate(bs, mut rows) = reply else { continue };
                // Moved, not cloned: each clone of the block is an atomic increment on a shared line.
                let metas = std::mem::take(&mut rows.meta);
                let block = Arc::new(rows);
                for (j, ((k, b), m)) in keys.into_iter().zip(bs).zip(metas).enumerate() {
                    if let (Some(b), Some(m)) = (b, m) {
                        out.briefs.insert(k, b);
                        out.rows.insert(k, (m, block.clone(), j as u32));
                    }
                }
            }
            Ok(())
        })
    }
}
