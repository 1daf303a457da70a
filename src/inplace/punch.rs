//! Hole punching, after everything else.
//!
//! Once the image is final (every flush group, the moves and the final repair
//! done and synced, and the final check clean), [`free_runs_with_data`] reads
//! the refcounts and finds the runs of free clusters that still hold data in the
//! file: those this run freed, and those an earlier run that was stopped before
//! its punches left. [`punch_runs`] gives their space back with
//! `fallocate(PUNCH_HOLE)` on a few threads. Nothing allocates clusters in
//! between (the final repair only lowers refcounts and sets flags, and `dedup`
//! holds QEMU's write lock), so every cluster punched is free.
//!
//! Why runs: on ext4 mounted with `discard`, every extent freed is trimmed on
//! the device, and each trim costs (about 1.5 ms plus 1.4 ms per MiB on the
//! benchmark VM): the number of runs is what costs, and the survivors and the
//! moves are chosen to make few ([`super::plan::choose_survivors`],
//! [`super::plan::bridges`]).
//!
//! Why last: without a journal the trim happens in `fallocate` itself, wherever
//! it is called. With one (ext4's default) `fallocate` returns at once and the
//! trims are made at the journal commit, which the next `fsync` of the file
//! waits for: punches between the flush groups made every later group's sync
//! wait for the trims (dedup took 3–7.5 s instead of 1.2 s on a journaled ext4
//! mounted `discard`). Punched after the last sync, the trims are the file
//! system's background work. Punches of one file are serialized by its inode
//! lock, yet the next call waiting on the lock as one returns still helps a
//! little ([`PUNCH_THREADS`], docs/benchmarks.md).
//!
//! A failing punch stops the punching: [`punch_runs`] returns its error. The
//! clusters not punched are free in the image (refcount 0) and only keep their
//! space in the file until the next `dedup` (QEMU allocates free clusters
//! again).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::error::{Error, IoContext, Result};
use crate::image::refcounts::{BlockRead, Refcounts};
use crate::io::{ReadAt, WriteAt};

/// Threads punching at once. The inode lock serializes the punches of one file,
/// yet on the benchmark VM two or more threads took the punching of the 2 GiB
/// benchmark from 11.5–18.8 s to 6–13.7 s (the device's latency varies with the
/// load; 2, 4 and 8 threads were not told apart): the next call is already
/// waiting on the lock when one returns.
pub(crate) const PUNCH_THREADS: usize = 4;

/// A run of adjacent clusters: (first cluster, count).
pub(crate) type Run = (u64, u64);

/// Clusters, added in ascending order, joined into runs.
#[derive(Default)]
struct Runs {
    done: Vec<Run>,
    /// The last run, which the next cluster may extend.
    open: Option<Run>,
}

impl Runs {
    fn add(&mut self, sorted: &[u64]) {
        for &c in sorted {
            match &mut self.open {
                Some((first, n)) if *first + *n == c => *n += 1,
                open => {
                    if let Some(run) = open.replace((c, 1)) {
                        self.done.push(run);
                    }
                }
            }
        }
    }

    fn finish(mut self) -> Vec<Run> {
        self.done.extend(self.open.take());
        self.done
    }
}

/// The runs of free clusters (stored refcount 0) below cluster `end` that still
/// hold data in the file ([`ReadAt::data_in`]): what an earlier run that was
/// stopped before its punches (killed, a failing punch), or QEMU freeing
/// clusters without punching them, left. Clusters whose refcount block cannot
/// be read count as in use.
pub(crate) fn free_runs_with_data<F: ReadAt + ?Sized>(
    file: &F,
    refcounts: &Refcounts,
    cb: u32,
    end: u64,
) -> Result<Vec<Run>> {
    use crate::format::refcount;
    let bits = refcounts.entries_per_block_bits();
    let mut buf = vec![0u8; 1 << cb];
    let mut runs = Runs::default();
    let mut free = Vec::new();
    for b in 0..end.div_ceil(1 << bits) {
        let first = b << bits;
        let last = ((b + 1) << bits).min(end);
        free.clear();
        match refcounts.read_block(file, b, &mut buf)? {
            BlockRead::Empty => free.extend(first..last),
            BlockRead::Unreadable { .. } => {}
            BlockRead::Read { .. } => free.extend(
                (first..last).filter(|&c| refcount::get(&buf, refcounts.order(), c - first) == 0),
            ),
        }
        runs.add(&free);
    }
    let mut out = Vec::new();
    for (first, n) in runs.finish() {
        let (off, len) = (first << cb, n << cb);
        if file
            .data_in(off, len)
            .ctx(|| format!("looking for data in the {len} bytes at {off:#x}"))?
        {
            out.push((first, n));
        }
    }
    Ok(out)
}

/// Punches `runs` (clusters of `1 << cb` bytes, each free for good) out of
/// `file` on `threads` threads; returns the punches made, or the first error
/// (the punching stops at it).
pub(crate) fn punch_runs<F: WriteAt + ?Sized>(
    file: &F,
    cb: u32,
    runs: &[(u64, u64)],
    threads: usize,
) -> Result<u64> {
    let next = AtomicU64::new(0);
    let punches = AtomicU64::new(0);
    let failed = AtomicBool::new(false);
    let error: Mutex<Option<Error>> = Mutex::new(None);
    let work = || {
        while !failed.load(Ordering::Acquire) {
            let Some(&(first, n)) = usize::try_from(next.fetch_add(1, Ordering::Relaxed))
                .ok()
                .and_then(|i| runs.get(i))
            else {
                return;
            };
            let (off, len) = (first << cb, n << cb);
            let r = file
                .punch_hole(off, len)
                .ctx(|| format!("punching a hole of {len} bytes at {off:#x}"));
            punches.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = r {
                error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .get_or_insert(e);
                failed.store(true, Ordering::Release);
                return;
            }
        }
    };
    std::thread::scope(|s| {
        for _ in 1..threads.clamp(1, runs.len().max(1)) {
            s.spawn(work);
        }
        work();
    });
    match error
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
    {
        Some(e) => Err(e),
        None => Ok(punches.into_inner()),
    }
}
