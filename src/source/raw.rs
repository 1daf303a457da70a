//! Raw images: the file is the guest disk.
//!
//! Holes are found with `SEEK_DATA`/`SEEK_HOLE` (through rustix, so no `unsafe`),
//! so a sparse 1 TiB file with little data is read only where it has data. The
//! virtual size is the file size rounded up to 512 bytes, as qemu-img does; the
//! rounded tail reads as zeros. Reads are plain `pread`s of whole batches (mmap
//! would need `unsafe`, cannot survive a concurrent truncation of the input, and
//! saved at most 12% of the CPU time in isolation: docs/benchmarks.md, issue 19).

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;

use super::{BlockStatus, Source};
use crate::error::{Error, IoContext, Result};
use crate::io::ReadAt;

/// A raw image opened read-only.
#[derive(Debug)]
pub struct RawSource {
    file: File,
    file_len: u64,
    virtual_size: u64,
    seek_data: bool,
}

impl RawSource {
    /// Opens `path` read-only.
    pub fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).ctx(|| format!("cannot open {}", path.display()))?;
        Self::from_file(file, path)
    }

    /// Wraps an already opened file (read-only use).
    pub fn from_file(file: File, path: &Path) -> Result<Self> {
        let meta = file
            .metadata()
            .ctx(|| format!("cannot stat {}", path.display()))?;
        if meta.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "{} is a directory",
                path.display()
            )));
        }
        // Block devices: the device's size.
        let file_len = crate::io::file_length(&file)
            .map_err(|e| Error::io(format!("cannot size {}", path.display()), e))?;
        let virtual_size = file_len
            .checked_next_multiple_of(512)
            .ok_or_else(|| Error::LimitExceeded("raw image size".into()))?;
        let seek_data = meta.file_type().is_file();
        Ok(RawSource {
            file,
            file_len,
            virtual_size,
            seek_data,
        })
    }
}

impl RawSource {
    fn check_not_shrunk(&self, offset: u64) -> Result<()> {
        let now = self
            .file
            .metadata()
            .ctx(|| "cannot stat the input".to_string())?
            .len();
        if now < self.file_len && self.seek_data {
            return Err(Error::io(
                format!(
                    "input ended early at offset {offset:#x}: it shrank from {} to {now} bytes while converting",
                    self.file_len
                ),
                std::io::ErrorKind::UnexpectedEof.into(),
            ));
        }
        Ok(())
    }
}

impl Source for RawSource {
    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn block_status(&self, offset: u64, max_len: u64) -> Result<(BlockStatus, u64)> {
        let end = offset.saturating_add(max_len).min(self.virtual_size);
        if offset >= self.file_len {
            return Ok((BlockStatus::Zero, end - offset));
        }
        if !self.seek_data {
            return Ok((BlockStatus::Data, end - offset));
        }
        let fd = self.file.as_fd();
        match rustix::fs::seek(fd, rustix::fs::SeekFrom::Data(offset)) {
            Ok(data) if data > offset => Ok((BlockStatus::Zero, data.min(end) - offset)),
            Ok(_) => match rustix::fs::seek(fd, rustix::fs::SeekFrom::Hole(offset)) {
                Ok(hole) if hole > offset => Ok((BlockStatus::Data, hole.min(end) - offset)),
                _ => Ok((BlockStatus::Data, end - offset)),
            },
            // ENXIO: no data at or after offset, or offset is past the end of a
            // file that shrank since it was opened (that is an error, not zeros).
            Err(rustix::io::Errno::NXIO) => {
                self.check_not_shrunk(offset)?;
                Ok((BlockStatus::Zero, end - offset))
            }
            // The file system does not support SEEK_DATA: everything may be data.
            Err(_) => Ok((BlockStatus::Data, end - offset)),
        }
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        // Bytes between the file end and the 512-rounded virtual size are zeros;
        // a file shorter than when it was opened is an error.
        self.file
            .read_known_len(buf, offset, self.file_len, "input")
            .ctx(|| format!("read error in the input at offset {offset:#x}"))
    }

    fn format_name(&self) -> &'static str {
        "raw"
    }
}
