//! Filters (stage 2), in the order they are applied and counted. A filter is one file here plus
//! its line in `FILTERS`. Filters on item state skip candidates with no state found (the last
//! one, `unverified`, removes those), so each removal is counted by one filter.
mod blocked_author;
mod deleted;
mod out_of_stock;
mod seen;
mod unverified;

use super::components::Filter;

pub static FILTERS: &[&dyn Filter] = &[
    &seen::Seen,
    &deleted::Deleted,
    &out_of_stock::OutOfStock,
    &blocked_author::BlockedAuthor,
    &unverified::Unverified,
];
