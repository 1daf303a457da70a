//! In-place repairs that can never make a sound image unsound, even if interrupted:
//!
//! - **leaks**: a stored refcount higher than the number of references is lowered to
//!   that number (to 0 past the end of the file). A refcount that is still at least
//!   the number of references never lets a cluster be reused while it is in use.
//! - **COPIED**: the flag is set where the stored refcount is 1 and cleared where it
//!   is not (and on compressed entries). Setting it at refcount 1 only allows
//!   in-place writes to a cluster nothing else references; clearing it only forces
//!   copy-on-write.
//!
//! Each changed refcount block or table is written with one write of the whole
//! block/table ([`Refcounts::flush`](crate::image::refcounts::Refcounts::flush),
//! [`TableBytes::write_back`]), then the file is synced. Refcounts are only ever
//! lowered, so no refcount block is allocated. Repairs run only when the check
//! found no corruption other than COPIED flags and no check errors (callers ensure
//! this).

use super::refcounts::{Checker, CopiedFix};
use crate::error::{IoContext, Result};
use crate::format::l1l2::with_copied;
use crate::image::refcounts::Stored;
use crate::image::tables::TableBytes;
use crate::io::{ReadAt, WriteAt};

/// Lowers every stored refcount that exceeds the computed one. Returns the number
/// of clusters changed.
pub(crate) fn repair_leaks<F: ReadAt + WriteAt + ?Sized>(
    img: &F,
    ck: &mut Checker<'_, F>,
) -> Result<u64> {
    let cs = ck.im.cluster_size;
    let bb = ck.refcounts.entries_per_block_bits();
    let epb = 1u64 << bb;
    let mut fixed = 0u64;
    for b in 0..ck.refcounts.table().len() as u64 {
        let off = ck.refcounts.block_offset(b);
        if off == 0 || off % cs != 0 || off >= ck.im.file_len {
            continue;
        }
        let first = b << bb;
        for c in first..first + epb {
            let Stored::Count(stored) = ck.refcounts.get(img, c)? else {
                continue; // not reached: the block is aligned
            };
            let target = if c < ck.compare_len {
                u64::from(ck.computed[c as usize])
            } else {
                0
            };
            if stored > target {
                ck.refcounts.set(img, c, target)?;
                fixed += 1;
            }
        }
        // One write of the whole block, if it changed.
        ck.refcounts.flush(img)?;
    }
    if fixed > 0 {
        img.sync().ctx(|| "syncing the image".into())?;
    }
    Ok(fixed)
}

/// Applies the COPIED changes the check planned: L2 tables first, the L1 table
/// last, each table in one write. Returns the number of entries changed.
pub(crate) fn repair_copied<F: ReadAt + WriteAt + ?Sized>(
    img: &F,
    fixes: &[CopiedFix],
    l1_offset: u64,
) -> Result<u64> {
    let mut fixes = fixes.to_vec();
    // L1 last: sort by (is L1, table, entry).
    fixes.sort_by_key(|f| (f.table_offset == l1_offset, f.table_offset, f.entry_offset));
    fixes.dedup_by_key(|f| f.entry_offset);
    let mut changed = 0u64;
    for group in fixes.chunk_by(|a, b| a.table_offset == b.table_offset) {
        let first = group[0]; // chunk_by never yields an empty group
                              // Tables are at most 32 MiB (L1) or one cluster (L2).
        let mut table = TableBytes::read(img, first.table_offset, first.table_len)?;
        for f in group {
            let Some(raw) = table.word(f.entry_offset) else {
                continue;
            };
            let new = with_copied(raw, f.set);
            if new != raw {
                table.set_word(f.entry_offset, new);
                changed += 1;
            }
        }
        table.write_back(img)?;
    }
    if changed > 0 {
        img.sync().ctx(|| "syncing the image".into())?;
    }
    Ok(changed)
}
