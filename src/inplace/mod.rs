//! `qdedup dedup`: deduplicates an existing qcow2 image in place, crash-safe.
//!
//! Data clusters of the active layer holding the same bytes are made to share
//! one host cluster: the L2 entries of the others are pointed at it, its
//! refcount rises, and the others are freed (their space punched out of the
//! file). The image keeps working in QEMU and reads the same; with
//! [`DedupOptions::compact`] clusters at the end of the file are then moved into
//! the freed space and the file is cut, so its size shrinks too.
//!
//! ```no_run
//! use qdedup::inplace::{dedup, DedupOptions};
//! let report = dedup("disk.qcow2".as_ref(), &DedupOptions::default())?;
//! println!("{report}");
//! # Ok::<(), qdedup::Error>(())
//! ```
//!
//! The steps:
//!
//! 1. open the image with QEMU's write lock ([`crate::image::lock`]; an image in
//!    use is refused and left untouched) and refuse what cannot be changed safely:
//!    encrypted images, an external data file, the corrupt bit, a dirty image
//!    (lazy refcounts not written back), an image `check` finds corruptions in;
//! 2. repair leaks and COPIED flags a crash left (`check --repair all`), so that
//!    the refcounts are exact;
//! 3. scan the active tree (`scan.rs`): entries of L2 tables shared with a
//!    snapshot, compressed entries and partly allocated extended entries are left
//!    as they are;
//! 4. hash every candidate cluster, compare candidates byte for byte and plan the
//!    remaps within the refcount maximum (`plan.rs`);
//! 5. apply them in flush groups, in the order `apply.rs` describes, then move a
//!    few clusters so that runs of freed clusters join (`plan::bridges`; the
//!    survivors are chosen for long runs too);
//! 6. with `compact`, move clusters from the end into free ones;
//! 7. set COPIED again where a refcount is 1 (`check --repair all`), so that the
//!    image is strict: COPIED iff refcount 1, and `qemu-img check` clean;
//! 8. give the space back, after the last sync: cut the file (`compact`) and
//!    punch the runs of free clusters that still hold data, this run's and any
//!    an interrupted run left (`punch.rs`, which says why last).
//!
//! docs/inplace.md gives the crash-safety argument.

mod apply;
use apply::Movable;
mod plan;
mod punch;
mod report;
mod scan;

use std::fs::OpenOptions;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub use report::DedupReport;

use crate::check::{check_image, repair_image, CheckOptions, RepairMode};
use crate::error::{Error, IoContext, Result};
use crate::format::header::{QCOW2_INCOMPAT_DATA_FILE, QCOW2_INCOMPAT_DIRTY};
use crate::image::lock::{lock, LockMode};
use crate::image::refcounts::Refcounts;
use crate::image::{Image, OpenMode};
use crate::io::{ReadAt, WriteAt};

/// Plain dedup moves at most this share (in percent) of the image's clusters
/// to join runs of freed clusters ([`plan::bridges`]).
const JOIN_MOVES_PERCENT: u64 = 4;

/// How to deduplicate.
#[derive(Debug, Clone)]
pub struct DedupOptions {
    /// Find and report what would be saved; write nothing.
    pub dry_run: bool,
    /// Move clusters from the end of the file into freed ones and cut the file.
    pub compact: bool,
    /// Remaps (or moves) per flush group: each group costs four syncs.
    pub flush_group: usize,
    /// Sync after each step of a group (the crash-safety order needs it against
    /// power loss; off only for measurements).
    pub sync: bool,
    /// Set (by a signal handler) to stop at the next flush group: the groups done
    /// stay done, the image is sound, and [`Error::Interrupted`] is returned.
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for DedupOptions {
    fn default() -> Self {
        DedupOptions {
            dry_run: false,
            compact: false,
            flush_group: 4096,
            sync: true,
            cancel: None,
        }
    }
}

/// Deduplicates the image at `path` in place (see the module doc). The image gets
/// QEMU's write lock first (a read lock for a dry run): an image another process
/// has open is refused before anything is read or written.
pub fn dedup(path: &Path, opts: &DedupOptions) -> Result<DedupReport> {
    let name = path.display().to_string();
    let file = OpenOptions::new()
        .read(true)
        .write(!opts.dry_run)
        .open(path)
        .ctx(|| format!("opening {name}"))?;
    let mode = if opts.dry_run {
        LockMode::Read
    } else {
        LockMode::Write
    };
    lock(&file, path, mode)?;
    dedup_image(&file, &name, opts)
}

/// Counts the bytes read and written through it.
struct Counting<'a, F: ?Sized> {
    inner: &'a F,
    read: AtomicU64,
    written: AtomicU64,
}

impl<F: ReadAt + ?Sized> ReadAt for Counting<'_, F> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        let n = self.inner.read_at(buf, offset)?;
        self.read.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn data_in(&self, offset: u64, len: u64) -> std::io::Result<bool> {
        self.inner.data_in(offset, len)
    }
}

impl<F: WriteAt + ?Sized> WriteAt for Counting<'_, F> {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.inner.write_all_at(buf, offset)?;
        self.written.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }
    fn sync(&self) -> std::io::Result<()> {
        self.inner.sync()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.inner.set_len(len)
    }
    fn punch_hole(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.inner.punch_hole(offset, len)
    }
}

/// [`Error::Interrupted`] once `opts.cancel` is set.
fn cancelled(opts: &DedupOptions) -> Result<()> {
    match &opts.cancel {
        Some(c) if c.load(Ordering::Relaxed) => Err(Error::Interrupted),
        _ => Ok(()),
    }
}

/// Refuses what `dedup` cannot change safely, saying why.
fn refuse(im: &Image) -> Result<()> {
    im.refuse_caveats()?;
    if im.header.incompatible_features & QCOW2_INCOMPAT_DATA_FILE != 0 {
        return Err(Error::Unsupported(
            "the image keeps its data in an external data file (incompatible bit data_file):              dedup changes only images whose data clusters are in the image file"
                .into(),
        ));
    }
    if im.header.incompatible_features & QCOW2_INCOMPAT_DIRTY != 0 {
        return Err(Error::Unsupported(
            "the image is dirty (lazy refcounts were not written back, incompatible bit 0): \
             its refcounts cannot be trusted; run `qemu-img check -r all` first"
                .into(),
        ));
    }
    Ok(())
}

fn check_opts(repair: Option<RepairMode>) -> CheckOptions {
    CheckOptions {
        repair,
        // Compressed clusters are left alone: their streams need no decoding.
        verify_compressed: false,
        max_findings: 10,
        ..CheckOptions::default()
    }
}

/// [`dedup`] through a reader and writer that the caller opened and locked (a
/// dry run only reads).
pub fn dedup_image<F: ReadAt + WriteAt + ?Sized>(
    file: &F,
    name: &str,
    opts: &DedupOptions,
) -> Result<DedupReport> {
    let start = Instant::now();
    let io = Counting {
        inner: file,
        read: AtomicU64::new(0),
        written: AtomicU64::new(0),
    };
    let im = Image::open(&io, OpenMode::Read)?;
    refuse(&im)?;
    let mut report = DedupReport::new(name, &im, opts);
    let first = check_image(&io, name, &check_opts(None))?;
    if first.check_errors > 0 || first.corruptions > 0 {
        let what = first
            .findings
            .first()
            .map(|f| {
                format!(
                    " (first: {} at {:#x}: {})",
                    f.structure, f.offset, f.message
                )
            })
            .unwrap_or_default();
        return Err(Error::Unsupported(format!(
            "`check` finds {} corruptions and {} check errors in the image{what}; dedup changes \
             only sound images: run `qdedup check` or `qemu-img check -r all` first",
            first.corruptions, first.check_errors
        )));
    }
    if !opts.dry_run && (first.leaks > 0 || first.relaxed_copied > 0) {
        // What an interrupted run leaves: the refcounts must be exact before the
        // plan relies on them.
        let r = repair_image(&io, name, &check_opts(Some(RepairMode::All)))?;
        if let Some(why) = r.repair_refused {
            return Err(Error::Unsupported(format!(
                "cannot repair the image first: {why}"
            )));
        }
        report.leaks_repaired = r.leaks_fixed;
    }
    let mut refcounts = Refcounts::load(&io, &im.header)?;
    let cb = im.cluster_bits;
    let scan = scan::scan(&io, &im, &mut refcounts)?;
    cancelled(opts)?;
    // With --compact most freed clusters are filled again: the lowest offsets
    // survive (less to move). Without, every run of freed clusters costs a punch.
    let survivors = if opts.compact {
        plan::Survivors::LowestOffset
    } else {
        plan::Survivors::LongRuns
    };
    let plan = plan::plan(&io, &scan, cb, refcounts.max(), survivors)?;
    cancelled(opts)?;
    report.note_scan(&scan, &plan);
    let freed: std::collections::HashSet<usize> = plan.remaps.iter().map(|r| r.from).collect();
    // Plain dedup: clusters moved to join runs of freed clusters (fewer punches),
    // within a share of the image (at least one move: small images too).
    let joins = if opts.compact {
        Vec::new()
    } else {
        let clusters = im.file_len >> cb;
        let budget = clusters.saturating_mul(JOIN_MOVES_PERCENT).div_ceil(100);
        plan::bridges(
            &scan,
            &plan.remaps,
            usize::try_from(budget).unwrap_or(usize::MAX),
        )
    };
    report.clusters_moved_to_join_holes = joins.len() as u64;
    // Where `--compact` cuts the file, once the image is final.
    let mut cut = None;
    if opts.dry_run {
        report.entries_remapped = plan.remaps.iter().map(|r| scan.hosts[r.from].n).sum();
    } else {
        let mut ap = apply::Apply::new(&io, &mut refcounts, cb, opts.sync);
        // In file order: each group frees clusters of one stretch of the file.
        let mut remaps = plan.remaps.clone();
        remaps.sort_unstable_by_key(|r| r.from);
        // Stopped (an error, a signal): the groups done stay done, and what they
        // freed stays unpunched, so that the run stops at once; the next run
        // punches it (the free clusters that still hold data, step 8).
        for group in remaps.chunks(opts.flush_group.max(1)) {
            cancelled(opts)?;
            report.entries_remapped += ap.remap_group(&scan, group)?;
        }
        // 5. The bridges move into the islands (as compaction moves data): the
        // runs of freed clusters on both sides of each bridge become one.
        for group in joins.chunks(opts.flush_group.max(1)) {
            cancelled(opts)?;
            ap.move_group(&scan, group)?;
        }
    }
    if opts.compact {
        let end = im.file_len.div_ceil(im.cluster_size);
        if opts.dry_run {
            let mut used = apply::used(&io, &refcounts, cb, end)?;
            for &h in &freed {
                if let Some(u) = usize::try_from(scan.hosts[h].cluster)
                    .ok()
                    .and_then(|c| used.get_mut(c))
                {
                    *u = false;
                }
            }
            let movable = apply::movable(&scan, &refcounts, cb, &freed);
            let (moves, top) = apply::plan_moves(&mut used, &movable);
            report.clusters_moved = moves.len() as u64;
            report.file_size_after = im.file_len.min(top << cb);
        } else {
            cut = compact(&io, &im, opts, &mut report)?;
        }
    }
    if !opts.dry_run {
        // Strict again: COPIED where the refcount is 1, no leaks. The repair
        // only lowers refcounts and sets flags: the free clusters stay free.
        let fin = repair_image(&io, name, &check_opts(Some(RepairMode::All)))?;
        report.copied_flags_set = fin.relaxed_copied_fixed;
        report.clean_after = fin.is_clean() && fin.relaxed_copied == 0;
        // The space goes back last, after the last sync: a file system that
        // trims as it frees does so in the background where it can
        // (`punch.rs`). Neither the cut nor the holes need to be durable: a
        // crash before they are leaves free clusters in the file.
        if let Some(cut) = cut {
            io.set_len(cut)
                .ctx(|| format!("cutting the image to {cut} bytes"))?;
        }
        if report.clean_after {
            // The refcounts are exact now: every free cluster that still holds
            // data goes, those this run freed and those an earlier run that was
            // stopped before its punches (or QEMU) left. (Not where the check
            // finds anything wrong: then nothing is punched.)
            let after = Image::open(&io, OpenMode::Read)?;
            let refcounts = Refcounts::load(&io, &after.header)?;
            let end = after.file_len.div_ceil(after.cluster_size);
            let runs = punch::free_runs_with_data(&io, &refcounts, cb, end)?;
            report.hole_punches = punch::punch_runs(&io, cb, &runs, punch::PUNCH_THREADS)?;
        }
        report.file_size_after = io.len().ctx(|| "reading the image size".into())?;
    }
    report.bytes_read = io.read.load(Ordering::Relaxed);
    report.bytes_written = io.written.load(Ordering::Relaxed);
    report.seconds = start.elapsed().as_secs_f64();
    Ok(report)
}

/// `--compact` after the remaps: scan again and move; returns where to cut the
/// file (if it gets shorter).
fn compact<F: ReadAt + WriteAt + ?Sized>(
    io: &F,
    im: &Image,
    opts: &DedupOptions,
    report: &mut DedupReport,
) -> Result<Option<u64>> {
    let cb = im.cluster_bits;
    let mut refcounts = Refcounts::load(io, &im.header)?;
    let scan = scan::scan(io, im, &mut refcounts)?;
    let len = io.len().ctx(|| "reading the image size".into())?;
    let end = len.div_ceil(im.cluster_size);
    let mut used = apply::used(io, &refcounts, cb, end)?;
    let movable = apply::movable(&scan, &refcounts, cb, &std::collections::HashSet::new());
    let (moves, _) = apply::plan_moves(&mut used, &movable);
    let mut ap = apply::Apply::new(io, &mut refcounts, cb, opts.sync);
    // Data first (its entries are where the scan found them), then the L2
    // tables (copied as the data moves left them), then refcount blocks.
    let pick = |f: fn(Movable) -> Option<usize>| -> Vec<(usize, u64)> {
        moves
            .iter()
            .filter_map(|&(m, d)| f(m).map(|i| (i, d)))
            .collect()
    };
    let data = pick(|m| {
        if let Movable::Data(i) = m {
            Some(i)
        } else {
            None
        }
    });
    let tables = pick(|m| {
        if let Movable::L2(i) = m {
            Some(i)
        } else {
            None
        }
    });
    for group in data.chunks(opts.flush_group.max(1)) {
        cancelled(opts)?;
        ap.move_group(&scan, group)?;
    }
    for group in tables.chunks(opts.flush_group.max(1)) {
        cancelled(opts)?;
        ap.move_l2_group(&scan, group)?;
    }
    for &(m, dst) in &moves {
        if let Movable::RefBlock(b) = m {
            cancelled(opts)?;
            ap.move_refblock(b, dst)?;
        }
    }
    report.clusters_moved = moves.len() as u64;
    // Cut after the last cluster in use, as the refcounts now say.
    let used = ap.used(end)?;
    let top = used.iter().rposition(|u| *u).map_or(1, |i| i as u64 + 1);
    let cut = top << cb;
    Ok((cut < len).then_some(cut))
}
