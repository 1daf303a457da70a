//! Existing qcow2 images: the one opener every command uses ([`Image::open`]), the
//! one reader and writer of stored refcounts ([`refcounts::Refcounts`]) and of L1/L2
//! tables, with the walker over the active and snapshot trees
//! ([`tables::Walker`]).
//!
//! [`Image::open`] reads the header and cluster 0 (header extensions, backing file
//! name) and makes every check QEMU's `qcow2_do_open` makes, in the verdict class
//! QEMU gives it: what QEMU refuses to open is an error here (so `check` exits 1,
//! and `convert`, `info`, `map` and `compare` refuse it), and what QEMU opens is
//! opened (a table past the end of the file, a refcount table of zero clusters
//! under `check`), leaving it to `check` to report as a corruption. The
//! [`OpenMode`] says which open QEMU would do: a plain one, or `qemu-img check`'s.
//!
//! Conditions commands treat differently are recorded as [`Caveat`]s instead of
//! refused: reading guest data refuses every one of them by name, `info`
//! describes them, `check` checks encrypted, data-file and corrupt-marked images.
//!
//! ```no_run
//! use qdedup::error::IoContext;
//! use qdedup::image::{Image, OpenMode};
//! let file = std::fs::File::open("disk.qcow2").ctx(|| "opening disk.qcow2".into())?;
//! let im = Image::open(&file, OpenMode::Read)?;
//! println!("{} snapshots, caveats: {:?}", im.snapshots.len(), im.caveats);
//! # Ok::<(), qdedup::Error>(())
//! ```

pub(crate) mod bitmaps;
pub mod lock;
mod open;
pub mod refcounts;
pub mod tables;

pub use crate::format::header::OpenMode;
pub use open::{read_snapshot_table, BitmapsExtension, Caveat, CryptoHeader, Image};
