//! Scorers (stage 4), in fallback order: the stage uses the first enabled scorer that succeeds.
//! One file here plus its line in `SCORERS`.
mod heuristic;
mod model;

use super::components::Scorer;

pub static SCORERS: &[&dyn Scorer] = &[&model::Models, &heuristic::Heuristic];
