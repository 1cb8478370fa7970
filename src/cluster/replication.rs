//! Keeping a partition's replicas identical without a leader.
//!
//! Decision: writes go from the coordinator to every live replica at once (no primary hop), and
//! partition state is made order-tolerant instead of sequenced: every op has an id (derived from
//! the event id for events, so retries are the same op), is logged at most once per partition,
//! upserts are last-writer-wins by (`at`, id), counters and indexes are sums over events. Replicas
//! then converge by set difference, the way Cassandra repairs and Dynamo-style stores do: each
//! partition keeps a digest of 64 buckets (count and xor of op ids, bucket by the id's top bits);
//! a node compares its digests with each peer's and pulls the ops of differing buckets that it
//! lacks. Why not a primary with sequence numbers (Elasticsearch, Kafka): a primary that dies
//! mid-write leaves replicas with different ops under the same sequence number, which needs
//! primary terms and rollback to repair, and a frozen-then-resumed primary keeps numbering from a
//! stale point; by set difference both sides of any gap simply learn what they lack, whichever
//! side missed the writes. The cost: replay order is (`at`, id) rather than arrival order, which
//! order-tolerant state makes equivalent.
//!
//! When: at start before serving, when a peer comes back, after this process was frozen (a gap
//! in its own clock ticks), and every `anti_entropy_interval_ms`.
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::domain::{LoggedOp, Part};
use crate::store::{Digest, Store, StoreError, BUCKETS};
use crate::transport::client::ask;
use crate::transport::{decode, encode, pb, Transport};

/// The buckets a node asks a peer for, with the ids it already has in each.
#[derive(Debug, Serialize, Deserialize)]
pub struct PullAsk {
    pub buckets: Vec<(u32, Vec<u64>)>,
    pub limit: u32,
}

/// Ops pulled per partition per round; a partition further behind takes more rounds.
const PULL_LIMIT: u32 = 50_000;

/// Serves a pull: the ops of the asked buckets whose ids the asker does not have.
pub fn missing_ops(store: &Store, part: Part, ask: &PullAsk) -> Result<Vec<LoggedOp>, StoreError> {
    let have: HashMap<usize, Vec<u64>> = ask
        .buckets
        .iter()
        .filter(|(b, _)| (*b as usize) < BUCKETS)
        .map(|(b, ids)| {
            let mut ids = ids.clone();
            ids.sort_unstable();
            (*b as usize, ids)
        })
        .collect();
    store.missing_ops(part, &have, ask.limit as usize)
}

/// Buckets where two digests differ.
pub fn differing(mine: &Digest, theirs: &Digest) -> Vec<usize> {
    (0..BUCKETS).filter(|b| mine.get(*b) != theirs.get(*b)).collect()
}

#[derive(Debug, Default, Clone, Copy)]
pub struct CatchUpStats {
    pub parts_checked: u32,
    pub parts_behind: u32,
    pub ops_pulled: u64,
    pub peers_failed: u32,
}

/// Which differing partitions a round pulls.
pub enum Mode<'a> {
    /// Every partition whose digest differs (at start, after a freeze, when a peer comes back).
    Full,
    /// Only divergence that stays put: a partition is pulled when its digests differ in two
    /// consecutive rounds with neither side having changed in between. Writes in flight make
    /// replicas differ for a moment all the time; pulling those would scan buckets under load for
    /// nothing. `seen` remembers the last round's digests per (peer, partition).
    Settled(&'a mut HashMap<(String, Part), (Digest, Digest)>),
}

/// Compares `parts` with every live peer that also owns them and pulls what this node lacks.
pub async fn catch_up(t: &Arc<Transport>, parts: &[Part], timeout: Duration) -> CatchUpStats {
    catch_up_mode(t, parts, timeout, Mode::Full).await
}

pub async fn catch_up_mode(t: &Arc<Transport>, parts: &[Part], timeout: Duration, mode: Mode<'_>) -> CatchUpStats {
    let ring = t.ring();
    let asks: Vec<(Part, Vec<String>)> =
        parts.iter().map(|p| (*p, ring.owners(p.role, p.partition).to_vec())).collect();
    catch_up_from(t, &asks, timeout, mode).await
}

/// Compares each partition with the given peers (those alive) and pulls what this node lacks:
/// also used against a partition's previous owners when a membership change commits.
pub async fn catch_up_from(
    t: &Arc<Transport>,
    parts: &[(Part, Vec<String>)],
    timeout: Duration,
    mut mode: Mode<'_>,
) -> CatchUpStats {
    let mut stats = CatchUpStats::default();
    let mut by_peer: BTreeMap<String, Vec<Part>> = BTreeMap::new();
    for (part, peers) in parts {
        for o in peers {
            if *o != t.node_id && t.membership.takes_writes(o) {
                by_peer.entry(o.clone()).or_default().push(*part);
            }
        }
    }
    for (peer, shared) in by_peer {
        match catch_up_with(t, &peer, &shared, timeout, &mut mode).await {
            Ok(s) => {
                stats.parts_checked += s.parts_checked;
                stats.parts_behind += s.parts_behind;
                stats.ops_pulled += s.ops_pulled;
            }
            Err(e) => {
                stats.peers_failed += 1;
                tracing::debug!(peer = %peer, error = %e, "anti-entropy with peer failed");
            }
        }
    }
    t.local.catch_up_rounds.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    metrics::counter!("recsys_catch_up_rounds_total").increment(1);
    if stats.ops_pulled > 0 {
        metrics::counter!("recsys_catch_up_ops_total").increment(stats.ops_pulled);
        tracing::info!(ops = stats.ops_pulled, partitions = stats.parts_behind, "caught up with replicas");
    }
    stats
}

async fn catch_up_with(
    t: &Arc<Transport>,
    peer: &str,
    parts: &[Part],
    timeout: Duration,
    mode: &mut Mode<'_>,
) -> Result<CatchUpStats, String> {
    let mut stats = CatchUpStats { parts_checked: parts.len() as u32, ..Default::default() };
    let client = t.peer(peer).ok_or_else(|| format!("no address for {peer}"))?;
    let end = Instant::now() + timeout;
    let mut todo: Vec<Part> = parts.to_vec();
    let mut behind = std::collections::BTreeSet::new();
    // Rounds: a partition far behind returns PULL_LIMIT ops per round.
    for _round in 0..64 {
        if todo.is_empty() {
            break;
        }
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("{peer}: catch-up ran out of time"));
        }
        let req = pb::DigestsRequest {
            envelope: Some(t.envelope(left)),
            asks: todo.iter().map(|p| ask(*p, vec![])).collect(),
        };
        let started = Instant::now();
        let reply = client.clone().digests(t.request(req, left)).await;
        t.observe(peer, "digests", started, reply.is_ok());
        let reply = reply.map_err(|s| format!("{peer}: {}", s.message()))?.into_inner();
        let mut theirs: HashMap<Part, Digest> = HashMap::new();
        for r in reply.results {
            if let (Some(part), true) = (crate::transport::client::result_part(&r), r.error.is_empty()) {
                if let Ok(d) = decode::<Digest>(&r.body) {
                    theirs.insert(part, d);
                }
            }
        }
        if let Mode::Settled(seen) = mode {
            theirs.retain(|part, d| {
                let key = (peer.to_string(), *part);
                let mine = t.local.store.digest(*part);
                if differing(&mine, d).is_empty() {
                    seen.remove(&key);
                    return false;
                }
                let settled = seen.get(&key).is_some_and(|(m, o)| *m == mine && o == d);
                seen.insert(key, (mine, d.clone()));
                settled
            });
        }
        // Differing buckets, with the ids this node has in each (a sled scan: blocking).
        let store = t.local.store.clone();
        let asks = tokio::task::spawn_blocking(move || {
            let mut asks = Vec::new();
            for (part, d) in theirs {
                let diff = differing(&store.digest(part), &d);
                if diff.is_empty() {
                    continue;
                }
                // A bucket the peer has nothing in cannot hold anything this node lacks.
                let wanted: Vec<usize> = diff.into_iter().filter(|b| d[*b].0 > 0).collect();
                let buckets: Vec<(u32, Vec<u64>)> =
                    store.bucket_ids_many(part, &wanted).into_iter().map(|(b, ids)| (b as u32, ids)).collect();
                if !buckets.is_empty() {
                    asks.push((part, PullAsk { buckets, limit: PULL_LIMIT }));
                }
            }
            asks
        })
        .await
        .map_err(|e| e.to_string())?;
        if asks.is_empty() {
            break;
        }
        // One pull per partition: a partition's id lists bound the request, not the whole node's.
        let mut apply = Vec::new();
        let mut again = Vec::new();
        for (part, pull) in asks {
            let left = end.saturating_duration_since(Instant::now());
            let req = pb::PullRequest { envelope: Some(t.envelope(left)), asks: vec![ask(part, encode(&pull))] };
            let started = Instant::now();
            let reply = client.clone().pull(t.request(req, left)).await;
            t.observe(peer, "pull", started, reply.is_ok());
            let reply = reply.map_err(|s| format!("{peer}: {}", s.message()))?.into_inner();
            for r in reply.results {
                if !r.error.is_empty() {
                    continue;
                }
                let Ok(mut ops) = decode::<Vec<LoggedOp>>(&r.body) else { continue };
                if ops.is_empty() {
                    continue;
                }
                if ops.len() >= PULL_LIMIT as usize {
                    again.push(part);
                }
                behind.insert(part);
                stats.ops_pulled += ops.len() as u64;
                ops.sort_by_key(|o| (o.at, o.id));
                apply.push((part, Arc::new(ops)));
            }
        }
        if !apply.is_empty() {
            let (results, _) = t.local.apply(apply, |_| true).await;
            for (part, r) in results {
                if let Err(e) = r {
                    tracing::warn!(part = %part, error = %e, "applying pulled ops failed");
                }
            }
        }
        metrics::gauge!("recsys_catch_up_partitions_behind").set(again.len() as f64);
        todo = again;
    }
    stats.parts_behind = behind.len() as u32;
    Ok(stats)
}

/// Makes sure every node in `owners` holds every op this node's copy of `part` holds: compares
/// digests, asks an owner (read-only) for its ids in the buckets that differ, pushes the ops it
/// lacks, and checks again. `Ok(pushed)` only once each owner has confirmed; any owner that
/// does not answer fails the hand-off (the copy must then stay).
pub async fn hand_off(t: &Arc<Transport>, part: Part, owners: &[String], timeout: Duration) -> Result<u64, String> {
    let end = Instant::now() + timeout;
    let mut pushed = 0u64;
    if owners.is_empty() {
        return Err(format!("{part} has no other owner to hand off to"));
    }
    for owner in owners {
        let client = t.peer(owner).ok_or_else(|| format!("no address for {owner}"))?;
        let mut confirmed = false;
        for _round in 0..16 {
            let left = end.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("{owner}: hand-off ran out of time"));
            }
            let req = pb::DigestsRequest { envelope: Some(t.envelope(left)), asks: vec![ask(part, vec![])] };
            let reply =
                client.clone().digests(t.request(req, left)).await.map_err(|s| format!("{owner}: {}", s.message()))?;
            let r = reply.into_inner().results.into_iter().next().ok_or_else(|| format!("{owner}: no digest"))?;
            if !r.error.is_empty() {
                return Err(format!("{owner}: {}", r.error));
            }
            let theirs: Digest = decode(&r.body)?;
            let mine = t.local.store.digest(part);
            // Buckets where this copy has ops and the owner's differ.
            let wanted: Vec<u32> =
                differing(&mine, &theirs).into_iter().filter(|b| mine[*b].0 > 0).map(|b| b as u32).collect();
            if wanted.is_empty() {
                confirmed = true;
                break;
            }
            let req = pb::DigestsRequest { envelope: Some(t.envelope(left)), asks: vec![ask(part, encode(&wanted))] };
            let reply =
                client.clone().holds(t.request(req, left)).await.map_err(|s| format!("{owner}: {}", s.message()))?;
            let r = reply.into_inner().results.into_iter().next().ok_or_else(|| format!("{owner}: no ids"))?;
            if !r.error.is_empty() {
                return Err(format!("{owner}: {}", r.error));
            }
            let held: Vec<(u32, Vec<u64>)> = decode(&r.body)?;
            let have: HashMap<usize, Vec<u64>> = held
                .into_iter()
                .map(|(b, mut ids)| {
                    ids.sort_unstable();
                    (b as usize, ids)
                })
                .collect();
            let store = t.local.store.clone();
            let lacking = tokio::task::spawn_blocking(move || store.missing_ops(part, &have, PULL_LIMIT as usize))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            if lacking.is_empty() {
                // Same ids in every bucket this copy uses (the owner has more elsewhere).
                confirmed = true;
                break;
            }
            let n = lacking.len() as u64;
            let node = t.client(owner).ok_or_else(|| format!("no address for {owner}"))?;
            let (results, _) = node.apply(vec![(part, Arc::new(lacking))], left).await.map_err(|e| e.to_string())?;
            for (_, r) in results {
                r.map_err(|e| format!("{owner}: pushing ops: {e}"))?;
            }
            pushed += n;
        }
        if !confirmed {
            return Err(format!("{owner}: still lacks ops after the hand-off rounds"));
        }
    }
    Ok(pushed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Op, Role};
    use crate::store::bucket_of;

    #[tokio::test]
    async fn set_difference_finds_exactly_the_missing_ops() {
        let dir = std::env::temp_dir().join(format!("recsys-ae-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let a = Store::open(&dir.join("a"), 8, 4).unwrap();
        let b = Store::open(&dir.join("b"), 8, 4).unwrap();
        let part = Part::new(Role::Generator, 1);
        let ops: Vec<LoggedOp> = (0..500u64)
            .map(|i| LoggedOp {
                id: i.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xabc,
                at: i as i64,
                op: Op::Pair { a: i, b: 1 },
            })
            .collect();
        a.append(part, &ops).unwrap();
        // b missed every seventh op and has one a lacks.
        let b_ops: Vec<LoggedOp> = ops.iter().enumerate().filter(|(i, _)| i % 7 != 0).map(|(_, o)| o.clone()).collect();
        b.append(part, &b_ops).unwrap();
        let extra = LoggedOp { id: 42, at: 0, op: Op::Pair { a: 9, b: 9 } };
        b.append(part, std::slice::from_ref(&extra)).unwrap();
        let diff = differing(&b.digest(part), &a.digest(part));
        assert!(!diff.is_empty());
        let ask = PullAsk {
            buckets: diff.iter().map(|x| (*x as u32, b.bucket_ids(part, *x).unwrap())).collect(),
            limit: PULL_LIMIT,
        };
        let got = missing_ops(&a, part, &ask).unwrap();
        assert_eq!(got.len(), ops.len().div_ceil(7));
        b.append(part, &got).unwrap();
        // b now has everything a has; a lacks only b's extra op.
        let diff = differing(&a.digest(part), &b.digest(part));
        assert_eq!(diff, vec![bucket_of(extra.id)]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
