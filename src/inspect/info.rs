//! `info`: what `qemu-img info` says about an image, with the same JSON names,
//! plus dedup figures from a walk of the active L1/L2 tree.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::Serialize;

use super::layers::{walk_l2, ClusterEntry};
use crate::error::{IoContext, Result};
use crate::format::header::{
    QCOW2_AUTOCLEAR_DATA_FILE_RAW, QCOW2_COMPAT_LAZY_REFCOUNTS, QCOW2_INCOMPAT_CORRUPT,
    QCOW2_INCOMPAT_DIRTY,
};
use crate::format::snapshot::Snapshot;
use crate::image::{Image, OpenMode};
use crate::io::ReadAt;
use crate::source::chain::{full_backing_filename, open_image};
use crate::source::raw::RawSource;
use crate::source::{Format, Source};

/// `qemu-img info`'s `format-specific.data` for qcow2.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Qcow2Specific {
    /// "0.10" (version 2) or "1.1" (version 3).
    pub compat: String,
    /// "zlib" or "zstd".
    pub compression_type: String,
    /// Lazy refcounts (v3 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy_refcounts: Option<bool>,
    /// Refcount width.
    pub refcount_bits: u32,
    /// The external data file's name (images with one; absent if the image does
    /// not name it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file: Option<String>,
    /// Whether the external data file is raw (autoclear bit 1; images with an
    /// external data file only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file_raw: Option<bool>,
    /// The corrupt bit (v3 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<bool>,
    /// Extended L2 entries (v3 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extended_l2: Option<bool>,
}

/// `format-specific`.
#[derive(Debug, Clone, Serialize)]
pub struct FormatSpecific {
    /// "qcow2".
    #[serde(rename = "type")]
    pub kind: String,
    /// The fields.
    pub data: Qcow2Specific,
}

/// One snapshot, with `qemu-img info`'s field names.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    /// ID.
    pub id: String,
    /// Name.
    pub name: String,
    /// VM state size in bytes.
    pub vm_state_size: u64,
    /// Creation time, seconds.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest clock, seconds part.
    pub vm_clock_sec: u64,
    /// Guest clock, nanoseconds part.
    pub vm_clock_nsec: u64,
    /// Instruction count, when recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icount: Option<u64>,
}

/// Dedup and compression figures of the active layer (qdedup's own fields).
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub struct DedupInfo {
    /// Guest clusters (virtual size / cluster size, rounded up).
    pub guest_clusters: u64,
    /// Guest clusters with a host cluster or compressed data in this layer: data,
    /// preallocated zero clusters and (extended L2) clusters with any mix of
    /// subclusters; as `check`'s and `qemu-img check`'s `allocated-clusters`.
    pub allocated_clusters: u64,
    /// Guest clusters without a host cluster that read as zeros: the zero flag, or
    /// (extended L2) some zero subcluster.
    pub zero_clusters: u64,
    /// Guest clusters without a host cluster or zero flag (read from the backing
    /// file, or zeros).
    pub unallocated_clusters: u64,
    /// Distinct host clusters holding guest data (plain ones and those holding streams).
    pub host_data_clusters: u64,
    /// Distinct stored contents: plain host clusters plus compressed streams.
    pub stored_copies: u64,
    /// Stored copies (plain host clusters or compressed streams) referenced more
    /// than once.
    pub shared_host_clusters: u64,
    /// References to shared copies.
    pub shared_references: u64,
    /// Largest refcount of a host data cluster (streams packed into one cluster
    /// add up), as `convert` and `check` report it.
    pub max_refcount: u64,
    /// Most references to one stored copy.
    pub max_references: u64,
    /// Mean references per shared host cluster (0 when none is shared).
    pub mean_references: f64,
    /// Guest clusters that reuse a stored copy (allocated − stored copies); as
    /// `clusters-duplicate` in the convert report.
    pub duplicate_clusters: u64,
    /// `duplicate-clusters` × cluster size: guest bytes stored once instead of
    /// again (as the convert report's; `check`'s `bytes-saved-by-sharing` counts
    /// file bytes).
    pub duplicate_bytes: u64,
    /// Guest clusters stored as compressed references.
    pub compressed_clusters: u64,
    /// Distinct compressed streams (as `clusters-compressed` in the convert report).
    pub compressed_streams: u64,
    /// Bytes of those streams (packed streams measured up to the next one; a
    /// stream followed by none is counted to its last 512-byte sector).
    /// (Named apart from the convert report's exact `compressed-bytes`.)
    #[serde(rename = "compressed-extent-bytes")]
    pub compressed_bytes: u64,
    /// streams × cluster size / `compressed-extent-bytes` (0 if nothing is
    /// compressed); slightly below the convert report's exact `compression-ratio`.
    #[serde(rename = "extent-compression-ratio")]
    pub compression_ratio: f64,
}

/// What `info` reports.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct InfoReport {
    /// Virtual size.
    pub virtual_size: u64,
    /// The path as given.
    pub filename: String,
    /// Cluster size (qcow2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// "qcow2" or "raw".
    pub format: String,
    /// Bytes allocated on the host file system (`st_blocks` × 512).
    pub actual_size: u64,
    /// Guest data is encrypted (present only when it is, like qemu-img).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub encrypted: bool,
    /// qcow2 specifics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<FormatSpecific>,
    /// Snapshots (omitted when there are none, like qemu-img).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotInfo>,
    /// Backing file name as stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    /// Backing file name as `qemu-img info` reports it: as stored when absolute or
    /// with a protocol prefix (`file:`), else combined with the directory of the
    /// image's name as given ([`full_backing_filename`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    /// Backing format from the header extension.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    /// The dirty bit.
    pub dirty_flag: bool,
    /// Length of the image file (qdedup; qemu-img shows it under the child node).
    pub file_size: u64,
    /// Dedup figures (qcow2 only; absent where the walk of the L1/L2 tables failed,
    /// which `problems` then says).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedup: Option<DedupInfo>,
    /// What is wrong with the image, or keeps other commands from reading it (the
    /// corrupt bit, an external data file, encryption, a failed dedup walk); qdedup's
    /// own field, omitted when empty.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

/// Counts references of the active layer of the image `im` opened from `file`.
pub fn dedup_info(file: &dyn ReadAt, im: &Image) -> Result<DedupInfo> {
    let cs = im.cluster_size;
    let cb = im.cluster_bits;
    let mut d = DedupInfo {
        guest_clusters: im.header.guest_size().div_ceil(cs),
        ..DedupInfo::default()
    };
    let mut plain: HashMap<u64, u64> = HashMap::new();
    // Stream start → (references, max length).
    let mut streams: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut seen = 0u64;
    walk_l2(file, im, im.header.guest_size(), |_, e| {
        seen += 1;
        match e {
            ClusterEntry::Unallocated => d.unallocated_clusters += 1,
            ClusterEntry::Zero => d.zero_clusters += 1,
            ClusterEntry::Host(h) => {
                d.allocated_clusters += 1;
                *plain.entry(h >> cb).or_insert(0) += 1;
            }
            ClusterEntry::Compressed { offset, max_len } => {
                d.allocated_clusters += 1;
                d.compressed_clusters += 1;
                let s = streams.entry(offset).or_insert((0, max_len));
                s.0 += 1;
            }
        }
    })?;
    d.unallocated_clusters += d.guest_clusters - seen;
    // References per host cluster: plain references, plus one per stream reference
    // for every cluster a stream touches (as refcounts count them).
    let mut host = plain.clone();
    let mut starts: Vec<u64> = streams.keys().copied().collect();
    starts.sort_unstable();
    for (k, &s) in starts.iter().enumerate() {
        let (refs, max_len) = streams[&s];
        let end = (s + max_len).min(starts.get(k + 1).copied().unwrap_or(u64::MAX).max(s + 1));
        d.compressed_bytes += end - s;
        for c in (s >> cb)..=((s + max_len - 1) >> cb) {
            *host.entry(c).or_insert(0) += refs;
        }
    }
    d.compressed_streams = streams.len() as u64;
    d.host_data_clusters = host.len() as u64;
    d.stored_copies = plain.len() as u64 + d.compressed_streams;
    d.max_refcount = host.values().copied().max().unwrap_or(0);
    // Sharing is counted per stored copy (a plain cluster or a compressed stream),
    // not per host cluster: several unshared streams packed into one cluster give
    // it a refcount above 1 without any sharing.
    for r in plain
        .values()
        .copied()
        .chain(streams.values().map(|(refs, _)| *refs))
    {
        d.max_references = d.max_references.max(r);
        if r > 1 {
            d.shared_host_clusters += 1;
            d.shared_references += r;
        }
    }
    if d.shared_host_clusters > 0 {
        d.mean_references = d.shared_references as f64 / d.shared_host_clusters as f64;
    }
    d.duplicate_clusters = d.allocated_clusters - d.stored_copies;
    d.duplicate_bytes = d.duplicate_clusters * cs;
    if d.compressed_bytes > 0 {
        d.compression_ratio = (d.compressed_streams * cs) as f64 / d.compressed_bytes as f64;
    }
    Ok(d)
}

fn snapshot_infos(snapshots: &[Snapshot]) -> Vec<SnapshotInfo> {
    snapshots
        .iter()
        .map(|s| SnapshotInfo {
            id: s.id.clone(),
            name: s.name.clone(),
            vm_state_size: s.vm_state_size,
            date_sec: s.date_sec,
            date_nsec: s.date_nsec,
            vm_clock_sec: s.vm_clock_nsec / 1_000_000_000,
            vm_clock_nsec: s.vm_clock_nsec % 1_000_000_000,
            icount: s.icount,
        })
        .collect()
}

/// Options of [`info`].
#[derive(Debug, Clone, Default)]
pub struct InfoOptions {
    /// Force the format of the image (probed when `None`).
    pub format: Option<Format>,
    /// Read an image another process has open for writing (qemu-img's `-U`):
    /// see [`OpenOptions::force_share`](crate::source::OpenOptions::force_share).
    pub force_share: bool,
}

/// Describes the image at `path` (format probed unless given). A qcow2 image is
/// opened as QEMU opens it (refusing what QEMU refuses); what keeps other commands
/// from reading it (the corrupt bit, an external data file, encryption) is
/// described in `problems` instead of refused, as `qemu-img info` describes such
/// images.
pub fn info(path: &Path, opts: &InfoOptions) -> Result<InfoReport> {
    let (file, format) = open_image(path, opts.format, opts.force_share)?;
    let meta = file
        .metadata()
        .ctx(|| format!("cannot stat {}", path.display()))?;
    let filename = path.display().to_string();
    let actual_size = meta.blocks() * 512;
    // A block device's size (its st_size is 0).
    let file_size =
        crate::io::file_length(&file).ctx(|| format!("cannot size {}", path.display()))?;
    if format == Format::Raw {
        let r = RawSource::from_file(file, path)?;
        return Ok(InfoReport {
            virtual_size: r.virtual_size(),
            filename,
            cluster_size: None,
            format: "raw".into(),
            actual_size,
            encrypted: false,
            format_specific: None,
            snapshots: Vec::new(),
            backing_filename: None,
            full_backing_filename: None,
            backing_filename_format: None,
            dirty_flag: false,
            file_size,
            dedup: None,
            problems: Vec::new(),
        });
    }
    let im = Image::open(&file, OpenMode::Read)?;
    let h = &im.header;
    let v3 = h.version >= 3;
    let data = Qcow2Specific {
        compat: if v3 { "1.1" } else { "0.10" }.into(),
        compression_type: im.compression.name().into(),
        lazy_refcounts: v3.then_some(h.compatible_features & QCOW2_COMPAT_LAZY_REFCOUNTS != 0),
        refcount_bits: h.refcount_bits(),
        data_file: im.data_file_name.clone().filter(|_| im.data_file),
        data_file_raw: im
            .data_file
            .then_some(h.autoclear_features & QCOW2_AUTOCLEAR_DATA_FILE_RAW != 0),
        corrupt: v3.then_some(h.incompatible_features & QCOW2_INCOMPAT_CORRUPT != 0),
        extended_l2: v3.then_some(im.extended_l2),
    };
    // A named external data file is described (`data-file`), not a problem: the
    // reader opens it.
    let mut problems: Vec<String> = im
        .caveats
        .iter()
        .filter(|c| !c.readable())
        .map(ToString::to_string)
        .collect();
    let dedup = match dedup_info(&file, &im) {
        Ok(d) => Some(d),
        Err(e) => {
            problems.push(format!("the dedup figures could not be computed: {e}"));
            None
        }
    };
    Ok(InfoReport {
        virtual_size: im.header.guest_size(),
        filename,
        cluster_size: Some(im.cluster_size),
        format: "qcow2".into(),
        actual_size,
        encrypted: h.crypt_method != 0,
        format_specific: Some(FormatSpecific {
            kind: "qcow2".into(),
            data,
        }),
        snapshots: snapshot_infos(&im.snapshots),
        full_backing_filename: im
            .backing_file()
            .map(|b| full_backing_filename(path, b).display().to_string()),
        backing_filename: im
            .backing_file()
            .map(|b| String::from_utf8_lossy(b).into_owned()),
        backing_filename_format: im.backing_format.clone(),
        dirty_flag: h.incompatible_features & QCOW2_INCOMPAT_DIRTY != 0,
        file_size,
        dedup,
        problems,
    })
}

impl std::fmt::Display for InfoReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "image: {}", self.filename)?;
        writeln!(f, "file format: {}", self.format)?;
        writeln!(
            f,
            "virtual size: {} ({} bytes)",
            human_size(self.virtual_size),
            self.virtual_size
        )?;
        writeln!(f, "disk size: {}", human_size(self.actual_size))?;
        if self.encrypted {
            writeln!(f, "encrypted: yes")?;
        }
        writeln!(
            f,
            "file length: {} ({} bytes)",
            human_size(self.file_size),
            self.file_size
        )?;
        if let Some(cs) = self.cluster_size {
            writeln!(f, "cluster_size: {cs}")?;
        }
        if let Some(b) = &self.backing_filename {
            write!(f, "backing file: {b}")?;
            if let Some(full) = &self.full_backing_filename {
                if full != b {
                    write!(f, " (actual path: {full})")?;
                }
            }
            writeln!(f)?;
        }
        if let Some(b) = &self.backing_filename_format {
            writeln!(f, "backing file format: {b}")?;
        }
        if !self.snapshots.is_empty() {
            writeln!(f, "Snapshot list:")?;
            writeln!(f, "{:<10}{:<20}{:>10}", "ID", "TAG", "VM SIZE")?;
            for s in &self.snapshots {
                writeln!(
                    f,
                    "{:<10}{:<20}{:>10}",
                    s.id,
                    s.name,
                    human_size(s.vm_state_size)
                )?;
            }
        }
        if let Some(fs) = &self.format_specific {
            let d = &fs.data;
            writeln!(f, "Format specific information:")?;
            writeln!(f, "    compat: {}", d.compat)?;
            writeln!(f, "    compression type: {}", d.compression_type)?;
            if let Some(l) = d.lazy_refcounts {
                writeln!(f, "    lazy refcounts: {l}")?;
            }
            writeln!(f, "    refcount bits: {}", d.refcount_bits)?;
            if let Some(n) = &d.data_file {
                writeln!(f, "    data file: {n}")?;
            }
            if let Some(r) = d.data_file_raw {
                writeln!(f, "    data file raw: {r}")?;
            }
            if let Some(c) = d.corrupt {
                writeln!(f, "    corrupt: {c}")?;
            }
            if let Some(e) = d.extended_l2 {
                writeln!(f, "    extended l2: {e}")?;
            }
        }
        if let Some(d) = &self.dedup {
            writeln!(f, "Dedup (active layer):")?;
            writeln!(
                f,
                "    clusters: {} guest, {} allocated, {} zero-flag, {} unallocated",
                d.guest_clusters, d.allocated_clusters, d.zero_clusters, d.unallocated_clusters
            )?;
            writeln!(
                f,
                "    stored copies: {} ({} host data clusters)",
                d.stored_copies, d.host_data_clusters
            )?;
            writeln!(
                f,
                "    shared copies: {} ({} references, {:.2} mean, at most {} to one copy), max refcount {}",
                d.shared_host_clusters,
                d.shared_references,
                d.mean_references,
                d.max_references,
                d.max_refcount
            )?;
            writeln!(
                f,
                "    duplicate data: {} stored once ({} duplicate clusters)",
                human_size(d.duplicate_bytes),
                d.duplicate_clusters
            )?;
            write!(
                f,
                "    compressed: {} clusters, {} streams, {}, ratio {:.2}",
                d.compressed_clusters,
                d.compressed_streams,
                human_size(d.compressed_bytes),
                d.compression_ratio
            )?;
        }
        if !self.problems.is_empty() {
            if self.dedup.is_some() {
                writeln!(f)?;
            }
            write!(f, "Problems:")?;
            for p in &self.problems {
                write!(f, "\n    {p}")?;
            }
        }
        Ok(())
    }
}

/// QEMU's size formatting: "2.5 MiB", "64 KiB", "512 B".
pub fn human_size(b: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        // QEMU prints 3 significant digits.
        let s = if v >= 100.0 {
            format!("{v:.0}")
        } else if v >= 10.0 {
            format!("{v:.1}")
        } else {
            format!("{v:.2}")
        };
        let s = if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        };
        format!("{s} {}", UNITS[u])
    }
}
