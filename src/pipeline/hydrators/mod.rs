//! Hydrators (the fetch inside stage 2): what is known about each candidate, from the partitions
//! holding it. One file here plus its line in `HYDRATORS`.
mod item_state;

use super::components::Hydrator;

pub static HYDRATORS: &[&dyn Hydrator] = &[&item_state::ItemState];
