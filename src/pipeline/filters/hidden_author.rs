//! Authors the user hid: `filters.hide_author_after` hide events on the author's items (authors
//! the user blocked outright are `blocked_author`).
use super::super::components::{Batch, ComponentError, Filter, FilterPhase, Keep, Query};

pub struct HiddenAuthor;

impl Filter for HiddenAuthor {
    fn name(&self) -> &'static str {
        "hidden_author"
    }
    fn phase(&self) -> FilterPhase {
        FilterPhase::OnItemState
    }
    fn enable(&self, q: &Query) -> bool {
        q.cfg.filters.hide_author_after > 0 && !q.profile.author_hides.is_empty()
    }
    fn filter(&self, q: &Query, batch: &Batch, keep: &mut Keep) -> Result<(), ComponentError> {
        let hides = &q.profile.author_hides;
        let after = q.cfg.filters.hide_author_after;
        keep.retain(|i| batch.briefs[i].is_none_or(|b| hides.get(&b.author_key).is_none_or(|n| *n < after)));
        Ok(())
    }
}
