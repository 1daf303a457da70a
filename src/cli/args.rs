//! The command line as typed: flat clap structs that mirror the flags, one per
//! subcommand. Nothing here is validated beyond what clap checks;
//! [`Command::from_args`](super::command::Command::from_args) turns them into
//! library options.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "qdedup",
    version,
    about = "Deduplicating qcow2 converter and verifier"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum OutputFormat {
    Human,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum InputFormat {
    Raw,
    Qcow2,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub(crate) enum BackingChain {
    Full,
    None,
}

/// How the output image is laid out: shared by `convert` and `estimate`.
#[derive(clap::Args)]
pub(crate) struct ImageArgs {
    /// Compress clusters (codec from -o compression_type, default zlib).
    #[arg(short = 'c', long = "compress")]
    pub(crate) compress: bool,
    /// Compression level (zlib 0-9, default 5; zstd 1-22, default 3; needs -c).
    #[arg(long, allow_negative_numbers = true)]
    pub(crate) compression_level: Option<i32>,
    /// Try deflate on every distinct cluster, also those the incompressibility
    /// probe would store plain untried (slower on random data; rarely smaller).
    #[arg(long)]
    pub(crate) no_compress_probe: bool,
    /// qemu-img style options: cluster_size=64k,refcount_bits=16,compression_type=zlib|zstd.
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub(crate) options: Vec<String>,
}

#[derive(clap::Args)]
pub(crate) struct ConvertArgs {
    /// Input format (probed when omitted).
    #[arg(short = 'f', long = "format", value_enum)]
    pub(crate) format: Option<InputFormat>,
    /// Open the image even if another process (a running VM) writes it, as
    /// qemu-img's -U: take only shared locks (what is read may be inconsistent).
    #[arg(short = 'U', long = "force-share")]
    pub(crate) force_share: bool,
    /// Read through the backing chain (full, default) or the top layer alone (none).
    #[arg(long, value_enum, default_value = "full")]
    pub(crate) backing_chain: BackingChain,
    /// Convert this snapshot's view instead of the active layer: ID or name (ID
    /// first), or qemu-img's snapshot.id=ID / snapshot.name=NAME.
    #[arg(short = 'l', long = "snapshot", value_name = "SNAPSHOT")]
    pub(crate) snapshot: Option<String>,
    /// Output format; only qcow2 (accepted for qemu-img compatibility).
    #[arg(short = 'O', value_parser = ["qcow2"], default_value = "qcow2")]
    pub(crate) out_format: String,
    #[command(flatten)]
    pub(crate) image: ImageArgs,
    /// Store every cluster, even when its content was already written.
    #[arg(long)]
    pub(crate) no_dedup: bool,
    /// Compare bytes before sharing a cluster with an earlier copy (read back
    /// from the output, like ZFS's dedup=verify); without it a match is trusted
    /// on 96 bits of BLAKE3.
    #[arg(long)]
    pub(crate) verify: bool,
    /// Hash/compress worker threads (default: available cores; 0 = sequential).
    #[arg(short = 'm', long = "workers")]
    pub(crate) workers: Option<usize>,
    /// Guest bytes in flight in the pipeline, e.g. 64M.
    #[arg(long, default_value = "64M")]
    pub(crate) max_in_flight: String,
    /// Do not fsync the output (like qemu-img convert's default cache=unsafe).
    #[arg(long)]
    pub(crate) no_sync: bool,
    /// Write the output's data through the page cache (the default; a synced
    /// conversion starts writing it back to the device as it goes).
    #[arg(long, conflicts_with = "direct")]
    pub(crate) no_direct: bool,
    /// Write the output's data with direct I/O (O_DIRECT, where the file system
    /// allows it): less CPU, each write waits for the device.
    #[arg(long)]
    pub(crate) direct: bool,
    /// Replace OUT if it exists.
    #[arg(long)]
    pub(crate) force: bool,
    /// Print nothing on success, as qemu-img -q (no progress, no report, JSON
    /// included).
    #[arg(short, long)]
    pub(crate) quiet: bool,
    /// Report format.
    #[arg(long, value_enum, default_value = "human")]
    pub(crate) output: OutputFormat,
    /// Also print the blkhash digest of the input's guest content (blake3 when
    /// no DIGEST is given: almost free), as `qdedup checksum` prints it.
    #[arg(
        long,
        value_enum,
        value_name = "DIGEST",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "blake3"
    )]
    pub(crate) checksum: Option<DigestArg>,
    #[command(flatten)]
    pub(crate) qemu: QemuImgConvertArgs,
    /// Input image.
    pub(crate) input: PathBuf,
    /// Output qcow2 image.
    pub(crate) output_image: PathBuf,
}

/// qemu-img convert's options that qdedup takes as qemu-img users type them.
/// Those it cannot honour are refused by name ([`super::qemu_img`]).
#[derive(clap::Args)]
pub(crate) struct QemuImgConvertArgs {
    /// Show progress even when stderr is not a terminal (as qemu-img -p).
    #[arg(short = 'p')]
    pub(crate) progress: bool,
    /// Output cache mode, as qemu-img: none, directsync = sync the output and
    /// write its data with direct I/O (--direct); writeback, writethrough =
    /// sync it, data through the page cache (the default); unsafe = neither
    /// (--no-sync).
    #[arg(short = 't', value_name = "CACHE")]
    pub(crate) cache: Option<String>,
    /// Source cache mode (qemu-img -T): accepted and ignored, the input is only read.
    #[arg(short = 'T', value_name = "SRC_CACHE")]
    pub(crate) src_cache: Option<String>,
    /// Out-of-order writes (qemu-img -W): accepted and ignored, qdedup orders its
    /// writes itself.
    #[arg(short = 'W')]
    pub(crate) out_of_order: bool,
    /// Write an overlay on this backing file (qemu-img's -B, or -b/--backing):
    /// clusters equal to its content stay unallocated. The name is stored as
    /// given; a relative one is relative to OUT's directory.
    #[arg(
        short = 'B',
        long = "backing",
        visible_short_alias = 'b',
        value_name = "BACKING"
    )]
    pub(crate) backing: Option<PathBuf>,
    /// Format of the backing file: raw or qcow2 (probed when omitted).
    #[arg(short = 'F', long = "backing-format", value_enum, value_name = "FMT")]
    pub(crate) backing_format: Option<InputFormat>,
    /// qemu-img's sparse size: 0 stores every cluster (zero clusters too, shared
    /// by dedup); other sizes up to the cluster size change nothing (qdedup
    /// decides per cluster).
    #[arg(short = 'S', long = "sparse-size", value_name = "SIZE")]
    pub(crate) sparse_size: Option<String>,
    /// Convert what cannot be read from the input (a read error, a table or
    /// cluster past the end of a truncated file) as zeros, and list the ranges in
    /// the report, instead of failing (as qemu-img --salvage).
    #[arg(long)]
    pub(crate) salvage: bool,
}

#[derive(clap::Args)]
pub(crate) struct InfoArgs {
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format", value_enum)]
    pub(crate) format: Option<InputFormat>,
    /// Open the image even if another process (a running VM) writes it, as
    /// qemu-img's -U: take only shared locks (what is read may be inconsistent).
    #[arg(short = 'U', long = "force-share")]
    pub(crate) force_share: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    pub(crate) output: OutputFormat,
    /// Image.
    pub(crate) image: PathBuf,
}

#[derive(clap::Args)]
pub(crate) struct MapArgs {
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format", value_enum)]
    pub(crate) format: Option<InputFormat>,
    /// Open the image even if another process (a running VM) writes it, as
    /// qemu-img's -U: take only shared locks (what is read may be inconsistent).
    #[arg(short = 'U', long = "force-share")]
    pub(crate) force_share: bool,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    pub(crate) output: OutputFormat,
    /// Add the refcount of each extent's host cluster (extents split where it changes).
    #[arg(long)]
    pub(crate) shared: bool,
    /// Also draw the image (zero / unique / shared / compressed) into this SVG file.
    #[arg(long, value_name = "FILE")]
    pub(crate) svg: Option<PathBuf>,
    /// Image.
    pub(crate) image: PathBuf,
}

#[derive(clap::Args)]
pub(crate) struct CompareArgs {
    /// Format of the first image (probed when omitted).
    #[arg(short = 'f', value_enum)]
    pub(crate) format_a: Option<InputFormat>,
    /// Format of the second image (probed when omitted).
    #[arg(short = 'F', value_enum)]
    pub(crate) format_b: Option<InputFormat>,
    /// Open the images even if another process (a running VM) writes it, as
    /// qemu-img's -U: take only shared locks (what is read may be inconsistent).
    #[arg(short = 'U', long = "force-share")]
    pub(crate) force_share: bool,
    /// Print nothing; the exit code says it all (0 same, 1 different, 2 error).
    #[arg(short, long)]
    pub(crate) quiet: bool,
    /// First image.
    pub(crate) a: PathBuf,
    /// Second image.
    pub(crate) b: PathBuf,
}

#[derive(clap::Args)]
pub(crate) struct EstimateArgs {
    /// Input format (probed when omitted).
    #[arg(short = 'f', long = "format", value_enum)]
    pub(crate) format: Option<InputFormat>,
    /// Open the image even if another process (a running VM) writes it, as
    /// qemu-img's -U: take only shared locks (what is read may be inconsistent).
    #[arg(short = 'U', long = "force-share")]
    pub(crate) force_share: bool,
    #[command(flatten)]
    pub(crate) image: ImageArgs,
    /// Tabulate several cluster sizes in one pass, e.g. 4k,64k,2m.
    #[arg(long, value_name = "LIST")]
    pub(crate) cluster_sizes: Option<String>,
    /// Compress only this fraction of the distinct contents (e.g. 0.05, chosen by
    /// content hash) and estimate the compressed size with a 95% interval; the
    /// input is still read and hashed whole, so the counts stay exact.
    #[arg(long, value_name = "P")]
    pub(crate) sample: Option<f64>,
    /// Seed of --sample.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// Hash/compress worker threads (default: available cores; 0 = sequential).
    #[arg(short = 'm', long = "workers")]
    pub(crate) workers: Option<usize>,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    pub(crate) output: OutputFormat,
    /// Input image.
    pub(crate) input: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum RepairArg {
    /// Set COPIED on active entries with refcount 1, clear it where the refcount is not 1.
    Copied,
    /// Lower stored refcounts that exceed the number of references.
    Leaks,
    /// Both (leaks first).
    All,
}

#[derive(clap::Args)]
pub(crate) struct CheckArgs {
    /// Report format.
    #[arg(long, value_enum, default_value = "human")]
    pub(crate) output: OutputFormat,
    /// Count refcount-1 entries without COPIED as corruptions (qemu-img's rule).
    #[arg(long)]
    pub(crate) strict: bool,
    /// Repair in place what is safe to repair (refused if other corruptions exist).
    #[arg(short = 'r', long, value_enum)]
    pub(crate) repair: Option<RepairArg>,
    /// Open the image even if another process (a running VM) writes it, as
    /// qemu-img's -U: take only shared locks (what is read may be inconsistent).
    /// Not with --repair.
    #[arg(short = 'U', long = "force-share")]
    pub(crate) force_share: bool,
    /// Do not decompress compressed clusters (faster; qemu-img check does not either).
    #[arg(long)]
    pub(crate) no_verify_compressed: bool,
    /// Print nothing but errors, as qemu-img check -q (the exit code is the
    /// verdict; JSON included, as qemu-img check -q --output=json).
    #[arg(short, long)]
    pub(crate) quiet: bool,
    /// List at most this many findings (the counts stay exact).
    #[arg(long, default_value_t = 1000)]
    pub(crate) max_findings: usize,
    /// The qcow2 image to check.
    pub(crate) image: PathBuf,
}

#[derive(clap::Args)]
pub(crate) struct DedupArgs {
    /// Report what would be saved; write nothing.
    #[arg(short = 'n', long)]
    pub(crate) dry_run: bool,
    /// Also move clusters from the end of the file into the freed space and cut
    /// the file, so that its size shrinks too.
    #[arg(long)]
    pub(crate) compact: bool,
    /// Remaps (or moves) per flush group; each group costs four syncs.
    #[arg(long, default_value_t = 4096, value_name = "N")]
    pub(crate) flush_group: usize,
    /// Do not fsync between the steps of a group (the order still holds for a
    /// killed process, not for a power loss).
    #[arg(long)]
    pub(crate) no_sync: bool,
    /// Print nothing on success, as qemu-img -q (no report, JSON included;
    /// errors still go to stderr).
    #[arg(short, long)]
    pub(crate) quiet: bool,
    /// Report format.
    #[arg(long, value_enum, default_value = "human")]
    pub(crate) output: OutputFormat,
    /// The qcow2 image to deduplicate in place.
    pub(crate) image: PathBuf,
}

/// A blkhash hash function, as `blksum -d` names it.
#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum DigestArg {
    Sha256,
    Blake3,
}

#[derive(clap::Args)]
pub(crate) struct ChecksumArgs {
    /// Hash function (blksum's default is sha256).
    #[arg(short = 'd', long = "digest", value_enum, default_value = "sha256")]
    pub(crate) digest: DigestArg,
    /// Block size, e.g. 64k (blkhash's default; another size gives another digest).
    #[arg(long, default_value = "64k")]
    pub(crate) block_size: String,
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format", value_enum)]
    pub(crate) format: Option<InputFormat>,
    /// Hash this snapshot's view instead of the active layer: ID or name (ID
    /// first), or qemu-img's snapshot.id=ID / snapshot.name=NAME.
    #[arg(short = 'l', long = "snapshot", value_name = "SNAPSHOT")]
    pub(crate) snapshot: Option<String>,
    /// Open the image even if another process (a running VM) writes it, as
    /// qemu-img's -U: take only shared locks (what is read may be inconsistent).
    #[arg(short = 'U', long = "force-share")]
    pub(crate) force_share: bool,
    /// Hashing threads (default: available cores; 0 = this thread only).
    #[arg(short = 'm', long = "workers")]
    pub(crate) workers: Option<usize>,
    /// Report format (human: `DIGEST  IMAGE` lines, as blksum and sha256sum).
    #[arg(long, value_enum, default_value = "human")]
    pub(crate) output: OutputFormat,
    /// Images.
    #[arg(required = true)]
    pub(crate) images: Vec<PathBuf>,
}

#[derive(Subcommand)]
pub(crate) enum Cmd {
    /// Convert an image to a deduplicated qcow2 v3 image.
    Convert(ConvertArgs),
    /// Describe an image like `qemu-img info`, plus dedup figures.
    Info(InfoArgs),
    /// Show the guest-to-host mapping like `qemu-img map`.
    Map(MapArgs),
    /// Compare the guest contents of two images like `qemu-img compare`.
    Compare(CompareArgs),
    /// Predict the size of a conversion (and of `qemu-img convert`) without writing.
    Estimate(EstimateArgs),
    /// Check a qcow2 image like qemu-img check (exit 0 clean, 1 check failed,
    /// 2 corruptions, 3 leaks only).
    Check(CheckArgs),
    /// Deduplicate a qcow2 image in place: identical clusters of the active layer
    /// share one host cluster, the others are freed (crash-safe; QEMU's write lock).
    Dedup(DedupArgs),
    /// Print blkhash digests of the images' guest content, as blksum does
    /// (`DIGEST  IMAGE`); a qcow2 image and a raw image with the same content
    /// have the same digest.
    Checksum(ChecksumArgs),
    /// Generate a sample disk image, convert it and verify the result with qemu-img.
    Demo {
        /// Size of the sample image, e.g. 256M.
        #[arg(long, default_value = "256M")]
        size: String,
        /// Keep the sample and output in this directory instead of a temporary one.
        #[arg(long)]
        keep: Option<PathBuf>,
    },
}
