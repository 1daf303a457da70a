//! The dedup index: content hash → the host copy that new references should share.
//!
//! Only the writer thread touches it, so it is a plain `HashMap` (no locking).
//! Keys are full 32-byte BLAKE3 hashes; clusters with equal hashes are treated as
//! equal without comparing bytes (a collision needs ~2^128 clusters).
//!
//! Memory: each unique non-zero cluster costs one entry of 32 (key) + 16 (value)
//! bytes plus hashbrown's control byte, at a load factor between 7/16 and 7/8:
//! 56–112 bytes, measured in docs/design.md.

use std::collections::HashMap;

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

/// The index. `lookup` / `insert` only; a saturated copy is replaced by `insert`.
#[derive(Debug, Default)]
pub struct DedupIndex {
    map: HashMap<Hash, Target>,
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
