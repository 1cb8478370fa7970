//! Deleted items.
use super::super::components::{Batch, ComponentError, Filter, FilterPhase, Keep, Query};

pub struct Deleted;

impl Filter for Deleted {
    fn name(&self) -> &'static str {
        "deleted"
    }
    fn phase(&self) -> FilterPhase {
        FilterPhase::OnItemState
    }
    fn filter(&self, _q: &Query, batch: &Batch, keep: &mut Keep) -> Result<(), ComponentError> {
        keep.retain(|i| batch.briefs[i].is_none_or(|b| !b.deleted));
        Ok(())
    }
}
