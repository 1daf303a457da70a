//! qdedup converts disk images (raw, qcow2) into compact qcow2 v3 images in which
//! identical clusters are stored once, and verifies such images.
//!
//! # Entry points
//!
//! Every command of the `qdedup` program is one function here, of one shape: the
//! paths it works on and an options struct (all `Default`) in, a typed report or
//! an [`Error`] out. The reports derive `Serialize` (the program's `--output
//! json`), except [`MapReport`], which [`inspect::map::to_json`] prints in
//! qemu-img's layout; most also implement `Display` (the program's human output).
//!
//! | function | options | report |
//! |---|---|---|
//! | [`convert`](fn@convert)`(input, output, …)` | [`ConvertOptions`] | [`ConvertReport`] |
//! | [`check`](fn@check)`(image, …)` | [`CheckOptions`] | [`CheckReport`] |
//! | [`info`]`(image, …)` | [`InfoOptions`] | [`InfoReport`] |
//! | [`map`]`(image, …)` | [`MapOptions`] | [`MapReport`] |
//! | [`compare`]`(a, b, …)` | [`CompareOptions`] | [`CompareReport`] |
//! | [`estimate`]`(input, …)` | [`EstimateOptions`] | [`EstimateReport`] |
//! | [`dedup`](fn@dedup)`(image, …)` | [`DedupOptions`] | [`DedupReport`] |
//! | [`checksum`](fn@checksum)`(image, …)` | [`ChecksumOptions`] | [`ChecksumReport`] |
//!
//! Below them: [`convert::convert_input`] converts an input opened already (a
//! [`source::Input`], which can wrap any [`source::Source`]), and
//! [`convert::convert_to`] writes through any [`io::WriteAt`]; [`check::check_image`]
//! and [`check::repair_image`] work through readers; [`estimate_source`] estimates
//! any source. The library never prints and never exits; a long conversion reports
//! progress through [`ConvertOptions::progress`] and stops when
//! [`ConvertOptions::cancel`] is set.
//!
//! # Example
//!
//! Convert a raw disk whose second half repeats its first into qcow2, then check
//! the result and compare it with the input:
//!
//! ```
//! use qdedup::{CheckOptions, CompareOptions, ConvertOptions};
//!
//! let dir = tempfile::tempdir()?;
//! let raw = dir.path().join("disk.raw");
//! let mut disk = vec![0u8; 4 << 20];
//! for (i, b) in disk[..1 << 20].iter_mut().enumerate() {
//!     *b = (i % 251) as u8;
//! }
//! disk.copy_within(..1 << 20, 2 << 20);
//! std::fs::write(&raw, &disk)?;
//!
//! let qcow2 = dir.path().join("disk.qcow2");
//! let report = qdedup::convert(&raw, &qcow2, &ConvertOptions::default())?;
//! // 64 KiB clusters: 64 in all, 16 unique, 16 repeats of them, 32 of zeros.
//! assert_eq!(report.stored_copies, 16);
//! assert_eq!(report.duplicate_clusters, 16);
//! assert_eq!(report.unallocated_clusters, 32);
//!
//! let check = qdedup::check(&qcow2, &CheckOptions::default())?;
//! assert!(check.is_clean());
//! assert_eq!(check.max_refcount, 2);
//!
//! let same = qdedup::compare(&raw, &qcow2, &CompareOptions::default())?;
//! assert_eq!(same.mismatch_offset, None);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Features
//!
//! `cli` (default) builds the `qdedup` program and pulls its dependencies (clap,
//! anyhow, indicatif, signal-hook, serde_json). A library user does not need it:
//! `qdedup = { version = "0.1", default-features = false }`.
#![deny(missing_docs)]

pub mod check;
pub mod checksum;
pub mod compress;
pub mod convert;
pub mod dedup;
pub mod error;
pub mod format;
pub mod image;
pub mod inplace;
pub mod inspect;
pub mod io;
#[doc(hidden)]
pub mod oracle;
#[doc(hidden)]
pub mod sample;
pub mod source;
pub mod writer;

pub use check::{check, CheckOptions, CheckReport};
pub use checksum::{checksum, ChecksumOptions, ChecksumReport};
pub use convert::{convert, ConvertOptions, ConvertReport};
pub use error::{Error, Result};
pub use inplace::{dedup, DedupOptions, DedupReport};
pub use inspect::compare::{compare, CompareOptions, CompareReport};
pub use inspect::estimate::{estimate, estimate_source, EstimateOptions, EstimateReport};
pub use inspect::info::{info, InfoOptions, InfoReport};
pub use inspect::map::{map, MapOptions, MapReport};
