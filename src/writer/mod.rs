//! New qcow2 images: the one writer, public. `convert` and `estimate` are its
//! clients; other programs can embed it.
//!
//! A [`WriterBuilder`] sets the image up (cluster size, refcount width,
//! compression, deduplication) and creates an [`ImageWriter`] over any
//! [`WriteAt`] output. The caller hands it clusters in guest order
//! ([`ImageWriter::write_cluster`], [`ImageWriter::write_zero_clusters`]); each
//! is checked for zeros, hashed (BLAKE3), deduplicated, compressed and placed;
//! [`ImageWriter::finish`] writes the metadata and returns [`WriterStats`].
//! The conversion pipeline hashes and compresses on its workers and hands whole
//! batches to the same writer ([`ImageWriter::accept_batch`]).
//!
//! ```
//! use qdedup::io::MemFile;
//! use qdedup::writer::WriterBuilder;
//!
//! // A 1 MiB disk of 64 KiB clusters: the same block four times, then zeros.
//! let out = MemFile::new(Vec::new());
//! let mut w = WriterBuilder::new(1 << 20).cluster_size(65536).create(&out)?;
//! let block = vec![0xabu8; 65536];
//! for _ in 0..4 {
//!     w.write_cluster(&block)?;
//! }
//! w.write_zero_clusters(12)?;
//! let stats = w.finish()?;
//! assert_eq!((stats.unique_clusters, stats.duplicate_clusters), (1, 3));
//! assert_eq!(stats.zero_clusters, 12);
//! assert_eq!(&out.contents()[..4], b"QFI\xfb");
//! # Ok::<(), qdedup::Error>(())
//! ```
//!
//! One writer owns the output. It takes clusters in guest order and appends every
//! new host cluster (or compressed stream) after the previous one, so host offsets
//! follow guest order and the output is the same whatever the number of workers.
//! An L2 table is written into the next host cluster as soon as the writer reaches
//! data past its guest range, so only one table is in memory. When all data is
//! written, [`ImageWriter::finish`] writes the last table, clears COPIED in written
//! tables whose clusters a later duplicate shared, lays out the rest of the
//! metadata after the data and writes the header last:
//!
//! ```text
//! cluster 0        header (v3, or v2's 72 bytes), backing-format extension
//!                  (overlays), feature-name table extension (v3), end marker,
//!                  backing file name (overlays)
//! 1 ..             data clusters and compressed streams, in guest order, each
//!                  L2 table after the data of its range
//! then             L1 table
//! then             refcount blocks
//! then             refcount table
//! ```
//!
//! Memory does not grow with the image's size beyond the dedup index (≤ 24 bytes
//! per stored copy), the refcounts (2 bits per host cluster, plus a map entry per
//! cluster referenced 3 or more times) and the L1 table (8 bytes per L2 table).
//!
//! Refcounts are exact (the number of L2 entries referencing each host cluster,
//! +1 per touched cluster per compressed reference) and `QCOW_OFLAG_COPIED` is set
//! iff the refcount is 1, so `qemu-img check` finds the output clean.

pub mod batch;
mod output;
mod refcounts;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::compress::CompressFn;
use crate::dedup::{is_zero, DedupIndex, Hash, Target};
use crate::error::{Error, IoContext, Result};
use crate::format::compressed::CompressedDescriptor;
use crate::format::extensions::{
    self, QCOW2_EXT_MAGIC_BACKING_FORMAT, QCOW2_EXT_MAGIC_FEATURE_TABLE,
};
use crate::format::header::{
    self, CompressionType, Header, MAX_BACKING_FILE_NAME, MAX_HOST_OFFSET, MAX_L1_BYTES,
    MAX_REFTABLE_BYTES, QCOW2_INCOMPAT_COMPRESSION, V2_HEADER_LENGTH,
};
use crate::format::l1l2::{L1Entry, L2Entry};
use crate::format::refcount;
use crate::io::WriteAt;
use batch::{Batch, Kind, Stream};
use output::{Output, Sink};
use refcounts::HostRefcounts;

/// COPIED fixes gathered before they are written (16 bytes each).
const COPIED_FIXES: usize = 4096;

/// A shareable copy as the dedup index holds it ([`Target`]): a compressed
/// stream's L2 entry (`QCOW_OFLAG_COMPRESSED` set), or a plain host cluster's
/// offset with, in its low `cluster_bits` bits (zero in an offset), the L2 slot
/// of the guest cluster that first referenced it.
enum Copy {
    Plain { host: u64, slot: u64 },
    Compressed(CompressedDescriptor),
}

impl Copy {
    fn decode(t: Target, cluster_bits: u32) -> Self {
        match L2Entry::decode(t, cluster_bits, false) {
            L2Entry::Compressed { desc, .. } => Copy::Compressed(desc),
            _ => Copy::Plain {
                host: t >> cluster_bits,
                slot: t & ((1 << cluster_bits) - 1),
            },
        }
    }
}

/// What the writer gets for one guest cluster.
#[derive(Debug, Clone, Copy)]
pub enum ClusterIn<'a> {
    /// Reads as zeros: left unallocated.
    Zero,
    /// Reads as zeros over a backing file whose data is not zero there: a
    /// zero-flag entry (version 3 only; a version 2 writer refuses it).
    ZeroFlag,
    /// Data to store (or share), with its hash and, when compression is on and
    /// a worker compressed it, the compressed stream.
    Data {
        /// BLAKE3 hash of `data`.
        hash: Hash,
        /// The cluster's bytes (cluster size).
        data: &'a [u8],
        /// What compression made of it.
        stream: Stream<&'a [u8]>,
    },
}

/// Counters the writer keeps for the report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Guest clusters left unallocated because they read as zeros.
    pub zero_clusters: u64,
    /// Guest clusters stored as a new host copy (first occurrence of a content).
    pub unique_clusters: u64,
    /// Guest clusters that share an existing host copy.
    pub duplicate_clusters: u64,
    /// New copies written because the existing copy's refcount was at its maximum.
    pub saturation_copies: u64,
    /// Guest clusters stored compressed (new streams, not shared references).
    pub compressed_clusters: u64,
    /// Guest clusters whose L2 entry refers to a compressed stream (new streams
    /// and references sharing one).
    pub compressed_references: u64,
    /// Bytes of the compressed streams written.
    pub compressed_bytes: u64,
    /// Host data clusters in the output (plain and those holding streams).
    pub host_data_clusters: u64,
    /// Metadata clusters (header, L1, L2, refcount structures).
    pub metadata_clusters: u64,
    /// Length of the output file.
    pub file_size: u64,
    /// Largest refcount of any data cluster.
    pub max_refcount: u64,
    /// Byte offset just past the data area: the end of the last compressed stream
    /// when it ends inside the last data cluster, else the end of that cluster.
    pub data_end: u64,
    /// Compressions the incompressibility probe skipped (the writer's and the
    /// pipeline workers' together: they share one compressor).
    pub probe_skipped: u64,
    /// Guest clusters written as zero-flag entries ([`ClusterIn::ZeroFlag`]).
    pub zero_flag_clusters: u64,
    /// With [`WriterBuilder::verify`]: index matches whose bytes differed (a
    /// fingerprint collision); each got its own copy.
    pub verify_mismatches: u64,
}

/// Where the metadata goes, in clusters: after the data (`data_end`) come the
/// `l2_tables` L2 tables, the L1 table, the refcount blocks and the refcount
/// table. The writer places its L2 tables among the data and calls this with
/// them counted in `data_end` and `l2_tables` 0; the total is the same either
/// way. The one home of this arithmetic (`estimate` predicts sizes with it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataLayout {
    /// Clusters of the L1 table (0 for an empty disk).
    pub l1_clusters: u64,
    /// First L2 table.
    pub l2_start: u64,
    /// First cluster of the L1 table.
    pub l1_start: u64,
    /// First refcount block.
    pub refblocks_start: u64,
    /// Number of refcount blocks.
    pub refblocks: u64,
    /// First cluster of the refcount table.
    pub reftable_start: u64,
    /// Clusters of the refcount table.
    pub reftable_clusters: u64,
    /// Clusters in the whole file.
    pub total_clusters: u64,
}

impl MetadataLayout {
    /// The layout of an image of `virtual_size` bytes whose header and data take
    /// clusters `0..data_end`, with `l2_tables` L2 tables. The refcount structures
    /// count themselves (a fixpoint). See [`MetadataLayout::check`] for the limits.
    pub fn compute(
        cluster_bits: u32,
        refcount_order: u32,
        virtual_size: u64,
        data_end: u64,
        l2_tables: u64,
    ) -> Self {
        let cs = 1u64 << cluster_bits;
        let l1_size = virtual_size.div_ceil(cs).div_ceil(cs / 8);
        let l1_clusters = (l1_size * 8).div_ceil(cs);
        let epb = refcount::entries_per_block(cluster_bits, refcount_order);
        let base = data_end + l2_tables + l1_clusters;
        let (mut rb, mut rt) = (0u64, 0u64);
        loop {
            let nrb = (base + rb + rt).div_ceil(epb);
            let nrt = (nrb * 8).div_ceil(cs).max(1);
            if (nrb, nrt) == (rb, rt) {
                break;
            }
            (rb, rt) = (nrb, nrt);
        }
        let l2_start = data_end;
        let l1_start = l2_start + l2_tables;
        let refblocks_start = l1_start + l1_clusters;
        let reftable_start = refblocks_start + rb;
        let total_clusters = reftable_start + rt;
        MetadataLayout {
            l1_clusters,
            l2_start,
            l1_start,
            refblocks_start,
            refblocks: rb,
            reftable_start,
            reftable_clusters: rt,
            total_clusters,
        }
    }

    /// Fails where the layout exceeds QEMU's refcount table limit or 2^56 bytes.
    pub fn check(&self, cluster_bits: u32) -> Result<()> {
        if self.reftable_clusters << cluster_bits > MAX_REFTABLE_BYTES {
            return Err(Error::LimitExceeded(
                "the refcount table would exceed QEMU's 8 MiB limit; use a larger cluster_size or fewer refcount_bits".into(),
            ));
        }
        if self.total_clusters << cluster_bits > MAX_HOST_OFFSET {
            return Err(Error::LimitExceeded(
                "output image larger than 2^56 bytes".into(),
            ));
        }
        Ok(())
    }
}

/// The settings of a new image. Defaults: 64 KiB clusters, 16-bit refcounts,
/// deduplication on, no compression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriterBuilder {
    virtual_size: u64,
    cluster_size: u64,
    refcount_bits: u32,
    compression: Option<CompressionType>,
    compression_level: Option<i32>,
    compress_probe: bool,
    dedup: bool,
    version: u32,
    backing: Option<BackingName>,
    verify: bool,
}

/// The backing file an overlay names in its header: the name as stored, and the
/// format for the backing-format extension (`None`: none written, QEMU probes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingName {
    /// The name, stored as given (QEMU resolves a relative one against the
    /// overlay's directory).
    pub name: Vec<u8>,
    /// `raw` or `qcow2`.
    pub format: Option<String>,
}

impl WriterBuilder {
    /// An image of `virtual_size` bytes, rounded up to a multiple of 512 (QEMU
    /// counts disks in 512-byte sectors and ignores a partial last sector).
    pub fn new(virtual_size: u64) -> Self {
        WriterBuilder {
            virtual_size,
            cluster_size: 1 << 16,
            refcount_bits: 16,
            compression: None,
            compression_level: None,
            compress_probe: true,
            dedup: true,
            version: 3,
            backing: None,
            verify: false,
        }
    }

    /// qcow2 version: 3 (default) or 2 (`compat=0.10`: 16-bit refcounts, zlib
    /// only, no zero flag, a 72-byte header).
    #[must_use]
    pub fn version(mut self, version: u32) -> Self {
        self.version = version;
        self
    }

    /// Makes the image an overlay on this backing file (clusters never given
    /// read from it).
    #[must_use]
    pub fn backing(mut self, backing: Option<BackingName>) -> Self {
        self.backing = backing;
        self
    }

    /// Cluster size in bytes: a power of two from 512 B to 2 MiB.
    #[must_use]
    pub fn cluster_size(mut self, bytes: u64) -> Self {
        self.cluster_size = bytes;
        self
    }

    /// Refcount width in bits: 1, 2, 4, 8, 16, 32 or 64. Narrow refcounts
    /// saturate sooner; a content shared more often gets a new copy.
    #[must_use]
    pub fn refcount_bits(mut self, bits: u32) -> Self {
        self.refcount_bits = bits;
        self
    }

    /// Compress clusters with this codec (`None`: store them plainly). A stream
    /// is stored only where it saves space.
    #[must_use]
    pub fn compression(mut self, codec: Option<CompressionType>) -> Self {
        self.compression = codec;
        self
    }

    /// The codec's level (`None`: QEMU's defaults, zlib 6 and zstd 3).
    #[must_use]
    pub fn compression_level(mut self, level: Option<i32>) -> Self {
        self.compression_level = level;
        self
    }

    /// Skip deflate on clusters that look incompressible (default on; zstd
    /// needs no probe).
    #[must_use]
    pub fn compress_probe(mut self, on: bool) -> Self {
        self.compress_probe = on;
        self
    }

    /// Share identical clusters (default on).
    #[must_use]
    pub fn dedup(mut self, on: bool) -> Self {
        self.dedup = on;
        self
    }

    /// Before sharing a copy the index found, read it back from the output and
    /// compare bytes (decompressing a compressed copy), like ZFS's
    /// `dedup=verify` (default off: a match is trusted on 96 bits of BLAKE3,
    /// docs/format.md). A mismatch gets its own copy. The output must be readable
    /// ([`WriteAt::read_back`]).
    #[must_use]
    pub fn verify(mut self, on: bool) -> Self {
        self.verify = on;
        self
    }

    /// Checks the settings and creates the writer over `out`, a fresh, empty file.
    pub fn create<'a>(&self, out: &'a dyn WriteAt) -> Result<ImageWriter<'a>> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two() || !(512..=2 << 20).contains(&cs) {
            return Err(Error::InvalidArgument(format!(
                "cluster size {cs} is not a power of two from 512 to 2097152"
            )));
        }
        let rb = self.refcount_bits;
        if !rb.is_power_of_two() || rb > 64 {
            return Err(Error::InvalidArgument(format!(
                "refcount width {rb} is not a power of two from 1 to 64"
            )));
        }
        let cluster_bits = cs.trailing_zeros();
        match self.version {
            3 => {}
            2 if rb == 16 && self.compression != Some(CompressionType::Zstd) => {}
            2 => {
                return Err(Error::InvalidArgument(
                    "qcow2 version 2 has 16-bit refcounts and zlib compression only".into(),
                ))
            }
            v => {
                return Err(Error::InvalidArgument(format!(
                    "qcow2 version {v} (2 or 3 can be written)"
                )))
            }
        }
        let virtual_size = self
            .virtual_size
            .checked_next_multiple_of(512)
            .ok_or_else(|| {
                Error::InvalidArgument(format!("virtual size {} is too large", self.virtual_size))
            })?;
        let skipped = Arc::new(AtomicU64::new(0));
        let compressor = self.compression.map(|c| {
            crate::compress::compressor(
                c,
                self.compression_level,
                cs as usize,
                self.compress_probe,
                Arc::clone(&skipped),
            )
        });
        let mut w = ImageWriter::new(
            out,
            virtual_size,
            cluster_bits,
            rb.trailing_zeros(),
            self.dedup,
            self.compression,
            compressor,
            skipped,
        )?;
        w.version = self.version;
        w.backing.clone_from(&self.backing);
        // Fails now, before any data is written, if the backing name does not
        // fit in cluster 0.
        w.header_cluster(&Header::new_v3(cluster_bits, 4, 0))?;
        w.verify = self.verify;
        Ok(w)
    }
}

/// The writer of one new image (see the module documentation).
pub struct ImageWriter<'a> {
    out: &'a dyn WriteAt,
    cluster_bits: u32,
    refcount_order: u32,
    virtual_size: u64,
    compression: Option<CompressionType>,
    /// Compresses clusters no worker compressed (the streaming API's clusters, a
    /// saturated compressed copy, a content whose first occurrence another batch
    /// claimed); the pipeline's workers use the same function.
    compressor: Option<Arc<CompressFn>>,
    probe_skipped: Arc<AtomicU64>,
    dedup: bool,
    /// Compare bytes before sharing (see [`WriterBuilder::verify`]).
    verify: bool,
    max_ref: u64,
    index: DedupIndex,
    /// Refcount of each host cluster; index 0 is the header.
    refcounts: HostRefcounts,
    /// The L1 index of the L2 table being filled, if any (clusters come in
    /// guest order: once the writer passes a table's range, it is written).
    l2_cur: Option<u64>,
    /// Its entries (raw, COPIED not yet set).
    l2_table: Vec<u64>,
    /// The L1 table: the L2 tables written so far (entries with COPIED).
    l1: Vec<u64>,
    /// L2 tables written.
    l2_written: u64,
    /// Host clusters below this one may be referenced from a written L2 table.
    l2_watermark: u64,
    /// Host cluster of each L2 table written, in order (increasing).
    l2_hosts: Vec<u64>,
    /// Entries of written tables whose cluster a later duplicate shared (refcount
    /// 1 → 2): (byte offset of the entry, host cluster); COPIED is cleared there.
    copied_fixes: Vec<(u64, u64)>,
    l2_entries: u64,
    l1_size: u64,
    next_cluster: u64,
    /// The next guest cluster the writer expects (clusters come in guest order).
    next_guest: u64,
    /// Clusters given to the streaming API, not yet processed.
    pending: Batch,
    /// Where the next compressed stream may start, inside the last allocated cluster.
    ctail: Option<u64>,
    /// Where the writes go: done at once, or by an I/O thread ([`output`]).
    sink: Sink<'a>,
    /// The batch being placed travels with its writes to the I/O thread
    /// ([`ImageWriter::accept_owned`]): its ranges need no copy.
    owned_batch: bool,
    /// End of the furthest byte handed to `push_bytes`.
    bytes_end: u64,
    run: Option<(u64, std::ops::Range<usize>)>,
    stats: WriterStats,
    /// qcow2 version written (2 or 3).
    version: u32,
    /// The backing file named in the header, if any.
    backing: Option<BackingName>,
}

impl std::fmt::Debug for ImageWriter<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageWriter")
            .field("cluster_bits", &self.cluster_bits)
            .field("virtual_size", &self.virtual_size)
            .field("next_guest", &self.next_guest)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl<'a> ImageWriter<'a> {
    #[allow(clippy::too_many_arguments)] // private; the builder is the interface
    fn new(
        out: &'a dyn WriteAt,
        virtual_size: u64,
        cluster_bits: u32,
        refcount_order: u32,
        dedup: bool,
        compression: Option<CompressionType>,
        compressor: Option<Arc<CompressFn>>,
        probe_skipped: Arc<AtomicU64>,
    ) -> Result<Self> {
        let cs = 1u64 << cluster_bits;
        let l2_entries = cs / 8;
        let l1_size = virtual_size.div_ceil(cs).div_ceil(l2_entries);
        if l1_size * 8 > MAX_L1_BYTES {
            return Err(Error::LimitExceeded(format!(
                "virtual size {virtual_size} needs an L1 table of {l1_size} entries, more than QEMU's 32 MiB limit; use a larger cluster_size"
            )));
        }
        Ok(ImageWriter {
            out,
            cluster_bits,
            refcount_order,
            virtual_size,
            compression,
            compressor,
            probe_skipped,
            dedup,
            verify: false,
            max_ref: refcount::max_refcount(refcount_order).min(u64::from(u32::MAX)),
            index: DedupIndex::new(),
            refcounts: {
                let mut r = HostRefcounts::default();
                r.extend_to(1);
                r.set(0, 1);
                r
            },
            l2_cur: None,
            l2_table: Vec::new(),
            // Zeros from the allocator: untouched pages take no memory.
            l1: vec![0; l1_size as usize],
            l2_written: 0,
            l2_watermark: 0,
            l2_hosts: Vec::new(),
            copied_fixes: Vec::new(),
            l2_entries,
            l1_size,
            next_cluster: 1,
            next_guest: 0,
            pending: Batch::default(),
            ctail: None,
            sink: Sink::Direct(Output::new(out)),
            owned_batch: false,
            bytes_end: 0,
            run: None,
            stats: WriterStats::default(),
            version: 3,
            backing: None,
        })
    }

    /// The compressor, for workers that compress ahead of the writer (the same
    /// function the writer uses; `None` without compression).
    pub fn compressor(&self) -> Option<Arc<CompressFn>> {
        self.compressor.clone()
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.cs()
    }

    /// Guest clusters of the disk.
    pub fn total_clusters(&self) -> u64 {
        self.virtual_size.div_ceil(self.cs())
    }

    /// Guest byte offset of the next cluster the writer takes.
    pub fn position(&self) -> u64 {
        ((self.next_guest + self.pending.kinds.len() as u64) << self.cluster_bits)
            .min(self.virtual_size)
    }

    /// Takes the next guest cluster: `data` is one cluster, or for the last
    /// cluster of a disk whose size is not a multiple of the cluster size, any
    /// shorter piece of it (the rest reads as zeros).
    pub fn write_cluster(&mut self, data: &[u8]) -> Result<()> {
        let cs = self.cs() as usize;
        let g = self.next_guest + self.pending.kinds.len() as u64;
        if g >= self.total_clusters() {
            return Err(Error::InvalidArgument(format!(
                "cluster {g} is past the end of the {}-byte disk",
                self.virtual_size
            )));
        }
        let last = g + 1 == self.total_clusters();
        let room = (self.virtual_size - (g << self.cluster_bits)).min(cs as u64) as usize;
        if data.len() != cs && !(last && data.len() <= room) {
            return Err(Error::InvalidArgument(format!(
                "cluster {g} has {} bytes; clusters are {cs} bytes",
                data.len()
            )));
        }
        if self.pending.kinds.is_empty() {
            self.pending.first_cluster = g;
            self.pending.data.clear();
        }
        self.pending.data.extend_from_slice(data);
        self.pending
            .data
            .resize(self.pending.kinds.len() * cs + cs, 0);
        self.pending.kinds.push(Kind::Unprocessed);
        if self.pending.data.len() >= batch::BATCH_BYTES {
            self.flush_pending()?;
        }
        Ok(())
    }

    /// Takes the next `n` guest clusters as zeros (left unallocated: they read as
    /// zeros, or through a backing file's zeros).
    pub fn write_zero_clusters(&mut self, n: u64) -> Result<()> {
        self.flush_pending()?;
        let end = self
            .next_guest
            .checked_add(n)
            .filter(|e| *e <= self.total_clusters());
        let Some(end) = end else {
            return Err(Error::InvalidArgument(format!(
                "{n} zero clusters from cluster {} run past the end of the {}-byte disk",
                self.next_guest, self.virtual_size
            )));
        };
        self.stats.zero_clusters += n;
        self.next_guest = end;
        Ok(())
    }

    /// Hashes, compresses and places the clusters of the streaming API.
    fn flush_pending(&mut self) -> Result<()> {
        if self.pending.kinds.is_empty() {
            return Ok(());
        }
        let mut b = std::mem::take(&mut self.pending);
        let cs = self.cs() as usize;
        batch::process(&mut b, cs, self.compressor.as_deref(), None);
        let r = self.accept_batch(&b);
        b.kinds.clear();
        self.pending = b;
        r
    }

    /// Takes a batch the conversion pipeline processed: consecutive guest
    /// clusters from `b.first_cluster`, which must not precede clusters taken
    /// before.
    pub fn accept_batch(&mut self, b: &Batch) -> Result<()> {
        let cs = self.cs() as usize;
        let end = b.first_cluster.checked_add(b.kinds.len() as u64);
        if b.first_cluster < self.next_guest || end.is_none_or(|e| e > self.total_clusters()) {
            return Err(Error::InvalidArgument(format!(
                "batch of {} clusters at cluster {} is out of guest order or past the disk's end",
                b.kinds.len(),
                b.first_cluster
            )));
        }
        self.accept(b.first_cluster, &b.data, b.clusters(cs))?;
        self.next_guest = b.first_cluster + b.kinds.len() as u64;
        Ok(())
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Moves the data writes to an I/O thread spawned in `scope` (module
    /// [`output`]): from now on the writer only places clusters, and
    /// [`ImageWriter::accept_owned`] hands each batch, with the writes that
    /// point into it, to that thread. The caller must call
    /// [`ImageWriter::stop_io_thread`] before `scope` ends (the scope waits for
    /// the thread, which runs until then). With `verify` (which reads back what
    /// was written) the writes stay on this thread.
    ///
    /// `direct`: the I/O thread writes whole aligned 4 KiB blocks through the
    /// output's direct-I/O descriptor ([`WriteAt::open_direct`]) instead of the
    /// page cache; everything else (and everything after
    /// [`ImageWriter::stop_io_thread`]) stays buffered. The same bytes either way.
    pub(crate) fn start_io_thread<'s>(
        &mut self,
        scope: &'s std::thread::Scope<'s, '_>,
        direct: bool,
    ) where
        'a: 's,
    {
        if !self.verify {
            let d = if direct { self.out.open_direct() } else { None };
            self.sink.start(scope, d);
        }
    }

    /// [`ImageWriter::accept_batch`] for a batch the caller gives away: once its
    /// writes are done (on the I/O thread, if one runs) it goes back through
    /// `recycle`. Returns the I/O thread's error if it failed on an earlier batch.
    pub(crate) fn accept_owned(
        &mut self,
        b: Batch,
        recycle: &crossbeam_channel::Sender<Batch>,
    ) -> Result<()> {
        if let Some(e) = self.sink.io_error() {
            return Err(e);
        }
        self.owned_batch = true;
        let r = self.accept_batch(&b);
        self.owned_batch = false;
        // Sent even after an error: the I/O thread hands the buffer back.
        let sent = self.sink.send_batch(b, recycle);
        r.and(sent)
    }

    /// Waits until the I/O thread has done every write and takes the output back
    /// (writes are done on this thread again); returns the I/O thread's CPU time
    /// (nanoseconds, `None` without a thread or a clock), or its error.
    pub(crate) fn stop_io_thread(&mut self) -> Result<Option<u64>> {
        self.sink.stop()
    }

    /// Bytes of data written with direct I/O (`O_DIRECT`; 0 where the file
    /// system refused it or it was not asked for), once the I/O thread has
    /// stopped.
    pub fn direct_io_bytes(&self) -> u64 {
        self.sink.direct_bytes()
    }

    /// Write-behind, for an output that will be synced at the end: while the
    /// data goes through the page cache, the writeback of what is written is
    /// started as the writes go on and the pages already on the device are let
    /// go ([`WriteAt::start_writeback`]), so the final sync has little left to
    /// wait for. Call before [`ImageWriter::start_io_thread`].
    pub(crate) fn set_write_behind(&mut self, on: bool) {
        if let Some(o) = self.sink.direct() {
            o.write_behind = on;
        }
    }

    /// Bytes whose writeback write-behind started, once the I/O thread has
    /// stopped.
    pub fn write_behind_bytes(&self) -> u64 {
        self.sink.write_behind_bytes()
    }

    /// Counters so far.
    pub fn stats(&self) -> WriterStats {
        self.stats
    }

    /// Bytes of heap the dedup index holds.
    pub fn index_heap_bytes(&self) -> usize {
        self.index.heap_bytes()
    }

    /// Takes a batch of consecutive guest clusters starting at `first_cluster`.
    /// `data` holds the batch's bytes (the clusters' `data` slices point into it).
    /// Callers check the range (`accept_batch`).
    pub(crate) fn accept<'b>(
        &mut self,
        first_cluster: u64,
        data: &[u8],
        clusters: impl IntoIterator<Item = ClusterIn<'b>>,
    ) -> Result<()> {
        for (i, c) in clusters.into_iter().enumerate() {
            let guest = first_cluster + i as u64;
            match c {
                ClusterIn::Zero => self.stats.zero_clusters += 1,
                ClusterIn::ZeroFlag => {
                    if self.version < 3 {
                        return Err(Error::InvalidArgument(
                            "a zero-flag cluster in a version 2 image (v2 has no zero flag)".into(),
                        ));
                    }
                    self.stats.zero_flag_clusters += 1;
                    // Its L2 table is the current one, as for data.
                    self.enter_l2(guest)?;
                    self.set_l2(guest, L2Entry::ZeroPlain.encode(self.cluster_bits));
                }
                ClusterIn::Data {
                    hash,
                    data: cdata,
                    stream,
                } => {
                    self.enter_l2(guest)?;
                    let slot = guest % self.l2_entries;
                    let entry = self.place(hash, cdata, stream, data, i, slot)?;
                    self.set_l2(guest, entry);
                }
            }
        }
        self.flush_run(data)?;
        Ok(())
    }

    /// Finds or makes the host copy of one cluster and returns its L2 entry.
    fn place(
        &mut self,
        hash: Hash,
        cdata: &[u8],
        stream: Stream<&[u8]>,
        batch: &[u8],
        i: usize,
        slot: u64,
    ) -> Result<u64> {
        if self.dedup {
            let found = match self.index.lookup(&hash) {
                Some(t) if self.verify && !self.same_bytes(t, cdata, batch)? => {
                    self.stats.verify_mismatches += 1;
                    None
                }
                found => found,
            };
            match found.map(|t| Copy::decode(t, self.cluster_bits)) {
                Some(Copy::Plain {
                    host: h,
                    slot: first,
                }) => {
                    if self.refcounts.get(h) < self.max_ref {
                        if self.refcounts.add(h) == 1 && h < self.l2_watermark {
                            self.clear_copied(h, first)?;
                        }
                        self.stats.duplicate_clusters += 1;
                        return Ok(h << self.cluster_bits);
                    }
                    self.stats.saturation_copies += 1;
                }
                Some(Copy::Compressed(desc)) => {
                    let (a, b) = desc.clusters(self.cluster_bits);
                    if (a..=b).all(|c| self.refcounts.get(c) < self.max_ref) {
                        for c in a..=b {
                            self.refcounts.add(c);
                        }
                        self.stats.duplicate_clusters += 1;
                        self.stats.compressed_references += 1;
                        return Ok(L2Entry::Compressed {
                            desc,
                            copied: false,
                        }
                        .encode(self.cluster_bits));
                    }
                    self.stats.saturation_copies += 1;
                }
                None => {}
            }
        }
        self.stats.unique_clusters += 1;
        // A new copy: compressed if a stream that saves space exists.
        let owned;
        let stream = match (stream, &self.compressor) {
            (Stream::Some(s), _) => Some(s),
            // No worker compressed this content (another batch claimed it first,
            // or this is a new copy after saturation): compress here.
            (Stream::NotTried, Some(f)) => {
                owned = f(cdata);
                owned.as_deref()
            }
            _ => None,
        };
        if let Some(s) = stream {
            let (entry, target) = self.place_stream(s, batch)?;
            if self.dedup {
                self.index.insert(hash, target);
            }
            return Ok(entry);
        }
        let h = self.alloc_clusters(1)?;
        self.refcounts.set(h, 1);
        self.push_run(h, i, batch)?;
        if self.dedup {
            // The slot of this first reference rides in the offset's low bits.
            self.index.insert(hash, (h << self.cluster_bits) | slot);
        }
        Ok(h << self.cluster_bits)
    }

    fn alloc_clusters(&mut self, n: u64) -> Result<u64> {
        let h = self.next_cluster;
        self.next_cluster += n;
        if self.next_cluster << self.cluster_bits > MAX_HOST_OFFSET {
            return Err(Error::LimitExceeded(
                "output image larger than 2^56 bytes".into(),
            ));
        }
        self.refcounts.extend_to(self.next_cluster);
        self.stats.host_data_clusters += n;
        Ok(h)
    }

    /// Byte-packs a compressed stream like QEMU's `qcow2_alloc_bytes`: after the
    /// previous stream if it fits in that cluster, or spilling into the next
    /// cluster when that is the end of the file; else at a fresh cluster.
    fn place_stream(&mut self, s: &[u8], batch: &[u8]) -> Result<(u64, Target)> {
        let cs = self.cs();
        let len = s.len() as u64;
        // The cluster holding the tail may already be at the maximum refcount
        // through references to earlier streams: then start a fresh cluster.
        if let Some(t) = self.ctail {
            if self.refcounts.get(t >> self.cluster_bits) >= self.max_ref {
                self.ctail = None;
            }
        }
        let off = match self.ctail {
            Some(t) if t + len <= (t | (cs - 1)) + 1 => t,
            Some(t) if (t >> self.cluster_bits) + 1 == self.next_cluster => {
                let end = t + len;
                let need = end.div_ceil(cs) - self.next_cluster;
                self.alloc_clusters(need)?;
                t
            }
            _ => {
                let n = len.div_ceil(cs);
                self.alloc_clusters(n)? << self.cluster_bits
            }
        };
        let end = off + len;
        self.ctail = (end % cs != 0).then_some(end);
        let desc =
            CompressedDescriptor::for_stream(off, len, self.cluster_bits).ok_or_else(|| {
                Error::LimitExceeded(
                    "compressed stream offset beyond the descriptor's range".into(),
                )
            })?;
        let (a, b) = desc.clusters(self.cluster_bits);
        for c in a..=b {
            self.refcounts.add(c);
        }
        self.stats.compressed_clusters += 1;
        self.stats.compressed_references += 1;
        self.stats.compressed_bytes += len;
        self.flush_run(batch)?;
        self.push_bytes(s, off)?;
        let entry = L2Entry::Compressed {
            desc,
            copied: false,
        }
        .encode(self.cluster_bits);
        Ok((entry, entry))
    }

    /// Whether the copy at `target` (an L2 entry) holds `data`: read back from
    /// the output after writing out what is still buffered, decompressed where
    /// compressed.
    fn same_bytes(&mut self, target: Target, data: &[u8], batch: &[u8]) -> Result<bool> {
        let cb = self.cluster_bits;
        self.flush_run(batch)?;
        self.flush_wbuf()?;
        let read = |buf: &mut [u8], off: u64| {
            self.out
                .read_back(buf, off)
                .ctx(|| format!("cannot read back the output at offset {off:#x} (--verify)"))
        };
        let mut got = vec![0u8; self.cs() as usize];
        match Copy::decode(target, cb) {
            Copy::Plain { host, .. } => read(&mut got, host << cb)?,
            Copy::Compressed(desc) => {
                // The descriptor's sector range may run past the end of what is
                // written (the last stream's sector padding): read what there is.
                let end = self.bytes_end;
                let len = desc.read_len().min(end.saturating_sub(desc.host_offset));
                let mut stream = vec![0u8; len as usize];
                read(&mut stream, desc.host_offset)?;
                let codec = self.compression.unwrap_or(CompressionType::Zlib);
                if crate::compress::decompress(codec, &stream, &mut got).is_err() {
                    return Ok(false);
                }
            }
        }
        // The last cluster of a disk may be shorter: the rest reads as zeros.
        Ok(got.get(..data.len()) == Some(data) && is_zero(&got[data.len()..]))
    }

    /// Extends the pending run of plain clusters written straight from the batch.
    fn push_run(&mut self, host: u64, i: usize, batch: &[u8]) -> Result<()> {
        let cs = self.cs() as usize;
        if let Some((h0, r)) = &mut self.run {
            if r.end == i * cs && *h0 + (r.len() / cs) as u64 == host {
                r.end += cs;
                return Ok(());
            }
        }
        self.flush_run(batch)?;
        self.run = Some((host, i * cs..(i + 1) * cs));
        Ok(())
    }

    fn flush_run(&mut self, batch: &[u8]) -> Result<()> {
        if let Some((h, r)) = self.run.take() {
            let off = h << self.cluster_bits;
            self.bytes_end = self.bytes_end.max(off + r.len() as u64);
            self.sink.batch_range(batch, r, off, self.owned_batch)?;
        }
        Ok(())
    }

    /// Writes `bytes` at `off`, gathered with adjacent small writes.
    fn push_bytes(&mut self, bytes: &[u8], off: u64) -> Result<()> {
        self.bytes_end = self.bytes_end.max(off + bytes.len() as u64);
        self.sink.bytes(bytes, off, true)
    }

    /// Writes out what is gathered (writes done at once only: `--verify` runs
    /// without an I/O thread).
    fn flush_wbuf(&mut self) -> Result<()> {
        match self.sink.direct() {
            Some(o) => o.flush(),
            None => Ok(()),
        }
    }

    /// Writes `bytes` at `off` on their own (metadata).
    fn write(&mut self, bytes: &[u8], off: u64) -> Result<()> {
        self.sink.bytes(bytes, off, false)
    }

    fn set_l2(&mut self, guest_cluster: u64, entry: u64) {
        let l2i = (guest_cluster % self.l2_entries) as usize;
        self.l2_table[l2i] = entry;
    }

    /// Makes the L2 table of `guest_cluster` the current one, writing the
    /// previous one out first (the writer is past its range).
    fn enter_l2(&mut self, guest_cluster: u64) -> Result<()> {
        let l1i = guest_cluster / self.l2_entries;
        if self.l2_cur != Some(l1i) {
            self.write_l2()?;
            self.l2_cur = Some(l1i);
            self.l2_table.resize(self.l2_entries as usize, 0);
        }
        Ok(())
    }

    /// Writes the current L2 table into the next host cluster, COPIED set where
    /// the refcount is 1 now (a later share is fixed by `finish`).
    fn write_l2(&mut self) -> Result<()> {
        let Some(l1i) = self.l2_cur.take() else {
            return Ok(());
        };
        let cb = self.cluster_bits;
        let h = self.alloc_clusters(1)?;
        self.stats.host_data_clusters -= 1;
        self.refcounts.set(h, 1);
        let mut table = vec![0u8; self.cs() as usize];
        for (slot, e) in table.chunks_exact_mut(8).zip(self.l2_table.iter_mut()) {
            let raw = match L2Entry::decode(*e, cb, false) {
                L2Entry::Normal { offset, .. } => L2Entry::Normal {
                    offset,
                    copied: self.refcounts.get(offset >> cb) == 1,
                }
                .encode(cb),
                _ => *e,
            };
            slot.copy_from_slice(&raw.to_be_bytes());
            *e = 0;
        }
        // Written on its own (not gathered with the data): one write per table.
        self.write(&table, h << cb)?;
        self.l1[l1i as usize] = L1Entry {
            l2_offset: h << cb,
            copied: true,
        }
        .encode();
        self.l2_written += 1;
        self.l2_hosts.push(h);
        self.l2_watermark = self.next_cluster;
        Ok(())
    }

    /// Notes that host cluster `h`, first referenced from slot `slot` of an L2
    /// table already written, is now shared: COPIED is cleared there (in
    /// batches of [`COPIED_FIXES`] 8-byte writes, and at the end).
    fn clear_copied(&mut self, h: u64, slot: u64) -> Result<()> {
        // The table written first after `h` was allocated holds its first
        // reference (tables are written in guest order, data before them).
        let k = self.l2_hosts.partition_point(|&t| t < h);
        let table = self.l2_hosts[k];
        self.copied_fixes
            .push(((table << self.cluster_bits) + slot * 8, h));
        if self.copied_fixes.len() >= COPIED_FIXES {
            self.apply_copied_fixes()?;
        }
        Ok(())
    }

    fn apply_copied_fixes(&mut self) -> Result<()> {
        let mut fixes = std::mem::take(&mut self.copied_fixes);
        fixes.sort_unstable();
        for &(at, h) in &fixes {
            let e = L2Entry::Normal {
                offset: h << self.cluster_bits,
                copied: false,
            };
            self.write(&e.encode(self.cluster_bits).to_be_bytes(), at)?;
        }
        fixes.clear();
        self.copied_fixes = fixes;
        Ok(())
    }

    /// Cluster 0 for the header `h` (a v3 header; turned into a v2 one for a
    /// version 2 image): the header, the backing-format extension, QEMU's feature
    /// name table (v3, where it fits), the end marker, and the backing file name,
    /// in QEMU's order. Fails where the backing name does not fit in the cluster.
    fn header_cluster(&self, h: &Header) -> Result<Vec<u8>> {
        let cs = self.cs() as usize;
        let mut h = h.clone();
        if self.version == 2 {
            h.version = 2;
            h.header_length = V2_HEADER_LENGTH;
            h.refcount_order = 4;
        }
        let mut cluster0 = vec![0u8; Header::ENCODED_LEN];
        h.encode(&mut cluster0);
        cluster0.truncate(h.header_length as usize);
        let mut exts = Vec::new();
        if let Some(f) = self.backing.as_ref().and_then(|b| b.format.as_ref()) {
            extensions::encode(QCOW2_EXT_MAGIC_BACKING_FORMAT, f.as_bytes(), &mut exts);
        }
        let mut table = Vec::new();
        if self.version >= 3 {
            extensions::encode(
                QCOW2_EXT_MAGIC_FEATURE_TABLE,
                &extensions::encode_feature_names(&extensions::qemu_feature_names()),
                &mut table,
            );
        }
        let name: &[u8] = self.backing.as_ref().map_or(&[], |b| &b.name);
        if name.len() > MAX_BACKING_FILE_NAME as usize {
            return Err(Error::InvalidArgument(format!(
                "backing file name of {} bytes: QEMU takes at most {MAX_BACKING_FILE_NAME}",
                name.len()
            )));
        }
        let fixed = cluster0.len() + exts.len() + 8 + name.len();
        if fixed + table.len() <= cs {
            exts.extend_from_slice(&table);
        } else if fixed > cs {
            return Err(Error::LimitExceeded(format!(
                "the backing file name ({} bytes) does not fit in the header cluster of \
                 {cs} bytes; use a shorter name or a larger cluster_size",
                name.len()
            )));
        }
        cluster0.extend_from_slice(&exts);
        cluster0.extend_from_slice(&[0u8; 8]); // end of the extensions
        if !name.is_empty() {
            let at = cluster0.len();
            cluster0.extend_from_slice(name);
            // Both fields sit at fixed offsets of the header (v2 and v3).
            cluster0[header::off::BACKING_FILE_OFFSET..header::off::BACKING_FILE_OFFSET + 8]
                .copy_from_slice(&(at as u64).to_be_bytes());
            cluster0[header::off::BACKING_FILE_SIZE..header::off::BACKING_FILE_SIZE + 4]
                .copy_from_slice(&(name.len() as u32).to_be_bytes());
        }
        cluster0.resize(cs, 0);
        Ok(cluster0)
    }

    /// Writes the metadata and the header; returns the final counters. Clusters
    /// never given read as zeros.
    pub fn finish(mut self) -> Result<WriterStats> {
        self.stop_io_thread()?;
        self.flush_pending()?;
        let cs = self.cs();
        let cb = self.cluster_bits;
        let data_end = self.next_cluster;
        self.stats.data_end = match self.ctail {
            Some(t) if (t >> cb) + 1 == data_end => t,
            _ => data_end << cb,
        };
        self.stats.max_refcount = self.refcounts.max(1, data_end);
        // The last L2 table, then COPIED cleared where a later duplicate shared
        // a cluster of a table already written.
        self.write_l2()?;
        self.flush_wbuf()?;
        self.apply_copied_fixes()?;
        let layout = MetadataLayout::compute(
            cb,
            self.refcount_order,
            self.virtual_size,
            self.next_cluster,
            0,
        );
        layout.check(cb)?;
        let MetadataLayout {
            l1_clusters,
            l1_start,
            refblocks_start: rb_start,
            refblocks: rb,
            reftable_start: rt_start,
            reftable_clusters: rt,
            total_clusters: total,
            ..
        } = layout;
        let epb = refcount::entries_per_block(cb, self.refcount_order);

        // The L1 table.
        if l1_clusters > 0 {
            let mut l1 = vec![0u8; (l1_clusters * cs) as usize];
            for (slot, e) in l1.chunks_exact_mut(8).zip(&self.l1) {
                slot.copy_from_slice(&e.to_be_bytes());
            }
            self.write(&l1, l1_start << cb)?;
        }

        // Refcount blocks (one at a time; the metadata after the data, L1 and
        // refcount structures, has refcount 1) and the table.
        let mut block = vec![0u8; cs as usize];
        for b in 0..rb {
            block.fill(0);
            for c in b * epb..((b + 1) * epb).min(total) {
                let r = if c < self.refcounts.len() {
                    self.refcounts.get(c)
                } else {
                    1
                };
                refcount::set(&mut block, self.refcount_order, c - b * epb, r);
            }
            self.write(&block, (rb_start + b) << cb)?;
        }
        let mut reftable = vec![0u8; (rt * cs) as usize];
        for i in 0..rb {
            let off = (rb_start + i) << cb;
            reftable[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&off.to_be_bytes());
        }
        self.write(&reftable, rt_start << cb)?;

        // Header last.
        let mut h = Header::new_v3(cb, self.refcount_order, self.virtual_size);
        h.l1_size = self.l1_size as u32;
        h.l1_table_offset = if l1_clusters > 0 { l1_start << cb } else { 0 };
        h.refcount_table_offset = rt_start << cb;
        h.refcount_table_clusters = rt as u32;
        if let Some(CompressionType::Zstd) = self.compression {
            h.compression_type = CompressionType::Zstd.to_raw();
            h.incompatible_features |= QCOW2_INCOMPAT_COMPRESSION;
        }
        let cluster0 = self.header_cluster(&h)?;
        self.write(&cluster0, 0)?;
        // Also gives back what was reserved past the end (`preallocate` may have
        // extended the file; a truncate frees the blocks beyond the new length).
        self.out
            .set_len(total << cb)
            .ctx(|| "cannot set the output length".to_string())?;

        self.stats.metadata_clusters = 1 + self.l2_written + l1_clusters + rb + rt;
        self.stats.file_size = total << cb;
        self.stats.probe_skipped = self.probe_skipped.load(Ordering::Relaxed);
        Ok(self.stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedup::hash_cluster;
    use crate::io::MemFile;
    use crate::source::{Qcow2Source, Source};

    const CS: usize = 4096;

    /// Two different clusters handed to the writer under one hash (a forced
    /// fingerprint collision); returns the image's two guest clusters as read
    /// back and the writer's counters.
    fn collide(verify: bool, codec: Option<CompressionType>) -> ([Vec<u8>; 2], WriterStats) {
        let a: Vec<u8> = (0..CS).map(|i| b"first content "[i % 14]).collect();
        let b: Vec<u8> = (0..CS).map(|i| b"other bytes! "[i % 13]).collect();
        let hash = hash_cluster(&a);
        let data = [a.as_slice(), b.as_slice()].concat();
        let out = MemFile::new(Vec::new());
        let mut w = WriterBuilder::new(2 * CS as u64)
            .cluster_size(CS as u64)
            .compression(codec)
            .verify(verify)
            .create(&out)
            .unwrap();
        let cluster = |d| ClusterIn::Data {
            hash,
            data: d,
            stream: Stream::NotTried,
        };
        w.accept(0, &data, [cluster(&data[..CS]), cluster(&data[CS..])])
            .unwrap();
        w.next_guest = 2;
        let stats = w.finish().unwrap();
        let img = Qcow2Source::from_reader(Box::new(MemFile::new(out.contents())), None).unwrap();
        let read = |g: u64| {
            let mut buf = vec![0u8; CS];
            img.read_at(&mut buf, g * CS as u64).unwrap();
            buf
        };
        let got = [read(0), read(1)];
        assert_eq!(got[0], a);
        (got, stats)
    }

    #[test]
    fn a_fingerprint_collision_shares_the_wrong_copy_without_verify() {
        for codec in [None, Some(CompressionType::Zlib)] {
            let (got, stats) = collide(false, codec);
            assert_eq!(got[1], got[0], "{codec:?}");
            assert_eq!((stats.unique_clusters, stats.duplicate_clusters), (1, 1));
            assert_eq!(stats.verify_mismatches, 0);
        }
    }

    #[test]
    fn verify_stores_a_colliding_content_as_its_own_copy() {
        for codec in [
            None,
            Some(CompressionType::Zlib),
            Some(CompressionType::Zstd),
        ] {
            let (got, stats) = collide(true, codec);
            let b: Vec<u8> = (0..CS).map(|i| b"other bytes! "[i % 13]).collect();
            assert_eq!(got[1], b, "{codec:?}");
            assert_eq!((stats.unique_clusters, stats.duplicate_clusters), (2, 0));
            assert_eq!(stats.verify_mismatches, 1);
            assert_eq!(
                stats.compressed_clusters,
                if codec.is_some() { 2 } else { 0 }
            );
        }
    }

    #[test]
    fn verify_still_shares_true_duplicates() {
        let a = vec![0x5au8; CS];
        let out = MemFile::new(Vec::new());
        let mut w = WriterBuilder::new(3 * CS as u64)
            .cluster_size(CS as u64)
            .verify(true)
            .create(&out)
            .unwrap();
        for _ in 0..3 {
            w.write_cluster(&a).unwrap();
        }
        let stats = w.finish().unwrap();
        assert_eq!((stats.unique_clusters, stats.duplicate_clusters), (1, 2));
        assert_eq!(stats.verify_mismatches, 0);
    }
}
