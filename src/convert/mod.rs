//! `convert`: an input image to a deduplicated qcow2 v3 image.
//!
//! Three levels, each built on the next:
//!
//! - [`convert`]: paths in, [`ConvertReport`] out; opens the input as
//!   [`ConvertOptions::input`] says.
//! - [`convert_input`]: an input already opened ([`Input`]; also any [`Source`]
//!   through [`Input::from_source`]) into the file at a path.
//! - [`convert_to`]: any [`Source`] into any [`WriteAt`] (an in-memory file in
//!   tests), returning the raw [`ConvertStats`].
//!
//! The output file appears only when complete: it is written to a temporary file
//! beside `OUT` (named `.OUT.XXXXXX.qdedup-tmp`), synced, and renamed into place;
//! on any error or interruption the temporary file is removed. The input is only
//! ever opened read-only.

pub mod options;
pub mod pipeline;

use std::fs::File;
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

pub use options::{ConvertOptions, ProgressFn, O_OPTIONS};

use crate::writer::{WriterBuilder, WriterStats};

use crate::error::{Error, IoContext, Result};
use crate::io::WriteAt;
use crate::source::{Input, Source};

/// What a conversion did, for humans (`Display`) and JSON.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ConvertReport {
    /// Input path (empty for an [`Input::from_source`] input).
    pub input: String,
    /// Output path.
    pub output: String,
    /// Input format ("raw" or "qcow2").
    pub input_format: String,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Output cluster size.
    pub cluster_size: u64,
    /// Output refcount width.
    pub refcount_bits: u32,
    /// Guest clusters in the disk (virtual size / cluster size, rounded up; as
    /// `info`'s `guest-clusters`).
    pub guest_clusters: u64,
    /// Guest clusters that read as zeros, left unallocated in the output (no host
    /// cluster, no zero flag; as `info`'s `unallocated-clusters` of the output).
    pub unallocated_clusters: u64,
    /// Distinct stored contents: guest clusters stored as a new host copy or a new
    /// compressed stream (first occurrence of a content, and saturation copies);
    /// as `info`'s `stored-copies`.
    pub stored_copies: u64,
    /// Guest clusters that share an existing host copy or stream (as `info`'s
    /// `duplicate-clusters`).
    pub duplicate_clusters: u64,
    /// Extra copies written because a host copy reached the maximum refcount.
    pub saturation_copies: u64,
    /// Compressed streams written (distinct compressed contents; as `info`'s
    /// `compressed-streams`).
    pub compressed_streams: u64,
    /// Guest clusters whose L2 entry refers to a compressed stream (streams and
    /// the duplicates sharing them; as `info`'s and `check`'s `compressed-clusters`).
    pub compressed_clusters: u64,
    /// Bytes of compressed streams.
    pub compressed_bytes: u64,
    /// Guest bytes those streams hold (compressed streams × cluster size).
    pub compressed_input_bytes: u64,
    /// Compressions skipped because the incompressibility probe judged the
    /// content incompressible (zlib only; such clusters are stored plain).
    pub probe_skipped: u64,
    /// `compressed_input_bytes / compressed_bytes` (0 when nothing was compressed).
    pub compression_ratio: f64,
    /// Host clusters holding guest data.
    pub host_data_clusters: u64,
    /// Largest refcount of a host data cluster, where streams packed into one
    /// cluster add up (as `info`'s and `check`'s `max-refcount`).
    pub max_refcount: u64,
    /// Guest bytes read from the input (zero runs are skipped, not read).
    pub bytes_read: u64,
    /// Size of the output file.
    pub bytes_written: u64,
    /// Guest bytes stored once instead of again: duplicate clusters × cluster size
    /// (as `info`'s `duplicate-bytes`; `check`'s `bytes-saved-by-sharing` counts
    /// file bytes instead).
    pub duplicate_bytes: u64,
    /// `duplicate_clusters` as a percentage of the non-zero guest clusters.
    pub duplicate_percent: f64,
    /// Wall time in seconds.
    pub seconds: f64,
    /// Virtual size processed per second, in MB/s (10^6 bytes).
    pub mb_per_s: f64,
    /// Input bytes actually read per second, in MB/s (zero and unallocated ranges
    /// are not read, so on sparse inputs this is far below `mb_per_s`).
    pub read_mb_per_s: f64,
    /// Worker threads (0 = sequential reference converter).
    pub workers: usize,
    /// Whether dedup was on.
    pub dedup: bool,
    /// Compression codec, if any.
    pub compression: Option<String>,
    /// Heap bytes of the dedup index at the end: every slot of its table, used
    /// or not (at most 24 per stored copy; docs/format.md).
    pub index_bytes: u64,
    /// Whether matches were verified by comparing bytes (`--verify`).
    pub verify: bool,
    /// With `--verify`: matches whose bytes differed (fingerprint collisions).
    pub verify_mismatches: u64,
    /// Remarks (e.g. sharing impossible with refcount_bits=1).
    pub notes: Vec<String>,
}

impl std::fmt::Display for ConvertReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
        writeln!(
            f,
            "{} ({}) -> {} (qcow2 v3)",
            self.input, self.input_format, self.output
        )?;
        writeln!(
            f,
            "virtual size:      {:.1} MiB ({} bytes), cluster size {}, refcount bits {}",
            mib(self.virtual_size),
            self.virtual_size,
            self.cluster_size,
            self.refcount_bits
        )?;
        writeln!(
            f,
            "clusters:          {} guest, {} unallocated (zeros), {} stored copies, {} duplicate{}",
            self.guest_clusters,
            self.unallocated_clusters,
            self.stored_copies,
            self.duplicate_clusters,
            if self.saturation_copies > 0 {
                format!(" ({} saturation copies)", self.saturation_copies)
            } else {
                String::new()
            }
        )?;
        if let Some(c) = &self.compression {
            writeln!(
                f,
                "compressed:        {} clusters, {} streams ({}): {:.1} MiB into {:.1} MiB, ratio {:.2}",
                self.compressed_clusters,
                self.compressed_streams,
                c,
                mib(self.compressed_input_bytes),
                mib(self.compressed_bytes),
                self.compression_ratio
            )?;
            if self.probe_skipped > 0 {
                writeln!(
                    f,
                    "                   {} incompressible contents stored plain untried (probe)",
                    self.probe_skipped
                )?;
            }
        }
        writeln!(
            f,
            "read:              {:.1} MiB   written: {:.1} MiB",
            mib(self.bytes_read),
            mib(self.bytes_written)
        )?;
        writeln!(
            f,
            "duplicate data:    {:.1} MiB stored once ({:.1}% of the non-zero clusters), max refcount {}",
            mib(self.duplicate_bytes),
            self.duplicate_percent,
            self.max_refcount
        )?;
        writeln!(
            f,
            "dedup index:       {:.1} MiB ({:.1} bytes per stored copy){}",
            mib(self.index_bytes),
            if self.stored_copies == 0 {
                0.0
            } else {
                self.index_bytes as f64 / self.stored_copies as f64
            },
            if self.verify {
                format!(", verified: {} mismatches", self.verify_mismatches)
            } else {
                String::new()
            }
        )?;
        write!(
            f,
            "time:              {:.2} s, {:.0} MB/s read",
            self.seconds, self.read_mb_per_s
        )?;
        for n in &self.notes {
            write!(f, "\nnote: {n}")?;
        }
        Ok(())
    }
}

impl ConvertOptions {
    /// The writer settings these options ask for, for a disk of `virtual_size`
    /// bytes (`estimate` uses them too).
    pub fn writer(&self, virtual_size: u64) -> WriterBuilder {
        WriterBuilder::new(virtual_size)
            .cluster_size(self.cluster_size())
            .refcount_bits(1 << self.refcount_order)
            .compression(self.compression)
            .compression_level(self.compression_level)
            .compress_probe(self.compress_probe)
            .dedup(self.dedup)
            .verify(self.verify)
    }
}

/// What [`convert_to`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvertStats {
    /// The writer's counters: clusters by kind, compressed bytes, file size.
    pub writer: WriterStats,
    /// Guest bytes read from the source (zero runs are skipped, not read).
    pub bytes_read: u64,
    /// Heap bytes of the dedup index at the end.
    pub index_bytes: u64,
}

/// Converts `src` into a qcow2 image written through `out` (a fresh, empty file).
/// This is the core of [`convert`]; tests and benchmarks call it with in-memory
/// files. `opts.input`, `sync` and `force` do not apply here.
pub fn convert_to(
    src: &dyn Source,
    out: &dyn WriteAt,
    opts: &ConvertOptions,
) -> Result<ConvertStats> {
    let mut w = opts.writer(src.virtual_size()).create(out)?;
    let compress = w.compressor();
    let bytes_read = pipeline::run(src, opts, compress.as_deref(), &mut |b| w.accept_batch(b))?;
    let index_bytes = w.index_heap_bytes() as u64;
    let stats = w.finish()?;
    Ok(ConvertStats {
        writer: stats,
        bytes_read,
        index_bytes,
    })
}

/// Refuses an output that is the input (same file, whatever the path).
fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Gives the temporary file the owner and group of the file `old` it will replace
/// (a root-run `--force` keeps a libvirt- or user-owned image theirs); returns
/// the mode `old` has, for the new file. Fails, before anything is converted,
/// where the owner cannot be kept.
fn keep_owner(file: &File, old: &std::fs::Metadata, output: &Path) -> Result<u32> {
    use std::os::unix::fs::MetadataExt;
    let st = rustix::fs::fstat(file)
        .map_err(std::io::Error::from)
        .ctx(|| "cannot read the temporary file's owner".to_string())?;
    if st.st_uid != old.uid() || st.st_gid != old.gid() {
        let (uid, gid) = (
            rustix::fs::Uid::from_raw(old.uid()),
            rustix::fs::Gid::from_raw(old.gid()),
        );
        rustix::fs::fchown(file, Some(uid), Some(gid))
            .map_err(std::io::Error::from)
            .ctx(|| {
                format!(
                    "cannot give the new {} the owner {}:{} of the file it replaces",
                    output.display(),
                    old.uid(),
                    old.gid()
                )
            })?;
    }
    Ok(old.mode() & 0o7777)
}

/// Removes temporary files of earlier runs for the same output name that were
/// killed (no process holds their lock any more). Returns what was removed.
fn remove_stale_temporaries(dir: &Path, name: &str) -> Vec<std::path::PathBuf> {
    let prefix = format!(".{name}.");
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return removed;
    };
    for e in entries.flatten() {
        let fname = e.file_name();
        let f = fname.to_string_lossy();
        if !(f.starts_with(&prefix) && f.ends_with(".qdedup-tmp")) {
            continue;
        }
        let path = e.path();
        let Ok(file) = File::open(&path) else {
            continue;
        };
        if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok()
            && std::fs::remove_file(&path).is_ok()
        {
            removed.push(path);
        }
    }
    removed
}

/// Converts the image at `input` (opened as `opts.input` says: format probed or
/// forced, backing chain, snapshot) into a deduplicated qcow2 image at `output`.
///
/// `output` is refused if it is the input, a directory or a device, or exists
/// without `opts.force`; it appears only when complete (see the module docs).
pub fn convert(input: &Path, output: &Path, opts: &ConvertOptions) -> Result<ConvertReport> {
    convert_input(&Input::open(input, &opts.input)?, output, opts)
}

/// Converts an opened input into a deduplicated qcow2 image at `output`, as
/// [`convert`] does (`opts.input` is not used: the input is open already).
pub fn convert_input(input: &Input, output: &Path, opts: &ConvertOptions) -> Result<ConvertReport> {
    let start = Instant::now();
    let src = input.source();
    if input.path().is_some_and(|input| same_file(input, output)) {
        return Err(Error::InvalidArgument(format!(
            "output {} is the input file",
            output.display()
        )));
    }
    // Through a symbolic link, the file it points to is replaced (as a write
    // through the link would), not the link itself.
    let resolved;
    let output = match std::fs::symlink_metadata(output) {
        Ok(m) if m.file_type().is_symlink() => {
            resolved = std::fs::canonicalize(output).map_err(|_| {
                Error::InvalidArgument(format!(
                    "output {} is a symbolic link to a missing file",
                    output.display()
                ))
            })?;
            resolved.as_path()
        }
        _ => output,
    };
    let existing = std::fs::metadata(output);
    match &existing {
        Ok(m) if m.is_dir() => {
            return Err(Error::InvalidArgument(format!(
                "output {} is a directory",
                output.display()
            )))
        }
        Ok(m) if !m.is_file() => {
            use std::os::unix::fs::FileTypeExt;
            let t = m.file_type();
            let kind = if t.is_block_device() {
                "a block device"
            } else if t.is_char_device() {
                "a character device"
            } else if t.is_fifo() {
                "a FIFO"
            } else {
                "not a regular file"
            };
            return Err(Error::InvalidArgument(format!(
                "output {} is {kind}: qdedup writes a new file and renames it into place, \
                 it does not write into devices",
                output.display()
            )));
        }
        Ok(_) if !opts.force => {
            return Err(Error::InvalidArgument(format!(
                "output {} exists (use --force to replace it)",
                output.display()
            )))
        }
        _ => {}
    }
    let dir = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = output
        .file_name()
        .ok_or_else(|| Error::InvalidArgument(format!("bad output path {}", output.display())))?
        .to_string_lossy()
        .into_owned();
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(Error::InvalidArgument(format!(
                "output directory {} is not a directory",
                dir.display()
            )))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(Error::InvalidArgument(format!(
                "output directory {} does not exist",
                dir.display()
            )))
        }
        Err(e) => {
            return Err(Error::io(
                format!("cannot reach the output directory {}", dir.display()),
                e,
            ))
        }
    }
    // Created 0644 less the umask, the mode a new OUT gets; kept 0600 while written.
    let tmp = tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .prefix(&format!(".{name}."))
        .suffix(".qdedup-tmp")
        .tempfile_in(dir)
        // tempfile's error names the temporary file; the directory says more.
        .map_err(|e| std::io::Error::from(e.kind()))
        .ctx(|| format!("cannot create a temporary file in {}", dir.display()))?;
    let file: &File = tmp.as_file();
    let final_mode = match &existing {
        Ok(m) => keep_owner(file, m, output)?,
        Err(_) => rustix::fs::fstat(file)
            .map(|st| st.st_mode & 0o7777)
            .map_err(std::io::Error::from)
            .ctx(|| "cannot read the temporary file's mode".to_string())?,
    };
    rustix::fs::fchmod(file, rustix::fs::Mode::from_raw_mode(0o600))
        .map_err(std::io::Error::from)
        .ctx(|| "cannot make the temporary file private".to_string())?;
    // Held until the file is closed: tells later runs this temporary file is live.
    let _ = rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive);
    let ConvertStats {
        writer: stats,
        bytes_read,
        index_bytes,
    } = convert_to(src, file, opts)?;
    rustix::fs::fchmod(file, rustix::fs::Mode::from_raw_mode(final_mode))
        .map_err(std::io::Error::from)
        .ctx(|| format!("cannot set the mode {final_mode:o} of the new output"))?;
    if opts.sync {
        file.sync_all()
            .ctx(|| "cannot sync the output".to_string())?;
    }
    if opts.force {
        tmp.persist(output)
            .map_err(|e| Error::io(format!("cannot rename into {}", output.display()), e.error))?;
    } else {
        tmp.persist_noclobber(output)
            .map_err(|e| Error::io(format!("cannot rename into {}", output.display()), e.error))?;
    }
    if opts.sync {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    let mut notes = Vec::new();
    for stale in remove_stale_temporaries(dir, &name) {
        notes.push(format!(
            "removed {} left by an interrupted run",
            stale.display()
        ));
    }
    let seconds = start.elapsed().as_secs_f64();
    let cs = opts.cluster_size();
    let vsize = src.virtual_size();
    let data_clusters = stats.unique_clusters + stats.duplicate_clusters;
    if opts.dedup && opts.refcount_order == 0 {
        notes.push(
            "refcount_bits=1 allows no sharing: duplicate clusters were stored as copies".into(),
        );
    }
    Ok(ConvertReport {
        input: input
            .path()
            .map(|p| p.display().to_string())
            .unwrap_or_default(),
        output: output.display().to_string(),
        input_format: src.format_name().to_string(),
        virtual_size: vsize,
        cluster_size: cs,
        refcount_bits: 1 << opts.refcount_order,
        guest_clusters: vsize.div_ceil(cs),
        unallocated_clusters: vsize.div_ceil(cs) - data_clusters,
        stored_copies: stats.unique_clusters,
        duplicate_clusters: stats.duplicate_clusters,
        saturation_copies: stats.saturation_copies,
        compressed_streams: stats.compressed_clusters,
        compressed_clusters: stats.compressed_references,
        compressed_bytes: stats.compressed_bytes,
        compressed_input_bytes: stats.compressed_clusters * cs,
        probe_skipped: stats.probe_skipped,
        compression_ratio: if stats.compressed_bytes == 0 {
            0.0
        } else {
            (stats.compressed_clusters * cs) as f64 / stats.compressed_bytes as f64
        },
        host_data_clusters: stats.host_data_clusters,
        max_refcount: stats.max_refcount,
        bytes_read,
        bytes_written: stats.file_size,
        duplicate_bytes: stats.duplicate_clusters * cs,
        duplicate_percent: if data_clusters == 0 {
            0.0
        } else {
            100.0 * stats.duplicate_clusters as f64 / data_clusters as f64
        },
        seconds,
        mb_per_s: if seconds > 0.0 {
            vsize as f64 / seconds / 1e6
        } else {
            0.0
        },
        read_mb_per_s: if seconds > 0.0 {
            bytes_read as f64 / seconds / 1e6
        } else {
            0.0
        },
        workers: opts.workers,
        dedup: opts.dedup,
        compression: opts.compression.map(|c| c.name().to_string()),
        index_bytes,
        verify: opts.verify,
        verify_mismatches: stats.verify_mismatches,
        notes,
    })
}
