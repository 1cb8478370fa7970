//! A deterministic synthetic world: items by Zipf-popular authors, users with hidden
//! preferences, and an engagement history with realistic skew. The same hidden preferences drive
//! the user simulator, so serve → log → label → train → deploy can run on one machine.
use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal, Zipf};

use crate::domain::{Action, EventRecord, ItemRecord, UserRecord};

pub const GEOS: [&str; 8] = ["us", "de", "in", "br", "jp", "fr", "uk", "mx"];

#[derive(Debug, Clone)]
pub struct WorldSpec {
    pub seed: u64,
    pub items: usize,
    pub users: usize,
    pub events: usize,
    pub topics: u32,
    pub emb_dim: usize,
    /// "now" of the world in unix seconds; events fall in the 7 days before it.
    pub now: i64,
}

pub struct World {
    pub spec: WorldSpec,
    pub items: Vec<ItemRecord>,
    pub users: Vec<UserRecord>,
    /// Hidden per-user taste (unit vector in embedding space); serving never sees it.
    pub prefs: Vec<Vec<f32>>,
    /// Ordered: events pick from it by position, and a `HashMap`'s order differs per process,
    /// which made the same seed give another event stream in every run.
    author_topics: std::collections::BTreeMap<String, u32>,
}

fn unit(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-6);
    v.iter_mut().for_each(|x| *x /= n);
}

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl World {
    pub fn generate(spec: WorldSpec) -> World {
        let mut rng = StdRng::seed_from_u64(spec.seed);
        let normal = Normal::new(0.0f32, 1.0).expect("normal");
        let d = spec.emb_dim;
        let centroids: Vec<Vec<f32>> = (0..spec.topics)
            .map(|_| {
                let mut v: Vec<f32> = (0..d).map(|_| normal.sample(&mut rng)).collect();
                unit(&mut v);
                v
            })
            .collect();
        let n_authors = (spec.items / 20).max(10);
        let author_zipf = Zipf::new(n_authors as f64, 1.1).expect("zipf");
        let geo_zipf = Zipf::new(GEOS.len() as f64, 0.8).expect("zipf");
        let authors: Vec<(u32, &str)> = (0..n_authors)
            .map(|_| (rng.random_range(0..spec.topics), GEOS[geo_zipf.sample(&mut rng) as usize - 1]))
            .collect();
        let mut author_topics = std::collections::BTreeMap::new();
        let mut items = Vec::with_capacity(spec.items);
        for i in 0..spec.items {
            let a = author_zipf.sample(&mut rng) as usize - 1;
            let (atopic, geo) = authors[a];
            let topic = if rng.random::<f32>() < 0.7 { atopic } else { rng.random_range(0..spec.topics) };
            let mut emb: Vec<f32> =
                centroids[topic as usize].iter().map(|c| c + 0.45 * normal.sample(&mut rng)).collect();
            unit(&mut emb);
            // Newer items are more common: age skewed toward the present, up to 30 days.
            let age = (rng.random::<f64>().powi(2) * 30.0 * 86_400.0) as i64;
            author_topics.insert(format!("a{a}"), atopic);
            items.push(ItemRecord {
                id: format!("i{i}"),
                author: format!("a{a}"),
                topic,
                geo: geo.to_string(),
                price: (rng.random::<f32>() * 4.0).exp(),
                quality: (rng.random::<f32>() + rng.random::<f32>()) / 2.0,
                duration_secs: 10.0 + rng.random::<f32>() * 600.0,
                is_video: rng.random::<f32>() < 0.4,
                in_stock: rng.random::<f32>() < 0.95,
                created_at: spec.now - age,
                embedding: emb,
                deleted: false,
                allowed_regions: vec![],
                blocked_regions: vec![],
            });
        }
        let mut users = Vec::with_capacity(spec.users);
        let mut prefs = Vec::with_capacity(spec.users);
        for u in 0..spec.users {
            let t1 = rng.random_range(0..spec.topics) as usize;
            let t2 = rng.random_range(0..spec.topics) as usize;
            let mut p: Vec<f32> = (0..d)
                .map(|k| 0.7 * centroids[t1][k] + 0.3 * centroids[t2][k] + 0.2 * normal.sample(&mut rng))
                .collect();
            unit(&mut p);
            let n_follows = rng.random_range(3..30);
            let mut follows: Vec<String> = (0..n_follows)
                .map(|_| {
                    // Half the follows are popular authors, half match the user's taste.
                    if rng.random::<bool>() {
                        format!("a{}", author_zipf.sample(&mut rng) as usize - 1)
                    } else {
                        let mut a = rng.random_range(0..n_authors);
                        for _ in 0..20 {
                            if authors[a].0 as usize == t1 {
                                break;
                            }
                            a = rng.random_range(0..n_authors);
                        }
                        format!("a{a}")
                    }
                })
                .collect();
            follows.sort();
            follows.dedup();
            let blocked = (0..rng.random_range(0..3)).map(|_| format!("a{}", rng.random_range(0..n_authors))).collect();
            users.push(UserRecord {
                id: format!("u{u}"),
                geo: GEOS[geo_zipf.sample(&mut rng) as usize - 1].to_string(),
                signup_at: spec.now - rng.random_range(86_400..400 * 86_400),
                follows,
                blocked_authors: blocked,
                hidden_topics: vec![],
            });
            prefs.push(p);
        }
        World { spec, items, users, prefs, author_topics }
    }

    pub fn item_index(id: &str) -> Option<usize> {
        id.strip_prefix('i')?.parse().ok()
    }
    pub fn user_index(id: &str) -> Option<usize> {
        id.strip_prefix('u')?.parse().ok()
    }

    /// The hidden engagement model: probabilities of click, like|click, share|click, hide.
    pub fn engagement(&self, user: usize, item: &ItemRecord) -> [f32; 4] {
        let p = &self.prefs[user];
        let cos: f32 = p.iter().zip(&item.embedding).map(|(a, b)| a * b).sum();
        let follows = self.users[user].follows.binary_search(&item.author).is_ok();
        let x = 4.0 * cos + 1.5 * (item.quality - 0.5) + if follows { 0.8 } else { 0.0 } - 2.5;
        let click = sigmoid(x);
        let like = sigmoid(3.0 * cos + 2.0 * (item.quality - 0.5) - 1.0);
        let share = sigmoid(2.0 * cos + 3.0 * (item.quality - 0.7) - 2.5);
        let hide = sigmoid(-4.0 * cos - 3.0);
        [click, like, share, hide]
    }

    /// Rolls one impression: the events that follow it (always an impression first).
    pub fn react(&self, rng: &mut StdRng, user: usize, item: &ItemRecord) -> Vec<Action> {
        let [click, like, share, hide] = self.engagement(user, item);
        let mut out = vec![Action::Impression];
        if rng.random::<f32>() < click {
            out.push(Action::Click);
            if rng.random::<f32>() < like {
                out.push(Action::Like);
            }
            if rng.random::<f32>() < share {
                out.push(Action::Share);
            }
        } else if rng.random::<f32>() < hide {
            out.push(Action::Hide);
        }
        out
    }

    /// The engagement history: `spec.events` events from impressions of skewed (user, item) pairs.
    pub fn events(&self, mut emit: impl FnMut(EventRecord)) {
        let spec = &self.spec;
        let mut rng = StdRng::seed_from_u64(spec.seed ^ 0xe7e7);
        let user_zipf = Zipf::new(spec.users as f64, 0.9).expect("zipf");
        let item_zipf = Zipf::new(spec.items as f64, 1.0).expect("zipf");
        let mut by_topic: HashMap<u32, Vec<usize>> = HashMap::new();
        for (i, it) in self.items.iter().enumerate() {
            by_topic.entry(it.topic).or_default().push(i);
        }
        let mut by_author: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, it) in self.items.iter().enumerate() {
            by_author.entry(it.author.as_str()).or_default().push(i);
        }
        let mut n = 0usize;
        while n < spec.events {
            let u = user_zipf.sample(&mut rng) as usize - 1;
            let roll = rng.random::<f32>();
            let item = if roll < 0.5 {
                item_zipf.sample(&mut rng) as usize - 1
            } else if roll < 0.75 && !self.users[u].follows.is_empty() {
                let f = &self.users[u].follows;
                let a = &f[rng.random_range(0..f.len())];
                match by_author.get(a.as_str()) {
                    Some(list) => list[rng.random_range(0..list.len())],
                    None => continue,
                }
            } else {
                // Taste-driven discovery: an item of a topic the user likes.
                let p = &self.prefs[u];
                let topic = *self
                    .author_topics
                    .values()
                    .nth(rng.random_range(0..self.author_topics.len().min(64)))
                    .unwrap_or(&0);
                let t = if rng.random::<f32>() < 0.6 { best_topic(self, p).unwrap_or(topic) } else { topic };
                match by_topic.get(&t) {
                    Some(list) => list[rng.random_range(0..list.len())],
                    None => continue,
                }
            };
            let it = &self.items[item];
            // Event time: recent-biased within the last 7 days.
            let ago_ms = (rng.random::<f64>().powi(2) * 7.0 * 86_400_000.0) as i64;
            let ts = spec.now * 1000 - ago_ms;
            let geo = self.users[u].geo.clone();
            for (j, a) in self.react(&mut rng, u, it).into_iter().enumerate() {
                emit(EventRecord {
                    event_id: format!("s{}-{n}", spec.seed),
                    user: self.users[u].id.clone(),
                    item: it.id.clone(),
                    action: a,
                    ts_ms: ts + j as i64 * 5_000,
                    geo: geo.clone(),
                    request_id: String::new(),
                    pairs: vec![],
                });
                n += 1;
                if n >= spec.events {
                    break;
                }
            }
        }
    }
}

fn best_topic(w: &World, pref: &[f32]) -> Option<u32> {
    // The topic whose items' mean embedding best matches the taste, estimated from a sample.
    let mut best = None;
    let mut best_s = f32::MIN;
    for it in w.items.iter().step_by((w.items.len() / 200).max(1)) {
        let s: f32 = pref.iter().zip(&it.embedding).map(|(a, b)| a * b).sum();
        if s > best_s {
            best_s = s;
            best = Some(it.topic);
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> WorldSpec {
        WorldSpec { seed: 7, items: 2000, users: 200, events: 5000, topics: 20, emb_dim: 8, now: 1_700_000_000 }
    }

    #[test]
    fn deterministic_and_skewed() {
        let a = World::generate(spec());
        let b = World::generate(spec());
        assert_eq!(a.items[123], b.items[123]);
        assert_eq!(a.users[17], b.users[17]);
        let mut ev = Vec::new();
        a.events(|e| ev.push(e));
        assert_eq!(ev.len(), 5000);
        let mut per_item: HashMap<String, usize> = HashMap::new();
        for e in &ev {
            *per_item.entry(e.item.clone()).or_default() += 1;
        }
        let mut counts: Vec<usize> = per_item.into_values().collect();
        counts.sort_unstable_by(|x, y| y.cmp(x));
        // The top 1% of items carry far more than 1% of the events.
        let top: usize = counts.iter().take(20).sum();
        assert!(top * 10 > ev.len(), "top-20 items have {top} of {} events", ev.len());
        assert!(ev.iter().any(|e| e.action == Action::Like));
    }
}
