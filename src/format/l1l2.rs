//! L1 and L2 table entries (64-bit big-endian words).
//!
//! L1 entry:
//!
//! | bits  | meaning                                               |
//! |-------|-------------------------------------------------------|
//! | 0–8   | reserved (0)                                          |
//! | 9–55  | offset of the L2 table (cluster aligned; 0 = none)    |
//! | 56–62 | reserved (0)                                          |
//! | 63    | `QCOW_OFLAG_COPIED`: the L2 table's refcount is 1     |
//!
//! L2 entry (standard descriptor):
//!
//! | bits  | meaning                                               |
//! |-------|-------------------------------------------------------|
//! | 0     | `QCOW_OFLAG_ZERO`: reads as zeros (v3 only)           |
//! | 1–8   | reserved (0)                                          |
//! | 9–55  | host cluster offset (cluster aligned; 0 = none)       |
//! | 56–61 | reserved (0)                                          |
//! | 62    | `QCOW_OFLAG_COMPRESSED`: bits 0–61 are a compressed descriptor |
//! | 63    | `QCOW_OFLAG_COPIED`: the data cluster's refcount is 1 |
//!
//! With extended L2 entries (incompatible bit 4) each entry is followed by a 64-bit
//! subcluster bitmap: bits 0–31 "allocated", bits 32–63 "reads as zero"; the zero
//! flag (bit 0) of the descriptor is then not used.

use super::compressed::CompressedDescriptor;

/// Bit 63 of L1 and L2 entries.
pub const QCOW_OFLAG_COPIED: u64 = 1 << 63;
/// Bit 62 of L2 entries.
pub const QCOW_OFLAG_COMPRESSED: u64 = 1 << 62;
/// Bit 0 of L2 entries.
pub const QCOW_OFLAG_ZERO: u64 = 1;
/// Offset field of L1 entries.
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of L1 entries.
pub const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Offset field of standard L2 entries.
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of standard L2 entries.
pub const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// A decoded L1 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L1Entry {
    /// Offset of the L2 table, 0 if none.
    pub l2_offset: u64,
    /// `QCOW_OFLAG_COPIED`.
    pub copied: bool,
}

impl L1Entry {
    /// Decodes the offset and COPIED bit; see [`L1Entry::reserved_bits`].
    pub fn decode(raw: u64) -> Self {
        L1Entry {
            l2_offset: raw & L1E_OFFSET_MASK,
            copied: raw & QCOW_OFLAG_COPIED != 0,
        }
    }

    /// Reserved bits set in a raw entry (non-zero means corrupt).
    pub fn reserved_bits(raw: u64) -> u64 {
        raw & L1E_RESERVED_MASK
    }

    /// Encodes the entry.
    pub fn encode(self) -> u64 {
        debug_assert_eq!(self.l2_offset & !L1E_OFFSET_MASK, 0);
        self.l2_offset | if self.copied { QCOW_OFLAG_COPIED } else { 0 }
    }
}

/// A decoded L2 entry, classified like QEMU's `qcow2_get_cluster_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Entry {
    /// Not allocated: reads from the backing file, or zeros.
    Unallocated,
    /// Zero flag with no host cluster.
    ZeroPlain,
    /// Zero flag with a preallocated host cluster.
    ZeroAlloc {
        /// Host cluster offset.
        offset: u64,
        /// `QCOW_OFLAG_COPIED`.
        copied: bool,
    },
    /// Data in a host cluster.
    Normal {
        /// Host cluster offset.
        offset: u64,
        /// `QCOW_OFLAG_COPIED`.
        copied: bool,
    },
    /// Compressed data.
    Compressed {
        /// The compressed descriptor.
        desc: CompressedDescriptor,
        /// `QCOW_OFLAG_COPIED` (always a corruption on compressed entries).
        copied: bool,
    },
}

impl L2Entry {
    /// Classifies a raw entry. `extended` says whether the image uses extended L2
    /// entries, in which case bit 0 is not the zero flag.
    pub fn decode(raw: u64, cluster_bits: u32, extended: bool) -> Self {
        let copied = raw & QCOW_OFLAG_COPIED != 0;
        if raw & QCOW_OFLAG_COMPRESSED != 0 {
            return L2Entry::Compressed {
                desc: CompressedDescriptor::decode(raw, cluster_bits),
                copied,
            };
        }
        let offset = raw & L2E_OFFSET_MASK;
        if !extended && raw & QCOW_OFLAG_ZERO != 0 {
            if offset == 0 {
                L2Entry::ZeroPlain
            } else {
                L2Entry::ZeroAlloc { offset, copied }
            }
        } else if offset != 0 {
            L2Entry::Normal { offset, copied }
        } else {
            L2Entry::Unallocated
        }
    }

    /// Reserved bits set in a raw standard (non-compressed) entry.
    pub fn reserved_bits(raw: u64) -> u64 {
        if raw & QCOW_OFLAG_COMPRESSED != 0 {
            0
        } else {
            raw & L2E_STD_RESERVED_MASK
        }
    }

    /// Encodes the entry.
    pub fn encode(self, cluster_bits: u32) -> u64 {
        let copied = |c: bool| if c { QCOW_OFLAG_COPIED } else { 0 };
        match self {
            L2Entry::Unallocated => 0,
            L2Entry::ZeroPlain => QCOW_OFLAG_ZERO,
            L2Entry::ZeroAlloc { offset, copied: c } => offset | QCOW_OFLAG_ZERO | copied(c),
            L2Entry::Normal { offset, copied: c } => offset | copied(c),
            L2Entry::Compressed { desc, copied: c } => {
                desc.encode(cluster_bits) | QCOW_OFLAG_COMPRESSED | copied(c)
            }
        }
    }

    /// The host cluster offset of a normal or preallocated-zero entry.
    pub fn host_offset(self) -> Option<u64> {
        match self {
            L2Entry::Normal { offset, .. } | L2Entry::ZeroAlloc { offset, .. } => Some(offset),
            _ => None,
        }
    }
}

/// The subcluster bitmap of an extended L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubclusterBitmap(pub u64);

impl SubclusterBitmap {
    /// Whether subcluster `i` (0..32) is allocated.
    pub fn allocated(self, i: u32) -> bool {
        self.0 & (1 << i) != 0
    }

    /// Whether subcluster `i` (0..32) reads as zero.
    pub fn zero(self, i: u32) -> bool {
        self.0 & (1 << (i + 32)) != 0
    }

    /// Subclusters both allocated and zero (invalid).
    pub fn conflicts(self) -> u32 {
        ((self.0 & 0xffff_ffff) & (self.0 >> 32)) as u32
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn flag_values_match_the_spec() {
        assert_eq!(QCOW_OFLAG_COPIED, 0x8000_0000_0000_0000);
        assert_eq!(QCOW_OFLAG_COMPRESSED, 0x4000_0000_0000_0000);
        assert_eq!(QCOW_OFLAG_ZERO, 1);
    }

    #[test]
    fn extended_entries_ignore_the_zero_flag() {
        assert_eq!(L2Entry::decode(1, 16, true), L2Entry::Unallocated);
        assert_eq!(L2Entry::decode(1, 16, false), L2Entry::ZeroPlain);
    }

    fn entry(cb: u32) -> impl Strategy<Value = L2Entry> {
        let off = (1u64..(1 << 40))
            .prop_map(move |c| (c << cb) & L2E_OFFSET_MASK)
            .prop_filter("nonzero", |o| *o != 0);
        prop_oneof![
            Just(L2Entry::Unallocated),
            Just(L2Entry::ZeroPlain),
            (off.clone(), any::<bool>())
                .prop_map(|(offset, copied)| L2Entry::ZeroAlloc { offset, copied }),
            (off, any::<bool>()).prop_map(|(offset, copied)| L2Entry::Normal { offset, copied }),
            (any::<u64>(), any::<u64>()).prop_map(move |(o, s)| {
                let x = 62 - (cb - 8);
                let host_offset = o & ((1u64 << x) - 1);
                let extra_sectors = s & ((1u64 << (cb - 8)) - 1);
                L2Entry::Compressed {
                    desc: CompressedDescriptor {
                        host_offset,
                        extra_sectors,
                    },
                    copied: false,
                }
            }),
        ]
    }

    proptest! {
        #[test]
        fn l2_decode_inverts_encode((cb, e) in (9u32..=21).prop_flat_map(|cb| (Just(cb), entry(cb)))) {
            let raw = e.encode(cb);
            prop_assert_eq!(L2Entry::reserved_bits(raw), 0);
            prop_assert_eq!(L2Entry::decode(raw, cb, false), e);
        }

        #[test]
        fn l1_decode_inverts_encode(c in 1u64..(1 << 40), copied in any::<bool>()) {
            let e = L1Entry { l2_offset: (c << 9) & L1E_OFFSET_MASK, copied };
            prop_assert_eq!(L1Entry::decode(e.encode()), e);
            prop_assert_eq!(L1Entry::reserved_bits(e.encode()), 0);
        }
    }
}
