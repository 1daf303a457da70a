//! `qdedup check`: verifies a qcow2 image (version 2 or 3, any cluster size and
//! refcount width, snapshots, compressed clusters, extended L2 entries, bitmaps)
//! the way `qemu-img check` does, with qdedup's relaxed COPIED rule and a few
//! stricter checks, and optionally repairs leaks and COPIED flags in place.
//!
//! ```no_run
//! use qdedup::check::{check, CheckOptions};
//! let report = check("disk.qcow2".as_ref(), &CheckOptions::default())?;
//! print!("{}", report.human());
//! std::process::exit(report.exit_code());
//! # Ok::<(), qdedup::Error>(())
//! ```
//!
//! What is counted follows QEMU's `qcow2_check_refcounts` (every reference path
//! counts: an L2 table under two L1 entries, and its data, count twice); findings
//! are classified as follows:
//!
//! - **corruptions**: stored refcount below the number of references; reserved
//!   bits; unaligned tables or data; references one cluster or more past the end of
//!   the file; refcount overflow; invalid snapshot, bitmap or subcluster metadata;
//!   COPIED on a shared or compressed entry; and, beyond `qemu-img check`,
//!   compressed streams that do not decompress to a full cluster, the zero flag in
//!   v2 images and clusters used as both metadata and data.
//! - **leaks**: stored refcount above the number of references, including non-zero
//!   refcounts for clusters past the end of the file.
//! - **relaxed-copied**: an active entry whose cluster has refcount 1 but no COPIED
//!   flag. Not an error (writes copy the cluster); a corruption with `strict`.
//! - **check errors**: the check could not read or interpret something.

mod bitmaps;
mod decompress;
mod refcounts;
mod repair;
mod report;

use std::fs::OpenOptions;
use std::path::Path;

pub use report::{CheckReport, Finding, FindingClass, FindingKind, RepairMode};

use crate::error::{Error, IoContext, Result};
use crate::image::lock::{lock, LockMode};
use crate::image::{Caveat, Image, OpenMode};
use crate::io::{ReadAt, WriteAt};
use refcounts::Checker;
use report::Tally;

/// How to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckOptions {
    /// Count refcount-1 entries without COPIED as corruptions (QEMU's rule).
    pub strict: bool,
    /// Repair in place ([`check`] opens the file read-write).
    pub repair: Option<RepairMode>,
    /// Decompress every compressed cluster (on by default).
    pub verify_compressed: bool,
    /// Keep at most this many findings in the report; counters stay exact.
    pub max_findings: usize,
    /// Check an image another process has open for writing (qemu-img's `-U`):
    /// see [`OpenOptions::force_share`](crate::source::OpenOptions::force_share).
    /// Refused with `repair`, as qemu-img refuses it.
    pub force_share: bool,
}

impl Default for CheckOptions {
    fn default() -> Self {
        CheckOptions {
            strict: false,
            repair: None,
            verify_compressed: true,
            max_findings: 1000,
            force_share: false,
        }
    }
}

/// Checks (and, if `opts.repair` is set, repairs) the image at `path`.
///
/// Returns an error only if the image cannot be checked at all: it cannot be
/// opened or read, is not qcow2, or its header is invalid or uses features QEMU
/// would refuse (callers report that like `qemu-img check`'s exit code 1).
/// The image gets QEMU's locks first ([`crate::image::lock`]): a check is refused
/// while another process writes the image (unless `opts.force_share`), a repair
/// while any other process has it open; nothing is then read or written.
/// [`check_image`] and [`repair_image`] do the same through a reader.
pub fn check(path: &Path, opts: &CheckOptions) -> Result<CheckReport> {
    let name = path.display().to_string();
    if opts.force_share && opts.repair.is_some() {
        return Err(Error::InvalidArgument(
            "force-share can only be used with read-only checks, not with a repair \
             (qemu-img: force-share=on can only be used with read-only images)"
                .into(),
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(opts.repair.is_some())
        .open(path)
        .ctx(|| format!("opening {name}"))?;
    let mode = match opts.repair {
        Some(_) => LockMode::Write,
        None => LockMode::read(opts.force_share),
    };
    lock(&file, path, mode)?;
    open_data_file(&Image::open(&file, OpenMode::Check)?)?;
    if opts.repair.is_some() {
        repair_image(&file, &name, opts)
    } else {
        check_image(&file, &name, opts)
    }
}

/// The former name of [`check`].
#[doc(hidden)]
pub use self::check as check_file;

/// QEMU's check opens an image's external data file too, and fails (exit 1) where
/// it cannot: the name is used as stored, relative to the current directory, as
/// `qemu-img check` does.
fn open_data_file(im: &Image) -> Result<()> {
    if let Some(Caveat::ExternalDataFile(Some(name))) = im
        .caveats
        .iter()
        .find(|c| matches!(c, Caveat::ExternalDataFile(_)))
    {
        std::fs::File::open(name).ctx(|| {
            format!(
                "opening the external data file {name:?} (named by the image, relative to \
                 the current directory as QEMU opens it)"
            )
        })?;
    }
    Ok(())
}

/// Checks an image read through `img`; `opts.repair` must be `None`.
pub fn check_image<R: ReadAt + ?Sized>(
    img: &R,
    filename: &str,
    opts: &CheckOptions,
) -> Result<CheckReport> {
    if opts.repair.is_some() {
        return Err(Error::InvalidArgument(
            "repair needs a writable image: use repair_image".into(),
        ));
    }
    let (report, _) = run(img, filename, opts)?;
    Ok(report)
}

/// Checks the image, repairs what `opts.repair` asks for if that is safe, and
/// checks again. The returned report describes the image after the repair, with
/// `corruptions-fixed`, `leaks-fixed` and `relaxed-copied-fixed` set; if the first
/// check found problems a repair cannot safely fix (corruptions other than COPIED
/// flags, or check errors), nothing is written and `repair-refused` says why.
pub fn repair_image<F: ReadAt + WriteAt + ?Sized>(
    img: &F,
    filename: &str,
    opts: &CheckOptions,
) -> Result<CheckReport> {
    let Some(mode) = opts.repair else {
        return Err(Error::InvalidArgument("no repair mode given".into()));
    };
    let (mut first, ck) = run(img, filename, opts)?;
    if let Some(reason) = ck.tally.blocking_problem() {
        first.repair_refused = Some(reason);
        return Ok(first);
    }
    let l1_offset = ck.im.header.l1_table_offset;
    let mut ck = ck;
    if mode.leaks() && first.leaks > 0 {
        repair::repair_leaks(img, &mut ck)?;
        if mode.copied() {
            // COPIED follows the stored refcounts, which just changed.
            let (again, ck2) = run(img, filename, opts)?;
            if let Some(reason) = ck2.tally.blocking_problem() {
                let mut r = again;
                r.repair = Some(mode);
                r.repair_refused = Some(format!("after freeing leaks: {reason}"));
                return Ok(r);
            }
            ck = ck2;
        }
    }
    if mode.copied() && !ck.copied_fixes.is_empty() {
        repair::repair_copied(img, &ck.copied_fixes, l1_offset)?;
    }
    drop(ck);
    let (mut fin, _) = run(img, filename, opts)?;
    fin.repair = Some(mode);
    fin.corruptions_fixed = first.corruptions.saturating_sub(fin.corruptions);
    fin.leaks_fixed = first.leaks.saturating_sub(fin.leaks);
    fin.relaxed_copied_fixed = first.relaxed_copied.saturating_sub(fin.relaxed_copied);
    Ok(fin)
}

fn run<'a, R: ReadAt + ?Sized>(
    img: &'a R,
    filename: &str,
    opts: &CheckOptions,
) -> Result<(CheckReport, Checker<'a, R>)> {
    let im = Image::open(img, OpenMode::Check)?;
    let tally = Tally::new(opts.strict, opts.max_findings);
    let mut ck = Checker::new(img, im, tally, opts.verify_compressed)?;
    ck.run()?;
    let report = report_of(&ck, filename, opts);
    Ok((report, ck))
}

fn report_of<R: ReadAt + ?Sized>(
    ck: &Checker<'_, R>,
    filename: &str,
    opts: &CheckOptions,
) -> CheckReport {
    let h = &ck.im.header;
    let t = &ck.tally;
    // QEMU: size_to_clusters(total_sectors · 512).
    let total_clusters = h.guest_size().div_ceil(ck.im.cluster_size);
    CheckReport {
        filename: filename.to_string(),
        format: "qcow2",
        check_errors: t.check_errors,
        image_end_offset: ck.image_end_offset,
        corruptions: t.corruptions,
        leaks: t.leaks,
        corruptions_fixed: 0,
        leaks_fixed: 0,
        total_clusters,
        allocated_clusters: ck.frag.allocated,
        fragmented_clusters: ck.frag.fragmented,
        compressed_clusters: ck.frag.compressed,
        relaxed_copied: t.relaxed_copied,
        relaxed_copied_fixed: 0,
        shared_clusters: ck.share.shared_clusters,
        shared_compressed_streams: ck.share.shared_streams,
        max_refcount: ck.share.max_refcount,
        bytes_saved_by_sharing: ck.share.bytes_saved,
        strict: opts.strict,
        repair: None,
        repair_refused: None,
        qcow2_version: h.version,
        cluster_size: ck.im.cluster_size,
        refcount_bits: h.refcount_bits(),
        compression_type: ck.im.compression.name(),
        extended_l2: ck.im.extended_l2,
        snapshots: h.nb_snapshots,
        backing_file: ck
            .im
            .backing_name
            .as_deref()
            .map(|n| String::from_utf8_lossy(n).into_owned()),
        virtual_size: h.size,
        file_size: ck.im.file_len,
        findings: t.findings.clone(),
        findings_omitted: t.omitted,
    }
}
