//! The `qdedup` command line: parses the arguments ([`cli::args`]), converts
//! them once into library options ([`cli::command`]), calls the library, prints
//! the report and picks the exit code.

mod cli;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use qdedup::source::{Format, Input, OpenOptions};
use qdedup::ConvertOptions;

use cli::args::Cli;
use cli::command::{self, Command, OutputFormat};

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

/// `-o help`: the options `-o` takes, like `qemu-img create -o help`.
fn run_image_options_help() -> ExitCode {
    for (k, what) in qdedup::convert::O_OPTIONS {
        outln!("{k:<18} {what}");
    }
    ExitCode::SUCCESS
}

fn run_info(c: &command::Info) -> Result<ExitCode> {
    let info = qdedup::info(&c.image, &c.opts)
        .with_context(|| format!("cannot describe {}", c.image.display()))?;
    match c.report {
        OutputFormat::Human => outln!("{info}"),
        OutputFormat::Json => outln!("{}", serde_json::to_string_pretty(&info)?),
    }
    Ok(ExitCode::SUCCESS)
}

fn run_map(c: &command::Map) -> Result<ExitCode> {
    use qdedup::inspect::map;
    let mut m = qdedup::map(&c.image, &c.opts)
        .with_context(|| format!("cannot map {}", c.image.display()))?;
    if let Some(svg) = &c.svg {
        let size = m.entries.last().map_or(0, |e| e.start + e.length);
        let pic = qdedup::inspect::svg::render(&m.entries, size, &c.image.display().to_string());
        std::fs::write(svg, pic).with_context(|| format!("cannot write {}", svg.display()))?;
        if !c.list_shared {
            // The picture needed refcounts; the listing did not ask for them.
            m = qdedup::map(
                &c.image,
                &qdedup::MapOptions {
                    shared: false,
                    ..c.opts.clone()
                },
            )?;
        }
    }
    match c.report {
        OutputFormat::Human => out!("{}", map::to_human(&m, c.list_shared)),
        OutputFormat::Json => outln!("{}", map::to_json(&m.entries)),
    }
    Ok(ExitCode::SUCCESS)
}

fn run_compare(c: &command::Compare) -> ExitCode {
    match qdedup::compare(&c.a, &c.b, &c.opts) {
        Ok(r) => {
            // Like qemu-img, the warning comes once the common part compared equal.
            let common_equal = r.mismatch_offset.is_none_or(|o| o >= r.common_size);
            if !c.quiet && r.size_mismatch && common_equal {
                outln!("Warning: Image size mismatch!");
            }
            if let Some(o) = r.mismatch_offset {
                if !c.quiet {
                    outln!("Content mismatch at offset {o}!");
                }
                ExitCode::from(1)
            } else {
                if !c.quiet {
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

fn run_estimate(c: &command::Estimate) -> Result<ExitCode> {
    let src = qdedup::source::open(&c.input, &c.opts.convert.input)
        .with_context(|| format!("cannot open input {}", c.input.display()))?;
    let r = qdedup::estimate_source(src.as_ref(), &c.opts)
        .with_context(|| format!("cannot estimate {}", c.input.display()))?;
    match c.report {
        OutputFormat::Human => outln!("{r}"),
        OutputFormat::Json => outln!("{}", serde_json::to_string_pretty(&r)?),
    }
    Ok(ExitCode::SUCCESS)
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

fn run_convert(c: &command::Convert) -> Result<ExitCode> {
    let mut opts = c.opts.clone();
    let pb = progress_bar(c.quiet);
    if let Some(pb) = &pb {
        let pb = pb.clone();
        opts.progress = Some(Arc::new(move |done, total| {
            pb.set_length(total);
            pb.set_position(done);
        }));
    }
    opts.cancel = Some(install_signal_handlers());
    let input = Input::open(&c.input, &opts.input)
        .with_context(|| format!("cannot open input {}", c.input.display()))?;
    let report = qdedup::convert::convert_input(&input, &c.output, &opts);
    if let Some(pb) = pb {
        pb.finish_and_clear();
    }
    let report = match report {
        Err(qdedup::Error::Interrupted) => {
            eprintln!("qdedup: interrupted; no output written");
            return Ok(ExitCode::from(130));
        }
        r => r.with_context(|| format!("cannot convert {}", c.input.display()))?,
    };
    match c.report {
        OutputFormat::Human => outln!("{report}"),
        OutputFormat::Json => outln!("{}", serde_json::to_string_pretty(&report)?),
    }
    Ok(ExitCode::SUCCESS)
}

fn run_check(c: &command::Check) -> Result<ExitCode> {
    let report = qdedup::check(&c.image, &c.opts)
        .with_context(|| format!("cannot check {}", c.image.display()))?;
    match c.report {
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
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    Some((out.status.success(), text))
}

fn run_demo(c: &command::Demo) -> Result<ExitCode> {
    let (size, keep) = (c.size, c.keep.as_deref());
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
    let opts = ConvertOptions {
        input: OpenOptions {
            format: Some(Format::Raw),
            ..OpenOptions::default()
        },
        force: true,
        ..ConvertOptions::default()
    };
    let report = qdedup::convert(&input, &output, &opts)?;
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
    let r = Command::from_args(Cli::parse()).and_then(|cmd| match &cmd {
        Command::Convert(c) => run_convert(c),
        Command::Check(c) => run_check(c),
        Command::Demo(c) => run_demo(c),
        Command::Info(c) => run_info(c),
        Command::Map(c) => run_map(c),
        Command::Compare(c) => Ok(run_compare(c)),
        Command::Estimate(c) => run_estimate(c),
        Command::ImageOptionsHelp => Ok(run_image_options_help()),
    });
    match r {
        Ok(c) => c,
        Err(e) => {
            eprintln!("qdedup: error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
