//! Topics the user hid: named in `User.hidden_topics`, or hidden by `filters.hide_topic_after`
//! hide events on the topic's items.
use super::super::components::{Batch, ComponentError, Filter, FilterPhase, Keep, Query};

pub struct HiddenTopic;

impl Filter for HiddenTopic {
    fn name(&self) -> &'static str {
        "hidden_topic"
    }
    fn phase(&self) -> FilterPhase {
        FilterPhase::OnItemState
    }
    fn enable(&self, q: &Query) -> bool {
        !q.profile.hidden_topics.is_empty() || (q.cfg.filters.hide_topic_after > 0 && !q.profile.topic_hides.is_empty())
    }
    fn filter(&self, q: &Query, batch: &Batch, keep: &mut Keep) -> Result<(), ComponentError> {
        let p = q.profile;
        let after = q.cfg.filters.hide_topic_after;
        let hidden = |t: u32| {
            p.hidden_topics.binary_search(&t).is_ok()
                || (after > 0 && p.topic_hides.get(t as usize).is_some_and(|n| *n >= after))
        };
        keep.retain(|i| batch.briefs[i].is_none_or(|b| !hidden(b.topic)));
        Ok(())
    }
}
