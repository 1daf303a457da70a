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

use crate::writer::batch::Kind;
use crate::writer::{BackingName, WriterBuilder, WriterStats};

use crate::error::{Error, IoContext, Result};
use crate::io::WriteAt;
use crate::source::{chain, Format, Input, OpenOptions, Source};

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
    /// qcow2 version of the output (3, or 2 with `compat=0.10`).
    pub qcow2_version: u32,
    /// The backing file name stored in the overlay (`None`: a standalone image).
    pub backing_file: Option<String>,
    /// Format of the backing file, as stored in the overlay.
    pub backing_format: Option<String>,
    /// Guest clusters equal to the backing chain's content, left unallocated
    /// (they read through to the backing file; counted in `unallocated_clusters`).
    pub backing_clusters: u64,
    /// Guest clusters of zeros over non-zero backing data, written as zero-flag
    /// entries (version 3 overlays; version 2 stores them as data).
    pub zero_flag_clusters: u64,
    /// Guest bytes read from the backing chain to compare.
    pub backing_bytes_read: u64,
    /// Zero clusters stored as data (`-S 0`, and zeros over backing data in a
    /// version 2 overlay); with dedup they share one host cluster.
    pub zero_data_clusters: u64,
    /// Input ranges that could not be read and were converted as zeros
    /// (`--salvage`), in guest order.
    pub salvaged: Vec<SalvagedRange>,
    /// `--checksum`: the blkhash digest of the input's guest content in hex
    /// (what `qdedup checksum` prints for the input and for the output).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
    /// The hash function of `checksum` ("blake3" or "sha256").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub checksum_algorithm: Option<String>,
    /// Bytes of data written with direct I/O (`O_DIRECT`: `--direct`, `-t
    /// none` or `-t directsync`; 0 otherwise, or where the file system refuses
    /// direct I/O: the writes then went through the page cache).
    pub direct_io_bytes: u64,
    /// Bytes of the output whose writeback to the device was started while
    /// converting (write-behind: a synced conversion through the page cache,
    /// the default; 0 with `--no-sync` or `--verify`, or where the data went
    /// with direct I/O).
    pub write_behind_bytes: u64,
    /// CPU time of the conversion's threads by role (not in the JSON report;
    /// the CLI prints it with `QDEDUP_THREAD_CPU=1`).
    #[serde(skip)]
    pub thread_cpu: ThreadCpu,
}

/// A range of the input `--salvage` converted as zeros.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SalvagedRange {
    /// Guest offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// The error reading its first sector gave.
    pub error: String,
}

impl std::fmt::Display for ConvertReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
        writeln!(
            f,
            "{} ({}) -> {} (qcow2 v{})",
            self.input, self.input_format, self.output, self.qcow2_version
        )?;
        if let Some(b) = &self.backing_file {
            writeln!(
                f,
                "backing file:      {b} ({}): {} clusters equal to it left unallocated, \
                 {} zero-flag clusters; {:.1} MiB of it read",
                self.backing_format.as_deref().unwrap_or("probed"),
                self.backing_clusters,
                self.zero_flag_clusters,
                mib(self.backing_bytes_read)
            )?;
        }
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
            "clusters:          {} guest, {} unallocated ({}), {} stored copies, {} duplicate{}",
            self.guest_clusters,
            self.unallocated_clusters,
            if self.backing_file.is_some() {
                "zeros, or equal to the backing file"
            } else {
                "zeros"
            },
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
        if !self.salvaged.is_empty() {
            write!(
                f,
                "\nsalvaged:          {} unreadable ranges, {} bytes, converted as zeros:",
                self.salvaged.len(),
                self.salvaged.iter().map(|r| r.length).sum::<u64>()
            )?;
            for r in &self.salvaged {
                write!(
                    f,
                    "\n  {:#x}+{:#x} ({} bytes): {}",
                    r.offset, r.length, r.length, r.error
                )?;
            }
        }
        if let (Some(c), Some(a)) = (&self.checksum, &self.checksum_algorithm) {
            write!(f, "\nchecksum:          {c} ({a}, blkhash)")?;
        }
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
            .version(self.qcow2_version)
            .verify(self.verify)
    }
}

/// The backing chain an overlay is written on: its guest view, and the name and
/// format the overlay's header stores.
pub struct Backing {
    /// The backing chain's guest view.
    pub source: Box<dyn Source>,
    /// The name and format stored in the overlay.
    pub name: BackingName,
}

impl Backing {
    /// Opens the backing file `opts.backing_file` of the overlay to be written at
    /// `output`: a relative name is resolved against `output`'s directory (QEMU's
    /// `path_combine`), the format is `opts.backing_format` or probed, and the
    /// backing file's own chain is opened too. `None` without a backing file.
    pub fn open(output: &Path, opts: &ConvertOptions) -> Result<Option<Backing>> {
        use std::os::unix::ffi::OsStrExt;
        let Some(name) = &opts.backing_file else {
            return Ok(None);
        };
        let bytes = name.as_os_str().as_bytes();
        if bytes.is_empty() {
            return Err(Error::InvalidArgument(
                "the backing file name is empty".into(),
            ));
        }
        let path = chain::resolve_backing_name(output, bytes)?;
        if same_file(&path, output) {
            return Err(Error::InvalidArgument(format!(
                "backing file {} is the output file",
                path.display()
            )));
        }
        let open = OpenOptions {
            format: opts.backing_format,
            backing_chain: true,
            snapshot: None,
            force_share: opts.input.force_share,
        };
        let source = chain::open_chain(&path, &open).map_err(|e| match e {
            Error::Io { context, source } => Error::Io {
                context: format!("backing file {}: {context}", path.display()),
                source,
            },
            other => chain::in_file(other, &path),
        })?;
        let format = match source.format_name() {
            "raw" => Format::Raw,
            _ => Format::Qcow2,
        };
        Ok(Some(Backing {
            source,
            name: BackingName {
                name: bytes.to_vec(),
                format: Some(opts.backing_format.unwrap_or(format).name().to_string()),
            },
        }))
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
    /// The blkhash digest of the input's guest content, when
    /// [`ConvertOptions::checksum`] asked for it.
    pub checksum: Option<crate::checksum::BlockDigest>,
    /// Bytes of data written with direct I/O (`O_DIRECT`).
    pub direct_io_bytes: u64,
    /// Bytes of the output whose writeback was started during the conversion
    /// (write-behind: a synced conversion through the page cache).
    pub write_behind_bytes: u64,
    /// CPU time of the conversion's threads by role.
    pub thread_cpu: ThreadCpu,
}

/// Converts `src` into a qcow2 image written through `out` (a fresh, empty file).
/// This is the core of [`convert`]; tests and benchmarks call it with in-memory
/// files. `opts.input`, `sync` and `force` do not apply here.
pub fn convert_to(
    src: &dyn Source,
    out: &dyn WriteAt,
    opts: &ConvertOptions,
) -> Result<ConvertStats> {
    if opts.backing_file.is_some() {
        return Err(Error::InvalidArgument(
            "an overlay needs its backing file opened: use convert_overlay_to".into(),
        ));
    }
    Ok(convert_overlay_to(src, None, out, opts)?.stats)
}

/// What [`convert_overlay_to`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlayStats {
    /// As [`convert_to`].
    pub stats: ConvertStats,
    /// Guest clusters equal to the backing file, left unallocated.
    pub backing_clusters: u64,
    /// Guest bytes read from the backing file.
    pub backing_bytes_read: u64,
    /// Zero clusters stored as data (`-S 0`, zeros over backing data in v2).
    pub zero_data_clusters: u64,
}

/// [`OverlayStats`] and what `--salvage` converted as zeros.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SalvageStats {
    /// As [`convert_overlay_to`].
    pub stats: OverlayStats,
    /// The ranges converted as zeros, in guest order (adjacent ones merged).
    pub salvaged: Vec<SalvagedRange>,
}

/// [`convert_to`] for an overlay on `backing` (or, with `None`, a standalone
/// image): clusters equal to the backing file's content at the same guest offset
/// stay unallocated, zeros over backing data become zero-flag entries (v3) or
/// zero data (v2). `opts.sparse_size == Some(0)` stores every other cluster.
pub fn convert_overlay_to(
    src: &dyn Source,
    backing: Option<&Backing>,
    out: &dyn WriteAt,
    opts: &ConvertOptions,
) -> Result<OverlayStats> {
    Ok(convert_salvaging_to(src, backing, out, opts)?.stats)
}

/// [`convert_overlay_to`] that also returns the ranges `opts.salvage` converted
/// as zeros.
pub fn convert_salvaging_to(
    src: &dyn Source,
    backing: Option<&Backing>,
    out: &dyn WriteAt,
    opts: &ConvertOptions,
) -> Result<SalvageStats> {
    opts.validate()?;
    let cpu_start = crate::io::thread_cpu_ns();
    let prefault_start = crate::io::PREFAULT_CPU_NS.load(std::sync::atomic::Ordering::Relaxed);
    let mut w = opts
        .writer(src.virtual_size())
        .backing(backing.map(|b| b.name.clone()))
        .create(out)?;
    let compress = w.compressor();
    let mut sum = opts
        .checksum
        .map(|alg| {
            crate::checksum::ConvertChecksum::new(alg, opts.cluster_size(), src.virtual_size())
        })
        .transpose()?;
    let overlay = pipeline::Overlay {
        backing: backing.map(|b| b.source.as_ref()),
        zero_flag: opts.qcow2_version >= 3,
        allocate_zeros: opts.sparse_size == Some(0),
        salvage: opts.salvage,
    };
    let mut salvaged: Vec<SalvagedRange> = Vec::new();
    let zero = pipeline::zero_hash(opts.cluster_size());
    let (mut backing_clusters, mut zero_data_clusters) = (0u64, 0u64);
    let mut io_cpu = None;
    // The pipelined converter's writer only places clusters; an I/O thread
    // does the writes (writer::output). The sequential one does all on this thread.
    let bytes_read = std::thread::scope(|s| -> Result<pipeline::BytesRead> {
        // Not with --verify: it reads back earlier clusters of the output,
        // which write-behind would have let the page cache drop.
        w.set_write_behind(opts.sync && !opts.verify);
        if opts.workers > 0 {
            w.start_io_thread(s, opts.direct_io);
        }
        let r = pipeline::run_overlay_owned(
            src,
            &overlay,
            opts,
            compress.as_deref(),
            &mut |b, recycle| {
                if let Some(sum) = &mut sum {
                    sum.batch(&b)?;
                }
                for k in &b.kinds {
                    match k {
                        Kind::Backing => backing_clusters += 1,
                        Kind::Data { hash, .. } if *hash == zero => zero_data_clusters += 1,
                        _ => {}
                    }
                }
                for (offset, length, error) in &b.salvaged {
                    match salvaged.last_mut() {
                        Some(r) if r.offset + r.length == *offset => r.length += length,
                        _ => salvaged.push(SalvagedRange {
                            offset: *offset,
                            length: *length,
                            error: error.clone(),
                        }),
                    }
                }
                w.accept_owned(b, recycle)
            },
        );
        // Always, so that the scope can end; the pipeline's error comes first.
        let stopped = w.stop_io_thread();
        let r = r?;
        io_cpu = stopped?;
        Ok(r)
    })?;
    let index_bytes = w.index_heap_bytes() as u64;
    let direct_io_bytes = w.direct_io_bytes();
    let write_behind_bytes = w.write_behind_bytes();
    let stats = w.finish()?;
    let thread_cpu = ThreadCpu {
        writer_ns: crate::io::thread_cpu_ns()
            .zip(cpu_start)
            .map_or(0, |(b, a)| b.saturating_sub(a)),
        io_ns: io_cpu.unwrap_or(0),
        workers_ns: bytes_read.worker_cpu_ns,
        workers: if opts.workers == 0 {
            0
        } else {
            opts.workers.max(1)
        },
        prefault_ns: crate::io::PREFAULT_CPU_NS
            .load(std::sync::atomic::Ordering::Relaxed)
            .saturating_sub(prefault_start),
    };
    Ok(SalvageStats {
        stats: OverlayStats {
            stats: ConvertStats {
                writer: stats,
                bytes_read: bytes_read.source,
                index_bytes,
                checksum: sum.map(crate::checksum::ConvertChecksum::finish),
                direct_io_bytes,
                write_behind_bytes,
                thread_cpu,
            },
            backing_clusters,
            backing_bytes_read: bytes_read.backing,
            zero_data_clusters,
        },
        salvaged,
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
    opts.validate()?;
    let src = input.source();
    // Opened (and so checked) before anything is written, resolved against the
    // output's name as given.
    let backing = Backing::open(output, opts)?;
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
    let SalvageStats {
        stats:
            OverlayStats {
                stats:
                    ConvertStats {
                        writer: stats,
                        bytes_read,
                        index_bytes,
                        checksum,
                        direct_io_bytes,
                        write_behind_bytes,
                        thread_cpu,
                    },
                backing_clusters,
                backing_bytes_read,
                zero_data_clusters,
            },
        salvaged,
    } = convert_salvaging_to(src, backing.as_ref(), file, opts)?;
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
    if zero_data_clusters > 0 {
        notes.push(if opts.dedup {
            format!(
                "{zero_data_clusters} zero clusters stored as data ({}), sharing one host \
                 zero cluster (more where its refcount saturates)",
                if opts.sparse_size == Some(0) {
                    "-S 0"
                } else {
                    "compat=0.10 has no zero flag"
                }
            )
        } else {
            format!(
                "{zero_data_clusters} zero clusters stored as data, each its own copy (--no-dedup)"
            )
        });
    }
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
        unallocated_clusters: vsize.div_ceil(cs) - data_clusters - stats.zero_flag_clusters,
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
        qcow2_version: opts.qcow2_version,
        backing_file: backing
            .as_ref()
            .map(|b| String::from_utf8_lossy(&b.name.name).into_owned()),
        backing_format: backing.as_ref().and_then(|b| b.name.format.clone()),
        backing_clusters,
        zero_flag_clusters: stats.zero_flag_clusters,
        backing_bytes_read,
        zero_data_clusters,
        salvaged,
        checksum: checksum.as_ref().map(crate::checksum::to_hex),
        checksum_algorithm: checksum.and(opts.checksum).map(|a| a.name().to_string()),
        direct_io_bytes,
        write_behind_bytes,
        thread_cpu,
    })
}

/// CPU time (user + system, nanoseconds) of a conversion's threads by role,
/// each thread's own clock (`CLOCK_THREAD_CPUTIME_ID`) read as it ends: a
/// per-thread profile without `perf` (docs/benchmarks.md, "Big images"). All
/// zeros where the platform has no per-thread clock.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadCpu {
    /// The calling thread, from the start of the conversion to the end of the
    /// writer's `finish`: the writer (placement: dedup index, refcounts, L2
    /// tables) and, without workers (`-m 0`), everything.
    pub writer_ns: u64,
    /// The writer's I/O thread (the output's data writes; 0 without workers).
    pub io_ns: u64,
    /// The workers together (reading the input, zero detection, BLAKE3,
    /// compression).
    pub workers_ns: u64,
    /// Number of workers (0: the sequential converter).
    pub workers: usize,
    /// The page-cache prefetchers that ended during the conversion
    /// ([`crate::io::PREFAULT_CPU_NS`]: process-wide, so conversions running
    /// at the same time in one process count each other's).
    pub prefault_ns: u64,
}

impl ThreadCpu {
    /// All roles together.
    pub fn total_ns(&self) -> u64 {
        self.writer_ns + self.io_ns + self.workers_ns + self.prefault_ns
    }

    /// The writer thread's share of [`ThreadCpu::total_ns`] (0 to 1).
    pub fn writer_share(&self) -> f64 {
        self.writer_ns as f64 / self.total_ns().max(1) as f64
    }

    /// The projected ceiling of the pipeline's speed-up over one core: the
    /// whole work over that of its busiest single thread (the writer or the I/O
    /// thread; the workers and prefetchers are several). No number of cores
    /// makes a conversion faster than its busiest single thread.
    pub fn ceiling(&self) -> f64 {
        let serial = self.writer_ns.max(self.io_ns).max(1);
        self.total_ns() as f64 / serial as f64
    }
}
