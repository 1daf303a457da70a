//! The snapshot table: `nb_snapshots` entries at `snapshots_offset`, each
//! 8-byte aligned.
//!
//! | offset | size | field                                          |
//! |-------:|-----:|------------------------------------------------|
//! |      0 |    8 | l1_table_offset                                |
//! |      8 |    4 | l1_size (entries)                              |
//! |     12 |    2 | id_str_size                                    |
//! |     14 |    2 | name_size                                      |
//! |     16 |    4 | date_sec                                       |
//! |     20 |    4 | date_nsec                                      |
//! |     24 |    8 | vm_clock_nsec                                  |
//! |     32 |    4 | vm_state_size (32-bit)                         |
//! |     36 |    4 | extra_data_size                                |
//! |     40 |    … | extra data: u64 vm_state_size, u64 disk_size, u64 icount |
//! |      … |    … | id string, name string, padding to 8           |
//!
//! QEMU limits: at most 65536 entries, a table of at most 64 MiB, extra data of
//! at most 1024 bytes; v3 entries need at least 16 bytes of extra data.

use crate::error::{Error, Result};

/// Offsets of the fields of an entry, from the entry's start (the byte table above).
pub mod off {
    /// `l1_table_offset`.
    pub const L1_TABLE_OFFSET: usize = 0;
    /// `l1_size`.
    pub const L1_SIZE: usize = L1_TABLE_OFFSET + 8;
    /// `id_str_size`.
    pub const ID_STR_SIZE: usize = L1_SIZE + 4;
    /// `name_size`.
    pub const NAME_SIZE: usize = ID_STR_SIZE + 2;
    /// `date_sec`.
    pub const DATE_SEC: usize = NAME_SIZE + 2;
    /// `date_nsec`.
    pub const DATE_NSEC: usize = DATE_SEC + 4;
    /// `vm_clock_nsec`.
    pub const VM_CLOCK_NSEC: usize = DATE_NSEC + 4;
    /// `vm_state_size` (32-bit).
    pub const VM_STATE_SIZE: usize = VM_CLOCK_NSEC + 8;
    /// `extra_data_size`.
    pub const EXTRA_DATA_SIZE: usize = VM_STATE_SIZE + 4;
    /// Start of the extra data.
    pub const EXTRA_DATA: usize = EXTRA_DATA_SIZE + 4;
}

/// Offsets of the known fields of the extra data, from its start.
pub mod extra_data {
    /// `vm_state_size_large` (u64).
    pub const VM_STATE_SIZE_LARGE: usize = 0;
    /// `disk_size` (u64).
    pub const DISK_SIZE: usize = VM_STATE_SIZE_LARGE + 8;
    /// `icount` (u64; all ones = not recorded).
    pub const ICOUNT: usize = DISK_SIZE + 8;
}

/// Fixed part of an entry.
pub const ENTRY_FIXED: usize = off::EXTRA_DATA;
/// QEMU's limit on a snapshot table.
pub const MAX_TABLE_BYTES: u64 = 64 << 20;
/// QEMU's limit on extra data per entry.
pub const MAX_EXTRA: u32 = 1024;
/// Largest entry: the fixed part, the most extra data, two names of up to 65535
/// bytes, and padding to 8 bytes.
pub const MAX_ENTRY: u64 = ENTRY_FIXED as u64 + MAX_EXTRA as u64 + 2 * 65535 + 7;

/// One decoded snapshot entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// File offset of the entry itself.
    pub entry_offset: u64,
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Snapshot ID (usually a decimal number).
    pub id: String,
    /// Snapshot name.
    pub name: String,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock at creation.
    pub vm_clock_nsec: u64,
    /// VM state size (the 64-bit value from extra data when present).
    pub vm_state_size: u64,
    /// Virtual disk size at creation, if recorded.
    pub disk_size: Option<u64>,
    /// Length of the extra data.
    pub extra_data_size: u32,
    /// Instructions executed by the guest, if recorded (QEMU writes all ones
    /// when not).
    pub icount: Option<u64>,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Decodes `nb` entries from `table`, the bytes starting at `table_offset` (the
/// caller reads at most [`MAX_TABLE_BYTES`], bounded by the file size). Returns the
/// entries and the table's length in bytes.
pub fn decode_table(
    table: &[u8],
    table_offset: u64,
    nb: u32,
    version: u32,
) -> Result<(Vec<Snapshot>, u64)> {
    let (snapshots, len) = decode_table_lenient(table, table_offset, nb)?;
    if version >= 3 {
        if let Some((i, s)) = snapshots
            .iter()
            .enumerate()
            .find(|(_, s)| s.extra_data_size < V3_MIN_EXTRA)
        {
            return Err(Error::corrupt(
                "snapshot table",
                s.entry_offset + off::EXTRA_DATA_SIZE as u64,
                format!(
                    "entry {i} is incomplete: {} bytes of extra data, v3 needs 16",
                    s.extra_data_size
                ),
            ));
        }
    }
    Ok((snapshots, len))
}

/// Extra data a v3 entry must have (vm_state_size and disk_size).
pub const V3_MIN_EXTRA: u32 = 16;

/// Like [`decode_table`], but accepts v3 entries with less than 16 bytes of extra
/// data (`qemu-img check` counts those as corruptions rather than refusing the
/// table); callers look at [`Snapshot::extra_data_size`].
pub fn decode_table_lenient(
    table: &[u8],
    table_offset: u64,
    nb: u32,
) -> Result<(Vec<Snapshot>, u64)> {
    let mut pos = 0usize;
    let mut out = Vec::with_capacity((nb as usize).min(table.len() / ENTRY_FIXED + 1));
    for i in 0..nb {
        let at = table_offset + pos as u64;
        let fixed = table.get(pos..pos + ENTRY_FIXED).ok_or_else(|| {
            Error::corrupt(
                "snapshot table",
                at,
                format!("entry {i} extends past the end of the file or the 64 MiB limit"),
            )
        })?;
        let l1_table_offset = be64(fixed, off::L1_TABLE_OFFSET);
        let l1_size = be32(fixed, off::L1_SIZE);
        let id_len = usize::from(be16(fixed, off::ID_STR_SIZE));
        let name_len = usize::from(be16(fixed, off::NAME_SIZE));
        let date_sec = be32(fixed, off::DATE_SEC);
        let date_nsec = be32(fixed, off::DATE_NSEC);
        let vm_clock_nsec = be64(fixed, off::VM_CLOCK_NSEC);
        let vm_state32 = be32(fixed, off::VM_STATE_SIZE);
        let extra = be32(fixed, off::EXTRA_DATA_SIZE);
        if extra > MAX_EXTRA {
            return Err(Error::corrupt(
                "snapshot table",
                at + off::EXTRA_DATA_SIZE as u64,
                format!("too much extra metadata in entry {i}: {extra} bytes, QEMU allows 1024"),
            ));
        }
        let extra = extra as usize;
        let var_len = extra + id_len + name_len;
        let var_start = pos + ENTRY_FIXED;
        let var = table.get(var_start..var_start + var_len).ok_or_else(|| {
            Error::corrupt(
                "snapshot table",
                at,
                format!("entry {i} extends past the end of the table"),
            )
        })?;
        let ex = &var[..extra];
        let field = |at: usize| (extra >= at + 8).then(|| be64(ex, at));
        let vm_state_size =
            field(extra_data::VM_STATE_SIZE_LARGE).unwrap_or_else(|| u64::from(vm_state32));
        let disk_size = field(extra_data::DISK_SIZE);
        let icount = field(extra_data::ICOUNT).filter(|v| *v != u64::MAX);
        let id = String::from_utf8_lossy(&var[extra..extra + id_len]).into_owned();
        let name = String::from_utf8_lossy(&var[extra + id_len..]).into_owned();
        out.push(Snapshot {
            entry_offset: at,
            l1_table_offset,
            l1_size,
            id,
            name,
            date_sec,
            date_nsec,
            vm_clock_nsec,
            vm_state_size,
            disk_size,
            extra_data_size: extra as u32,
            icount,
        });
        pos = (var_start + var_len).div_ceil(8) * 8;
    }
    Ok((out, pos as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn truncated_table_is_corrupt_not_a_panic() {
        let t = vec![0u8; 39];
        assert!(matches!(
            decode_table(&t, 4096, 1, 3),
            Err(Error::Corrupt {
                structure: "snapshot table",
                ..
            })
        ));
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400), nb in 0u32..100, v in 2u32..4) {
            let _ = decode_table(&bytes, 0, nb, v);
        }
    }
}
