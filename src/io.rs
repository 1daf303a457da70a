//! A small positional I/O seam, so that tests and fuzzers can run the library on
//! in-memory images and inject failures.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

/// Positional reads.
pub trait ReadAt: Send + Sync {
    /// Reads up to `buf.len()` bytes at `offset`; returns 0 at end of file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;

    /// Current length of the underlying file or buffer.
    fn len(&self) -> io::Result<u64>;

    /// Whether the file is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Whether any of the `len` bytes at `offset` may hold data in the file
    /// system (not a hole). The default, and a file system that cannot tell,
    /// say yes.
    fn data_in(&self, offset: u64, len: u64) -> io::Result<bool> {
        let _ = (offset, len);
        Ok(true)
    }

    /// Fills `buf` from `offset`; bytes past the end of the file read as zeros and
    /// the number of bytes that really came from the file is returned.
    fn read_at_zero_fill(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let n = match self.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            done += n;
        }
        buf[done..].fill(0);
        Ok(done)
    }

    /// Fills `buf` from `offset` of a file that was `known_len` bytes long when
    /// opened: bytes past `known_len` read as zeros, but a file that now ends
    /// before `known_len` (it shrank while we read it) is an `UnexpectedEof` error
    /// naming `what`.
    fn read_known_len(
        &self,
        buf: &mut [u8],
        offset: u64,
        known_len: u64,
        what: &str,
    ) -> io::Result<()> {
        let n = self.read_at_zero_fill(buf, offset)?;
        let expect = known_len.saturating_sub(offset).min(buf.len() as u64);
        if (n as u64) < expect {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{what} ended early at offset {:#x} (was it truncated while converting?)",
                    offset + n as u64
                ),
            ));
        }
        Ok(())
    }

    /// Fills `buf` from `offset`; a short file is an `UnexpectedEof` error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let n = self.read_at_zero_fill(buf, offset)?;
        if n < buf.len() {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{} bytes at {offset:#x} extend past the end of the file",
                    buf.len()
                ),
            ));
        }
        Ok(())
    }
}

/// Positional writes.
pub trait WriteAt: Send + Sync {
    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Writes the slices `bufs` one after the other from `offset`: a gathered
    /// write without copying them together. The default writes them one by one.
    fn write_all_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        let mut off = offset;
        for b in bufs {
            self.write_all_at(b, off)?;
            off += b.len() as u64;
        }
        Ok(())
    }
    /// Flushes data and metadata to stable storage.
    fn sync(&self) -> io::Result<()>;
    /// Sets the length of the file.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Reserves space for the `len` bytes at `offset` that are about to be written
    /// (a hint: the default, and a file system that cannot, do nothing). It may
    /// extend the file's length; the writer's final [`WriteAt::set_len`] sets the
    /// real one and gives back what was reserved past it.
    fn preallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Gives back the space of the `len` bytes at `offset`, which now read as
    /// zeros, without changing the file's length (`fallocate(PUNCH_HOLE)`). A
    /// hint as well: the default, and a file system that cannot, keep the bytes
    /// (the caller no longer uses them, so either is correct).
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// [`WriteAt::preallocate`] without preparing the page cache: for a range
    /// that is then written with [`WriteAt::open_direct`]'s descriptor, which
    /// bypasses it. The default is `preallocate`.
    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        self.preallocate(offset, len)
    }

    /// Starts writing the `len` bytes at `offset`, already written, to the
    /// device without waiting for it, and lets the page cache drop the pages of
    /// the range that are already on the device. A hint for a writer that will
    /// sync the file at the end anyway: the device works while the writer goes
    /// on, and the final sync finds little left to do. The default does
    /// nothing.
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }

    /// A second descriptor of this file opened for direct I/O (`O_DIRECT`:
    /// writes go to the device from the caller's memory, bypassing the page
    /// cache; offsets, lengths and memory must be 4 KiB-aligned), or `None` (the
    /// default, and where the file or the file system does not allow it).
    fn open_direct(&self) -> Option<File> {
        None
    }

    /// Reads back `buf.len()` bytes written at `offset` (the writer's
    /// `--verify`; a `File` must be open for reading too). The default
    /// cannot: it fails with [`io::ErrorKind::Unsupported`].
    fn read_back(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let _ = (buf, offset);
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this output cannot be read back",
        ))
    }
}

impl ReadAt for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        FileExt::read_at(self, buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        file_length(self)
    }
    fn data_in(&self, offset: u64, len: u64) -> io::Result<bool> {
        use rustix::io::Errno;
        // The position it moves is irrelevant: every read and write here is
        // positional.
        match rustix::fs::seek(self, rustix::fs::SeekFrom::Data(offset)) {
            Ok(at) => Ok(at < offset.saturating_add(len)),
            // Only a hole from `offset` to the end.
            Err(e) if e == Errno::NXIO => Ok(false),
            // No SEEK_DATA here: it may hold data.
            Err(e) if e == Errno::INVAL || e == Errno::OPNOTSUPP => Ok(true),
            Err(e) => Err(e.into()),
        }
    }
}

/// The length of a file in bytes; for a block device (whose `st_size` is 0) the
/// size of the device, found by seeking to its end (the position is irrelevant:
/// every read and write here is positional).
pub fn file_length(file: &File) -> io::Result<u64> {
    use std::os::unix::fs::FileTypeExt;
    let meta = file.metadata()?;
    if meta.file_type().is_block_device() {
        Ok(rustix::fs::seek(file, rustix::fs::SeekFrom::End(0))?)
    } else {
        Ok(meta.len())
    }
}

impl WriteAt for File {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }
    fn write_all_vectored_at(&self, bufs: &[&[u8]], offset: u64) -> io::Result<()> {
        use rustix::io::Errno;
        use std::io::IoSlice;
        /// Linux's IOV_MAX.
        const MAX_IOV: usize = 1024;
        let mut bufs: Vec<&[u8]> = bufs.iter().copied().filter(|b| !b.is_empty()).collect();
        let (mut i, mut off) = (0, offset);
        while i < bufs.len() {
            let iov: Vec<IoSlice<'_>> = bufs[i..]
                .iter()
                .take(MAX_IOV)
                .map(|b| IoSlice::new(b))
                .collect();
            let mut n = match rustix::io::pwritev(self, &iov, off) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(Errno::INTR) => continue,
                Err(e) => return Err(e.into()),
            };
            off += n as u64;
            // Past what was written (a short write ends inside a slice).
            while n > 0 {
                let l = bufs[i].len();
                if n >= l {
                    n -= l;
                    i += 1;
                } else {
                    bufs[i] = &bufs[i][n..];
                    n = 0;
                }
            }
        }
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        self.sync_all()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
    fn read_back(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
    fn preallocate(&self, offset: u64, len: u64) -> io::Result<()> {
        // Unwritten extents reserved in one call: writing into them skips the
        // file system's per-block delayed-allocation work. Best effort: no
        // support, no space or a file-size limit just means no reservation.
        if rustix::fs::fallocate(self, rustix::fs::FallocateFlags::empty(), offset, len).is_ok() {
            prefault_page_cache(self, offset, len);
        }
        Ok(())
    }
    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        // Best effort, as `preallocate`.
        let _ = rustix::fs::fallocate(self, rustix::fs::FallocateFlags::empty(), offset, len);
        Ok(())
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn open_direct(&self) -> Option<File> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::OpenOptionsExt;
        // Regular files only; a new open file description (O_DIRECT set on a
        // duplicate would change this descriptor too).
        if !self.metadata().ok()?.is_file() {
            return None;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(i32::try_from(rustix::fs::OFlags::DIRECT.bits()).ok()?)
            .open(format!("/proc/self/fd/{}", self.as_raw_fd()))
            .ok()
    }
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        // Linux's POSIX_FADV_DONTNEED starts writeback of the range's dirty
        // pages (without waiting: WB_SYNC_NONE) and drops its clean ones;
        // pages still being written stay. Best effort, as a hint.
        let _ = rustix::fs::fadvise(
            self,
            offset,
            std::num::NonZeroU64::new(len),
            rustix::fs::Advice::DontNeed,
        );
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::FallocateFlags as F;
        match rustix::fs::fallocate(self, F::PUNCH_HOLE | F::KEEP_SIZE, offset, len) {
            // No hole punching here (tmpfs before 3.5, some network file systems):
            // the bytes stay, which is correct, only the space is not given back.
            Err(e) if e == rustix::io::Errno::OPNOTSUPP || e == rustix::io::Errno::NOSYS => Ok(()),
            r => r.map_err(io::Error::from),
        }
    }
}

/// CPU time (nanoseconds) of every page-cache prefetcher that has ended in this
/// process (the helper threads of [`WriteAt::preallocate`] for a `File`); the
/// difference over a conversion is its prefetchers' share ([`thread_cpu_ns`]).
pub static PREFAULT_CPU_NS: AtomicU64 = AtomicU64::new(0);

/// CPU time (user + system, nanoseconds) the calling thread has used so far
/// (`CLOCK_THREAD_CPUTIME_ID`); `None` where the platform has no such clock.
pub fn thread_cpu_ns() -> Option<u64> {
    #[cfg(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_vendor = "apple"
    ))]
    {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
        let ns = u64::try_from(t.tv_sec).ok()? * 1_000_000_000;
        Some(ns + u64::try_from(t.tv_nsec).ok()?)
    }
    #[cfg(not(any(
        target_os = "linux",
        target_os = "android",
        target_os = "freebsd",
        target_vendor = "apple"
    )))]
    {
        None
    }
}

/// Page-cache prefetchers running (see [`prefault_page_cache`]).
static PREFAULTERS: AtomicUsize = AtomicUsize::new(0);

/// Reads the freshly reserved range `offset..offset + len` of `file` (zeros: the
/// extents are unwritten, so no disk I/O) on a background thread, so that the
/// kernel allocates and clears its page-cache pages there, ahead of the writer.
///
/// Why: on a VM whose free memory goes back to the host (virtio-balloon free
/// page reporting), the first touch of each fresh page-cache page costs a host
/// fault, and a buffered write pays them one by one under the file's lock; a
/// second thread takes that cost off the writer (measured: the 2 GiB mixed
/// input converts about 1.5× faster, docs/benchmarks.md). Elsewhere it costs a
/// clear and a copy of the range on an otherwise idle core. At most two run at
/// once; a range no thread is free for is simply not prefetched. Pages the writer
/// reaches first are left alone (a read never changes the file).
///
/// Off unless the environment variable `QDEDUP_PREFAULT` is `1`: on the 2-core
/// VM of later measurements (the same balloon, another host) it made unsynced
/// 2 GiB conversions 20–45% slower (its clearing and copying compete for the
/// cores with the workers), and on 16 cores 10–20% slower at `-m 8` with about
/// 0.7 s more system time (docs/benchmarks.md, change 7 and "Prefault off").
fn prefault_page_cache(file: &File, offset: u64, len: u64) {
    const MAX: usize = 2;
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*ON.get_or_init(|| std::env::var_os("QDEDUP_PREFAULT").is_some_and(|v| v == "1")) {
        return;
    }
    if PREFAULTERS.fetch_add(1, Ordering::AcqRel) >= MAX {
        PREFAULTERS.fetch_sub(1, Ordering::AcqRel);
        return;
    }
    let Ok(f) = file.try_clone() else {
        PREFAULTERS.fetch_sub(1, Ordering::AcqRel);
        return;
    };
    let spawned = std::thread::Builder::new()
        .name("qdedup-prefault".into())
        .spawn(move || {
            let mut buf = vec![0u8; 1 << 20];
            let end = offset.saturating_add(len);
            let mut at = offset;
            while at < end {
                match FileExt::read_at(&f, &mut buf, at) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => at += n as u64,
                }
            }
            if let Some(ns) = thread_cpu_ns() {
                PREFAULT_CPU_NS.fetch_add(ns, Ordering::Relaxed);
            }
            PREFAULTERS.fetch_sub(1, Ordering::AcqRel);
        });
    if spawned.is_err() {
        PREFAULTERS.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An in-memory file, for tests and fuzzing.
#[derive(Debug, Default)]
pub struct MemFile {
    data: Mutex<Vec<u8>>,
    /// Fail every write after this many successful ones (crash simulation).
    pub fail_after_writes: Option<usize>,
    writes: Mutex<usize>,
}

impl MemFile {
    /// A file holding `data`.
    pub fn new(data: Vec<u8>) -> Self {
        MemFile {
            data: Mutex::new(data),
            ..Default::default()
        }
    }

    /// A copy of the contents.
    pub fn contents(&self) -> Vec<u8> {
        self.data.lock().expect("not poisoned").clone()
    }
}

impl ReadAt for MemFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let d = self.data.lock().expect("not poisoned");
        let Ok(start) = usize::try_from(offset) else {
            return Ok(0);
        };
        if start >= d.len() {
            return Ok(0);
        }
        let n = buf.len().min(d.len() - start);
        buf[..n].copy_from_slice(&d[start..start + n]);
        Ok(n)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.data.lock().expect("not poisoned").len() as u64)
    }
}

impl WriteAt for MemFile {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut w = self.writes.lock().expect("not poisoned");
        if let Some(limit) = self.fail_after_writes {
            if *w >= limit {
                return Err(io::Error::other("injected write failure"));
            }
        }
        *w += 1;
        let mut d = self.data.lock().expect("not poisoned");
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let end = start + buf.len();
        if d.len() < end {
            d.resize(end, 0);
        }
        d[start..end].copy_from_slice(buf);
        Ok(())
    }
    fn sync(&self) -> io::Result<()> {
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(io::Error::other)?;
        self.data.lock().expect("not poisoned").resize(len, 0);
        Ok(())
    }
    fn punch_hole(&self, offset: u64, len: u64) -> io::Result<()> {
        let mut d = self.data.lock().expect("not poisoned");
        let start = usize::try_from(offset)
            .map_err(io::Error::other)?
            .min(d.len());
        let end = usize::try_from(offset.saturating_add(len))
            .map_err(io::Error::other)?
            .min(d.len());
        d[start..end].fill(0);
        Ok(())
    }

    fn read_back(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectored_writes_land_like_one_write_each() {
        // More slices than one pwritev takes (IOV_MAX 1024), empty ones among
        // them, at an offset past the end: the file holds them back to back.
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("v"))
            .unwrap();
        let pieces: Vec<Vec<u8>> = (0..2500u32)
            .map(|i| vec![(i % 251) as u8; (i % 7) as usize * 300])
            .collect();
        let slices: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
        let want: Vec<u8> = pieces.concat();
        assert!(slices.iter().filter(|s| s.is_empty()).count() > 300);
        WriteAt::write_all_vectored_at(&f, &slices, 4096).unwrap();
        let mut got = vec![0u8; 4096 + want.len()];
        FileExt::read_exact_at(&f, &mut got, 0).unwrap();
        assert!(got[..4096].iter().all(|&b| b == 0));
        assert_eq!(&got[4096..], &want[..]);
        assert_eq!(ReadAt::len(&f).unwrap(), 4096 + want.len() as u64);
        // The default (one write per slice) gives the same bytes.
        let m = MemFile::default();
        WriteAt::write_all_vectored_at(&m, &slices, 4096).unwrap();
        let mut mem = vec![0u8; got.len()];
        ReadAt::read_at(&m, &mut mem, 0).unwrap();
        assert_eq!(mem, got);
    }
}
