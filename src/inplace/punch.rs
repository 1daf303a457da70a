//! Hole punching behind the flush groups.
//!
//! The clusters a flush group frees may be punched out of the file once their
//! refcount 0 is durable (step 3 of [`super::apply`]); nothing refers to them
//! and nothing allocates them while `dedup` holds the image. A [`Puncher`] takes
//! them after each group, joins adjacent clusters into runs (across groups too:
//! the last run of a group is held back until the next group shows whether it
//! goes on) and punches the runs on background threads, while the next groups
//! are applied. [`Puncher::finish`] waits for the last punch; it must return
//! before anything else changes the image (compaction, the final repair).
//!
//! Why runs and threads: on ext4 mounted with `discard` and without a journal,
//! every `fallocate(PUNCH_HOLE)` issues a synchronous discard of each freed
//! extent under the inode lock, and waits for it (about 1.5 ms per call on the
//! benchmark VM, whatever its length up to a few MiB): the number of runs is
//! what costs (see also [`super::plan::choose_survivors`] and
//! [`super::plan::bridges`]). Punches of one file are serialized by its inode
//! lock: threads gain little ([`PUNCH_THREADS`], docs/benchmarks.md).
//!
//! A failing punch stops the punching: the error is returned by the next
//! [`Puncher::add`] or by [`Puncher::finish`]. The clusters not punched are free
//! in the image (refcount 0) and only keep their space in the file (QEMU
//! allocates free clusters again).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::{Scope, ScopedJoinHandle};

use crate::error::{Error, IoContext, Result};
use crate::io::WriteAt;

/// Threads punching at once. The inode lock serializes the punches of one file,
/// yet on the benchmark VM two or more threads took the punching of the 2 GiB
/// benchmark from 11.5–18.8 s to 6–13.7 s (the device's latency varies with the
/// load; 2, 4 and 8 threads were not told apart): the next call is already
/// waiting on the lock when one returns.
pub(crate) const PUNCH_THREADS: usize = 4;

/// What the punching threads share.
struct Shared {
    /// Runs `(first cluster, count)` to punch.
    queue: Mutex<Receiver<(u64, u64)>>,
    /// The first error; later punches are not made.
    error: Mutex<Option<Error>>,
    failed: AtomicBool,
    punches: AtomicU64,
}

/// Punches freed clusters in runs on background threads (see the module doc).
pub(crate) struct Puncher<'scope> {
    tx: Option<Sender<(u64, u64)>>,
    shared: Arc<Shared>,
    /// The last run added, not sent yet: the next clusters may extend it.
    held: Option<(u64, u64)>,
    /// Clusters that will be freed later ([`Puncher::add_late`], ascending):
    /// runs next to them wait for them.
    late: Vec<u64>,
    /// Runs waiting for `late` clusters.
    parked: Vec<(u64, u64)>,
    threads: Vec<ScopedJoinHandle<'scope, ()>>,
}

impl<'scope> Puncher<'scope> {
    /// Starts `threads` (at least one) punching threads on `file` in `scope`.
    pub(crate) fn new<'env, F: WriteAt + ?Sized>(
        scope: &'scope Scope<'scope, 'env>,
        file: &'env F,
        cluster_bits: u32,
        threads: usize,
    ) -> Self {
        let (tx, rx) = channel();
        let shared = Arc::new(Shared {
            queue: Mutex::new(rx),
            error: Mutex::new(None),
            failed: AtomicBool::new(false),
            punches: AtomicU64::new(0),
        });
        let threads = (0..threads.max(1))
            .map(|_| {
                let shared = Arc::clone(&shared);
                scope.spawn(move || work(file, cluster_bits, &shared))
            })
            .collect();
        Puncher {
            tx: Some(tx),
            shared,
            held: None,
            late: Vec::new(),
            parked: Vec::new(),
            threads,
        }
    }

    /// Says which clusters will be freed after the ones [`Puncher::add`] gets
    /// (`sorted`, ascending): runs next to them are held back until
    /// [`Puncher::add_late`] joins them.
    pub(crate) fn wait_for(&mut self, sorted: Vec<u64>) {
        self.late = sorted;
    }

    /// Queues the clusters `sorted` (ascending, each freed durably) for
    /// punching. Fails with the error of an earlier punch, if one failed.
    pub(crate) fn add(&mut self, sorted: &[u64]) -> Result<()> {
        self.check()?;
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
        Ok(())
    }

    /// Queues the clusters announced by [`Puncher::wait_for`] (`sorted`, each
    /// freed durably), joined with the runs that waited for them.
    pub(crate) fn add_late(&mut self, sorted: &[u64]) -> Result<()> {
        self.check()?;
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
                        self.send(run);
                    }
                }
            }
        }
        if let Some(run) = cur {
            self.send(run);
        }
        Ok(())
    }

    /// Sends `run`, or parks it if a late cluster borders it.
    fn emit(&mut self, run: (u64, u64)) {
        let (first, n) = run;
        let borders = |c: Option<u64>| c.is_some_and(|c| self.late.binary_search(&c).is_ok());
        if borders(first.checked_sub(1)) || borders(first.checked_add(n)) {
            self.parked.push(run);
        } else {
            self.send(run);
        }
    }

    fn send(&self, run: (u64, u64)) {
        if let Some(tx) = &self.tx {
            // The threads stop only after `tx` is dropped (or after a failure,
            // which `check` reports): a failed send loses nothing that matters.
            let _ = tx.send(run);
        }
    }

    /// The error of a failed punch, if any (taken: reported once).
    fn check(&self) -> Result<()> {
        if self.shared.failed.load(Ordering::Acquire) {
            if let Some(e) = lock(&self.shared.error).take() {
                return Err(e);
            }
        }
        Ok(())
    }

    /// Punches the run held back, waits for every punch and returns how many
    /// were made, or the first error.
    pub(crate) fn finish(mut self) -> Result<u64> {
        if let Some(run) = self.held.take() {
            self.emit(run);
        }
        // Runs still parked (the late clusters never came: an error) wait no
        // longer.
        for run in std::mem::take(&mut self.parked) {
            self.send(run);
        }
        self.tx = None;
        for t in std::mem::take(&mut self.threads) {
            if let Err(p) = t.join() {
                std::panic::resume_unwind(p);
            }
        }
        self.check()?;
        Ok(self.shared.punches.load(Ordering::Relaxed))
    }
}

impl Drop for Puncher<'_> {
    fn drop(&mut self) {
        // Dropped without `finish` (an error elsewhere): the runs queued are
        // punched (their clusters are free for good), the one held back is not;
        // the scope joins the threads once the queue is drained.
        self.tx = None;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A punching thread never panics while holding a lock; take the data anyway.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One punching thread: takes runs until the queue closes or a punch fails.
fn work<F: WriteAt + ?Sized>(file: &F, cb: u32, shared: &Shared) {
    loop {
        if shared.failed.load(Ordering::Acquire) {
            return;
        }
        let Ok((first, n)) = lock(&shared.queue).recv() else {
            return;
        };
        let (off, len) = (first << cb, n << cb);
        let r = file
            .punch_hole(off, len)
            .ctx(|| format!("punching a hole of {len} bytes at {off:#x}"));
        shared.punches.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = r {
            lock(&shared.error).get_or_insert(e);
            shared.failed.store(true, Ordering::Release);
            return;
        }
    }
}
