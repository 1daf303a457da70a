//! Input images: raw files and qcow2 images, behind one [`Source`] trait.
//!
//! A source exposes the guest view (virtual size, block status, reads). The
//! converter never asks how the data is stored.

use crate::error::Result;

pub mod raw;

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

    /// Short description for reports, e.g. "raw" or "qcow2".
    fn format_name(&self) -> &'static str;
}
