//! The typed result of `qdedup check`: counters named like `qemu-img check`'s JSON
//! (`ImageCheck` in QEMU's QAPI schema), qdedup's dedup figures, and the list of
//! findings, each naming the on-disk structure and file offset it concerns.

use std::fmt::{self, Write as _};

use serde::Serialize;

/// How a finding is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FindingClass {
    /// Counted in `corruptions` (exit code 2).
    Corruption,
    /// Counted in `leaks` (exit code 3 if nothing worse): space is wasted, data is safe.
    Leak,
    /// Counted in `check-errors` (exit code 1): the check could not look at something.
    CheckError,
    /// A refcount-1 entry without the COPIED flag: allowed by qdedup's relaxed
    /// rule (writes copy the cluster instead of writing in place); counted in
    /// `relaxed-copied`. With `--strict` such entries are corruptions instead.
    RelaxedCopied,
}

/// What a finding is about. Serialized in kebab-case.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum FindingKind {
    /// Stored refcount lower than the number of references (QEMU: "ERROR cluster N
    /// refcount=A reference=B").
    RefcountTooLow,
    /// Stored refcount higher than the number of references (QEMU: "Leaked cluster").
    LeakedCluster,
    /// Non-zero stored refcount for a cluster past the end of the file (QEMU is silent).
    RefcountBeyondEof,
    /// More references than the refcount width can hold.
    RefcountOverflow,
    /// A reference to a range one cluster or more past the end of the file.
    PastEof,
    /// Reserved bits set in an L1, L2, refcount table or bitmap table entry.
    ReservedBits,
    /// A table or data cluster offset that is not cluster aligned.
    Unaligned,
    /// The COPIED flag set where the refcount is not 1, or on a compressed entry.
    CopiedFlag,
    /// Refcount 1 without the COPIED flag (see [`FindingClass::RelaxedCopied`]).
    RelaxedCopied,
    /// Invalid subcluster bitmap in an extended L2 entry.
    SubclusterBitmap,
    /// An invalid compressed entry (with a data file or a subcluster bitmap).
    CompressedEntry,
    /// A compressed stream that does not decompress to a full cluster (QEMU is silent).
    CompressedStream,
    /// The zero flag in a version 2 image (QEMU's check is silent; reads fail).
    V2ZeroFlag,
    /// A refcount block that is outside the file or whose own refcount is not 1.
    RefcountBlock,
    /// An invalid snapshot table entry or snapshot L1 table.
    Snapshot,
    /// An invalid bitmap directory, bitmap table or bitmap extension.
    Bitmap,
    /// A cluster used both as metadata and as guest data (QEMU is silent).
    MetadataOverlap,
    /// An L1 entry with flags but no L2 table offset.
    L1Entry,
    /// The check could not read or interpret something.
    CheckError,
}

impl FindingKind {
    /// Whether a `--repair copied` can fix this kind of corruption.
    pub fn is_copied_related(self) -> bool {
        matches!(self, FindingKind::CopiedFlag | FindingKind::RelaxedCopied)
    }
}

/// One problem (or relaxed-COPIED note) found in the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Finding {
    /// How it is counted.
    pub class: FindingClass,
    /// What it is about.
    pub kind: FindingKind,
    /// The on-disk structure, e.g. "L2 table" or "refcount block".
    pub structure: &'static str,
    /// File offset of the entry or structure concerned (for refcount mismatches: the
    /// host offset of the cluster).
    pub offset: u64,
    /// Human-readable details.
    pub message: String,
}

/// Which repair `check` performed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RepairMode {
    /// Make the COPIED flag agree with the refcounts in the active tables.
    Copied,
    /// Lower stored refcounts that are too high.
    Leaks,
    /// Both: leaks first, then COPIED.
    All,
}

impl RepairMode {
    /// Whether leaked clusters are freed.
    pub fn leaks(self) -> bool {
        matches!(self, RepairMode::Leaks | RepairMode::All)
    }
    /// Whether COPIED flags are set/cleared.
    pub fn copied(self) -> bool {
        matches!(self, RepairMode::Copied | RepairMode::All)
    }
}

#[allow(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if passes a reference"
)]
fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// The result of checking (and possibly repairing) one image.
///
/// Field names in JSON match `qemu-img check --output=json` where QEMU has the same
/// figure (QEMU's optional fields are omitted when zero, as QEMU does); qdedup's own
/// figures are always present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    /// The image's file name as given.
    pub filename: String,
    /// Always "qcow2".
    pub format: &'static str,
    /// Problems that kept the check from looking at something (exit code 1).
    pub check_errors: u64,
    /// Offset of the end of the last used cluster.
    #[serde(skip_serializing_if = "is_zero")]
    pub image_end_offset: u64,
    /// Corruptions (exit code 2).
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions: u64,
    /// Leaked clusters (exit code 3 if there are no corruptions).
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks: u64,
    /// Corruptions a repair fixed.
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions_fixed: u64,
    /// Leaks a repair fixed.
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks_fixed: u64,
    /// Guest clusters in the virtual disk.
    #[serde(skip_serializing_if = "is_zero")]
    pub total_clusters: u64,
    /// Allocated guest clusters in the active tables (normal, preallocated zero and
    /// compressed).
    #[serde(skip_serializing_if = "is_zero")]
    pub allocated_clusters: u64,
    /// Allocated clusters not directly after their predecessor in the same L2 table,
    /// plus every compressed cluster (QEMU's definition).
    #[serde(skip_serializing_if = "is_zero")]
    pub fragmented_clusters: u64,
    /// Compressed clusters in the active tables.
    #[serde(skip_serializing_if = "is_zero")]
    pub compressed_clusters: u64,

    /// Active entries with refcount 1 but without the COPIED flag.
    pub relaxed_copied: u64,
    /// Relaxed-COPIED entries a `--repair copied` fixed.
    pub relaxed_copied_fixed: u64,
    /// Host data clusters referenced more than once (by L2 entries of any table).
    pub shared_clusters: u64,
    /// Compressed streams referenced by more than one L2 entry.
    pub shared_compressed_streams: u64,
    /// Highest number of references to any one host cluster.
    pub max_refcount: u64,
    /// Host bytes that sharing saves: Σ (references − 1) · cluster size over shared
    /// data clusters, plus Σ (references − 1) · stream length (to the end of its
    /// last sector) over shared compressed streams.
    pub bytes_saved_by_sharing: u64,
    /// Whether refcount-1 entries without COPIED were counted as corruptions.
    pub strict: bool,
    /// The repair performed, if one was requested and allowed.
    pub repair: Option<RepairMode>,
    /// Why a requested repair was not done.
    pub repair_refused: Option<String>,

    /// qcow2 version (2 or 3).
    pub qcow2_version: u32,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Refcount width in bits.
    pub refcount_bits: u32,
    /// Compression type of compressed clusters ("zlib" or "zstd").
    pub compression_type: &'static str,
    /// Whether L2 entries are extended (subclusters).
    pub extended_l2: bool,
    /// Number of internal snapshots.
    pub snapshots: u32,
    /// Backing file name from the header, if any.
    pub backing_file: Option<String>,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Size of the image file in bytes.
    pub file_size: u64,

    /// The problems found, in the order found (at most
    /// [`super::CheckOptions::max_findings`]; the counters above are always complete).
    pub findings: Vec<Finding>,
    /// Findings left out of `findings` because of the cap.
    pub findings_omitted: u64,
}

impl CheckReport {
    /// `qemu-img check`'s exit code: 0 clean, 1 the check could not complete
    /// (check errors), 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// Whether the image has no corruptions, leaks or check errors.
    pub fn is_clean(&self) -> bool {
        self.exit_code() == 0
    }

    /// One line per finding, like the messages `qemu-img check` prints on stderr
    /// (relaxed-COPIED notes are summarized in [`CheckReport::human_summary`]).
    pub fn human_findings(&self) -> String {
        let mut s = String::new();
        for f in &self.findings {
            let prefix = match f.class {
                FindingClass::Corruption => "ERROR",
                FindingClass::Leak => "Leaked",
                FindingClass::CheckError => "Check error",
                FindingClass::RelaxedCopied => continue,
            };
            let _ = writeln!(
                s,
                "{prefix} {} at {:#x}: {}",
                f.structure, f.offset, f.message
            );
        }
        if self.findings_omitted > 0 {
            let _ = writeln!(s, "... {} more findings omitted", self.findings_omitted);
        }
        s
    }

    /// The summary `qemu-img check` prints on stdout, followed by qdedup's figures.
    pub fn human_summary(&self) -> String {
        let mut s = String::new();
        if let Some(reason) = &self.repair_refused {
            let _ = writeln!(s, "Repair refused: {reason}\n");
        }
        if self.repair.is_some() {
            let _ = write!(
                s,
                "The following inconsistencies were found and repaired:\n\n    \
                 {} leaked clusters\n    {} corruptions\n",
                self.leaks_fixed, self.corruptions_fixed
            );
            if self.relaxed_copied_fixed > 0 {
                let _ = writeln!(
                    s,
                    "    {} refcount-1 entries given QCOW_OFLAG_COPIED",
                    self.relaxed_copied_fixed
                );
            }
            s.push_str("\nDouble checking the fixed image now...\n");
        }
        if self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0 {
            s.push_str("No errors were found on the image.\n");
        } else {
            if self.corruptions > 0 {
                let _ = write!(
                    s,
                    "\n{} errors were found on the image.\nData may be corrupted, or \
                     further writes to the image may corrupt it.\n",
                    self.corruptions
                );
            }
            if self.leaks > 0 {
                let _ = write!(
                    s,
                    "\n{} leaked clusters were found on the image.\nThis means waste of \
                     disk space, but no harm to data.\n",
                    self.leaks
                );
            }
            if self.check_errors > 0 {
                let _ = write!(
                    s,
                    "\n{} internal errors have occurred during the check.\n",
                    self.check_errors
                );
            }
        }
        if self.total_clusters != 0 && self.allocated_clusters != 0 {
            let a = self.allocated_clusters as f64;
            let _ = writeln!(
                s,
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
                self.allocated_clusters,
                self.total_clusters,
                a * 100.0 / self.total_clusters as f64,
                self.fragmented_clusters as f64 * 100.0 / a,
                self.compressed_clusters as f64 * 100.0 / a,
            );
        }
        if self.image_end_offset != 0 {
            let _ = writeln!(s, "Image end offset: {}", self.image_end_offset);
        }
        let _ = writeln!(
            s,
            "Dedup: {} shared clusters, {} shared compressed streams, max refcount {}, \
             {} bytes saved by sharing",
            self.shared_clusters,
            self.shared_compressed_streams,
            self.max_refcount,
            self.bytes_saved_by_sharing
        );
        if self.relaxed_copied > 0 {
            let _ = writeln!(
                s,
                "{} entries have refcount 1 without QCOW_OFLAG_COPIED ({}).",
                self.relaxed_copied,
                if self.strict {
                    "counted as corruptions because of --strict"
                } else {
                    "allowed; writes copy them; --repair copied sets the flag"
                }
            );
        }
        s
    }

    /// Findings followed by the summary.
    pub fn human(&self) -> String {
        let mut s = self.human_findings();
        s.push_str(&self.human_summary());
        s
    }
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.human())
    }
}

/// Collects findings and keeps the counters.
#[derive(Debug)]
pub(crate) struct Tally {
    pub strict: bool,
    pub max_findings: usize,
    pub findings: Vec<Finding>,
    pub omitted: u64,
    pub corruptions: u64,
    pub leaks: u64,
    pub check_errors: u64,
    pub relaxed_copied: u64,
    /// Corruptions that `--repair copied` can fix.
    pub copied_corruptions: u64,
}

impl Tally {
    pub fn new(strict: bool, max_findings: usize) -> Self {
        Tally {
            strict,
            max_findings,
            findings: Vec::new(),
            omitted: 0,
            corruptions: 0,
            leaks: 0,
            check_errors: 0,
            relaxed_copied: 0,
            copied_corruptions: 0,
        }
    }

    fn class_of(&self, kind: FindingKind) -> FindingClass {
        match kind {
            FindingKind::LeakedCluster | FindingKind::RefcountBeyondEof => FindingClass::Leak,
            FindingKind::CheckError => FindingClass::CheckError,
            FindingKind::RelaxedCopied if !self.strict => FindingClass::RelaxedCopied,
            _ => FindingClass::Corruption,
        }
    }

    /// Counts `n` occurrences of `kind` and records one finding for them. The message
    /// is only built if the finding is kept.
    pub fn note_n(
        &mut self,
        n: u64,
        kind: FindingKind,
        structure: &'static str,
        offset: u64,
        message: impl FnOnce() -> String,
    ) {
        let class = self.class_of(kind);
        match class {
            FindingClass::Corruption => self.corruptions += n,
            FindingClass::Leak => self.leaks += n,
            FindingClass::CheckError => self.check_errors += n,
            FindingClass::RelaxedCopied => {}
        }
        if kind == FindingKind::RelaxedCopied {
            self.relaxed_copied += n;
        }
        if class == FindingClass::Corruption && kind.is_copied_related() {
            self.copied_corruptions += n;
        }
        if self.findings.len() < self.max_findings {
            self.findings.push(Finding {
                class,
                kind,
                structure,
                offset,
                message: message(),
            });
        } else {
            self.omitted += 1;
        }
    }

    /// Counts one occurrence of `kind`.
    pub fn note(
        &mut self,
        kind: FindingKind,
        structure: &'static str,
        offset: u64,
        message: impl FnOnce() -> String,
    ) {
        self.note_n(1, kind, structure, offset, message);
    }

    /// Whether any corruption other than COPIED-related ones, or any check error,
    /// was found; returns a description.
    pub fn blocking_problem(&self) -> Option<String> {
        if self.check_errors > 0 {
            return Some(format!(
                "{} check errors: the image could not be checked completely",
                self.check_errors
            ));
        }
        if self.corruptions > self.copied_corruptions {
            let first = self
                .findings
                .iter()
                .find(|f| f.class == FindingClass::Corruption && !f.kind.is_copied_related())
                .map(|f| {
                    format!(
                        " (first: {} at {:#x}: {})",
                        f.structure, f.offset, f.message
                    )
                })
                .unwrap_or_default();
            return Some(format!(
                "{} corruptions other than COPIED flags exist{first}",
                self.corruptions - self.copied_corruptions
            ));
        }
        None
    }
}
