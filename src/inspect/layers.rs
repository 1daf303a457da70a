//! A walk of the active L1/L2 tree of one qcow2 image, cluster by cluster, for
//! `info`'s figures. Entries are decoded by the one decoder
//! ([`L2Layout`], [`L2Entry::subcluster`]); the layers of a backing chain are
//! opened by [`crate::source::chain`].

use crate::error::{Error, Result};
use crate::format::be64_at;
use crate::format::l1l2::{L1Entry, L2Entry, L2Layout, Subcluster, SubclusterBitmap, SUBCLUSTERS};
use crate::image::Image;
use crate::io::ReadAt;

/// One guest cluster of the active layer, as its L2 entry says. A cluster holding
/// a host cluster is one reference to it, whatever its subclusters read as, as
/// `check` and QEMU count references.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClusterEntry {
    /// No host cluster, and nothing reads as zero: the cluster reads from the
    /// backing file (or zeros).
    Unallocated,
    /// No host cluster; the zero flag, or (extended L2) some subcluster reads as
    /// zero.
    Zero,
    /// This host cluster: data, a preallocated zero cluster, or (extended L2) any
    /// mix of allocated, zero and unallocated subclusters.
    Host(u64),
    /// A compressed stream starting at this byte offset, of at most `max_len` bytes.
    Compressed { offset: u64, max_len: u64 },
}

/// Classifies one decoded entry (`bitmap` given with extended L2 entries).
fn classify(entry: L2Entry, bitmap: Option<SubclusterBitmap>) -> ClusterEntry {
    if let L2Entry::Compressed { desc, .. } = entry {
        return ClusterEntry::Compressed {
            offset: desc.host_offset,
            max_len: desc.read_len(),
        };
    }
    if let Some(host) = entry.host_offset() {
        return ClusterEntry::Host(host);
    }
    let units = if bitmap.is_some() { SUBCLUSTERS } else { 1 };
    let zero = (0..units).any(|u| match entry.subcluster(bitmap, u) {
        Ok(s) => matches!(s, Subcluster::Zero { .. }),
        // Allocation bits without a host cluster (reads fail in QEMU, `check`
        // reports it): the zero bits still say what the subclusters are meant to be.
        Err(_) => bitmap.is_some_and(|b| b.zero(u)),
    });
    if zero {
        ClusterEntry::Zero
    } else {
        ClusterEntry::Unallocated
    }
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
    let layout = L2Layout {
        cluster_bits: im.cluster_bits,
        extended: im.extended_l2,
        data_file: im.data_file,
    };
    let cs = im.cluster_size;
    let l2_entries = layout.entries_per_table();
    let n_clusters = virtual_size.div_ceil(cs);
    let file_len = im.file_len;
    // The opener bounded the L1 table by QEMU's 32 MiB limit; past the end of the
    // file it reads as zeros, as in QEMU.
    let mut l1 = vec![0u8; h.l1_size as usize * 8];
    file.read_at_zero_fill(&mut l1, h.l1_table_offset)
        .map_err(|e| Error::io("cannot read the L1 table", e))?;
    // A cluster: no larger than 2 MiB (validated cluster_bits).
    let mut table = vec![0u8; cs as usize];
    for i in 0..u64::from(h.l1_size) {
        let first = i * l2_entries;
        if first >= n_clusters {
            break;
        }
        // i < l1_size, and l1 holds l1_size entries.
        let raw = be64_at(&l1, (i * 8) as usize).unwrap_or(0);
        let l1e = L1Entry::decode(raw);
        if l1e.l2_offset == 0 {
            continue;
        }
        let at = h.l1_table_offset + i * 8;
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
            // j < entries_per_table: the slot lies inside the table.
            let slot = layout.slot(&table, j).unwrap_or_default();
            let bitmap = layout.extended.then_some(slot.bitmap);
            f(first + j, classify(layout.decode(slot.raw), bitmap));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bm(alloc: u32, zero: u32) -> SubclusterBitmap {
        SubclusterBitmap(u64::from(alloc) | (u64::from(zero) << 32))
    }

    #[test]
    fn a_host_cluster_is_one_reference_whatever_it_reads_as() {
        let zero_alloc = L2Entry::ZeroAlloc {
            offset: 0x3_0000,
            copied: true,
        };
        assert_eq!(classify(zero_alloc, None), ClusterEntry::Host(0x3_0000));
        let normal = L2Entry::Normal {
            offset: 0x5_0000,
            copied: true,
        };
        for b in [bm(!0, 0), bm(0, !0), bm(1, 2), bm(0, 0), bm(1, 1)] {
            assert_eq!(
                classify(normal, Some(b)),
                ClusterEntry::Host(0x5_0000),
                "{b:?}"
            );
        }
    }

    #[test]
    fn clusters_without_a_host_cluster_are_zero_when_some_unit_reads_as_zero() {
        assert_eq!(classify(L2Entry::ZeroPlain, None), ClusterEntry::Zero);
        assert_eq!(
            classify(L2Entry::Unallocated, None),
            ClusterEntry::Unallocated
        );
        let un = L2Entry::Unallocated;
        assert_eq!(classify(un, Some(bm(0, 0))), ClusterEntry::Unallocated);
        assert_eq!(classify(un, Some(bm(0, 1 << 31))), ClusterEntry::Zero);
        // Invalid: allocation bits without a host cluster.
        assert_eq!(classify(un, Some(bm(4, 0))), ClusterEntry::Unallocated);
        assert_eq!(classify(un, Some(bm(4, 8))), ClusterEntry::Zero);
    }
}
