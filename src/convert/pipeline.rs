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
//! them on in guest order: with [`run_overlay`] it then returns the buffer to the
//! pool; with [`run_overlay_owned`] (`convert`) the batch is given away, with the
//! pool's sender, and comes back from the image writer's I/O thread once its
//! writes are done (`writer::output`).
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
use crate::dedup::{hash_cluster, is_zero, Hash};
use crate::error::{Error, Result};
use crate::source::{BlockStatus, Source};
use crate::writer::batch::{process, Batch, Claims, Kind, Stream, BATCH_BYTES};

/// What the workers do beyond hashing: compare with a backing file (overlays)
/// and store zero clusters as data (`-S 0`, and version 2 overlays, which have
/// no zero flag).
#[derive(Clone, Copy, Default)]
pub struct Overlay<'a> {
    /// The backing chain's guest view; clusters equal to it stay unallocated.
    pub backing: Option<&'a dyn Source>,
    /// Zeros over non-zero backing data become zero-flag entries (version 3);
    /// without it they are stored as zero data.
    pub zero_flag: bool,
    /// Store every zero cluster as data (`-S 0`), except those equal to the
    /// backing file.
    pub allocate_zeros: bool,
    /// Convert what cannot be read from the source as zeros (`--salvage`), and
    /// list the ranges ([`Batch`]'s `salvaged`).
    pub salvage: bool,
}

impl Overlay<'_> {
    /// Whether the workers have anything to do beyond [`process`].
    fn active(&self) -> bool {
        self.backing.is_some() || self.allocate_zeros
    }

    /// Reads a planned batch: [`fill`], or with `salvage` [`fill_salvaging`].
    fn fill(&self, src: &dyn Source, batch: &mut Batch, cs: u64) -> Result<()> {
        if self.salvage {
            fill_salvaging(src, batch, cs);
            Ok(())
        } else {
            fill(src, batch, cs)
        }
    }
}

/// Guest bytes a conversion read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BytesRead {
    /// From the source.
    pub source: u64,
    /// From the backing file (overlays), to compare.
    pub backing: u64,
    /// CPU time (nanoseconds) of the pipeline's worker threads, together, each
    /// read as it ended (0 for the sequential converter, whose work is the
    /// calling thread's).
    pub worker_cpu_ns: u64,
}

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
    /// Zero runs of the source are skipped only where this backing file reads as
    /// zeros too (overlays).
    backing: Option<&'a dyn Source>,
    /// Skip no zero run (`-S 0`: every cluster is stored).
    allocate_zeros: bool,
    /// A block status error plans the rest of its cluster as data to read (which
    /// [`fill_salvaging`] then salvages) instead of failing (`--salvage`).
    salvage: bool,
    /// Guest bytes read from the backing file (sequential converter).
    backing_bytes_read: u64,
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
            backing: None,
            allocate_zeros: false,
            salvage: false,
            backing_bytes_read: 0,
        }
    }

    /// A reader for an overlay or an allocating conversion: zero runs of the
    /// source are planned (not skipped) where `overlay.backing` has data or where
    /// `overlay.allocate_zeros` stores them.
    pub fn for_overlay(src: &'a dyn Source, cs: u64, overlay: &Overlay<'a>) -> Self {
        BatchReader {
            backing: overlay.backing,
            allocate_zeros: overlay.allocate_zeros,
            salvage: overlay.salvage,
            ..BatchReader::new(src, cs)
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
            let (st, mut len) = match self.src.block_status(off, size - off) {
                Err(_) if self.salvage => break,
                r => r?,
            };
            if st == BlockStatus::Zero && self.allocate_zeros {
                break;
            }
            if st == BlockStatus::Zero {
                // Over a backing file, a zero run is skipped only where the
                // backing file reads as zeros too (beyond its end it does).
                if let Some(b) = self.backing {
                    let bsize = b.virtual_size();
                    if off < bsize {
                        let (bst, blen) = b.block_status(off, len.max(1).min(bsize - off))?;
                        if bst == BlockStatus::Data {
                            break;
                        }
                        len = blen;
                    }
                }
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
        batch.backing_bytes_read = 0;
        batch.salvaged.clear();
        batch.error = None;
        let start = first * cs;
        let end = ((first + n) * cs).min(size);
        let mut off = start;
        while off < end {
            let (st, len) = match self.src.block_status(off, end - off) {
                // Read it (and salvage what fails): up to the cluster's end.
                Err(_) if self.salvage => (BlockStatus::Data, (off / cs + 1) * cs - off),
                r => r?,
            };
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

    /// [`BatchReader::next_batch`] for an overlay: also compares the batch with
    /// the backing file ([`against_backing`]).
    fn next_overlay_batch(&mut self, batch: &mut Batch, overlay: &Overlay<'_>) -> Result<bool> {
        if !self.plan(batch)? {
            return Ok(false);
        }
        overlay.fill(self.src, batch, self.cs)?;
        self.bytes_read += batch.bytes_read;
        against_backing(batch, overlay, self.cs, self.src.virtual_size())?;
        self.backing_bytes_read += batch.backing_bytes_read;
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

/// Compares a filled batch with the backing file at the same guest offsets (the
/// backing file is read only where it has data): a cluster equal to it becomes
/// [`Kind::Backing`]; a zero cluster over non-zero backing data becomes
/// [`Kind::ZeroFlag`] (or zero data without `overlay.zero_flag`); other clusters
/// are left to [`process`]. The comparison is byte for byte, both clusters being
/// in memory. Without a backing file, nothing is compared.
pub fn against_backing(
    batch: &mut Batch,
    overlay: &Overlay<'_>,
    cs: u64,
    virtual_size: u64,
) -> Result<()> {
    let Some(backing) = overlay.backing else {
        return Ok(());
    };
    let n = batch.kinds.len();
    let csz = cs as usize;
    let start = batch.first_cluster * cs;
    let end = (start + n as u64 * cs).min(virtual_size);
    let bend = end.min(backing.virtual_size());
    let mut bbuf = std::mem::take(&mut batch.backing_data);
    bbuf.clear();
    bbuf.resize(n * csz, 0);
    // Clusters where the backing file has data (the others read as zeros there).
    let mut has_data = vec![false; n];
    let mut off = start;
    let mut r = Ok(());
    while off < bend {
        let (st, len) = match backing.block_status(off, bend - off) {
            Ok(x) => x,
            Err(e) => {
                r = Err(e);
                break;
            }
        };
        let len = len.clamp(1, bend - off);
        if st == BlockStatus::Data {
            let at = (off - start) as usize;
            if let Err(e) = backing.read_at(&mut bbuf[at..at + len as usize], off) {
                r = Err(e);
                break;
            }
            batch.backing_bytes_read += len;
            for h in &mut has_data[at / csz..=(at + len as usize - 1) / csz] {
                *h = true;
            }
        }
        off += len;
    }
    if r.is_ok() {
        for (i, k) in batch.kinds.iter_mut().enumerate() {
            if !has_data[i] {
                continue;
            }
            let c = &batch.data[i * csz..(i + 1) * csz];
            let b = &bbuf[i * csz..(i + 1) * csz];
            if c == b {
                *k = Kind::Backing;
            } else if is_zero(c) {
                *k = if overlay.zero_flag {
                    Kind::ZeroFlag
                } else {
                    zero_data(cs)
                };
            }
        }
    }
    batch.backing_data = bbuf;
    r
}

/// The kind of a zero cluster stored as data (shared by dedup like any content).
fn zero_data(cs: u64) -> Kind {
    Kind::Data {
        hash: zero_hash(cs),
        stream: Stream::NotTried,
    }
}

/// BLAKE3 of a zero cluster of `cs` bytes (computed once per cluster size).
pub fn zero_hash(cs: u64) -> Hash {
    static CACHE: Mutex<Vec<(u64, Hash)>> = Mutex::new(Vec::new());
    let mut c = CACHE.lock().expect("not poisoned");
    if let Some((_, h)) = c.iter().find(|(s, _)| *s == cs) {
        return *h;
    }
    let h = hash_cluster(&vec![0u8; cs as usize]);
    c.push((cs, h));
    h
}

/// After [`process`]: with `overlay.allocate_zeros` (`-S 0`), zero clusters
/// (and zero-flag ones) become zero data.
fn allocate_zeros(batch: &mut Batch, overlay: &Overlay<'_>, cs: u64) {
    if overlay.allocate_zeros {
        for k in &mut batch.kinds {
            if matches!(k, Kind::Zero | Kind::ZeroFlag) {
                *k = zero_data(cs);
            }
        }
    }
}

/// [`fill`] for `--salvage`: a data run that fails to read is read again cluster
/// by cluster, and a cluster that fails sector by sector (512 bytes); what still
/// fails reads as zeros and is recorded in `batch.salvaged` (adjacent ranges
/// merged, with the first error).
pub fn fill_salvaging(src: &dyn Source, batch: &mut Batch, cs: u64) {
    let n = batch.kinds.len() as u64;
    let start = batch.first_cluster * cs;
    let size = src.virtual_size();
    batch.data.resize((n * cs) as usize, 0);
    let mut filled = 0;
    let runs = std::mem::take(&mut batch.runs);
    for &(off, len, data) in &runs {
        let at = (off - start) as usize;
        filled = at + len as usize;
        if !data {
            batch.data[at..filled].fill(0);
            continue;
        }
        batch.bytes_read += len;
        if src.read_at(&mut batch.data[at..filled], off).is_ok() {
            continue;
        }
        // Cluster by cluster, then sector by sector.
        let mut cl = off;
        while cl < off + len {
            let cl_end = ((cl / cs + 1) * cs).min(off + len);
            let buf = &mut batch.data[(cl - start) as usize..(cl_end - start) as usize];
            if src.read_at(buf, cl).is_err() {
                let mut sec = cl;
                while sec < cl_end {
                    let sec_end = ((sec / 512 + 1) * 512).min(cl_end).min(size);
                    let buf = &mut batch.data[(sec - start) as usize..(sec_end - start) as usize];
                    if let Err(e) = src.read_at(buf, sec) {
                        buf.fill(0);
                        match batch.salvaged.last_mut() {
                            Some((o, l, _)) if *o + *l == sec => *l += sec_end - sec,
                            _ => batch.salvaged.push((sec, sec_end - sec, e.to_string())),
                        }
                    }
                    sec = sec_end;
                }
            }
            cl = cl_end;
        }
    }
    batch.runs = runs;
    batch.data[filled..].fill(0);
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

/// [`run`] for an overlay or an allocating conversion (`overlay`): the workers
/// also compare with the backing file and store zeros as `overlay` says.
pub fn run_overlay(
    src: &dyn Source,
    overlay: &Overlay<'_>,
    opts: &ConvertOptions,
    compress: Option<&CompressFn>,
    deliver: &mut DeliverFn<'_>,
) -> Result<BytesRead> {
    if opts.workers == 0 {
        run_sequential_overlay(src, overlay, opts, compress, deliver)
    } else {
        run_pipelined_overlay(src, overlay, opts, compress, deliver)
    }
}

/// Receives processed batches in guest order (on the calling thread).
pub type DeliverFn<'a> = dyn FnMut(&Batch) -> Result<()> + 'a;

/// Receives processed batches in guest order (on the calling thread) and keeps
/// them: each must be sent back through the given pool sender once done with
/// (it may be later, from another thread: the writer's I/O thread does). A
/// batch not sent back is simply missing from the pool (fewer batches in
/// flight).
pub type OwnedDeliverFn<'a> = dyn FnMut(Batch, &Sender<Batch>) -> Result<()> + 'a;

/// How the writer loop hands batches on.
enum Deliver<'d, 'a> {
    /// By reference; the pipeline recycles the buffer.
    Borrowed(&'d mut DeliverFn<'a>),
    /// By value; the receiver recycles it.
    Owned(&'d mut OwnedDeliverFn<'a>),
}

/// [`run_overlay`] handing the batches over by value ([`OwnedDeliverFn`]):
/// `convert` gives them, with the writes placed into them, to the writer's I/O
/// thread.
pub fn run_overlay_owned(
    src: &dyn Source,
    overlay: &Overlay<'_>,
    opts: &ConvertOptions,
    compress: Option<&CompressFn>,
    deliver: &mut OwnedDeliverFn<'_>,
) -> Result<BytesRead> {
    if opts.workers == 0 {
        run_sequential_inner(src, overlay, opts, compress, Deliver::Owned(deliver))
    } else {
        run_pipelined_inner(src, overlay, opts, compress, Deliver::Owned(deliver))
    }
}

/// The sequential reader/worker loop, handing each processed batch to `deliver`
/// (used by `convert` with an [`ImageWriter`](crate::writer::ImageWriter), and by `estimate` with several).
/// Returns the guest bytes read.
pub fn run_sequential_with(
    src: &dyn Source,
    opts: &ConvertOptions,
    compress: Option<&CompressFn>,
    deliver: &mut DeliverFn<'_>,
) -> Result<u64> {
    run_sequential_overlay(src, &Overlay::default(), opts, compress, deliver).map(|r| r.source)
}

/// [`run_sequential_with`] with [`Overlay`]'s extra steps.
fn run_sequential_overlay(
    src: &dyn Source,
    overlay: &Overlay<'_>,
    opts: &ConvertOptions,
    compress: Option<&CompressFn>,
    deliver: &mut DeliverFn<'_>,
) -> Result<BytesRead> {
    run_sequential_inner(src, overlay, opts, compress, Deliver::Borrowed(deliver))
}

fn run_sequential_inner(
    src: &dyn Source,
    overlay: &Overlay<'_>,
    opts: &ConvertOptions,
    compress: Option<&CompressFn>,
    mut deliver: Deliver<'_, '_>,
) -> Result<BytesRead> {
    let cs = opts.cluster_size();
    let total = src.virtual_size();
    let mut reader = BatchReader::for_overlay(src, cs, overlay);
    let mut batch = Batch::default();
    let claims = opts.dedup.then(Claims::new);
    // Owned delivery: the batch comes back through here (at once, or from the
    // writer's I/O thread; a fresh one meanwhile).
    let (back_tx, back_rx) = crossbeam_channel::unbounded::<Batch>();
    while reader.next_overlay_batch(&mut batch, overlay)? {
        if cancelled(opts) {
            return Err(Error::Interrupted);
        }
        work_on(&mut batch, overlay, opts, total, compress, claims.as_ref());
        match &mut deliver {
            Deliver::Borrowed(d) => d(&batch)?,
            Deliver::Owned(d) => {
                let b = std::mem::take(&mut batch);
                d(b, &back_tx)?;
                batch = back_rx.try_recv().unwrap_or_default();
            }
        }
        if let Some(p) = &opts.progress {
            p(reader.position(), total);
        }
    }
    Ok(BytesRead {
        source: reader.bytes_read,
        backing: reader.backing_bytes_read,
        worker_cpu_ns: 0,
    })
}

/// A worker's steps on a batch that was read (and compared with the backing
/// file): hash and compress ([`process`]), store zeros where `-S 0` asks, and
/// the block digests of `--checksum`. `total` is the virtual size.
fn work_on(
    batch: &mut Batch,
    overlay: &Overlay<'_>,
    opts: &ConvertOptions,
    total: u64,
    compress: Option<&CompressFn>,
    claims: Option<&Claims>,
) {
    let cs = opts.cluster_size();
    process(batch, cs as usize, compress, claims);
    allocate_zeros(batch, overlay, cs);
    if let Some(alg) = opts.checksum {
        crate::checksum::block_digests(alg, batch, cs, total);
    }
}

/// The pipelined workers, handing processed batches to `deliver` in guest order
/// on the calling thread. Returns the guest bytes read.
pub fn run_pipelined_with(
    src: &dyn Source,
    opts: &ConvertOptions,
    compress: Option<&CompressFn>,
    deliver: &mut DeliverFn<'_>,
) -> Result<u64> {
    run_pipelined_overlay(src, &Overlay::default(), opts, compress, deliver).map(|r| r.source)
}

/// [`run_pipelined_with`] with [`Overlay`]'s extra steps, done by the workers.
fn run_pipelined_overlay(
    src: &dyn Source,
    overlay: &Overlay<'_>,
    opts: &ConvertOptions,
    compress: Option<&CompressFn>,
    deliver: &mut DeliverFn<'_>,
) -> Result<BytesRead> {
    run_pipelined_inner(src, overlay, opts, compress, Deliver::Borrowed(deliver))
}

fn run_pipelined_inner(
    src: &dyn Source,
    overlay: &Overlay<'_>,
    opts: &ConvertOptions,
    compress: Option<&CompressFn>,
    mut deliver: Deliver<'_, '_>,
) -> Result<BytesRead> {
    let cs = opts.cluster_size();
    let total = src.virtual_size();
    let workers = opts.workers.max(1);
    let reader = BatchReader::for_overlay(src, cs, overlay);
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
    let mut bytes_read = BytesRead::default();
    let worker_cpu = std::sync::atomic::AtomicU64::new(0);
    let claims = opts.dedup.then(Claims::new);
    let claims = claims.as_ref();

    std::thread::scope(|s| {
        // Workers: plan (under the lock), read, process.
        for _ in 0..workers {
            let pool_rx = pool_rx.clone();
            let done_tx = done_tx.clone();
            let (reader, fail, stop, worker_cpu) = (&reader, &fail, &stop, &worker_cpu);
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
                        let filled = overlay.fill(src, &mut b, cs).and_then(|()| {
                            if overlay.active() {
                                against_backing(&mut b, overlay, cs, total)?;
                            }
                            Ok(())
                        });
                        match filled {
                            Ok(()) => {
                                work_on(&mut b, overlay, opts, total, compress, claims);
                            }
                            Err(e) => b.error = Some(e),
                        }
                    }
                    if done_tx.send(b).is_err() {
                        break;
                    }
                }
                // Every way out of the loop comes here.
                if let Some(ns) = crate::io::thread_cpu_ns() {
                    worker_cpu.fetch_add(ns, Ordering::Relaxed);
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
                bytes_read.source += b.bytes_read;
                bytes_read.backing += b.backing_bytes_read;
                next_seq += 1;
                let reached = ((b.first_cluster + b.kinds.len() as u64) * cs).min(total);
                let delivered = match &mut deliver {
                    Deliver::Borrowed(d) => d(&b).map(|()| {
                        // The workers may be gone (they finished): then the
                        // buffer is just dropped.
                        let _ = pool_tx.send(b);
                    }),
                    Deliver::Owned(d) => d(b, &pool_tx),
                };
                if let Err(e) = delivered {
                    fail(e);
                    break 'recv;
                }
                if let Some(p) = &opts.progress {
                    p(reached, total);
                }
            }
        }
        // Unblock the workers if we stopped early; the scope joins them.
        drop(pool_tx);
        drop(done_rx);
    });
    if let Some(e) = first_error.into_inner().expect("not poisoned") {
        return Err(e);
    }
    bytes_read.worker_cpu_ns = worker_cpu.into_inner();
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
