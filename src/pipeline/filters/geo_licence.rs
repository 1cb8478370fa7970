//! Geo licensing: an item with regions is served only where they allow it — never to a blocked
//! region, and, when it has an allow-list, only to the regions on it (a request whose region is
//! unknown gets no allow-listed item). The region is the request's `context.geo`, else the
//! profile's. Page 2 and the final re-filter apply the same rule (`admits`).
use super::super::components::{Batch, ComponentError, Filter, FilterPhase, Keep, Query};
use crate::features::shard::ItemBrief;
use crate::ids::{key_of, Key};

pub struct GeoLicence;

/// The region key of a geo (None: unknown).
pub fn region(geo: &str) -> Option<Key> {
    (!geo.is_empty()).then(|| key_of(geo))
}

/// Whether item state `b` may be served to `region`.
pub fn admits(b: &ItemBrief, region: Option<Key>) -> bool {
    b.regions.as_ref().is_none_or(|r| r.admits(region))
}

impl Filter for GeoLicence {
    fn name(&self) -> &'static str {
        "geo_licence"
    }
    fn phase(&self) -> FilterPhase {
        FilterPhase::OnItemState
    }
    fn filter(&self, q: &Query, batch: &Batch, keep: &mut Keep) -> Result<(), ComponentError> {
        let here = region(q.geo);
        keep.retain(|i| batch.briefs[i].is_none_or(|b| admits(b, here)));
        Ok(())
    }
}
