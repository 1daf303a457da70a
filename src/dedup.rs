//! The dedup index: content hash → the host copy that new references should share.
//!
//! Only the writer thread touches it, so it needs no locking. It is built for
//! big images: **20 bytes per slot**, at most 24 bytes per distinct content
//! whatever the load (see [`DedupIndex::heap_bytes`]), against the 56–112 bytes of
//! a `HashMap<[u8; 32], _>`.
//!
//! # Layout
//!
//! Three flat arrays, one entry per slot:
//!
//! | array    | width   | holds                                                         |
//! |----------|---------|---------------------------------------------------------------|
//! | `hi`     | 8 bytes | bytes 0..8 of the BLAKE3 hash, keyed (0: the slot is empty)   |
//! | `lo`     | 4 bytes | bytes 8..12 of the hash                                       |
//! | `target` | 8 bytes | the shareable copy ([`Target`])                               |
//!
//! A match is trusted on these **96 bits** of the hash (docs/format.md gives the
//! bound); `--verify` compares bytes as well (the writer's business).
//!
//! The table is an ordered linear-probing table (Robin Hood ordering on a
//! monotone home function): slot `home(hi)` = `hi × homes / 2^64`, and the
//! occupied slots are sorted by `hi`, each at or after its home slot with no
//! empty slot between. A lookup scans from the home slot until an empty slot or
//! a larger `hi`; an insert shifts that run up by one slot. Entries spill past
//! the last home slot into a tail that grows by [`TAIL_STEP`] slots as needed,
//! so nothing wraps around.
//!
//! It grows by 10% (not doubling) once more than 15/16 of the home slots are
//! used, so the load stays between about 0.85 and 0.94: 21–24 bytes per entry.
//! Because the home function is monotone, growing is one ordered pass
//! (each entry goes to max(its new home, the previous entry's slot + 1)).
//!
//! The stored `hi` is the hash's first 8 bytes XORed with a per-process random
//! key and multiplied by a random odd constant (a bijection, so no hash bits are
//! lost): a crafted image cannot aim many contents at one run of slots without
//! knowing the key. Lookups and inserts cost a short scan (`cargo bench --bench
//! parts -- dedup-index`).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;

/// A 256-bit BLAKE3 hash of a cluster's content.
pub type Hash = [u8; 32];

/// Where a content's shareable copy lives, in 8 bytes as the writer encodes it: a
/// compressed stream's L2 entry (descriptor with `QCOW_OFLAG_COMPRESSED`), or a
/// plain host cluster's offset carrying, in its low `cluster_bits` bits (zero in
/// an offset), the L2 slot of the guest cluster that first referenced it.
pub type Target = u64;

/// Tail slots added at a time when entries spill past the last home slot.
pub const TAIL_STEP: usize = 16;
/// Home slots of a new index.
const MIN_HOMES: usize = 64;
/// Bytes of one slot: `hi` + `lo` + `target`.
pub const SLOT_BYTES: usize = 8 + 4 + 8;
/// Fingerprint bits a match is trusted on.
pub const FINGERPRINT_BITS: u32 = 96;

/// The per-process key of the stored fingerprints.
#[derive(Debug, Clone, Copy)]
struct KeySeed {
    xor: u64,
    mul: u64,
}

impl Default for KeySeed {
    fn default() -> Self {
        let s = RandomState::new();
        KeySeed {
            xor: s.hash_one(0x5145_4455_5031u64),
            mul: s.hash_one(0x5145_4455_5032u64) | 1,
        }
    }
}

/// The index: `lookup` / `insert` only; a saturated copy is replaced by `insert`.
#[derive(Debug)]
pub struct DedupIndex {
    seed: KeySeed,
    hi: Vec<u64>,
    lo: Vec<u32>,
    target: Vec<u64>,
    /// Home slots: `hi.len() - homes` are tail slots.
    homes: usize,
    len: usize,
}

impl Default for DedupIndex {
    fn default() -> Self {
        Self::new()
    }
}

impl DedupIndex {
    /// An empty index.
    pub fn new() -> Self {
        Self::with_homes(MIN_HOMES, KeySeed::default())
    }

    fn with_homes(homes: usize, seed: KeySeed) -> Self {
        let mut d = DedupIndex {
            seed,
            hi: Vec::new(),
            lo: Vec::new(),
            target: Vec::new(),
            homes,
            len: 0,
        };
        d.resize_slots(homes);
        d
    }

    /// Sets the number of slots (home and tail) to exactly `n`.
    fn resize_slots(&mut self, n: usize) {
        let extra = n.saturating_sub(self.hi.len());
        self.hi.reserve_exact(extra);
        self.lo.reserve_exact(extra);
        self.target.reserve_exact(extra);
        self.hi.resize(n, 0);
        self.lo.resize(n, 0);
        self.target.resize(n, 0);
    }

    /// The stored form of `hash`: keyed `hi` (never 0) and `lo`.
    fn key(&self, hash: &Hash) -> (u64, u32) {
        let a = u64::from_le_bytes(hash[..8].try_into().expect("8 bytes"));
        let b = u32::from_le_bytes(hash[8..12].try_into().expect("4 bytes"));
        // 0 marks an empty slot: the one keyed value 0 shares slot order with 1
        // (a 2^-64 chance per content; the 32 `lo` bits still have to match).
        let hi = ((a ^ self.seed.xor).wrapping_mul(self.seed.mul)).max(1);
        (hi, b)
    }

    fn home(hi: u64, homes: usize) -> usize {
        // `homes` fits in a usize, so the product shifted down is below it.
        ((u128::from(hi) * homes as u128) >> 64) as usize
    }

    /// The slot holding (`hi`, `lo`), or `Err(slot)` where it would go.
    fn find(&self, hi: u64, lo: u32) -> Result<usize, usize> {
        let mut i = Self::home(hi, self.homes);
        while let Some(&h) = self.hi.get(i) {
            if h == 0 || h > hi {
                return Err(i);
            }
            if h == hi && self.lo[i] == lo {
                return Ok(i);
            }
            i += 1;
        }
        Err(i)
    }

    /// The current shareable copy of `hash`, if any.
    pub fn lookup(&self, hash: &Hash) -> Option<Target> {
        let (hi, lo) = self.key(hash);
        self.find(hi, lo).ok().map(|i| self.target[i])
    }

    /// Records (or replaces) the shareable copy of `hash`.
    pub fn insert(&mut self, hash: Hash, target: Target) {
        let (hi, lo) = self.key(&hash);
        let at = match self.find(hi, lo) {
            Ok(i) => {
                self.target[i] = target;
                return;
            }
            Err(i) => i,
        };
        if (self.len + 1) * 16 > self.homes * 15 {
            self.grow();
            return self.insert(hash, target);
        }
        // The first empty slot at or after `at`; the run [at, empty) moves up one.
        let empty = self.hi[at.min(self.hi.len())..]
            .iter()
            .position(|&h| h == 0)
            .map_or(self.hi.len(), |p| at + p);
        if empty == self.hi.len() {
            self.resize_slots(self.hi.len() + TAIL_STEP);
        }
        self.hi.copy_within(at..empty, at + 1);
        self.lo.copy_within(at..empty, at + 1);
        self.target.copy_within(at..empty, at + 1);
        self.hi[at] = hi;
        self.lo[at] = lo;
        self.target[at] = target;
        self.len += 1;
    }

    /// Rebuilds the table with 10% more home slots, in one ordered pass.
    fn grow(&mut self) {
        let homes = self.homes + (self.homes / 10).max(1);
        let mut next = Self::with_homes(homes, self.seed);
        let mut at = 0usize;
        for i in 0..self.hi.len() {
            let h = self.hi[i];
            if h == 0 {
                continue;
            }
            let p = Self::home(h, homes).max(at);
            if p >= next.hi.len() {
                next.resize_slots(p + TAIL_STEP);
            }
            next.hi[p] = h;
            next.lo[p] = self.lo[i];
            next.target[p] = self.target[i];
            at = p + 1;
        }
        next.len = self.len;
        *self = next;
    }

    /// Number of distinct contents.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the index is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes of heap the table holds: every slot's 20 bytes, empty or not
    /// (reported as `index-bytes`).
    pub fn heap_bytes(&self) -> usize {
        self.hi.capacity() * 8 + self.lo.capacity() * 4 + self.target.capacity() * 8
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

    fn h(i: u64) -> Hash {
        *blake3::hash(&i.to_le_bytes()).as_bytes()
    }

    /// The index agrees with a `HashMap` model over random inserts (some
    /// replacing) and lookups, for several seeds and sizes; the run asserts how
    /// many cases it exercised.
    #[test]
    fn index_agrees_with_a_hashmap_model() {
        use proptest::test_runner::{Config, TestRunner};
        use std::collections::HashMap;
        let cases = 64;
        let mut runner = TestRunner::new(Config::with_cases(cases));
        let ops = proptest::collection::vec((0u64..3000, any::<u64>(), any::<bool>()), 0..4000);
        let ran = std::cell::Cell::new(0u32);
        runner
            .run(&ops, |ops| {
                ran.set(ran.get() + 1);
                let mut index = DedupIndex::new();
                let mut model = HashMap::new();
                for (k, t, insert) in ops {
                    if insert {
                        index.insert(h(k), t);
                        model.insert(h(k), t);
                    }
                    prop_assert_eq!(index.lookup(&h(k)), model.get(&h(k)).copied());
                    prop_assert_eq!(index.len(), model.len());
                }
                for (k, t) in &model {
                    prop_assert_eq!(index.lookup(k), Some(*t));
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(ran.get(), cases);
    }

    /// Two contents whose hashes agree in the 96 bits the index keeps are one
    /// key to it: the fingerprint collision `--verify` guards against.
    #[test]
    fn hashes_equal_in_96_bits_collide_and_differ_beyond_them_do_not() {
        let mut index = DedupIndex::new();
        let a = h(1);
        let mut same96 = a;
        same96[12] ^= 1;
        same96[31] ^= 0x80;
        let mut other = a;
        other[11] ^= 1;
        index.insert(a, 7 << 16);
        assert_eq!(index.lookup(&same96), Some(7 << 16));
        assert_eq!(index.lookup(&other), None);
    }

    /// The table's heap stays within 24 bytes per entry at every size from 1000
    /// entries up (grown by 10% at 15/16 load, plus tail slots).
    #[test]
    fn heap_bytes_stay_within_24_per_entry() {
        let mut index = DedupIndex::new();
        let mut worst = 0f64;
        let mut checked = 0;
        for i in 0..300_000u64 {
            index.insert(h(i), i << 16);
            if i >= 1000 {
                let per = index.heap_bytes() as f64 / index.len() as f64;
                worst = worst.max(per);
                checked += 1;
            }
        }
        assert_eq!(checked, 299_000);
        assert!(worst <= 24.0, "{worst} bytes per entry");
        for i in (0..300_000u64).step_by(997) {
            assert_eq!(index.lookup(&h(i)), Some(i << 16));
        }
    }
}
