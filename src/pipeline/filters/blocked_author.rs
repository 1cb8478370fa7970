//! Items by authors the user blocked (`User.blocked_authors`).
use super::super::components::{Batch, ComponentError, Filter, FilterPhase, Keep, Query};

pub struct BlockedAuthor;

impl Filter for BlockedAuthor {
    fn name(&self) -> &'static str {
        "blocked_author"
    }
    fn phase(&self) -> FilterPhase {
        FilterPhase::OnItemState
    }
    fn enable(&self, q: &Query) -> bool {
        !q.profile.blocked.is_empty()
    }
    fn filter(&self, q: &Query, batch: &Batch, keep: &mut Keep) -> Result<(), ComponentError> {
        let blocked = &q.profile.blocked;
        keep.retain(|i| batch.briefs[i].is_none_or(|b| blocked.binary_search(&b.author_key).is_err()));
        Ok(())
    }
}
