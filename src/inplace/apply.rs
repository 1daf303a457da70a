//! The writes, in the order that keeps the image sound if they stop anywhere.
//!
//! A flush group of remaps (duplicate `B` → survivor `S`, see [`super::plan`]):
//!
//! 1. clear COPIED on `S`'s entries (L2 tables, one write each), sync; raise
//!    `S`'s refcount by the number of `B`'s entries (refcount blocks), sync (the
//!    sync between them matters after a power loss, which may keep later writes
//!    and lose earlier ones: a raised refcount under an entry still marked
//!    COPIED would be a corruption);
//! 2. point `B`'s entries at `S`, without COPIED (L2 tables), sync;
//! 3. lower `B`'s refcount to 0 (refcount blocks), sync;
//! 4. punch `B`'s clusters out of the file, in runs of adjacent clusters
//!    across groups, once the image is final: after the last group and the
//!    final repair and their syncs ([`super::punch`]; with `--compact` most of
//!    them are filled again by the moves, and the rest is punched then).
//!
//! After the last group, plain dedup moves a few clusters in use that lie
//! between two freed ones into freed clusters that lie between two in use
//! ([`super::plan::bridges`]): the same steps as the moves below, and then the
//! runs around each moved cluster are punched as one.
//!
//! A group of moves (`--compact`: cluster `C` at the end of the file → free
//! cluster `H` below):
//!
//! 1. copy `C`'s bytes to `H`, give `H` `C`'s refcount, sync;
//! 2. point `C`'s entries at `H` (COPIED as it was), sync;
//! 3. lower `C`'s refcount to 0, sync;
//!
//! and, after the last group, the file is cut after its last cluster in use.
//!
//! Stopped anywhere, every reference has a refcount at least as high as the
//! number of references (step 1 before step 2, step 2 before step 3), and no
//! entry has COPIED on a cluster with refcount > 1: what is left is leaked
//! clusters and, between the L2 write and the refcount write of step 1, an entry
//! without COPIED at refcount 1 (qdedup's relaxed COPIED state; `qemu-img check`
//! counts it as a repairable corruption). See docs/inplace.md.

use std::collections::BTreeMap;

use crate::error::{IoContext, Result};
use crate::format::l1l2::{L2E_OFFSET_MASK, QCOW_OFLAG_COPIED};
use crate::image::refcounts::{Refcounts, Stored};
use crate::image::tables::TableBytes;
use crate::io::{ReadAt, WriteAt};

use super::plan::Remap;
use super::scan::{Host, Scan};

/// Writes the changes, holding the refcounts and the changed L2 tables.
pub(crate) struct Apply<'a, F: ReadAt + WriteAt + ?Sized> {
    file: &'a F,
    refcounts: &'a mut Refcounts,
    cluster_bits: u32,
    /// Sync after each step (off only for tests and benchmarks that ask).
    sync: bool,
    /// L2 tables read so far, by offset.
    tables: BTreeMap<u64, TableBytes>,
}

impl<'a, F: ReadAt + WriteAt + ?Sized> Apply<'a, F> {
    pub(crate) fn new(
        file: &'a F,
        refcounts: &'a mut Refcounts,
        cluster_bits: u32,
        sync: bool,
    ) -> Self {
        Apply {
            file,
            refcounts,
            cluster_bits,
            sync,
            tables: BTreeMap::new(),
        }
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Changes the entry at `at` with `f` (in memory; see [`Apply::write_tables`]).
    fn edit(&mut self, at: u64, f: impl FnOnce(u64) -> u64) -> Result<()> {
        let cs = self.cs();
        let table = at & !(cs - 1);
        if !self.tables.contains_key(&table) {
            let t = TableBytes::read(self.file, table, cs)?;
            self.tables.insert(table, t);
        }
        let t = self.tables.get_mut(&table).expect("inserted above");
        // The scan found the entry in this table: the word is there.
        let raw = t.word(at).unwrap_or(0);
        t.set_word(at, f(raw));
        Ok(())
    }

    /// Writes every changed table (one write each, in offset order).
    fn write_tables(&mut self) -> Result<()> {
        for t in self.tables.values_mut() {
            t.write_back(self.file)?;
        }
        Ok(())
    }

    fn sync(&self) -> Result<()> {
        if self.sync {
            self.file.sync().ctx(|| "syncing the image".into())?;
        }
        Ok(())
    }

    fn rc(&mut self, cluster: u64) -> Result<u64> {
        Ok(match self.refcounts.get(self.file, cluster)? {
            Stored::Count(n) => n,
            // The scan read this refcount already; an unreadable one is refused
            // by the check before anything is planned.
            Stored::Unreadable { block } => {
                return Err(crate::Error::corrupt(
                    "refcount table",
                    block,
                    "refcount block offset is not cluster aligned",
                ))
            }
        })
    }

    /// Applies one flush group of remaps (steps 1 to 4 of the module doc).
    /// Returns the number of entries remapped.
    pub(crate) fn remap_group(&mut self, scan: &Scan, group: &[Remap]) -> Result<u64> {
        let cb = self.cluster_bits;
        // 1. The survivors: COPIED off, refcount up.
        for r in group {
            for e in scan.refs_of(&scan.hosts[r.to]) {
                self.edit(e.at, |raw| raw & !QCOW_OFLAG_COPIED)?;
            }
        }
        self.write_tables()?;
        // Durable before any refcount goes up (see the module doc).
        self.sync()?;
        for r in group {
            let (to, from) = (scan.hosts[r.to], scan.hosts[r.from]);
            let rc = self.rc(to.cluster)?;
            // The plan kept every survivor within the maximum.
            self.refcounts.set(self.file, to.cluster, rc + from.n)?;
        }
        self.refcounts.flush(self.file)?;
        self.sync()?;
        // 2. The duplicates' entries point at the survivors.
        let mut entries = 0;
        for r in group {
            let to = scan.hosts[r.to].cluster << cb;
            for e in scan.refs_of(&scan.hosts[r.from]) {
                self.edit(e.at, |raw| {
                    (raw & !(L2E_OFFSET_MASK | QCOW_OFLAG_COPIED)) | to
                })?;
                entries += 1;
            }
        }
        self.write_tables()?;
        self.sync()?;
        // 3. The duplicates are free.
        for r in group {
            let from: Host = scan.hosts[r.from];
            let rc = self.rc(from.cluster)?;
            self.refcounts
                .set(self.file, from.cluster, rc.saturating_sub(from.n))?;
        }
        self.refcounts.flush(self.file)?;
        self.sync()?;
        // The tables are written: memory stays bounded by one group's tables.
        self.tables.clear();
        // 4. Their space goes back to the file system at the end (`punch.rs`).
        Ok(entries)
    }

    /// Applies one group of moves `(host, free cluster)` (steps 1 to 3 of the
    /// module doc's compaction).
    pub(crate) fn move_group(&mut self, scan: &Scan, group: &[(usize, u64)]) -> Result<()> {
        let cb = self.cluster_bits;
        let mut buf = vec![0u8; self.cs() as usize];
        // 1. Copy, and count the copy.
        for &(h, dst) in group {
            let src = scan.hosts[h].cluster;
            self.file
                .read_exact_at(&mut buf, src << cb)
                .ctx(|| format!("reading the data cluster at {:#x}", src << cb))?;
            self.file
                .write_all_at(&buf, dst << cb)
                .ctx(|| format!("writing the data cluster at {:#x}", dst << cb))?;
            let rc = self.rc(src)?;
            self.refcounts.set(self.file, dst, rc)?;
        }
        self.refcounts.flush(self.file)?;
        self.sync()?;
        // 2. Repoint, COPIED as it was.
        for &(h, dst) in group {
            for e in scan.refs_of(&scan.hosts[h]) {
                self.edit(e.at, |raw| (raw & !L2E_OFFSET_MASK) | (dst << cb))?;
            }
        }
        self.write_tables()?;
        self.sync()?;
        self.tables.clear();
        // 3. Free the originals.
        for &(h, _) in group {
            self.refcounts.set(self.file, scan.hosts[h].cluster, 0)?;
        }
        self.refcounts.flush(self.file)?;
        self.sync()
    }

    /// Moves the L2 tables `group` (`(index in Scan::l2_tables, free cluster)`):
    /// copy each table and count the copy, sync; switch the L1 entries (COPIED
    /// as it was), sync; free the old tables, sync.
    pub(crate) fn move_l2_group(&mut self, scan: &Scan, group: &[(usize, u64)]) -> Result<()> {
        use crate::format::l1l2::L1E_OFFSET_MASK;
        let cb = self.cluster_bits;
        let cs = self.cs();
        // The tables as written so far.
        self.write_tables()?;
        for &(i, dst) in group {
            let t = scan.l2_tables[i];
            self.tables.remove(&t.offset);
            let bytes = TableBytes::read(self.file, t.offset, cs)?;
            self.file
                .write_all_at(bytes.bytes(), dst << cb)
                .ctx(|| format!("writing the L2 table at {:#x}", dst << cb))?;
            self.refcounts.set(self.file, dst, 1)?;
        }
        self.refcounts.flush(self.file)?;
        self.sync()?;
        for &(i, dst) in group {
            let t = scan.l2_tables[i];
            let raw = (t.l1_raw & !L1E_OFFSET_MASK) | (dst << cb);
            self.file
                .write_all_at(&raw.to_be_bytes(), t.l1_at)
                .ctx(|| format!("writing the L1 entry at {:#x}", t.l1_at))?;
        }
        self.sync()?;
        for &(i, _) in group {
            self.refcounts
                .set(self.file, scan.l2_tables[i].offset >> cb, 0)?;
        }
        self.refcounts.flush(self.file)?;
        self.sync()
    }

    /// Moves refcount block `b` to the free cluster `dst`
    /// ([`Refcounts::move_block`]).
    pub(crate) fn move_refblock(&mut self, b: u64, dst: u64) -> Result<()> {
        self.refcounts
            .move_block(self.file, b, dst << self.cluster_bits)
    }

    /// The clusters in use (refcount > 0) below `end`, one bool each.
    pub(crate) fn used(&mut self, end: u64) -> Result<Vec<bool>> {
        used(self.file, self.refcounts, self.cluster_bits, end)
    }
}

/// The clusters in use (stored refcount > 0) below cluster `end`.
pub(crate) fn used<F: ReadAt + ?Sized>(
    file: &F,
    refcounts: &Refcounts,
    cluster_bits: u32,
    end: u64,
) -> Result<Vec<bool>> {
    use crate::format::refcount;
    use crate::image::refcounts::BlockRead;
    let n = usize::try_from(end)
        .map_err(|_| crate::Error::LimitExceeded("cluster map larger than memory".into()))?;
    let mut out = vec![false; n];
    let bits = refcounts.entries_per_block_bits();
    let mut buf = vec![0u8; 1 << cluster_bits];
    let blocks = end.div_ceil(1 << bits);
    for b in 0..blocks {
        match refcounts.read_block(file, b, &mut buf)? {
            BlockRead::Empty => {}
            // Treated as in use: never a move target, never cut off.
            BlockRead::Unreadable { .. } => {
                let first = (b << bits) as usize;
                let last = (((b + 1) << bits) as usize).min(n);
                out[first..last].fill(true);
            }
            BlockRead::Read { .. } => {
                for s in 0..(1u64 << bits) {
                    let c = (b << bits) + s;
                    if c >= end {
                        break;
                    }
                    out[c as usize] = refcount::get(&buf, refcounts.order(), s) > 0;
                }
            }
        }
    }
    Ok(out)
}

/// What a cluster `--compact` may move holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Movable {
    /// Data: index in [`Scan::hosts`] of a cluster every reference of which may
    /// change.
    Data(usize),
    /// An L2 table: index in [`Scan::l2_tables`].
    L2(usize),
    /// Refcount block `b` (refcount table entry `b`).
    RefBlock(u64),
}

/// Which clusters to move where: the last cluster in use moves into the first
/// free one below it, again and again, until the last one cannot move (the
/// header, the L1 or refcount table, a snapshot's table, a cluster a snapshot
/// shares) or no free cluster is left below it. `used` is updated; returns the
/// moves and the cluster count the file can be cut to.
pub(crate) fn plan_moves(
    used: &mut [bool],
    movable: &BTreeMap<u64, Movable>,
) -> (Vec<(Movable, u64)>, u64) {
    let mut moves = Vec::new();
    let mut hole = 0usize;
    let mut top = used.len();
    loop {
        while top > 0 && !used[top - 1] {
            top -= 1;
        }
        if top == 0 {
            break;
        }
        let Some(&m) = movable.get(&((top - 1) as u64)) else {
            break;
        };
        while hole < top - 1 && used[hole] {
            hole += 1;
        }
        if hole >= top - 1 {
            break;
        }
        moves.push((m, hole as u64));
        used[hole] = true;
        used[top - 1] = false;
    }
    (moves, top as u64)
}

/// The clusters `--compact` may move: data clusters whose every reference may
/// change (less `freed`, which a dry run only plans to free), the writable L2
/// tables and the refcount blocks.
pub(crate) fn movable(
    scan: &Scan,
    refcounts: &Refcounts,
    cluster_bits: u32,
    freed: &std::collections::HashSet<usize>,
) -> BTreeMap<u64, Movable> {
    let mut m = BTreeMap::new();
    for (i, h) in scan.hosts.iter().enumerate() {
        if h.removable() && !freed.contains(&i) {
            m.insert(h.cluster, Movable::Data(i));
        }
    }
    for (i, t) in scan.l2_tables.iter().enumerate() {
        m.insert(t.offset >> cluster_bits, Movable::L2(i));
    }
    for (b, &e) in (0u64..).zip(refcounts.table()) {
        let off = e & crate::format::refcount::REFT_OFFSET_MASK;
        if off != 0 && off % (1 << cluster_bits) == 0 {
            m.insert(off >> cluster_bits, Movable::RefBlock(b));
        }
    }
    m
}
