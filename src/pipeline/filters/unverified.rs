//! Candidates whose item state was not found (an unknown item, or its partition missing on every
//! replica): what cannot be checked is never shown.
use super::super::components::{Batch, ComponentError, Filter, FilterPhase, Keep, Query};

pub struct Unverified;

impl Filter for Unverified {
    fn name(&self) -> &'static str {
        "unverified"
    }
    fn phase(&self) -> FilterPhase {
        FilterPhase::OnItemState
    }
    fn filter(&self, _q: &Query, batch: &Batch, keep: &mut Keep) -> Result<(), ComponentError> {
        keep.retain(|i| batch.briefs[i].is_some());
        Ok(())
    }
}
