//! Input images: raw files and qcow2 images, behind one [`Source`] trait.
//!
//! A source exposes the guest view (virtual size, block status, reads). The
//! converter never asks how the data is stored. [`open`] probes the format and
//! opens a qcow2 image with its backing chain; [`Input::open`] does the same and
//! keeps the path, for `convert` and `estimate`.

use std::path::{Path, PathBuf};

use crate::error::Result;
use crate::format::header::QCOW_MAGIC;
use crate::io::ReadAt;

pub mod chain;
pub mod qcow2;
pub mod raw;

pub use qcow2::Qcow2Source;

/// What is known about a run of guest bytes without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockStatus {
    /// The bytes may hold data: read them.
    Data,
    /// The bytes are known to read as zeros (a hole, an unallocated or zero cluster).
    Zero,
}

/// A guest-visible disk image to convert.
pub trait Source: Send + Sync {
    /// Virtual size in bytes.
    fn virtual_size(&self) -> u64;

    /// Status of the run starting at `offset` (< virtual size): returns the status and
    /// the length of the run, at least 1 and at most `max_len`.
    fn block_status(&self, offset: u64, max_len: u64) -> Result<(BlockStatus, u64)>;

    /// Reads guest bytes `[offset, offset + buf.len())`; the range lies inside the
    /// virtual size.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;

    /// Like [`Source::block_status`], but the run ends where QEMU's
    /// `bdrv_block_status_above` ends it, without merging: for qcow2 at every
    /// change of kind or of host contiguity, at L2 table and compressed cluster
    /// boundaries, and at the backing file's own extents. `estimate` replays the
    /// requests of `qemu-img convert` with it. The default is
    /// [`Source::block_status`], which for raw files already is QEMU's answer (the
    /// file's `SEEK_DATA`/`SEEK_HOLE` extents).
    fn qemu_block_status(&self, offset: u64, max_len: u64) -> Result<(BlockStatus, u64)> {
        self.block_status(offset, max_len)
    }

    /// The cluster size QEMU's `bdrv_get_info` reports for the image: qcow2's
    /// cluster size, `None` for raw files.
    fn cluster_size(&self) -> Option<u64> {
        None
    }

    /// Short description for reports, e.g. "raw" or "qcow2".
    fn format_name(&self) -> &'static str;
}

/// Input image formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The file is the guest disk.
    Raw,
    /// qcow2 (versions 2 and 3).
    Qcow2,
}

impl Format {
    /// The name used on the command line and by QEMU.
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

impl std::str::FromStr for Format {
    type Err = crate::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            other => Err(crate::Error::InvalidArgument(format!(
                "unknown input format {other:?} (expected raw or qcow2)"
            ))),
        }
    }
}

/// How to open an input image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenOptions {
    /// Force a format; `None` probes (qcow2 by its magic, raw otherwise).
    pub format: Option<Format>,
    /// Read through the backing chain (default). `false` reads the top layer alone:
    /// clusters it does not allocate read as zeros.
    pub backing_chain: bool,
    /// Read this snapshot's view (matched by ID first, then by name;
    /// `snapshot.id=ID` or `snapshot.name=NAME` match only one) instead of the
    /// active layer. qcow2 only.
    pub snapshot: Option<String>,
    /// Read images other processes have open for writing, as qemu-img's
    /// `-U`/`--force-share` does: take QEMU's shared locks only. By default the
    /// image and each backing file get QEMU's read locks, and an image a running
    /// QEMU writes is refused ([`crate::Error::Locked`]).
    pub force_share: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            format: None,
            backing_chain: true,
            snapshot: None,
            force_share: false,
        }
    }
}

/// Probes the format of `file` by its magic: `QFI\xfb` is qcow2, anything else
/// (including a file shorter than 4 bytes) is raw.
pub fn probe(file: &dyn ReadAt) -> std::io::Result<Format> {
    let mut magic = [0u8; 4];
    let n = file.read_at_zero_fill(&mut magic, 0)?;
    if n == 4 && magic == QCOW_MAGIC.to_be_bytes() {
        Ok(Format::Qcow2)
    } else {
        Ok(Format::Raw)
    }
}

/// Opens an input image read-only: probes or forces its format, and for qcow2
/// opens the backing chain (relative names resolved against each overlay's
/// directory, at most [`chain::MAX_CHAIN_DEPTH`] levels, loops refused).
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Box<dyn Source>> {
    chain::open_chain(path, opts)
}

/// An input image for `convert` or `estimate`: a [`Source`] and the file it was
/// opened from. The conversion names the input by this path in its report and
/// refuses to write its output over it.
pub struct Input {
    path: Option<PathBuf>,
    source: Box<dyn Source>,
}

impl Input {
    /// Opens the image at `path` as [`open`] does.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Input> {
        Ok(Input {
            path: Some(path.to_path_buf()),
            source: open(path, opts)?,
        })
    }

    /// An input that is not a file (generated data, a test source): reports
    /// name it by an empty string.
    pub fn from_source(source: Box<dyn Source>) -> Input {
        Input { path: None, source }
    }

    /// The file the input was opened from, if any.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The guest view.
    pub fn source(&self) -> &dyn Source {
        self.source.as_ref()
    }
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Input")
            .field("path", &self.path)
            .field("format", &self.source.format_name())
            .field("virtual_size", &self.source.virtual_size())
            .finish()
    }
}
