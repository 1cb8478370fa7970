//! Items out of stock.
use super::super::components::{Batch, ComponentError, Filter, FilterPhase, Keep, Query};

pub struct OutOfStock;

impl Filter for OutOfStock {
    fn name(&self) -> &'static str {
        "out_of_stock"
    }
    fn phase(&self) -> FilterPhase {
        FilterPhase::OnItemState
    }
    fn filter(&self, _q: &Query, batch: &Batch, keep: &mut Keep) -> Result<(), ComponentError> {
        keep.retain(|i| batch.briefs[i].is_none_or(|b| b.in_stock));
        Ok(())
    }
}
