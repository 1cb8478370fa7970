//! Items the user has seen (impressions), by the profile's rotating bloom filter. Runs before
//! hydration, so what it removes is never fetched.
use super::super::components::{Batch, ComponentError, Filter, FilterPhase, Keep, Query};

pub struct Seen;

impl Filter for Seen {
    fn name(&self) -> &'static str {
        "seen"
    }
    fn phase(&self) -> FilterPhase {
        FilterPhase::BeforeHydration
    }
    fn enable(&self, q: &Query) -> bool {
        q.profile.seen.is_some()
    }
    fn filter(&self, q: &Query, batch: &Batch, keep: &mut Keep) -> Result<(), ComponentError> {
        let Some(seen) = &q.profile.seen else { return Ok(()) };
        keep.retain(|i| !seen.contains(batch.cands[i].item));
        Ok(())
    }
}
