//! The `qdedup` command line: parses the arguments ([`cli::args`]), converts
//! them once into library options ([`cli::command`]), calls the library, prints
//! the report and picks the exit code.

mod cli;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use qdedup::convert::options::ProgressFn;
use qdedup::source::{Format, Input, OpenOptions};
use qdedup::ConvertOptions;

use cli::args::Cli;
use cli::command::{self, Command, OutputFormat};

/// `print!` that never panics: when stdout is closed (piped into `head`, a
/// closed terminal) the rest of the output is dropped and the command goes on,
/// so its exit code (a check's verdict) is the same as with an open stdout.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if !STDOUT_GONE.load(Ordering::Relaxed) {
            if let Err(e) = write!(std::io::stdout().lock(), $($arg)*) {
                stdout_failed(&e);
            }
        }
    }};
}

/// `println!` with the same handling as [`out!`].
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if !STDOUT_GONE.load(Ordering::Relaxed) {
            if let Err(e) = writeln!(std::io::stdout().lock(), $($arg)*) {
                stdout_failed(&e);
            }
        }
    }};
}

/// `eprint!` that never panics (`eprint!` does when stderr is a terminal that was
/// closed, as after SIGHUP): what cannot be written is dropped.
macro_rules! err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// `eprintln!` with the same handling as [`err!`].
macro_rules! errln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}

/// Set once stdout cannot be written to: later output is dropped.
static STDOUT_GONE: AtomicBool = AtomicBool::new(false);
/// Set when stdout failed for another reason than a closed reader (a full disk):
/// a command that would have exited 0 exits 1 instead.
static STDOUT_FAILED: AtomicBool = AtomicBool::new(false);

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

/// A write to stdout failed: the rest of the output is dropped. A closed reader
/// (EPIPE) is what `| head` does and is not an error; anything else is reported
/// once and turns a success into exit code 1, never a verdict into another.
fn stdout_failed(e: &std::io::Error) {
    STDOUT_GONE.store(true, Ordering::Relaxed);
    if e.kind() != std::io::ErrorKind::BrokenPipe {
        STDOUT_FAILED.store(true, Ordering::Relaxed);
        errln!("qdedup: error: cannot write to stdout: {e}");
    }
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
            errln!("qdedup: error: {e}");
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

/// What reports the progress of a conversion on stderr: a bar on a terminal; with
/// `-p` and no terminal, qemu-img's `    (12.00/100%)` lines.
fn progress_callback(c: &command::Convert) -> Option<(Arc<ProgressFn>, Bar)> {
    if c.quiet {
        return None;
    }
    if std::io::stderr().is_terminal() {
        let pb = indicatif::ProgressBar::new(0);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template"),
        );
        let bar = pb.clone();
        let f: Arc<ProgressFn> = Arc::new(move |done, total| {
            bar.set_length(total);
            bar.set_position(done);
        });
        return Some((f, Bar::Terminal(pb)));
    }
    if !c.progress {
        return None;
    }
    // Like qemu-img -p: a line each whole percent (hundredths, as qemu-img prints).
    let last = Arc::new(std::sync::atomic::AtomicU64::new(u64::MAX));
    let f: Arc<ProgressFn> = Arc::new(move |done, total| {
        let pct = if total == 0 {
            100
        } else {
            (u128::from(done) * 100 / u128::from(total)).min(100) as u64
        };
        if last.swap(pct, Ordering::Relaxed) != pct {
            err!("    ({pct}.00/100%)\r");
        }
    });
    Some((f, Bar::Lines))
}

/// The progress display to close when the conversion ends.
enum Bar {
    Terminal(indicatif::ProgressBar),
    Lines,
}

/// The signals that end a command: Ctrl-C, `kill`, a closed terminal.
const TERMINATING: [i32; 3] = [
    signal_hook::consts::SIGINT,
    signal_hook::consts::SIGTERM,
    signal_hook::consts::SIGHUP,
];

/// Which terminating signals arrived, and one flag set by any of them.
struct Signals {
    any: Arc<AtomicBool>,
    each: Vec<(i32, Arc<AtomicBool>)>,
}

impl Signals {
    /// The first terminating signal that arrived (in [`TERMINATING`] order).
    fn caught(&self) -> Option<i32> {
        self.each
            .iter()
            .find(|(_, f)| f.load(Ordering::SeqCst))
            .map(|(s, _)| *s)
    }

    /// The exit code of a command a signal stopped: 128 + the signal, as a shell
    /// reports a process the signal killed (130 INT, 143 TERM, 129 HUP).
    fn exit_code(&self) -> ExitCode {
        let sig = self.caught().unwrap_or(signal_hook::consts::SIGINT);
        ExitCode::from(u8::try_from(128 + sig).unwrap_or(1))
    }
}

/// SIGINT, SIGTERM and SIGHUP set the returned flags instead of ending the process.
/// With `second_exits`, a second one exits at once (128 + signal), as a second
/// Ctrl-C does in a conversion that does not stop fast enough; without it every
/// one is held until the command ends (a repair is never cut short).
/// SIGXFSZ is caught too, so that a file size limit makes writes fail with EFBIG
/// (reported, temporary file removed) instead of killing the process.
fn install_signal_handlers(second_exits: bool) -> Signals {
    let any = Arc::new(AtomicBool::new(false));
    let mut each = Vec::new();
    for sig in TERMINATING {
        let mine = Arc::new(AtomicBool::new(false));
        if second_exits {
            let _ = signal_hook::flag::register_conditional_shutdown(sig, 128 + sig, any.clone());
        }
        let _ = signal_hook::flag::register(sig, any.clone());
        let _ = signal_hook::flag::register(sig, mine.clone());
        each.push((sig, mine));
    }
    let _ = signal_hook::flag::register(
        signal_hook::consts::SIGXFSZ,
        Arc::new(AtomicBool::new(false)),
    );
    Signals { any, each }
}

fn run_convert(c: &command::Convert) -> Result<ExitCode> {
    let mut opts = c.opts.clone();
    let progress = progress_callback(c);
    let bar = progress.map(|(f, bar)| {
        opts.progress = Some(f);
        bar
    });
    let signals = install_signal_handlers(true);
    opts.cancel = Some(signals.any.clone());
    let input = Input::open(&c.input, &opts.input)
        .with_context(|| format!("cannot open input {}", c.input.display()))?;
    let report = qdedup::convert::convert_input(&input, &c.output, &opts);
    match bar {
        Some(Bar::Terminal(pb)) => pb.finish_and_clear(),
        // The last progress line ends.
        Some(Bar::Lines) => errln!(),
        None => {}
    }
    let report = match report {
        Err(qdedup::Error::Interrupted) => {
            errln!("qdedup: interrupted; no output written");
            return Ok(signals.exit_code());
        }
        r => r.with_context(|| format!("cannot convert {}", c.input.display()))?,
    };
    if std::env::var_os("QDEDUP_THREAD_CPU").is_some_and(|v| v == "1") {
        print_thread_cpu(&report.thread_cpu);
    }
    match c.report {
        // -q: nothing on success, as qemu-img convert -q (JSON included).
        _ if c.quiet => {}
        OutputFormat::Human => outln!("{report}"),
        OutputFormat::Json => outln!("{}", serde_json::to_string_pretty(&report)?),
    }
    Ok(ExitCode::SUCCESS)
}

/// `qdedup checksum`: one `DIGEST  IMAGE` line per image (as blksum and
/// sha256sum), or a JSON list; an image that cannot be read is reported and the
/// others are still hashed (exit 1).
fn run_checksum(c: &command::Checksum) -> Result<ExitCode> {
    let signals = install_signal_handlers(true);
    let mut opts = c.opts.clone();
    opts.cancel = Some(signals.any.clone());
    let mut reports = Vec::new();
    let mut failed = false;
    for image in &c.images {
        let bar = std::io::stderr().is_terminal().then(|| {
            let pb = indicatif::ProgressBar::new(0);
            pb.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("valid template"),
            );
            pb
        });
        opts.progress = bar.clone().map(|bar| {
            let f: Arc<ProgressFn> = Arc::new(move |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            });
            f
        });
        let r = qdedup::checksum(image, &opts);
        if let Some(pb) = bar {
            pb.finish_and_clear();
        }
        match r {
            Ok(r) => {
                if c.report == OutputFormat::Human {
                    outln!("{r}");
                }
                reports.push(r);
            }
            Err(qdedup::Error::Interrupted) => {
                errln!("qdedup: interrupted");
                return Ok(signals.exit_code());
            }
            Err(e) => {
                let e =
                    anyhow::Error::from(e).context(format!("cannot checksum {}", image.display()));
                errln!("qdedup: error: {}", error_chain(&e));
                failed = true;
            }
        }
    }
    if c.report == OutputFormat::Json {
        outln!("{}", serde_json::to_string_pretty(&reports)?);
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Exit code of `qemu-img check` on an image whose format has no checks (raw).
const CHECK_NOT_SUPPORTED: u8 = 63;

fn run_check(c: &command::Check) -> Result<ExitCode> {
    // Like qemu-img check on a raw image: not an error in the image, a format
    // without checks (exit 63).
    if let Ok(f) = std::fs::File::open(&c.image) {
        if f.metadata().is_ok_and(|m| m.is_file())
            && qdedup::source::probe(&f).is_ok_and(|p| p == Format::Raw)
        {
            errln!(
                "qdedup: error: {} is not a qcow2 image (it reads as raw): this format does not \
                 support checks",
                c.image.display()
            );
            return Ok(ExitCode::from(CHECK_NOT_SUPPORTED));
        }
    }
    // A repair is never cut short: a terminating signal waits for its end.
    let signals = c
        .opts
        .repair
        .is_some()
        .then(|| install_signal_handlers(false));
    let report = qdedup::check(&c.image, &c.opts)
        .with_context(|| format!("cannot check {}", c.image.display()));
    if let Some(sig) = signals.as_ref().and_then(Signals::caught) {
        errln!("qdedup: signal {sig} arrived during the repair: it was completed first");
    }
    let report = report?;
    match c.report {
        // -q: nothing, JSON included, as qemu-img check -q --output=json.
        _ if c.quiet => {}
        OutputFormat::Human => {
            // Like qemu-img check: details on stderr, the summary on stdout.
            err!("{}", report.human_findings());
            out!("{}", report.human_summary());
        }
        OutputFormat::Json => outln!("{}", serde_json::to_string_pretty(&report)?),
    }
    if let Some(s) = signals.filter(|s| s.caught().is_some()) {
        return Ok(s.exit_code());
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
    check_free_space(&dir, size, c.size_text.as_str())?;
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

/// Refuses a demo whose files cannot fit in `dir`: the sample disk (`size`
/// bytes, written in full) and its conversion (at most about half of it).
fn check_free_space(dir: &std::path::Path, size: u64, size_text: &str) -> Result<()> {
    let need = size.saturating_add(size / 2);
    let Ok(st) = rustix::fs::statvfs(dir) else {
        return Ok(());
    };
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    if free < need {
        anyhow::bail!(
            "demo --size {size_text} needs about {} free in {} (the sample disk and its \
             conversion), which has {}",
            qdedup::inspect::info::human_size(need),
            dir.display(),
            qdedup::inspect::info::human_size(free)
        );
    }
    Ok(())
}

fn run_dedup(c: &command::Dedup) -> Result<ExitCode> {
    let mut opts = c.opts.clone();
    // A terminating signal stops the run between two flush groups: the image
    // stays sound (a second signal exits at once, leaving at worst leaks).
    let signals = install_signal_handlers(true);
    opts.cancel = Some(signals.any.clone());
    let report = match qdedup::dedup(&c.image, &opts) {
        Err(qdedup::Error::Interrupted) => {
            errln!(
                "qdedup: interrupted; the flush groups done stay done and the image is sound \
                 (run dedup again to finish)"
            );
            return Ok(signals.exit_code());
        }
        r => r.with_context(|| format!("cannot dedup {}", c.image.display()))?,
    };
    match c.report {
        _ if c.quiet => {}
        OutputFormat::Human => outln!("{report}"),
        OutputFormat::Json => outln!("{}", serde_json::to_string_pretty(&report)?),
    }
    if !report.dry_run && !report.clean_after {
        errln!(
            "qdedup: error: the final check does not find {} clean and strict: run `qdedup \
             check` on it",
            c.image.display()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The exit code of a usage error (a bad option or value), as clap's.
const USAGE_ERROR: u8 = 2;

/// The exit code of a usage error of `check`, whose 2 means "corruptions
/// found": 1, "the check could not be completed", as qemu-img check's.
const CHECK_USAGE_ERROR: u8 = 1;

/// The exit code of a usage error: [`CHECK_USAGE_ERROR`] when the command is
/// `check` (the first argument that is not an option), else [`USAGE_ERROR`].
fn usage_error() -> ExitCode {
    let is_check = std::env::args_os()
        .skip(1)
        .find(|a| !a.as_encoded_bytes().starts_with(b"-"))
        .is_some_and(|a| a == "check");
    ExitCode::from(if is_check {
        CHECK_USAGE_ERROR
    } else {
        USAGE_ERROR
    })
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            if let Some(why) = cli::qemu_img::explain_unknown(&e) {
                errln!("qdedup: error: {why}");
                return usage_error();
            }
            // Help and version go to stdout and exit 0, as clap does.
            if !e.use_stderr() {
                e.exit()
            }
            // A closed stderr changes nothing: the exit code says it.
            let _ = e.print();
            return usage_error();
        }
    };
    // A value qdedup itself refuses is a usage error like clap's.
    let cmd = match Command::from_args(cli) {
        Ok(cmd) => cmd,
        Err(e) => {
            errln!("qdedup: error: {}", error_chain(&e));
            return usage_error();
        }
    };
    let r = match &cmd {
        Command::Convert(c) => run_convert(c),
        Command::Check(c) => run_check(c),
        Command::Demo(c) => run_demo(c),
        Command::Dedup(c) => run_dedup(c),
        Command::Checksum(c) => run_checksum(c),
        Command::Info(c) => run_info(c),
        Command::Map(c) => run_map(c),
        Command::Compare(c) => Ok(run_compare(c)),
        Command::Estimate(c) => run_estimate(c),
        Command::ImageOptionsHelp => Ok(run_image_options_help()),
    };
    let code = match r {
        Ok(c) => c,
        Err(e) => {
            errln!("qdedup: error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    };
    if code == ExitCode::SUCCESS && STDOUT_FAILED.load(Ordering::Relaxed) {
        return ExitCode::FAILURE;
    }
    code
}

/// `QDEDUP_THREAD_CPU=1`: the conversion's CPU time per thread role on stderr
/// (a profile without `perf`, docs/benchmarks.md), one line per role and the
/// writer thread's share.
fn print_thread_cpu(t: &qdedup::convert::ThreadCpu) {
    let s = |ns: u64| ns as f64 / 1e9;
    let pct = |ns: u64| 100.0 * ns as f64 / t.total_ns().max(1) as f64;
    errln!("thread-cpu: role        seconds  share");
    for (role, ns) in [
        ("writer", t.writer_ns),
        ("io", t.io_ns),
        ("workers", t.workers_ns),
        ("prefault", t.prefault_ns),
    ] {
        errln!("thread-cpu: {role:<9} {:>9.6}  {:>5.1}%", s(ns), pct(ns));
    }
    errln!(
        "thread-cpu: total     {:>9.6}  workers {}, writer share {:.1}%, ceiling {:.1}x",
        s(t.total_ns()),
        t.workers,
        100.0 * t.writer_share(),
        t.ceiling()
    );
}
