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
//! The L1/L2 walk used for `info`'s figures lives in `layers` (a small walker of
//! the active tree; the `check` module's walker was not merged yet).

pub mod compare;
pub mod estimate;
pub mod info;
mod layers;
pub mod map;
mod qemu_writes;
pub mod svg;
