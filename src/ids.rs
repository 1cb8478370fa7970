//! Stable 64-bit keys for string ids. FNV-1a: the same key in every process and build,
//! so partition placement never depends on a random hasher seed.
pub type Key = u64;

pub fn key_of(id: &str) -> Key {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Keys in different key spaces (item, user, author, geo) hash to independent partitions.
pub fn partition_of(space: &str, key: Key, partitions: u32) -> u32 {
    let mut h = key_of(space) ^ key.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^= h >> 31;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 29;
    (h % u64::from(partitions)) as u32
}

/// Hasher for maps keyed by `Key`: the keys are already FNV-mixed, so one multiply suffices
/// (std's SipHash showed up in profiles of the hot path).
#[derive(Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl std::hash::Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(*b)).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }
    fn write_u64(&mut self, k: u64) {
        self.0 = (k ^ (k >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

pub type KeyBuild = std::hash::BuildHasherDefault<KeyHasher>;
pub type KeyMap<V> = std::collections::HashMap<Key, V, KeyBuild>;

pub const ITEM: &str = "item";
pub const USER: &str = "user";
pub const AUTHOR: &str = "author";
pub const GEO: &str = "geo";
pub const COENGAGED: &str = "coengaged";
pub const TOPIC: &str = "topic";

/// The index key of a topic (its number, in the `TOPIC` space).
pub fn topic_key(topic: u32) -> Key {
    u64::from(topic)
}

/// A stable 64-bit mix (splitmix64's finaliser): ranks for order-free sampling.
pub(crate) fn mix(mut h: u64) -> u64 {
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn keys_are_stable_and_spread() {
        assert_eq!(key_of("a"), 0xaf63_dc4c_8601_ec8c);
        let mut counts = [0u32; 8];
        for i in 0..8000 {
            counts[partition_of(ITEM, key_of(&format!("i{i}")), 8) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    }
}
