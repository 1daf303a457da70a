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

/// `raw` (an L1 or standard L2 entry) with `QCOW_OFLAG_COPIED` set or cleared;
/// every other bit is kept (repairs change nothing else).
pub fn with_copied(raw: u64, copied: bool) -> u64 {
    if copied {
        raw | QCOW_OFLAG_COPIED
    } else {
        raw & !QCOW_OFLAG_COPIED
    }
}

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
        self.allocation() & self.zeros()
    }

    /// The "allocated" half (bits 0–31).
    pub fn allocation(self) -> u32 {
        self.0 as u32 // the low 32 bits, by definition
    }

    /// The "reads as zero" half (bits 32–63).
    pub fn zeros(self) -> u32 {
        (self.0 >> 32) as u32
    }
}

/// How one image lays out its L2 tables: the context the entry decoder needs.
///
/// This is the one place that turns the bytes of an L2 table into entries; the
/// reader, `check`, `info`, `map` and `compare` all decode through it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Layout {
    /// log2 of the cluster size (validated: 9..=21).
    pub cluster_bits: u32,
    /// Extended L2 entries (incompatible bit 4): 16 bytes per entry.
    pub extended: bool,
    /// The image has an external data file: offset 0 with `QCOW_OFLAG_COPIED` is a
    /// data cluster at host offset 0 (QEMU's `qcow2_get_cluster_type`).
    pub data_file: bool,
}

/// One stored L2 entry: the descriptor word and, with extended L2 entries, the
/// subcluster bitmap (0 otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct L2Slot {
    /// The 64-bit descriptor as stored.
    pub raw: u64,
    /// The subcluster bitmap (extended L2 only; 0 for standard entries).
    pub bitmap: SubclusterBitmap,
}

impl L2Layout {
    /// Bytes per L2 entry: 8, or 16 with extended L2 entries.
    pub fn entry_bytes(self) -> u64 {
        if self.extended {
            16
        } else {
            8
        }
    }

    /// Entries in one L2 table (one cluster).
    pub fn entries_per_table(self) -> u64 {
        (1u64 << self.cluster_bits) / self.entry_bytes()
    }

    /// Guest bytes one L2 table maps.
    pub fn table_span(self) -> u64 {
        // ≤ 2^18 entries · 2^21 bytes: no overflow for validated cluster_bits.
        self.entries_per_table() << self.cluster_bits
    }

    /// log2 of the guest bytes one allocation unit covers: a subcluster with
    /// extended L2 entries, a cluster otherwise.
    pub fn unit_bits(self) -> u32 {
        if self.extended {
            self.cluster_bits - SUBCLUSTERS.trailing_zeros()
        } else {
            self.cluster_bits
        }
    }

    /// Entry `i` of the L2 table `table` (the table's bytes), or `None` if the table
    /// is too short to hold it.
    pub fn slot(self, table: &[u8], i: u64) -> Option<L2Slot> {
        let at = usize::try_from(i.checked_mul(self.entry_bytes())?).ok()?;
        let raw = super::be64_at(table, at)?;
        let bitmap = if self.extended {
            super::be64_at(table, at.checked_add(8)?)?
        } else {
            0
        };
        Some(L2Slot {
            raw,
            bitmap: SubclusterBitmap(bitmap),
        })
    }

    /// Every entry of the L2 table `table` (the table's bytes), in order: the
    /// sequential form of [`L2Layout::slot`], for walks over whole tables.
    pub fn slots(self, table: &[u8]) -> impl Iterator<Item = L2Slot> + '_ {
        let extended = self.extended;
        table
            .chunks_exact(self.entry_bytes() as usize)
            .map(move |c| {
                let word = |k: usize| u64::from_be_bytes(c[k..k + 8].try_into().expect("8 bytes"));
                L2Slot {
                    raw: word(0),
                    bitmap: SubclusterBitmap(if extended { word(8) } else { 0 }),
                }
            })
    }

    /// Classifies a raw entry like QEMU's `qcow2_get_cluster_type`.
    pub fn decode(self, raw: u64) -> L2Entry {
        match L2Entry::decode(raw, self.cluster_bits, self.extended) {
            L2Entry::Unallocated if self.data_file && raw & QCOW_OFLAG_COPIED != 0 => {
                L2Entry::Normal {
                    offset: 0,
                    copied: true,
                }
            }
            e => e,
        }
    }
}

/// What one subcluster (one cluster, without extended L2 entries) reads from:
/// QEMU's `QCow2SubclusterType` with the host offset of the unit's first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subcluster {
    /// Not allocated here: reads from the backing file, or zeros. `host` is set
    /// when the cluster has a host cluster whose subcluster is not allocated
    /// (QEMU's `UNALLOCATED_ALLOC`).
    Unallocated {
        /// Host offset of the unit, if the cluster has one.
        host: Option<u64>,
    },
    /// Reads as zeros; never falls through. `host` is a preallocated host offset.
    Zero {
        /// Host offset of the unit, if preallocated.
        host: Option<u64>,
    },
    /// Guest data at this host offset.
    Data {
        /// Host offset of the unit.
        host: u64,
    },
    /// Part of a compressed cluster.
    Compressed(CompressedDescriptor),
}

/// Why an extended L2 entry's subcluster bitmap is invalid (QEMU's
/// `QCOW2_SUBCLUSTER_INVALID`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidBitmap {
    /// These subclusters are marked both allocated and zero.
    AllocatedAndZero(u32),
    /// The cluster has no host cluster but these subclusters are marked allocated.
    AllocatedWithoutHost(u32),
}

impl std::fmt::Display for InvalidBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            InvalidBitmap::AllocatedAndZero(m) => {
                write!(f, "subclusters {m:#x} are both allocated and zero")
            }
            InvalidBitmap::AllocatedWithoutHost(m) => {
                write!(f, "allocated subclusters {m:#x} without a host cluster")
            }
        }
    }
}

impl L2Entry {
    /// What unit `unit` of this entry reads from: subcluster `unit` (0..32) with
    /// extended L2 entries (`bitmap` given), the whole cluster otherwise (`bitmap`
    /// `None`, `unit` ignored). QEMU's `qcow2_get_subcluster_type`; the subcluster
    /// bitmap of a compressed entry is ignored, as QEMU ignores it on reads.
    /// `host` offsets are those of the cluster; callers add the offset inside it.
    pub fn subcluster(
        self,
        bitmap: Option<SubclusterBitmap>,
        unit: u32,
    ) -> Result<Subcluster, InvalidBitmap> {
        let Some(bm) = bitmap else {
            return Ok(match self {
                L2Entry::Unallocated => Subcluster::Unallocated { host: None },
                L2Entry::ZeroPlain => Subcluster::Zero { host: None },
                L2Entry::ZeroAlloc { offset, .. } => Subcluster::Zero { host: Some(offset) },
                L2Entry::Normal { offset, .. } => Subcluster::Data { host: offset },
                L2Entry::Compressed { desc, .. } => Subcluster::Compressed(desc),
            });
        };
        let unit = unit % SUBCLUSTERS;
        match self {
            L2Entry::Compressed { desc, .. } => Ok(Subcluster::Compressed(desc)),
            // Extended entries never decode as ZeroPlain/ZeroAlloc (bit 0 is not the
            // zero flag there); a caller that built one gets the standard meaning.
            L2Entry::ZeroPlain => Ok(Subcluster::Zero { host: None }),
            L2Entry::ZeroAlloc { offset, .. } => Ok(Subcluster::Zero { host: Some(offset) }),
            L2Entry::Normal { offset, .. } => {
                let conflicts = bm.conflicts();
                if conflicts != 0 {
                    Err(InvalidBitmap::AllocatedAndZero(conflicts))
                } else if bm.allocated(unit) {
                    Ok(Subcluster::Data { host: offset })
                } else if bm.zero(unit) {
                    Ok(Subcluster::Zero { host: Some(offset) })
                } else {
                    Ok(Subcluster::Unallocated { host: Some(offset) })
                }
            }
            L2Entry::Unallocated => {
                let alloc = bm.allocation();
                if alloc != 0 {
                    Err(InvalidBitmap::AllocatedWithoutHost(alloc))
                } else if bm.zero(unit) {
                    Ok(Subcluster::Zero { host: None })
                } else {
                    Ok(Subcluster::Unallocated { host: None })
                }
            }
        }
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

    #[test]
    fn subcluster_types_follow_qemu() {
        let normal = L2Entry::Normal {
            offset: 0x10000,
            copied: false,
        };
        let bm = |alloc: u32, zero: u32| {
            Some(SubclusterBitmap(u64::from(alloc) | (u64::from(zero) << 32)))
        };
        assert_eq!(
            normal.subcluster(bm(0b01, 0b10), 0),
            Ok(Subcluster::Data { host: 0x10000 })
        );
        assert_eq!(
            normal.subcluster(bm(0b01, 0b10), 1),
            Ok(Subcluster::Zero {
                host: Some(0x10000)
            })
        );
        assert_eq!(
            normal.subcluster(bm(0b01, 0b10), 2),
            Ok(Subcluster::Unallocated {
                host: Some(0x10000)
            })
        );
        assert_eq!(
            normal.subcluster(bm(0b11, 0b10), 0),
            Err(InvalidBitmap::AllocatedAndZero(0b10))
        );
        let un = L2Entry::Unallocated;
        assert_eq!(
            un.subcluster(bm(0, 1 << 31), 31),
            Ok(Subcluster::Zero { host: None })
        );
        assert_eq!(
            un.subcluster(bm(0, 1 << 31), 30),
            Ok(Subcluster::Unallocated { host: None })
        );
        assert_eq!(
            un.subcluster(bm(4, 0), 0),
            Err(InvalidBitmap::AllocatedWithoutHost(4))
        );
        // Standard entries: one unit per cluster.
        assert_eq!(
            L2Entry::ZeroAlloc {
                offset: 0x200,
                copied: true
            }
            .subcluster(None, 7),
            Ok(Subcluster::Zero { host: Some(0x200) })
        );
        assert_eq!(
            un.subcluster(None, 0),
            Ok(Subcluster::Unallocated { host: None })
        );
    }

    #[test]
    fn layout_reads_slots_and_honours_the_data_file_rule() {
        let ext = L2Layout {
            cluster_bits: 16,
            extended: true,
            data_file: false,
        };
        assert_eq!(ext.entry_bytes(), 16);
        assert_eq!(ext.entries_per_table(), 4096);
        assert_eq!(ext.unit_bits(), 11);
        let mut table = vec![0u8; 32];
        table[16..24].copy_from_slice(&0x3_0000u64.to_be_bytes());
        table[24..32].copy_from_slice(&0xffff_0000_0000_ffffu64.to_be_bytes());
        assert_eq!(
            ext.slot(&table, 1),
            Some(L2Slot {
                raw: 0x3_0000,
                bitmap: SubclusterBitmap(0xffff_0000_0000_ffff)
            })
        );
        assert_eq!(ext.slot(&table, 2), None);
        let std = L2Layout {
            cluster_bits: 16,
            extended: false,
            data_file: true,
        };
        assert_eq!(
            std.decode(QCOW_OFLAG_COPIED),
            L2Entry::Normal {
                offset: 0,
                copied: true
            }
        );
        assert_eq!(
            L2Layout {
                data_file: false,
                ..std
            }
            .decode(QCOW_OFLAG_COPIED),
            L2Entry::Unallocated
        );
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
