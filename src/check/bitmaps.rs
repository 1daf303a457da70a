//! Counting the clusters of persistent dirty bitmaps (`block/qcow2-bitmap.c`,
//! `qcow2_check_bitmaps_refcounts`). The directory and tables are parsed as the
//! image opener loads them (`crate::image::bitmaps`, with the byte tables).

use super::refcounts::{Checker, ROLE_META};
use super::report::FindingKind as K;
use crate::error::Result;
use crate::format::bitmaps::{table_entry_offset, table_entry_valid};
use crate::image::bitmaps::{directory_in_file, parse_directory, DirEntry};
use crate::io::ReadAt;

impl<R: ReadAt + ?Sized> Checker<'_, R> {
    /// Counts the bitmap directory, each bitmap table and each data cluster.
    pub(crate) fn count_bitmaps(&mut self) -> Result<()> {
        // The opener checked the extension as QEMU does, and records it only when
        // autoclear bit 0 is set (otherwise QEMU warns that the bitmaps are
        // inconsistent and does not count them).
        let Some(ext) = self.im.bitmaps else {
            return Ok(());
        };
        let (at, nb) = (ext.extension_offset, ext.nb_bitmaps);
        let (dir_off, dir_size) = (ext.directory_offset, ext.directory_size);
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
        if !directory_in_file(&ext, self.im.file_len) {
            self.tally.note(K::CheckError, "header extension", at, || {
                format!("bitmap directory at {dir_off:#x} ({dir_size} bytes) extends past the end of the file")
            });
            return Ok(());
        }
        let dir = self.read_in_file(dir_off, dir_size, "bitmap directory")?;
        let (cs, disk_size) = (self.im.cluster_size, self.im.header.size);
        let entries = match parse_directory(&dir, dir_off, nb, cs, disk_size) {
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
        if let Some((at, why)) = bm.table_problem(cs, self.im.header.size) {
            self.tally
                .note(K::CheckError, "bitmap directory", at, || why);
            return Ok(());
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
        for (i, e) in crate::format::be64_words(&table).enumerate() {
            let at = bm.table_offset + 8 * i as u64;
            let off = table_entry_offset(e);
            if !table_entry_valid(e, cs) {
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
}
