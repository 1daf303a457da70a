//! Persistent dirty bitmaps (`docs/interop/qcow2.txt`, "Bitmaps"): the bitmaps
//! extension, the bitmap directory and bitmap tables. Names follow QEMU's
//! `block/qcow2-bitmap.c`.
//!
//! Bitmaps extension data (24 bytes): u32 `nb_bitmaps`, u32 reserved (0),
//! u64 `bitmap_directory_size`, u64 `bitmap_directory_offset`. QEMU ignores the
//! extension unless autoclear bit 0 is set.
//!
//! Bitmap directory entry (8-byte aligned; offsets in [`dir`]):
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
//! Bitmap table entry (64-bit big-endian):
//!
//! | bits  | meaning                                               |
//! |-------|-------------------------------------------------------|
//! | 0     | all ones (only with offset 0)                         |
//! | 1–8   | reserved (0)                                          |
//! | 9–55  | offset of the data cluster (cluster aligned; 0 = none)|
//! | 56–63 | reserved (0)                                          |

/// Field offsets of a bitmap directory entry.
pub mod dir {
    /// `bitmap_table_offset` (u64).
    pub const TABLE_OFFSET: usize = 0;
    /// `bitmap_table_size` (u32).
    pub const TABLE_SIZE: usize = TABLE_OFFSET + 8;
    /// `flags` (u32).
    pub const FLAGS: usize = TABLE_SIZE + 4;
    /// `type` (u8).
    pub const TYPE: usize = FLAGS + 4;
    /// `granularity_bits` (u8).
    pub const GRANULARITY_BITS: usize = TYPE + 1;
    /// `name_size` (u16).
    pub const NAME_SIZE: usize = GRANULARITY_BITS + 1;
    /// `extra_data_size` (u32).
    pub const EXTRA_DATA_SIZE: usize = NAME_SIZE + 2;
    /// Length of the fixed part of an entry.
    pub const FIXED_LEN: usize = EXTRA_DATA_SIZE + 4;
}

/// Largest bitmap table, in entries.
pub const BME_MAX_TABLE_SIZE: u32 = 0x800_0000;
/// Largest bitmap table, in bytes of clusters it may describe.
pub const BME_MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Smallest `granularity_bits`.
pub const BME_MIN_GRANULARITY_BITS: u8 = 9;
/// Largest `granularity_bits`.
pub const BME_MAX_GRANULARITY_BITS: u8 = 31;
/// Longest bitmap name.
pub const BME_MAX_NAME_SIZE: u16 = 1023;
/// Directory entry flag: the bitmap is in use (being written; its data is stale).
pub const BME_FLAG_IN_USE: u32 = 1;
/// Directory entry flags that must be 0.
pub const BME_RESERVED_FLAGS: u32 = 0xffff_fffc;
/// The only bitmap type: dirty tracking.
pub const BT_DIRTY_TRACKING_BITMAP: u8 = 1;
/// Reserved bits of a bitmap table entry.
pub const BME_TABLE_ENTRY_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Offset field of a bitmap table entry.
pub const BME_TABLE_ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 0 of a bitmap table entry: every bit of the cluster is set.
pub const BME_TABLE_ENTRY_FLAG_ALL_ONES: u64 = 1;

/// The data cluster offset of a bitmap table entry (0 if none).
pub fn table_entry_offset(e: u64) -> u64 {
    e & BME_TABLE_ENTRY_OFFSET_MASK
}

/// QEMU's `check_table_entry`: whether bitmap table entry `e` is valid (no
/// reserved bits; a data cluster is cluster aligned and not "all ones").
pub fn table_entry_valid(e: u64, cluster_size: u64) -> bool {
    let off = table_entry_offset(e);
    e & BME_TABLE_ENTRY_RESERVED_MASK == 0
        && (off == 0 || (e & BME_TABLE_ENTRY_FLAG_ALL_ONES == 0 && off % cluster_size == 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_match_the_spec() {
        assert_eq!(dir::FIXED_LEN, 24);
        assert_eq!(
            (dir::TABLE_SIZE, dir::FLAGS, dir::TYPE, dir::NAME_SIZE),
            (8, 12, 16, 18)
        );
        assert_eq!(
            BME_TABLE_ENTRY_OFFSET_MASK | BME_TABLE_ENTRY_RESERVED_MASK | 1,
            u64::MAX
        );
        assert!(table_entry_valid(0x1_0000, 0x1_0000));
        assert!(table_entry_valid(1, 0x1_0000));
        assert!(!table_entry_valid(0x1_0001, 0x1_0000));
        assert!(!table_entry_valid(0x1_0200, 0x1_0000));
    }
}
