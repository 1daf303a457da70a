//! Persistent dirty bitmaps as QEMU loads them at open (`block/qcow2-bitmap.c`,
//! `qcow2_load_dirty_bitmaps`): the directory, and the table of every bitmap not
//! in use. QEMU refuses to open an image where this fails; `check` reports the
//! same problems as check errors (it shares the parsing below).
//!
//! The on-disk structures are decoded in `format::bitmaps`.

use super::open::BitmapsExtension;
use crate::error::{Error, IoContext, Result};
use crate::format::bitmaps::{
    self as bm, DirEntryFixed, BME_FLAG_IN_USE, BME_MAX_GRANULARITY_BITS, BME_MAX_NAME_SIZE,
    BME_MAX_PHYS_SIZE, BME_MAX_TABLE_SIZE, BME_MIN_GRANULARITY_BITS, BME_RESERVED_FLAGS,
    BT_DIRTY_TRACKING_BITMAP,
};
use crate::format::header::QEMU_MAX_LENGTH;
use crate::io::ReadAt;

use crate::format::bitmaps::table_entry_valid;

/// One parsed directory entry.
pub(crate) struct DirEntry {
    /// File offset of the entry.
    pub at: u64,
    pub name: String,
    pub table_offset: u64,
    pub table_size: u32,
    pub in_use: bool,
    pub granularity_bits: u8,
}

impl DirEntry {
    /// What QEMU cannot read or load about this bitmap's table before reading it:
    /// a table past QEMU's largest offset, or (for a bitmap not in use, which QEMU
    /// loads at open) a table whose size does not fit the disk size and
    /// granularity. An error is the offset and what is wrong.
    pub fn table_problem(&self, cluster_size: u64, disk_size: u64) -> Option<(u64, String)> {
        let bytes = u64::from(self.table_size) * 8;
        let (name, off) = (&self.name, self.table_offset);
        if off.saturating_add(bytes) > QEMU_MAX_LENGTH {
            return Some((
                self.at,
                format!("bitmap '{name}': table at {off:#x} lies past QEMU's largest file offset"),
            ));
        }
        if !self.in_use {
            // One bit per granule, in 64-bit words, in clusters.
            let granules = disk_size.div_ceil(1u64 << self.granularity_bits);
            let want = (granules.div_ceil(64) * 8).div_ceil(cluster_size);
            if want != u64::from(self.table_size) {
                let have = self.table_size;
                return Some((
                    self.at + 8,
                    format!(
                        "bitmap '{name}': table has {have} entries, the disk size and \
                         granularity need {want}"
                    ),
                ));
            }
        }
        None
    }
}

/// Whether the directory of `ext` ends inside the file (QEMU reads zeros past the
/// end, which no directory entry survives).
pub(crate) fn directory_in_file(ext: &BitmapsExtension, file_len: u64) -> bool {
    ext.directory_offset.saturating_add(ext.directory_size) <= file_len
}

/// QEMU's `qcow2_load_dirty_bitmaps` at open: the directory of `ext`, and the
/// table of every bitmap not in use. What fails is `Corrupt`, naming the
/// structure and offset.
pub(crate) fn load<R: ReadAt + ?Sized>(
    file: &R,
    ext: &BitmapsExtension,
    file_len: u64,
    cluster_size: u64,
    disk_size: u64,
) -> Result<()> {
    let (dir_off, dir_size) = (ext.directory_offset, ext.directory_size);
    if !directory_in_file(ext, file_len) {
        return Err(Error::corrupt(
            "header extension",
            ext.extension_offset,
            format!(
                "bitmap directory at {dir_off:#x} ({dir_size} bytes) extends past the end of \
                 the file"
            ),
        ));
    }
    // The directory is at most 64 MiB (checked with the extension) and in the file.
    let mut dir = vec![0u8; dir_size as usize];
    file.read_exact_at(&mut dir, dir_off)
        .ctx(|| format!("reading the bitmap directory at {dir_off:#x}"))?;
    let entries = parse_directory(&dir, dir_off, ext.nb_bitmaps, cluster_size, disk_size)
        .map_err(|(at, why)| Error::corrupt("bitmap directory", at, why))?;
    for bm in entries.iter().filter(|b| !b.in_use) {
        if let Some((at, why)) = bm.table_problem(cluster_size, disk_size) {
            return Err(Error::corrupt("bitmap directory", at, why));
        }
        // Past the end of the file the table reads as zeros, as in QEMU: only the
        // part inside the file is read (check_dir_entry bounded the table).
        let bytes = u64::from(bm.table_size) * 8;
        let n = bytes.min(file_len.saturating_sub(bm.table_offset));
        let mut table = vec![0u8; n as usize];
        file.read_exact_at(&mut table, bm.table_offset)
            .ctx(|| format!("reading the bitmap table at {:#x}", bm.table_offset))?;
        for (i, e) in crate::format::be64_words(&table).enumerate() {
            if !table_entry_valid(e, cluster_size) {
                return Err(Error::corrupt(
                    "bitmap table",
                    bm.table_offset + 8 * i as u64,
                    format!("bitmap '{}': invalid table entry {i} = {e:#018x}", bm.name),
                ));
            }
        }
    }
    Ok(())
}

/// QEMU's `bitmap_list_load` and `check_dir_entry`: the directory of `nb` entries
/// at `dir_off`, read from `dir`. An error is the offset and what is wrong.
pub(crate) fn parse_directory(
    dir: &[u8],
    dir_off: u64,
    nb: u32,
    cluster_size: u64,
    disk_size: u64,
) -> Result<Vec<DirEntry>, (u64, String)> {
    let cs = cluster_size;
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < dir.len() {
        let at = dir_off + pos as u64;
        let fixed = dir
            .get(pos..)
            .and_then(DirEntryFixed::decode)
            .ok_or_else(|| (at, "broken bitmap directory: truncated entry".to_string()))?;
        if out.len() >= nb as usize {
            return Err((
                at,
                "more bitmaps found than specified in the header extension".into(),
            ));
        }
        let DirEntryFixed {
            table_offset,
            table_size,
            flags,
            kind,
            granularity_bits: gran,
            name_size,
            extra_data_size: extra,
        } = fixed;
        let var = usize::from(name_size) + extra as usize;
        let next = (pos + bm::off::END + var).div_ceil(8) * 8;
        if next > dir.len() {
            return Err((at, "broken bitmap directory: entry crosses its end".into()));
        }
        let name_start = pos + bm::off::END + extra as usize;
        let name = String::from_utf8_lossy(&dir[name_start..name_start + usize::from(name_size)])
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
