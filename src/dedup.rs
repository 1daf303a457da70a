//! The dedup index: content hash → the host copy that new references should share.
//!
//! Only the writer thread touches it, so it is a plain `HashMap` (no locking).
//! Keys are full 32-byte BLAKE3 hashes; clusters with equal hashes are treated as
//! equal without comparing bytes (a collision needs ~2^128 clusters).
//!
//! Memory: each unique non-zero cluster costs one entry of 32 (key) + 16 (value)
//! bytes plus hashbrown's control byte, at a load factor between 7/16 and 7/8:
//! 56–112 bytes, measured in docs/design.md.
//!
//! The keys are already uniformly random, so the map does not run SipHash over
//! them: [`KeyHasher`] folds 16 bytes of the key with a per-process random seed
//! (one 64×64→128-bit multiply), so that a crafted image still cannot aim many
//! contents at one bucket. That makes lookups and inserts about 1.6× faster
//! (`cargo bench --bench parts -- dedup-index`).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};

/// A 256-bit BLAKE3 hash of a cluster's content.
pub type Hash = [u8; 32];

/// Where a content's shareable copy lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A plain host cluster (index = offset >> cluster_bits).
    Cluster(u64),
    /// A compressed stream at a byte offset, with its length in bytes.
    Compressed {
        /// Host byte offset.
        offset: u64,
        /// Stream length.
        len: u32,
    },
}

/// Builds [`KeyHasher`]s with this process's random seed.
#[derive(Debug, Clone, Copy)]
pub struct KeySeed {
    k0: u64,
    k1: u64,
}

impl Default for KeySeed {
    fn default() -> Self {
        let s = RandomState::new();
        KeySeed {
            k0: s.hash_one(0x5145_4455_5031u64),
            k1: s.hash_one(0x5145_4455_5032u64) | 1,
        }
    }
}

impl BuildHasher for KeySeed {
    type Hasher = KeyHasher;
    fn build_hasher(&self) -> KeyHasher {
        KeyHasher {
            seed: *self,
            state: 0,
        }
    }
}

/// Hashes a [`Hash`](type@Hash) key by folding its first 16 bytes with the seed.
#[derive(Debug, Clone, Copy)]
pub struct KeyHasher {
    seed: KeySeed,
    state: u64,
}

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.state
    }

    fn write(&mut self, bytes: &[u8]) {
        // A `[u8; 32]` key arrives as its length (a usize, ignored: always 32)
        // followed by its bytes.
        if let (Some(a), Some(b)) = (bytes.get(..8), bytes.get(8..16)) {
            let a = u64::from_le_bytes(a.try_into().expect("8 bytes")) ^ self.seed.k0;
            let b = u64::from_le_bytes(b.try_into().expect("8 bytes")) ^ self.seed.k1;
            let p = u128::from(a) * u128::from(b);
            self.state ^= (p as u64) ^ ((p >> 64) as u64);
        }
    }
}

/// The index. `lookup` / `insert` only; a saturated copy is replaced by `insert`.
#[derive(Debug, Default)]
pub struct DedupIndex {
    map: HashMap<Hash, Target, KeySeed>,
}

impl DedupIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::default()
    }

    /// The current shareable copy of `hash`, if any.
    pub fn lookup(&self, hash: &Hash) -> Option<Target> {
        self.map.get(hash).copied()
    }

    /// Records (or replaces) the shareable copy of `hash`.
    pub fn insert(&mut self, hash: Hash, target: Target) {
        self.map.insert(hash, target);
    }

    /// Number of distinct contents.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes of heap the table holds (capacity-based estimate).
    pub fn heap_bytes(&self) -> usize {
        let entry = std::mem::size_of::<(Hash, Target)>() + 1;
        self.map.capacity() * entry
    }
}

/// Hashes one cluster.
pub fn hash_cluster(data: &[u8]) -> Hash {
    *blake3::hash(data).as_bytes()
}

/// Whether `data` is all zeros (vectorizes: OR-folds 64-byte chunks).
pub fn is_zero(data: &[u8]) -> bool {
    let mut chunks = data.chunks_exact(64);
    for c in &mut chunks {
        if c.iter().fold(0u8, |a, b| a | b) != 0 {
            return false;
        }
    }
    chunks.remainder().iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn is_zero_agrees_with_a_plain_scan(mut v in proptest::collection::vec(0u8..2, 0..300), pos in any::<usize>()) {
            v.fill(0);
            prop_assert!(is_zero(&v));
            if !v.is_empty() {
                let i = pos % v.len();
                v[i] = 1;
                prop_assert!(!is_zero(&v));
            }
        }
    }
}
