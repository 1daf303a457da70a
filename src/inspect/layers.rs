//! A walk of the active L1/L2 tree of one qcow2 image, cluster by cluster, for
//! `info`'s figures. Entries are decoded by the one decoder
//! (`L2Layout`, [`L2Entry::subcluster`]) and walked by the one tree walker
//! (`image::tables`); the layers of a backing chain are
//! opened by [`crate::source::chain`].

use crate::error::Result;
use crate::format::l1l2::{L2Entry, Subcluster, SubclusterBitmap, SUBCLUSTERS};
use crate::image::tables::{L1Ref, L2Ref, L2Table, PastEof, Tables, Tree, Visitor, Walker};
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
/// of the active L1/L2 tree of the image `im` opened from `file` whose L2 entry
/// is not empty (the others are unallocated). The walk is the one tree walker's
/// (`image::tables`); an L2 table not wholly inside the file is refused.
pub(crate) fn walk_l2<R: ReadAt + ?Sized>(
    file: &R,
    im: &Image,
    virtual_size: u64,
    f: impl FnMut(u64, ClusterEntry),
) -> Result<()> {
    struct Active<F> {
        n_clusters: u64,
        per_table: u64,
        extended: bool,
        f: F,
    }
    impl<F: FnMut(u64, ClusterEntry)> Visitor for Active<F> {
        fn l1_entry(&mut self, e: &L1Ref) -> Result<bool> {
            Ok(e.index.saturating_mul(self.per_table) < self.n_clusters)
        }

        fn l2_entry(&mut self, _: &L2Table, e: &L2Ref) -> Result<()> {
            if e.guest_cluster < self.n_clusters {
                let bitmap = self.extended.then_some(e.slot.bitmap);
                (self.f)(e.guest_cluster, classify(e.entry, bitmap));
            }
            Ok(())
        }
    }
    let tables = Tables::new(file, im, PastEof::Corrupt);
    let layout = tables.layout();
    let mut v = Active {
        n_clusters: virtual_size.div_ceil(im.cluster_size),
        per_table: layout.entries_per_table(),
        extended: layout.extended,
        f,
    };
    Walker::new(tables)?.walk(&[Tree::active(&im.header)], &mut v)
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
