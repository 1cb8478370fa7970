//! Checks that must not change what they check (the chaos runner's and the tests' "nothing
//! lost"): each copy of a partition is asked, read-only (`Internal.Holds`), which op ids it holds.
//! Nothing is written or re-sent, so a check can fail: a repair (anti-entropy, a re-sent ledger)
//! would make the copies agree and hide a loss. Op ids are content-addressed by the write path,
//! so two copies holding the same ids hold the same ops; copies holding the same ops are then
//! compared by a hash of their whole state (`Internal.StateHashes`).
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use crate::domain::{Part, Role};
use crate::ids::{key_of, partition_of, ITEM};
use crate::transport::pb;

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("{node}: {message}")]
    Node { node: String, message: String },
}

type Client = pb::internal_client::InternalClient<crate::auth::Signed<tonic::transport::Channel>>;

/// An internal-API client for `node`, signed with the secret when there is one ("verify" calls).
async fn internal_client(node: &str, addr: &str, secret: Option<&str>) -> Result<Client, String> {
    // https with this process's TLS when it has one (`--tls-ca`, transport/tls.rs).
    let ch = crate::transport::tls::endpoint(addr)?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await
        .map_err(|e| e.to_string())?;
    let auth = crate::auth::InternalAuth::new(secret.map(crate::auth::ClusterKey::new), "verify").to(node);
    Ok(pb::internal_client::InternalClient::new(auth.sign(ch)).max_decoding_message_size(512 * 1024 * 1024))
}

/// The op an acknowledged event logs in its item's feature partition (on every owner once
/// acked); None for an event whose action is not one ingest accepts (it was never acked).
pub fn event_item_op(e: &crate::api::pb::Event, partitions: u32) -> Option<(Part, u64)> {
    let part = Part::new(Role::Feature, partition_of(ITEM, key_of(&e.item_id), partitions));
    let action = crate::ingest::validate::action(0, e.action).ok()?;
    Some((part, crate::ingest::ops::item_event_op_id(&e.event_id, &e.item_id, action, e.event_time_ms)))
}

/// The copies of `parts` that each node holds, with every op id in each (all buckets). A node
/// without a copy of a partition answers "not open" for it and is left out.
pub async fn copies(
    nodes: &[(String, String)],
    parts: &[Part],
    secret: Option<&str>,
) -> Result<BTreeMap<Part, Vec<(String, BTreeSet<u64>)>>, VerifyError> {
    let mut out: BTreeMap<Part, Vec<(String, BTreeSet<u64>)>> = BTreeMap::new();
    let buckets: Vec<u32> = (0..crate::store::BUCKETS as u32).collect();
    for (node, addr) in nodes {
        let err = |m: String| VerifyError::Node { node: node.clone(), message: m };
        let mut c = internal_client(node, addr, secret).await.map_err(err)?;
        let asks = parts
            .iter()
            .map(|p| pb::PartitionAsk {
                role: p.role as u32,
                partition: p.partition,
                body: crate::transport::encode(&buckets),
            })
            .collect();
        let env = pb::Envelope { from_node: "verify".into(), epoch: 0, digest: String::new(), deadline_ms: 20_000 };
        let mut r = tonic::Request::new(pb::DigestsRequest { envelope: Some(env), asks });
        r.set_timeout(Duration::from_secs(20));
        let reply = c.holds(r).await.map_err(|s| err(format!("Holds: {:?}: {}", s.code(), s.message())))?;
        for res in reply.into_inner().results {
            if !res.error.is_empty() {
                continue;
            }
            let Some(role) = Role::from_u32(res.role) else { continue };
            let ids: Vec<(u32, Vec<u64>)> = crate::transport::decode(&res.body).map_err(err)?;
            let set = ids.into_iter().flat_map(|(_, v)| v).collect();
            out.entry(Part::new(role, res.partition)).or_default().push((node.clone(), set));
        }
    }
    Ok(out)
}

/// A hash of the whole state of each copy of `parts` each node holds (`Internal.StateHashes`,
/// read-only). A node without a copy answers "not open" and is left out.
pub async fn state_hashes(
    nodes: &[(String, String)],
    parts: &[Part],
    secret: Option<&str>,
) -> Result<BTreeMap<Part, Vec<(String, [u8; 32])>>, VerifyError> {
    let mut out: BTreeMap<Part, Vec<(String, [u8; 32])>> = BTreeMap::new();
    for (node, addr) in nodes {
        let err = |m: String| VerifyError::Node { node: node.clone(), message: m };
        let mut c = internal_client(node, addr, secret).await.map_err(err)?;
        let asks = parts
            .iter()
            .map(|p| pb::PartitionAsk { role: p.role as u32, partition: p.partition, body: vec![] })
            .collect();
        let env = pb::Envelope { from_node: "verify".into(), epoch: 0, digest: String::new(), deadline_ms: 20_000 };
        let mut r = tonic::Request::new(pb::DigestsRequest { envelope: Some(env), asks });
        r.set_timeout(Duration::from_secs(20));
        let reply =
            c.state_hashes(r).await.map_err(|s| err(format!("StateHashes: {:?}: {}", s.code(), s.message())))?;
        for res in reply.into_inner().results {
            let Some(role) = Role::from_u32(res.role) else { continue };
            let Ok(hash) = <[u8; 32]>::try_from(res.body.as_slice()) else { continue };
            if res.error.is_empty() {
                out.entry(Part::new(role, res.partition)).or_default().push((node.clone(), hash));
            }
        }
    }
    Ok(out)
}

/// Partitions whose copies hash differently (each with its copies' short hashes), from
/// [`state_hashes`]: copies holding one op set must not.
pub fn differing_states(hashes: &BTreeMap<Part, Vec<(String, [u8; 32])>>) -> Vec<String> {
    hashes
        .iter()
        .filter(|(_, copies)| copies.windows(2).any(|w| w[0].1 != w[1].1))
        .map(|(part, copies)| {
            let each: Vec<String> = copies
                .iter()
                .map(|(n, h)| format!("{n}={}", h[..4].iter().map(|b| format!("{b:02x}")).collect::<String>()))
                .collect();
            format!("{part}: {}", each.join(" "))
        })
        .collect()
}

/// A read-only ledger check's result.
#[derive(Debug, Default)]
pub struct LedgerCheck {
    pub acked: usize,
    /// Acknowledged events not on every one of `replication` copies.
    pub missing: usize,
    pub problems: Vec<String>,
}

/// Checks a ledger of acknowledged events: each event's op must be on exactly `replication`
/// copies among `nodes`. Nothing is written.
pub async fn ledger<'a>(
    nodes: &[(String, String)],
    events: impl IntoIterator<Item = &'a crate::api::pb::Event>,
    partitions: u32,
    replication: usize,
    secret: Option<&str>,
) -> Result<LedgerCheck, VerifyError> {
    let mut want: BTreeMap<Part, BTreeSet<u64>> = BTreeMap::new();
    for e in events {
        if let Some((part, id)) = event_item_op(e, partitions) {
            want.entry(part).or_default().insert(id);
        }
    }
    let parts: Vec<Part> = want.keys().copied().collect();
    let held = copies(nodes, &parts, secret).await?;
    let mut out = LedgerCheck { acked: want.values().map(BTreeSet::len).sum(), ..Default::default() };
    for (part, ops) in &want {
        let on = held.get(part).map(Vec::as_slice).unwrap_or_default();
        if on.len() != replication {
            let names: Vec<&str> = on.iter().map(|(n, _)| n.as_str()).collect();
            out.problems.push(format!("{part}: held on {names:?}, not on {replication} nodes"));
        }
        let mut short = 0;
        for id in ops {
            let copies = on.iter().filter(|(_, ids)| ids.contains(id)).count();
            if copies < replication {
                short += 1;
            }
        }
        for (node, ids) in on {
            let missing = ops.iter().filter(|id| !ids.contains(id)).count();
            if missing > 0 {
                out.problems.push(format!("{part} on {node}: {missing} of {} acknowledged events missing", ops.len()));
            }
        }
        out.missing += short;
    }
    Ok(out)
}

/// Partitions whose copies hold different op sets (compared whole, read-only), then, of those
/// whose op sets agree, the ones whose copies' full states hash differently (one op set must
/// give one state, whatever the order it arrived in). Empty: converged.
pub async fn divergent(
    nodes: &[(String, String)],
    partitions: u32,
    secret: Option<&str>,
) -> Result<Vec<String>, VerifyError> {
    let parts: Vec<Part> = Role::ALL.iter().flat_map(|r| (0..partitions).map(move |p| Part::new(*r, p))).collect();
    let held = copies(nodes, &parts, secret).await?;
    let mut out = Vec::new();
    let mut same_ops = Vec::new();
    for (part, copies) in held {
        let Some((first, ids)) = copies.first() else { continue };
        let before = out.len();
        for (node, other) in &copies[1..] {
            if other != ids {
                let (a, b) = (ids.difference(other).count(), other.difference(ids).count());
                out.push(format!("{part}: {first} has {a} ops {node} lacks, {node} has {b} {first} lacks"));
            }
        }
        if out.len() == before && copies.len() > 1 {
            same_ops.push((part, copies.len()));
        }
    }
    if !same_ops.is_empty() {
        let parts: Vec<Part> = same_ops.iter().map(|(p, _)| *p).collect();
        let hashes = state_hashes(nodes, &parts, secret).await?;
        // A copy that holds the ops but gave no hash (a pending rebuild, a timeout) is not
        // converged: leaving it out would compare fewer copies than exist.
        for (part, n) in &same_ops {
            let got = hashes.get(part).map_or(0, Vec::len);
            if got < *n {
                out.push(format!("{part}: {got} of its {n} copies answered a state hash"));
            }
        }
        out.extend(differing_states(&hashes).into_iter().map(|d| format!("same ops, different state: {d}")));
    }
    Ok(out)
}

/// What the nodes' metadata logs say.
#[derive(Debug, Default)]
pub struct MetadataCheck {
    /// Entries in the longest log.
    pub entries: usize,
    /// Ring epochs decided in it.
    pub epochs: usize,
    /// Two logs that disagree on an entry, or a ring epoch decided twice or out of order.
    pub problems: Vec<String>,
}

/// Reads every node's metadata log (`Internal.Meta`, read-only) and checks that they are one
/// history (each log a prefix of the longest) in which every ring epoch was decided once.
pub async fn metadata(nodes: &[(String, String)], secret: Option<&str>) -> Result<MetadataCheck, VerifyError> {
    use crate::cluster::metalog::{Decided, Entry, MetaMsg, MetaReply};
    let mut logs: Vec<(String, Vec<Decided>)> = Vec::new();
    for (node, addr) in nodes {
        let err = |m: String| VerifyError::Node { node: node.clone(), message: m };
        let mut c = internal_client(node, addr, secret).await.map_err(err)?;
        let body = serde_json::to_vec(&MetaMsg::Read { after: 0 }).map_err(|e| err(e.to_string()))?;
        let mut r = tonic::Request::new(pb::MetaRequest { from_node: "verify".into(), body, nonce: vec![] });
        r.set_timeout(Duration::from_secs(5));
        let reply = c.meta(r).await.map_err(|s| err(format!("Meta: {:?}: {}", s.code(), s.message())))?;
        match serde_json::from_slice::<MetaReply>(&reply.into_inner().body).map_err(|e| err(e.to_string()))? {
            MetaReply::Log { entries, .. } => logs.push((node.clone(), entries)),
            other => return Err(err(format!("unexpected reply {other:?}"))),
        }
    }
    let mut out = MetadataCheck::default();
    let Some((_, longest)) = logs.iter().max_by_key(|(_, l)| l.len()) else { return Ok(out) };
    out.entries = longest.len();
    for (node, log) in &logs {
        if let Some(d) = log.iter().zip(longest).find(|(a, b)| a != b) {
            out.problems.push(format!("{node}'s metadata log differs at entry {}", d.0.index));
        }
    }
    let mut last = 0u64;
    let mut page_keys = 0;
    for d in longest {
        match &d.proposal.entry {
            Entry::Ring(r) => {
                if r.epoch <= last {
                    out.problems
                        .push(format!("ring epoch {} decided again or out of order at entry {}", r.epoch, d.index));
                }
                last = r.epoch;
                out.epochs += 1;
            }
            Entry::Addr { node, .. } if *node != d.proposal.by => {
                out.problems.push(format!("entry {}: {} logged the address of {node}", d.index, d.proposal.by));
            }
            Entry::Addr { .. } => {}
            Entry::PageKey { .. } => {
                page_keys += 1;
                if page_keys > 1 {
                    out.problems.push(format!("entry {}: a second page-token key was decided", d.index));
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_that_hash_differently_are_named() {
        let p = Part::new(Role::Feature, 3);
        let mut h: BTreeMap<Part, Vec<(String, [u8; 32])>> = BTreeMap::new();
        h.insert(p, vec![("n1".into(), [1; 32]), ("n2".into(), [1; 32])]);
        assert!(differing_states(&h).is_empty());
        h.get_mut(&p).unwrap().push(("n3".into(), [2; 32]));
        let d = differing_states(&h);
        assert_eq!(d.len(), 1);
        assert!(d[0].contains("n1=01010101") && d[0].contains("n3=02020202"), "{}", d[0]);
    }
}
