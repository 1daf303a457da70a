//! What `dedup` did (or, with `--dry-run`, would do).

use std::fmt;

use serde::Serialize;

use super::plan::Plan;
use super::scan::Scan;
use super::DedupOptions;
use crate::image::Image;

/// The report of [`dedup`](super::dedup): `--output json` prints it as is.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub struct DedupReport {
    /// The image.
    pub filename: String,
    /// Nothing was written: the figures say what a run would do.
    pub dry_run: bool,
    /// Cluster size in bytes.
    pub cluster_size: u64,
    /// Refcount width; a cluster is shared at most 2^refcount_bits − 1 times.
    pub refcount_bits: u32,
    /// Host clusters of changeable entries read and hashed.
    pub clusters_scanned: u64,
    /// Host clusters remapped onto an identical one and freed.
    pub clusters_remapped: u64,
    /// L2 entries pointed at another cluster.
    pub entries_remapped: u64,
    /// Bytes freed by the remaps (clusters remapped × cluster size).
    pub bytes_freed: u64,
    /// Clusters moved towards the start of the file (`--compact`).
    pub clusters_moved: u64,
    /// `fallocate(PUNCH_HOLE)` calls that gave freed space back.
    pub hole_punches: u64,
    /// Clusters in use between two freed ones moved into a freed cluster between
    /// two in use (plain dedup): each joins two runs of freed clusters and fills
    /// a third, two hole punches fewer.
    pub clusters_moved_to_join_holes: u64,
    /// File size before.
    pub file_size_before: u64,
    /// File size after (with `--dry-run`: what it would be).
    pub file_size_after: u64,
    /// Pairs whose hashes matched but whose bytes did not (left alone).
    pub hash_collisions: u64,
    /// Times a survivor reached the refcount maximum and a duplicate stayed
    /// as the next survivor.
    pub saturated_survivors: u64,
    /// Compressed entries, left as they are.
    pub compressed_entries_skipped: u64,
    /// Active L2 tables shared with a snapshot (refcount > 1), skipped.
    pub shared_l2_tables_skipped: u64,
    /// Extended L2 entries not wholly allocated, left as they are.
    pub partial_entries_skipped: u64,
    /// Preallocated zero entries, left as they are.
    pub zero_alloc_entries_skipped: u64,
    /// Leaked clusters freed before the run (an interrupted run leaves some).
    pub leaks_repaired: u64,
    /// COPIED flags set again at the end, where a refcount is 1.
    pub copied_flags_set: u64,
    /// The final check found the image clean and strict (COPIED iff refcount 1).
    pub clean_after: bool,
    /// Bytes read from the image.
    pub bytes_read: u64,
    /// Bytes written to the image.
    pub bytes_written: u64,
    /// Wall-clock time of the run.
    pub seconds: f64,
}

impl DedupReport {
    pub(super) fn new(name: &str, im: &Image, opts: &DedupOptions) -> Self {
        DedupReport {
            filename: name.to_string(),
            dry_run: opts.dry_run,
            cluster_size: im.cluster_size,
            refcount_bits: im.header.refcount_bits(),
            clusters_scanned: 0,
            clusters_remapped: 0,
            entries_remapped: 0,
            bytes_freed: 0,
            clusters_moved: 0,
            hole_punches: 0,
            clusters_moved_to_join_holes: 0,
            file_size_before: im.file_len,
            file_size_after: im.file_len,
            hash_collisions: 0,
            saturated_survivors: 0,
            compressed_entries_skipped: 0,
            shared_l2_tables_skipped: 0,
            partial_entries_skipped: 0,
            zero_alloc_entries_skipped: 0,
            leaks_repaired: 0,
            copied_flags_set: 0,
            clean_after: false,
            bytes_read: 0,
            bytes_written: 0,
            seconds: 0.0,
        }
    }

    pub(super) fn note_scan(&mut self, scan: &Scan, plan: &Plan) {
        self.clusters_scanned = plan.clusters_hashed;
        self.clusters_remapped = plan.remaps.len() as u64;
        self.bytes_freed = self.clusters_remapped * self.cluster_size;
        self.hash_collisions = plan.hash_collisions;
        self.saturated_survivors = plan.saturated;
        self.compressed_entries_skipped = scan.compressed_entries;
        self.shared_l2_tables_skipped = scan.shared_l2_tables;
        self.partial_entries_skipped = scan.partial_entries;
        self.zero_alloc_entries_skipped = scan.zero_alloc_entries;
    }
}

impl fmt::Display for DedupReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let would = if self.dry_run {
            " (dry run: nothing written)"
        } else {
            ""
        };
        writeln!(f, "Image: {}{would}", self.filename)?;
        writeln!(
            f,
            "Clusters scanned: {} ({} bytes each, refcount_bits {})",
            self.clusters_scanned, self.cluster_size, self.refcount_bits
        )?;
        writeln!(
            f,
            "Clusters remapped: {} ({} L2 entries), bytes freed: {}",
            self.clusters_remapped, self.entries_remapped, self.bytes_freed
        )?;
        if self.clusters_moved > 0 {
            writeln!(f, "Clusters moved to compact: {}", self.clusters_moved)?;
        }
        if self.clusters_moved_to_join_holes > 0 {
            writeln!(
                f,
                "Clusters moved to join holes: {} ({} hole punches)",
                self.clusters_moved_to_join_holes, self.hole_punches
            )?;
        }
        writeln!(
            f,
            "File size: {} -> {} bytes",
            self.file_size_before, self.file_size_after
        )?;
        let skipped = [
            (
                self.compressed_entries_skipped,
                "compressed entries left as they are",
            ),
            (
                self.shared_l2_tables_skipped,
                "L2 tables shared with a snapshot skipped",
            ),
            (
                self.partial_entries_skipped,
                "partly allocated extended L2 entries skipped",
            ),
            (
                self.zero_alloc_entries_skipped,
                "preallocated zero entries skipped",
            ),
            (
                self.saturated_survivors,
                "survivors at the refcount maximum",
            ),
            (self.hash_collisions, "hash matches with different bytes"),
            (self.leaks_repaired, "leaked clusters repaired first"),
        ];
        for (n, what) in skipped {
            if n > 0 {
                writeln!(f, "  {n} {what}")?;
            }
        }
        if !self.dry_run {
            writeln!(
                f,
                "After: {}",
                if self.clean_after {
                    "clean (COPIED iff refcount 1)"
                } else {
                    "NOT clean: run `qdedup check`"
                }
            )?;
        }
        write!(
            f,
            "Read {} bytes, wrote {} bytes in {:.3} s",
            self.bytes_read, self.bytes_written, self.seconds
        )
    }
}
