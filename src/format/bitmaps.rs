//! Persistent dirty bitmaps: the directory entry and the bitmap table entry
//! (`docs/interop/qcow2.rst`, "Bitmaps extension"). Pure decoding; QEMU's loading
//! rules live in `image::bitmaps`.
//!
//! Bitmaps extension data (24 bytes): u32 `nb_bitmaps`, u32 reserved (0),
//! u64 `bitmap_directory_size`, u64 `bitmap_directory_offset`. QEMU ignores the
//! extension unless autoclear bit 0 is set.
//!
//! Bitmap directory entry (8-byte aligned):
//!
//! | offset | size | field                                     |
//! |-------:|-----:|-------------------------------------------|
//! |      0 |    8 | `bitmap_table_offset` (cluster aligned)   |
//! |      8 |    4 | `bitmap_table_size` (entries)             |
//! |     12 |    4 | flags: bit 0 `in_use`, bit 1 auto         |
//! |     16 |    1 | type (1 = dirty tracking)                 |
//! |     17 |    1 | `granularity_bits` (9..=31)               |
//! |     18 |    2 | `name_size` (≤ 1023)                      |
//! |     20 |    4 | `extra_data_size` (QEMU supports only 0)  |
//! |     24 |    … | extra data, name, padding to 8            |
//!
//! Bitmap table entry: bit 0 "all ones" (only with offset 0), bits 9–55 data
//! cluster offset, everything else reserved.

/// Field offsets of a bitmap directory entry.
pub mod off {
    /// u64 `bitmap_table_offset`.
    pub const TABLE_OFFSET: usize = 0;
    /// u32 `bitmap_table_size`.
    pub const TABLE_SIZE: usize = TABLE_OFFSET + 8;
    /// u32 flags.
    pub const FLAGS: usize = TABLE_SIZE + 4;
    /// u8 type.
    pub const TYPE: usize = FLAGS + 4;
    /// u8 `granularity_bits`.
    pub const GRANULARITY_BITS: usize = TYPE + 1;
    /// u16 `name_size`.
    pub const NAME_SIZE: usize = GRANULARITY_BITS + 1;
    /// u32 `extra_data_size`.
    pub const EXTRA_DATA_SIZE: usize = NAME_SIZE + 2;
    /// End of the fixed part.
    pub const END: usize = EXTRA_DATA_SIZE + 4;
}

/// QEMU's `BME_MAX_TABLE_SIZE`.
pub const BME_MAX_TABLE_SIZE: u32 = 0x800_0000;
/// QEMU's `BME_MAX_PHYS_SIZE`.
pub const BME_MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// QEMU's `BME_MIN_GRANULARITY_BITS`.
pub const BME_MIN_GRANULARITY_BITS: u8 = 9;
/// QEMU's `BME_MAX_GRANULARITY_BITS`.
pub const BME_MAX_GRANULARITY_BITS: u8 = 31;
/// QEMU's `BME_MAX_NAME_SIZE`.
pub const BME_MAX_NAME_SIZE: u16 = 1023;
/// Flag bit 0: the bitmap was in use (not saved consistently).
pub const BME_FLAG_IN_USE: u32 = 1;
/// Flags other than `in_use` and `auto`.
pub const BME_RESERVED_FLAGS: u32 = 0xffff_fffc;
/// Type 1: dirty tracking bitmap.
pub const BT_DIRTY_TRACKING_BITMAP: u8 = 1;
/// Reserved bits of a bitmap table entry.
pub const BME_TABLE_ENTRY_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Offset field of a bitmap table entry.
pub const BME_TABLE_ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 0 of a bitmap table entry: the cluster reads as all ones.
pub const BME_TABLE_ENTRY_FLAG_ALL_ONES: u64 = 1;

/// The fixed part of a bitmap directory entry, as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirEntryFixed {
    /// Offset of the bitmap table.
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// Flags (`BME_FLAG_*`).
    pub flags: u32,
    /// Bitmap type.
    pub kind: u8,
    /// log2 of the bytes one bit covers.
    pub granularity_bits: u8,
    /// Bytes of the name.
    pub name_size: u16,
    /// Bytes of extra data before the name.
    pub extra_data_size: u32,
}

impl DirEntryFixed {
    /// Decodes the first [`off::END`] bytes of `b`; `None` if `b` is shorter.
    pub fn decode(b: &[u8]) -> Option<Self> {
        let b = b.get(..off::END)?;
        Some(DirEntryFixed {
            table_offset: super::be64_at(b, off::TABLE_OFFSET)?,
            table_size: super::be32_at(b, off::TABLE_SIZE)?,
            flags: super::be32_at(b, off::FLAGS)?,
            kind: b[off::TYPE],
            granularity_bits: b[off::GRANULARITY_BITS],
            name_size: super::be16_at(b, off::NAME_SIZE)?,
            extra_data_size: super::be32_at(b, off::EXTRA_DATA_SIZE)?,
        })
    }

    /// Whether the `in_use` flag is set.
    pub fn in_use(&self) -> bool {
        self.flags & BME_FLAG_IN_USE != 0
    }
}

/// The data cluster offset of a bitmap table entry (0: none).
pub fn table_entry_offset(e: u64) -> u64 {
    e & BME_TABLE_ENTRY_OFFSET_MASK
}

/// QEMU's `check_table_entry`: whether bitmap table entry `e` is valid.
pub fn table_entry_valid(e: u64, cluster_size: u64) -> bool {
    let off = table_entry_offset(e);
    e & BME_TABLE_ENTRY_RESERVED_MASK == 0
        && (off == 0 || (e & BME_TABLE_ENTRY_FLAG_ALL_ONES == 0 && off % cluster_size == 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_entry_fields_decode_at_their_offsets() {
        let mut b = vec![0u8; 32];
        b[..8].copy_from_slice(&0x3_0000u64.to_be_bytes());
        b[8..12].copy_from_slice(&5u32.to_be_bytes());
        b[12..16].copy_from_slice(&3u32.to_be_bytes());
        b[16] = 1;
        b[17] = 16;
        b[18..20].copy_from_slice(&4u16.to_be_bytes());
        let e = DirEntryFixed::decode(&b).unwrap();
        assert_eq!(
            e,
            DirEntryFixed {
                table_offset: 0x3_0000,
                table_size: 5,
                flags: 3,
                kind: BT_DIRTY_TRACKING_BITMAP,
                granularity_bits: 16,
                name_size: 4,
                extra_data_size: 0
            }
        );
        assert!(e.in_use());
        assert_eq!(DirEntryFixed::decode(&b[..23]), None);
        assert_eq!(off::END, 24);
    }

    #[test]
    fn table_entries_follow_check_table_entry() {
        let cs = 65536;
        assert!(table_entry_valid(0, cs));
        assert!(table_entry_valid(1, cs), "all ones without a cluster");
        assert!(table_entry_valid(0x2_0000, cs));
        assert!(!table_entry_valid(0x2_0001, cs), "all ones with a cluster");
        assert!(!table_entry_valid(0x2_0200, cs), "unaligned");
        assert!(!table_entry_valid(1 << 60, cs), "reserved bits");
        assert_eq!(table_entry_offset(0x2_0000 | (1 << 63)), 0x2_0000);
    }
}
