//! The durable copy of a node's data, in sled. Serving reads come from the partitions' in-memory
//! blocks; this store is written before a write is acknowledged and replayed on start.
use std::path::Path;

use crate::domain::{LoggedOp, Part, Role};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    #[error("corrupt record in tree {tree}: {message}")]
    Corrupt { tree: &'static str, message: String },
}

/// Anti-entropy buckets per partition: ops are spread over them by the top bits of their id.
pub const BUCKETS: usize = 64;
const BUCKET_SHIFT: u32 = 58;

pub fn bucket_of(id: u64) -> usize {
    (id >> BUCKET_SHIFT) as usize
}

/// Per bucket: number of ops and the xor of their ids. Two replicas with equal digests hold the
/// same ops (up to hash collisions); a differing bucket names where to look.
pub type Digest = Vec<(u32, u64)>;

/// What the node keeps in memory per partition log: the ids logged (for idempotency and
/// anti-entropy), their bucket digest, and the next batch number.
#[derive(Default)]
struct PartLog {
    ids: std::collections::HashSet<u64, std::hash::BuildHasherDefault<crate::ids::KeyHasher>>,
    digest: Digest,
    next_batch: u64,
}

/// The node's durable copy, in sled: one op log per partition, keyed
/// `[role][partition BE][batch BE]`, so a partition is one contiguous key range (replayed alone,
/// streamed whole to another node later, dropped with one range delete). One entry per write
/// batch and partition, not per op: sled's cost is per insert (an insert per op ran at ~12 k
/// events/s on one node, a batch per call at several times that). The ids logged are held in
/// memory (rebuilt by the replay), so a retried op is recognised and skipped: the check and the
/// insert happen under the partition's lock, so two concurrent retries count once.
#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    log: sled::Tree,
    partitions: u32,
    logs: std::sync::Arc<Vec<std::sync::Mutex<PartLog>>>,
}

fn batch_key(part: Part, batch: u64) -> [u8; 13] {
    let mut k = [0u8; 13];
    k[0] = part.role as u8;
    k[1..5].copy_from_slice(&part.partition.to_be_bytes());
    k[5..13].copy_from_slice(&batch.to_be_bytes());
    k
}

fn part_prefix(part: Part) -> [u8; 5] {
    let mut k = [0u8; 5];
    k[0] = part.role as u8;
    k[1..5].copy_from_slice(&part.partition.to_be_bytes());
    k
}

fn corrupt(part: Part, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt { tree: "oplog", message: format!("{part}: {e}") }
}

impl Store {
    pub fn open(dir: &Path, cache_mb: u64, partitions: u32) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(cache_mb * 1024 * 1024)
            .mode(sled::Mode::HighThroughput)
            .open()?;
        let n = Role::ALL.len() * partitions as usize;
        let logs =
            (0..n).map(|_| std::sync::Mutex::new(PartLog { digest: vec![(0, 0); BUCKETS], ..Default::default() }));
        Ok(Self { log: db.open_tree("oplog")?, db, partitions, logs: std::sync::Arc::new(logs.collect()) })
    }

    fn part_log(&self, part: Part) -> std::sync::MutexGuard<'_, PartLog> {
        self.logs[part.index(self.partitions)].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Logs the ops whose ids this partition has not logged yet, as one entry. Returns, per op,
    /// whether it was new. Blocking: call from a blocking thread. The partition must have been
    /// `scan`ned first (that loads its ids).
    pub fn append(&self, part: Part, ops: &[LoggedOp]) -> Result<Vec<bool>, StoreError> {
        let mut log = self.part_log(part);
        let mut fresh = Vec::with_capacity(ops.len());
        let mut new_ops: Vec<&LoggedOp> = Vec::with_capacity(ops.len());
        for o in ops {
            let new = log.ids.insert(o.id);
            if new {
                new_ops.push(o);
            }
            fresh.push(new);
        }
        if new_ops.is_empty() {
            return Ok(fresh);
        }
        let value = postcard::to_allocvec(&new_ops).map_err(|e| corrupt(part, e));
        let batch = log.next_batch;
        let stored = value.and_then(|v| self.log.insert(batch_key(part, batch), v).map_err(StoreError::from));
        if let Err(e) = stored {
            // Not logged: forget the ids again, so a retry is applied.
            for o in &new_ops {
                log.ids.remove(&o.id);
            }
            return Err(e);
        }
        log.next_batch += 1;
        for o in new_ops {
            let b = &mut log.digest[bucket_of(o.id)];
            b.0 += 1;
            b.1 ^= o.id;
        }
        Ok(fresh)
    }

    /// Visits every op of one partition in log order.
    fn for_each(&self, part: Part, mut f: impl FnMut(LoggedOp) -> bool) -> Result<u64, StoreError> {
        let mut last = None;
        for kv in self.log.scan_prefix(part_prefix(part)) {
            let (k, v) = kv?;
            let batch = u64::from_be_bytes(k[5..13].try_into().map_err(|_| corrupt(part, "short key"))?);
            last = Some(batch);
            let ops: Vec<LoggedOp> = postcard::from_bytes(&v).map_err(|e| corrupt(part, e))?;
            for o in ops {
                if !f(o) {
                    return Ok(batch + 1);
                }
            }
        }
        Ok(last.map_or(0, |b| b + 1))
    }

    /// Every op of one partition in log order (the order this replica applied them; pulled ops
    /// were appended in (`at`, id) order); loads its ids and digest.
    pub fn scan(&self, part: Part) -> Result<Vec<LoggedOp>, StoreError> {
        let mut out = Vec::new();
        let next = self.for_each(part, |o| {
            out.push(o);
            true
        })?;
        let mut log = self.part_log(part);
        log.ids.clear();
        log.digest = vec![(0, 0); BUCKETS];
        for o in &out {
            if log.ids.insert(o.id) {
                let b = &mut log.digest[bucket_of(o.id)];
                b.0 += 1;
                b.1 ^= o.id;
            }
        }
        log.next_batch = next;
        drop(log);
        Ok(out)
    }

    pub fn digest(&self, part: Part) -> Digest {
        self.part_log(part).digest.clone()
    }

    /// Op ids of one bucket of a partition, sorted.
    pub fn bucket_ids(&self, part: Part, bucket: usize) -> Result<Vec<u64>, StoreError> {
        let mut ids: Vec<u64> = self.part_log(part).ids.iter().copied().filter(|i| bucket_of(*i) == bucket).collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Op ids of several buckets of a partition, each sorted, in one pass over the id set.
    pub fn bucket_ids_many(&self, part: Part, buckets: &[usize]) -> Vec<(usize, Vec<u64>)> {
        let mut want = [false; BUCKETS];
        for b in buckets {
            if let Some(w) = want.get_mut(*b) {
                *w = true;
            }
        }
        let mut out: Vec<Vec<u64>> = vec![Vec::new(); BUCKETS];
        for id in self.part_log(part).ids.iter() {
            let b = bucket_of(*id);
            if want[b] {
                out[b].push(*id);
            }
        }
        out.into_iter()
            .enumerate()
            .filter(|(b, _)| want[*b])
            .map(|(b, mut ids)| {
                ids.sort_unstable();
                (b, ids)
            })
            .collect()
    }

    /// Ops of a partition in the given buckets whose ids are not in `have` (sorted per bucket),
    /// at most `limit`. Scans the partition's log: anti-entropy only.
    pub fn missing_ops(
        &self,
        part: Part,
        have: &std::collections::HashMap<usize, Vec<u64>>,
        limit: usize,
    ) -> Result<Vec<LoggedOp>, StoreError> {
        let mut out = Vec::new();
        self.for_each(part, |o| {
            if let Some(h) = have.get(&bucket_of(o.id)) {
                if h.binary_search(&o.id).is_err() {
                    out.push(o);
                }
            }
            out.len() < limit
        })?;
        Ok(out)
    }

    /// A chunk of a partition's op log from batch `from` on, about `max_bytes` big (at least one
    /// batch): the ops, the batch to continue from, and whether the log ended. Streams a whole
    /// partition to a new owner without holding anything across chunks. Blocking (sled).
    pub fn chunk(&self, part: Part, from: u64, max_bytes: usize) -> Result<(Vec<LoggedOp>, u64, bool), StoreError> {
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut next = from;
        let end = {
            let mut p = part_prefix(part).to_vec();
            // The prefix's successor: role and partition are fixed width, so +1 on the last byte
            // with carry bounds exactly this partition's keys.
            for i in (0..p.len()).rev() {
                if p[i] == u8::MAX {
                    p[i] = 0;
                } else {
                    p[i] += 1;
                    break;
                }
            }
            p
        };
        for kv in self.log.range(batch_key(part, from).to_vec()..end) {
            let (k, v) = kv?;
            if bytes >= max_bytes {
                return Ok((out, next, false));
            }
            let batch = u64::from_be_bytes(k[5..13].try_into().map_err(|_| corrupt(part, "short key"))?);
            let ops: Vec<LoggedOp> = postcard::from_bytes(&v).map_err(|e| corrupt(part, e))?;
            bytes += v.len();
            out.extend(ops);
            next = batch + 1;
        }
        Ok((out, next, true))
    }

    /// Forgets a partition this node no longer owns: its log range and its ids. Blocking (sled).
    pub fn drop_partition(&self, part: Part) -> Result<u64, StoreError> {
        let mut log = self.part_log(part);
        let mut n = 0u64;
        let keys: Vec<sled::IVec> = self.log.scan_prefix(part_prefix(part)).keys().collect::<Result<_, _>>()?;
        for k in keys {
            self.log.remove(k)?;
            n += 1;
        }
        log.ids.clear();
        log.digest = vec![(0, 0); BUCKETS];
        log.next_batch = 0;
        Ok(n)
    }

    /// One flush per write batch; the ack waits for it.
    /// Another named tree of this node's sled database (the coordinator's hints).
    pub fn tree(&self, name: &str) -> Result<sled::Tree, StoreError> {
        Ok(self.db.open_tree(name)?)
    }

    pub async fn flush(&self) -> Result<usize, StoreError> {
        Ok(self.db.flush_async().await?)
    }

    /// Ops logged per partition (sums the digest; no scan).
    pub fn op_count(&self, part: Part) -> u64 {
        self.part_log(part).digest.iter().map(|b| u64::from(b.0)).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn op_log_is_idempotent_per_partition_and_survives_reopen() {
        use crate::domain::Op;
        let dir = std::env::temp_dir().join(format!("recsys-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let part = Part::new(Role::Feature, 3);
        let other = Part::new(Role::Feature, 4);
        let ops: Vec<LoggedOp> = (0..200u64)
            .map(|i| LoggedOp {
                id: i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                at: 1000 - i as i64,
                op: Op::Pair { a: i, b: i + 1 },
            })
            .collect();
        {
            let s = Store::open(&dir, 8, 8).unwrap();
            assert!(s.append(part, &ops).unwrap().iter().all(|n| *n));
            assert!(s.append(part, &ops[..10]).unwrap().iter().all(|n| !*n), "a retried op is not new");
            assert!(s.append(other, &ops[..10]).unwrap().iter().all(|n| *n), "partitions are separate");
            assert_eq!(s.op_count(part), 200);
            s.flush().await.unwrap();
        }
        let s = Store::open(&dir, 8, 8).unwrap();
        let back = s.scan(part).unwrap();
        assert_eq!(back.len(), 200);
        assert_eq!(back, ops, "replay in log order");
        assert_eq!(s.op_count(part), 200);
        let total: usize = (0..BUCKETS).map(|b| s.bucket_ids(part, b).unwrap().len()).sum();
        assert_eq!(total, 200);
        assert!(s.append(part, &ops[..3]).unwrap().iter().all(|n| !*n), "ids are known again after the reopen");
        // Streaming in chunks returns the log in order, then says it ended.
        let (mut got, mut from) = (Vec::new(), 0);
        loop {
            let (ops, next, done) = s.chunk(part, from, 1).unwrap();
            got.extend(ops);
            from = next;
            if done {
                break;
            }
        }
        assert_eq!(got, ops, "chunks cover the partition exactly");
        let more = LoggedOp { id: 7, at: 0, op: Op::Pair { a: 1, b: 2 } };
        assert_eq!(s.append(part, std::slice::from_ref(&more)).unwrap(), vec![true]);
        assert_eq!(s.scan(part).unwrap().len(), 201, "a batch after the reopen does not overwrite one before");
        let d = s.digest(part);
        for (b, (count, xor)) in d.iter().enumerate() {
            let ids = s.bucket_ids(part, b).unwrap();
            assert_eq!(*count as usize, ids.len());
            assert_eq!(*xor, ids.iter().fold(0, |x, i| x ^ i));
        }
        assert_eq!(s.drop_partition(other).unwrap(), 1);
        assert_eq!(s.op_count(other), 0);
        assert!(s.scan(other).unwrap().is_empty());
        assert_eq!(s.scan(part).unwrap().len(), 201, "dropping one partition leaves the others");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
