//! The conversion pipeline.
//!
//! ```text
//!           ┌── plan (under a lock: block status, sequence number) ──┐
//! N workers ┤   read the batch's data runs (pread)                   ├─done (bounded)─▶ writer
//!     ▲     └── zero detection, BLAKE3, compression ─────────────────┘                (this thread)
//!     │                                                                                  │
//!     └───────────────────── buffer pool (fixed number of buffers) ◀────────────────────┘
//! ```
//!
//! A worker takes a buffer from a fixed pool (the pool is the memory bound: at most
//! `max_in_flight` bytes of guest data anywhere in the pipeline), plans the next
//! batch of consecutive clusters under a lock ([`BatchReader::plan`]: runs the
//! source reports as zero are skipped without being read, and the batch gets its
//! sequence number), then reads the batch's data ([`fill`]) and processes it
//! ([`process`]: zero detection, BLAKE3, compression) outside the lock. Reading in
//! the worker rather than in a separate reader thread spreads the `pread` copy over
//! the workers and hashes the data while it is still in the core's cache
//! (docs/benchmarks.md). The writer reorders batches by sequence number and hands
//! them to the writer in guest order, then returns the buffer to the pool.
//!
//! Every planned batch reaches the writer, even one whose read failed (it carries
//! the error), so the writer never waits for a batch that will not come. A closed
//! channel means shutdown; the first error is the one reported; no thread outlives
//! the call (scoped threads).
//!
//! [`run_sequential_with`] is the reference: the same planning, reading, worker function
//! and writer in one thread. Both produce the same bytes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use crossbeam_channel::{bounded, Receiver, Sender};

use super::options::ConvertOptions;
use crate::compress::CompressFn;
use crate::error::{Error, Result};
use crate::source::{BlockStatus, Source};
use crate::writer::batch::{process, Batch, Claims, Kind, BATCH_BYTES};

/// Walks the guest disk and fills batches.
pub struct BatchReader<'a> {
    src: &'a dyn Source,
    cs: u64,
    batch_clusters: u64,
    total_clusters: u64,
    next_cluster: u64,
    seq: u64,
    /// Guest bytes actually read.
    pub bytes_read: u64,
}

impl<'a> BatchReader<'a> {
    /// A reader over `src` in clusters of `cs` bytes.
    pub fn new(src: &'a dyn Source, cs: u64) -> Self {
        let batch_clusters = (BATCH_BYTES as u64 / cs).max(1);
        BatchReader {
            src,
            cs,
            batch_clusters,
            total_clusters: src.virtual_size().div_ceil(cs),
            next_cluster: 0,
            seq: 0,
            bytes_read: 0,
        }
    }

    /// Size of the buffers batches need.
    pub fn buffer_bytes(&self) -> usize {
        (self.batch_clusters * self.cs) as usize
    }

    /// Guest bytes covered so far.
    pub fn position(&self) -> u64 {
        (self.next_cluster * self.cs).min(self.src.virtual_size())
    }

    /// Plans `batch` as the next run of clusters that may hold data: its sequence
    /// number, first cluster, which clusters are known zero and which runs to
    /// read. Cheap (block status only, no data is read); `Ok(false)` at the end.
    /// After an error the reader is finished.
    pub fn plan(&mut self, batch: &mut Batch) -> Result<bool> {
        let r = self.plan_inner(batch);
        if !matches!(r, Ok(true)) {
            self.next_cluster = self.total_clusters;
        }
        r
    }

    fn plan_inner(&mut self, batch: &mut Batch) -> Result<bool> {
        let size = self.src.virtual_size();
        let cs = self.cs;
        // Skip clusters that are entirely zero according to the source.
        while self.next_cluster < self.total_clusters {
            let off = self.next_cluster * cs;
            let (st, len) = self.src.block_status(off, size - off)?;
            if st == BlockStatus::Zero {
                let end = (off + len.max(1)).min(size);
                let whole = if end == size {
                    self.total_clusters
                } else {
                    end / cs
                };
                if whole > self.next_cluster {
                    self.next_cluster = whole;
                    continue;
                }
            }
            break;
        }
        if self.next_cluster >= self.total_clusters {
            return Ok(false);
        }
        let first = self.next_cluster;
        let n = self.batch_clusters.min(self.total_clusters - first);
        batch.first_cluster = first;
        batch.kinds.clear();
        batch.kinds.resize(n as usize, Kind::Unprocessed);
        batch.streams.clear();
        batch.runs.clear();
        batch.bytes_read = 0;
        batch.error = None;
        let start = first * cs;
        let end = ((first + n) * cs).min(size);
        let mut off = start;
        while off < end {
            let (st, len) = self.src.block_status(off, end - off)?;
            let len = len.clamp(1, end - off);
            batch.runs.push((off, len, st == BlockStatus::Data));
            // Clusters wholly inside a zero run need no worker.
            if st == BlockStatus::Zero {
                let c0 = (off - start).div_ceil(cs);
                let c1 = if off + len == size {
                    n
                } else {
                    (off - start + len) / cs
                };
                for k in c0..c1.min(n) {
                    batch.kinds[k as usize] = Kind::Zero;
                }
            }
            off += len;
        }
        self.next_cluster += n;
        batch.seq = self.seq;
        self.seq += 1;
        Ok(true)
    }

    /// Plans and fills `batch` (the sequential converter's step); `Ok(false)` at
    /// the end.
    pub fn next_batch(&mut self, batch: &mut Batch) -> Result<bool> {
        if !self.plan(batch)? {
            return Ok(false);
        }
        fill(self.src, batch, self.cs)?;
        self.bytes_read += batch.bytes_read;
        Ok(true)
    }
}

/// Reads the data runs of a planned batch into its buffer (reusing it); zero runs
/// and the tail of a last partial cluster read as zeros.
pub fn fill(src: &dyn Source, batch: &mut Batch, cs: u64) -> Result<()> {
    let n = batch.kinds.len() as u64;
    let start = batch.first_cluster * cs;
    batch.data.resize((n * cs) as usize, 0);
    let mut filled = 0;
    for &(off, len, data) in &batch.runs {
        let buf = &mut batch.data[(off - start) as usize..(off - start + len) as usize];
        if data {
            src.read_at(buf, off)?;
            batch.bytes_read += len;
        } else {
            buf.fill(0);
        }
        filled = (off - start + len) as usize;
    }
    batch.data[filled..].fill(0);
    Ok(())
}

/// Spawns a named scoped thread (names show in `top -H` and `perf report --sort comm`).
fn spawn_named<'scope, T: Send + 'scope>(
    s: &'scope std::thread::Scope<'scope, '_>,
    name: &str,
    f: impl FnOnce() -> T + Send + 'scope,
) -> std::thread::ScopedJoinHandle<'scope, T> {
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn_scoped(s, f)
        .expect("cannot spawn a pipeline thread")
}

fn cancelled(opts: &ConvertOptions) -> bool {
    opts.cancel
        .as_ref()
        .is_some_and(|c| c.load(Ordering::Relaxed))
}

/// Runs the sequential reference (`opts.workers == 0`) or the pipelined
/// converter, handing each processed batch to `deliver` in guest order on the
/// calling thread. Returns the guest bytes read.
pub fn run(
    src: &dyn Source,
    opts: &ConvertOptions,
    compress: Option<&CompressFn>,
    deliver: &mut DeliverFn<'_>,
) -> Result<u64> {
    if opts.workers == 0 {
        run_sequential_with(src, opts, compress, deliver)
    } else {
        run_pipelined_with(src, opts, compress, deliver)
    }
}

/// Receives processed batches in guest order (on the calling thread).
pub type DeliverFn<'a> = dyn FnMut(&Batch) -> Result<()> + 'a;

/// The sequential reader/worker loop, handing each processed batch to `deliver`
/// (used by `convert` with an [`ImageWriter`](crate::writer::ImageWriter), and by `estimate` with several).
/// Returns the guest bytes read.
pub fn run_sequential_with(
    src: &dyn Source,
    opts: &ConvertOptions,
    compress: Option<&CompressFn>,
    deliver: &mut DeliverFn<'_>,
) -> Result<u64> {
    let cs = opts.cluster_size();
    let total = src.virtual_size();
    let mut reader = BatchReader::new(src, cs);
    let mut batch = Batch::default();
    let claims = opts.dedup.then(Claims::new);
    while reader.next_batch(&mut batch)? {
        if cancelled(opts) {
            return Err(Error::Interrupted);
        }
        process(&mut batch, cs as usize, compress, claims.as_ref());
        if let Some(alg) = opts.checksum {
            crate::checksum::block_digests(alg, &mut batch, cs, total);
        }
        deliver(&batch)?;
        if let Some(p) = &opts.progress {
            p(reader.position(), total);
        }
    }
    Ok(reader.bytes_read)
}

/// The pipelined workers, handing processed batches to `deliver` in guest order
/// on the calling thread. Returns the guest bytes read.
pub fn run_pipelined_with(
    src: &dyn Source,
    opts: &ConvertOptions,
    compress: Option<&CompressFn>,
    deliver: &mut DeliverFn<'_>,
) -> Result<u64> {
    let cs = opts.cluster_size();
    let total = src.virtual_size();
    let workers = opts.workers.max(1);
    let reader = BatchReader::new(src, cs);
    let buffers = pool_size(opts.max_in_flight, reader.buffer_bytes(), workers);
    let reader = Mutex::new(reader);
    let (pool_tx, pool_rx): (Sender<Batch>, Receiver<Batch>) = bounded(buffers);
    for _ in 0..buffers {
        pool_tx.send(Batch::default()).expect("pool has room");
    }
    let (done_tx, done_rx) = bounded::<Batch>(buffers);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let stop = AtomicBool::new(false);
    let fail = |e: Error| {
        let mut slot = first_error.lock().expect("not poisoned");
        if slot.is_none() {
            *slot = Some(e);
        }
        stop.store(true, Ordering::SeqCst);
    };
    let mut bytes_read = 0;
    let claims = opts.dedup.then(Claims::new);
    let claims = claims.as_ref();

    std::thread::scope(|s| {
        // Workers: plan (under the lock), read, process.
        for _ in 0..workers {
            let pool_rx = pool_rx.clone();
            let done_tx = done_tx.clone();
            let (reader, fail, stop) = (&reader, &fail, &stop);
            spawn_named(s, "qdedup-work", move || {
                while let Ok(mut b) = pool_rx.recv() {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if cancelled(opts) {
                        fail(Error::Interrupted);
                        break;
                    }
                    let planned = reader.lock().expect("not poisoned").plan(&mut b);
                    match planned {
                        Ok(true) => {}
                        Ok(false) => break,
                        Err(e) => {
                            fail(e);
                            break;
                        }
                    }
                    // A planned batch always goes to the writer (which waits for
                    // it by sequence number), with its read error if any.
                    if !stop.load(Ordering::Relaxed) {
                        match fill(src, &mut b, cs) {
                            Ok(()) => {
                                process(&mut b, cs as usize, compress, claims);
                                if let Some(alg) = opts.checksum {
                                    crate::checksum::block_digests(alg, &mut b, cs, total);
                                }
                            }
                            Err(e) => b.error = Some(e),
                        }
                    }
                    if done_tx.send(b).is_err() {
                        break;
                    }
                }
            });
        }
        drop(done_tx);
        drop(pool_rx);
        // Writer: this thread, in guest order.
        let mut pending: BTreeMap<u64, Batch> = BTreeMap::new();
        let mut next_seq = 0u64;
        'recv: while let Ok(b) = done_rx.recv() {
            pending.insert(b.seq, b);
            while let Some(mut b) = pending.remove(&next_seq) {
                if stop.load(Ordering::Relaxed) {
                    break 'recv;
                }
                if let Some(e) = b.error.take() {
                    fail(e);
                    break 'recv;
                }
                if let Err(e) = deliver(&b) {
                    fail(e);
                    break 'recv;
                }
                bytes_read += b.bytes_read;
                next_seq += 1;
                if let Some(p) = &opts.progress {
                    p(
                        ((b.first_cluster + b.kinds.len() as u64) * cs).min(total),
                        total,
                    );
                }
                // The workers may be gone (they finished): then the buffer is just
                // dropped.
                let _ = pool_tx.send(b);
            }
        }
        // Unblock the workers if we stopped early; the scope joins them.
        drop(pool_tx);
        drop(done_rx);
    });
    if let Some(e) = first_error.into_inner().expect("not poisoned") {
        return Err(e);
    }
    Ok(bytes_read)
}

/// Number of batch buffers: what `max_in_flight` allows, but no more than the
/// workers need to stay busy while the writer catches up (two each, plus two).
/// More buffers only add memory that must be faulted in and that falls out of the
/// cache between the worker and the writer: 32 buffers (64 MiB) cost about twice
/// the CPU time of 6 on the 2 GiB mixed input (docs/benchmarks.md).
fn pool_size(max_in_flight: usize, buffer_bytes: usize, workers: usize) -> usize {
    (max_in_flight / buffer_bytes)
        .min(2 * workers + 2)
        .max(workers + 1)
}
