//! The `qdedup` command line: parses arguments, calls the library, prints.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use qdedup::check::{CheckOptions, RepairMode};
use qdedup::convert::{self, ConvertOptions};
use qdedup::format::header::CompressionType;
use qdedup::source::Source;

/// `print!` that ends the process quietly when stdout is closed (e.g. piped into
/// `head`) instead of panicking.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = write!(std::io::stdout().lock(), $($arg)*) {
            stdout_failed(&e);
        }
    }};
}

/// `println!` with the same handling as [`out!`].
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
            stdout_failed(&e);
        }
    }};
}

/// The error and its causes on one line, skipping a cause whose text the line
/// already holds (library I/O errors include their OS error in their message).
fn error_chain(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line
}

fn stdout_failed(e: &std::io::Error) -> ! {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(0);
    }
    eprintln!("qdedup: error: cannot write to stdout: {e}");
    std::process::exit(1);
}

#[derive(Parser)]
#[command(
    name = "qdedup",
    version,
    about = "Deduplicating qcow2 converter and verifier"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum OutputFormat {
    Human,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum InputFormat {
    Raw,
    Qcow2,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum BackingChain {
    Full,
    None,
}

/// How the output image is laid out: shared by `convert` and `estimate`.
#[derive(clap::Args)]
struct ImageArgs {
    /// Compress clusters (codec from -o compression_type, default zlib).
    #[arg(short = 'c', long = "compress")]
    compress: bool,
    /// Compression level (zlib 0-9, zstd 1-22).
    #[arg(long)]
    compression_level: Option<i32>,
    /// Try deflate on every distinct cluster, also those the incompressibility
    /// probe would store plain untried (slower on random data; rarely smaller).
    #[arg(long)]
    no_compress_probe: bool,
    /// qemu-img style options: cluster_size=64k,refcount_bits=16,compression_type=zlib|zstd.
    #[arg(short = 'o', value_name = "OPTIONS")]
    options: Vec<String>,
}

impl ImageArgs {
    /// Conversion options from `-o`, `-c` and the compression flags.
    fn options(&self) -> Result<ConvertOptions> {
        let mut opts = ConvertOptions::default();
        if self
            .options
            .iter()
            .any(|o| o.split(',').any(|i| i.trim() == "help"))
        {
            // Like `qemu-img create -o help`: list the options and stop.
            for (k, what) in qdedup::convert::O_OPTIONS {
                println!("{k:<18} {what}");
            }
            std::process::exit(0);
        }
        for o in &self.options {
            opts.apply_o(o)?;
        }
        if self.compress && opts.compression.is_none() {
            opts.compression = Some(CompressionType::Zlib);
        }
        if !self.compress && opts.compression.is_some() {
            // compression_type alone only selects the codec, as in qemu-img.
            if opts.compression == Some(CompressionType::Zlib) {
                opts.compression = None;
            } else {
                anyhow::bail!(
                    "-o compression_type=zstd needs -c (this image would have no compressed clusters)"
                );
            }
        }
        opts.compression_level = self.compression_level;
        opts.compress_probe = !self.no_compress_probe;
        Ok(opts)
    }
}

#[derive(clap::Args)]
struct ConvertArgs {
    /// Input format (probed when omitted).
    #[arg(short = 'f', long = "format", value_enum)]
    format: Option<InputFormat>,
    /// Read through the backing chain (full, default) or the top layer alone (none).
    #[arg(long, value_enum, default_value = "full")]
    backing_chain: BackingChain,
    /// Convert this snapshot's view (ID or name) instead of the active layer.
    #[arg(short = 'l', long = "snapshot", value_name = "ID|NAME")]
    snapshot: Option<String>,
    /// Output format; only qcow2 (accepted for qemu-img compatibility).
    #[arg(short = 'O', value_parser = ["qcow2"], default_value = "qcow2")]
    out_format: String,
    #[command(flatten)]
    image: ImageArgs,
    /// Store every cluster, even when its content was already written.
    #[arg(long)]
    no_dedup: bool,
    /// Hash/compress worker threads (default: available cores; 0 = sequential).
    #[arg(short = 'm', long = "workers")]
    workers: Option<usize>,
    /// Guest bytes in flight in the pipeline, e.g. 64M.
    #[arg(long, default_value = "64M")]
    max_in_flight: String,
    /// Do not fsync the output (like qemu-img convert's default cache=unsafe).
    #[arg(long)]
    no_sync: bool,
    /// Replace OUT if it exists.
    #[arg(long)]
    force: bool,
    /// No progress bar.
    #[arg(short, long)]
    quiet: bool,
    /// Report format.
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    /// Input image.
    input: PathBuf,
    /// Output qcow2 image.
    output_image: PathBuf,
}

#[derive(clap::Args)]
struct InfoArgs {
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format", value_enum)]
    format: Option<InputFormat>,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    /// Image.
    image: PathBuf,
}

#[derive(clap::Args)]
struct MapArgs {
    /// Image format (probed when omitted).
    #[arg(short = 'f', long = "format", value_enum)]
    format: Option<InputFormat>,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    /// Add the refcount of each extent's host cluster (extents split where it changes).
    #[arg(long)]
    shared: bool,
    /// Also draw the image (zero / unique / shared / compressed) into this SVG file.
    #[arg(long, value_name = "FILE")]
    svg: Option<PathBuf>,
    /// Image.
    image: PathBuf,
}

#[derive(clap::Args)]
struct CompareArgs {
    /// Format of the first image (probed when omitted).
    #[arg(short = 'f', value_enum)]
    format_a: Option<InputFormat>,
    /// Format of the second image (probed when omitted).
    #[arg(short = 'F', value_enum)]
    format_b: Option<InputFormat>,
    /// Print nothing; the exit code says it all (0 same, 1 different, 2 error).
    #[arg(short, long)]
    quiet: bool,
    /// First image.
    a: PathBuf,
    /// Second image.
    b: PathBuf,
}

#[derive(clap::Args)]
struct EstimateArgs {
    /// Input format (probed when omitted).
    #[arg(short = 'f', long = "format", value_enum)]
    format: Option<InputFormat>,
    #[command(flatten)]
    image: ImageArgs,
    /// Tabulate several cluster sizes in one pass, e.g. 4k,64k,2m.
    #[arg(long, value_name = "LIST")]
    cluster_sizes: Option<String>,
    /// Read only this fraction of the input (e.g. 0.05) and estimate with an interval.
    #[arg(long, value_name = "P")]
    sample: Option<f64>,
    /// Seed of --sample.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Hash/compress worker threads (default: available cores; 0 = sequential).
    #[arg(short = 'm', long = "workers")]
    workers: Option<usize>,
    /// Output format.
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    /// Input image.
    input: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum RepairArg {
    /// Set COPIED on active entries with refcount 1, clear it where the refcount is not 1.
    Copied,
    /// Lower stored refcounts that exceed the number of references.
    Leaks,
    /// Both (leaks first).
    All,
}

#[derive(clap::Args)]
struct CheckArgs {
    /// Report format.
    #[arg(long, value_enum, default_value = "human")]
    output: OutputFormat,
    /// Count refcount-1 entries without COPIED as corruptions (qemu-img's rule).
    #[arg(long)]
    strict: bool,
    /// Repair in place what is safe to repair (refused if other corruptions exist).
    #[arg(short = 'r', long, value_enum)]
    repair: Option<RepairArg>,
    /// Do not decompress compressed clusters (faster; qemu-img check does not either).
    #[arg(long)]
    no_verify_compressed: bool,
    /// List at most this many findings (the counts stay exact).
    #[arg(long, default_value_t = 1000)]
    max_findings: usize,
    /// The qcow2 image to check.
    image: PathBuf,
}

#[derive(Subcommand)]
enum Cmd {
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

fn fmt_of(f: Option<InputFormat>) -> Option<qdedup::source::Format> {
    f.map(|f| match f {
        InputFormat::Raw => qdedup::source::Format::Raw,
        InputFormat::Qcow2 => qdedup::source::Format::Qcow2,
    })
}

fn run_info(a: &InfoArgs) -> Result<ExitCode> {
    let info = qdedup::inspect::info::info(&a.image, fmt_of(a.format))
        .with_context(|| format!("cannot describe {}", a.image.display()))?;
    match a.output {
        OutputFormat::Human => outln!("{info}"),
        OutputFormat::Json => outln!("{}", serde_json::to_string_pretty(&info)?),
    }
    Ok(ExitCode::SUCCESS)
}

fn run_map(a: &MapArgs) -> Result<ExitCode> {
    use qdedup::inspect::map;
    let opts = map::MapOptions {
        format: fmt_of(a.format),
        shared: a.shared || a.svg.is_some(),
    };
    let mut m =
        map::map(&a.image, &opts).with_context(|| format!("cannot map {}", a.image.display()))?;
    if let Some(svg) = &a.svg {
        let size = m.entries.last().map_or(0, |e| e.start + e.length);
        let pic = qdedup::inspect::svg::render(&m.entries, size, &a.image.display().to_string());
        std::fs::write(svg, pic).with_context(|| format!("cannot write {}", svg.display()))?;
        if !a.shared {
            // The picture needed refcounts; the listing did not ask for them.
            m = map::map(
                &a.image,
                &map::MapOptions {
                    shared: false,
                    ..opts
                },
            )?;
        }
    }
    match a.output {
        OutputFormat::Human => out!("{}", map::to_human(&m, a.shared)),
        OutputFormat::Json => outln!("{}", map::to_json(&m.entries)),
    }
    Ok(ExitCode::SUCCESS)
}

fn run_compare(a: &CompareArgs) -> ExitCode {
    use qdedup::inspect::compare;
    let opts = compare::CompareOptions {
        format_a: fmt_of(a.format_a),
        format_b: fmt_of(a.format_b),
    };
    match compare::compare(&a.a, &a.b, &opts) {
        Ok(r) => {
            // Like qemu-img, the warning comes once the common part compared equal.
            let common_equal = r.mismatch_offset.is_none_or(|o| o >= r.common_size);
            if !a.quiet && r.size_mismatch && common_equal {
                outln!("Warning: Image size mismatch!");
            }
            if let Some(o) = r.mismatch_offset {
                if !a.quiet {
                    outln!("Content mismatch at offset {o}!");
                }
                ExitCode::from(1)
            } else {
                if !a.quiet {
                    outln!("Images are identical.");
                }
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("qdedup: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn run_estimate(a: &EstimateArgs) -> Result<ExitCode> {
    use qdedup::inspect::estimate;
    let mut opts = a.image.options()?;
    if let Some(w) = a.workers {
        opts.workers = w;
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
    let src = qdedup::source::open(
        &a.input,
        &qdedup::source::OpenOptions {
            format: fmt_of(a.format),
            ..Default::default()
        },
    )
    .with_context(|| format!("cannot open input {}", a.input.display()))?;
    let eopts = estimate::EstimateOptions {
        convert: opts,
        extra_cluster_bits: extra,
        sample: a.sample,
        seed: a.seed,
    };
    let r = estimate::estimate(src.as_ref(), &eopts)
        .with_context(|| format!("cannot estimate {}", a.input.display()))?;
    match a.output {
        OutputFormat::Human => outln!("{r}"),
        OutputFormat::Json => outln!("{}", serde_json::to_string_pretty(&r)?),
    }
    Ok(ExitCode::SUCCESS)
}

fn open_source(a: &ConvertArgs) -> Result<Box<dyn Source>> {
    let opts = qdedup::source::OpenOptions {
        format: a.format.map(|f| match f {
            InputFormat::Raw => qdedup::source::Format::Raw,
            InputFormat::Qcow2 => qdedup::source::Format::Qcow2,
        }),
        backing_chain: a.backing_chain == BackingChain::Full,
        snapshot: a.snapshot.clone(),
    };
    qdedup::source::open(&a.input, &opts)
        .with_context(|| format!("cannot open input {}", a.input.display()))
}

fn progress_bar(quiet: bool) -> Option<indicatif::ProgressBar> {
    if quiet || !std::io::stderr().is_terminal() {
        return None;
    }
    let pb = indicatif::ProgressBar::new(0);
    pb.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .expect("valid template"),
    );
    Some(pb)
}

/// Ctrl-C (SIGINT) and SIGTERM set the returned flag: the conversion stops at the
/// next batch and removes its temporary file. A second Ctrl-C exits at once.
/// SIGXFSZ is caught too, so that a file size limit makes writes fail with EFBIG
/// (reported, temporary file removed) instead of killing the process.
fn install_signal_handlers() -> Arc<AtomicBool> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGXFSZ};
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [SIGINT, SIGTERM] {
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, flag.clone());
        let _ = signal_hook::flag::register(sig, flag.clone());
    }
    let _ = signal_hook::flag::register(SIGXFSZ, Arc::new(AtomicBool::new(false)));
    flag
}

fn run_convert(a: &ConvertArgs) -> Result<ExitCode> {
    let mut opts = a.image.options()?;
    opts.dedup = !a.no_dedup;
    if let Some(w) = a.workers {
        opts.workers = w;
    }
    opts.max_in_flight = usize::try_from(convert::options::parse_size(&a.max_in_flight)?)?;
    opts.sync = !a.no_sync;
    opts.force = a.force;
    let pb = progress_bar(a.quiet);
    if let Some(pb) = &pb {
        let pb = pb.clone();
        opts.progress = Some(Arc::new(move |done, total| {
            pb.set_length(total);
            pb.set_position(done);
        }));
    }
    opts.cancel = Some(install_signal_handlers());
    let src = open_source(a)?;
    let report = convert::convert(&a.input, &a.output_image, src.as_ref(), &opts);
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let report = match report {
        Err(qdedup::Error::Interrupted) => {
            eprintln!("qdedup: interrupted; no output written");
            return Ok(ExitCode::from(130));
        }
        r => r.with_context(|| format!("cannot convert {}", a.input.display()))?,
    };
    match a.output {
        OutputFormat::Human => outln!("{report}"),
        OutputFormat::Json => outln!("{}", serde_json::to_string_pretty(&report)?),
    }
    Ok(ExitCode::SUCCESS)
}

fn run_check(a: &CheckArgs) -> Result<ExitCode> {
    let opts = CheckOptions {
        strict: a.strict,
        repair: a.repair.map(|r| match r {
            RepairArg::Copied => RepairMode::Copied,
            RepairArg::Leaks => RepairMode::Leaks,
            RepairArg::All => RepairMode::All,
        }),
        verify_compressed: !a.no_verify_compressed,
        max_findings: a.max_findings,
    };
    let report = qdedup::check::check_file(&a.image, &opts)
        .with_context(|| format!("cannot check {}", a.image.display()))?;
    match a.output {
        OutputFormat::Human => {
            // Like qemu-img check: details on stderr, the summary on stdout.
            eprint!("{}", report.human_findings());
            out!("{}", report.human_summary());
        }
        OutputFormat::Json => outln!("{}", serde_json::to_string_pretty(&report)?),
    }
    // exit_code() is 0..=3.
    Ok(ExitCode::from(report.exit_code() as u8))
}

fn run_qemu(args: &[&std::ffi::OsStr]) -> Option<(bool, String)> {
    let out = Command::new("qemu-img").args(args).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Some((out.status.success(), text))
}

fn run_demo(size: &str, keep: Option<&Path>) -> Result<ExitCode> {
    let size = convert::options::parse_size(size)?;
    let tmp;
    let dir = if let Some(k) = keep {
        std::fs::create_dir_all(k)?;
        k.to_path_buf()
    } else {
        tmp = tempfile::tempdir()?;
        tmp.path().to_path_buf()
    };
    let input = dir.join("sample.raw");
    let output = dir.join("sample.qcow2");
    outln!(
        "generating a {} MiB sample disk (zeros, repeated blocks, text, random) ...",
        size >> 20
    );
    qdedup::sample::generate(&input, size, 42, qdedup::sample::Mix::MIXED)?;
    let src = qdedup::source::raw::RawSource::open(&input)?;
    let opts = ConvertOptions {
        force: true,
        ..ConvertOptions::default()
    };
    let report = convert::convert(&input, &output, &src, &opts)?;
    outln!("{report}");
    let (i, o) = (input.as_os_str(), output.as_os_str());
    if let Some((ok, text)) = run_qemu(&["check".as_ref(), o]) {
        let verdict = if ok { "clean" } else { "FAILED" };
        outln!("\nqemu-img check: {verdict}\n{text}");
    } else {
        outln!("\nqemu-img not found: install qemu-utils to verify the output with QEMU");
    }
    if let Some((ok, text)) = run_qemu(&[
        "compare".as_ref(),
        "-f".as_ref(),
        "raw".as_ref(),
        "-F".as_ref(),
        "qcow2".as_ref(),
        i,
        o,
    ]) {
        outln!(
            "qemu-img compare: {} ({text})",
            if ok { "identical" } else { "DIFFERENT" }
        );
        if !ok {
            return Ok(ExitCode::FAILURE);
        }
    }
    if keep.is_some() {
        outln!("files kept in {}", dir.display());
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match &cli.cmd {
        Cmd::Convert(a) => run_convert(a),
        Cmd::Check(a) => run_check(a),
        Cmd::Demo { size, keep } => run_demo(size, keep.as_deref()),
        Cmd::Info(a) => run_info(a),
        Cmd::Map(a) => run_map(a),
        Cmd::Compare(a) => return run_compare(a),
        Cmd::Estimate(a) => run_estimate(a),
    };
    match r {
        Ok(c) => c,
        Err(e) => {
            eprintln!("qdedup: error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
