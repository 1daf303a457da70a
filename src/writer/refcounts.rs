//! The writer's refcounts of the host clusters it allocates, kept compactly:
//! **2 bits per host cluster** (0, 1, 2, or "3 or more"), and the exact count of
//! the clusters referenced 3 or more times in a map. Most clusters of a
//! deduplicated image have refcount 1 or 2; a 1 TiB output of 4 KiB clusters
//! needs 64 MiB here instead of the 1 GiB of a `u32` per cluster.

use std::collections::HashMap;

/// Clusters per word of the packed array.
const PER_WORD: u64 = 32;
/// The 2-bit value meaning "look in the map".
const MANY: u64 = 3;

/// Refcounts of host clusters `0..len()`.
#[derive(Debug, Default)]
pub(crate) struct HostRefcounts {
    words: Vec<u64>,
    len: u64,
    many: HashMap<u64, u64>,
}

impl HostRefcounts {
    /// Number of clusters counted.
    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// Extends the range to `n` clusters; new clusters have refcount 0.
    pub(crate) fn extend_to(&mut self, n: u64) {
        if n > self.len {
            // Bounded by the output's 2^56 bytes / 512-byte clusters.
            self.words.resize(n.div_ceil(PER_WORD) as usize, 0);
            self.len = n;
        }
    }

    fn small(&self, c: u64) -> u64 {
        (self.words[(c / PER_WORD) as usize] >> ((c % PER_WORD) * 2)) & 3
    }

    fn set_small(&mut self, c: u64, v: u64) {
        let w = &mut self.words[(c / PER_WORD) as usize];
        let shift = (c % PER_WORD) * 2;
        *w = (*w & !(3 << shift)) | (v << shift);
    }

    /// The refcount of cluster `c` (< `len()`).
    pub(crate) fn get(&self, c: u64) -> u64 {
        match self.small(c) {
            MANY => self.many[&c],
            v => v,
        }
    }

    /// Sets the refcount of cluster `c` (< `len()`).
    pub(crate) fn set(&mut self, c: u64, v: u64) {
        if v >= MANY {
            self.set_small(c, MANY);
            self.many.insert(c, v);
        } else {
            if self.small(c) == MANY {
                self.many.remove(&c);
            }
            self.set_small(c, v);
        }
    }

    /// Adds one reference to cluster `c`; returns the refcount it had.
    pub(crate) fn add(&mut self, c: u64) -> u64 {
        let old = self.get(c);
        self.set(c, old + 1);
        old
    }

    /// The largest refcount of clusters `from..to`.
    pub(crate) fn max(&self, from: u64, to: u64) -> u64 {
        let many = self
            .many
            .iter()
            .filter(|(c, _)| (from..to).contains(*c))
            .map(|(_, v)| *v)
            .max();
        many.unwrap_or_else(|| (from..to).map(|c| self.small(c)).max().unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn agrees_with_a_vec_model(ops in proptest::collection::vec((0u64..200, 0u64..6, any::<bool>()), 0..400)) {
            let mut r = HostRefcounts::default();
            r.extend_to(200);
            let mut model = vec![0u64; 200];
            for (c, v, add) in ops {
                if add {
                    prop_assert_eq!(r.add(c), model[c as usize]);
                    model[c as usize] += 1;
                } else {
                    r.set(c, v);
                    model[c as usize] = v;
                }
                prop_assert_eq!(r.get(c), model[c as usize]);
            }
            for (c, v) in model.iter().enumerate() {
                prop_assert_eq!(r.get(c as u64), *v);
            }
            prop_assert_eq!(r.max(0, 200), model.iter().copied().max().unwrap());
            prop_assert!(r.many.len() == model.iter().filter(|v| **v >= 3).count());
        }
    }
}
