//! Stored refcounts of an existing image: the one reader and writer of refcount
//! tables and blocks (`check`, its repairs and `info` use it).
//!
//! The refcount table is read once; blocks are read on first use and kept in a
//! small cache. [`Refcounts::set`] changes a slot in the cached block and marks it
//! dirty; [`Refcounts::flush`] writes each dirty block with one write of the whole
//! block (a block is the unit QEMU writes too, so an interrupted flush leaves
//! every block either old or new). When a cluster has no refcount block yet,
//! [`Refcounts::set`] places one at the end of the file ([`Refcounts::grow`]),
//! and a table too short for it is moved to a larger one ([`Refcounts::grow_table`],
//! which switches the header to it).
//!
//! Lookups follow QEMU: a cluster past the table or under an empty table entry has
//! refcount 0; a block past the end of the file reads as zeros.

use std::collections::HashMap;

use crate::error::{Error, IoContext, Result};
use crate::format::header::{off as hoff, Header, MAX_REFTABLE_BYTES};
use crate::format::refcount::{self, REFT_OFFSET_MASK};
use crate::io::{ReadAt, WriteAt};

/// Blocks kept in the cache before clean ones are dropped.
const CACHE_BLOCKS: usize = 64;

/// What the refcount of one cluster looks like on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    /// The stored refcount (0 where no block covers the cluster).
    Count(u64),
    /// The table entry covering the cluster points at an unaligned offset: no
    /// block can be read (a corruption `check` reports on its own).
    Unreadable {
        /// The refcount table entry's offset field.
        block: u64,
    },
}

/// What [`Refcounts::read_block`] found for one refcount table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockRead {
    /// No block: every refcount it would hold is 0 (the buffer was zeroed).
    Empty,
    /// The entry points at an unaligned offset: no block can be read.
    Unreadable {
        /// The refcount table entry's offset field.
        block: u64,
    },
    /// The block at this offset was read (zeros past the end of the file).
    Read {
        /// Offset of the block.
        offset: u64,
    },
}

#[derive(Debug)]
struct Block {
    data: Box<[u8]>,
    dirty: bool,
}

/// The stored refcounts of one qcow2 file.
#[derive(Debug)]
pub struct Refcounts {
    cluster_bits: u32,
    order: u32,
    table_offset: u64,
    /// Raw table entries.
    table: Vec<u64>,
    /// Cached blocks by table index.
    blocks: HashMap<u64, Block>,
}

impl Refcounts {
    /// Reads the refcount table of the image whose header is `h` from `file`.
    /// The part of the table past the end of the file reads as zeros (as in QEMU);
    /// the header must have been validated (the table's size is bounded).
    pub fn load(file: &(impl ReadAt + ?Sized), h: &Header) -> Result<Self> {
        let bytes = u64::from(h.refcount_table_clusters) << h.cluster_bits;
        let len = usize::try_from(bytes)
            .map_err(|_| Error::LimitExceeded("refcount table larger than memory".into()))?;
        let mut raw = vec![0u8; len];
        file.read_at_zero_fill(&mut raw, h.refcount_table_offset)
            .ctx(|| {
                format!(
                    "reading the refcount table at {:#x}",
                    h.refcount_table_offset
                )
            })?;
        let table = crate::format::be64_words(&raw).collect();
        Ok(Refcounts {
            cluster_bits: h.cluster_bits,
            order: h.refcount_order,
            table_offset: h.refcount_table_offset,
            table,
            blocks: HashMap::new(),
        })
    }

    /// The raw refcount table entries.
    pub fn table(&self) -> &[u64] {
        &self.table
    }

    /// log2 of the number of refcounts one block holds.
    pub fn entries_per_block_bits(&self) -> u32 {
        self.cluster_bits + 3 - self.order
    }

    /// The largest refcount the image's width can hold.
    pub fn max(&self) -> u64 {
        refcount::max_refcount(self.order)
    }

    /// Offset of the block covering `cluster` (0 if none), and the table index.
    fn block_of(&self, cluster: u64) -> (u64, u64) {
        let b = cluster >> self.entries_per_block_bits();
        let e = usize::try_from(b)
            .ok()
            .and_then(|i| self.table.get(i))
            .copied()
            .unwrap_or(0);
        (b, e & REFT_OFFSET_MASK)
    }

    /// Offset of refcount block `b` (the table entry's offset field; 0 where the
    /// table has no block or no entry `b`).
    pub fn block_offset(&self, b: u64) -> u64 {
        self.block_of(b << self.entries_per_block_bits()).1
    }

    /// Reads refcount block `b` whole into `buf` (one cluster; zeros past the end
    /// of the file, and for an empty entry), bypassing the cache: for scans that
    /// read every block once, such as `check`'s comparison of every stored
    /// refcount, where [`Refcounts::get`] would cost a cache lookup per cluster
    /// and copy each block into the cache for nothing. Slot `s` of the block is
    /// then [`refcount::get`]`(buf, order, s)`.
    pub fn read_block(
        &self,
        file: &(impl ReadAt + ?Sized),
        b: u64,
        buf: &mut [u8],
    ) -> Result<BlockRead> {
        debug_assert_eq!(buf.len(), 1 << self.cluster_bits);
        let off = self.block_offset(b);
        if off == 0 {
            buf.fill(0);
            return Ok(BlockRead::Empty);
        }
        if off & ((1 << self.cluster_bits) - 1) != 0 {
            return Ok(BlockRead::Unreadable { block: off });
        }
        if let Some(blk) = self.blocks.get(&b) {
            // A changed block not flushed yet: its cached copy is the truth.
            buf.copy_from_slice(&blk.data);
        } else {
            file.read_at_zero_fill(buf, off)
                .ctx(|| format!("reading the refcount block at {off:#x}"))?;
        }
        Ok(BlockRead::Read { offset: off })
    }

    /// The refcount order (log2 of the width in bits).
    pub fn order(&self) -> u32 {
        self.order
    }

    fn load_block(
        &mut self,
        file: &(impl ReadAt + ?Sized),
        b: u64,
        off: u64,
    ) -> Result<&mut Block> {
        if !self.blocks.contains_key(&b) {
            if self.blocks.len() >= CACHE_BLOCKS {
                self.blocks.retain(|_, blk| blk.dirty);
            }
            let mut data = vec![0u8; 1 << self.cluster_bits].into_boxed_slice();
            file.read_at_zero_fill(&mut data, off)
                .ctx(|| format!("reading the refcount block at {off:#x}"))?;
            self.blocks.insert(b, Block { data, dirty: false });
        }
        Ok(self.blocks.get_mut(&b).expect("inserted above"))
    }

    /// The stored refcount of host cluster `cluster`.
    pub fn get(&mut self, file: &(impl ReadAt + ?Sized), cluster: u64) -> Result<Stored> {
        let (b, off) = self.block_of(cluster);
        if off == 0 {
            return Ok(Stored::Count(0));
        }
        if off & ((1 << self.cluster_bits) - 1) != 0 {
            return Ok(Stored::Unreadable { block: off });
        }
        let slot = cluster & ((1 << self.entries_per_block_bits()) - 1);
        let order = self.order;
        let blk = self.load_block(file, b, off)?;
        Ok(Stored::Count(refcount::get(&blk.data, order, slot)))
    }

    /// Sets the stored refcount of `cluster` to `value` (in the cache; see
    /// [`Refcounts::flush`]). A cluster with no block gets one ([`Refcounts::grow`]).
    pub fn set(
        &mut self,
        file: &(impl ReadAt + WriteAt + ?Sized),
        cluster: u64,
        value: u64,
    ) -> Result<()> {
        if value > self.max() {
            return Err(Error::InvalidArgument(format!(
                "refcount {value} exceeds the image's maximum {}",
                self.max()
            )));
        }
        let (b, mut off) = self.block_of(cluster);
        if off == 0 {
            if value == 0 {
                return Ok(());
            }
            off = self.grow(file, b)?;
        }
        if off & ((1 << self.cluster_bits) - 1) != 0 {
            return Err(Error::corrupt(
                "refcount table",
                self.table_offset + 8 * b,
                format!("refcount block offset {off:#x} is not cluster aligned"),
            ));
        }
        let slot = cluster & ((1 << self.entries_per_block_bits()) - 1);
        let order = self.order;
        let blk = self.load_block(file, b, off)?;
        refcount::set(&mut blk.data, order, slot, value);
        blk.dirty = true;
        Ok(())
    }

    /// Gives table entry `b` a new refcount block at the end of the file, counting
    /// the block itself (its own refcount goes into the block when the block
    /// covers itself, else into the block that does, written first). The block
    /// is on disk before the table entry refers to it, so an interruption leaves
    /// at most a leak. A table without entry `b` is first moved to a larger one
    /// ([`Refcounts::grow_table`]).
    pub fn grow(&mut self, file: &(impl ReadAt + WriteAt + ?Sized), b: u64) -> Result<u64> {
        if usize::try_from(b).map_or(true, |i| i >= self.table.len()) {
            self.grow_table(file, b + 1)?;
        }
        let idx = usize::try_from(b).expect("the table has entry b");
        let cs = 1u64 << self.cluster_bits;
        let len = file.len().ctx(|| "cannot stat the image".to_string())?;
        let off = len.div_ceil(cs) * cs;
        let own = off >> self.cluster_bits;
        let bits = self.entries_per_block_bits();
        let mut data = vec![0u8; cs as usize].into_boxed_slice();
        if own >> bits == b {
            refcount::set(&mut data, self.order, own & ((1 << bits) - 1), 1);
        }
        file.write_all_at(&data, off)
            .ctx(|| format!("cannot write a new refcount block at {off:#x}"))?;
        self.blocks.insert(b, Block { data, dirty: false });
        self.table[idx] = off;
        if own >> bits != b {
            self.set(file, own, 1)?;
            self.flush(file)?;
        }
        file.write_all_at(&off.to_be_bytes(), self.table_offset + 8 * b)
            .ctx(|| "cannot write the refcount table".to_string())?;
        Ok(off)
    }

    /// Moves the refcount table to a new one at the end of the file with at least
    /// `entries` entries (twice the old size at least, as QEMU grows it): the new
    /// table and the refcounts of its clusters are written and synced, then the
    /// header is switched to it with one write, then the old table's clusters are
    /// freed. An interruption at any point leaves the old table or the new one in
    /// force, and at most leaked clusters, never a corruption.
    pub fn grow_table(
        &mut self,
        file: &(impl ReadAt + WriteAt + ?Sized),
        entries: u64,
    ) -> Result<()> {
        let cb = self.cluster_bits;
        let cs = 1u64 << cb;
        let per_cluster = cs / 8;
        let old_offset = self.table_offset;
        let old_clusters = (self.table.len() as u64).div_ceil(per_cluster);
        let len = file.len().ctx(|| "cannot stat the image".to_string())?;
        let off = len.div_ceil(cs) * cs;
        // The new table must also cover its own clusters and the blocks counting
        // them (at most one per cluster of the table, plus one).
        let mut clusters = entries
            .max(2 * self.table.len() as u64)
            .div_ceil(per_cluster)
            .max(1);
        loop {
            let last = (off >> cb) + 2 * clusters + 1;
            if (clusters * per_cluster) << self.entries_per_block_bits() > last {
                break;
            }
            clusters += 1;
        }
        if clusters * cs > MAX_REFTABLE_BYTES {
            return Err(Error::LimitExceeded(format!(
                "the refcount table would need {clusters} clusters, more than QEMU's 8 MiB limit"
            )));
        }
        let n = usize::try_from(clusters * per_cluster)
            .map_err(|_| Error::LimitExceeded("refcount table larger than memory".into()))?;
        let mut table = self.table.clone();
        table.resize(n, 0);
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        file.write_all_at(&bytes, off)
            .ctx(|| format!("cannot write the new refcount table at {off:#x}"))?;
        self.table = table;
        self.table_offset = off;
        for c in (off >> cb)..(off >> cb) + clusters {
            self.set(file, c, 1)?;
        }
        self.flush(file)?;
        file.sync().ctx(|| "cannot sync the image".to_string())?;
        // refcount_table_offset and refcount_table_clusters are adjacent: one write.
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&off.to_be_bytes());
        hdr[8..].copy_from_slice(&(clusters as u32).to_be_bytes());
        file.write_all_at(&hdr, hoff::REFCOUNT_TABLE_OFFSET as u64)
            .ctx(|| "cannot write the header".to_string())?;
        file.sync().ctx(|| "cannot sync the image".to_string())?;
        for c in (old_offset >> cb)..(old_offset >> cb) + old_clusters {
            self.set(file, c, 0)?;
        }
        self.flush(file)
    }

    /// Moves refcount block `b` to the free cluster at `to` (cluster aligned,
    /// refcount 0, inside the file), for a caller that compacts the file: `to` is
    /// counted and the block written there and synced, then the table entry is
    /// switched with one write and synced, then the old cluster's refcount goes
    /// to 0. Interrupted anywhere, the old block or the new one is in force and
    /// at most one cluster is leaked.
    pub fn move_block(
        &mut self,
        file: &(impl ReadAt + WriteAt + ?Sized),
        b: u64,
        to: u64,
    ) -> Result<()> {
        let cb = self.cluster_bits;
        let old = self.block_offset(b);
        let idx = usize::try_from(b)
            .ok()
            .filter(|&i| i < self.table.len() && old != 0 && old % (1 << cb) == 0)
            .ok_or_else(|| Error::InvalidArgument(format!("refcount block {b} cannot be moved")))?;
        if to % (1 << cb) != 0 {
            return Err(Error::InvalidArgument(format!(
                "refcount block target {to:#x} is not cluster aligned"
            )));
        }
        self.set(file, to >> cb, 1)?;
        self.flush(file)?;
        let data = self.load_block(file, b, old)?.data.clone();
        file.write_all_at(&data, to)
            .ctx(|| format!("writing the refcount block at {to:#x}"))?;
        file.sync().ctx(|| "cannot sync the image".to_string())?;
        file.write_all_at(&to.to_be_bytes(), self.table_offset + 8 * b)
            .ctx(|| "cannot write the refcount table".to_string())?;
        self.table[idx] = to;
        file.sync().ctx(|| "cannot sync the image".to_string())?;
        self.set(file, old >> cb, 0)?;
        self.flush(file)
    }

    /// Writes every changed block (one write per block).
    pub fn flush(&mut self, file: &(impl ReadAt + WriteAt + ?Sized)) -> Result<()> {
        let mut dirty: Vec<u64> = self
            .blocks
            .iter()
            .filter(|(_, blk)| blk.dirty)
            .map(|(b, _)| *b)
            .collect();
        dirty.sort_unstable();
        for b in dirty {
            let (_, off) = self.block_of(b << self.entries_per_block_bits());
            let blk = self.blocks.get_mut(&b).expect("listed above");
            file.write_all_at(&blk.data, off)
                .ctx(|| format!("writing the refcount block at {off:#x}"))?;
            blk.dirty = false;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::header::Header;
    use crate::io::MemFile;

    /// A 64 KiB-cluster image skeleton: header in cluster 0, refcount table in
    /// cluster 1, one refcount block in cluster 2 covering clusters 0..2.
    fn image(order: u32) -> (MemFile, Header) {
        let cs = 1 << 16;
        let mut h = Header::new_v3(16, order, 1 << 30);
        h.refcount_table_offset = cs;
        h.refcount_table_clusters = 1;
        let mut bytes = vec![0u8; 3 * cs as usize];
        bytes[cs as usize..cs as usize + 8].copy_from_slice(&(2 * cs).to_be_bytes());
        let mut block = vec![0u8; cs as usize];
        for c in 0..3 {
            refcount::set(&mut block, order, c, 1);
        }
        bytes[2 * cs as usize..].copy_from_slice(&block);
        (MemFile::new(bytes), h)
    }

    #[test]
    fn get_set_flush_round_trip_at_every_width() {
        for order in 0..=6 {
            let (f, h) = image(order);
            let mut r = Refcounts::load(&f, &h).unwrap();
            assert_eq!(r.get(&f, 1).unwrap(), Stored::Count(1));
            assert_eq!(r.get(&f, 100).unwrap(), Stored::Count(0));
            let max = r.max();
            r.set(&f, 1, max).unwrap();
            assert!(r.set(&f, 1, max.saturating_add(1)).is_err() || max == u64::MAX);
            r.flush(&f).unwrap();
            let mut again = Refcounts::load(&f, &h).unwrap();
            assert_eq!(
                again.get(&f, 1).unwrap(),
                Stored::Count(max),
                "order {order}"
            );
            assert_eq!(again.get(&f, 0).unwrap(), Stored::Count(1));
        }
    }

    #[test]
    fn a_cluster_without_a_block_gets_one_that_counts_itself() {
        let (f, h) = image(4);
        let mut r = Refcounts::load(&f, &h).unwrap();
        // Block 1 covers clusters 32768..65536 at 16-bit refcounts and 64 KiB clusters.
        let far = 40_000;
        r.set(&f, far, 3).unwrap();
        r.flush(&f).unwrap();
        let mut again = Refcounts::load(&f, &h).unwrap();
        assert_eq!(again.get(&f, far).unwrap(), Stored::Count(3));
        // The new block went to the end of the file (cluster 3), counted in block 0.
        assert_eq!(again.table()[1], 3 << 16);
        assert_eq!(again.get(&f, 3).unwrap(), Stored::Count(1));
        // Setting 0 where there is no block allocates nothing.
        let len = f.len().unwrap();
        again.set(&f, 1 << 20, 0).unwrap();
        assert_eq!(f.len().unwrap(), len);
    }

    #[test]
    fn a_cluster_past_the_table_moves_the_table_and_switches_the_header() {
        // 512-byte clusters: one table cluster has 64 entries of 256 clusters each.
        let cs = 512u64;
        let mut h = Header::new_v3(9, 4, 1 << 30);
        h.refcount_table_offset = cs;
        h.refcount_table_clusters = 1;
        let mut bytes = vec![0u8; 3 * cs as usize];
        h.encode(&mut bytes[..Header::ENCODED_LEN]);
        bytes[cs as usize..cs as usize + 8].copy_from_slice(&(2 * cs).to_be_bytes());
        for c in 0..3 {
            refcount::set(&mut bytes[2 * cs as usize..], 4, c, 1);
        }
        let f = MemFile::new(bytes);
        let mut r = Refcounts::load(&f, &h).unwrap();
        let far = 64 * 256 + 10;
        r.set(&f, far, 5).unwrap();
        r.flush(&f).unwrap();
        let h2 = Header::decode(&f.contents()[..Header::ENCODED_LEN]).unwrap();
        assert_ne!(
            h2.refcount_table_offset, cs,
            "the header points to the new table"
        );
        assert!(h2.refcount_table_clusters >= 2);
        let mut again = Refcounts::load(&f, &h2).unwrap();
        assert_eq!(again.get(&f, far).unwrap(), Stored::Count(5));
        // The old table's cluster is free, the new table's clusters are counted.
        assert_eq!(again.get(&f, 1).unwrap(), Stored::Count(0));
        let first = h2.refcount_table_offset / cs;
        for c in first..first + u64::from(h2.refcount_table_clusters) {
            assert_eq!(again.get(&f, c).unwrap(), Stored::Count(1), "cluster {c}");
        }
        // Every block the table names counts itself once.
        for &e in again.table().to_vec().iter().filter(|e| **e != 0) {
            assert_eq!(again.get(&f, e / cs).unwrap(), Stored::Count(1));
        }
    }

    #[test]
    fn a_moved_block_keeps_every_refcount_and_counts_its_new_cluster() {
        let (f, h) = image(4);
        // A free cluster 4 inside the file to move block 0 (at cluster 2) to.
        f.set_len(5 << 16).unwrap();
        let mut r = Refcounts::load(&f, &h).unwrap();
        r.set(&f, 1, 7).unwrap();
        r.flush(&f).unwrap();
        r.move_block(&f, 0, 4 << 16).unwrap();
        assert_eq!(r.block_offset(0), 4 << 16);
        let mut again = Refcounts::load(&f, &h).unwrap();
        assert_eq!(again.table()[0], 4 << 16, "the table entry switched");
        assert_eq!(again.get(&f, 1).unwrap(), Stored::Count(7));
        assert_eq!(
            again.get(&f, 2).unwrap(),
            Stored::Count(0),
            "old place free"
        );
        assert_eq!(
            again.get(&f, 4).unwrap(),
            Stored::Count(1),
            "new place counted"
        );
        assert!(r.move_block(&f, 9, 4 << 16).is_err(), "no block 9");
    }

    #[test]
    fn unaligned_block_offsets_are_reported_not_read() {
        let (f, h) = image(4);
        f.write_all_at(&0x1_0200u64.to_be_bytes(), 1 << 16).unwrap();
        let mut r = Refcounts::load(&f, &h).unwrap();
        assert_eq!(
            r.get(&f, 0).unwrap(),
            Stored::Unreadable { block: 0x1_0200 }
        );
        assert!(matches!(r.set(&f, 0, 1), Err(Error::Corrupt { .. })));
    }
}
