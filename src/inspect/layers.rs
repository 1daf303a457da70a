//! The layers of an image chain, opened one by one (each without its backing
//! source), so that `map` can report which layer answers for a run of bytes, and
//! reference/refcount walks of one qcow2 layer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::error::{Error, IoContext, Result};
use crate::format::l1l2::{L1Entry, L2Entry, QCOW_OFLAG_COPIED};
use crate::format::refcount::{self, REFT_OFFSET_MASK};
use crate::image::Image;
use crate::io::ReadAt;
use crate::source::qcow2::{backing_of, in_file, Chain, LayerExtent};
use crate::source::raw::RawSource;
use crate::source::{probe, BlockStatus, Format, Qcow2Source, Source};

/// One image of a chain.
pub(crate) enum LayerKind {
    /// A qcow2 layer (opened without its backing file).
    Qcow2(Box<Qcow2Source>),
    /// A raw file: every byte is present (data or a hole reading as zeros).
    Raw(RawSource),
}

/// One image of a chain with the name QEMU would print for it.
pub(crate) struct Layer {
    /// The path as given (top) or as combined from the overlay's path (backing).
    pub name: PathBuf,
    /// The image.
    pub kind: LayerKind,
}

impl Layer {
    /// Virtual size of this layer.
    pub fn size(&self) -> u64 {
        match &self.kind {
            LayerKind::Qcow2(q) => q.virtual_size(),
            LayerKind::Raw(r) => r.virtual_size(),
        }
    }

    /// This layer's answer for `[offset, offset + max_len)`, `offset < size()`.
    pub fn extent(&self, offset: u64, max_len: u64) -> Result<(LayerExtent, u64)> {
        let max_len = max_len.min(self.size() - offset);
        match &self.kind {
            LayerKind::Qcow2(q) => q.layer_extent(offset, max_len),
            LayerKind::Raw(r) => {
                // file-posix answers DATA or ZERO, always with the offset (raw maps 1:1).
                let (st, len) = r.block_status(offset, max_len)?;
                Ok(match st {
                    BlockStatus::Data => (LayerExtent::Data { host: offset }, len),
                    BlockStatus::Zero => (LayerExtent::Zero { host: Some(offset) }, len),
                })
            }
        }
    }
}

/// QEMU's `path_combine`: a relative backing name is taken relative to the
/// directory of the overlay's name as given (no canonicalisation).
pub(crate) fn path_combine(overlay: &Path, name: &Path) -> PathBuf {
    if name.is_absolute() {
        return name.to_path_buf();
    }
    match overlay.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.join(name),
        _ => name.to_path_buf(),
    }
}

/// Opens `path` (format probed unless given) and every image of its backing
/// chain, top first, each layer as the qcow2 source opens it for `convert`: the
/// same opener, backing names and formats resolved the same way, and the same
/// refusals (pipes, loops, chains deeper than
/// [`MAX_CHAIN_DEPTH`](crate::source::qcow2::MAX_CHAIN_DEPTH)).
pub(crate) fn open_layers(path: &Path, format: Option<Format>) -> Result<Vec<Layer>> {
    let mut chain = Chain::default();
    let mut layers = Vec::new();
    let mut next = Some((path.to_path_buf(), format, None::<PathBuf>));
    while let Some((p, fmt, overlay)) = next.take() {
        let file = chain.open_file(&p, overlay.as_deref())?;
        // Errors of a backing layer name its file, as the qcow2 source's do.
        let label = |e: Error| match overlay {
            Some(_) => in_file(e, &p),
            None => e,
        };
        let fmt = match fmt {
            Some(f) => f,
            None => probe(&file).ctx(|| format!("cannot read {}", p.display()))?,
        };
        let kind = match fmt {
            Format::Raw => LayerKind::Raw(RawSource::from_file(file, &p).map_err(label)?),
            Format::Qcow2 => {
                let mut q = Qcow2Source::from_reader(Box::new(file), None).map_err(label)?;
                if overlay.is_some() {
                    q.set_label(&p);
                }
                if let Some((b, bfmt)) = backing_of(&q, &p).map_err(label)? {
                    next = Some((b, bfmt, Some(p.clone())));
                }
                LayerKind::Qcow2(Box::new(q))
            }
        };
        layers.push(Layer { name: p, kind });
    }
    Ok(layers)
}

/// Reads stored refcounts of one qcow2 file (refcount blocks cached).
pub(crate) struct RefcountReader<'a> {
    file: &'a dyn ReadAt,
    cluster_bits: u32,
    order: u32,
    table: Vec<u64>,
    blocks: Mutex<HashMap<u64, std::sync::Arc<[u8]>>>,
}

impl<'a> RefcountReader<'a> {
    /// Loads the refcount table of `q`.
    pub fn new(q: &'a Qcow2Source) -> Result<Self> {
        let h = q.header();
        let cs = h.cluster_size();
        // The opener bounded the table by QEMU's 8 MiB limit; past the end of the file
        // it reads as zeros (no refcount blocks), as in QEMU.
        let len = u64::from(h.refcount_table_clusters) * cs;
        let mut raw = vec![0u8; len as usize];
        q.file()
            .read_at_zero_fill(&mut raw, h.refcount_table_offset)
            .map_err(|e| Error::io("cannot read the refcount table", e))?;
        let table = raw
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")) & REFT_OFFSET_MASK)
            .collect();
        Ok(RefcountReader {
            file: q.file(),
            cluster_bits: h.cluster_bits,
            order: h.refcount_order,
            table,
            blocks: Mutex::new(HashMap::new()),
        })
    }

    /// Stored refcount of the host cluster holding byte `host`.
    pub fn get(&self, host: u64) -> Result<u64> {
        let c = host >> self.cluster_bits;
        let epb = refcount::entries_per_block(self.cluster_bits, self.order);
        let Some(&rb) = usize::try_from(c / epb)
            .ok()
            .and_then(|i| self.table.get(i))
        else {
            return Ok(0);
        };
        if rb == 0 {
            return Ok(0);
        }
        let mut cache = self.blocks.lock().expect("refblock cache lock");
        let block = if let Some(b) = cache.get(&rb) {
            b.clone()
        } else {
            let mut b = vec![0u8; 1usize << self.cluster_bits];
            // Past the end of the file a block reads as zeros, as in QEMU (`check`
            // reports such a block as a corruption).
            self.file
                .read_at_zero_fill(&mut b, rb)
                .map_err(|e| Error::io(format!("cannot read the refcount block at {rb:#x}"), e))?;
            let b: std::sync::Arc<[u8]> = b.into();
            cache.insert(rb, b.clone());
            b
        };
        Ok(refcount::get(&block, self.order, c % epb))
    }
}

/// One guest cluster of the active layer, as its L2 entry says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClusterEntry {
    /// No L2 entry (or an unallocated one).
    Unallocated,
    /// Zero flag (with or without a preallocated host cluster).
    Zero,
    /// Plain data in this host cluster.
    Normal(u64),
    /// A compressed stream starting at this byte offset, of at most `max_len` bytes.
    Compressed { offset: u64, max_len: u64 },
}

/// Calls `f(guest_cluster, entry)` for every guest cluster below `virtual_size`
/// of the active L1/L2 tree of the image `im` opened from `file` that has an L2
/// table (clusters under empty L1 entries are skipped: they are unallocated).
pub(crate) fn walk_l2(
    file: &dyn ReadAt,
    im: &Image,
    virtual_size: u64,
    mut f: impl FnMut(u64, ClusterEntry),
) -> Result<()> {
    let h = &im.header;
    let cb = im.cluster_bits;
    let cs = im.cluster_size;
    let extended = im.extended_l2;
    let wpe: u64 = if extended { 2 } else { 1 };
    let l2_entries = im.l2_entries;
    let n_clusters = virtual_size.div_ceil(cs);
    let file_len = im.file_len;
    // The opener bounded the L1 table by QEMU's 32 MiB limit; past the end of the
    // file it reads as zeros, as in QEMU.
    let mut l1 = vec![0u8; h.l1_size as usize * 8];
    file.read_at_zero_fill(&mut l1, h.l1_table_offset)
        .map_err(|e| Error::io("cannot read the L1 table", e))?;
    let mut table = vec![0u8; cs as usize];
    for (i, e) in l1.chunks_exact(8).enumerate() {
        let l1e = L1Entry::decode(u64::from_be_bytes(e.try_into().expect("8 bytes")));
        let first = i as u64 * l2_entries;
        if l1e.l2_offset == 0 || first >= n_clusters {
            continue;
        }
        let at = h.l1_table_offset + i as u64 * 8;
        if l1e.l2_offset & (cs - 1) != 0 || l1e.l2_offset + cs > file_len {
            return Err(Error::corrupt(
                "L1 table",
                at,
                format!(
                    "L1 entry {i}: L2 table offset {:#x} is unaligned or past the end of the file",
                    l1e.l2_offset
                ),
            ));
        }
        file.read_exact_at(&mut table, l1e.l2_offset).map_err(|e| {
            Error::io(
                format!("cannot read the L2 table at {:#x}", l1e.l2_offset),
                e,
            )
        })?;
        for j in 0..l2_entries.min(n_clusters - first) {
            let w = (j * wpe * 8) as usize;
            let raw = u64::from_be_bytes(table[w..w + 8].try_into().expect("8 bytes"));
            let entry = match L2Entry::decode(raw, cb, extended) {
                // With an external data file, offset 0 is a real host offset,
                // told from "unallocated" by COPIED (QEMU's qcow2_get_cluster_type).
                L2Entry::Unallocated if im.data_file && raw & QCOW_OFLAG_COPIED != 0 => {
                    ClusterEntry::Normal(0)
                }
                L2Entry::Unallocated => {
                    if extended {
                        let bm =
                            u64::from_be_bytes(table[w + 8..w + 16].try_into().expect("8 bytes"));
                        if bm >> 32 != 0 {
                            ClusterEntry::Zero
                        } else {
                            ClusterEntry::Unallocated
                        }
                    } else {
                        ClusterEntry::Unallocated
                    }
                }
                L2Entry::ZeroPlain | L2Entry::ZeroAlloc { .. } => ClusterEntry::Zero,
                L2Entry::Normal { offset, .. } => ClusterEntry::Normal(offset),
                L2Entry::Compressed { desc, .. } => ClusterEntry::Compressed {
                    offset: desc.host_offset,
                    max_len: desc.read_len(),
                },
            };
            f(first + j, entry);
        }
    }
    Ok(())
}
