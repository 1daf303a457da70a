//! Interrupts, kills, full disks and failing inputs: OUT never exists half-written,
//! temporary files don't survive, nothing panics.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use qdedup::convert::{self, ConvertOptions};
use qdedup::format::l1l2::L2E_OFFSET_MASK;
use qdedup::source::{BlockStatus, Input, Source};

fn temporaries(dir: &Path) -> Vec<String> {
    dir_entries(dir)
        .into_iter()
        .filter(|n| n.ends_with(".qdedup-tmp"))
        .collect()
}

fn spawn_convert(args: &[&OsStr]) -> Child {
    Command::new(qdedup_bin())
        .arg("convert")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_for_temp(dir: &Path, child: &mut Child) {
    let t = Instant::now();
    while temporaries(dir).is_empty() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "conversion ended before it could be interrupted"
        );
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "no temporary file appeared"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn signal(child: &Child, sig: &str) {
    let s = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert!(s.success());
}

/// A scratch directory holding `in.raw`, `mib` MiB of unique data, and the path
/// of the output `out.qcow2`.
struct Setup {
    dir: Scratch,
    input: PathBuf,
    out: PathBuf,
}

impl Setup {
    /// `qdedup convert OPTS in.raw out.qcow2`, started and seen writing its
    /// temporary file.
    fn converting(&self, opts: &[&str]) -> Child {
        let mut args: Vec<&OsStr> = opts.iter().map(OsStr::new).collect();
        args.extend([self.input.as_os_str(), self.out.as_os_str()]);
        let mut child = spawn_convert(&args);
        wait_for_temp(self.dir.path(), &mut child);
        child
    }
}

fn setup(mib: usize) -> Setup {
    let scratch = Scratch::new();
    let input = scratch.join("in.raw");
    unique_blocks(&input, mib);
    Setup {
        out: scratch.join("out.qcow2"),
        dir: scratch,
        input,
    }
}

#[test]
fn ctrl_c_stops_promptly_removes_the_temp_file_and_exits_130() {
    let s = setup(1024);
    let child = s.converting(&["-m", "1"]);
    // Briefly into the run (a fast machine converts the 1 GiB in well under a second).
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    signal(&child, "INT");
    let out = child.wait_with_output().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "stopped in {:?}",
        t.elapsed()
    );
    assert_eq!(
        out.status.code(),
        Some(130),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("interrupted"));
    assert_eq!(
        s.dir.entries(),
        vec!["in.raw"],
        "no output, no temporary file"
    );
}

#[test]
fn sigkill_never_leaves_a_half_written_output_and_a_later_run_cleans_up() {
    let s = setup(512);
    std::fs::write(&s.out, b"previous output").unwrap();
    let mut interrupted = 0;
    for delay_ms in [0u64, 30, 150, 400, 900] {
        let mut child =
            spawn_convert(&["--force".as_ref(), s.input.as_os_str(), s.out.as_os_str()]);
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        let status = child.wait().unwrap();
        let now = std::fs::read(&s.out).unwrap();
        if now == b"previous output" {
            assert!(
                !status.success(),
                "a run that succeeded must have replaced OUT"
            );
            interrupted += 1;
        } else {
            // OUT was replaced: by a run that finished before the kill, or one killed
            // in the moment between the rename and its exit (it still syncs the
            // directory then). Either way the new OUT is complete and sound, never
            // half-written.
            assert_eq!(
                &now[..4],
                b"QFI\xfb",
                "OUT is a qcow2 image (kill at {delay_ms} ms)"
            );
            assert_qemu_check_clean(&s.out);
            assert_qemu_compare_same(&s.input, "raw", &s.out);
            std::fs::write(&s.out, b"previous output").unwrap();
        }
        // Leftovers, if any, are clearly named after OUT.
        for t in temporaries(s.dir.path()) {
            assert!(t.starts_with(".out.qcow2."), "{t}");
        }
    }
    // The kill at 0 ms, at least, came before the run could finish.
    assert!(interrupted >= 1, "every run finished before its kill");
    // A run killed while it writes its temporary file leaves the file behind.
    let mut child = s.converting(&["--force"]);
    child.kill().unwrap();
    assert!(!child.wait().unwrap().success());
    assert_eq!(std::fs::read(&s.out).unwrap(), b"previous output");
    assert!(
        !temporaries(s.dir.path()).is_empty(),
        "the killed run's temporary file"
    );
    // A later successful run removes the stale temporary files and says so.
    let small = write_raw(s.dir.path(), "small.raw", &vec![7u8; 100_000]);
    let r = convert_json(&["--force"], &small, &s.out);
    assert!(
        temporaries(s.dir.path()).is_empty(),
        "stale temporaries removed"
    );
    assert!(r["notes"].to_string().contains("interrupted run"), "{r}");
    assert_qemu_compare_same(&small, "raw", &s.out);
}

#[test]
fn a_full_disk_gives_a_clear_error_and_removes_the_temp_file() {
    let s = setup(64);
    let o = Command::new("prlimit")
        .arg("--fsize=8388608")
        .arg("--")
        .arg(qdedup_bin())
        .arg("convert")
        .arg(&s.input)
        .arg(&s.out)
        .output()
        .expect("prlimit (util-linux) is required");
    assert!(!o.status.success());
    assert_ne!(o.status.code(), Some(101));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("cannot write the output"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_eq!(s.dir.entries(), vec!["in.raw"]);
}

#[test]
fn an_input_truncated_while_converting_is_a_read_error() {
    let s = setup(1024);
    let child = s.converting(&["-m", "1"]);
    set_file_len(&s.input, 100 << 20);
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert_ne!(out.status.code(), Some(101));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("input ended early"), "{err}");
    assert_eq!(s.dir.entries(), vec!["in.raw"]);
}

/// A source whose reads fail after `ok_reads` calls.
struct FailingSource {
    size: u64,
    ok_reads: std::sync::atomic::AtomicUsize,
}

impl Source for FailingSource {
    fn virtual_size(&self) -> u64 {
        self.size
    }
    fn block_status(&self, offset: u64, max_len: u64) -> qdedup::Result<(BlockStatus, u64)> {
        Ok((BlockStatus::Data, max_len.min(self.size - offset)))
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> qdedup::Result<()> {
        use std::sync::atomic::Ordering;
        if self
            .ok_reads
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_err()
        {
            return Err(qdedup::Error::io(
                "injected read failure",
                std::io::ErrorKind::Other.into(),
            ));
        }
        buf.fill((offset >> 16) as u8 | 1);
        Ok(())
    }
    fn format_name(&self) -> &'static str {
        "test"
    }
}

#[test]
fn a_failing_read_at_any_point_fails_the_conversion_and_leaves_nothing() {
    let dir = Scratch::new();
    let out = dir.join("out.qcow2");
    for ok_reads in [0usize, 1, 3, 7] {
        for workers in [0usize, 1, 2] {
            let src = FailingSource {
                size: 32 << 20,
                ok_reads: ok_reads.into(),
            };
            let opts = ConvertOptions {
                workers,
                max_in_flight: 4 << 20,
                ..ConvertOptions::default()
            };
            let input = Input::from_source(Box::new(src));
            let e = convert::convert_input(&input, &out, &opts).unwrap_err();
            assert!(e.to_string().contains("injected read failure"), "{e}");
            assert!(
                dir.entries().is_empty(),
                "nothing left after failing at read {ok_reads}"
            );
        }
    }
}

#[test]
fn a_failing_write_at_any_point_is_an_error_not_a_panic() {
    let src = FailingSource {
        size: 8 << 20,
        ok_reads: usize::MAX.into(),
    };
    let opts = ConvertOptions {
        workers: 2,
        max_in_flight: 1 << 20,
        ..ConvertOptions::default()
    };
    let mut n = 0;
    loop {
        let mut mem = qdedup::io::MemFile::new(Vec::new());
        mem.fail_after_writes = Some(n);
        match convert::convert_to(&src, &mem, &opts) {
            Err(e) => assert!(e.to_string().contains("injected write failure"), "{e}"),
            Ok(_) => break,
        }
        n += 1;
    }
    // Every write (data, L2, L1, refcount blocks, table, header) was made to fail once.
    assert!(n >= 6, "only {n} writes");
}

#[test]
fn sigterm_and_sighup_remove_the_temp_file_and_exit_128_plus_the_signal() {
    let mut cases = 0;
    for (sig, code) in [("TERM", 143), ("HUP", 129)] {
        let s = setup(1024);
        let child = s.converting(&["-m", "1"]);
        std::thread::sleep(Duration::from_millis(50));
        signal(&child, sig);
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(code), "SIG{sig}: {}", said(&out));
        assert!(
            stderr(&out).contains("interrupted"),
            "SIG{sig}: {}",
            said(&out)
        );
        assert_eq!(
            s.dir.entries(),
            vec!["in.raw"],
            "SIG{sig}: no output, no temporary file"
        );
        cases += 1;
    }
    assert_eq!(cases, 2);
}

/// A qcow2 image with two leaked clusters (qemu-img check exits 3).
fn leaky_image(dir: &Path) -> PathBuf {
    let p = create_qcow2(dir.join("leaky.qcow2"), Some("64M"), &[]);
    qemu_io(&p, &["write -P 0x11 0 8M", "write -P 0x22 32M 8M"]);
    let img = Img::open(&p);
    img.set_refcount(0, 2);
    img.set_refcount(img.h.refcount_table_offset / img.cs(), 3);
    assert_eq!(exit_code(&qemu_img_check(&p)), 3);
    p
}

#[test]
fn a_repair_interrupted_by_any_signal_leaves_a_sound_image() {
    use std::os::unix::process::ExitStatusExt;
    let dir = Scratch::new();
    let leaky = leaky_image(dir.path());
    let (mut cases, mut held) = (0, 0);
    for (sig, num) in [("INT", 2), ("TERM", 15), ("HUP", 1)] {
        for delay_ms in [0u64, 2, 10, 40] {
            let p = copy_file(&leaky, dir.join("img.qcow2"));
            let child = Command::new(qdedup_bin())
                .args(["check", "-r", "leaks"])
                .arg(&p)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap();
            std::thread::sleep(Duration::from_millis(delay_ms));
            signal(&child, sig);
            let out = child.wait_with_output().unwrap();
            let what = format!("SIG{sig} after {delay_ms} ms");
            assert_ne!(out.status.code(), Some(101), "{what}: {}", said(&out));
            let qemu = exit_code(&qemu_img_check(&p));
            match (out.status.code(), out.status.signal()) {
                // Killed before the handlers were installed: nothing was written.
                (None, Some(s)) => {
                    assert_eq!(s, num, "{what}");
                    assert_eq!(qemu, 3, "{what}: the image is as it was");
                }
                // Held until the repair ended, then reported.
                (Some(c), _) if c == 128 + num => {
                    held += 1;
                    assert_eq!(qemu, 0, "{what}: the repair was completed");
                }
                // The repair ended before the signal came.
                (Some(0), _) => assert_eq!(qemu, 0, "{what}"),
                other => panic!("{what}: unexpected end {other:?}: {}", said(&out)),
            }
            std::fs::remove_file(&p).unwrap();
            cases += 1;
        }
    }
    assert_eq!(cases, 12);
    // Whichever way each run ended, the image was sound; `held` only says how
    // many signals came during the repair on this machine.
    eprintln!("{held} of {cases} signals arrived during a repair");
}

/// Runs qdedup with `args` and its stdout a pipe whose reader is closed before
/// qdedup writes; returns its exit code, asserted not to be a panic's.
fn exit_code_with_closed_stdout(args: &[&OsStr]) -> i32 {
    let mut child = Command::new(qdedup_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let code = exit_code(&out);
    assert_ne!(code, 101, "qdedup {args:?} panicked: {}", said(&out));
    assert!(
        !stderr(&out).contains("panicked"),
        "qdedup {args:?}: {}",
        said(&out)
    );
    code
}

#[test]
fn a_closed_stdout_never_panics_nor_changes_the_exit_code() {
    let dir = Scratch::new();
    let raw = raw_input(dir.path(), 65536, 64, 0, 7);
    let other = write_raw(dir.path(), "other.raw", &vec![9u8; 64 * 65536]);
    let img = dir.join("img.qcow2");
    convert_json(&[], &raw, &img);
    // A corrupt image (check exits 2) and a leaky one (3).
    let bad = copy_file(&img, dir.join("bad.qcow2"));
    let b = Img::open(&bad);
    let c = (b.u64_at(b.l2_entry(0, 0)) & L2E_OFFSET_MASK) / b.cs();
    b.set_refcount(c, 0);
    let leaky = leaky_image(dir.path());
    let out = dir.join("out.qcow2");
    let s = |p: &Path| p.as_os_str().to_owned();
    let cases: Vec<(Vec<std::ffi::OsString>, i32)> = vec![
        (vec!["check".into(), s(&bad)], 2),
        (
            vec!["check".into(), "--output".into(), "json".into(), s(&bad)],
            2,
        ),
        (vec!["check".into(), s(&leaky)], 3),
        (vec!["check".into(), s(&img)], 0),
        (vec!["info".into(), s(&img)], 0),
        (
            vec!["info".into(), "--output".into(), "json".into(), s(&img)],
            0,
        ),
        (vec!["map".into(), "--shared".into(), s(&img)], 0),
        (
            vec!["map".into(), "--output".into(), "json".into(), s(&img)],
            0,
        ),
        (vec!["compare".into(), s(&raw), s(&img)], 0),
        (vec!["compare".into(), s(&other), s(&img)], 1),
        (vec!["estimate".into(), s(&raw)], 0),
        (
            vec![
                "convert".into(),
                "-o".into(),
                "help".into(),
                s(&raw),
                s(&out),
            ],
            0,
        ),
        (vec!["convert".into(), s(&raw), s(&out)], 0),
        (vec!["demo".into(), "--size".into(), "4M".into()], 0),
    ];
    for (args, want) in &cases {
        let args: Vec<&OsStr> = args.iter().map(std::ffi::OsString::as_os_str).collect();
        // The same code as with stdout open.
        assert_eq!(exit_code(&qdedup(&args)), *want, "qdedup {args:?}");
        if args[0] == "convert" {
            let _ = std::fs::remove_file(&out);
        }
        assert_eq!(
            exit_code_with_closed_stdout(&args),
            *want,
            "qdedup {args:?} | (closed)"
        );
    }
    // The conversion whose report could not be printed still wrote its output.
    assert_qemu_compare_same(&raw, "raw", &out);
    assert_eq!(cases.len(), 14);
}

/// A write that fails on the writer's I/O thread (the pipelined converter's
/// data writes), early or late in a conversion of many batches, is the
/// conversion's error, for any number of workers: no hang, no panic.
#[test]
fn a_write_failing_on_the_io_thread_is_the_conversion_error() {
    let mut cases = 0;
    for workers in [1usize, 2, 8] {
        for fail_after in [0usize, 1, 5, 40] {
            let src = FailingSource {
                size: 96 << 20,
                ok_reads: usize::MAX.into(),
            };
            let opts = ConvertOptions {
                workers,
                cluster_bits: 12,
                ..ConvertOptions::default()
            };
            let mut mem = qdedup::io::MemFile::new(Vec::new());
            mem.fail_after_writes = Some(fail_after);
            let e = convert::convert_to(&src, &mem, &opts).unwrap_err();
            assert!(
                e.to_string().contains("injected write failure"),
                "{workers} workers, failing after {fail_after} writes: {e}"
            );
            cases += 1;
        }
    }
    assert_eq!(cases, 12);
}
