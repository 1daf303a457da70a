//! Rebuilding refcounts from the metadata and comparing them with the stored ones,
//! following QEMU's `qcow2_check_refcounts` (`block/qcow2-refcount.c`):
//!
//! 1. `calculate_refcounts`: +1 per host cluster touched by each reference — the
//!    header cluster, the active L1 table, each L2 table per L1 entry that points to
//!    it and the data and compressed ranges in it (counted again for every path),
//!    the same for every snapshot's L1 table, the snapshot table, the refcount
//!    table, the LUKS header, the bitmap directory, tables and data, and finally
//!    every refcount block, whose own refcount must come out as exactly 1.
//! 2. `compare_refcounts`: stored < computed is a corruption, stored > computed a
//!    leak; `image-end-offset` follows the highest cluster in use.
//! 3. `check_oflag_copied`: in the active tree, the COPIED flag must agree with
//!    the *stored* refcount being 1 (qdedup's relaxed rule: refcount 1 without the
//!    flag is only counted, unless `--strict`).
//!
//! qdedup adds checks QEMU's `check` does not make: every compressed stream must
//! decompress to a full cluster, the zero flag must not appear in a v2 image,
//! refcounts stored for clusters past the end of the file must be zero, and no
//! cluster may be both metadata and guest data.
//!
//! The trees are walked by [`crate::image::tables::Walker`] (this module's
//! [`Checker`] is its visitor, the COPIED pass a second one), entries decoded by
//! [`L2Layout`](crate::format::l1l2::L2Layout), stored refcounts read through
//! [`Refcounts`].
//!
//! Memory: one `u32` counter, one role byte and two bits per host cluster (up to
//! one cluster past the end of the file: the walker's visited L2 tables and the
//! stored refcounts equal to 1), plus the L1 table being walked and the refcount
//! table, which the opener has bounded.

use std::collections::{HashMap, HashSet};

use super::decompress::{verify_streams, Inflater};
use super::report::{FindingKind as K, Tally};
use crate::error::{Error, IoContext, Result};
use crate::format::header::{off as hoff, QEMU_MAX_LENGTH};
use crate::format::l1l2::{L1Entry, L2Entry};
use crate::format::refcount::{self, REFT_OFFSET_MASK, REFT_RESERVED_MASK};
use crate::format::snapshot::{self, Snapshot, V3_MIN_EXTRA};
use crate::image::refcounts::{BlockRead, Refcounts, Stored};
use crate::image::tables::{
    L1Problem, L1Ref, L2Ref, L2Table, PastEof, Tables, Tree, Visitor, Walker,
};
use crate::image::{read_snapshot_table, Image};
use crate::io::ReadAt;

/// The cluster holds metadata.
pub(crate) const ROLE_META: u8 = 1;
/// The cluster holds guest data of a normal or preallocated-zero entry.
pub(crate) const ROLE_DATA: u8 = 2;
/// The cluster holds (part of) a compressed stream.
pub(crate) const ROLE_COMPRESSED: u8 = 4;

/// Compressed streams collected before they are decompressed (in parallel).
const STREAM_BATCH: usize = 4096;

/// A planned change of the COPIED flag in one table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct CopiedFix {
    /// File offset of the table holding the entry.
    pub table_offset: u64,
    /// Length of that table in bytes.
    pub table_len: u64,
    /// File offset of the entry (its first word).
    pub entry_offset: u64,
    /// Set (true) or clear (false) the flag.
    pub set: bool,
}

/// Allocation figures of the active tree, as `qemu-img check` reports them.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct FragInfo {
    pub allocated: u64,
    pub fragmented: u64,
    pub compressed: u64,
}

/// Dedup figures gathered while comparing.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ShareInfo {
    pub shared_clusters: u64,
    pub shared_streams: u64,
    pub max_refcount: u64,
    pub bytes_saved: u64,
}

/// The state of one check run.
pub(crate) struct Checker<'a, R: ReadAt + ?Sized> {
    img: &'a R,
    pub im: Image,
    pub tally: Tally,
    /// Clusters up to the end of the file (rounded up).
    pub nb_clusters: u64,
    /// Computed refcounts: `nb_clusters + 1` counters (a reference may reach into
    /// the cluster after a partial last cluster).
    pub computed: Vec<u32>,
    /// `ROLE_*` bits per cluster.
    roles: Vec<u8>,
    /// The computed counters saturate here (QEMU's `refcount_max`, or `u32::MAX`).
    counter_max: u64,
    /// Largest refcount the image's width can hold.
    refcount_max: u64,
    /// The stored refcounts.
    pub refcounts: Refcounts,
    /// Clusters compared with the stored refcounts.
    pub compare_len: u64,
    /// One bit per compared cluster: the stored refcount is 1.
    stored_one: Vec<u64>,
    /// Refcount table indices whose block offset is unaligned (lookups fail).
    bad_blocks: HashSet<u64>,
    /// COPIED changes that `--repair copied` would make.
    pub copied_fixes: Vec<CopiedFix>,
    pub frag: FragInfo,
    pub share: ShareInfo,
    /// References per compressed stream (by host offset) and its length, for the
    /// dedup figures: one entry per distinct stream.
    streams: HashMap<u64, (u32, u64)>,
    pub snapshots: Vec<Snapshot>,
    snapshots_size: u64,
    pub image_end_offset: u64,
    verify_compressed: bool,
    inflater: Inflater,
    pending_streams: Vec<(u64, u64, u64)>,
    /// The host offset that would continue the current L2 table's last data
    /// cluster (QEMU's fragmentation count; 0 at the start of a table).
    next_contiguous: u64,
}

impl<R: ReadAt + ?Sized> std::fmt::Debug for Checker<'_, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checker")
            .field("im", &self.im)
            .field("tally", &self.tally)
            .finish_non_exhaustive()
    }
}

fn bit(set: &[u64], i: u64) -> bool {
    set.get((i / 64) as usize)
        .is_some_and(|w| w & (1 << (i % 64)) != 0)
}

fn set_bit(set: &mut [u64], i: u64) {
    if let Some(w) = set.get_mut((i / 64) as usize) {
        *w |= 1 << (i % 64);
    }
}

fn to_usize(v: u64, what: &str) -> Result<usize> {
    usize::try_from(v)
        .map_err(|_| Error::LimitExceeded(format!("{what}: {v} does not fit in memory")))
}

impl<'a, R: ReadAt + ?Sized> Checker<'a, R> {
    /// Prepares a check of `img`, whose header `im` has been validated.
    pub fn new(img: &'a R, im: Image, tally: Tally, verify_compressed: bool) -> Result<Self> {
        let cs = im.cluster_size;
        let nb_clusters = im.file_len.div_ceil(cs);
        let table_len = to_usize(nb_clusters + 1, "host clusters")?;
        let order = im.header.refcount_order;
        let refcount_max = refcount::max_refcount(order);
        let inflater = Inflater::new(im.compression, cs as usize);
        let refcounts = Refcounts::load(img, &im.header)?;
        Ok(Checker {
            img,
            tally,
            nb_clusters,
            computed: vec![0; table_len],
            roles: vec![0; table_len],
            counter_max: refcount_max.min(u64::from(u32::MAX)),
            refcount_max,
            refcounts,
            compare_len: 0,
            stored_one: Vec::new(),
            bad_blocks: HashSet::new(),
            copied_fixes: Vec::new(),
            frag: FragInfo::default(),
            share: ShareInfo::default(),
            streams: HashMap::new(),
            snapshots: Vec::new(),
            snapshots_size: 0,
            image_end_offset: 0,
            verify_compressed,
            inflater,
            pending_streams: Vec::new(),
            next_contiguous: 0,
            im,
        })
    }

    /// Runs the whole check.
    pub fn run(&mut self) -> Result<()> {
        if !self.read_snapshot_table()? {
            return Ok(());
        }
        let cs = self.im.cluster_size;
        let h = self.im.header.clone();
        self.inc(0, cs, ROLE_META, "header", ("header", hoff::MAGIC as u64));
        // One walker for all trees: an L2 table's once-only checks are made at its
        // first visit, in whichever tree.
        let img = self.img;
        let mut walker = Walker::new(Tables::new(img, &self.im, PastEof::Zeros))?;
        walker.walk(&[Tree::active(&h)], self)?;
        self.walk_snapshots(&mut walker)?;
        self.verify_pending_streams()?;
        let rt_bytes = u64::from(h.refcount_table_clusters) << h.cluster_bits;
        self.inc(
            h.refcount_table_offset,
            rt_bytes,
            ROLE_META,
            "refcount table",
            ("header", hoff::REFCOUNT_TABLE_OFFSET as u64),
        );
        self.count_crypto_header();
        self.count_bitmaps()?;
        self.check_refblocks();
        self.compare()?;
        self.check_copied()?;
        Ok(())
    }

    /// Reads `len` bytes at `offset`, or fewer if the file ends first (the rest reads
    /// as zeros in QEMU; callers treat missing entries as zero).
    pub(crate) fn read_in_file(&self, offset: u64, len: u64, what: &str) -> Result<Vec<u8>> {
        let n = len.min(self.im.file_len.saturating_sub(offset));
        let mut v = vec![0u8; to_usize(n, what)?];
        self.img
            .read_at_zero_fill(&mut v, offset)
            .ctx(|| format!("reading the {what} at {offset:#x}"))?;
        Ok(v)
    }

    /// QEMU's `qcow2_inc_refcounts_imrt`: +1 for every cluster touched by
    /// `[offset, offset + size)`. `what` names the referenced object, `by` the
    /// referring structure and the file offset of the reference.
    #[inline]
    pub(crate) fn inc(
        &mut self,
        offset: u64,
        size: u64,
        role: u8,
        what: &'static str,
        by: (&'static str, u64),
    ) {
        // The common case, once per data cluster of every tree: one whole aligned
        // cluster inside the file whose counter is below the limit. The general
        // path below gives the same result for it.
        let cs = self.im.cluster_size;
        if size == cs && offset & (cs - 1) == 0 {
            let k = offset >> self.im.cluster_bits;
            if k < self.nb_clusters {
                // k < nb_clusters < computed.len() == roles.len().
                let (Some(c), Some(r)) = (
                    self.computed.get_mut(k as usize),
                    self.roles.get_mut(k as usize),
                ) else {
                    return;
                };
                if u64::from(*c) < self.counter_max {
                    *c += 1;
                    *r |= role;
                    return;
                }
            }
        }
        self.inc_range(offset, size, role, what, by);
    }

    /// [`Checker::inc`] for any range, with the findings.
    #[inline(never)]
    fn inc_range(
        &mut self,
        offset: u64,
        size: u64,
        role: u8,
        what: &'static str,
        by: (&'static str, u64),
    ) {
        if size == 0 {
            return;
        }
        let cs = self.im.cluster_size;
        let file_len = self.im.file_len;
        let end = match offset.checked_add(size) {
            Some(end) if end.saturating_sub(file_len) < cs => end,
            _ => {
                self.tally.note(K::PastEof, by.0, by.1, || {
                    format!(
                        "{what} at {offset:#x} ({size:#x} bytes) extends one cluster or more \
                         past the end of the file ({file_len:#x})"
                    )
                });
                return;
            }
        };
        let cb = self.im.cluster_bits;
        for k in (offset >> cb)..=((end - 1) >> cb) {
            // end < file_len + cs, so k ≤ nb_clusters and the index is in range.
            let Some(c) = self.computed.get_mut(k as usize) else {
                continue;
            };
            if u64::from(*c) >= self.counter_max {
                if self.counter_max == self.refcount_max {
                    let max = self.refcount_max;
                    self.tally.note(K::RefcountOverflow, by.0, by.1, || {
                        format!(
                            "overflow: cluster {k} ({what}) has more than {max} references, \
                             the most refcount width {} can hold",
                            max.count_ones()
                        )
                    });
                } else {
                    self.tally.note(K::CheckError, by.0, by.1, || {
                        format!("cluster {k} has more than 2^32-1 references; not counted further")
                    });
                }
                continue;
            }
            *c += 1;
            self.roles[k as usize] |= role;
        }
    }

    /// Reads the snapshot table like `qcow2_check_read_snapshot_table`. Returns
    /// false if the check cannot go on (QEMU stops there too).
    fn read_snapshot_table(&mut self) -> Result<bool> {
        let h = &self.im.header;
        let nb = h.nb_snapshots;
        if nb == 0 {
            return Ok(true);
        }
        let (off, version) = (h.snapshots_offset, h.version);
        // The opener validated the table's offset (QEMU does the same here); the
        // table is read as for a plain open, whose errors QEMU's check reports as
        // check errors ("failed to read the snapshot table") before stopping.
        match read_snapshot_table(self.img, h, self.im.file_len) {
            Ok((list, len)) => {
                self.snapshots = list;
                self.snapshots_size = len;
                if version >= 3 {
                    for (i, s) in self.snapshots.iter().enumerate() {
                        if s.extra_data_size < V3_MIN_EXTRA {
                            let extra = s.extra_data_size;
                            self.tally.note(
                                K::Snapshot,
                                "snapshot table",
                                s.entry_offset + snapshot::off::EXTRA_DATA_SIZE as u64,
                                || {
                                    format!(
                                        "snapshot table entry {i} is incomplete: {extra} bytes \
                                         of extra data, v3 needs 16"
                                    )
                                },
                            );
                        }
                    }
                }
                Ok(true)
            }
            Err(e @ Error::Io { .. }) => Err(e),
            Err(e) => {
                let (structure, at) = match &e {
                    Error::Corrupt {
                        structure, offset, ..
                    } => (*structure, *offset),
                    _ => ("snapshot table", off),
                };
                self.tally.note(K::CheckError, structure, at, || {
                    format!("failed to read the snapshot table: {e}")
                });
                Ok(false)
            }
        }
    }

    fn walk_snapshots(&mut self, walker: &mut Walker<'a, R>) -> Result<()> {
        if self.im.data_file && !self.snapshots.is_empty() {
            let n = self.snapshots.len();
            let at = hoff::NB_SNAPSHOTS as u64;
            self.tally.note(K::Snapshot, "header", at, || {
                format!("{n} snapshots in an image with an external data file")
            });
        }
        walker.walk(&Tree::snapshots(&self.snapshots), self)?;
        let (off, size) = (self.im.header.snapshots_offset, self.snapshots_size);
        let by = ("header", hoff::SNAPSHOTS_OFFSET as u64);
        self.inc(off, size, ROLE_META, "snapshot table", by);
        Ok(())
    }

    /// Notes why a snapshot's L1 table cannot be walked, if it cannot.
    fn snapshot_l1_problem(&mut self, tree: &Tree) -> bool {
        let Some(p) = tree.problem(self.im.cluster_size) else {
            return false;
        };
        let entry = tree.referrer.1;
        let id = tree
            .snapshot
            .and_then(|i| self.snapshots.get(i))
            .map(|s| s.id.clone())
            .unwrap_or_default();
        let (l1_off, l1_size) = (tree.l1_offset, tree.l1_size);
        match p {
            L1Problem::Unaligned => self.tally.note(K::Snapshot, "snapshot table", entry, || {
                format!("snapshot {id}: L1 table offset {l1_off:#x} is not cluster aligned")
            }),
            L1Problem::TooLarge => self.tally.note(K::Snapshot, "snapshot table", entry, || {
                format!("snapshot {id}: L1 table of {l1_size} entries exceeds 32 MiB")
            }),
            // QEMU cannot read it (its check fails with an I/O error).
            L1Problem::PastMaxLength => {
                self.tally.note(K::CheckError, "snapshot table", entry, || {
                    format!(
                        "snapshot {id}: L1 table at {l1_off:#x} cannot be read: it ends past \
                         QEMU's largest file offset ({QEMU_MAX_LENGTH:#x})"
                    )
                });
            }
        }
        true
    }

    fn count_crypto_header(&mut self) {
        if self.im.header.crypt_method != 2 {
            return;
        }
        // The opener checked the extension (length, alignment) as QEMU does.
        match self.im.crypto_header {
            Some(c) => {
                let by = ("header extension", c.extension_offset);
                self.inc(c.offset, c.length, ROLE_META, "LUKS header", by);
            }
            None => self
                .tally
                .note(K::CheckError, "header", hoff::CRYPT_METHOD as u64, || {
                    "LUKS encryption without a crypto header extension".into()
                }),
        }
    }

    fn note_l2_unaligned(&mut self, e: &L2Ref, offset: u64) {
        let i = e.index;
        // Extended entries: a cluster with no allocated subcluster is preallocated.
        let what = match e.entry {
            L2Entry::ZeroAlloc { .. } => "preallocated zero cluster",
            _ if self.im.extended_l2 && e.slot.bitmap.allocation() == 0 => {
                "preallocated zero cluster"
            }
            _ => "data cluster",
        };
        self.tally.note(K::Unaligned, "L2 table", e.at, || {
            format!("L2 entry {i}: {what} offset {offset:#x} is not cluster aligned")
        });
    }

    fn note_v2_zero(&mut self, i: u64, at: u64) {
        self.tally.note(K::V2ZeroFlag, "L2 table", at, || {
            format!("L2 entry {i}: zero flag in a version 2 image (reads fail)")
        });
    }

    /// Decompresses the streams collected so far, on several threads if there are
    /// many; failures are reported in the order the streams were found.
    fn verify_pending_streams(&mut self) -> Result<()> {
        let (file_len, cs) = (self.im.file_len, self.im.cluster_size);
        // Ranges one cluster or more past the end were reported as such already.
        self.pending_streams.retain(|&(_, coffset, csize)| {
            coffset.saturating_add(csize).saturating_sub(file_len) < cs
        });
        let streams = std::mem::take(&mut self.pending_streams);
        let failures = verify_streams(
            self.img,
            &mut self.inflater,
            self.im.compression,
            cs,
            &streams,
        )?;
        for (i, why) in failures {
            let (at, coffset, csize) = streams[i];
            self.tally.note(K::CompressedStream, "L2 table", at, || {
                format!(
                    "compressed cluster at {coffset:#x} ({csize} bytes) does not decompress \
                     to a full cluster: {why}"
                )
            });
        }
        self.pending_streams = streams;
        self.pending_streams.clear();
        Ok(())
    }

    /// QEMU's `check_refblocks`.
    fn check_refblocks(&mut self) {
        let cs = self.im.cluster_size;
        let cb = self.im.cluster_bits;
        let rt_off = self.im.header.refcount_table_offset;
        for i in 0..self.refcounts.table().len() {
            let e = self.refcounts.table()[i];
            let at = rt_off + 8 * i as u64;
            let off = e & REFT_OFFSET_MASK;
            if e & REFT_RESERVED_MASK != 0 {
                self.tally.note(K::ReservedBits, "refcount table", at, || {
                    format!("refcount table entry {i} = {e:#018x} has reserved bits set")
                });
                continue;
            }
            if off % cs != 0 {
                self.tally.note(K::Unaligned, "refcount table", at, || {
                    format!("refcount block {i} at {off:#x} is not cluster aligned")
                });
                continue;
            }
            let cluster = off >> cb;
            if cluster >= self.table_len() {
                self.tally.note(K::RefcountBlock, "refcount table", at, || {
                    format!("refcount block {i} at {off:#x} is outside the image")
                });
                continue;
            }
            if off != 0 {
                self.inc(off, cs, ROLE_META, "refcount block", ("refcount table", at));
                let n = self.computed[cluster as usize];
                if n != 1 {
                    self.tally.note(K::RefcountBlock, "refcount table", at, || {
                        format!("refcount block {i} at {off:#x} has {n} references, must have 1")
                    });
                }
            }
        }
    }

    /// QEMU's in-memory refcount table grows by one cluster when a reference reaches
    /// into the cluster after a partial last cluster.
    fn table_len(&self) -> u64 {
        self.nb_clusters + u64::from(self.computed[self.nb_clusters as usize] > 0)
    }

    fn entries_per_block_bits(&self) -> u32 {
        self.im.cluster_bits + 3 - self.im.header.refcount_order
    }

    /// QEMU's `compare_refcounts`, plus qdedup's checks of refcounts past the end of
    /// the file and of clusters used as both metadata and data.
    fn compare(&mut self) -> Result<()> {
        let cs = self.im.cluster_size;
        let order = self.im.header.refcount_order;
        let file_len = self.im.file_len;
        let compare_len = self.table_len();
        self.compare_len = compare_len;
        self.stored_one = vec![0; to_usize(compare_len.div_ceil(64), "host clusters")?];
        let bb = self.entries_per_block_bits();
        let epb = 1u64 << bb;
        let nblocks = (compare_len.div_ceil(epb)).max(self.refcounts.table().len() as u64);
        // Every block is read once, whole, into one buffer (`Refcounts::read_block`):
        // looking each cluster up with `Refcounts::get` would cost a cache lookup
        // per cluster, and copy every block into a cache that is never hit again.
        let mut block = vec![0u8; cs as usize];
        let mut highest = 0u64;
        for b in 0..nblocks {
            let first = b << bb;
            let end = first + epb;
            let in_range_end = end.min(compare_len);
            let off = self.refcounts.block_offset(b);
            if first >= compare_len && (off == 0 || off >= file_len) {
                // Nothing to compare, and no stored refcounts to look at.
                continue;
            }
            if let BlockRead::Unreadable { block: off } =
                self.refcounts.read_block(self.img, b, &mut block)?
            {
                if first < compare_len {
                    self.bad_blocks.insert(b);
                    let n = in_range_end - first;
                    self.tally.note_n(n, K::CheckError, "refcount table", self.im.header.refcount_table_offset + 8 * b, || {
                        format!("can't get refcounts for clusters {first}..{in_range_end}: refcount block {b} at {off:#x} is unaligned")
                    });
                }
                continue;
            }
            for c in first..in_range_end {
                let s = refcount::get(&block, order, c - first);
                let idx = c as usize;
                let comp = u64::from(self.computed[idx]);
                if s > 0 || comp > 0 {
                    highest = c;
                }
                if s == 1 {
                    set_bit(&mut self.stored_one, c);
                }
                if s < comp {
                    self.tally.note(K::RefcountTooLow, "cluster", c * cs, || {
                        format!("cluster {c} refcount={s} reference={comp}")
                    });
                } else if s > comp {
                    self.tally.note(K::LeakedCluster, "cluster", c * cs, || {
                        format!("cluster {c} refcount={s} reference={comp}")
                    });
                }
                let role = self.roles[idx];
                if role & ROLE_META != 0 && role & (ROLE_DATA | ROLE_COMPRESSED) != 0 {
                    self.tally.note(K::MetadataOverlap, "cluster", c * cs, || {
                        format!("cluster {c} is used both as metadata and as guest data")
                    });
                }
                self.share.max_refcount = self.share.max_refcount.max(comp);
                if role == ROLE_DATA && comp > 1 {
                    self.share.shared_clusters += 1;
                    self.share.bytes_saved = self.share.bytes_saved.saturating_add((comp - 1) * cs);
                }
            }
            // Refcounts stored for clusters past the end of the file (QEMU does not
            // compare them). Blocks outside the file were reported above.
            if off != 0 && off < file_len && end > compare_len {
                for c in first.max(compare_len)..end {
                    let s = refcount::get(&block, order, c - first);
                    if s != 0 {
                        self.tally.note(
                            K::RefcountBeyondEof,
                            "cluster",
                            c.saturating_mul(cs),
                            || format!("cluster {c} past the end of the file has refcount {s}"),
                        );
                    }
                }
            }
        }
        self.image_end_offset = (highest + 1) * cs;
        for &(n, csize) in self.streams.values() {
            if n > 1 {
                self.share.shared_streams += 1;
                self.share.bytes_saved = self
                    .share
                    .bytes_saved
                    .saturating_add(u64::from(n - 1) * csize);
            }
        }
        self.streams = HashMap::new();
        Ok(())
    }

    /// The stored refcount of `cluster` (zeros past the end of the file, as QEMU
    /// reads them). `None` if the lookup fails (an unaligned refcount block).
    pub(crate) fn stored_refcount(&mut self, cluster: u64) -> Result<Option<u64>> {
        Ok(match self.refcounts.get(self.img, cluster)? {
            Stored::Count(n) => Some(n),
            Stored::Unreadable { .. } => None,
        })
    }

    /// Whether the stored refcount of `cluster` is 1 (`None` if it cannot be read):
    /// from the bits the comparison recorded, else read. Inlined: the COPIED pass
    /// asks once per entry of the active tree.
    #[inline]
    fn stored_is_one(&mut self, cluster: u64) -> Result<Option<bool>> {
        if cluster < self.compare_len {
            // Hashing only when some block is unreadable (rare): this runs once
            // per entry of the active tree.
            if !self.bad_blocks.is_empty()
                && self
                    .bad_blocks
                    .contains(&(cluster >> self.entries_per_block_bits()))
            {
                return Ok(None);
            }
            return Ok(Some(bit(&self.stored_one, cluster)));
        }
        Ok(self.stored_refcount(cluster)?.map(|r| r == 1))
    }

    /// QEMU's `check_oflag_copied` on the active tree, with qdedup's relaxed rule:
    /// a second walk of the active tree, after the stored refcounts were compared.
    fn check_copied(&mut self) -> Result<()> {
        let img = self.img;
        let tables = Tables::new(img, &self.im, PastEof::Zeros);
        let active = Tree::active(&self.im.header);
        Walker::new(tables)?.walk(&[active], &mut CopiedPass(self))
    }

    fn copied_rule(
        &mut self,
        one: bool,
        copied: bool,
        cluster: u64,
        structure: &'static str,
        at: u64,
        table: (u64, u64),
    ) -> Result<()> {
        if one == copied {
            return Ok(());
        }
        let what = if structure == "L1 table" {
            "L2 table"
        } else {
            "data cluster"
        };
        if one {
            self.tally.note(K::RelaxedCopied, structure, at, || {
                format!("{what} {cluster} has refcount 1 but the entry lacks COPIED")
            });
        } else {
            let r = self.stored_refcount(cluster)?.unwrap_or(0);
            self.tally.note(K::CopiedFlag, structure, at, || {
                format!("COPIED is set but {what} {cluster} has refcount {r}")
            });
        }
        self.copied_fixes.push(CopiedFix {
            table_offset: table.0,
            table_len: table.1,
            entry_offset: at,
            set: one,
        });
        Ok(())
    }
}

/// The refcount walk: QEMU's `check_refcounts_l1` and `check_refcounts_l2`, plus
/// qdedup's once-per-table checks.
impl<R: ReadAt + ?Sized> Visitor for Checker<'_, R> {
    fn tree(&mut self, tree: &Tree) -> Result<bool> {
        if !tree.is_active() && self.snapshot_l1_problem(tree) {
            return Ok(false);
        }
        if tree.l1_size == 0 {
            return Ok(false);
        }
        let what = tree.l1_structure();
        self.inc(
            tree.l1_offset,
            tree.l1_bytes(),
            ROLE_META,
            what,
            tree.referrer,
        );
        Ok(true)
    }

    fn l1_entry(&mut self, e: &L1Ref) -> Result<bool> {
        let (structure, at, i, raw) = (e.tree.l1_structure(), e.at, e.index, e.raw);
        if L1Entry::reserved_bits(raw) != 0 {
            self.tally.note(K::ReservedBits, structure, at, || {
                format!("L1 entry {i} = {raw:#018x} has reserved bits set")
            });
        }
        let l2_off = e.entry.l2_offset;
        if l2_off == 0 {
            // QEMU would count cluster 0 again and read the header as an L2
            // table (a refcount error); reads treat the entry as unallocated.
            self.tally.note(K::L1Entry, structure, at, || {
                format!("L1 entry {i} = {raw:#018x} has flags but no L2 table offset")
            });
            return Ok(false);
        }
        let cs = self.im.cluster_size;
        self.inc(l2_off, cs, ROLE_META, "L2 table", (structure, at));
        if l2_off % cs != 0 {
            self.tally.note(K::Unaligned, structure, at, || {
                format!("L1 entry {i}: L2 table offset {l2_off:#x} is not cluster aligned")
            });
            // QEMU reads an L2 table at the unaligned offset; its entries are
            // meaningless, so qdedup does not interpret them.
            return Ok(false);
        }
        Ok(true)
    }

    fn l2_table(&mut self, _: &L2Table) -> Result<()> {
        self.next_contiguous = 0;
        Ok(())
    }

    #[inline]
    fn l2_entry(&mut self, t: &L2Table, e: &L2Ref) -> Result<()> {
        let (i, at, raw, bitmap) = (e.index, e.at, e.slot.raw, e.slot.bitmap);
        let cs = self.im.cluster_size;
        let (data_file, v2) = (self.im.data_file, self.im.header.version < 3);
        if L2Entry::reserved_bits(raw) != 0 {
            self.tally.note(K::ReservedBits, "L2 table", at, || {
                format!("L2 entry {i} = {raw:#018x} has reserved bits set")
            });
        }
        match e.entry {
            L2Entry::Compressed { desc, copied } => {
                if copied {
                    self.tally.note(K::CopiedFlag, "L2 table", at, || {
                        format!("L2 entry {i}: COPIED must never be set on a compressed cluster")
                    });
                    self.copied_fixes.push(CopiedFix {
                        table_offset: t.offset,
                        table_len: cs,
                        entry_offset: at,
                        set: false,
                    });
                }
                if data_file {
                    self.tally.note(K::CompressedEntry, "L2 table", at, || {
                        format!("L2 entry {i}: compressed cluster in an image with a data file")
                    });
                    return Ok(());
                }
                if bitmap.0 != 0 {
                    let bm = bitmap.0;
                    self.tally.note(K::CompressedEntry, "L2 table", at, || {
                        format!(
                            "L2 entry {i}: compressed cluster with subcluster bitmap {bm:#018x}"
                        )
                    });
                    return Ok(());
                }
                let csize = desc.read_len();
                self.inc(
                    desc.host_offset,
                    csize,
                    ROLE_COMPRESSED,
                    "compressed cluster",
                    ("L2 table", at),
                );
                if t.active() {
                    self.frag.allocated += 1;
                    self.frag.compressed += 1;
                    self.frag.fragmented += 1;
                }
                let n = &mut self.streams.entry(desc.host_offset).or_insert((0, csize)).0;
                *n = n.saturating_add(1);
                let verify = self.verify_compressed && self.im.header.crypt_method == 0;
                if t.first_visit && verify {
                    self.pending_streams.push((at, desc.host_offset, csize));
                }
            }
            L2Entry::Normal { offset, .. } | L2Entry::ZeroAlloc { offset, .. } => {
                let conflicts = bitmap.conflicts();
                if conflicts != 0 {
                    self.tally.note(K::SubclusterBitmap, "L2 table", at, || {
                        format!(
                            "L2 entry {i}: subclusters {conflicts:#x} are both allocated and zero"
                        )
                    });
                }
                // cs is a power of two: a mask, not a division, on this hot path.
                if offset & (cs - 1) != 0 {
                    self.note_l2_unaligned(e, offset);
                }
                if t.active() {
                    self.frag.allocated += 1;
                    if self.next_contiguous != 0 && offset != self.next_contiguous {
                        self.frag.fragmented += 1;
                    }
                    self.next_contiguous = offset.wrapping_add(cs);
                }
                if !data_file {
                    self.inc(offset, cs, ROLE_DATA, "data cluster", ("L2 table", at));
                }
                if t.first_visit && v2 && matches!(e.entry, L2Entry::ZeroAlloc { .. }) {
                    self.note_v2_zero(i, at);
                }
            }
            L2Entry::ZeroPlain => {
                if t.first_visit && v2 {
                    self.note_v2_zero(i, at);
                }
            }
            L2Entry::Unallocated => {
                let alloc = bitmap.allocation();
                if alloc != 0 {
                    self.tally.note(K::SubclusterBitmap, "L2 table", at, || {
                        format!(
                            "L2 entry {i}: unallocated cluster has subcluster allocation bits \
                             {alloc:#x}"
                        )
                    });
                }
            }
        }
        Ok(())
    }

    fn l2_table_end(&mut self, _: &L2Table) -> Result<()> {
        if self.pending_streams.len() >= STREAM_BATCH {
            self.verify_pending_streams()?;
        }
        Ok(())
    }
}

/// QEMU's `check_oflag_copied`: COPIED on each entry of the active tree must
/// agree with the stored refcount being 1 (qdedup's relaxed rule applies).
struct CopiedPass<'c, 'a, R: ReadAt + ?Sized>(&'c mut Checker<'a, R>);

impl<R: ReadAt + ?Sized> Visitor for CopiedPass<'_, '_, R> {
    fn l1_entry(&mut self, e: &L1Ref) -> Result<bool> {
        let ck = &mut *self.0;
        let l2_off = e.entry.l2_offset;
        if l2_off == 0 {
            return Ok(false);
        }
        let (cb, cs) = (ck.im.cluster_bits, ck.im.cluster_size);
        let table = (e.tree.l1_offset, e.tree.l1_bytes());
        if let Some(one) = ck.stored_is_one(l2_off >> cb)? {
            let copied = e.entry.copied;
            ck.copied_rule(one, copied, l2_off >> cb, "L1 table", e.at, table)?;
        }
        Ok(l2_off % cs == 0)
    }

    #[inline]
    fn l2_entry(&mut self, t: &L2Table, e: &L2Ref) -> Result<()> {
        let ck = &mut *self.0;
        // Compressed entries were checked in the walk; unallocated and ZERO_PLAIN
        // ones have no cluster.
        let (L2Entry::Normal { offset, copied } | L2Entry::ZeroAlloc { offset, copied }) = e.entry
        else {
            return Ok(());
        };
        let cb = ck.im.cluster_bits;
        // Clusters of an external data file always have refcount 1 (QEMU).
        let one = if ck.im.data_file {
            Some(true)
        } else {
            ck.stored_is_one(offset >> cb)?
        };
        if let Some(one) = one.filter(|one| *one != copied) {
            let table = (t.offset, ck.im.cluster_size);
            ck.copied_rule(one, copied, offset >> cb, "L2 table", e.at, table)?;
        }
        Ok(())
    }
}
