//! The writer's side of the output file: small writes gathered into one buffer,
//! the file reserved ahead of the writes ([`WriteAt::preallocate`]), and,
//! for the conversion pipeline, all of it done on an I/O thread.
//!
//! The [`ImageWriter`](super::ImageWriter) decides what goes where (dedup index,
//! refcounts, L2 tables) and emits writes in order. Without an I/O thread
//! ([`Sink::Direct`]) each write is done at once, as it always was. With one
//! ([`Sink::Thread`], [`ImageWriter::start_io_thread`](super::ImageWriter::start_io_thread))
//! the writes of one batch are recorded as a [`Job`]: ranges of the batch's own
//! buffer (no copy) and a few owned bytes (compressed streams, L2 tables, COPIED
//! fixes). The job, with the batch, goes to the I/O thread, which does the writes
//! in the order they were emitted and hands the batch buffer back to the
//! pipeline's pool. The file gets the same bytes at the same offsets through the
//! same [`Output`] either way, so the output is identical.
//!
//! Why: on the 2 GiB mixed sample at `-m 2`, the buffered `pwrite`s into the
//! output's page cache were 68% of the writer thread's time, and the writer
//! thread's share of the CPU caps how far the pipeline scales
//! (docs/benchmarks.md, "Big images").
//!
//! Errors: the I/O thread keeps the first one and stops writing, but keeps
//! taking jobs and handing their buffers back, so no thread waits for a buffer
//! that will not come; the writer returns the error from its next batch (or from
//! [`ImageWriter::stop_io_thread`](super::ImageWriter::stop_io_thread)).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use crossbeam_channel::{Receiver, Sender};

use super::batch::Batch;
use crate::error::{Error, IoContext, Result};
use crate::io::WriteAt;

/// Write requests smaller than this are gathered into one buffer.
const WRITE_BUFFER: usize = 4 << 20;
/// Runs of at least this many bytes are written straight from the batch buffer.
const DIRECT_WRITE: usize = 256 << 10;
/// The output file is reserved (`fallocate`, see [`WriteAt::preallocate`]) up to
/// this far ahead of the writes, and trimmed to its real length at the end.
/// Writing into reserved space costs ext4 about a third less kernel time than
/// delayed allocation block by block, and lets the file's page cache be prepared
/// ahead of the writer.
const PREALLOCATE_STEP: u64 = 64 << 20;

/// The output file with its write buffer and reservation.
pub(crate) struct Output<'a> {
    out: &'a dyn WriteAt,
    /// Bytes of the output reserved so far (see [`PREALLOCATE_STEP`]).
    reserved: u64,
    wbuf: Vec<u8>,
    wbuf_off: u64,
    /// The output opened for direct I/O ([`WriteAt::open_direct`]): writes of
    /// whole, aligned 4 KiB blocks go through it.
    direct: Option<std::fs::File>,
    /// A page-aligned copy of what a direct write writes.
    stage: Vec<u8>,
    /// Bytes written through `direct` so far.
    direct_bytes: u64,
    /// Write-behind ([`Output::written`]): on for an output synced at the end.
    pub(crate) write_behind: bool,
    /// Where the next range to start writing back begins.
    wb_started: u64,
    /// Where the next range to let the page cache drop begins.
    wb_dropped: u64,
    /// Bytes whose writeback write-behind started.
    pub(crate) write_behind_bytes: u64,
}

/// With write-behind, the writeback of the output is started in steps of this
/// many bytes, one step behind the furthest write (see [`Output::written`]).
const WRITE_BEHIND_STEP: u64 = 8 << 20;

/// Alignment of direct writes (offset, length, memory).
const DIRECT_ALIGN: usize = 4096;

impl<'a> Output<'a> {
    pub(crate) fn new(out: &'a dyn WriteAt) -> Self {
        Output {
            out,
            reserved: 0,
            wbuf: Vec::new(),
            wbuf_off: 0,
            direct: None,
            stage: Vec::new(),
            direct_bytes: 0,
            write_behind: false,
            wb_started: 0,
            wb_dropped: 0,
            write_behind_bytes: 0,
        }
    }

    /// Writes `bytes` at `off`, gathered with adjacent small writes (runs of at
    /// least [`DIRECT_WRITE`] bytes go out at once).
    pub(crate) fn push(&mut self, bytes: &[u8], off: u64) -> Result<()> {
        if !self.wbuf.is_empty() && self.wbuf_off + self.wbuf.len() as u64 != off {
            self.flush()?;
        }
        if bytes.len() >= DIRECT_WRITE {
            self.flush()?;
            return self.write(bytes, off);
        }
        if self.wbuf.is_empty() {
            self.wbuf_off = off;
        }
        self.wbuf.extend_from_slice(bytes);
        if self.wbuf.len() >= WRITE_BUFFER {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes out what is gathered.
    pub(crate) fn flush(&mut self) -> Result<()> {
        if !self.wbuf.is_empty() {
            let buf = std::mem::take(&mut self.wbuf);
            let r = self.write(&buf, self.wbuf_off);
            self.wbuf = buf;
            self.wbuf.clear();
            r?;
        }
        Ok(())
    }

    /// Writes `bytes` at `off` on their own (not gathered), reserving ahead.
    pub(crate) fn write(&mut self, bytes: &[u8], off: u64) -> Result<()> {
        let end = off + bytes.len() as u64;
        self.reserve(end)?;
        if self.direct.is_some()
            && off % DIRECT_ALIGN as u64 == 0
            && bytes.len() % DIRECT_ALIGN == 0
            && !bytes.is_empty()
            && self.write_direct(bytes, off)?
        {
            return Ok(());
        }
        self.out
            .write_all_at(bytes, off)
            .ctx(|| format!("cannot write the output at offset {off:#x}"))?;
        self.written(end);
        Ok(())
    }

    /// Write-behind, after a buffered write that ended at `end`. A synced
    /// conversion through the page cache would otherwise leave all of its data
    /// to the final sync, which then waits for the whole output; here, once
    /// the writes have passed a range by a step ([`WRITE_BEHIND_STEP`]), its
    /// writeback is started ([`WriteAt::start_writeback`]), so the device
    /// writes while the conversion goes on; a step later the same call lets the
    /// page cache drop what has reached the device by then, so a big
    /// conversion leaves less of itself in the page cache (what is still being
    /// written back stays). The writer appends data in order,
    /// so the furthest write is the data's end; writes into earlier ranges
    /// (tables, COPIED fixes, the metadata at the end) are left to the sync.
    fn written(&mut self, end: u64) {
        if !self.write_behind || self.direct.is_some() {
            return;
        }
        if end < self.wb_started + 2 * WRITE_BEHIND_STEP {
            return;
        }
        let to = (end - WRITE_BEHIND_STEP) / WRITE_BEHIND_STEP * WRITE_BEHIND_STEP;
        // From the previous call's start: the new range's writeback starts and
        // the previous range's pages, written back by now, can go. A hint; its
        // failure changes nothing.
        let _ = self
            .out
            .start_writeback(self.wb_dropped, to - self.wb_dropped);
        self.write_behind_bytes += to - self.wb_started;
        self.wb_dropped = self.wb_started;
        self.wb_started = to;
    }

    /// Writes whole aligned blocks through the direct descriptor, from a
    /// page-aligned copy (the batch buffers are not aligned); `Ok(false)` where
    /// the file system refuses (direct I/O is then off for the rest).
    fn write_direct(&mut self, bytes: &[u8], off: u64) -> Result<bool> {
        use std::os::unix::fs::FileExt;
        let Some(d) = &self.direct else {
            return Ok(false);
        };
        self.stage.resize(bytes.len() + DIRECT_ALIGN, 0);
        // Safe: the window starts where the pointer is aligned.
        let pad = self.stage.as_ptr().align_offset(DIRECT_ALIGN);
        let buf = &mut self.stage[pad..pad + bytes.len()];
        buf.copy_from_slice(bytes);
        match FileExt::write_all_at(d, buf, off) {
            Ok(()) => {
                self.direct_bytes += bytes.len() as u64;
                Ok(true)
            }
            // Alignment or direct I/O not supported here after all.
            Err(e) if e.raw_os_error() == Some(rustix::io::Errno::INVAL.raw_os_error()) => {
                self.direct = None;
                Ok(false)
            }
            Err(e) => Err(Error::io(
                format!("cannot write the output at offset {off:#x} (direct I/O)"),
                e,
            )),
        }
    }

    /// Reserves the output ahead of `end` (see [`PREALLOCATE_STEP`]).
    fn reserve(&mut self, end: u64) -> Result<()> {
        // Keep the reservation ahead of the writes by as much as has been
        // written (4 MiB at first, at most PREALLOCATE_STEP), so that what
        // `preallocate` starts for a range is under way before the writes reach it.
        let ahead = end.clamp(4 << 20, PREALLOCATE_STEP);
        if end + ahead > self.reserved {
            let to = (end + 2 * ahead).next_multiple_of(1 << 20);
            let from = self.reserved;
            // Direct writes bypass the page cache: nothing to prepare there.
            if self.direct.is_some() {
                self.out.reserve(from, to - from)
            } else {
                self.out.preallocate(from, to - from)
            }
            .ctx(|| format!("cannot reserve space in the output at {from:#x}"))?;
            self.reserved = to;
        }
        Ok(())
    }

    /// Does a job's writes in order. Through the page cache, adjacent gathered
    /// writes go out as one vectored write straight from the job's memory
    /// ([`WriteAt::write_all_vectored_at`]) rather than copied together into the
    /// write buffer first (that copy was 6% of a mixed 2 GiB conversion's CPU);
    /// direct writes need an aligned copy anyway and keep the buffer.
    fn apply(&mut self, job: &Job) -> Result<()> {
        let data: &[u8] = job.batch.as_ref().map_or(&[], |b| &b.data);
        let vectored = self.direct.is_none();
        // The run of adjacent gathered writes not written yet: slices, offset, length.
        let mut run: Vec<&[u8]> = Vec::new();
        let (mut run_off, mut run_len) = (0u64, 0u64);
        for op in &job.ops {
            let bytes = match op.src {
                Src::Batch(a, b) => data.get(a..b),
                Src::Owned(a, b) => job.owned.get(a..b),
            };
            // Ranges the writer recorded in this job: always inside.
            let bytes = bytes.ok_or_else(|| {
                Error::InvalidArgument(format!("a write at {:#x} lost its bytes", op.off))
            })?;
            if vectored && op.gather {
                if !run.is_empty()
                    && (run_off + run_len != op.off || run_len >= WRITE_BUFFER as u64)
                {
                    self.write_slices(&run, run_off)?;
                    run.clear();
                }
                if run.is_empty() {
                    // What was gathered before (not in vectored mode) goes first.
                    self.flush()?;
                    (run_off, run_len) = (op.off, 0);
                }
                run.push(bytes);
                run_len += bytes.len() as u64;
                continue;
            }
            if !run.is_empty() {
                self.write_slices(&run, run_off)?;
                run.clear();
            }
            if op.gather {
                self.push(bytes, op.off)?;
            } else {
                self.write(bytes, op.off)?;
            }
        }
        if !run.is_empty() {
            self.write_slices(&run, run_off)?;
        }
        Ok(())
    }

    /// Writes `bufs` one after the other from `off`, reserving ahead.
    fn write_slices(&mut self, bufs: &[&[u8]], off: u64) -> Result<()> {
        if let [one] = bufs {
            return self.write(one, off);
        }
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.reserve(off + len)?;
        self.out
            .write_all_vectored_at(bufs, off)
            .ctx(|| format!("cannot write the output at offset {off:#x}"))?;
        self.written(off + len);
        Ok(())
    }
}

/// Where a recorded write's bytes are.
#[derive(Debug, Clone, Copy)]
enum Src {
    /// A range of the job's batch's `data`.
    Batch(usize, usize),
    /// A range of the job's `owned` bytes.
    Owned(usize, usize),
}

#[derive(Debug, Clone, Copy)]
struct Op {
    off: u64,
    /// [`Output::push`] (gathered) or [`Output::write`] (on its own).
    gather: bool,
    src: Src,
}

/// The writes the writer emitted for one batch, and the batch they point into.
#[derive(Default)]
pub(crate) struct Job {
    ops: Vec<Op>,
    owned: Vec<u8>,
    batch: Option<Batch>,
    /// Where the batch goes once written (the pipeline's pool).
    recycle: Option<Sender<Batch>>,
}

/// The I/O thread as the writer sees it.
pub(crate) struct IoThread<'a> {
    jobs: Sender<Job>,
    back: Receiver<(Output<'a>, Option<u64>)>,
    error: Arc<Mutex<Option<Error>>>,
    failed: Arc<AtomicBool>,
    /// The job being recorded.
    job: Job,
}

/// Where the writer's writes go.
pub(crate) enum Sink<'a> {
    /// Done at once on the writer's thread.
    Direct(Output<'a>),
    /// Recorded and done by the I/O thread.
    Thread(Box<IoThread<'a>>),
    /// The I/O thread ended without handing the output back (it panicked).
    Gone,
}

impl<'a> Sink<'a> {
    /// Writes `bytes` at `off`, gathered or on their own: at once, or recorded as
    /// owned bytes.
    pub(crate) fn bytes(&mut self, bytes: &[u8], off: u64, gather: bool) -> Result<()> {
        match self {
            Sink::Direct(o) if gather => o.push(bytes, off),
            Sink::Direct(o) => o.write(bytes, off),
            Sink::Thread(t) => {
                let a = t.job.owned.len();
                t.job.owned.extend_from_slice(bytes);
                t.job.ops.push(Op {
                    off,
                    gather,
                    src: Src::Owned(a, a + bytes.len()),
                });
                Ok(())
            }
            Sink::Gone => Err(gone()),
        }
    }

    /// Writes `batch[range]` at `off`, gathered. With an I/O thread and
    /// `owned_batch` (the batch travels with the job), only the range is
    /// recorded; otherwise the bytes are copied.
    pub(crate) fn batch_range(
        &mut self,
        batch: &[u8],
        range: std::ops::Range<usize>,
        off: u64,
        owned_batch: bool,
    ) -> Result<()> {
        match self {
            Sink::Thread(t) if owned_batch => {
                t.job.ops.push(Op {
                    off,
                    gather: true,
                    src: Src::Batch(range.start, range.end),
                });
                Ok(())
            }
            _ => self.bytes(&batch[range], off, true),
        }
    }

    /// Bytes written with direct I/O so far (known while writes are done at
    /// once, i.e. not while an I/O thread runs; 0 then).
    pub(crate) fn direct_bytes(&self) -> u64 {
        match self {
            Sink::Direct(o) => o.direct_bytes,
            _ => 0,
        }
    }

    /// Bytes whose writeback write-behind started (known as
    /// [`Sink::direct_bytes`]).
    pub(crate) fn write_behind_bytes(&self) -> u64 {
        match self {
            Sink::Direct(o) => o.write_behind_bytes,
            _ => 0,
        }
    }

    /// The output, when writes are done at once (`None` while an I/O thread
    /// runs).
    pub(crate) fn direct(&mut self) -> Option<&mut Output<'a>> {
        match self {
            Sink::Direct(o) => Some(o),
            _ => None,
        }
    }

    /// The I/O thread's first error, if it failed.
    pub(crate) fn io_error(&mut self) -> Option<Error> {
        match self {
            Sink::Thread(t) if t.failed.load(Ordering::Acquire) => Some(
                t.error
                    .lock()
                    .expect("not poisoned")
                    .take()
                    .unwrap_or_else(gone),
            ),
            _ => None,
        }
    }

    /// Sends the recorded job, with `batch`, to the I/O thread; without one,
    /// hands `batch` straight back through `recycle`.
    pub(crate) fn send_batch(&mut self, batch: Batch, recycle: &Sender<Batch>) -> Result<()> {
        if let Sink::Thread(t) = self {
            let mut job = std::mem::take(&mut t.job);
            job.batch = Some(batch);
            job.recycle = Some(recycle.clone());
            // Fails only when the I/O thread is gone (it panicked).
            t.jobs.send(job).map_err(|_| gone())
        } else {
            // The pipeline may have stopped taking buffers back: then it is
            // dropped.
            let _ = recycle.send(batch);
            Ok(())
        }
    }

    /// Starts the I/O thread in `scope`, taking the output over; does nothing if
    /// one runs already.
    /// `direct`: write whole aligned blocks through this descriptor of the
    /// output, opened for direct I/O ([`WriteAt::open_direct`]).
    pub(crate) fn start<'s>(
        &mut self,
        scope: &'s std::thread::Scope<'s, '_>,
        direct: Option<std::fs::File>,
    ) where
        'a: 's,
    {
        if !matches!(self, Sink::Direct(_)) {
            return;
        }
        let Sink::Direct(mut out) = std::mem::replace(self, Sink::Gone) else {
            unreachable!("matched above")
        };
        out.direct = direct;
        // The output reaches the thread through a channel, so that it can be
        // taken back if the thread cannot be spawned.
        let (out_tx, out_rx) = crossbeam_channel::bounded(1);
        out_tx.send(out).expect("room for one");
        let out_back = out_rx.clone();
        let (jobs_tx, jobs_rx) = crossbeam_channel::unbounded::<Job>();
        let (back_tx, back_rx) = crossbeam_channel::bounded(1);
        let error = Arc::new(Mutex::new(None));
        let failed = Arc::new(AtomicBool::new(false));
        let (err, fail) = (Arc::clone(&error), Arc::clone(&failed));
        let spawned = std::thread::Builder::new()
            .name("qdedup-io".into())
            .spawn_scoped(scope, move || {
                let Ok(mut out) = out_rx.recv() else {
                    return;
                };
                // The number of jobs is bounded by the pipeline's buffers (each
                // carries one), so the channel needs no bound of its own.
                for job in jobs_rx {
                    if !fail.load(Ordering::Acquire) {
                        if let Err(e) = out.apply(&job) {
                            *err.lock().expect("not poisoned") = Some(e);
                            fail.store(true, Ordering::Release);
                        }
                    }
                    if let (Some(b), Some(r)) = (job.batch, job.recycle) {
                        let _ = r.send(b);
                    }
                }
                // Back on the writer's thread (the metadata), writes are buffered.
                out.direct = None;
                let _ = back_tx.send((out, crate::io::thread_cpu_ns()));
            });
        *self = match spawned {
            Ok(_) => Sink::Thread(Box::new(IoThread {
                jobs: jobs_tx,
                back: back_rx,
                error,
                failed,
                job: Job::default(),
            })),
            // No thread: the writes stay on the writer's thread.
            Err(_) => match out_back.try_recv() {
                Ok(out) => Sink::Direct(out),
                Err(_) => Sink::Gone,
            },
        };
    }

    /// Waits for the I/O thread to finish its jobs and takes the output back
    /// (writes are done at once again); returns the thread's CPU time, and its
    /// error if it failed. Without an I/O thread, does nothing.
    pub(crate) fn stop(&mut self) -> Result<Option<u64>> {
        match self {
            Sink::Thread(_) => {}
            Sink::Gone => return Err(gone()),
            Sink::Direct(_) => return Ok(None),
        }
        let Sink::Thread(t) = std::mem::replace(self, Sink::Gone) else {
            unreachable!("matched above")
        };
        let IoThread {
            jobs,
            back,
            error,
            failed,
            job,
        } = *t;
        // Writes recorded after the last batch (the pipeline leaves none) are
        // owned ones: done before the thread ends.
        if !job.ops.is_empty() {
            let _ = jobs.send(job);
        }
        drop(jobs);
        let (out, cpu) = back.recv().map_err(|_| gone())?;
        if failed.load(Ordering::Acquire) {
            let e = error.lock().expect("not poisoned").take();
            return Err(e.unwrap_or_else(gone));
        }
        // What the thread gathered last is written by the next flush.
        *self = Sink::Direct(out);
        Ok(cpu)
    }
}

fn gone() -> Error {
    Error::io(
        "the output's I/O thread stopped",
        std::io::Error::other("I/O thread ended early"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemFile;
    use std::io;

    /// A file that logs the ranges it is asked to write back, with how far it
    /// had been written when asked.
    #[derive(Default)]
    struct Logged {
        file: MemFile,
        written_to: Mutex<u64>,
        calls: Mutex<Vec<(u64, u64, u64)>>,
    }

    impl WriteAt for Logged {
        fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            let mut w = self.written_to.lock().unwrap();
            *w = (*w).max(offset + buf.len() as u64);
            self.file.write_all_at(buf, offset)
        }
        fn sync(&self) -> io::Result<()> {
            Ok(())
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.file.set_len(len)
        }
        fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
            let w = *self.written_to.lock().unwrap();
            self.calls.lock().unwrap().push((offset, len, w));
            Ok(())
        }
    }

    /// Writes 100 MiB in order in pieces of odd sizes, plain, gathered and
    /// vectored, with a small write back into the first MiB now and then (as
    /// the writer's table and COPIED fixes); returns the calls.
    fn run(write_behind: bool) -> (Vec<(u64, u64, u64)>, u64, Vec<u8>) {
        let file = Logged::default();
        let mut o = Output::new(&file);
        o.write_behind = write_behind;
        let piece: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
        let total = 100u64 << 20;
        let (mut off, mut n) = (0u64, 0usize);
        while off < total {
            let len = (piece.len() - n * 4099 % 300_000).min((total - off) as usize);
            let bytes = &piece[..len];
            match n % 3 {
                0 => o.write(bytes, off).unwrap(),
                1 => o.push(bytes, off).unwrap(),
                _ => {
                    let (head, tail) = bytes.split_at(len / 2);
                    o.write_slices(&[head, tail], off).unwrap();
                }
            }
            if n % 7 == 0 {
                o.write(&[0xab; 512], 4096).unwrap();
            }
            off += len as u64;
            n += 1;
        }
        o.flush().unwrap();
        let calls = file.calls.lock().unwrap().clone();
        (calls, o.write_behind_bytes, file.file.contents())
    }

    #[test]
    fn write_behind_starts_each_range_once_behind_the_writes_then_lets_it_go() {
        let (calls, bytes, contents) = run(true);
        let (none, none_bytes, plain) = run(false);
        assert!(none.is_empty() && none_bytes == 0, "{none:?}");
        // The hint changes no byte.
        assert!(contents == plain);
        let step = WRITE_BEHIND_STEP;
        // 100 MiB in 8 MiB steps, the last two steps left to the sync.
        assert!(calls.len() >= 10, "{} calls", calls.len());
        let (mut started, mut dropped) = (0u64, 0u64);
        for &(off, len, written) in &calls {
            // Each call covers the previous call's range (to let it go) and a
            // new one (to start it), ending on a step, a step or more behind
            // the furthest write.
            assert_eq!(off, dropped, "{calls:?}");
            let end = off + len;
            assert!(end > started && end % step == 0, "{calls:?}");
            assert!(end + step <= written, "{end} vs {written}");
            (dropped, started) = (started, end);
        }
        assert_eq!(bytes, started);
        assert!(started + 3 * step >= 100 << 20, "{started}");
    }
}
