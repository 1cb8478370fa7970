//! Reported / spam items: at least `filters.report_min_reports` reports and a report rate
//! (reports per impression, over the item's life) of at least `filters.report_rate_threshold`.
use super::super::components::{Batch, ComponentError, Filter, FilterPhase, Keep, Query};
use crate::features::shard::ItemBrief;

pub struct Reported;

/// Whether the item's reports mark it as spam under the thresholds.
pub fn is_reported(b: &ItemBrief, min_reports: u32, rate: f64) -> bool {
    // An item reported without impressions (reports from outside the feed) counts one.
    min_reports > 0 && b.reports >= min_reports && f64::from(b.reports) >= rate * f64::from(b.impressions.max(1))
}

impl Filter for Reported {
    fn name(&self) -> &'static str {
        "reported"
    }
    fn phase(&self) -> FilterPhase {
        FilterPhase::OnItemState
    }
    fn enable(&self, q: &Query) -> bool {
        q.cfg.filters.report_min_reports > 0
    }
    fn filter(&self, q: &Query, batch: &Batch, keep: &mut Keep) -> Result<(), ComponentError> {
        let f = &q.cfg.filters;
        keep.retain(|i| batch.briefs[i].is_none_or(|b| !is_reported(b, f.report_min_reports, f.report_rate_threshold)));
        Ok(())
    }
}
