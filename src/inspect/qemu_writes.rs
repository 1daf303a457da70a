//! Which guest sectors `qemu-img convert -O qcow2` writes, for `estimate`.
//!
//! With its default `-S 4k` (`min_sparse` = 8 sectors) qemu-img does not write
//! exactly the non-zero sectors: `is_allocated_sectors_min` (qemu-img.c) extends a
//! data run to the next 4 KiB boundary and keeps zero gaps shorter than 4 KiB
//! inside one write. Each written sector allocates its output cluster, so with
//! clusters smaller than 4 KiB zero clusters next to data get allocated too (two
//! 512-byte writes at 0 and 64 KiB allocate sixteen 512-byte clusters, not two).
//! With clusters of 4 KiB or more every written sector shares its cluster with a
//! non-zero sector (a write only ever extends within a 4 KiB-aligned block that
//! holds data), so the allocated clusters are exactly the non-zero ones and this
//! model is not needed.
//!
//! [`QemuWrites`] replays qemu-img 10's loop for a new, zero-initialised qcow2
//! target without a backing file and without compression:
//!
//! - `convert_iteration_sectors`: block status windows of at most
//!   `BDRV_REQUEST_MAX_SECTORS` sectors, taken from
//!   [`Source::qemu_block_status`], shortened to the source's cluster alignment
//!   (when longer than the remainder); zero windows are skipped (zero init), data
//!   windows are cut into requests of 2 MiB (`buf_sectors`);
//! - `convert_co_write`: each request is split by `is_allocated_sectors_min`
//!   (alignment 8 sectors, `min` 8 sectors) into written and skipped parts.
//!
//! The caller feeds the non-zero sectors in guest order and says how far the
//! input is known; requests are replayed as soon as they are wholly known, so
//! memory stays bounded by one batch of runs.

use std::collections::VecDeque;

use crate::error::Result;
use crate::source::{BlockStatus, Source};

/// Bytes per sector.
const SECTOR: u64 = 512;
/// `BDRV_REQUEST_MAX_SECTORS`: `INT_MAX >> 9`.
const REQUEST_MAX_SECTORS: u64 = (i32::MAX as u64) >> 9;
/// `buf_sectors`: `IO_BUF_SIZE` (2 MiB) in sectors (a qcow2 target asks no more).
const BUF_SECTORS: u64 = (2 << 20) / SECTOR;
/// `min_sparse` of `-S 4k`, and the write alignment derived from it.
const MIN_SPARSE: u64 = 8;
const ALIGNMENT: u64 = 8;

/// Output clusters touched by writes, for one cluster size.
#[derive(Debug)]
struct Touched {
    /// log2 of the cluster size in sectors.
    shift: u32,
    count: u64,
    /// The last cluster counted (writes come in guest order).
    last: Option<u64>,
}

/// The replay (see the module docs).
pub(crate) struct QemuWrites<'a> {
    src: &'a dyn Source,
    /// Guest size in sectors.
    total: u64,
    /// `src_alignment`: the source's cluster size in sectors (1 for raw files).
    src_alignment: u64,
    /// Next sector of the replay.
    pos: u64,
    /// End of the current block status window, and whether it is data.
    next_status: u64,
    data: bool,
    /// Non-zero sector runs `[start, end)`, merged, in order, not yet replayed.
    nonzero: VecDeque<(u64, u64)>,
    touched: Vec<Touched>,
}

impl<'a> QemuWrites<'a> {
    /// A replay over `src` counting touched clusters for each of `cluster_bits`
    /// (each at least 9).
    pub(crate) fn new(src: &'a dyn Source, cluster_bits: &[u32]) -> Self {
        QemuWrites {
            src,
            total: src.virtual_size() / SECTOR,
            src_alignment: src.cluster_size().map_or(1, |c| (c / SECTOR).max(1)),
            pos: 0,
            next_status: 0,
            data: false,
            nonzero: VecDeque::new(),
            touched: cluster_bits
                .iter()
                .map(|&b| Touched {
                    shift: b - 9,
                    count: 0,
                    last: None,
                })
                .collect(),
        }
    }

    /// Records that guest bytes `[offset, offset + data.len())` hold `data`
    /// (calls in guest order; bytes never recorded are zeros).
    pub(crate) fn add(&mut self, offset: u64, data: &[u8]) {
        let first = offset / SECTOR;
        for (i, s) in data.chunks(SECTOR as usize).enumerate() {
            if s.iter().all(|b| *b == 0) {
                continue;
            }
            let sector = first + i as u64;
            if sector >= self.total {
                break;
            }
            match self.nonzero.back_mut() {
                Some((_, end)) if *end == sector => *end += 1,
                _ => self.nonzero.push_back((sector, sector + 1)),
            }
        }
    }

    /// Replays every request that ends at or before guest byte `known`: all
    /// non-zero bytes before it have been [`add`](Self::add)ed.
    pub(crate) fn advance(&mut self, known: u64) -> Result<()> {
        let known = (known / SECTOR).min(self.total);
        while self.pos < self.total {
            if self.next_status <= self.pos {
                self.next_window()?;
            }
            let mut n = self.next_status - self.pos;
            if !self.data {
                // Zero init: a zero window is skipped, known or not (it holds no
                // data; drop any run recorded there all the same).
                self.pos += n;
                while self.nonzero.front().is_some_and(|&(_, e)| e <= self.pos) {
                    self.nonzero.pop_front();
                }
                continue;
            }
            n = n.min(BUF_SECTORS);
            if self.pos + n > known {
                break;
            }
            self.write_request(self.pos, n);
            self.pos += n;
        }
        Ok(())
    }

    /// Replays the rest and returns the clusters touched, per cluster size (in
    /// the order given to [`new`](Self::new)).
    pub(crate) fn finish(mut self) -> Result<Vec<u64>> {
        self.advance(self.total * SECTOR)?;
        Ok(self.touched.iter().map(|t| t.count).collect())
    }

    /// `convert_iteration_sectors`, when a new block status is due.
    fn next_window(&mut self) -> Result<()> {
        let n = (self.total - self.pos).min(REQUEST_MAX_SECTORS);
        let (status, count) = self.src.qemu_block_status(self.pos * SECTOR, n * SECTOR)?;
        // count ≥ 1 and ≤ n sectors' bytes.
        let mut n = count.div_ceil(SECTOR).clamp(1, n);
        let tail = (self.pos + n) % self.src_alignment;
        if n > tail {
            n -= tail;
        }
        self.data = status == BlockStatus::Data;
        self.next_status = self.pos + n;
        Ok(())
    }

    /// `convert_co_write` of a data request of `n` sectors at `sector`.
    fn write_request(&mut self, mut sector: u64, mut n: u64) {
        let end = sector + n;
        while n > 0 {
            let (written, k) = self.is_allocated_sectors_min(sector, n);
            if written {
                self.touch(sector, sector + k);
            }
            sector += k;
            n -= k;
        }
        while self.nonzero.front().is_some_and(|&(_, e)| e <= end) {
            self.nonzero.pop_front();
        }
    }

    /// The run of sectors of equal zero-ness starting at `sector`, at most up to
    /// `limit`: (is zero, length ≥ 1).
    fn run_at(&self, sector: u64, limit: u64) -> (bool, u64) {
        // Runs wholly before `sector` belong to requests already replayed or to
        // earlier parts of this one; few remain, so a scan is cheap.
        let i = self.nonzero.partition_point(|&(_, e)| e <= sector);
        match self.nonzero.get(i) {
            Some(&(s, e)) if s <= sector => (false, e.min(limit) - sector),
            Some(&(s, _)) => (true, s.min(limit) - sector),
            None => (true, limit - sector),
        }
    }

    /// `is_allocated_sectors`: whether the first sector is written, and how many
    /// sectors share that fate (ends aligned to 4 KiB where possible).
    fn is_allocated_sectors(&self, sector: u64, n: u64) -> (bool, u64) {
        let (mut zero, mut i) = self.run_at(sector, sector + n);
        if i == n {
            return (!zero, i);
        }
        let tail = (sector + i) & (ALIGNMENT - 1);
        if tail != 0 {
            if zero && i <= tail {
                // The data right after rewrites this tail anyway: write it now.
                zero = false;
            }
            if zero {
                i -= tail;
            } else {
                i = (i + ALIGNMENT - tail).min(n);
            }
        }
        (!zero, i)
    }

    /// `is_allocated_sectors_min`: a written run swallows zero gaps shorter than
    /// `min_sparse` that are followed by more data.
    fn is_allocated_sectors_min(&self, sector: u64, n: u64) -> (bool, u64) {
        let min = MIN_SPARSE.min(n);
        let (written, first) = self.is_allocated_sectors(sector, n);
        if !written {
            return (false, first);
        }
        let (mut used, mut checked) = (first, first);
        while checked < n {
            let (w, k) = self.is_allocated_sectors(sector + checked, n - checked);
            checked += k;
            if w {
                used = checked;
            } else if k >= min {
                break;
            }
        }
        (true, used)
    }

    /// Counts the output clusters sectors `[start, end)` fall in.
    fn touch(&mut self, start: u64, end: u64) {
        for t in &mut self.touched {
            let mut first = start >> t.shift;
            let last = (end - 1) >> t.shift;
            if t.last == Some(first) {
                first += 1;
            }
            if first <= last {
                t.count += last - first + 1;
                t.last = Some(last);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A source with fixed block status extents over in-memory bytes.
    struct Fake {
        size: u64,
        /// `(start, end, data)` covering the size.
        extents: Vec<(u64, u64, bool)>,
        cluster: Option<u64>,
    }

    impl Source for Fake {
        fn virtual_size(&self) -> u64 {
            self.size
        }
        fn block_status(&self, offset: u64, max_len: u64) -> Result<(BlockStatus, u64)> {
            let &(_, e, d) = self
                .extents
                .iter()
                .find(|(s, e, _)| *s <= offset && offset < *e)
                .expect("covered");
            let st = if d {
                BlockStatus::Data
            } else {
                BlockStatus::Zero
            };
            Ok((st, (e - offset).min(max_len)))
        }
        fn read_at(&self, _: &mut [u8], _: u64) -> Result<()> {
            unreachable!("the replay never reads")
        }
        fn format_name(&self) -> &'static str {
            "fake"
        }
        fn cluster_size(&self) -> Option<u64> {
            self.cluster
        }
    }

    fn touched(src: &Fake, writes: &[(u64, u64)], bits: &[u32]) -> Vec<u64> {
        let mut q = QemuWrites::new(src, bits);
        for &(off, len) in writes {
            q.add(off, &vec![1u8; len as usize]);
            q.advance(off).unwrap();
        }
        q.finish().unwrap()
    }

    #[test]
    fn sectors_next_to_data_are_written_up_to_4k() {
        // The recipe: two 512-byte writes into a 1 MiB raw file.
        let src = Fake {
            size: 1 << 20,
            extents: vec![(0, 1 << 20, true)],
            cluster: None,
        };
        let w = [(0, 512), (64 << 10, 512)];
        assert_eq!(touched(&src, &w, &[9, 10, 11, 12]), [16, 8, 4, 2]);
        // 4 KiB blocks holding data are written whole; zeros between data in
        // neighbouring blocks too (sectors 32..48), but not a whole zero block.
        let w = [(0, 512), (3584, 512), (16384, 512), (16384 + 5120, 512)];
        assert_eq!(touched(&src, &w, &[9]), [8 + 16]);
    }

    #[test]
    fn windows_shorter_than_4k_bound_the_writes() {
        // A 64 KiB-cluster source with a 2 KiB data window (one subcluster).
        let src = Fake {
            size: 1 << 20,
            extents: vec![(0, 2048, true), (2048, 1 << 20, false)],
            cluster: Some(64 << 10),
        };
        assert_eq!(touched(&src, &[(0, 512)], &[9]), [4]);
    }

    #[test]
    fn windows_are_cut_back_to_the_source_cluster_alignment() {
        // A 6-sector data window of a 2 KiB-cluster source ends at sector 4, so
        // the write of sector 0 stops there instead of at the window's end.
        let src = Fake {
            size: 4096,
            extents: vec![(0, 3072, true), (3072, 4096, false)],
            cluster: Some(2048),
        };
        assert_eq!(touched(&src, &[(0, 512)], &[9]), [4]);
    }

    #[test]
    fn requests_of_a_data_extent_over_2_gib_restart_unaligned() {
        // The first status window is BDRV_REQUEST_MAX_SECTORS (4194303) long, so
        // the request holding sector 4194302 ends one sector short of a 4 KiB
        // boundary and the write stops there.
        let src = Fake {
            size: 3 << 30,
            extents: vec![(0, 3 << 30, true)],
            cluster: None,
        };
        let w = [(4_194_302 * 512, 512)];
        assert_eq!(touched(&src, &w, &[9, 10, 12]), [7, 4, 1]);
    }

    #[test]
    fn a_zero_window_between_data_splits_the_write() {
        let src = Fake {
            size: 64 << 10,
            extents: vec![(0, 1024, true), (1024, 2048, false), (2048, 64 << 10, true)],
            cluster: None,
        };
        // Data at 0 and 2560: the first request ends at 1024, the zero window is
        // skipped, the next request starts unaligned at 2048 with a zero sector
        // that the data right after pulls in, up to 4 KiB.
        assert_eq!(touched(&src, &[(0, 512), (2560, 512)], &[9]), [2 + 4]);
    }
}
