//! Shared fixtures for the integration tests, one home each: running the binary
//! under test ([`cli`]) and QEMU's tools, the oracle ([`qemu`]); seeded guest
//! data ([`data`]); scratch directories ([`scratch`]); patching images by field
//! name ([`patch`]); reading an image's metadata independently of the code under
//! test ([`layout`]).
//!
//! Each test file includes this module with `mod common;` and uses what it needs,
//! so not every helper is used by every test binary.
#![allow(dead_code, unused_imports)] // each test binary uses some of the helpers

mod cli;
mod data;
mod layout;
mod patch;
mod qemu;
mod scratch;

pub use cli::*;
pub use data::*;
pub use layout::*;
pub use patch::*;
pub use qemu::*;
pub use scratch::*;

use std::path::Path;

use qdedup::format::extensions::QCOW2_EXT_MAGIC_BITMAPS;

// ---------------------------------------------------------------- more helpers
//
// Helpers added here can move into the module they belong to later: the
// re-exports above keep their names.

/// (offset of the bitmaps extension's data, bitmap directory offset) of a qcow2
/// file that has one.
pub fn bitmaps_extension(p: &Path) -> (u64, u64) {
    match find_extension(p, QCOW2_EXT_MAGIC_BITMAPS) {
        // Its data: nb_bitmaps (4 bytes), reserved (4), directory size (8), then
        // the directory offset (8).
        Some(at) => (at + 8, read_be(p, at + 24, 8)),
        None => panic!("no bitmaps extension"),
    }
}

/// Bytes the file system holds for `p` (`st_blocks` · 512), what `du` shows.
pub fn allocated_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// `n` clusters of `cs` bytes, each a copy of one of `pool` random clusters
/// (chosen by a seeded draw) or, one in `unique_every`, a random cluster of its
/// own; never a zero cluster (QEMU would not allocate it). Returns the bytes and
/// each cluster's content id (pool index, or `pool + i` for a unique one).
pub fn repeated_clusters(
    cs: usize,
    n: usize,
    pool: usize,
    unique_every: usize,
    seed: u64,
) -> (Vec<u8>, Vec<usize>) {
    let mut rng = qdedup::sample::Rng::new(seed);
    let mut blocks = vec![vec![0u8; cs]; pool];
    for b in &mut blocks {
        rng.fill(b);
    }
    let mut data = Vec::with_capacity(cs * n);
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        if unique_every > 0 && i % unique_every == 0 {
            let mut c = vec![0u8; cs];
            rng.fill(&mut c);
            data.extend_from_slice(&c);
            ids.push(pool + i);
        } else {
            let k = rng.below(pool as u64) as usize;
            data.extend_from_slice(&blocks[k]);
            ids.push(k);
        }
    }
    (data, ids)
}

/// Clusters an in-place dedup can free when every content id in `ids` is
/// stored once per `max_refcount` references: Σ (k − ⌈k / max⌉).
pub fn freeable_duplicates(ids: &[usize], max_refcount: u64) -> u64 {
    let mut counts = std::collections::HashMap::new();
    for id in ids {
        *counts.entry(*id).or_insert(0u64) += 1;
    }
    counts.values().map(|&k| k - k.div_ceil(max_refcount)).sum()
}
