//! Filters (stage 2), in the order they are applied and counted. A filter is one file here plus
//! its line in `FILTERS`. Filters on item state skip candidates with no state found (the last
//! one, `unverified`, removes those), so each removal is counted by one filter.
mod blocked_author;
mod deleted;
pub mod geo_licence;
mod hidden_author;
mod hidden_topic;
mod out_of_stock;
pub mod reported;
mod seen;
mod unverified;

use super::components::Filter;

pub static FILTERS: &[&dyn Filter] = &[
    &seen::Seen,
    &deleted::Deleted,
    &out_of_stock::OutOfStock,
    &geo_licence::GeoLicence,
    &blocked_author::BlockedAuthor,
    &hidden_topic::HiddenTopic,
    &hidden_author::HiddenAuthor,
    &reported::Reported,
    &unverified::Unverified,
];
