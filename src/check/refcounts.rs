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
//! 3. `check_oflag_copied`: in the active tree, `QCOW_OFLAG_COPIED` must agree with
//!    the *stored* refcount being 1 (qdedup's relaxed rule: refcount 1 without the
//!    flag is only counted, unless `--strict`).
//!
//! qdedup adds checks QEMU's `check` does not make: every compressed stream must
//! decompress to a full cluster, the zero flag must not appear in a v2 image,
//! refcounts stored for clusters past the end of the file must be zero, and no
//! cluster may be both metadata and guest data.
//!
//! Memory: one `u32` counter, one role byte and one bit per host cluster (up to one
//! cluster past the end of the file), plus the active L1 and refcount tables, which
//! `Header::validate` has bounded by the file size.

use std::collections::{HashMap, HashSet};

use super::decompress::{verify_streams, Inflater};
use super::report::{FindingKind as K, Tally};
use crate::error::{Error, IoContext, Result};
use crate::format::compressed::CompressedDescriptor;
use crate::format::header::{off as hoff, QEMU_MAX_LENGTH};
use crate::format::l1l2::{
    L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_OFFSET_MASK, L2E_STD_RESERVED_MASK,
    QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO,
};
use crate::format::refcount::{self, REFT_OFFSET_MASK, REFT_RESERVED_MASK};
use crate::format::snapshot::{self, Snapshot, V3_MIN_EXTRA};
use crate::image::{read_snapshot_table, Image};
use crate::io::ReadAt;

/// The cluster holds metadata.
pub(crate) const ROLE_META: u8 = 1;
/// The cluster holds guest data of a normal or preallocated-zero entry.
pub(crate) const ROLE_DATA: u8 = 2;
/// The cluster holds (part of) a compressed stream.
pub(crate) const ROLE_COMPRESSED: u8 = 4;

/// QEMU's limit on a snapshot's L1 table, in entries (32 MiB).
const MAX_L1_ENTRIES: u32 = 4 << 20;

/// Compressed streams collected before they are decompressed (in parallel).
const STREAM_BATCH: usize = 4096;

/// A planned change of `QCOW_OFLAG_COPIED` in one table entry.
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
    /// One bit per cluster: this L2 table's once-only checks are done.
    l2_seen: Vec<u64>,
    /// The computed counters saturate here (QEMU's `refcount_max`, or `u32::MAX`).
    counter_max: u64,
    /// Largest refcount the image's width can hold.
    refcount_max: u64,
    /// The refcount table.
    pub reftable: Vec<u64>,
    /// Clusters compared with the stored refcounts.
    pub compare_len: u64,
    /// One bit per compared cluster: the stored refcount is 1.
    stored_one: Vec<u64>,
    /// Refcount table indices whose block offset is unaligned (lookups fail).
    bad_blocks: HashSet<u64>,
    /// The active L1 table as read.
    pub active_l1: Vec<u64>,
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
    l2_buf: Vec<u8>,
    pending_streams: Vec<(u64, u64, u64)>,
}

impl<R: ReadAt + ?Sized> std::fmt::Debug for Checker<'_, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checker")
            .field("im", &self.im)
            .field("tally", &self.tally)
            .finish_non_exhaustive()
    }
}

fn be64(buf: &[u8], at: usize) -> u64 {
    // Callers index buffers they sized themselves (whole entries only).
    u64::from_be_bytes(buf[at..at + 8].try_into().expect("8-byte slice"))
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
        Ok(Checker {
            img,
            tally,
            nb_clusters,
            computed: vec![0; table_len],
            roles: vec![0; table_len],
            l2_seen: vec![0; table_len.div_ceil(64)],
            counter_max: refcount_max.min(u64::from(u32::MAX)),
            refcount_max,
            reftable: Vec::new(),
            compare_len: 0,
            stored_one: Vec::new(),
            bad_blocks: HashSet::new(),
            active_l1: Vec::new(),
            copied_fixes: Vec::new(),
            frag: FragInfo::default(),
            share: ShareInfo::default(),
            streams: HashMap::new(),
            snapshots: Vec::new(),
            snapshots_size: 0,
            image_end_offset: 0,
            verify_compressed,
            inflater,
            l2_buf: vec![0; cs as usize],
            pending_streams: Vec::new(),
            im,
        })
    }

    /// Runs the whole check.
    pub fn run(&mut self) -> Result<()> {
        if !self.read_snapshot_table()? {
            return Ok(());
        }
        self.read_reftable()?;
        let cs = self.im.cluster_size;
        let h = self.im.header.clone();
        self.inc(0, cs, ROLE_META, "header", ("header", hoff::MAGIC as u64));
        let by = ("header", hoff::L1_TABLE_OFFSET as u64);
        self.walk_l1(h.l1_table_offset, h.l1_size, true, by)?;
        self.walk_snapshots()?;
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
    pub(crate) fn inc(
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

    fn read_reftable(&mut self) -> Result<()> {
        let h = &self.im.header;
        let bytes = u64::from(h.refcount_table_clusters) << h.cluster_bits;
        // validate() checked that the table (≤ 8 MiB) lies inside the file.
        let raw = self.read_in_file(h.refcount_table_offset, bytes, "refcount table")?;
        self.reftable = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        Ok(())
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

    fn walk_snapshots(&mut self) -> Result<()> {
        if self.im.data_file && !self.snapshots.is_empty() {
            let n = self.snapshots.len();
            let at = hoff::NB_SNAPSHOTS as u64;
            self.tally.note(K::Snapshot, "header", at, || {
                format!("{n} snapshots in an image with an external data file")
            });
        }
        let cs = self.im.cluster_size;
        let list: Vec<(u64, u32, u64, String)> = self
            .snapshots
            .iter()
            .map(|s| (s.l1_table_offset, s.l1_size, s.entry_offset, s.id.clone()))
            .collect();
        for (l1_off, l1_size, entry, id) in list {
            if l1_off % cs != 0 {
                self.tally.note(K::Snapshot, "snapshot table", entry, || {
                    format!("snapshot {id}: L1 table offset {l1_off:#x} is not cluster aligned")
                });
                continue;
            }
            if l1_size > MAX_L1_ENTRIES {
                self.tally.note(K::Snapshot, "snapshot table", entry, || {
                    format!("snapshot {id}: L1 table of {l1_size} entries exceeds 32 MiB")
                });
                continue;
            }
            let end = l1_off.checked_add(u64::from(l1_size) * 8);
            if l1_size > 0 && end.is_none_or(|e| e > QEMU_MAX_LENGTH) {
                // QEMU cannot read it (its check fails with an I/O error).
                self.tally.note(K::CheckError, "snapshot table", entry, || {
                    format!(
                        "snapshot {id}: L1 table at {l1_off:#x} cannot be read: it ends past \
                         QEMU's largest file offset ({QEMU_MAX_LENGTH:#x})"
                    )
                });
                continue;
            }
            self.walk_l1(l1_off, l1_size, false, ("snapshot table", entry))?;
        }
        let (off, size) = (self.im.header.snapshots_offset, self.snapshots_size);
        let by = ("header", hoff::SNAPSHOTS_OFFSET as u64);
        self.inc(off, size, ROLE_META, "snapshot table", by);
        Ok(())
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

    /// QEMU's `check_refcounts_l1`.
    fn walk_l1(
        &mut self,
        l1_off: u64,
        l1_size: u32,
        active: bool,
        by: (&'static str, u64),
    ) -> Result<()> {
        if l1_size == 0 {
            return Ok(());
        }
        let structure = if active {
            "L1 table"
        } else {
            "snapshot L1 table"
        };
        let bytes = u64::from(l1_size) * 8;
        self.inc(l1_off, bytes, ROLE_META, structure, by);
        let raw = self.read_in_file(l1_off, bytes, structure)?;
        let l1: Vec<u64> = raw.chunks_exact(8).map(|c| be64(c, 0)).collect();
        let cs = self.im.cluster_size;
        for (i, &e) in l1.iter().enumerate() {
            if e == 0 {
                continue;
            }
            let at = l1_off + 8 * i as u64;
            if e & L1E_RESERVED_MASK != 0 {
                self.tally.note(K::ReservedBits, structure, at, || {
                    format!("L1 entry {i} = {e:#018x} has reserved bits set")
                });
            }
            let l2_off = e & L1E_OFFSET_MASK;
            if l2_off == 0 {
                // QEMU would count cluster 0 again and read the header as an L2
                // table (a refcount error); reads treat the entry as unallocated.
                self.tally.note(K::L1Entry, structure, at, || {
                    format!("L1 entry {i} = {e:#018x} has flags but no L2 table offset")
                });
                continue;
            }
            self.inc(l2_off, cs, ROLE_META, "L2 table", (structure, at));
            if l2_off % cs != 0 {
                self.tally.note(K::Unaligned, structure, at, || {
                    format!("L1 entry {i}: L2 table offset {l2_off:#x} is not cluster aligned")
                });
                // QEMU reads an L2 table at the unaligned offset; its entries are
                // meaningless, so qdedup does not interpret them.
                continue;
            }
            self.walk_l2(l2_off, active)?;
        }
        if active {
            self.active_l1 = l1;
            self.active_l1.resize(l1_size as usize, 0);
        }
        Ok(())
    }

    /// QEMU's `check_refcounts_l2`, plus qdedup's once-per-table checks.
    fn walk_l2(&mut self, l2_off: u64, active: bool) -> Result<()> {
        let mut buf = std::mem::take(&mut self.l2_buf);
        let res = self.walk_l2_in(l2_off, active, &mut buf);
        self.l2_buf = buf;
        res
    }

    fn walk_l2_in(&mut self, l2_off: u64, active: bool, buf: &mut [u8]) -> Result<()> {
        self.img
            .read_at_zero_fill(buf, l2_off)
            .ctx(|| format!("reading the L2 table at {l2_off:#x}"))?;
        let im = &self.im;
        let (cs, cb, esize) = (im.cluster_size, im.cluster_bits, im.l2_entry_size);
        let (ext, data_file, v2) = (im.extended_l2, im.data_file, im.header.version < 3);
        let verify = self.verify_compressed && im.header.crypt_method == 0;
        let cluster = l2_off >> cb;
        let first_visit = !bit(&self.l2_seen, cluster);
        set_bit(&mut self.l2_seen, cluster);
        let mut next_contiguous = 0u64;
        for i in 0..self.im.l2_entries {
            let pos = (i * esize) as usize;
            let raw = be64(buf, pos);
            let bitmap = if ext { be64(buf, pos + 8) } else { 0 };
            let at = l2_off + i * esize;
            if raw == 0 && bitmap == 0 {
                continue;
            }
            let compressed = raw & QCOW_OFLAG_COMPRESSED != 0;
            if !compressed && raw & L2E_STD_RESERVED_MASK != 0 {
                self.tally.note(K::ReservedBits, "L2 table", at, || {
                    format!("L2 entry {i} = {raw:#018x} has reserved bits set")
                });
            }
            let offset = raw & L2E_OFFSET_MASK;
            let zero_flag = !ext && raw & QCOW_OFLAG_ZERO != 0;
            if compressed {
                if raw & QCOW_OFLAG_COPIED != 0 {
                    self.tally.note(K::CopiedFlag, "L2 table", at, || {
                        format!("L2 entry {i}: COPIED must never be set on a compressed cluster")
                    });
                    self.copied_fixes.push(CopiedFix {
                        table_offset: l2_off,
                        table_len: cs,
                        entry_offset: at,
                        set: false,
                    });
                }
                if data_file {
                    self.tally.note(K::CompressedEntry, "L2 table", at, || {
                        format!("L2 entry {i}: compressed cluster in an image with a data file")
                    });
                    continue;
                }
                if bitmap != 0 {
                    self.tally.note(K::CompressedEntry, "L2 table", at, || {
                        format!("L2 entry {i}: compressed cluster with subcluster bitmap {bitmap:#018x}")
                    });
                    continue;
                }
                let d = CompressedDescriptor::decode(raw, cb);
                let csize = d.read_len();
                self.inc(
                    d.host_offset,
                    csize,
                    ROLE_COMPRESSED,
                    "compressed cluster",
                    ("L2 table", at),
                );
                if active {
                    self.frag.allocated += 1;
                    self.frag.compressed += 1;
                    self.frag.fragmented += 1;
                }
                let n = &mut self.streams.entry(d.host_offset).or_insert((0, csize)).0;
                *n = n.saturating_add(1);
                if first_visit && verify {
                    self.pending_streams.push((at, d.host_offset, csize));
                }
            } else if offset != 0 || (data_file && raw & QCOW_OFLAG_COPIED != 0) {
                // NORMAL or ZERO_ALLOC.
                let conflict = (bitmap >> 32) & bitmap;
                if conflict != 0 {
                    self.tally.note(K::SubclusterBitmap, "L2 table", at, || {
                        format!(
                            "L2 entry {i}: subclusters {conflict:#x} are both allocated and zero"
                        )
                    });
                }
                if offset % cs != 0 {
                    let what = if zero_flag || (ext && bitmap as u32 == 0) {
                        "preallocated zero cluster"
                    } else {
                        "data cluster"
                    };
                    self.tally.note(K::Unaligned, "L2 table", at, || {
                        format!("L2 entry {i}: {what} offset {offset:#x} is not cluster aligned")
                    });
                }
                if active {
                    self.frag.allocated += 1;
                    if next_contiguous != 0 && offset != next_contiguous {
                        self.frag.fragmented += 1;
                    }
                    next_contiguous = offset.wrapping_add(cs);
                }
                if !data_file {
                    self.inc(offset, cs, ROLE_DATA, "data cluster", ("L2 table", at));
                }
                if first_visit && v2 && zero_flag {
                    self.note_v2_zero(i, at);
                }
            } else if zero_flag {
                // ZERO_PLAIN.
                if first_visit && v2 {
                    self.note_v2_zero(i, at);
                }
            } else if bitmap & 0xffff_ffff != 0 {
                // UNALLOCATED with allocation bits.
                self.tally.note(K::SubclusterBitmap, "L2 table", at, || {
                    format!(
                        "L2 entry {i}: unallocated cluster has subcluster allocation bits {:#x}",
                        bitmap & 0xffff_ffff
                    )
                });
            }
        }
        if self.pending_streams.len() >= STREAM_BATCH {
            self.verify_pending_streams()?;
        }
        Ok(())
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
        for i in 0..self.reftable.len() {
            let e = self.reftable[i];
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
        let nblocks = (compare_len.div_ceil(epb)).max(self.reftable.len() as u64);
        let mut block = vec![0u8; cs as usize];
        let mut highest = 0u64;
        for b in 0..nblocks {
            let first = b << bb;
            let end = first + epb;
            let in_range_end = end.min(compare_len);
            let e = self.reftable.get(b as usize).copied().unwrap_or(0);
            let off = e & REFT_OFFSET_MASK;
            if first >= compare_len && (off == 0 || off >= file_len) {
                // Nothing to compare, and no stored refcounts to look at.
                continue;
            }
            if off == 0 {
                block.fill(0);
            } else if off % cs != 0 {
                if first < compare_len {
                    self.bad_blocks.insert(b);
                    let n = in_range_end - first;
                    self.tally.note_n(n, K::CheckError, "refcount table", self.im.header.refcount_table_offset + 8 * b, || {
                        format!("can't get refcounts for clusters {first}..{in_range_end}: refcount block {b} at {off:#x} is unaligned")
                    });
                }
                continue;
            } else if first < compare_len || off < file_len {
                self.img
                    .read_at_zero_fill(&mut block, off)
                    .ctx(|| format!("reading the refcount block at {off:#x}"))?;
            } else {
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

    /// The stored refcount of `cluster`, read from its refcount block (zeros past
    /// the end of the file, as QEMU reads them). `None` if the lookup fails.
    pub(crate) fn stored_refcount(&self, cluster: u64) -> Result<Option<u64>> {
        let bb = self.entries_per_block_bits();
        let b = cluster >> bb;
        let Some(&e) = self
            .reftable
            .get(to_usize(b, "refcount table index").unwrap_or(usize::MAX))
        else {
            return Ok(Some(0));
        };
        let off = e & REFT_OFFSET_MASK;
        if off == 0 {
            return Ok(Some(0));
        }
        if off % self.im.cluster_size != 0 {
            return Ok(None);
        }
        let order = self.im.header.refcount_order;
        let slot = cluster & ((1 << bb) - 1);
        // Read the bytes holding the slot (one byte for sub-byte widths).
        let width = (1u64 << order).div_ceil(8);
        let byte = (slot << order) / 8;
        let mut buf = [0u8; 8];
        let buf = &mut buf[..width as usize];
        self.img
            .read_at_zero_fill(buf, off + byte)
            .ctx(|| format!("reading the refcount block at {off:#x}"))?;
        let sub = if order < 3 { slot % (8 >> order) } else { 0 };
        Ok(Some(refcount::get(buf, order, sub)))
    }

    fn stored_is_one(&self, cluster: u64) -> Result<Option<bool>> {
        if cluster < self.compare_len {
            let b = cluster >> self.entries_per_block_bits();
            if self.bad_blocks.contains(&b) {
                return Ok(None);
            }
            return Ok(Some(bit(&self.stored_one, cluster)));
        }
        Ok(self.stored_refcount(cluster)?.map(|r| r == 1))
    }

    /// QEMU's `check_oflag_copied` on the active tree, with qdedup's relaxed rule.
    fn check_copied(&mut self) -> Result<()> {
        let l1 = std::mem::take(&mut self.active_l1);
        let mut buf = std::mem::take(&mut self.l2_buf);
        let res = self.check_copied_in(&l1, &mut buf);
        self.active_l1 = l1;
        self.l2_buf = buf;
        res
    }

    fn check_copied_in(&mut self, l1: &[u64], buf: &mut [u8]) -> Result<()> {
        let im = &self.im;
        let (cs, cb, esize) = (im.cluster_size, im.cluster_bits, im.l2_entry_size);
        let data_file = im.data_file;
        let l1_off = im.header.l1_table_offset;
        let l1_len = 8 * l1.len() as u64;
        for (i, &e) in l1.iter().enumerate() {
            let l2_off = e & L1E_OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            let at = l1_off + 8 * i as u64;
            if let Some(one) = self.stored_is_one(l2_off >> cb)? {
                self.copied_rule(
                    one,
                    e & QCOW_OFLAG_COPIED != 0,
                    l2_off >> cb,
                    "L1 table",
                    at,
                    (l1_off, l1_len),
                )?;
            }
            if l2_off % cs != 0 {
                continue;
            }
            self.img
                .read_at_zero_fill(buf, l2_off)
                .ctx(|| format!("reading the L2 table at {l2_off:#x}"))?;
            for j in 0..self.im.l2_entries {
                let raw = be64(buf, (j * esize) as usize);
                if raw & QCOW_OFLAG_COMPRESSED != 0 {
                    continue;
                }
                let offset = raw & L2E_OFFSET_MASK;
                let copied = raw & QCOW_OFLAG_COPIED != 0;
                if offset == 0 && !(data_file && copied) {
                    continue; // unallocated or ZERO_PLAIN
                }
                let one = if data_file {
                    Some(true)
                } else {
                    self.stored_is_one(offset >> cb)?
                };
                if let Some(one) = one {
                    self.copied_rule(
                        one,
                        copied,
                        offset >> cb,
                        "L2 table",
                        l2_off + j * esize,
                        (l2_off, cs),
                    )?;
                }
            }
        }
        Ok(())
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
