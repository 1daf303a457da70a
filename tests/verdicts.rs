//! One opener, one verdict: images QEMU refuses to open, or opens although they
//! are damaged, each made by patching one named field. For every image each
//! qdedup command must give the verdict its qemu-img counterpart gives: `check`
//! the same exit code (1 where QEMU cannot open the image, 2 where it opens it and
//! finds corruptions), `convert`, `info`, `map` and `compare` refuse exactly what
//! qemu-img refuses. The only differences are the reader's documented refusals
//! (docs/qcow2-input.md): the corrupt bit, an L1 table past the end of the file.

#![allow(clippy::many_single_char_names, clippy::fn_params_excessive_bools)] // terse test fixtures

mod common;

use std::path::{Path, PathBuf};

use common::*;
use qdedup::format::extensions::{
    QCOW2_EXT_MAGIC_BACKING_FORMAT, QCOW2_EXT_MAGIC_BITMAPS, QCOW2_EXT_MAGIC_CRYPTO_HEADER,
};
use qdedup::format::header::off;
use qdedup::format::snapshot;
use serde_json::Value;

/// What one tool says about an image: `check`'s exit code, and whether each
/// other command accepted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Verdicts {
    check: i32,
    convert: bool,
    info: bool,
    map: bool,
    compare: bool,
}

fn qemu_verdicts(img: &Path, scratch: &Path) -> (Verdicts, String) {
    let raw = scratch.join("qemu-view.raw");
    let _ = std::fs::remove_file(&raw);
    let i = img.as_os_str();
    let runs = [
        qemu_img_check(img),
        qemu(
            "qemu-img",
            [
                "convert".as_ref(),
                "-O".as_ref(),
                "raw".as_ref(),
                i,
                raw.as_os_str(),
            ],
        ),
        qemu("qemu-img", ["info".as_ref(), "--output=json".as_ref(), i]),
        qemu("qemu-img", ["map".as_ref(), "--output=json".as_ref(), i]),
        qemu("qemu-img", ["compare".as_ref(), i, i]),
    ];
    verdicts_of(&runs)
}

fn qdedup_verdicts(img: &Path, scratch: &Path) -> (Verdicts, String) {
    let out = scratch.join("qdedup-out.qcow2");
    let _ = std::fs::remove_file(&out);
    let i = img.as_os_str();
    let runs = [
        qdedup(["check".as_ref(), i]),
        qdedup(["convert".as_ref(), "-q".as_ref(), i, out.as_os_str()]),
        qdedup(["info".as_ref(), "--output".as_ref(), "json".as_ref(), i]),
        qdedup(["map".as_ref(), "--output".as_ref(), "json".as_ref(), i]),
        qdedup(["compare".as_ref(), i, i]),
    ];
    for r in &runs {
        assert_ne!(exit_code(r), 101, "qdedup panicked: {}", said(r));
    }
    let v = verdicts_of(&runs);
    if v.0.convert {
        // What qdedup converts, it converts to QEMU's view of the guest.
        assert_qemu_compare_same(img, "qcow2", &out);
    }
    v
}

fn verdicts_of(runs: &[std::process::Output; 5]) -> (Verdicts, String) {
    let ok = |k: usize| runs[k].status.success();
    let words = ["check", "convert", "info", "map", "compare"];
    let log = words
        .iter()
        .zip(runs)
        .map(|(w, o)| format!("  {w} -> {}: {}", exit_code(o), said(o).trim()))
        .collect::<Vec<_>>()
        .join("\n");
    let v = Verdicts {
        check: exit_code(&runs[0]),
        convert: ok(1),
        info: ok(2),
        map: ok(3),
        compare: ok(4),
    };
    (v, log)
}

/// The reader's documented refusals: what QEMU reads but `convert`, `map` and
/// `compare` refuse by name.
fn reader_refuses(mut v: Verdicts) -> Verdicts {
    v.convert = false;
    v.map = false;
    v.compare = false;
    v
}

/// A 1 MiB image with data at 0 and 512 KiB.
fn plain(dir: &Path, name: &str) -> PathBuf {
    let p = create_qcow2(dir.join(name), Some("1M"), &[]);
    qemu_io(&p, &["write -P 0x11 0 64k", "write -P 0x22 512k 64k"]);
    p
}

/// [`plain`] with a snapshot `s1` taken before a third write.
fn with_snapshot(dir: &Path, name: &str) -> PathBuf {
    let p = plain(dir, name);
    qemu_snapshot(&p, "s1");
    qemu_io(&p, &["write -P 0x33 0 64k"]);
    p
}

/// The file offset of the first snapshot table entry of `img`.
fn first_snapshot_entry(img: &Path) -> u64 {
    let h = header_of(img);
    assert_eq!(h.nb_snapshots, 1);
    h.snapshots_offset
}

/// `qdedup convert -o cluster_size=4k` of 1 MiB of random bytes, then the last
/// 3584 bytes of the file cut off: they are the unused zero tail of the refcount
/// table, which qdedup writes last (issue 18 D).
fn refcount_table_tail_cut(dir: &Path, name: &str) -> PathBuf {
    let raw = write_raw(dir, "random.raw", &random_bytes(18, 1 << 20));
    let p = dir.join(name);
    convert_json(&["-o", "cluster_size=4k"], &raw, &p);
    let h = header_of(&p);
    let len = std::fs::metadata(&p).unwrap().len();
    let rt_end = h.refcount_table_offset + (u64::from(h.refcount_table_clusters) << h.cluster_bits);
    assert_eq!(rt_end, len, "the refcount table ends the file");
    let bytes = std::fs::read(&p).unwrap();
    assert!(bytes[(len - 3584) as usize..].iter().all(|b| *b == 0));
    set_file_len(&p, len - 3584);
    p
}

type Recipe = (&'static str, Box<dyn Fn(&Path) -> PathBuf>, Verdicts);

fn v(check: i32, convert: bool, info: bool, map: bool, compare: bool) -> Verdicts {
    Verdicts {
        check,
        convert,
        info,
        map,
        compare,
    }
}

fn recipes() -> Vec<Recipe> {
    let refused = v(1, false, false, false, false);
    // QEMU refuses every open but `info`'s.
    let refused_but_info = v(1, false, true, false, false);
    let corrupt_but_read = v(2, true, true, true, true);
    let clean = v(0, true, true, true, true);
    vec![
        // A: autoclear bit 1 (data-file-raw) without a data file.
        (
            "data-file-raw without a data file",
            Box::new(|d: &Path| {
                let p = plain(d, "a.qcow2");
                patch_header(&p, off::AUTOCLEAR_FEATURES, 2);
                p
            }),
            refused_but_info,
        ),
        // B and its relatives: snapshot table offsets, snapshot entries.
        (
            "snapshot table offset 0xc000000000000000 without snapshots",
            Box::new(|d: &Path| {
                let p = plain(d, "b.qcow2");
                patch_header(&p, off::SNAPSHOTS_OFFSET, 0xc000_0000_0000_0000);
                p
            }),
            refused,
        ),
        (
            "snapshot table offset with bit 63 set, one snapshot",
            Box::new(|d: &Path| {
                let p = with_snapshot(d, "b63.qcow2");
                let at = first_snapshot_entry(&p);
                patch_header(&p, off::SNAPSHOTS_OFFSET, at | 1 << 63);
                p
            }),
            refused,
        ),
        (
            "too much extra metadata in a snapshot entry",
            Box::new(|d: &Path| {
                let p = with_snapshot(d, "extra.qcow2");
                let at = first_snapshot_entry(&p) + snapshot::off::EXTRA_DATA_SIZE as u64;
                patch_be(&p, at, 4, 2000);
                p
            }),
            refused,
        ),
        (
            "snapshot L1 table offset with bit 63 set",
            Box::new(|d: &Path| {
                let p = with_snapshot(d, "snapl1.qcow2");
                let at = first_snapshot_entry(&p) + snapshot::off::L1_TABLE_OFFSET as u64;
                patch_be(&p, at, 8, read_be(&p, at, 8) | 1 << 63);
                p
            }),
            // QEMU opens it (a snapshot's L1 table is read when the snapshot is);
            // its check cannot read the table.
            v(1, true, true, true, true),
        ),
        (
            "v3 snapshot entry with 8 bytes of extra data",
            Box::new(|d: &Path| {
                let p = with_snapshot(d, "short.qcow2");
                let at = first_snapshot_entry(&p) + snapshot::off::EXTRA_DATA_SIZE as u64;
                patch_be(&p, at, 4, 8);
                p
            }),
            corrupt_but_read,
        ),
        (
            "snapshot table past the end of the file",
            Box::new(|d: &Path| {
                let p = with_snapshot(d, "snapeof.qcow2");
                patch_header(&p, off::SNAPSHOTS_OFFSET, 1 << 30);
                p
            }),
            corrupt_but_read,
        ),
        // The refcount table, which reading does not use.
        (
            "refcount_table_clusters 0",
            Box::new(|d: &Path| {
                let p = plain(d, "rt0.qcow2");
                patch_header(&p, off::REFCOUNT_TABLE_CLUSTERS, 0);
                p
            }),
            v(2, false, false, false, false),
        ),
        (
            "refcount table past the end of the file",
            Box::new(|d: &Path| {
                let p = plain(d, "rteof.qcow2");
                patch_header(&p, off::REFCOUNT_TABLE_OFFSET, 1 << 30);
                p
            }),
            corrupt_but_read,
        ),
        // D.
        (
            "the zero tail of the refcount table cut off",
            Box::new(|d: &Path| refcount_table_tail_cut(d, "cut.qcow2")),
            clean,
        ),
        // The L1 table.
        (
            "unaligned L1 table offset with l1_size 0",
            Box::new(|d: &Path| {
                let p = create_qcow2(d.join("l1zero.qcow2"), Some("0"), &[]);
                assert_eq!(header_of(&p).l1_size, 0);
                let l1 = header_of(&p).l1_table_offset;
                patch_header(&p, off::L1_TABLE_OFFSET, l1 + 512);
                p
            }),
            refused,
        ),
        // Header extensions.
        (
            "bitmaps extension of 16 bytes",
            Box::new(|d: &Path| {
                let p = plain(d, "bmext.qcow2");
                set_only_extension(
                    &p,
                    QCOW2_EXT_MAGIC_BITMAPS,
                    &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 16],
                );
                p
            }),
            refused,
        ),
        (
            "backing format name of 17 bytes",
            Box::new(|d: &Path| {
                let p = plain(d, "bfmt.qcow2");
                set_only_extension(&p, QCOW2_EXT_MAGIC_BACKING_FORMAT, b"qcow2qcow2qcow2qc");
                p
            }),
            refused,
        ),
        (
            "crypto header extension in an unencrypted image",
            Box::new(|d: &Path| {
                let p = plain(d, "crypto.qcow2");
                let mut data = vec![0u8; 16];
                data[6] = 1; // LUKS header at 0x10000
                data[14] = 1; // of 0x10000 bytes
                set_only_extension(&p, QCOW2_EXT_MAGIC_CRYPTO_HEADER, &data);
                p
            }),
            refused,
        ),
        // Persistent bitmaps, which QEMU loads at every open.
        (
            "a reserved bit in the table of a bitmap not in use",
            Box::new(|d: &Path| {
                let p = plain(d, "bitmap.qcow2");
                qemu_img(["bitmap", "--add", p.to_str().unwrap(), "b0"]);
                qemu_io(&p, &["write -P 0x12 0 64k"]);
                let entry = first_bitmap_table_entry(&p);
                patch_be(&p, entry, 8, read_be(&p, entry, 8) | 2);
                p
            }),
            refused,
        ),
        // External data files and the corrupt bit (H).
        (
            "data file bit without a data file name",
            Box::new(|d: &Path| {
                let p = plain(d, "noname.qcow2");
                patch_header(&p, off::INCOMPATIBLE_FEATURES, 4);
                p
            }),
            refused_but_info,
        ),
        (
            "an external data file that exists",
            Box::new(|d: &Path| data_file_image(d, "df.qcow2", "df.raw", false)),
            clean,
        ),
        (
            "an external data file that does not exist",
            Box::new(|d: &Path| {
                let p = data_file_image(d, "dfgone.qcow2", "dfgone.raw", false);
                std::fs::remove_file(d.join("dfgone.raw")).unwrap();
                p
            }),
            refused_but_info,
        ),
        (
            "the corrupt bit",
            Box::new(|d: &Path| {
                let p = plain(d, "corrupt.qcow2");
                patch_header(&p, off::INCOMPATIBLE_FEATURES, 2);
                p
            }),
            clean,
        ),
        (
            "L1 table past the end of the file",
            Box::new(|d: &Path| {
                let p = plain(d, "l1eof.qcow2");
                patch_header(&p, off::L1_TABLE_OFFSET, 1 << 30);
                p
            }),
            corrupt_but_read,
        ),
    ]
}

/// A 1 MiB image whose data lives in the external file `data` (named by its
/// absolute path: QEMU opens a relative name from the current directory).
fn data_file_image(dir: &Path, name: &str, data: &str, raw: bool) -> PathBuf {
    let data = dir.join(data);
    let opt = format!(
        "data_file={},data_file_raw={}",
        data.display(),
        if raw { "on" } else { "off" }
    );
    let p = create_qcow2(dir.join(name), Some("1M"), &["-o", &opt]);
    qemu_io(&p, &["write -P 0x11 0 64k", "write -P 0x22 512k 64k"]);
    p
}

#[test]
fn every_command_gives_qemus_verdict_on_damaged_headers() {
    let dir = Scratch::new();
    let mut exercised = 0;
    for (what, make, expected_qemu) in recipes() {
        let d = dir.subdir(format!("case{exercised}"));
        let img = make(&d);
        let (q, qlog) = qemu_verdicts(&img, &d);
        assert_eq!(q, expected_qemu, "{what}: QEMU's verdicts changed:\n{qlog}");
        let (ours, log) = qdedup_verdicts(&img, &d);
        // The reader's documented refusals (docs/qcow2-input.md).
        let reader_refusal =
            ["the corrupt bit", "L1 table past the end of the file"].contains(&what);
        let want = if reader_refusal { reader_refuses(q) } else { q };
        assert_eq!(ours, want, "{what}:\nqdedup\n{log}\nqemu-img\n{qlog}");
        exercised += 1;
    }
    assert_eq!(exercised, 20, "every recipe ran");
}

/// The fields both tools print for a qcow2 image.
fn shared_info(v: &Value) -> Value {
    let mut o = serde_json::Map::new();
    for k in [
        "virtual-size",
        "cluster-size",
        "format",
        "dirty-flag",
        "format-specific",
        "encrypted",
    ] {
        if let Some(x) = v.get(k) {
            o.insert(k.into(), x.clone());
        }
    }
    Value::Object(o)
}

#[test]
fn info_describes_images_other_commands_refuse_like_qemu_img_info() {
    let dir = Scratch::new();
    let d = dir.path();
    let corrupt = plain(d, "corrupt.qcow2");
    patch_header(&corrupt, off::INCOMPATIBLE_FEATURES, 2);
    let raw_without_file = plain(d, "rawflag.qcow2");
    patch_header(&raw_without_file, off::AUTOCLEAR_FEATURES, 2);
    // Images with an external data file are described (data-file, data-file-raw)
    // and read: no problem listed.
    for (name, raw) in [("df", false), ("dfraw", true)] {
        let img = data_file_image(d, &format!("{name}.qcow2"), &format!("{name}.raw"), raw);
        let q = qemu_info(&img);
        let ours = report_json(&["info"], &img);
        assert_eq!(shared_info(&ours), shared_info(&q), "{}", img.display());
        assert!(
            ours.get("problems")
                .is_none_or(|p| p.as_array().unwrap().is_empty()),
            "{ours}"
        );
    }
    let cases = [
        (corrupt, "marked corrupt", "corrupt bit"),
        (
            raw_without_file,
            "data-file-raw",
            "data-file-raw requires a data file",
        ),
    ];
    for (img, problem, refusal) in &cases {
        let q = qemu_info(img);
        let ours = report_json(&["info"], img);
        assert_eq!(shared_info(&ours), shared_info(&q), "{}", img.display());
        let problems = ours["problems"].as_array().expect("problems listed");
        assert!(
            problems
                .iter()
                .any(|p| p.as_str().unwrap().contains(problem)),
            "{}: {problems:?}",
            img.display()
        );
        // The human form says it too.
        let h = qdedup(["info".as_ref(), img.as_os_str()]);
        assert!(said(&h).contains("Problems:") && said(&h).contains(problem));
        // convert still refuses the image, naming why.
        let out = d.join("out.qcow2");
        let c = qdedup(["convert".as_ref(), img.as_os_str(), out.as_os_str()]);
        assert_eq!(exit_code(&c), 1, "{}", said(&c));
        assert!(
            said(&c).contains(refusal),
            "{}: {}",
            img.display(),
            said(&c)
        );
        assert!(!out.exists());
    }
    // An encrypted image: described (its metadata is not encrypted), not read.
    let luks = create_qcow2(
        d.join("luks.qcow2"),
        Some("1M"),
        &[
            "--object",
            "secret,id=sec0,data=abc",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        ],
    );
    let q = qemu_info(&luks);
    let o = qdedup([
        "info".as_ref(),
        "--output".as_ref(),
        "json".as_ref(),
        luks.as_os_str(),
    ]);
    let ours: Value = serde_json::from_slice(&o.stdout).expect("info describes it");
    assert_eq!(ours["encrypted"], Value::Bool(true));
    assert_eq!(ours["encrypted"], q["encrypted"]);
    assert_eq!(ours["virtual-size"], q["virtual-size"]);
    assert!(ours["problems"][0].as_str().unwrap().contains("encrypted"));
    let c = qdedup([
        "convert".as_ref(),
        luks.as_os_str(),
        d.join("o.qcow2").as_os_str(),
    ]);
    assert!(said(&c).contains("encrypted image (LUKS)"), "{}", said(&c));

    let ours = report_json(&["info"], &cases[0].0);
    assert_eq!(
        ours["format-specific"]["data"]["corrupt"],
        Value::Bool(true)
    );
}

#[test]
fn a_cut_refcount_table_tail_is_read_by_every_command_like_qemu() {
    let dir = Scratch::new();
    let d = dir.path();
    let img = refcount_table_tail_cut(d, "cut.qcow2");
    let raw = d.join("random.raw");
    assert_qemu_check_clean(&img);
    let k = qdedup(["check".as_ref(), img.as_os_str()]);
    assert_eq!(exit_code(&k), 0, "{}", said(&k));
    let c = qdedup([
        "compare".as_ref(),
        "-F".as_ref(),
        "raw".as_ref(),
        img.as_os_str(),
        raw.as_os_str(),
    ]);
    assert_eq!(exit_code(&c), 0, "{}", said(&c));
    assert!(said(&c).contains("Images are identical."));
    let out = d.join("again.qcow2");
    convert_json(&[], &img, &out);
    assert_qemu_compare_same(&raw, "raw", &out);
    report_json(&["info"], &img);
    report_json(&["map"], &img);
}

/// `map` and `compare` find backing files as `convert` does: the same name
/// resolution, format names ("file" is raw, as in QEMU) and loop detection.
#[test]
fn every_command_opens_a_backing_chain_alike() {
    let dir = Scratch::new();
    let d = dir.path();
    let base = write_raw(d, "base.raw", &random_bytes(7, 1 << 20));
    let top = create_qcow2(
        d.join("top.qcow2"),
        Some("1M"),
        &["-b", base.to_str().unwrap(), "-F", "file"],
    );
    qemu_io(&top, &["write -P 0x11 0 64k"]);
    let t = top.as_os_str();
    assert_eq!(report_json(&["map"], &top), qemu_map(&top));
    let c = qdedup(["compare".as_ref(), t, t]);
    assert_eq!(exit_code(&c), 0, "{}", said(&c));
    let out = d.join("out.qcow2");
    convert_json(&[], &top, &out);
    assert_qemu_compare_same(&top, "qcow2", &out);

    // A chain that loops (qemu-img itself does not finish on it): every command
    // refuses it with the same error.
    let a = create_qcow2(d.join("a.qcow2"), Some("1M"), &[]);
    let b = create_qcow2(
        d.join("b.qcow2"),
        None,
        &["-b", a.to_str().unwrap(), "-F", "qcow2"],
    );
    qemu_img([
        "rebase",
        "-u",
        "-F",
        "qcow2",
        "-b",
        b.to_str().unwrap(),
        a.to_str().unwrap(),
    ]);
    let bo = b.as_os_str();
    let runs = [
        qdedup(["convert".as_ref(), bo, d.join("x.qcow2").as_os_str()]),
        qdedup(["map".as_ref(), bo]),
        qdedup(["compare".as_ref(), bo, bo]),
    ];
    for r in &runs {
        assert!(!r.status.success());
        assert!(said(r).contains("the backing chain loops"), "{}", said(r));
    }
}
