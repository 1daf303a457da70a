//! Counting the clusters of persistent dirty bitmaps (`block/qcow2-bitmap.c`,
//! `qcow2_check_bitmaps_refcounts`).
//!
//! Bitmaps extension data (24 bytes): u32 `nb_bitmaps`, u32 reserved (0),
//! u64 `bitmap_directory_size`, u64 `bitmap_directory_offset`. QEMU ignores the
//! extension unless autoclear bit 0 is set.
//!
//! Bitmap directory entry (8-byte aligned):
//!
//! | offset | size | field                                     |
//! |-------:|-----:|-------------------------------------------|
//! |      0 |    8 | `bitmap_table_offset` (cluster aligned)     |
//! |      8 |    4 | `bitmap_table_size` (entries)               |
//! |     12 |    4 | flags: bit 0 `in_use`, bit 1 auto           |
//! |     16 |    1 | type (1 = dirty tracking)                 |
//! |     17 |    1 | `granularity_bits` (9..=31)                 |
//! |     18 |    2 | `name_size` (≤ 1023)                        |
//! |     20 |    4 | `extra_data_size` (QEMU supports only 0)    |
//! |     24 |    … | extra data, name, padding to 8            |
//!
//! Bitmap table entry: bit 0 "all ones" (only with offset 0), bits 9–55 data
//! cluster offset, everything else reserved.

use super::refcounts::{Checker, ROLE_META};
use super::report::FindingKind as K;
use crate::error::Result;
use crate::format::extensions::QCOW2_EXT_MAGIC_BITMAPS;
use crate::format::header::{QCOW2_AUTOCLEAR_BITMAPS, QEMU_MAX_LENGTH};
use crate::io::ReadAt;

const MAX_BITMAPS: u32 = 65535;
const MAX_DIRECTORY_SIZE: u64 = 1024 * MAX_BITMAPS as u64;
const DIR_ENTRY_FIXED: usize = 24;
const BME_MAX_TABLE_SIZE: u32 = 0x800_0000;
const BME_MAX_PHYS_SIZE: u64 = 0x2000_0000;
const BME_MIN_GRANULARITY_BITS: u8 = 9;
const BME_MAX_GRANULARITY_BITS: u8 = 31;
const BME_MAX_NAME_SIZE: u16 = 1023;
const BME_FLAG_IN_USE: u32 = 1;
const BME_RESERVED_FLAGS: u32 = 0xffff_fffc;
const BT_DIRTY_TRACKING_BITMAP: u8 = 1;
const BME_TABLE_ENTRY_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
const BME_TABLE_ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
const BME_TABLE_ENTRY_FLAG_ALL_ONES: u64 = 1;

fn be(b: &[u8], at: usize, n: usize) -> u64 {
    // Callers pass slices of at least at + n bytes.
    b[at..at + n]
        .iter()
        .fold(0u64, |v, x| (v << 8) | u64::from(*x))
}

/// One parsed directory entry.
struct DirEntry {
    at: u64,
    name: String,
    table_offset: u64,
    table_size: u32,
    in_use: bool,
    granularity_bits: u8,
}

impl<R: ReadAt + ?Sized> Checker<'_, R> {
    /// Counts the bitmap directory, each bitmap table and each data cluster.
    pub(crate) fn count_bitmaps(&mut self) -> Result<()> {
        let Some(ext) = self.im.extension(QCOW2_EXT_MAGIC_BITMAPS) else {
            return Ok(());
        };
        if self.im.header.autoclear_features & QCOW2_AUTOCLEAR_BITMAPS == 0 {
            // QEMU warns that the bitmaps are inconsistent and does not count them.
            return Ok(());
        }
        let at = ext.offset;
        let cs = self.im.cluster_size;
        let d = &ext.data;
        if d.len() != 24 {
            let n = d.len();
            self.tally.note(K::CheckError, "header extension", at, || {
                format!("bitmaps extension has {n} bytes, expected 24")
            });
            return Ok(());
        }
        let nb = be(d, 0, 4) as u32;
        let reserved = be(d, 4, 4);
        let dir_size = be(d, 8, 8);
        let dir_off = be(d, 16, 8);
        if reserved != 0
            || nb == 0
            || nb > MAX_BITMAPS
            || dir_off % cs != 0
            || dir_size > MAX_DIRECTORY_SIZE
        {
            self.tally.note(K::CheckError, "header extension", at, || {
                format!(
                    "invalid bitmaps extension: {nb} bitmaps, reserved {reserved:#x}, directory \
                     at {dir_off:#x} of {dir_size} bytes"
                )
            });
            return Ok(());
        }
        self.inc(
            dir_off,
            dir_size,
            ROLE_META,
            "bitmap directory",
            ("header extension", at),
        );
        // QEMU loads the bitmap directory (and the tables of bitmaps not in use)
        // when it opens the image; where that fails it cannot open the image, so
        // `qemu-img check` exits 1. Those problems are check errors here too.
        if dir_off.saturating_add(dir_size) > self.im.file_len {
            self.tally.note(K::CheckError, "header extension", at, || {
                format!("bitmap directory at {dir_off:#x} ({dir_size} bytes) extends past the end of the file")
            });
            return Ok(());
        }
        let dir = self.read_in_file(dir_off, dir_size, "bitmap directory")?;
        let entries = match self.parse_directory(&dir, dir_off, nb) {
            Ok(e) => e,
            Err((off, why)) => {
                self.tally
                    .note(K::CheckError, "bitmap directory", off, || why);
                return Ok(());
            }
        };
        for bm in entries {
            self.count_bitmap(&bm)?;
        }
        Ok(())
    }

    fn count_bitmap(&mut self, bm: &DirEntry) -> Result<()> {
        let cs = self.im.cluster_size;
        let bytes = u64::from(bm.table_size) * 8;
        if bm.table_offset.saturating_add(bytes) > QEMU_MAX_LENGTH {
            let (name, off) = (&bm.name, bm.table_offset);
            self.tally
                .note(K::CheckError, "bitmap directory", bm.at, || {
                    format!(
                        "bitmap '{name}': table at {off:#x} lies past QEMU's largest file offset"
                    )
                });
            return Ok(());
        }
        if !bm.in_use {
            // QEMU loads this bitmap at open and insists on the exact table size:
            // one bit per granule, in 64-bit words, in clusters.
            let granules = self.im.header.size.div_ceil(1u64 << bm.granularity_bits);
            let want = (granules.div_ceil(64) * 8).div_ceil(cs);
            if want != u64::from(bm.table_size) {
                let (name, have) = (&bm.name, bm.table_size);
                self.tally
                    .note(K::CheckError, "bitmap directory", bm.at + 8, || {
                        format!(
                            "bitmap '{name}': table has {have} entries, the disk size and \
                         granularity need {want}"
                        )
                    });
                return Ok(());
            }
        }
        self.inc(
            bm.table_offset,
            bytes,
            ROLE_META,
            "bitmap table",
            ("bitmap directory", bm.at),
        );
        // Past the end of the file the table reads as zeros (no clusters), as in
        // QEMU; `inc` reported it if it ends a cluster or more past the end. Only
        // the part inside the file is read, so the allocation is bounded by it.
        let table = self.read_in_file(bm.table_offset, bytes, "bitmap table")?;
        for (i, c) in table.chunks_exact(8).enumerate() {
            let e = be(c, 0, 8);
            let at = bm.table_offset + 8 * i as u64;
            let off = e & BME_TABLE_ENTRY_OFFSET_MASK;
            let bad = e & BME_TABLE_ENTRY_RESERVED_MASK != 0
                || (off != 0 && (e & BME_TABLE_ENTRY_FLAG_ALL_ONES != 0 || off % cs != 0));
            if bad {
                let name = &bm.name;
                // QEMU fails to open the image over a bad entry of a bitmap it loads
                // (one not in use), and its check fails over the others.
                self.tally.note(K::CheckError, "bitmap table", at, || {
                    format!("bitmap '{name}': invalid table entry {i} = {e:#018x}")
                });
                continue;
            }
            if off != 0 {
                self.inc(off, cs, ROLE_META, "bitmap data", ("bitmap table", at));
            }
        }
        Ok(())
    }

    /// QEMU's `bitmap_list_load` and `check_dir_entry`.
    fn parse_directory(
        &self,
        dir: &[u8],
        dir_off: u64,
        nb: u32,
    ) -> Result<Vec<DirEntry>, (u64, String)> {
        let cs = self.im.cluster_size;
        let disk_size = self.im.header.size;
        let mut out = Vec::new();
        let mut pos = 0usize;
        while pos < dir.len() {
            let at = dir_off + pos as u64;
            let fixed = dir
                .get(pos..pos + DIR_ENTRY_FIXED)
                .ok_or_else(|| (at, "broken bitmap directory: truncated entry".to_string()))?;
            if out.len() >= nb as usize {
                return Err((
                    at,
                    "more bitmaps found than specified in the header extension".into(),
                ));
            }
            let table_offset = be(fixed, 0, 8);
            let table_size = be(fixed, 8, 4) as u32;
            let flags = be(fixed, 12, 4) as u32;
            let kind = fixed[16];
            let gran = fixed[17];
            let name_size = be(fixed, 18, 2) as u16;
            let extra = be(fixed, 20, 4) as u32;
            let var = usize::from(name_size) + extra as usize;
            let next = (pos + DIR_ENTRY_FIXED + var).div_ceil(8) * 8;
            if next > dir.len() {
                return Err((at, "broken bitmap directory: entry crosses its end".into()));
            }
            let name_start = pos + DIR_ENTRY_FIXED + extra as usize;
            let name =
                String::from_utf8_lossy(&dir[name_start..name_start + usize::from(name_size)])
                    .into_owned();
            if extra != 0 {
                return Err((at, format!("bitmap '{name}': extra data is not supported")));
            }
            let phys = u64::from(table_size) * cs;
            let fail = table_size == 0
                || table_offset == 0
                || table_offset % cs != 0
                || table_size > BME_MAX_TABLE_SIZE
                || !(BME_MIN_GRANULARITY_BITS..=BME_MAX_GRANULARITY_BITS).contains(&gran)
                || flags & BME_RESERVED_FLAGS != 0
                || name_size > BME_MAX_NAME_SIZE
                || kind != BT_DIRTY_TRACKING_BITMAP
                || phys > BME_MAX_PHYS_SIZE
                || (flags & BME_FLAG_IN_USE == 0 && disk_size > (phys * 8) << gran);
            if fail {
                return Err((
                    at,
                    format!("bitmap '{name}' doesn't satisfy the constraints"),
                ));
            }
            out.push(DirEntry {
                at,
                name,
                table_offset,
                table_size,
                in_use: flags & BME_FLAG_IN_USE != 0,
                granularity_bits: gran,
            });
            pos = next;
        }
        if out.len() != nb as usize {
            return Err((
                dir_off,
                format!(
                    "{} bitmaps found, the header extension says {nb}",
                    out.len()
                ),
            ));
        }
        Ok(out)
    }
}
