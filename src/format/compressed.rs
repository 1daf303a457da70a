//! The compressed cluster descriptor (bits 0–61 of an L2 entry with bit 62 set).
//!
//! With `x = 62 − (cluster_bits − 8)`:
//!
//! | bits     | meaning                                                              |
//! |----------|----------------------------------------------------------------------|
//! | 0..x     | host **byte** offset of the stream (`coffset`)                        |
//! | x..62    | number of **additional** 512-byte sectors after the sector holding `coffset` |
//!
//! A reader takes `csize = (field + 1) · 512 − (coffset mod 512)` bytes from
//! `coffset` and inflates until exactly one cluster is produced; bytes after the
//! stream (possibly the next stream) are ignored. A writer stores
//! `field = ⌊(coffset + len − 1) / 512⌋ − ⌊coffset / 512⌋`, counted in absolute
//! file sectors (QEMU's `qcow2_alloc_compressed_cluster_offset`). Older texts call
//! the field "compressed size in sectors", which is off by one.
//!
//! For 512-byte clusters the count field is one bit wide: a stream of at most 511
//! bytes spans at most two sectors however late in a sector it starts, so it always
//! fits (see docs/format.md).

/// Sector size used by the descriptor's size field.
pub const SECTOR: u64 = 512;

/// A decoded compressed descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressedDescriptor {
    /// Host byte offset of the stream.
    pub host_offset: u64,
    /// Additional 512-byte sectors after the first.
    pub extra_sectors: u64,
}

/// Bit position of the sector-count field: `62 − (cluster_bits − 8)`.
pub fn csize_shift(cluster_bits: u32) -> u32 {
    62 - (cluster_bits - 8)
}

impl CompressedDescriptor {
    /// Decodes bits 0–61 of `raw` (bits 62/63 are ignored).
    pub fn decode(raw: u64, cluster_bits: u32) -> Self {
        let x = csize_shift(cluster_bits);
        CompressedDescriptor {
            host_offset: raw & ((1u64 << x) - 1),
            extra_sectors: (raw >> x) & ((1u64 << (cluster_bits - 8)) - 1),
        }
    }

    /// Encodes into bits 0–61 (the caller adds `QCOW_OFLAG_COMPRESSED`).
    pub fn encode(self, cluster_bits: u32) -> u64 {
        let x = csize_shift(cluster_bits);
        debug_assert!(self.host_offset < (1u64 << x));
        debug_assert!(self.extra_sectors < (1u64 << (cluster_bits - 8)));
        self.host_offset | (self.extra_sectors << x)
    }

    /// The descriptor a writer stores for a stream of `len` (≥ 1) bytes at
    /// `host_offset`. Returns `None` if it does not fit the fields.
    pub fn for_stream(host_offset: u64, len: u64, cluster_bits: u32) -> Option<Self> {
        let last = host_offset.checked_add(len.checked_sub(1)?)?;
        let extra_sectors = last / SECTOR - host_offset / SECTOR;
        let d = CompressedDescriptor {
            host_offset,
            extra_sectors,
        };
        let x = csize_shift(cluster_bits);
        (host_offset < (1u64 << x) && extra_sectors < (1u64 << (cluster_bits - 8))).then_some(d)
    }

    /// Bytes a reader takes from `host_offset`: to the end of the last sector.
    pub fn read_len(self) -> u64 {
        (self.extra_sectors + 1) * SECTOR - (self.host_offset % SECTOR)
    }

    /// First and last host cluster index touched by the stream as a reader sees it
    /// (the range whose refcounts the stream contributes to).
    pub fn clusters(self, cluster_bits: u32) -> (u64, u64) {
        let first = self.host_offset >> cluster_bits;
        // host_offset < 2^61 and read_len ≤ 2^13·512, so this cannot overflow.
        let last = (self.host_offset + self.read_len() - 1) >> cluster_bits;
        (first, last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn shift_matches_the_spec() {
        assert_eq!(csize_shift(16), 54);
        assert_eq!(csize_shift(9), 61);
        assert_eq!(csize_shift(21), 49);
    }

    #[test]
    fn late_start_in_512_byte_cluster_fits() {
        // A 511-byte stream starting at byte 511 of a sector spans two sectors.
        let d = CompressedDescriptor::for_stream(1024 + 511, 511, 9).unwrap();
        assert_eq!(d.extra_sectors, 1);
        assert!(d.read_len() >= 511);
        let (a, b) = d.clusters(9);
        assert_eq!((a, b), (2, 3));
    }

    proptest! {
        #[test]
        fn decode_inverts_encode(cb in 9u32..=21, o in any::<u64>(), s in any::<u64>()) {
            let x = csize_shift(cb);
            let d = CompressedDescriptor { host_offset: o & ((1 << x) - 1), extra_sectors: s & ((1 << (cb - 8)) - 1) };
            prop_assert_eq!(CompressedDescriptor::decode(d.encode(cb), cb), d);
        }

        #[test]
        fn reader_covers_what_the_writer_wrote(cb in 9u32..=21, o in 0u64..(1 << 40), len_frac in 1u64..1000) {
            let cs = 1u64 << cb;
            let len = (cs - 1) * len_frac / 1000 + 1;
            let d = CompressedDescriptor::for_stream(o, len, cb).unwrap();
            prop_assert!(d.read_len() >= len);
            prop_assert!(d.read_len() < len + SECTOR);
        }
    }
}
