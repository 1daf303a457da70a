//! The one conversion from the arguments as typed ([`args`](super::args)) to a
//! validated [`Command`]: library options plus what only the command line needs
//! (report format, quiet, SVG file). It reads and writes nothing, so every
//! argument error is reported before any file is touched.

use std::path::PathBuf;

use anyhow::{bail, Result};
use qdedup::check::RepairMode;
use qdedup::convert::options::parse_size;
use qdedup::format::header::CompressionType;
use qdedup::source::{Format, OpenOptions};
use qdedup::{CheckOptions, CompareOptions, ConvertOptions, EstimateOptions};
use qdedup::{InfoOptions, MapOptions};

pub(crate) use super::args::OutputFormat;
use super::args::{
    BackingChain, CheckArgs, Cli, Cmd, CompareArgs, ConvertArgs, DedupArgs, EstimateArgs,
    ImageArgs, InfoArgs, InputFormat, MapArgs, RepairArg,
};
use super::args::{ChecksumArgs, DigestArg};
use qdedup::checksum::Algorithm;
use qdedup::ChecksumOptions;

/// A subcommand with its options validated.
pub(crate) enum Command {
    Convert(Convert),
    Info(Info),
    Map(Map),
    Compare(Compare),
    Estimate(Estimate),
    Check(Check),
    Demo(Demo),
    Dedup(Dedup),
    Checksum(Checksum),
    /// `-o help` (convert, estimate): list the `-o` options and stop.
    ImageOptionsHelp,
}

/// `qdedup convert`.
pub(crate) struct Convert {
    pub(crate) input: PathBuf,
    pub(crate) output: PathBuf,
    /// Everything but `progress` and `cancel`, which belong to the terminal.
    pub(crate) opts: ConvertOptions,
    /// Nothing printed on success: no progress, no human report (`-q`).
    pub(crate) quiet: bool,
    /// Progress even when stderr is not a terminal (`-p`).
    pub(crate) progress: bool,
    pub(crate) report: OutputFormat,
}

/// `qdedup info`.
pub(crate) struct Info {
    pub(crate) image: PathBuf,
    pub(crate) opts: InfoOptions,
    pub(crate) report: OutputFormat,
}

/// `qdedup map`.
pub(crate) struct Map {
    pub(crate) image: PathBuf,
    /// `shared` is also on when only the SVG picture needs refcounts.
    pub(crate) opts: MapOptions,
    /// The listing shows refcounts (`--shared`).
    pub(crate) list_shared: bool,
    pub(crate) svg: Option<PathBuf>,
    pub(crate) report: OutputFormat,
}

/// `qdedup compare`.
pub(crate) struct Compare {
    pub(crate) a: PathBuf,
    pub(crate) b: PathBuf,
    pub(crate) opts: CompareOptions,
    pub(crate) quiet: bool,
}

/// `qdedup estimate`.
pub(crate) struct Estimate {
    pub(crate) input: PathBuf,
    pub(crate) opts: EstimateOptions,
    pub(crate) report: OutputFormat,
}

/// `qdedup check`.
pub(crate) struct Check {
    pub(crate) image: PathBuf,
    pub(crate) opts: CheckOptions,
    /// No human report (`-q`): the exit code says it.
    pub(crate) quiet: bool,
    pub(crate) report: OutputFormat,
}

/// `qdedup dedup`.
pub(crate) struct Dedup {
    pub(crate) image: PathBuf,
    pub(crate) opts: qdedup::DedupOptions,
    /// No report on success (`-q`).
    pub(crate) quiet: bool,
    pub(crate) report: OutputFormat,
}

/// `qdedup checksum`.
pub(crate) struct Checksum {
    pub(crate) images: Vec<PathBuf>,
    /// Everything but `progress` and `cancel`, which belong to the terminal.
    pub(crate) opts: ChecksumOptions,
    pub(crate) report: OutputFormat,
}

/// `qdedup demo`.
pub(crate) struct Demo {
    /// Bytes of the sample disk.
    pub(crate) size: u64,
    /// The size as typed, for messages.
    pub(crate) size_text: String,
    pub(crate) keep: Option<PathBuf>,
}

impl Command {
    /// Validates the parsed arguments into library options.
    pub(crate) fn from_args(cli: Cli) -> Result<Command> {
        Ok(match cli.cmd {
            Cmd::Convert(a) => match convert(a)? {
                Some(c) => Command::Convert(c),
                None => Command::ImageOptionsHelp,
            },
            Cmd::Info(a) => Command::Info(info(a)),
            Cmd::Map(a) => Command::Map(map(a)),
            Cmd::Compare(a) => Command::Compare(compare(a)),
            Cmd::Estimate(a) => match estimate(a)? {
                Some(e) => Command::Estimate(e),
                None => Command::ImageOptionsHelp,
            },
            Cmd::Check(a) => Command::Check(check(a)?),
            Cmd::Dedup(a) => Command::Dedup(dedup(a)?),
            Cmd::Checksum(a) => Command::Checksum(checksum(a)?),
            Cmd::Demo { size, keep } => Command::Demo(Demo {
                size: parse_size(&size)?,
                size_text: size,
                keep,
            }),
        })
    }
}

fn input_format(f: Option<InputFormat>) -> Option<Format> {
    f.map(|f| match f {
        InputFormat::Raw => Format::Raw,
        InputFormat::Qcow2 => Format::Qcow2,
    })
}

/// Conversion options from `-o`, `-c` and the compression flags; `None` when
/// `-o help` asks for the list of options instead.
fn image_options(a: &ImageArgs) -> Result<Option<ConvertOptions>> {
    if a.options
        .iter()
        .any(|o| o.split(',').any(|i| i.trim() == "help"))
    {
        // Like `qemu-img create -o help`.
        return Ok(None);
    }
    let mut opts = ConvertOptions::default();
    for o in &a.options {
        opts.apply_o(o)?;
    }
    if a.compress && opts.compression.is_none() {
        opts.compression = Some(CompressionType::Zlib);
    }
    if !a.compress && opts.compression.is_some() {
        // compression_type alone only selects the codec, as in qemu-img.
        if opts.compression == Some(CompressionType::Zlib) {
            opts.compression = None;
        } else {
            bail!(
                "-o compression_type=zstd needs -c (this image would have no compressed clusters)"
            );
        }
    }
    opts.compression_level = compression_level(a.compression_level, opts.compression)?;
    opts.compress_probe = !a.no_compress_probe;
    Ok(Some(opts))
}

/// `--compression-level` checked against the codec's range (zlib 0-9, zstd 1-22);
/// refused without `-c`, where it would change nothing.
fn compression_level(level: Option<i32>, codec: Option<CompressionType>) -> Result<Option<i32>> {
    let Some(level) = level else {
        return Ok(None);
    };
    let (name, range) = match codec {
        None => bail!("--compression-level needs -c (without it nothing is compressed)"),
        Some(CompressionType::Zlib) => ("zlib", 0..=9),
        Some(CompressionType::Zstd) => ("zstd", 1..=22),
    };
    if !range.contains(&level) {
        bail!(
            "--compression-level {level} is out of range for {name}: {}-{}",
            range.start(),
            range.end()
        );
    }
    Ok(Some(level))
}

/// Whether qemu-img's output cache mode `-t MODE` syncs the output: `unsafe`
/// does not (qdedup's --no-sync), the others do.
fn cache_syncs(option: &str, mode: &str) -> Result<bool> {
    match mode {
        "unsafe" => Ok(false),
        "none" | "writeback" | "writethrough" | "directsync" => Ok(true),
        _ => bail!(
            "{option} {mode}: unknown cache mode (qemu-img's modes: none, writeback, \
             writethrough, directsync, unsafe)"
        ),
    }
}

fn convert(a: ConvertArgs) -> Result<Option<Convert>> {
    let Some(mut opts) = image_options(&a.image)? else {
        return Ok(None);
    };
    opts.dedup = !a.no_dedup;
    opts.verify = a.verify;
    if let Some(w) = a.workers {
        opts.workers = w;
    }
    opts.max_in_flight = usize::try_from(parse_size(&a.max_in_flight)?)?;
    if opts.max_in_flight == 0 {
        bail!("--max-in-flight 0: give a size of at least 1 byte, e.g. 64M (the default)");
    }
    opts.sync = !a.no_sync;
    // The page cache by default: synced, the writer starts the writeback of
    // what it wrote as it goes (write-behind), which ended sooner than direct
    // I/O's one write at a time on the benchmark VM (docs/benchmarks.md);
    // unsynced (qemu-img's cache=unsafe), the run ends before the device has
    // the data. --direct (and -t none/directsync) choose direct I/O.
    let mut direct = if a.direct {
        Some(true)
    } else if a.no_direct {
        Some(false)
    } else {
        None
    };
    if let Some(mode) = &a.qemu.cache {
        let sync = cache_syncs("-t", mode)?;
        if sync && a.no_sync {
            bail!("-t {mode} syncs the output, --no-sync does not: give one of them");
        }
        opts.sync = sync;
        // As QEMU: `none` and `directsync` bypass the host's page cache
        // (O_DIRECT), the other modes write through it.
        let mode_direct = matches!(mode.as_str(), "none" | "directsync");
        if direct.is_some_and(|d| d != mode_direct) {
            let (flag, how) = if mode_direct {
                ("--no-direct", "with direct I/O")
            } else {
                ("--direct", "through the page cache")
            };
            bail!("-t {mode} writes {how}, {flag} does not: give one of them");
        }
        direct = Some(mode_direct);
    }
    opts.direct_io = direct.unwrap_or(false);
    if let Some(mode) = &a.qemu.src_cache {
        // Checked, then ignored: the input is only read.
        cache_syncs("-T", mode)?;
    }
    opts.force = a.force;
    if let Some(b) = a.qemu.backing {
        match &opts.backing_file {
            Some(o) if *o != b => bail!(
                "-B {} and -o backing_file={} name different backing files: give one",
                b.display(),
                o.display()
            ),
            _ => opts.backing_file = Some(b),
        }
    }
    if let Some(f) = input_format(a.qemu.backing_format) {
        match opts.backing_format {
            Some(o) if o != f => bail!(
                "-F {} and -o backing_fmt={} differ: give one",
                f.name(),
                o.name()
            ),
            _ => opts.backing_format = Some(f),
        }
    }
    if let Some(s) = &a.qemu.sparse_size {
        opts.sparse_size = Some(parse_size(s)?);
    }
    opts.salvage = a.qemu.salvage;
    opts.checksum = a.checksum.map(algorithm);
    opts.validate()?;
    opts.input = OpenOptions {
        format: input_format(a.format),
        backing_chain: a.backing_chain == BackingChain::Full,
        snapshot: a.snapshot,
        force_share: a.force_share,
    };
    Ok(Some(Convert {
        input: a.input,
        output: a.output_image,
        opts,
        quiet: a.quiet,
        progress: a.qemu.progress,
        report: a.output,
    }))
}

fn info(a: InfoArgs) -> Info {
    Info {
        image: a.image,
        opts: InfoOptions {
            format: input_format(a.format),
            force_share: a.force_share,
        },
        report: a.output,
    }
}

fn map(a: MapArgs) -> Map {
    Map {
        image: a.image,
        opts: MapOptions {
            format: input_format(a.format),
            shared: a.shared || a.svg.is_some(),
            force_share: a.force_share,
        },
        list_shared: a.shared,
        svg: a.svg,
        report: a.output,
    }
}

fn compare(a: CompareArgs) -> Compare {
    Compare {
        a: a.a,
        b: a.b,
        opts: CompareOptions {
            format_a: input_format(a.format_a),
            format_b: input_format(a.format_b),
            force_share: a.force_share,
        },
        quiet: a.quiet,
    }
}

fn estimate(a: EstimateArgs) -> Result<Option<Estimate>> {
    let Some(mut opts) = image_options(&a.image)? else {
        return Ok(None);
    };
    if let Some(w) = a.workers {
        opts.workers = w;
    }
    if opts.backing_file.is_some() {
        bail!("estimate does not write overlays: -o backing_file is for convert");
    }
    let mut extra = Vec::new();
    if let Some(list) = &a.cluster_sizes {
        for item in list.split(',').filter(|s| !s.trim().is_empty()) {
            let mut probe = ConvertOptions::default();
            probe.apply_o(&format!("cluster_size={}", item.trim()))?;
            extra.push(probe.cluster_bits);
        }
        // Without -o cluster_size, the first listed size is the primary one.
        if !a.image.options.iter().any(|o| o.contains("cluster_size")) {
            if let Some(&first) = extra.first() {
                opts.cluster_bits = first;
            }
        }
    }
    opts.input = OpenOptions {
        format: input_format(a.format),
        force_share: a.force_share,
        ..OpenOptions::default()
    };
    Ok(Some(Estimate {
        input: a.input,
        opts: EstimateOptions {
            convert: opts,
            extra_cluster_bits: extra,
            sample: a.sample,
            seed: a.seed,
        },
        report: a.output,
    }))
}

fn check(a: CheckArgs) -> Result<Check> {
    if a.force_share && a.repair.is_some() {
        // As qemu-img refuses `-U -r`.
        bail!(
            "-U/--force-share can only be used with read-only checks, not with --repair \
             (qemu-img: force-share=on can only be used with read-only images)"
        );
    }
    Ok(Check {
        image: a.image,
        opts: CheckOptions {
            strict: a.strict,
            repair: a.repair.map(|r| match r {
                RepairArg::Copied => RepairMode::Copied,
                RepairArg::Leaks => RepairMode::Leaks,
                RepairArg::All => RepairMode::All,
            }),
            verify_compressed: !a.no_verify_compressed,
            max_findings: a.max_findings,
            force_share: a.force_share,
        },
        quiet: a.quiet,
        report: a.output,
    })
}

fn dedup(a: DedupArgs) -> Result<Dedup> {
    if a.flush_group == 0 {
        bail!("--flush-group 0: give at least 1 remap per flush group (default 4096)");
    }
    Ok(Dedup {
        image: a.image,
        opts: qdedup::DedupOptions {
            dry_run: a.dry_run,
            compact: a.compact,
            flush_group: a.flush_group,
            sync: !a.no_sync,
            cancel: None,
        },
        quiet: a.quiet,
        report: a.output,
    })
}

fn algorithm(d: DigestArg) -> Algorithm {
    match d {
        DigestArg::Sha256 => Algorithm::Sha256,
        DigestArg::Blake3 => Algorithm::Blake3,
    }
}

fn checksum(a: ChecksumArgs) -> Result<Checksum> {
    let block_size = parse_size(&a.block_size)?;
    qdedup::checksum::check_block_size(block_size)?;
    let mut opts = ChecksumOptions {
        algorithm: algorithm(a.digest),
        block_size,
        input: OpenOptions {
            format: input_format(a.format),
            snapshot: a.snapshot,
            force_share: a.force_share,
            ..OpenOptions::default()
        },
        ..ChecksumOptions::default()
    };
    if let Some(w) = a.workers {
        opts.workers = w;
    }
    Ok(Checksum {
        images: a.images,
        opts,
        report: a.output,
    })
}
