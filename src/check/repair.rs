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
//! block/table, then the file is synced. Repairs run only when the check found no
//! corruption other than COPIED flags and no check errors (callers ensure this).

use super::refcounts::{Checker, CopiedFix};
use crate::error::{IoContext, Result};
use crate::format::l1l2::with_copied;
use crate::format::refcount::{self, REFT_OFFSET_MASK};
use crate::io::{ReadAt, WriteAt};

/// Lowers every stored refcount that exceeds the computed one. Returns the number
/// of clusters changed.
pub(crate) fn repair_leaks<F: ReadAt + WriteAt + ?Sized>(
    img: &F,
    ck: &Checker<'_, F>,
) -> Result<u64> {
    let cs = ck.im.cluster_size;
    let order = ck.im.header.refcount_order;
    let bb = ck.im.cluster_bits + 3 - order;
    let epb = 1u64 << bb;
    let mut block = vec![0u8; cs as usize];
    let mut fixed = 0u64;
    for (b, &e) in ck.reftable.iter().enumerate() {
        let off = e & REFT_OFFSET_MASK;
        if off == 0 || off % cs != 0 || off >= ck.im.file_len {
            continue;
        }
        img.read_at_zero_fill(&mut block, off)
            .ctx(|| format!("reading the refcount block at {off:#x}"))?;
        let first = (b as u64) << bb;
        let mut changed = false;
        for slot in 0..epb {
            let c = first + slot;
            let stored = refcount::get(&block, order, slot);
            let target = if c < ck.compare_len {
                u64::from(ck.computed[c as usize])
            } else {
                0
            };
            if stored > target {
                refcount::set(&mut block, order, slot, target);
                changed = true;
                fixed += 1;
            }
        }
        if changed {
            img.write_all_at(&block, off)
                .ctx(|| format!("writing the refcount block at {off:#x}"))?;
        }
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
    let mut i = 0;
    while i < fixes.len() {
        let table_offset = fixes[i].table_offset;
        let table_len = fixes[i].table_len;
        let j = fixes[i..]
            .iter()
            .position(|f| f.table_offset != table_offset)
            .map_or(fixes.len(), |p| i + p);
        // Tables are at most 32 MiB (L1) or one cluster (L2).
        let mut table = vec![0u8; table_len as usize];
        img.read_at_zero_fill(&mut table, table_offset)
            .ctx(|| format!("reading the table at {table_offset:#x}"))?;
        let mut dirty = false;
        for f in &fixes[i..j] {
            let pos = (f.entry_offset - table_offset) as usize;
            let Some(word) = table.get_mut(pos..pos + 8) else {
                continue;
            };
            let raw = u64::from_be_bytes(word.try_into().expect("8 bytes"));
            let new = with_copied(raw, f.set);
            if new != raw {
                word.copy_from_slice(&new.to_be_bytes());
                dirty = true;
                changed += 1;
            }
        }
        if dirty {
            img.write_all_at(&table, table_offset)
                .ctx(|| format!("writing the table at {table_offset:#x}"))?;
        }
        i = j;
    }
    if changed > 0 {
        img.sync().ctx(|| "syncing the image".into())?;
    }
    Ok(changed)
}
