//! Looking at images without converting them: `info`, `map`, `compare`,
//! `estimate`, and an SVG picture of where the duplicates are.
//!
//! ```no_run
//! use qdedup::inspect::map::{map, to_json, MapOptions};
//! let m = map("disk.qcow2".as_ref(), &MapOptions::default())?;
//! println!("{}", to_json(&m.entries));
//! # Ok::<(), qdedup::Error>(())
//! ```
//!
//! Backing chains are opened by [`crate::source::chain`] (`map` walks its layers
//! one by one, `compare` reads through them); stored refcounts (`map --shared`)
//! come from [`crate::image::refcounts`]. The walk of the active L1/L2 tree behind
//! `info`'s figures lives in `layers`, decoding entries with
//! [`crate::format::l1l2::L2Layout`].

pub mod compare;
pub mod estimate;
pub mod info;
mod layers;
pub mod map;
mod qemu_writes;
pub mod svg;
