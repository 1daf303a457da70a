//! qcow2 input: one layer ([`Qcow2Source`]) plus, optionally, the source it falls
//! through to (its backing file, itself a raw or qcow2 [`Source`]).
//!
//! Supported: versions 2 and 3, cluster sizes 512 B – 2 MiB, any refcount width
//! (refcounts are not read), compressed clusters (deflate and zstd), zero clusters
//! (plain and preallocated), extended L2 entries (subclusters), snapshots (read
//! through their L1 table), dirty images (read-only; L1/L2 are consistent even when
//! refcounts are stale), and virtual sizes that are not a multiple of the cluster
//! size, and external data files (the chain opener attaches them:
//! [`Qcow2Source::set_data_file`]). Refused by name: encryption, unknown
//! incompatible features and images marked corrupt. See `docs/qcow2-input.md`.
//!
//! ```no_run
//! use qdedup::source::{open, OpenOptions, Source};
//! let src = open("disk.qcow2".as_ref(), &OpenOptions::default())?;
//! let mut buf = vec![0u8; 65536];
//! src.read_at(&mut buf, 0)?;
//! # Ok::<(), qdedup::Error>(())
//! ```

mod map;
mod meta;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex};

use super::{BlockStatus, OpenOptions, Source};
use crate::compress;
use crate::error::{Error, Result};
use crate::format::compressed::CompressedDescriptor;
use crate::format::header::{CompressionType, Header};
use crate::format::snapshot::Snapshot;
use crate::io::ReadAt;
use map::{Extent, Mapper};

pub use super::chain::{resolve_backing_name, MAX_CHAIN_DEPTH};

/// Most extents merged into one `block_status` answer, so that a call stays cheap
/// even on images with many small, scattered allocations.
const MAX_EXTENTS_PER_STATUS: usize = 1024;
/// A data run longer than this is returned without merging further extents
/// (callers loop; long runs matter for zeros, which are skipped without reading).
const DATA_RUN_SOFT_LIMIT: u64 = 64 << 20;

/// One qcow2 image (the active layer or one snapshot's view), opened read-only,
/// with the source its unallocated clusters fall through to.
pub struct Qcow2Source {
    file: Box<dyn ReadAt>,
    header: Header,
    compression: CompressionType,
    file_len: u64,
    virtual_size: u64,
    backing_name: Option<Vec<u8>>,
    backing_format: Option<String>,
    snapshot: Option<Snapshot>,
    snapshots: Vec<Snapshot>,
    mapper: Mapper,
    backing: Option<Box<dyn Source>>,
    /// Set for backing files: named in errors this layer raises while reading.
    label: Option<std::path::PathBuf>,
    /// The external data file's name as stored (images with incompatible bit 2).
    data_file_name: Option<String>,
    /// The external data file, once opened ([`Qcow2Source::set_data_file`]).
    data_file: Option<Box<dyn ReadAt>>,
    /// The last decompressed cluster, for reads that cover a compressed cluster in
    /// several pieces. Keyed by the whole descriptor: entries sharing a stream start
    /// may read different lengths, and a shorter one may fail to decompress.
    last_compressed: Mutex<Option<(CompressedDescriptor, Arc<[u8]>)>>,
}

impl std::fmt::Debug for Qcow2Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Source")
            .field("header", &self.header)
            .field("virtual_size", &self.virtual_size)
            .field("backing_file", &self.backing_file())
            .field("backing_format", &self.backing_format)
            .field("snapshot", &self.snapshot.as_ref().map(|s| &s.id))
            .field("has_backing_source", &self.backing.is_some())
            .finish_non_exhaustive()
    }
}

impl Qcow2Source {
    /// Opens the qcow2 image at `path` with its backing chain (unless
    /// `opts.backing_chain` is false) and, if `opts.snapshot` is set, the view of
    /// that snapshot. `opts.format` is ignored: the file is read as qcow2.
    pub fn open(path: &Path, opts: &OpenOptions) -> Result<Self> {
        super::chain::open_qcow2_chain(path, opts)
    }

    /// Opens one qcow2 layer from any positional reader, without a backing source
    /// (unallocated clusters read as zeros until [`Qcow2Source::set_backing`]).
    /// `snapshot` selects a snapshot by ID or name.
    pub fn from_reader(file: Box<dyn ReadAt>, snapshot: Option<&str>) -> Result<Self> {
        let m = meta::read_meta(file.as_ref(), snapshot)?;
        let compression = m.header.compression()?;
        let mut mapper = Mapper::new(
            m.header.cluster_bits,
            m.header.extended_l2(),
            m.header.version,
            m.l1,
            m.l1_offset,
            m.file_len,
        );
        // Validated by Header::validate: these sums do not overflow.
        let h = &m.header;
        let cs = h.cluster_size();
        let round = |n: u64| n.div_ceil(cs) * cs;
        if m.data_file_name.is_some() {
            mapper.set_data_file();
        }
        mapper.set_metadata(vec![
            (0, cs, "header"),
            (
                h.l1_table_offset,
                h.l1_table_offset + round(u64::from(h.l1_size) * 8),
                "L1 table",
            ),
            (
                h.refcount_table_offset,
                h.refcount_table_offset + (u64::from(h.refcount_table_clusters) << h.cluster_bits),
                "refcount table",
            ),
        ]);
        Ok(Qcow2Source {
            file,
            compression,
            file_len: m.file_len,
            virtual_size: m.virtual_size,
            backing_name: m.backing_name,
            backing_format: m.backing_format,
            snapshot: m.snapshot,
            snapshots: m.snapshots,
            header: m.header,
            mapper,
            backing: None,
            label: None,
            data_file_name: m.data_file_name,
            data_file: None,
            last_compressed: Mutex::new(None),
        })
    }

    /// Sets the source unallocated clusters fall through to. Reads past its virtual
    /// size return zeros.
    pub fn set_backing(&mut self, backing: Option<Box<dyn Source>>) {
        self.backing = backing;
    }

    /// The external data file's name as stored in the image, if it has one
    /// (open it with [`Qcow2Source::set_data_file`]; the chain opener does).
    pub fn data_file_name(&self) -> Option<&str> {
        self.data_file_name.as_deref()
    }

    /// Attaches the external data file guest data clusters are read from.
    pub fn set_data_file(&mut self, file: Box<dyn ReadAt>) {
        self.data_file = Some(file);
    }

    /// Errors this layer raises (not those of its own backing source) name
    /// `path` as the backing file they come from.
    pub(crate) fn set_label(&mut self, path: &Path) {
        self.label = Some(path.to_path_buf());
    }

    fn own<T>(&self, r: Result<T>) -> Result<T> {
        match &self.label {
            Some(p) => r.map_err(|e| super::chain::in_file(e, p)),
            None => r,
        }
    }

    /// The backing source, if one is attached.
    pub fn backing(&self) -> Option<&dyn Source> {
        self.backing.as_deref()
    }

    /// The decoded header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The backing file name as stored in the image (not resolved), if any.
    pub fn backing_file(&self) -> Option<&Path> {
        self.backing_name
            .as_deref()
            .map(|b| Path::new(OsStr::from_bytes(b)))
    }

    /// The backing format from the header extension, if present.
    pub fn backing_format(&self) -> Option<&str> {
        self.backing_format.as_deref()
    }

    /// The snapshot being read, if one was selected.
    pub fn snapshot(&self) -> Option<&Snapshot> {
        self.snapshot.as_ref()
    }

    /// The image's snapshot table (read when the image was opened, as QEMU does).
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        Ok(self.snapshots.clone())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.virtual_size => Ok(()),
            _ => Err(Error::InvalidArgument(format!(
                "range {offset:#x}+{len:#x} outside the virtual size {:#x}",
                self.virtual_size
            ))),
        }
    }

    /// Status of an unallocated run: the backing file's, zeros past its end.
    fn backing_status(&self, offset: u64, len: u64) -> Result<(BlockStatus, u64)> {
        match &self.backing {
            Some(b) if offset < b.virtual_size() => {
                b.block_status(offset, len.min(b.virtual_size() - offset))
            }
            _ => Ok((BlockStatus::Zero, len)),
        }
    }

    fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        match &self.backing {
            Some(b) if offset < b.virtual_size() => {
                // Bounded by buf.len(), so it fits usize.
                let n = (b.virtual_size() - offset).min(buf.len() as u64) as usize;
                b.read_at(&mut buf[..n], offset)?;
                buf[n..].fill(0);
                Ok(())
            }
            _ => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    fn read_data(&self, buf: &mut [u8], host: u64) -> Result<()> {
        if let Some(name) = &self.data_file_name {
            let Some(f) = &self.data_file else {
                return Err(Error::Unsupported(format!(
                    "external data file {name:?} (not opened: open the image by its path)"
                )));
            };
            // Past the end of the data file, QEMU reads zeros.
            return f.read_at_zero_fill(buf, host).map(|_| ()).map_err(|e| {
                Error::io(
                    format!("read error in the external data file {name:?} at {host:#x}"),
                    e,
                )
            });
        }
        // The mapper checked that each cluster starts inside the file; a partial
        // last cluster reads as zeros past the end of the file, as in QEMU.
        self.file
            .read_known_len(buf, host, self.file_len, "the qcow2 file")
            .map_err(|e| Error::io(format!("read error in the qcow2 file at {host:#x}"), e))
    }

    /// Decompresses the cluster described by `desc` into `out` (one cluster).
    fn decompress(&self, desc: CompressedDescriptor, entry: u64, out: &mut [u8]) -> Result<()> {
        // read_len ≤ 2^(cluster_bits − 8) · 512 = 2 clusters (≤ 4 MiB).
        let mut input = vec![0u8; desc.read_len() as usize];
        // QEMU reads past the end of the file as zeros here; so do we.
        self.file
            .read_at_zero_fill(&mut input, desc.host_offset)
            .map_err(|e| {
                Error::io(
                    format!(
                        "cannot read the compressed cluster at {:#x}",
                        desc.host_offset
                    ),
                    e,
                )
            })?;
        let r = compress::decompress(self.compression, &input, out);
        r.map_err(|e| match e {
            Error::Corrupt { detail, .. } => Error::corrupt(
                "compressed cluster",
                desc.host_offset,
                format!(
                    "{} stream of the L2 entry at {entry:#x}: {detail}",
                    self.compression.name()
                ),
            ),
            other => other,
        })
    }

    fn read_compressed(
        &self,
        buf: &mut [u8],
        guest: u64,
        desc: CompressedDescriptor,
        entry: u64,
    ) -> Result<()> {
        let cs = self.header.cluster_size() as usize;
        let start = (guest & (cs as u64 - 1)) as usize;
        if start == 0 && buf.len() == cs {
            return self.decompress(desc, entry, buf);
        }
        let key = desc;
        let cached = self
            .last_compressed
            .lock()
            .expect("cache lock")
            .as_ref()
            .filter(|(k, _)| *k == key)
            .map(|(_, d)| Arc::clone(d));
        let data = if let Some(d) = cached {
            d
        } else {
            let mut d = vec![0u8; cs];
            self.decompress(desc, entry, &mut d)?;
            let d: Arc<[u8]> = d.into();
            *self.last_compressed.lock().expect("cache lock") = Some((key, Arc::clone(&d)));
            d
        };
        buf.copy_from_slice(&data[start..start + buf.len()]);
        Ok(())
    }
}

/// What one layer says about a run of guest bytes, without looking at its
/// backing file (for `map`, which reports the depth itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LayerExtent {
    /// Not allocated in this layer; `host` as in [`Extent::Unallocated`].
    Unallocated { host: Option<u64> },
    /// Reads as zeros; `host` is the preallocated host offset (ZERO_ALLOC).
    Zero { host: Option<u64> },
    /// Plain data at this host offset (of the run's first byte); contiguous.
    Data { host: u64 },
    /// One compressed cluster whose stream starts at `host` (a byte offset);
    /// `len` bytes are read from there (the descriptor's sector count).
    Compressed { host: u64, len: u64 },
}

impl Qcow2Source {
    /// Classifies guest bytes `[offset, offset + max_len)` in this layer alone:
    /// the kind of the first run and its length (≥ 1). Runs never cross an L2
    /// table; compressed runs are one cluster.
    pub(crate) fn layer_extent(&self, offset: u64, max_len: u64) -> Result<(LayerExtent, u64)> {
        self.check_range(offset, max_len.max(1))?;
        let (ext, len) = self.own(self.mapper.extent(self.file.as_ref(), offset, max_len))?;
        let e = match ext {
            Extent::Unallocated { host } => LayerExtent::Unallocated { host },
            Extent::Zero { host } => LayerExtent::Zero { host },
            Extent::Data { host } => LayerExtent::Data { host },
            Extent::Compressed { desc, .. } => LayerExtent::Compressed {
                host: desc.host_offset,
                len: desc.read_len(),
            },
        };
        Ok((e, len))
    }

    /// The image file, for metadata walks (refcounts, L2 tables).
    pub(crate) fn file(&self) -> &dyn ReadAt {
        self.file.as_ref()
    }
}

impl Source for Qcow2Source {
    fn virtual_size(&self) -> u64 {
        self.virtual_size
    }

    fn block_status(&self, offset: u64, max_len: u64) -> Result<(BlockStatus, u64)> {
        if max_len == 0 || offset >= self.virtual_size {
            return Err(Error::InvalidArgument(format!(
                "block status at {offset:#x} (length {max_len}) outside the virtual size {:#x}",
                self.virtual_size
            )));
        }
        let end = offset.saturating_add(max_len).min(self.virtual_size);
        let mut pos = offset;
        let mut status = None;
        for _ in 0..MAX_EXTENTS_PER_STATUS {
            if pos >= end {
                break;
            }
            let (ext, len) = self.own(self.mapper.extent(self.file.as_ref(), pos, end - pos))?;
            let (s, len) = match ext {
                Extent::Zero { .. } => (BlockStatus::Zero, len),
                Extent::Data { .. } | Extent::Compressed { .. } => (BlockStatus::Data, len),
                Extent::Unallocated { .. } => self.backing_status(pos, len)?,
            };
            match status {
                None => status = Some(s),
                Some(prev) if prev != s => break,
                Some(_) => {}
            }
            pos += len;
            if s == BlockStatus::Data && pos - offset >= DATA_RUN_SOFT_LIMIT {
                break;
            }
        }
        Ok((
            status.expect("offset < end, so one extent was seen"),
            pos - offset,
        ))
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.check_range(offset, buf.len() as u64)?;
        let mut done = 0usize;
        while done < buf.len() {
            let guest = offset + done as u64;
            let (ext, len) = self.own(self.mapper.extent(
                self.file.as_ref(),
                guest,
                (buf.len() - done) as u64,
            ))?;
            // len ≤ the remaining buffer, so it fits usize.
            let chunk = &mut buf[done..done + len as usize];
            match ext {
                Extent::Zero { .. } => chunk.fill(0),
                Extent::Unallocated { .. } => self.read_backing(chunk, guest)?,
                Extent::Data { host } => self.own(self.read_data(chunk, host))?,
                Extent::Compressed { desc, entry } => {
                    self.own(self.read_compressed(chunk, guest, desc, entry))?;
                }
            }
            done += chunk.len();
        }
        Ok(())
    }

    fn format_name(&self) -> &'static str {
        "qcow2"
    }

    fn qemu_block_status(&self, offset: u64, max_len: u64) -> Result<(BlockStatus, u64)> {
        if max_len == 0 || offset >= self.virtual_size {
            return Err(Error::InvalidArgument(format!(
                "block status at {offset:#x} (length {max_len}) outside the virtual size {:#x}",
                self.virtual_size
            )));
        }
        let end = offset.saturating_add(max_len).min(self.virtual_size);
        // One extent of this layer, as qcow2_get_host_offset counts it; an
        // unallocated one is answered by the backing file for its length
        // (bdrv_co_common_block_status_above), zeros past its end.
        let (ext, len) = self.own(self.mapper.extent(self.file.as_ref(), offset, end - offset))?;
        match ext {
            Extent::Zero { .. } => Ok((BlockStatus::Zero, len)),
            Extent::Data { .. } | Extent::Compressed { .. } => Ok((BlockStatus::Data, len)),
            Extent::Unallocated { .. } => match &self.backing {
                Some(b) if offset < b.virtual_size() => {
                    b.qemu_block_status(offset, len.min(b.virtual_size() - offset))
                }
                _ => Ok((BlockStatus::Zero, len)),
            },
        }
    }

    fn cluster_size(&self) -> Option<u64> {
        Some(self.header.cluster_size())
    }
}
