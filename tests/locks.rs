//! QEMU's image locks: qdedup refuses images a running QEMU holds as qemu-img
//! does (real holders: an interactive `qemu-io`, read-write or `-r`, and
//! `qemu-nbd`), `-U/--force-share` reads them as qemu-img's `-U` does, and QEMU
//! in turn cannot write an image qdedup holds.

mod common;

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};

use common::*;
use qdedup::image::lock::{lock, LockMode};

/// The tests of this file run one at a time: an OFD lock lasts while any
/// descriptor of its open file description does, and a child that another test
/// thread is spawning shares the process's descriptors until it execs, so a
/// file a test closed may, for that moment, still hold its locks.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A 4 MiB qcow2 image with some data and a leak (the header cluster's
/// refcount raised to 2): `check -r leaks` has something to write.
fn leaky(dir: &Path, name: &str) -> PathBuf {
    let p = create_qcow2(dir.join(name), Some("4M"), &[]);
    qemu_io(&p, &["write -P 0x11 0 192k", "write -P 0x22 1M 64k"]);
    Img::open(&p).set_refcount(0, 2);
    p
}

/// The holders: (name in errors, how to start one on an image, whether it
/// writes the image).
type Start = fn(&Path) -> QemuHolder;
fn holders() -> Vec<(&'static str, Start, bool)> {
    vec![
        ("qemu-io", |p| QemuHolder::qemu_io(p, &[]), true),
        ("qemu-io", |p| QemuHolder::qemu_io(p, &["-r"]), false),
        ("qemu-nbd", |p| QemuHolder::qemu_nbd(p, &[]), true),
        ("qemu-nbd", |p| QemuHolder::qemu_nbd(p, &["-r"]), false),
    ]
}

/// The one error line of a failed command, for messages.
fn first_line(o: &std::process::Output) -> String {
    stderr(o).lines().next().unwrap_or_default().to_string()
}

#[test]
fn repair_refuses_an_image_qemu_holds_and_writes_nothing() {
    let _serial = serial();
    let dir = Scratch::new();
    let mut cases = 0;
    for (tool, start, _) in holders() {
        let img = leaky(dir.path(), "held.qcow2");
        let before = fs::read(&img).unwrap();
        let holder = start(&img);
        // qemu-img refuses, and so does qdedup, naming the lock and the holder.
        let q = qemu(
            "qemu-img",
            [
                "check".as_ref(),
                "-r".as_ref(),
                "leaks".as_ref(),
                img.as_os_str(),
            ],
        );
        assert_eq!(exit_code(&q), 1, "qemu-img check -r: {}", said(&q));
        assert!(
            said(&q).contains("Failed to get \"write\" lock"),
            "{}",
            said(&q)
        );
        let err = qdedup_fails_in_one_line([
            "check".as_ref(),
            "-r".as_ref(),
            "leaks".as_ref(),
            img.as_os_str(),
        ]);
        assert!(
            err.contains("Failed to get \"write\" lock"),
            "{tool}: {err}"
        );
        assert!(err.contains(tool), "{tool}: the holder is named: {err}");
        assert!(err.contains("nothing was written"), "{err}");
        assert_eq!(
            fs::read(&img).unwrap(),
            before,
            "{tool}: the image is byte-identical"
        );
        // -U does not make a repair possible, as with qemu-img.
        let q = qemu(
            "qemu-img",
            [
                "check".as_ref(),
                "-U".as_ref(),
                "-r".as_ref(),
                "leaks".as_ref(),
                img.as_os_str(),
            ],
        );
        assert_eq!(exit_code(&q), 1, "{}", said(&q));
        let err = qdedup_fails_in_one_line([
            "check".as_ref(),
            "-U".as_ref(),
            "-r".as_ref(),
            "leaks".as_ref(),
            img.as_os_str(),
        ]);
        assert!(err.contains("force-share"), "{err}");
        assert_eq!(fs::read(&img).unwrap(), before);
        drop(holder);
        // Once the holder is gone, the same repair goes ahead.
        let o = qdedup([
            "check".as_ref(),
            "-r".as_ref(),
            "leaks".as_ref(),
            img.as_os_str(),
        ]);
        assert_eq!(exit_code(&o), 0, "{}", said(&o));
        assert_ne!(fs::read(&img).unwrap(), before, "the leak was repaired");
        fs::remove_file(&img).unwrap();
        cases += 1;
    }
    assert_eq!(cases, 4);
}

/// Runs qdedup's and qemu-img's forms of one reading command side by side on a
/// held image, with and without -U, and asserts the same verdict; a refusal
/// names the same lock as qemu-img's. Returns how many runs refused.
fn same_verdict_as_qemu_img(
    what: &str,
    ours: &[&OsStr],
    theirs: &[&OsStr],
    tool: &str,
    force_share: bool,
) -> usize {
    let u: &[&OsStr] = if force_share { &["-U".as_ref()] } else { &[] };
    let mut q_args = vec![theirs[0]];
    q_args.extend_from_slice(u);
    q_args.extend_from_slice(&theirs[1..]);
    let mut o_args = vec![ours[0]];
    o_args.extend_from_slice(u);
    o_args.extend_from_slice(&ours[1..]);
    let q = qemu("qemu-img", &q_args);
    let o = qdedup(&o_args);
    let (q_ok, o_ok) = (q.status.success(), o.status.success());
    assert_eq!(
        o_ok,
        q_ok,
        "{what} (-U: {force_share}) under {tool}: qdedup {:?} vs qemu-img {:?}",
        first_line(&o),
        first_line(&q)
    );
    if q_ok {
        return 0;
    }
    let lock = "Failed to get shared \"write\" lock";
    assert!(said(&q).contains(lock), "qemu-img {what}: {}", said(&q));
    assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", said(&o));
    assert!(stderr(&o).contains(lock), "{what}: {}", said(&o));
    assert!(
        stderr(&o).contains(tool),
        "{what}: the holder is named: {}",
        said(&o)
    );
    assert!(stderr(&o).contains("-U/--force-share"), "{}", said(&o));
    assert_ne!(exit_code(&o), 101);
    1
}

#[test]
fn readers_refuse_a_written_image_unless_force_share_as_qemu_img_does() {
    let _serial = serial();
    let dir = Scratch::new();
    let img = create_qcow2(dir.join("live.qcow2"), Some("4M"), &[]);
    qemu_io(&img, &["write -P 0x11 0 192k", "write -P 0x11 1M 192k"]);
    let copy = copy_file(&img, dir.join("copy.qcow2"));
    let out = dir.join("out.qcow2");
    let q_out = dir.join("qemu-out.qcow2");
    let (mut runs, mut refused) = (0, 0);
    for (tool, start, writes) in holders() {
        let _holder = start(&img);
        let i = img.as_os_str();
        let commands: Vec<(&str, Vec<&OsStr>, Vec<&OsStr>)> = vec![
            ("info", vec!["info".as_ref(), i], vec!["info".as_ref(), i]),
            (
                "check",
                vec!["check".as_ref(), i],
                vec!["check".as_ref(), i],
            ),
            ("map", vec!["map".as_ref(), i], vec!["map".as_ref(), i]),
            (
                "compare",
                vec!["compare".as_ref(), i, copy.as_os_str()],
                vec!["compare".as_ref(), i, copy.as_os_str()],
            ),
            (
                "convert",
                vec!["convert".as_ref(), "--force".as_ref(), i, out.as_os_str()],
                vec![
                    "convert".as_ref(),
                    "-O".as_ref(),
                    "qcow2".as_ref(),
                    i,
                    q_out.as_os_str(),
                ],
            ),
            (
                "estimate",
                vec!["estimate".as_ref(), i],
                vec!["measure".as_ref(), "-O".as_ref(), "qcow2".as_ref(), i],
            ),
        ];
        for (what, ours, theirs) in &commands {
            for force_share in [false, true] {
                let r = same_verdict_as_qemu_img(what, ours, theirs, tool, force_share);
                // A writing holder refuses plain readers; -U and read-only
                // holders let them through.
                assert_eq!(r == 1, writes && !force_share, "{what} under {tool}");
                refused += r;
                runs += 1;
            }
        }
    }
    assert_eq!((runs, refused), (48, 12));
}

#[test]
fn a_backing_file_qemu_writes_is_refused_by_name() {
    let _serial = serial();
    let dir = Scratch::new();
    let base = create_qcow2(dir.join("base.qcow2"), Some("4M"), &[]);
    qemu_io(&base, &["write -P 0x11 0 64k"]);
    let top = create_qcow2(
        dir.join("top.qcow2"),
        None,
        &["-b", base.to_str().unwrap(), "-F", "qcow2"],
    );
    let _holder = QemuHolder::qemu_io(&base, &[]);
    let out = dir.join("out.qcow2");
    let q = qemu(
        "qemu-img",
        [
            "convert".as_ref(),
            "-O".as_ref(),
            "qcow2".as_ref(),
            top.as_os_str(),
            dir.join("q.qcow2").as_os_str(),
        ],
    );
    assert!(!q.status.success(), "qemu-img convert: {}", said(&q));
    assert!(
        said(&q).contains("Failed to get shared \"write\" lock"),
        "{}",
        said(&q)
    );
    let err = qdedup_fails_in_one_line(["convert".as_ref(), top.as_os_str(), out.as_os_str()]);
    assert!(err.contains("Failed to get shared \"write\" lock"), "{err}");
    assert!(
        err.contains("base.qcow2"),
        "the backing file is named: {err}"
    );
    assert!(!out.exists());
    qdedup_ok([
        "convert".as_ref(),
        "-U".as_ref(),
        top.as_os_str(),
        out.as_os_str(),
    ]);
    let c = qemu(
        "qemu-img",
        [
            "compare".as_ref(),
            "-U".as_ref(),
            top.as_os_str(),
            out.as_os_str(),
        ],
    );
    assert!(c.status.success(), "{}", said(&c));
}

#[test]
fn qemu_cannot_write_an_image_qdedup_holds() {
    let _serial = serial();
    let dir = Scratch::new();
    let img = leaky(dir.path(), "ours.qcow2");
    let before = fs::read(&img).unwrap();
    let i = img.as_os_str();
    let write_lock = "Failed to get \"write\" lock";
    let shared_lock = "Failed to get shared \"write\" lock";

    // Held for reading (what check, info, convert take): QEMU may read, not write.
    let file = fs::File::open(&img).unwrap();
    lock(&file, &img, LockMode::Read).unwrap();
    let q = qemu(
        "qemu-img",
        ["check".as_ref(), "-r".as_ref(), "leaks".as_ref(), i],
    );
    assert_eq!(exit_code(&q), 1, "{}", said(&q));
    assert!(said(&q).contains(write_lock), "{}", said(&q));
    let q = qemu("qemu-io", ["-c".as_ref(), "write 0 512".as_ref(), i]);
    assert!(said(&q).contains(write_lock), "qemu-io: {}", said(&q));
    qemu_img(["info".as_ref(), i]);
    let q = qemu("qemu-img", ["check".as_ref(), i]);
    assert_eq!(
        exit_code(&q),
        3,
        "qemu-img check reads it (and sees the leak)"
    );
    // Another qdedup reader is welcome, a qdedup repair is not.
    qdedup_ok(["info".as_ref(), i]);
    let err = qdedup_fails_in_one_line(["check".as_ref(), "-r".as_ref(), "leaks".as_ref(), i]);
    assert!(err.contains(write_lock), "{err}");
    drop(file);

    // Held for writing (a repair): QEMU may not even read without -U.
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    lock(&file, &img, LockMode::Write).unwrap();
    let q = qemu("qemu-img", ["info".as_ref(), i]);
    assert_eq!(exit_code(&q), 1, "{}", said(&q));
    assert!(said(&q).contains(shared_lock), "{}", said(&q));
    let q = qemu(
        "qemu-io",
        ["-r".as_ref(), "-c".as_ref(), "read 0 512".as_ref(), i],
    );
    assert!(said(&q).contains(shared_lock), "qemu-io -r: {}", said(&q));
    qemu_img(["info".as_ref(), "-U".as_ref(), i]);
    drop(file);

    // Held with -U: QEMU may write (as with qemu-img -U).
    let file = fs::File::open(&img).unwrap();
    lock(&file, &img, LockMode::ForceShare).unwrap();
    qemu_img(["check".as_ref(), "-r".as_ref(), "leaks".as_ref(), i]);
    assert_ne!(
        fs::read(&img).unwrap(),
        before,
        "qemu-img repaired the leak"
    );
    drop(file);
}
