//! qemu-img users' habits: its flags (`-p`, `-q`, `-t`, `-T`, `-W`, `-l
//! snapshot.id=`), its refusals named instead of clap's tips, `--force` keeping
//! the replaced file's mode and owner, and bad values refused with their range.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// `qdedup convert ARGS IN OUT`.
fn convert_with(args: &[&str], input: &Path, out: &Path) -> std::process::Output {
    qdedup(argv(
        &["convert"],
        args,
        &[input.as_os_str(), out.as_os_str()],
    ))
}

#[test]
fn dash_p_shows_progress_without_a_terminal_and_dash_q_prints_nothing() {
    let dir = Scratch::new();
    let raw = raw_input(dir.path(), 65536, 64, 0, 1);
    let out = dir.join("p.qcow2");
    let o = convert_with(&["-p"], &raw, &out);
    assert!(o.status.success(), "{}", said(&o));
    assert!(stderr(&o).contains("(100.00/100%)"), "{}", said(&o));
    assert_qemu_compare_same(&raw, "raw", &out);
    // Without -p and without a terminal: no progress.
    let out = dir.join("plain.qcow2");
    let o = convert_with(&[], &raw, &out);
    assert!(
        o.status.success() && !stderr(&o).contains("/100%"),
        "{}",
        said(&o)
    );
    assert!(stdout(&o).contains("duplicate data:"), "the human report");

    // -q: nothing at all on success, as qemu-img convert -q.
    let out = dir.join("q.qcow2");
    let o = convert_with(&["-q", "-p"], &raw, &out);
    assert!(o.status.success(), "{}", said(&o));
    assert_eq!(said(&o), "", "-q prints nothing");
    assert_qemu_compare_same(&raw, "raw", &out);
    // JSON included: -q is quiet whatever the format, as qemu-img.
    let json = dir.join("json.qcow2");
    let o = convert_with(&["-q", "--output", "json"], &raw, &json);
    assert!(o.status.success(), "{}", said(&o));
    assert_eq!(said(&o), "", "-q --output json prints nothing");
    assert_qemu_compare_same(&raw, "raw", &json);

    // check -q: the exit code alone, JSON or not, as qemu-img check -q
    // --output=json, on a clean image and on one with a leak.
    // A leak: the header cluster's refcount raised from 1 to 2.
    let leaky = patched_copy(&out, dir.join("leaky.qcow2"), |img| {
        assert_eq!(img.refcount(0), 1);
        img.set_refcount(0, 2);
    });
    let mut cases = 0;
    for (img, want) in [(&out, 0), (&leaky, 3)] {
        for fmt in [None, Some("json")] {
            let mut ours: Vec<&std::ffi::OsStr> = vec!["check".as_ref(), "-q".as_ref()];
            let mut theirs: Vec<String> = vec!["check".into(), "-q".into()];
            if let Some(f) = fmt {
                ours.extend([std::ffi::OsStr::new("--output"), std::ffi::OsStr::new(f)]);
                theirs.push(format!("--output={f}"));
            }
            ours.push(img.as_os_str());
            let o = qdedup(&ours);
            let q = qemu(
                "qemu-img",
                theirs
                    .iter()
                    .map(std::ffi::OsStr::new)
                    .chain([img.as_os_str()]),
            );
            assert_eq!((exit_code(&o), said(&o)), (want, String::new()), "{fmt:?}");
            assert_eq!(exit_code(&q), want, "qemu-img {fmt:?}: {}", said(&q));
            assert_eq!(stdout(&q), "", "qemu-img -q {fmt:?}");
            cases += 1;
        }
    }
    assert_eq!(cases, 4);
}

#[test]
fn qemu_img_options_qdedup_lacks_are_refused_by_name() {
    let dir = Scratch::new();
    let raw = raw_input(dir.path(), 65536, 16, 0, 2);
    let out = dir.join("out.qcow2");
    let refused: &[&[&str]] = &[
        &["-n"],
        &["-C"],
        &["-r", "10M"],
        &["--bitmaps"],
        &["--target-is-zero"],
        &["--image-opts"],
    ];
    for args in refused {
        let o = convert_with(args, &raw, &out);
        let err = stderr(&o);
        assert_eq!(exit_code(&o), 2, "{args:?}: {}", said(&o));
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: one line: {err}");
        assert!(
            err.contains(&format!("qemu-img convert's {} (", args[0]))
                && err.contains("not supported")
                && !err.contains("tip:"),
            "{args:?}: {err}"
        );
        assert!(!out.exists(), "{args:?}: nothing written");
    }
    assert_eq!(refused.len(), 6);
    // Options no qemu-img command has are still clap's.
    let o = convert_with(&["--no-such-option"], &raw, &out);
    assert_eq!(exit_code(&o), 2);
    assert!(stderr(&o).contains("unexpected argument"), "{}", said(&o));
}

#[test]
fn harmless_qemu_img_options_are_accepted_and_cache_modes_map_to_sync() {
    let dir = Scratch::new();
    let raw = raw_input(dir.path(), 65536, 16, 0, 3);
    let accepted: &[&[&str]] = &[
        &["-W"],
        &["-t", "none"],
        &["-t", "writeback"],
        &["-t", "unsafe"],
        &["-t", "unsafe", "--no-sync"],
        &["-T", "none"],
        &["-W", "-t", "directsync", "-T", "writeback", "-p"],
    ];
    for (i, args) in accepted.iter().enumerate() {
        let out = dir.join(format!("out{i}.qcow2"));
        let o = convert_with(args, &raw, &out);
        assert!(o.status.success(), "{args:?}: {}", said(&o));
        assert_qemu_compare_same(&raw, "raw", &out);
    }
    assert_eq!(accepted.len(), 7);
    let out = dir.join("bad.qcow2");
    for args in [
        &["-t", "bogus"][..],
        &["-T", "bogus"],
        &["-t", "none", "--no-sync"],
    ] {
        let err = qdedup_fails_in_one_line(argv(
            &["convert"],
            args,
            &[raw.as_os_str(), out.as_os_str()],
        ));
        assert!(err.contains(args[1]), "{args:?}: {err}");
        assert!(!out.exists());
    }
}

#[test]
fn snapshot_id_and_name_syntax_match_only_ids_or_only_names() {
    let dir = Scratch::new();
    let img = create_qcow2(dir.join("snap.qcow2"), Some("4M"), &[]);
    qemu_io(&img, &["write -P 0x11 0 1M"]);
    qemu_snapshot(&img, "first"); // ID 1
    qemu_io(&img, &["write -P 0x22 0 1M"]);
    qemu_snapshot(&img, "1"); // ID 2, named "1"
    qemu_io(&img, &["write -P 0x33 0 1M"]);
    let mut cases = 0;
    for (spec, pattern) in [
        ("snapshot.id=1", 0x11u8),
        ("snapshot.name=1", 0x22),
        ("1", 0x11),
        ("first", 0x11),
        ("snapshot.name=first", 0x11),
        ("snapshot.id=2", 0x22),
        ("snapshot.id=2,snapshot.name=1", 0x22),
    ] {
        let out = dir.join("out.qcow2");
        convert_json(&["-l", spec, "--force"], &img, &out);
        // QEMU's reading of the same -l.
        let want = qemu_view(img.as_os_str(), &["-l", spec]);
        assert_eq!(want[0], pattern, "{spec}: qemu-img's view");
        let view = dir.join("want.raw");
        std::fs::write(&view, &want).unwrap();
        assert_qemu_compare_same(&view, "raw", &out);
        cases += 1;
    }
    assert_eq!(cases, 7);
    for spec in [
        "snapshot.id=first",
        "snapshot.name=2",
        "snapshot.id=1,snapshot.name=1",
        "snapshot.size=1",
    ] {
        let err = qdedup_fails_in_one_line(argv(
            &["convert", "--force", "-l", spec],
            &[],
            &[img.as_os_str(), dir.join("no.qcow2").as_os_str()],
        ));
        assert!(err.contains("snapshot"), "{spec}: {err}");
    }
}

#[test]
fn force_keeps_the_replaced_files_mode_and_owner_and_the_temp_file_is_private() {
    let dir = Scratch::new();
    let raw = raw_input(dir.path(), 65536, 16, 0, 4);
    let out = dir.join("out.qcow2");
    std::fs::write(&out, b"old").unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o640)).unwrap();
    // Root can give files away (a file we create is ours: uid 0 means root).
    let root = std::fs::metadata(&out).unwrap().uid() == 0;
    if root {
        // nobody:nogroup, as a libvirt- or user-owned image.
        std::os::unix::fs::chown(&out, Some(65534), Some(65534)).unwrap();
    }
    convert_json(&["--force"], &raw, &out);
    let m = std::fs::metadata(&out).unwrap();
    assert_eq!(m.mode() & 0o7777, 0o640, "mode kept");
    if root {
        assert_eq!((m.uid(), m.gid()), (65534, 65534), "owner kept");
    }
    assert_qemu_compare_same(&raw, "raw", &out);
    // A new file: 0644 less the umask (022 in tests), as before.
    let fresh = dir.join("fresh.qcow2");
    convert_json(&[], &raw, &fresh);
    let mode = std::fs::metadata(&fresh).unwrap().mode() & 0o777;
    assert_eq!(mode & !0o644, 0, "{mode:o}");

    // While it is written, the temporary file is 0600.
    let big = dir.join("big.raw");
    unique_blocks(&big, 512);
    let target = dir.join("target.qcow2");
    let mut child = Command::new(qdedup_bin())
        .args(["convert", "-m", "1"])
        .arg(&big)
        .arg(&target)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    let mode = loop {
        let tmp = dir_entries(dir.path())
            .into_iter()
            .find(|n| n.ends_with(".qdedup-tmp"));
        if let Some(name) = tmp {
            if let Ok(m) = std::fs::metadata(dir.join(name)) {
                if m.len() > 0 {
                    break m.mode() & 0o7777;
                }
            }
        }
        assert!(child.try_wait().unwrap().is_none(), "ended too soon");
        assert!(t.elapsed() < Duration::from_secs(20), "no temporary file");
        std::thread::sleep(Duration::from_millis(2));
    };
    assert!(child.wait().unwrap().success());
    assert_eq!(mode, 0o600, "the temporary file while written");
    assert_eq!(
        std::fs::metadata(&target).unwrap().mode() & 0o7777,
        0o644 & !0o022
    );
}

#[test]
fn check_on_a_raw_file_says_so_with_qemu_imgs_exit_code() {
    let dir = Scratch::new();
    let raw = raw_input(dir.path(), 65536, 4, 0, 5);
    let qemu = exit_code(&qemu("qemu-img", ["check".as_ref(), raw.as_os_str()]));
    assert_eq!(qemu, 63, "qemu-img check on raw");
    let o = qdedup(["check".as_ref(), raw.as_os_str()]);
    assert_eq!(exit_code(&o), qemu, "{}", said(&o));
    let err = stderr(&o);
    assert!(
        err.contains("is not a qcow2 image") && err.contains("does not support checks"),
        "{err}"
    );
    assert!(!err.contains("magic"), "{err}");
}

#[test]
fn a_missing_output_directory_is_named() {
    let dir = Scratch::new();
    let raw = raw_input(dir.path(), 65536, 4, 0, 6);
    let missing = dir.join("no-such-dir");
    let err = qdedup_fails_in_one_line(argv(
        &["convert"],
        &[],
        &[raw.as_os_str(), missing.join("out.qcow2").as_os_str()],
    ));
    assert!(
        err.contains(&format!(
            "output directory {} does not exist",
            missing.display()
        )),
        "{err}"
    );
    assert!(!err.contains("qdedup-tmp"), "{err}");
}

#[test]
fn bad_values_are_refused_with_their_range() {
    let dir = Scratch::new();
    let raw = raw_input(dir.path(), 65536, 4, 0, 7);
    let out = dir.join("out.qcow2");
    let cases: &[(&[&str], &str)] = &[
        (&["-c", "--compression-level", "99"], "0-9"),
        (&["-c", "--compression-level", "-1"], "0-9"),
        (
            &[
                "-c",
                "-o",
                "compression_type=zstd",
                "--compression-level",
                "30",
            ],
            "1-22",
        ),
        (
            &[
                "-c",
                "-o",
                "compression_type=zstd",
                "--compression-level",
                "0",
            ],
            "1-22",
        ),
        (&["--compression-level", "3"], "needs -c"),
        (&["--max-in-flight", "0"], "at least 1 byte"),
    ];
    for (args, want) in cases {
        let err = qdedup_fails_in_one_line(argv(
            &["convert"],
            args,
            &[raw.as_os_str(), out.as_os_str()],
        ));
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!out.exists(), "{args:?}: nothing written");
    }
    // estimate shares the compression options.
    let err = qdedup_fails_in_one_line([
        "estimate".as_ref(),
        "-c".as_ref(),
        "--compression-level".as_ref(),
        "10".as_ref(),
        raw.as_os_str(),
    ]);
    assert!(err.contains("0-9"), "{err}");
    // The ends of the ranges are accepted.
    for args in [
        &["-c", "--compression-level", "0"][..],
        &["-c", "--compression-level", "9"],
        &[
            "-c",
            "-o",
            "compression_type=zstd",
            "--compression-level",
            "22",
        ],
    ] {
        let o = convert_with(&[args, &["--force"][..]].concat(), &raw, &out);
        assert!(o.status.success(), "{args:?}: {}", said(&o));
        assert_qemu_compare_same(&raw, "raw", &out);
    }
}

#[test]
fn demo_refuses_a_size_that_cannot_fit_before_writing() {
    let dir = Scratch::new();
    let keep = dir.join("demo");
    let t = Instant::now();
    let err = qdedup_fails_in_one_line([
        "demo".as_ref(),
        "--size".as_ref(),
        "100T".as_ref(),
        "--keep".as_ref(),
        keep.as_os_str(),
    ]);
    assert!(t.elapsed() < Duration::from_secs(10), "refused at once");
    assert!(
        err.contains("demo --size 100T needs about") && err.contains("free"),
        "{err}"
    );
    assert!(dir_entries(&keep).is_empty(), "nothing generated");
}

#[test]
fn usage_errors_exit_2_but_1_for_check_and_runtime_errors_exit_1() {
    let dir = Scratch::new();
    let raw = raw_input(dir.path(), 65536, 16, 0, 2);
    let out = dir.join("out.qcow2");
    let img = dir.join("img.qcow2");
    convert_json(&[], &raw, &img);
    let missing = dir.join("missing.raw");
    let (r, o, i, m) = (
        raw.as_os_str(),
        out.as_os_str(),
        img.as_os_str(),
        missing.as_os_str(),
    );
    let usage: Vec<Vec<&std::ffi::OsStr>> = vec![
        // qdedup's own value checks.
        argv(&["convert", "-o", "cluster_size=1000"], &[], &[r, o]),
        argv(
            &["convert", "-o", "compat=0.10,refcount_bits=8"],
            &[],
            &[r, o],
        ),
        argv(&["convert", "-S", "128k"], &[], &[r, o]),
        argv(&["convert", "-o", "nonsense=1"], &[], &[r, o]),
        argv(&["convert", "-o", "compression_type=zstd"], &[], &[r, o]),
        argv(
            &["convert", "-c", "--compression-level", "99"],
            &[],
            &[r, o],
        ),
        argv(&["convert", "--compression-level", "3"], &[], &[r, o]),
        argv(&["convert", "--max-in-flight", "0"], &[], &[r, o]),
        argv(&["convert", "--max-in-flight", "lots"], &[], &[r, o]),
        argv(&["convert", "-t", "sometimes"], &[], &[r, o]),
        argv(
            &["convert", "-t", "unsafe", "--no-sync", "-t", "none"],
            &[],
            &[r, o],
        ),
        argv(&["estimate", "--cluster-sizes", "4k,3k"], &[], &[r]),
        argv(&["estimate", "-o", "refcount_bits=3"], &[], &[r]),
        argv(&["demo", "--size", "big"], &[], &[]),
        // clap's errors and refused qemu-img options.
        argv(&["convert", "--bogus"], &[], &[r, o]),
        argv(&["convert", "-n"], &[], &[r, o]),
        argv(&["convert", "-f", "vmdk"], &[], &[r, o]),
        argv(&["info"], &[], &[]),
        argv(&["map", "--start-offset", "0"], &[], &[i]),
    ];
    let cases = usage.len();
    for args in usage {
        let out_ = qdedup(&args);
        assert_eq!(exit_code(&out_), 2, "{args:?}: {}", said(&out_));
        assert!(!out.exists(), "{args:?}: nothing written");
    }
    assert_eq!(cases, 19);
    // check's 2 means "corruptions found": its usage errors exit 1, "the check
    // could not be completed", as qemu-img check's; the image is not touched.
    let before = std::fs::read(&img).unwrap();
    let check_usage = [
        argv(&["check", "-U", "--repair", "leaks"], &[], &[i]),
        argv(&["check", "--repair", "some"], &[], &[i]),
        argv(&["check", "--bogus"], &[], &[i]),
        argv(&["check"], &[], &[]),
        argv(&["-q", "check", "--max-findings", "x"], &[], &[i]),
    ];
    let check_cases = check_usage.len();
    for args in check_usage {
        let out_ = qdedup(&args);
        assert_eq!(exit_code(&out_), 1, "{args:?}: {}", said(&out_));
        assert!(!stderr(&out_).is_empty(), "{args:?}: says why");
        assert_eq!(stdout(&out_), "", "{args:?}: no report");
    }
    assert_eq!(check_cases, 5);
    assert_eq!(std::fs::read(&img).unwrap(), before);
    // qemu-img check agrees on its own bad option.
    let theirs = qemu("qemu-img", ["check".as_ref(), "--bogus".as_ref(), i]);
    assert_eq!(exit_code(&theirs), 1, "{}", said(&theirs));
    // Runtime errors (the arguments were fine): exit 1.
    for args in [
        argv(&["convert"], &[], &[m, o]),
        argv(&["info"], &[], &[m]),
        argv(&["map"], &[], &[m]),
        argv(&["estimate"], &[], &[m]),
        argv(&["check"], &[], &[m]),
        argv(&["convert"], &[], &[r, i]),
    ] {
        let out_ = qdedup(&args);
        assert_eq!(exit_code(&out_), 1, "{args:?}: {}", said(&out_));
        assert_eq!(stderr(&out_).trim().lines().count(), 1, "{args:?}");
    }
    // compare keeps qemu-img compare's codes: 1 a difference, 2 an error.
    let out_ = qdedup(argv(&["compare"], &[], &[m, i]));
    assert_eq!(exit_code(&out_), 2, "{}", said(&out_));
}
