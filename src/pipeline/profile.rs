//! Stage 0: the user's profile from the feature partition owning the user (a replica when the
//! preferred one is down). A missing profile degrades to a cold-start answer.
use std::time::Instant;

use super::{Coverage, Pipeline};
use crate::domain::{Part, Role};
use crate::features::shard::UserSnapshot;
use crate::ids::{self, key_of, partition_of};
use crate::transport::{ReadQuery, ReadReply};

impl Pipeline {
    pub(super) async fn profile(&self, user_id: &str, deadline: Instant, cov: &mut Coverage) -> UserSnapshot {
        let key = key_of(user_id);
        let part = Part::new(Role::Feature, partition_of(ids::USER, key, self.transport.ring().partitions));
        let out = self.transport.read_fanout("profile", vec![(part, ReadQuery::Profile(key))], deadline).await;
        let missing = !out.coverage.missing.is_empty();
        cov.stage(out.coverage);
        let profile = match out.replies.into_iter().next() {
            Some((_, ReadReply::Profile(p))) => *p,
            _ => {
                if missing {
                    tracing::warn!("profile partition missing");
                    cov.fallback("profile_missing");
                }
                UserSnapshot::unknown()
            }
        };
        if !profile.known {
            cov.fallback("cold_start");
        }
        profile
    }
}
