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
