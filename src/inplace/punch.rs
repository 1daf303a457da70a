//! Hole punching, after everything else.
//!
//! The clusters a flush group frees may be punched out of the file once their
//! refcount 0 is durable (step 3 of [`super::apply`]); nothing refers to them
//! and nothing allocates them while `dedup` holds the image (the final repair
//! only lowers refcounts and sets flags: it allocates nothing). A [`Runs`]
//! takes them after each group and joins adjacent clusters into runs (across
//! groups too: the last run of a group is held back until the next group shows
//! whether it goes on, and runs next to clusters freed later wait for them);
//! [`punch_runs`] punches the runs on a few threads once the image is final.
//!
//! Why runs: on ext4 mounted with `discard`, every extent freed is trimmed on
//! the device, and each trim costs (about 1.5 ms plus 1.4 ms per MiB on the
//! benchmark VM): the number of runs is what costs (see also
//! [`super::plan::choose_survivors`] and [`super::plan::bridges`]).
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
//! space in the file (QEMU allocates free clusters again).

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

/// Freed clusters joined into runs `(first cluster, count)` to punch (see the
/// module doc).
#[derive(Default)]
pub(crate) struct Runs {
    /// Runs complete.
    done: Vec<(u64, u64)>,
    /// The last run added, not complete yet: the next clusters may extend it.
    held: Option<(u64, u64)>,
    /// Clusters that will be freed later ([`Runs::add_late`], ascending):
    /// runs next to them wait for them.
    late: Vec<u64>,
    /// Runs waiting for `late` clusters.
    parked: Vec<(u64, u64)>,
}

impl Runs {
    /// Says which clusters will be freed after the ones [`Runs::add`] gets
    /// (`sorted`, ascending): runs next to them are held back until
    /// [`Runs::add_late`] joins them.
    pub(crate) fn wait_for(&mut self, sorted: Vec<u64>) {
        self.late = sorted;
    }

    /// Adds the clusters `sorted` (ascending, each freed durably).
    pub(crate) fn add(&mut self, sorted: &[u64]) {
        for &c in sorted {
            match &mut self.held {
                Some((first, n)) if *first + *n == c => *n += 1,
                held => {
                    if let Some(run) = held.replace((c, 1)) {
                        self.emit(run);
                    }
                }
            }
        }
    }

    /// Adds the clusters announced by [`Runs::wait_for`] (`sorted`, each freed
    /// durably), joined with the runs that waited for them.
    pub(crate) fn add_late(&mut self, sorted: &[u64]) {
        if let Some(run) = self.held.take() {
            self.emit(run);
        }
        self.late.clear();
        let mut runs = std::mem::take(&mut self.parked);
        runs.extend(sorted.iter().map(|&c| (c, 1)));
        runs.sort_unstable();
        let mut cur: Option<(u64, u64)> = None;
        for (first, n) in runs {
            match &mut cur {
                Some((f, m)) if *f + *m == first => *m += n,
                cur => {
                    if let Some(run) = cur.replace((first, n)) {
                        self.done.push(run);
                    }
                }
            }
        }
        if let Some(run) = cur {
            self.done.push(run);
        }
    }

    /// Completes `run`, or parks it if a late cluster borders it.
    fn emit(&mut self, run: (u64, u64)) {
        let (first, n) = run;
        let borders = |c: Option<u64>| c.is_some_and(|c| self.late.binary_search(&c).is_ok());
        if borders(first.checked_sub(1)) || borders(first.checked_add(n)) {
            self.parked.push(run);
        } else {
            self.done.push(run);
        }
    }

    /// Every run, the one held back and those still parked (the late clusters
    /// never came: an error) included, ascending.
    pub(crate) fn finish(mut self) -> Vec<(u64, u64)> {
        if let Some(run) = self.held.take() {
            self.emit(run);
        }
        let mut runs = self.done;
        runs.append(&mut self.parked);
        runs.sort_unstable();
        runs
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
