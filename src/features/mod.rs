//! Feature declarations → an extraction plan. Item-side features are computed inside the feature
//! partition that owns the item (from its dense blocks); user features come from the user's
//! profile; cross features are computed at the coordinator. The row order is the config order;
//! each model picks its columns by name from its manifest.
pub mod shard;

use std::sync::Arc;

use crate::config::FeatureDecl;
use crate::counters::Window;

#[derive(Debug, thiserror::Error)]
pub enum FeatureError {
    #[error("feature `{name}`: unknown name for source `{source_name}`")]
    UnknownName { name: String, source_name: String },
    #[error("feature `{name}`: unknown source `{source_name}` (expected item, item_counter, user or cross)")]
    UnknownSource { name: String, source_name: String },
    #[error("model input `{0}` is not a declared feature")]
    UndeclaredInput(String),
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum ItemFeat {
    AgeHours,
    Price,
    Quality,
    DurationSecs,
    IsVideo,
    Topic,
    Emb(usize),
    Count { counter: usize, window: Window },
    Rate { num: usize, den: usize, window: Window },
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UserFeat {
    AgeDays,
    NumFollows,
    RecentLikes,
    Count { counter: usize, window: Window },
    Ctr7d,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CrossFeat {
    FollowsAuthor,
    TopicAffinity,
    AuthorAffinity,
    GeoMatch,
    EmbCosine,
    SrcTrending,
    SrcFollows,
    SrcCoengaged,
    NumSources,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FeatureKind {
    Item(ItemFeat),
    User(UserFeat),
    Cross(CrossFeat),
}

fn counter_index(word: &str) -> Option<usize> {
    Some(match word {
        "impressions" => 0,
        "clicks" => 1,
        "likes" => 2,
        "shares" => 3,
        "hides" => 4,
        _ => return None,
    })
}

fn parse_kind(name: &str, source: &str, emb_dim: usize) -> Result<FeatureKind, FeatureError> {
    let unknown = || FeatureError::UnknownName { name: name.to_string(), source_name: source.to_string() };
    match source {
        "item" => {
            let f = match name {
                "item_age_hours" => ItemFeat::AgeHours,
                "item_price" => ItemFeat::Price,
                "item_quality" => ItemFeat::Quality,
                "item_duration_secs" => ItemFeat::DurationSecs,
                "item_is_video" => ItemFeat::IsVideo,
                "item_topic" => ItemFeat::Topic,
                _ => {
                    let i: usize = name.strip_prefix("item_emb_").and_then(|s| s.parse().ok()).ok_or_else(unknown)?;
                    if i >= emb_dim {
                        return Err(unknown());
                    }
                    ItemFeat::Emb(i)
                }
            };
            Ok(FeatureKind::Item(f))
        }
        "item_counter" => {
            let rest = name.strip_prefix("item_").ok_or_else(unknown)?;
            let (head, win) = rest.rsplit_once('_').ok_or_else(unknown)?;
            let window = Window::parse(win).ok_or_else(unknown)?;
            let f = match head {
                "ctr" => ItemFeat::Rate { num: 1, den: 0, window },
                "like_rate" => ItemFeat::Rate { num: 2, den: 0, window },
                "hide_rate" => ItemFeat::Rate { num: 4, den: 0, window },
                "share_rate" => ItemFeat::Rate { num: 3, den: 0, window },
                other => ItemFeat::Count { counter: counter_index(other).ok_or_else(unknown)?, window },
            };
            Ok(FeatureKind::Item(f))
        }
        "user" => {
            let f = match name {
                "user_age_days" => UserFeat::AgeDays,
                "user_num_follows" => UserFeat::NumFollows,
                "user_recent_likes" => UserFeat::RecentLikes,
                "user_ctr_7d" => UserFeat::Ctr7d,
                _ => {
                    let rest = name.strip_prefix("user_").ok_or_else(unknown)?;
                    let (head, win) = rest.rsplit_once('_').ok_or_else(unknown)?;
                    let window = Window::parse(win).ok_or_else(unknown)?;
                    let counter = counter_index(head).ok_or_else(unknown)?;
                    UserFeat::Count { counter, window }
                }
            };
            Ok(FeatureKind::User(f))
        }
        "cross" => {
            let f = match name {
                "cross_follows_author" => CrossFeat::FollowsAuthor,
                "cross_topic_affinity" => CrossFeat::TopicAffinity,
                "cross_author_affinity" => CrossFeat::AuthorAffinity,
                "cross_geo_match" => CrossFeat::GeoMatch,
                "cross_emb_cosine" => CrossFeat::EmbCosine,
                "cross_src_trending" => CrossFeat::SrcTrending,
                "cross_src_follows" => CrossFeat::SrcFollows,
                "cross_src_coengaged" => CrossFeat::SrcCoengaged,
                "cross_num_sources" => CrossFeat::NumSources,
                _ => return Err(unknown()),
            };
            Ok(FeatureKind::Cross(f))
        }
        _ => Err(FeatureError::UnknownSource { name: name.to_string(), source_name: source.to_string() }),
    }
}

/// The validated feature declarations, shared by every request.
#[derive(Debug)]
pub struct FeaturePlan {
    pub names: Vec<String>,
    pub kinds: Vec<FeatureKind>,
    pub defaults: Vec<f32>,
    /// Item-side features the partitions compute, in this order.
    pub item_feats: Arc<Vec<ItemFeat>>,
    /// For each declared feature that is item-side, its column in the partition's reply.
    pub item_col: Vec<Option<usize>>,
}

impl FeaturePlan {
    pub fn new(decls: &[FeatureDecl], emb_dim: usize) -> Result<Self, FeatureError> {
        let mut kinds = Vec::with_capacity(decls.len());
        let mut item_feats = Vec::new();
        let mut item_col = Vec::new();
        for d in decls {
            let k = parse_kind(&d.name, &d.source, emb_dim)?;
            if let FeatureKind::Item(f) = k {
                item_col.push(Some(item_feats.len()));
                item_feats.push(f);
            } else {
                item_col.push(None);
            }
            kinds.push(k);
        }
        Ok(Self {
            names: decls.iter().map(|d| d.name.clone()).collect(),
            defaults: decls.iter().map(|d| d.default).collect(),
            kinds,
            item_feats: Arc::new(item_feats),
            item_col,
        })
    }

    pub fn len(&self) -> usize {
        self.names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.names.is_empty()
    }

    /// Columns of the declared row that a model reads, in the model's input order.
    pub fn columns_for(&self, inputs: &[String]) -> Result<Vec<usize>, FeatureError> {
        inputs
            .iter()
            .map(|n| self.names.iter().position(|m| m == n).ok_or_else(|| FeatureError::UndeclaredInput(n.clone())))
            .collect()
    }
}

pub const SRC_TRENDING: u8 = 1;
pub const SRC_FOLLOWS: u8 = 2;
pub const SRC_COENGAGED: u8 = 4;
pub const SRC_TOPIC_FRESH: u8 = 8;

#[cfg(test)]
mod tests {
    use super::*;

    fn decl(name: &str, source: &str) -> FeatureDecl {
        FeatureDecl { name: name.into(), source: source.into(), default: 0.0 }
    }

    #[test]
    fn parses_families_and_rejects_unknown() {
        let plan = FeaturePlan::new(
            &[decl("item_clicks_1h", "item_counter"), decl("user_ctr_7d", "user"), decl("item_emb_3", "item")],
            8,
        )
        .unwrap();
        assert_eq!(plan.item_feats.len(), 2);
        assert_eq!(plan.item_col, vec![Some(0), None, Some(1)]);
        let err = FeaturePlan::new(&[decl("item_clicks_2h", "item_counter")], 8).unwrap_err();
        assert!(err.to_string().contains("item_clicks_2h"));
        assert!(FeaturePlan::new(&[decl("item_emb_9", "item")], 8).is_err());
        assert!(plan.columns_for(&["nope".to_string()]).is_err());
    }
}
