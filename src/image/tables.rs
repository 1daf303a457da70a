//! The L1 and L2 tables of an existing image: reading them (checked), writing them
//! back whole, and walking the active tree and every snapshot's tree with a
//! [`Visitor`]. `check`, its repairs and the dedup figures of `info` are visitors;
//! the entries are decoded by [`L2Layout`], the one L2 decoder.
//!
//! Reading follows QEMU:
//!
//! - an **L1 table** ([`Tables::read_l1`]) must pass QEMU's checks of a snapshot's
//!   table ([`Tree::problem`]: cluster aligned, at most 32 MiB, ending before
//!   QEMU's largest offset); entries past the end of the file read as zeros (only
//!   the part inside the file is held in memory, so a table never costs more
//!   memory than the file has bytes);
//! - an **L2 table** ([`Tables::read_l2`]) must be cluster aligned (an error naming
//!   the L1 entry otherwise); past the end of the file it reads as zeros, as QEMU
//!   reads it, or is a corruption, as the readers of guest data require: the
//!   [`PastEof`] policy says which.
//!
//! The walk ([`Walker::walk`]) visits the trees in the order given, in QEMU's
//! `check_refcounts_l1` / `check_refcounts_l2` order:
//!
//! ```text
//! for each tree:      Visitor::tree          (false: skip the tree)
//!   read the L1 table
//!   each L1 entry ≠ 0: Visitor::l1_entry      (false, or no L2 offset: skip the table)
//!     read the L2 table
//!     Visitor::l2_table
//!     each L2 entry ≠ 0: Visitor::l2_entry    (descriptor and bitmap not both 0)
//!     Visitor::l2_table_end
//!   Visitor::tree_end
//! ```
//!
//! Every reference path is walked: an L2 table under two L1 entries, or in two
//! trees, is visited twice; [`L2Table::first_visit`] tells the first visit (within
//! one [`Walker`]) from the others, for checks that must be made once per table.
//!
//! Writing: [`TableBytes`] holds a whole table, changes entries in memory and
//! [`TableBytes::write_back`] writes the table with one write, so an interrupted
//! repair leaves each table either old or new (callers sync once at the end).
//!
//! Memory: a [`Walker`] holds one bit per host cluster of the file (the
//! first-visit set), one L2 table and the L1 table being walked.

use crate::error::{Error, IoContext, Result};
use crate::format::header::{off as hoff, Header, MAX_L1_BYTES, QEMU_MAX_LENGTH};
use crate::format::l1l2::{L1Entry, L2Entry, L2Layout, L2Slot};
use crate::format::snapshot::Snapshot;
use crate::io::{ReadAt, WriteAt};

use super::Image;

/// QEMU's limit on an L1 table, in entries (32 MiB).
pub const MAX_L1_ENTRIES: u32 = (MAX_L1_BYTES / 8) as u32;

impl Image {
    /// How this image lays out its L2 tables (the decoder's context).
    pub fn l2_layout(&self) -> L2Layout {
        L2Layout {
            cluster_bits: self.cluster_bits,
            extended: self.extended_l2,
            data_file: self.data_file,
        }
    }
}

fn to_usize(v: u64, what: &str) -> Result<usize> {
    usize::try_from(v)
        .map_err(|_| Error::LimitExceeded(format!("{what}: {v} bytes do not fit in memory")))
}

/// One L1/L2 tree: the active one or a snapshot's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tree {
    /// Index of the snapshot in the snapshot table; `None` for the active tree.
    pub snapshot: Option<usize>,
    /// What refers to the L1 table: the structure and the file offset of the
    /// reference (the header's `l1_table_offset`, or the snapshot table entry).
    pub referrer: (&'static str, u64),
    /// File offset of the L1 table.
    pub l1_offset: u64,
    /// Entries in the L1 table.
    pub l1_size: u32,
}

/// Why an L1 table cannot be read (QEMU's checks of a snapshot's L1 table; the
/// opener makes the same checks of the active one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L1Problem {
    /// The offset is not cluster aligned.
    Unaligned,
    /// More entries than QEMU's 32 MiB limit ([`MAX_L1_ENTRIES`]).
    TooLarge,
    /// The table ends past QEMU's largest file offset ([`QEMU_MAX_LENGTH`]): QEMU
    /// cannot read it.
    PastMaxLength,
}

impl Tree {
    /// The active tree of the image whose header is `h`.
    pub fn active(h: &Header) -> Self {
        Tree {
            snapshot: None,
            referrer: ("header", hoff::L1_TABLE_OFFSET as u64),
            l1_offset: h.l1_table_offset,
            l1_size: h.l1_size,
        }
    }

    /// The tree of snapshot `index`, whose table entry is `s`.
    pub fn snapshot(index: usize, s: &Snapshot) -> Self {
        Tree {
            snapshot: Some(index),
            referrer: ("snapshot table", s.entry_offset),
            l1_offset: s.l1_table_offset,
            l1_size: s.l1_size,
        }
    }

    /// The trees of every snapshot in `snapshots`, in table order.
    pub fn snapshots(snapshots: &[Snapshot]) -> Vec<Self> {
        snapshots
            .iter()
            .enumerate()
            .map(|(i, s)| Tree::snapshot(i, s))
            .collect()
    }

    /// Whether this is the active tree.
    pub fn is_active(&self) -> bool {
        self.snapshot.is_none()
    }

    /// The structure name of its L1 table, for findings and errors.
    pub fn l1_structure(&self) -> &'static str {
        if self.is_active() {
            "L1 table"
        } else {
            "snapshot L1 table"
        }
    }

    /// Length of the L1 table in bytes.
    pub fn l1_bytes(&self) -> u64 {
        u64::from(self.l1_size) * 8
    }

    /// Why the L1 table cannot be read, if it cannot, checked in QEMU's order.
    pub fn problem(&self, cluster_size: u64) -> Option<L1Problem> {
        if self.l1_offset % cluster_size != 0 {
            return Some(L1Problem::Unaligned);
        }
        if self.l1_size > MAX_L1_ENTRIES {
            return Some(L1Problem::TooLarge);
        }
        let end = self.l1_offset.checked_add(self.l1_bytes());
        if self.l1_size > 0 && end.is_none_or(|e| e > QEMU_MAX_LENGTH) {
            return Some(L1Problem::PastMaxLength);
        }
        None
    }
}

/// An L1 table as read: the entries inside the file (those past its end read as
/// zero).
#[derive(Debug, Clone)]
pub struct L1Table {
    /// The tree it belongs to.
    pub tree: Tree,
    entries: Vec<u64>,
}

impl L1Table {
    /// Raw entry `i` (0 past the end of the file or of the table).
    pub fn get(&self, i: u64) -> u64 {
        usize::try_from(i)
            .ok()
            .and_then(|i| self.entries.get(i))
            .copied()
            .unwrap_or(0)
    }

    /// The raw entries that lie inside the file, from entry 0; the rest of the
    /// table's `l1_size` entries are zero.
    pub fn stored(&self) -> &[u64] {
        &self.entries
    }
}

/// One L1 entry as the walker visits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L1Ref {
    /// The tree of the L1 table.
    pub tree: Tree,
    /// Index of the entry in the L1 table.
    pub index: u64,
    /// File offset of the entry.
    pub at: u64,
    /// The entry as stored.
    pub raw: u64,
    /// The decoded entry.
    pub entry: L1Entry,
}

/// One L2 table as the walker visits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Table {
    /// The L1 entry pointing to it.
    pub l1: L1Ref,
    /// File offset of the table (cluster aligned).
    pub offset: u64,
    /// Whether this walker visits this table for the first time (another L1
    /// entry, in this tree or another, may have pointed to it before).
    pub first_visit: bool,
}

impl L2Table {
    /// Whether the table is reached from the active tree.
    pub fn active(&self) -> bool {
        self.l1.tree.is_active()
    }
}

/// One L2 entry as the walker visits it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Ref {
    /// Index of the entry in its table.
    pub index: u64,
    /// File offset of the entry (its descriptor word).
    pub at: u64,
    /// The guest cluster it maps (in its tree).
    pub guest_cluster: u64,
    /// The descriptor and subcluster bitmap as stored.
    pub slot: L2Slot,
    /// The decoded descriptor ([`L2Layout::decode`]).
    pub entry: L2Entry,
}

/// What reading an L2 table past the end of the file gives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PastEof {
    /// Zeros, as QEMU reads it (`qemu-img check`; `check` reports the reference
    /// itself when it lies a cluster or more past the end).
    Zeros,
    /// A corruption naming the L1 entry: readers of guest data refuse a table
    /// that is not wholly inside the file.
    Corrupt,
}

/// Reads the tables of one image file.
#[derive(Debug, Clone, Copy)]
pub struct Tables<'f, R: ReadAt + ?Sized> {
    file: &'f R,
    layout: L2Layout,
    file_len: u64,
    past_eof: PastEof,
}

impl<'f, R: ReadAt + ?Sized> Tables<'f, R> {
    /// The tables of `im`, opened from `file`; L2 tables past the end of the file
    /// are read as `past_eof` says.
    pub fn new(file: &'f R, im: &Image, past_eof: PastEof) -> Self {
        Tables {
            file,
            layout: im.l2_layout(),
            file_len: im.file_len,
            past_eof,
        }
    }

    /// The L2 layout entries are decoded with.
    pub fn layout(&self) -> L2Layout {
        self.layout
    }

    fn cluster_size(&self) -> u64 {
        1 << self.layout.cluster_bits
    }

    /// Reads the L1 table of `tree`: an error if [`Tree::problem`] finds one
    /// (naming the tree's referrer), entries past the end of the file zero.
    pub fn read_l1(&self, tree: &Tree) -> Result<L1Table> {
        if let Some(p) = tree.problem(self.cluster_size()) {
            let (structure, at) = tree.referrer;
            let (off, n) = (tree.l1_offset, tree.l1_size);
            let why = match p {
                L1Problem::Unaligned => format!("L1 table offset {off:#x} is not cluster aligned"),
                L1Problem::TooLarge => format!("L1 table of {n} entries exceeds 32 MiB"),
                L1Problem::PastMaxLength => format!(
                    "L1 table at {off:#x} ends past QEMU's largest file offset \
                     ({QEMU_MAX_LENGTH:#x})"
                ),
            };
            return Err(Error::corrupt(structure, at, why));
        }
        let what = tree.l1_structure();
        let off = tree.l1_offset;
        // problem() bounded the table to 32 MiB; only the part in the file is read.
        let in_file = tree.l1_bytes().min(self.file_len.saturating_sub(off));
        let mut raw = vec![0u8; to_usize(in_file, what)?];
        self.file
            .read_at_zero_fill(&mut raw, off)
            .ctx(|| format!("reading the {what} at {off:#x}"))?;
        let entries = crate::format::be64_words(&raw).collect();
        Ok(L1Table {
            tree: *tree,
            entries,
        })
    }

    /// Reads the L2 table `from` points to into `buf` (one cluster). The table
    /// must be cluster aligned; past the end of the file it reads as the
    /// [`PastEof`] policy says. Errors name the L1 entry.
    pub fn read_l2(&self, from: &L1Ref, buf: &mut [u8]) -> Result<()> {
        let cs = self.cluster_size();
        debug_assert_eq!(buf.len() as u64, cs);
        let off = from.entry.l2_offset;
        let structure = from.tree.l1_structure();
        let i = from.index;
        if off % cs != 0 {
            return Err(Error::corrupt(
                structure,
                from.at,
                format!("L1 entry {i}: L2 table offset {off:#x} is not cluster aligned"),
            ));
        }
        if self.past_eof == PastEof::Corrupt
            && off.checked_add(cs).is_none_or(|e| e > self.file_len)
        {
            return Err(Error::corrupt(
                structure,
                from.at,
                format!(
                    "L1 entry {i}: L2 table at {off:#x} extends past the end of the file \
                     ({} bytes)",
                    self.file_len
                ),
            ));
        }
        self.file
            .read_at_zero_fill(buf, off)
            .ctx(|| format!("reading the L2 table at {off:#x}"))?;
        Ok(())
    }
}

/// What a walk calls; every method but [`Visitor::l2_entry`] has a default that
/// visits everything. An error stops the walk and is returned by it.
pub trait Visitor {
    /// Before the L1 table of `tree` is read; false skips the tree. Trees whose
    /// [`Tree::problem`] is set must be skipped (reading them is an error).
    fn tree(&mut self, tree: &Tree) -> Result<bool> {
        let _ = tree;
        Ok(true)
    }

    /// For each non-zero L1 entry; false skips its L2 table. Entries without an L2
    /// offset are never descended into.
    fn l1_entry(&mut self, e: &L1Ref) -> Result<bool> {
        let _ = e;
        Ok(true)
    }

    /// After an L2 table was read, before its entries.
    fn l2_table(&mut self, t: &L2Table) -> Result<()> {
        let _ = t;
        Ok(())
    }

    /// For each L2 entry of `t` whose descriptor or bitmap is non-zero.
    fn l2_entry(&mut self, t: &L2Table, e: &L2Ref) -> Result<()>;

    /// After the entries of an L2 table.
    fn l2_table_end(&mut self, t: &L2Table) -> Result<()> {
        let _ = t;
        Ok(())
    }

    /// After a tree was walked, with its L1 table.
    fn tree_end(&mut self, l1: &L1Table) -> Result<()> {
        let _ = l1;
        Ok(())
    }
}

/// Walks trees of one image, remembering which L2 tables it has visited.
#[derive(Debug)]
pub struct Walker<'f, R: ReadAt + ?Sized> {
    tables: Tables<'f, R>,
    /// One bit per host cluster (and one past a partial last cluster): an L2
    /// table there was visited. Tables further out are always first visits (they
    /// read as zeros, or are refused).
    seen: Vec<u64>,
    buf: Vec<u8>,
}

impl<'f, R: ReadAt + ?Sized> Walker<'f, R> {
    /// A walker over `tables`, no table visited yet.
    pub fn new(tables: Tables<'f, R>) -> Result<Self> {
        let cs = tables.cluster_size();
        let bits = tables.file_len.div_ceil(cs) + 1;
        Ok(Walker {
            seen: vec![0; to_usize(bits.div_ceil(64), "visited-table set")?],
            buf: vec![0; to_usize(cs, "L2 table")?],
            tables,
        })
    }

    /// Marks the table at cluster `c` as visited; returns whether it was new.
    fn first_visit(&mut self, c: u64) -> bool {
        let Some(w) = usize::try_from(c / 64)
            .ok()
            .and_then(|i| self.seen.get_mut(i))
        else {
            return true;
        };
        let bit = 1u64 << (c % 64);
        let new = *w & bit == 0;
        *w |= bit;
        new
    }

    /// Walks `trees` in order with `v` (see the module doc).
    pub fn walk<V: Visitor + ?Sized>(&mut self, trees: &[Tree], v: &mut V) -> Result<()> {
        for tree in trees {
            if !v.tree(tree)? {
                continue;
            }
            let l1 = self.tables.read_l1(tree)?;
            for (i, &raw) in l1.stored().iter().enumerate() {
                if raw == 0 {
                    continue;
                }
                let index = i as u64; // < MAX_L1_ENTRIES
                let r = L1Ref {
                    tree: *tree,
                    index,
                    at: tree.l1_offset + 8 * index,
                    raw,
                    entry: L1Entry::decode(raw),
                };
                if v.l1_entry(&r)? && r.entry.l2_offset != 0 {
                    self.walk_l2(&r, v)?;
                }
            }
            v.tree_end(&l1)?;
        }
        Ok(())
    }

    fn walk_l2<V: Visitor + ?Sized>(&mut self, from: &L1Ref, v: &mut V) -> Result<()> {
        self.tables.read_l2(from, &mut self.buf)?;
        let layout = self.tables.layout;
        let offset = from.entry.l2_offset;
        let t = L2Table {
            l1: *from,
            offset,
            first_visit: self.first_visit(offset >> layout.cluster_bits),
        };
        v.l2_table(&t)?;
        let esize = layout.entry_bytes();
        let n = layout.entries_per_table();
        // < 2^22 L1 entries · ≤ 2^18 entries per table: no overflow.
        let first_cluster = from.index * n;
        // The buffer is one cluster: exactly `n` slots, decoded in sequence
        // (`L2Layout::slots`: no checked indexing per entry on this hot path).
        for (j, slot) in (0u64..).zip(layout.slots(&self.buf)) {
            if slot.raw == 0 && slot.bitmap.0 == 0 {
                continue;
            }
            let e = L2Ref {
                index: j,
                at: offset + j * esize,
                guest_cluster: first_cluster + j,
                slot,
                entry: layout.decode(slot.raw),
            };
            v.l2_entry(&t, &e)?;
        }
        v.l2_table_end(&t)
    }
}

/// A whole L1 or L2 table in memory, to change entries and write it back.
#[derive(Debug, Clone)]
pub struct TableBytes {
    offset: u64,
    bytes: Vec<u8>,
    dirty: bool,
}

impl TableBytes {
    /// Reads the `len` bytes of the table at `offset` (zeros past the end of the
    /// file, as QEMU reads them). `len` is at most 32 MiB (an L1 table; an L2
    /// table is one cluster).
    pub fn read<R: ReadAt + ?Sized>(file: &R, offset: u64, len: u64) -> Result<Self> {
        if len > MAX_L1_BYTES {
            return Err(Error::LimitExceeded(format!(
                "table at {offset:#x} of {len} bytes exceeds QEMU's 32 MiB"
            )));
        }
        let mut bytes = vec![0u8; to_usize(len, "table")?];
        file.read_at_zero_fill(&mut bytes, offset)
            .ctx(|| format!("reading the table at {offset:#x}"))?;
        Ok(TableBytes {
            offset,
            bytes,
            dirty: false,
        })
    }

    /// File offset of the table.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The table's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// The 64-bit word at file offset `at`, if the table holds it.
    pub fn word(&self, at: u64) -> Option<u64> {
        let pos = usize::try_from(at.checked_sub(self.offset)?).ok()?;
        crate::format::be64_at(&self.bytes, pos)
    }

    /// Sets the 64-bit word at file offset `at`. Returns whether the table holds
    /// it; a change marks the table for [`TableBytes::write_back`].
    pub fn set_word(&mut self, at: u64, value: u64) -> bool {
        let Some(pos) = at
            .checked_sub(self.offset)
            .and_then(|p| usize::try_from(p).ok())
        else {
            return false;
        };
        let Some(word) = pos
            .checked_add(8)
            .and_then(|end| self.bytes.get_mut(pos..end))
        else {
            return false;
        };
        let new = value.to_be_bytes();
        if *word != new {
            word.copy_from_slice(&new);
            self.dirty = true;
        }
        true
    }

    /// Whether an entry changed since the table was read or written.
    pub fn is_dirty(&self) -> bool {
        self.dirty
    }

    /// Writes the whole table with one write, if an entry changed. Callers sync
    /// the file when all their writes are done.
    pub fn write_back<W: WriteAt + ?Sized>(&mut self, file: &W) -> Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let off = self.offset;
        file.write_all_at(&self.bytes, off)
            .ctx(|| format!("writing the table at {off:#x}"))?;
        self.dirty = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::header::OpenMode;
    use crate::format::l1l2::with_copied;
    use crate::io::MemFile;

    const CB: u32 = 16;
    const CS: u64 = 1 << CB;

    /// A 64 KiB-cluster image: header, L1 table in cluster 1 (two entries), one L2
    /// table in cluster 2 used by both entries, data in cluster 3.
    fn image() -> MemFile {
        let mut h = Header::new_v3(CB, 4, 1 << 30);
        h.l1_table_offset = CS;
        h.l1_size = 16;
        h.refcount_table_offset = 4 * CS;
        h.refcount_table_clusters = 1;
        let mut b = vec![0u8; 5 * CS as usize];
        h.encode(&mut b);
        let l1e = |copied| {
            L1Entry {
                l2_offset: 2 * CS,
                copied,
            }
            .encode()
        };
        b[CS as usize..CS as usize + 8].copy_from_slice(&l1e(true).to_be_bytes());
        b[CS as usize + 24..CS as usize + 32].copy_from_slice(&l1e(false).to_be_bytes());
        let l2e = L2Entry::Normal {
            offset: 3 * CS,
            copied: true,
        };
        let l2 = 2 * CS as usize;
        b[l2 + 8..l2 + 16].copy_from_slice(&l2e.encode(CB).to_be_bytes());
        MemFile::new(b)
    }

    #[derive(Default)]
    struct Log(Vec<String>);

    impl Visitor for Log {
        fn l1_entry(&mut self, e: &L1Ref) -> Result<bool> {
            self.0
                .push(format!("l1 {} {:#x}", e.index, e.entry.l2_offset));
            Ok(true)
        }
        fn l2_table(&mut self, t: &L2Table) -> Result<()> {
            self.0
                .push(format!("l2 {:#x} first={}", t.offset, t.first_visit));
            Ok(())
        }
        fn l2_entry(&mut self, t: &L2Table, e: &L2Ref) -> Result<()> {
            let _ = t;
            self.0.push(format!(
                "e {} at {:#x} guest {} {:?}",
                e.index, e.at, e.guest_cluster, e.entry
            ));
            Ok(())
        }
    }

    #[test]
    fn every_reference_path_is_walked_and_first_visits_are_told() {
        let f = image();
        let im = Image::open(&f, OpenMode::Check).unwrap();
        let mut w = Walker::new(Tables::new(&f, &im, PastEof::Zeros)).unwrap();
        let mut log = Log::default();
        w.walk(&[Tree::active(&im.header)], &mut log).unwrap();
        let n = im.l2_entries;
        assert_eq!(
            log.0,
            [
                "l1 0 0x20000".to_string(),
                "l2 0x20000 first=true".into(),
                "e 1 at 0x20008 guest 1 Normal { offset: 196608, copied: true }".into(),
                "l1 3 0x20000".into(),
                "l2 0x20000 first=false".into(),
                format!(
                    "e 1 at 0x20008 guest {} Normal {{ offset: 196608, copied: true }}",
                    3 * n + 1
                ),
            ]
        );
    }

    #[test]
    fn l2_tables_past_the_end_read_as_the_policy_says() {
        let f = image();
        let im = Image::open(&f, OpenMode::Check).unwrap();
        let tree = Tree::active(&im.header);
        let from = |off: u64| L1Ref {
            tree,
            index: 5,
            at: CS + 40,
            raw: off,
            entry: L1Entry::decode(off),
        };
        let mut buf = vec![1u8; CS as usize];
        let t = Tables::new(&f, &im, PastEof::Zeros);
        t.read_l2(&from(9 * CS), &mut buf).unwrap();
        assert!(buf.iter().all(|b| *b == 0));
        let strict = Tables::new(&f, &im, PastEof::Corrupt);
        let e = strict.read_l2(&from(9 * CS), &mut buf).unwrap_err();
        assert!(
            matches!(e, Error::Corrupt { structure: "L1 table", offset, .. } if offset == CS + 40),
            "{e}"
        );
        let e = t.read_l2(&from(2 * CS + 512), &mut buf).unwrap_err();
        assert!(e.to_string().contains("not cluster aligned"), "{e}");
    }

    #[test]
    fn snapshot_l1_problems_follow_qemus_order() {
        let t = |l1_offset: u64, l1_size: u32| Tree {
            snapshot: Some(0),
            referrer: ("snapshot table", 0),
            l1_offset,
            l1_size,
        };
        assert_eq!(
            t(CS + 8, MAX_L1_ENTRIES + 1).problem(CS),
            Some(L1Problem::Unaligned)
        );
        assert_eq!(
            t(CS, MAX_L1_ENTRIES + 1).problem(CS),
            Some(L1Problem::TooLarge)
        );
        assert_eq!(
            t(QEMU_MAX_LENGTH & !(CS - 1), 1 << 20).problem(CS),
            Some(L1Problem::PastMaxLength)
        );
        assert_eq!(t(QEMU_MAX_LENGTH & !(CS - 1), 0).problem(CS), None);
        assert_eq!(t(CS, 16).problem(CS), None);
    }

    #[test]
    fn l1_entries_past_the_end_of_the_file_are_zero_and_not_held() {
        let f = image();
        let im = Image::open(&f, OpenMode::Check).unwrap();
        let t = Tables::new(&f, &im, PastEof::Corrupt);
        // The last cluster of the file holds 8192 entries of a 9000-entry table.
        let tree = Tree {
            l1_offset: 4 * CS,
            l1_size: 9000,
            ..Tree::active(&im.header)
        };
        let l1 = t.read_l1(&tree).unwrap();
        assert_eq!(l1.stored().len(), 8192);
        assert_eq!(l1.get(8999), 0);
    }

    #[test]
    fn a_changed_table_is_written_back_whole_once() {
        let f = image();
        let mut t = TableBytes::read(&f, 2 * CS, CS).unwrap();
        let at = 2 * CS + 8;
        let raw = t.word(at).unwrap();
        assert!(t.set_word(at, with_copied(raw, false)));
        assert!(!t.set_word(3 * CS, 0));
        assert!(t.is_dirty());
        t.write_back(&f).unwrap();
        assert!(!t.is_dirty());
        let again = TableBytes::read(&f, 2 * CS, CS).unwrap();
        assert_eq!(again.word(at), Some(3 * CS));
        assert_eq!(again.word(at - 16), None);
    }
}
