//! `qdedup::check` against images made by qemu-img/qemu-io, with `qemu-img check`
//! as the oracle. Corruption cases patch a named field at an offset read from the
//! image's own header and tables. A missing qemu-img fails these tests.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};

use qdedup::check::{
    check_file, check_image, repair_image, CheckOptions, CheckReport, FindingClass, FindingKind,
    RepairMode,
};
use qdedup::format::compressed::CompressedDescriptor;
use qdedup::format::header::off;
use qdedup::format::l1l2::{L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED};
use qdedup::io::MemFile;
use qdedup::sample::Rng;
use serde_json::Value;

mod common;

use common::{
    bitmaps_extension, convert_json, create_qcow2, exit_code, first_bitmap_table_entry, letters,
    qcow2_from_raw, qdedup, qemu, qemu_check_json, qemu_img, qemu_img_check, qemu_io, qemu_ok,
    qemu_snapshot, said, stderr, stdout, write_raw, Img, Patch, Scratch,
};

// ---------------------------------------------------------------- qemu tools

/// `qemu-img check --output=json`: exit code and the JSON document.
fn qemu_check(path: &Path) -> (i32, Value) {
    qemu_check_json([path])
}

fn ours(path: &Path) -> CheckReport {
    check_file(path, &CheckOptions::default()).expect("check runs")
}

fn ours_with(path: &Path, strict: bool, repair: Option<RepairMode>) -> CheckReport {
    let opts = CheckOptions {
        strict,
        repair,
        ..CheckOptions::default()
    };
    check_file(path, &opts).expect("check runs")
}

const QEMU_FIELDS: [&str; 8] = [
    "check-errors",
    "corruptions",
    "leaks",
    "image-end-offset",
    "total-clusters",
    "allocated-clusters",
    "fragmented-clusters",
    "compressed-clusters",
];

/// Our JSON has every figure qemu-img reports, with the same value, and omits the
/// zero-valued ones it omits.
fn assert_same_figures(path: &Path, r: &CheckReport) {
    assert_same_as(qemu_check(path), path, r);
}

fn assert_same_as((code, q): (i32, Value), path: &Path, r: &CheckReport) {
    let o = serde_json::to_value(r).unwrap();
    for f in QEMU_FIELDS {
        assert_eq!(
            o.get(f),
            q.get(f),
            "{f} differs for {}: ours {o:#}\nqemu {q:#}",
            path.display()
        );
    }
    assert_eq!(r.exit_code(), code, "exit code differs: {}", r.human());
}

fn fields(path: &Path) -> (i32, u64, u64) {
    let (code, q) = qemu_check(path);
    let n = |k: &str| q.get(k).and_then(Value::as_u64).unwrap_or(0);
    (code, n("corruptions"), n("leaks"))
}

// ---------------------------------------------------------------- raw patching

/// Bytes that deflate to roughly a third of their size.
fn semi_compressible(len: usize, seed: u64) -> Vec<u8> {
    letters(seed, len, 8)
}

fn has_finding(r: &CheckReport, kind: FindingKind, offset: u64) -> bool {
    r.findings
        .iter()
        .any(|f| f.kind == kind && f.offset == offset)
}

/// A 4 MiB image with data, duplicates, zeroed and unmapped ranges.
fn populated(dir: &Path, name: &str, opts: &str) -> PathBuf {
    let p = create_qcow2(dir.join(name), Some("4M"), &["-o", opts]);
    qemu_io(
        &p,
        &[
            "write -P 0x11 0 192k",
            "write -P 0x22 1M 64k",
            "write -P 0x11 2M 128k",
            "write -P 0x33 3M 3k",
            "write -z 64k 64k",
            "write -z -u 2M 64k",
        ],
    );
    p
}

// ---------------------------------------------------------------- clean images

#[test]
fn clean_images_of_every_geometry_are_clean_with_qemus_figures() {
    let dir = Scratch::new();
    let cases = [
        "compat=0.10,cluster_size=65536",
        "compat=0.10,cluster_size=512",
        "compat=1.1,cluster_size=512,refcount_bits=1",
        "compat=1.1,cluster_size=4096,refcount_bits=2",
        "compat=1.1,cluster_size=65536,refcount_bits=4",
        "compat=1.1,cluster_size=2097152,refcount_bits=8",
        "compat=1.1,cluster_size=4096,refcount_bits=16",
        "compat=1.1,cluster_size=65536,refcount_bits=32",
        "compat=1.1,cluster_size=512,refcount_bits=64",
        "compat=1.1,cluster_size=65536,lazy_refcounts=on",
        "compat=1.1,cluster_size=65536,preallocation=metadata",
    ];
    for (i, opts) in cases.iter().enumerate() {
        let p = populated(dir.path(), &format!("img{i}.qcow2"), opts);
        let r = ours(&p);
        assert!(r.is_clean(), "{opts}: {}", r.human());
        assert_eq!(r.relaxed_copied, 0, "{opts}");
        assert_same_figures(&p, &r);
        let h = Img::open(&p).h;
        assert_eq!(r.cluster_size, h.cluster_size());
        assert_eq!(r.refcount_bits, h.refcount_bits());
    }
}

#[test]
fn snapshot_tables_are_counted_and_shared_clusters_reported() {
    let dir = Scratch::new();
    for opts in ["compat=0.10", "compat=1.1,cluster_size=4096"] {
        let p = populated(dir.path(), "snap.qcow2", opts);
        qemu_snapshot(&p, "one");
        qemu_io(&p, &["write -P 0x44 0 64k", "write -P 0x55 3M 64k"]);
        qemu_snapshot(&p, "two");
        qemu_io(&p, &["write -P 0x66 1M 4k"]);
        let r = ours(&p);
        assert!(r.is_clean(), "{opts}: {}", r.human());
        assert_eq!(r.snapshots, 2);
        assert_eq!(r.relaxed_copied, 0);
        assert!(r.shared_clusters > 0, "snapshots share data clusters");
        assert!(
            r.max_refcount >= 3,
            "a cluster in two snapshots and the active tree"
        );
        assert_eq!(r.bytes_saved_by_sharing % r.cluster_size, 0);
        assert_same_figures(&p, &r);
        fs::remove_file(&p).unwrap();
    }
}

#[test]
fn compressed_clusters_of_both_types_are_verified_and_clean() {
    let dir = Scratch::new();
    let mut data = semi_compressible(1 << 20, 7);
    data.extend(vec![0x5a; 256 << 10]); // compresses to a few bytes
    data.extend(semi_compressible(256 << 10, 9));
    let raw = write_raw(dir.path(), "src.raw", &data);
    for (i, ty) in ["zlib", "zstd"].iter().enumerate() {
        for cs in ["4096", "65536"] {
            let p = dir.join(format!("c{i}-{cs}.qcow2"));
            qcow2_from_raw(
                &raw,
                &p,
                &[
                    "-c",
                    "-o",
                    &format!("compression_type={ty},cluster_size={cs}"),
                ],
            );
            let r = ours(&p);
            assert!(r.is_clean(), "{ty}/{cs}: {}", r.human());
            assert_eq!(r.compression_type, *ty);
            assert!(r.compressed_clusters > 0);
            assert_same_figures(&p, &r);
        }
    }
}

#[test]
fn extended_l2_overlay_with_backing_file_is_clean() {
    let dir = Scratch::new();
    let base = populated(dir.path(), "base.qcow2", "compat=1.1");
    let ov = create_qcow2(
        dir.join("overlay.qcow2"),
        None,
        &[
            "-b",
            base.to_str().unwrap(),
            "-F",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=65536",
        ],
    );
    qemu_io(
        &ov,
        &[
            "write -P 0x77 4k 4k",
            "write -P 0x78 130k 6k",
            "write -z 1M 8k",
            "write -z -u 2M 64k",
            "write -P 0x79 3M 64k",
        ],
    );
    let r = ours(&ov);
    assert!(r.is_clean(), "{}", r.human());
    assert!(r.extended_l2);
    assert_eq!(r.backing_file.as_deref(), base.to_str());
    assert_same_figures(&ov, &r);
}

#[test]
fn persistent_bitmaps_are_counted() {
    let dir = Scratch::new();
    let p = populated(dir.path(), "bm.qcow2", "compat=1.1");
    qemu_img(["bitmap", "--add", p.to_str().unwrap(), "b0"]);
    qemu_img(["bitmap", "--add", "-g", "512k", p.to_str().unwrap(), "b1"]);
    qemu_io(&p, &["write -P 0x12 0 1M", "write -P 0x13 3M 64k"]);
    let r = ours(&p);
    assert!(r.is_clean(), "{}", r.human());
    assert_same_figures(&p, &r);
    // Dropping the bitmaps' autoclear bit makes QEMU (and us) ignore them: leaks.
    let img = Img::open(&p);
    img.set_header(off::AUTOCLEAR_FEATURES, img.h.autoclear_features & !1);
    let r = ours(&p);
    assert_eq!(r.exit_code(), 3, "{}", r.human());
    assert_same_figures(&p, &r);
}

#[test]
fn broken_bitmaps_give_qemu_img_checks_exit_code() {
    let dir = Scratch::new();
    let fresh = || {
        let p = populated(dir.path(), "bm.qcow2", "compat=1.1");
        qemu_img(["bitmap", "--add", p.to_str().unwrap(), "b0"]);
        // Writes through the enabled bitmap give it a table with data clusters.
        qemu_io(&p, &["write -P 0x12 0 1M", "write -P 0x13 3M 64k"]);
        p
    };
    let p = fresh();
    let (ext, dir_off) = bitmaps_extension(&p);
    let first_entry = first_bitmap_table_entry(&p);
    let cases: Vec<(&str, Patch, i32, &str)> = vec![
        // QEMU cannot open these (it loads the directory and the tables of
        // bitmaps not in use at open): exit 1.
        (
            "reserved bit in a table entry",
            Box::new(move |i: &Img| {
                i.put_u64(first_entry, i.u64_at(first_entry) | 0x2);
            }),
            1,
            "bitmap table",
        ),
        (
            "directory past the end of the file",
            Box::new(move |i: &Img| {
                i.put_u64(ext + 16, 1 << 40);
            }),
            1,
            "bitmap directory",
        ),
        (
            "more bitmaps than the extension says",
            Box::new(move |i: &Img| {
                i.put_u64(ext, 0); // nb_bitmaps 0 with a non-empty directory
            }),
            1,
            "bitmaps extension",
        ),
        (
            "a table size that does not fit the disk size and granularity",
            Box::new(move |i: &Img| {
                let size_and_flags = i.u64_at(dir_off + 8);
                i.put_u64(dir_off + 8, size_and_flags + (1 << 32));
            }),
            1,
            "entries",
        ),
        // A bitmap in use is not loaded at open, but QEMU's check then fails
        // loading its table: exit 1 as well.
        (
            "reserved bit in a table entry of a bitmap in use",
            Box::new(move |i: &Img| {
                i.put_u64(first_entry, i.u64_at(first_entry) | 0x2);
                let flags_word = i.u64_at(dir_off + 8);
                i.put_u64(dir_off + 8, flags_word | 1);
            }),
            1,
            "bitmap table",
        ),
    ];
    for (what, patch, code, names) in cases {
        let p = fresh();
        patch(&Img::open(&p));
        let q = qemu_img_check(&p);
        assert_eq!(q.status.code(), Some(code), "{what}: qemu-img check");
        let o = qdedup(["check".as_ref(), p.as_os_str()]);
        let out = said(&o);
        assert_eq!(exit_code(&o), code, "{what}: {out}");
        assert!(out.contains(names), "{what}: {out}");
        fs::remove_file(&p).unwrap();
    }
}

// ---------------------------------------------------------------- leaks

#[test]
fn raised_refcounts_are_leaks_like_qemus_and_repair_frees_them() {
    let dir = Scratch::new();
    for opts in [
        "compat=1.1,refcount_bits=4",
        "compat=0.10,cluster_size=4096",
    ] {
        let p = populated(dir.path(), "leak.qcow2", opts);
        let img = Img::open(&p);
        // The header cluster and the refcount table cluster carry no COPIED flag.
        img.set_refcount(0, 2);
        let rt = img.h.refcount_table_offset / img.cs();
        img.set_refcount(rt, 3);
        let r = ours(&p);
        assert_eq!(r.exit_code(), 3, "{}", r.human());
        assert_eq!(r.leaks, 2);
        assert!(has_finding(&r, FindingKind::LeakedCluster, 0));
        assert!(r.findings.iter().all(|f| f.class == FindingClass::Leak));
        assert_same_figures(&p, &r);

        let fixed = ours_with(&p, false, Some(RepairMode::Leaks));
        assert_eq!(fixed.leaks_fixed, 2, "{}", fixed.human());
        assert_eq!(fixed.exit_code(), 0);
        assert_eq!(
            fields(&p),
            (0, 0, 0),
            "qemu-img check is clean after the repair"
        );
        assert_eq!(img.refcount(0), 1);
        fs::remove_file(&p).unwrap();
    }
}

#[test]
fn refcounts_stored_past_the_end_of_the_file_are_leaks_qemu_ignores() {
    let dir = Scratch::new();
    let p = populated(dir.path(), "tail.qcow2", "compat=1.1,cluster_size=4096");
    let img = Img::open(&p);
    let beyond = img.len().div_ceil(img.cs()) + 5;
    img.set_refcount(beyond, 1);
    assert_eq!(fields(&p), (0, 0, 0), "qemu-img does not look past the end");
    let r = ours(&p);
    assert_eq!(r.exit_code(), 3, "{}", r.human());
    assert!(has_finding(
        &r,
        FindingKind::RefcountBeyondEof,
        beyond * img.cs()
    ));
    let fixed = ours_with(&p, false, Some(RepairMode::All));
    assert_eq!(fixed.exit_code(), 0, "{}", fixed.human());
    assert_eq!(img.refcount(beyond), 0);
}

// ---------------------------------------------------------------- COPIED

#[test]
fn copied_on_a_shared_cluster_is_a_corruption_at_the_l2_entry() {
    let dir = Scratch::new();
    let p = populated(dir.path(), "shared.qcow2", "compat=1.1");
    qemu_snapshot(&p, "s");
    let img = Img::open(&p);
    let e = img.l2_entry(0, 1); // guest 64k..128k: data shared with the snapshot
    let raw = img.u64_at(e);
    assert_eq!(
        raw & QCOW_OFLAG_COPIED,
        0,
        "qemu clears COPIED on shared clusters"
    );
    assert_eq!(img.refcount((raw & L2E_OFFSET_MASK) / img.cs()), 2);
    img.put_u64(e, raw | QCOW_OFLAG_COPIED);

    let r = ours(&p);
    assert_eq!(r.exit_code(), 2, "{}", r.human());
    assert_eq!(r.corruptions, 1);
    assert!(
        has_finding(&r, FindingKind::CopiedFlag, e),
        "{:#?}",
        r.findings
    );
    assert_same_figures(&p, &r);

    let fixed = ours_with(&p, false, Some(RepairMode::Copied));
    assert_eq!(fixed.corruptions_fixed, 1, "{}", fixed.human());
    assert_eq!(fixed.exit_code(), 0);
    assert_eq!(img.u64_at(e), raw);
    assert_eq!(fields(&p), (0, 0, 0));
}

#[test]
fn refcount_one_without_copied_is_relaxed_unless_strict() {
    let dir = Scratch::new();
    let p = populated(dir.path(), "relaxed.qcow2", "compat=1.1,cluster_size=4096");
    let img = Img::open(&p);
    let e = img.l2_entry(0, 2);
    let raw = img.u64_at(e);
    assert_ne!(raw & QCOW_OFLAG_COPIED, 0);
    img.put_u64(e, raw & !QCOW_OFLAG_COPIED);
    let l1e = img.l1_entry(0);
    let l1raw = img.u64_at(l1e);
    img.put_u64(l1e, l1raw & !QCOW_OFLAG_COPIED);
    assert_eq!(fields(&p), (2, 2, 0), "qemu-img counts both as corruptions");

    let r = ours(&p);
    assert_eq!(r.exit_code(), 0, "{}", r.human());
    assert_eq!(r.relaxed_copied, 2);
    assert!(r
        .findings
        .iter()
        .any(|f| f.class == FindingClass::RelaxedCopied && f.offset == e));
    assert!(has_finding(&r, FindingKind::RelaxedCopied, l1e));

    let strict = ours_with(&p, true, None);
    assert_eq!(strict.exit_code(), 2);
    assert_eq!(strict.corruptions, 2);
    assert_same_figures(&p, &strict);

    let fixed = ours_with(&p, false, Some(RepairMode::Copied));
    assert_eq!(fixed.relaxed_copied_fixed, 2, "{}", fixed.human());
    assert_eq!(fixed.relaxed_copied, 0);
    assert_eq!(fields(&p), (0, 0, 0), "qemu-img agrees after the repair");
    assert_eq!(img.u64_at(e), raw);
    assert_eq!(img.u64_at(l1e), l1raw);
}

#[test]
fn sharing_made_by_patching_l2_entries_is_clean_and_measured() {
    let dir = Scratch::new();
    let p = populated(dir.path(), "dedup.qcow2", "compat=1.1");
    let img = Img::open(&p);
    let (a, b) = (img.l2_entry(0, 0), img.l2_entry(0, 2));
    let (ra, rb) = (img.u64_at(a), img.u64_at(b));
    let (ca, cb) = (
        (ra & L2E_OFFSET_MASK) / img.cs(),
        (rb & L2E_OFFSET_MASK) / img.cs(),
    );
    // Both guest clusters hold 0x11 data: point b at a's cluster, as a dedup writer would.
    img.put_u64(a, ra & !QCOW_OFLAG_COPIED);
    img.put_u64(b, ra & !QCOW_OFLAG_COPIED);
    img.set_refcount(ca, 2);
    img.set_refcount(cb, 0);
    let r = ours(&p);
    assert!(r.is_clean(), "{}", r.human());
    assert_eq!(r.shared_clusters, 1);
    assert_eq!(r.max_refcount, 2);
    assert_eq!(r.bytes_saved_by_sharing, img.cs());
    assert_same_figures(&p, &r);
    // COPIED on one of the two references is a corruption (writes would go in place).
    img.put_u64(b, ra | QCOW_OFLAG_COPIED);
    let r = ours(&p);
    assert_eq!(r.exit_code(), 2);
    assert!(has_finding(&r, FindingKind::CopiedFlag, b));
    assert_same_figures(&p, &r);
}

#[test]
fn refcount_overflow_is_a_corruption() {
    let dir = Scratch::new();
    let p = populated(dir.path(), "ovf.qcow2", "compat=1.1,refcount_bits=1");
    let img = Img::open(&p);
    let (a, b) = (img.l2_entry(0, 0), img.l2_entry(0, 2));
    let (ra, rb) = (img.u64_at(a), img.u64_at(b));
    // Two references to one cluster; the 1-bit refcount stays 1 (so COPIED matches it).
    img.put_u64(b, ra);
    img.set_refcount((rb & L2E_OFFSET_MASK) / img.cs(), 0);
    let r = ours(&p);
    assert_eq!(r.exit_code(), 2);
    assert_eq!(r.corruptions, 1, "{}", r.human());
    assert!(r
        .findings
        .iter()
        .any(|f| f.kind == FindingKind::RefcountOverflow));
    assert_same_figures(&p, &r);
}

// ---------------------------------------------------------------- corruptions

#[test]
fn refcount_below_the_references_is_a_corruption_and_blocks_repair() {
    let dir = Scratch::new();
    let p = populated(dir.path(), "low.qcow2", "compat=1.1");
    let img = Img::open(&p);
    let raw = img.u64_at(img.l2_entry(0, 0));
    let c = (raw & L2E_OFFSET_MASK) / img.cs();
    img.set_refcount(c, 0);
    let r = ours(&p);
    assert_eq!(r.exit_code(), 2, "{}", r.human());
    assert!(has_finding(&r, FindingKind::RefcountTooLow, c * img.cs()));
    // COPIED with a stored refcount of 0 is wrong too, as qemu-img says.
    assert!(has_finding(&r, FindingKind::CopiedFlag, img.l2_entry(0, 0)));
    assert_same_figures(&p, &r);

    let before = fs::read(&p).unwrap();
    let refused = ours_with(&p, false, Some(RepairMode::All));
    assert!(refused.repair_refused.is_some(), "{}", refused.human());
    assert_eq!(refused.exit_code(), 2);
    assert_eq!(
        fs::read(&p).unwrap(),
        before,
        "a refused repair writes nothing"
    );
}

#[test]
fn reserved_bits_in_l1_and_l2_entries_are_corruptions() {
    let dir = Scratch::new();
    let p = populated(dir.path(), "rsv.qcow2", "compat=1.1");
    let img = Img::open(&p);
    let l2e = img.l2_entry(0, 1);
    img.put_u64(l2e, img.u64_at(l2e) | 0x2);
    let l1e = img.l1_entry(0);
    img.put_u64(l1e, img.u64_at(l1e) | 0x0100_0000_0000_0000);
    let r = ours(&p);
    assert_eq!(r.exit_code(), 2);
    assert!(has_finding(&r, FindingKind::ReservedBits, l2e));
    assert!(has_finding(&r, FindingKind::ReservedBits, l1e));
    assert_same_figures(&p, &r);
}

#[test]
fn misaligned_tables_and_data_are_corruptions() {
    let dir = Scratch::new();
    // An L2 table offset that is not cluster aligned.
    let p = populated(dir.path(), "l2.qcow2", "compat=1.1");
    let img = Img::open(&p);
    let l1e = img.l1_entry(0);
    img.put_u64(l1e, img.u64_at(l1e) + 512);
    let r = ours(&p);
    assert_eq!(r.exit_code(), 2);
    assert!(
        has_finding(&r, FindingKind::Unaligned, l1e),
        "{:#?}",
        r.findings
    );
    assert_eq!(fields(&p).0, 2);

    // A data cluster offset that is not cluster aligned.
    let p = populated(dir.path(), "data.qcow2", "compat=1.1");
    let img = Img::open(&p);
    let l2e = img.l2_entry(0, 1);
    img.put_u64(l2e, img.u64_at(l2e) + 512);
    let r = ours(&p);
    assert!(
        has_finding(&r, FindingKind::Unaligned, l2e),
        "{:#?}",
        r.findings
    );
    assert_same_figures(&p, &r);

    // An unaligned refcount block: refcount lookups fail (check errors, exit 1).
    let p = populated(dir.path(), "rb.qcow2", "compat=1.1");
    let img = Img::open(&p);
    let rt = img.h.refcount_table_offset;
    img.put_u64(rt, img.u64_at(rt) + 512);
    let r = ours(&p);
    assert_eq!(r.exit_code(), 1, "{}", r.human());
    assert!(has_finding(&r, FindingKind::Unaligned, rt));
    assert!(r
        .findings
        .iter()
        .any(|f| f.class == FindingClass::CheckError));
    assert_same_figures(&p, &r);

    // A snapshot whose L1 table offset is not cluster aligned.
    let p = populated(dir.path(), "snap.qcow2", "compat=1.1");
    qemu_snapshot(&p, "s");
    let img = Img::open(&p);
    let sn = img.h.snapshots_offset;
    img.put_u64(sn, img.u64_at(sn) + 512);
    let r = ours(&p);
    assert!(
        has_finding(&r, FindingKind::Snapshot, sn),
        "{:#?}",
        r.findings
    );
    assert_same_figures(&p, &r);
}

#[test]
fn references_past_the_end_of_the_file_are_corruptions() {
    let dir = Scratch::new();
    // An L2 entry pointing far past the end of the file.
    let p = populated(dir.path(), "l2eof.qcow2", "compat=1.1");
    let img = Img::open(&p);
    let l2e = img.l2_entry(0, 1);
    let far = (img.len().div_ceil(img.cs()) + 100) * img.cs();
    img.put_u64(l2e, far | QCOW_OFLAG_COPIED);
    let r = ours(&p);
    assert_eq!(r.exit_code(), 2);
    assert!(
        has_finding(&r, FindingKind::PastEof, l2e),
        "{:#?}",
        r.findings
    );
    assert_same_figures(&p, &r);

    // A refcount block past the end of the file.
    let p = populated(dir.path(), "rbeof.qcow2", "compat=1.1");
    let img = Img::open(&p);
    let rt = img.h.refcount_table_offset;
    let far = (img.len().div_ceil(img.cs()) + 10) * img.cs();
    img.put_u64(rt, far);
    let r = ours(&p);
    assert_eq!(r.exit_code(), 2);
    assert!(
        has_finding(&r, FindingKind::RefcountBlock, rt),
        "{:#?}",
        r.findings
    );
    assert_same_figures(&p, &r);
}

#[test]
fn compressed_entries_with_copied_are_corruptions_that_repair_clears() {
    let dir = Scratch::new();
    let raw = write_raw(dir.path(), "src.raw", &semi_compressible(512 << 10, 3));
    let p = dir.join("cc.qcow2");
    qcow2_from_raw(&raw, &p, &["-c"]);
    let img = Img::open(&p);
    let e = img.l2_entry(0, 3);
    let v = img.u64_at(e);
    assert_ne!(v & QCOW_OFLAG_COMPRESSED, 0);
    img.put_u64(e, v | QCOW_OFLAG_COPIED);
    let r = ours(&p);
    assert!(has_finding(&r, FindingKind::CopiedFlag, e));
    assert_same_figures(&p, &r);
    let fixed = ours_with(&p, false, Some(RepairMode::Copied));
    assert_eq!(
        (fixed.exit_code(), fixed.corruptions_fixed),
        (0, 1),
        "{}",
        fixed.human()
    );
    assert_eq!(img.u64_at(e), v);
}

/// iotest 214: a compressed descriptor one sector too short. qemu-img check is
/// clean, but reading the cluster fails; qdedup decompresses and reports it.
#[test]
fn a_compressed_stream_one_sector_short_is_a_corruption_qemu_misses() {
    let dir = Scratch::new();
    let raw = write_raw(dir.path(), "src.raw", &semi_compressible(1 << 20, 11));
    for ty in ["zlib", "zstd"] {
        let p = dir.join(format!("{ty}.qcow2"));
        qcow2_from_raw(&raw, &p, &["-c", "-o", &format!("compression_type={ty}")]);
        let img = Img::open(&p);
        let cb = img.h.cluster_bits;
        // The entry with the longest stream whose shortened range still touches the
        // same clusters (so the refcounts stay right and qemu-img stays silent).
        let (index, entry, desc) = (0..16)
            .map(|i| {
                let e = img.l2_entry(0, i);
                (i, e, CompressedDescriptor::decode(img.u64_at(e), cb))
            })
            .filter(|(_, _, d)| {
                let end = d.host_offset + d.read_len();
                d.extra_sectors > 0 && (end - 1) >> cb == (end - 513) >> cb
            })
            .max_by_key(|(_, _, d)| d.extra_sectors)
            .expect("a multi-sector stream");
        let short = CompressedDescriptor {
            extra_sectors: desc.extra_sectors - 1,
            ..desc
        };
        img.put_u64(entry, short.encode(cb) | QCOW_OFLAG_COMPRESSED);
        assert_eq!(
            fields(&p),
            (0, 0, 0),
            "{ty}: qemu-img check does not decompress"
        );
        let read = format!("read {} 64k", index * img.cs());
        let out = qemu(
            "qemu-io",
            [
                "-r".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                "-c".as_ref(),
                read.as_ref(),
                p.as_os_str(),
            ],
        );
        let said = said(&out);
        assert!(
            said.contains("failed"),
            "{ty}: qemu cannot read the cluster: {said}"
        );
        let r = ours(&p);
        assert_eq!(r.exit_code(), 2, "{ty}: {}", r.human());
        assert_eq!(r.corruptions, 1);
        assert!(
            has_finding(&r, FindingKind::CompressedStream, entry),
            "{:#?}",
            r.findings
        );
    }
}

#[test]
fn the_zero_flag_in_a_v2_image_is_a_corruption_qemu_misses() {
    let dir = Scratch::new();
    let p = populated(dir.path(), "v2.qcow2", "compat=0.10");
    let img = Img::open(&p);
    let e = img.l2_entry(0, 1);
    img.put_u64(e, img.u64_at(e) | 1);
    assert_eq!(fields(&p), (0, 0, 0));
    let r = ours(&p);
    assert_eq!(r.exit_code(), 2);
    assert!(has_finding(&r, FindingKind::V2ZeroFlag, e));
}

/// With an external data file, guest cluster 0 lives at host offset 0; zeroed
/// with its preallocation kept, its entry is the zero flag and COPIED with offset
/// 0, which QEMU classifies as a plain zero cluster (not allocated): `check`
/// decodes it the same way (it used to count it as allocated).
#[test]
fn a_zeroed_data_file_cluster_at_host_offset_0_is_not_allocated() {
    let dir = tempfile::tempdir().unwrap();
    // QEMU opens a relative data file name from the current directory.
    let opt = format!(
        "data_file={},cluster_size=64k",
        dir.path().join("d.raw").display()
    );
    let p = create_qcow2(dir.path().join("df.qcow2"), Some("1M"), &["-o", &opt]);
    qemu_io(&p, &["write -P 1 0 128k", "write -z 0 64k"]);
    let img = Img::open(&p);
    assert_eq!(img.u64_at(img.l2_entry(0, 0)), QCOW_OFLAG_COPIED | 1);
    let r = ours(&p);
    assert_same_figures(&p, &r);
    assert_eq!((r.allocated_clusters, r.exit_code()), (1, 0));
}

#[test]
fn conflicting_subcluster_bits_are_corruptions() {
    let dir = Scratch::new();
    let p = create_qcow2(dir.join("ext.qcow2"), Some("4M"), &["-o", "extended_l2=on"]);
    qemu_io(&p, &["write -P 0x61 0 64k", "write -P 0x62 64k 4k"]);
    let img = Img::open(&p);
    let e = img.l2_entry(0, 0);
    let bitmap = img.u64_at(e + 8);
    assert_eq!(bitmap & 0xffff_ffff, 0xffff_ffff, "fully allocated cluster");
    img.put_u64(e + 8, bitmap | 1 << 32);
    let r = ours(&p);
    assert!(has_finding(&r, FindingKind::SubclusterBitmap, e));
    assert_same_figures(&p, &r);
}

#[test]
fn mutated_images_never_panic() {
    let dir = Scratch::new();
    let p = populated(dir.path(), "fuzz.qcow2", "compat=1.1,cluster_size=4096");
    qemu_snapshot(&p, "s");
    qemu_io(&p, &["write -c -P 0x42 3584k 4k", "write -P 0x43 0 4k"]);
    let orig = fs::read(&p).unwrap();
    let meta_end = orig.len().min(64 << 10);
    let mut rng = Rng::new(0x9e37_79b9_7f4a_7c15);
    let mut rnd = move || rng.next_u64();
    // Rounds whose mutation left the image clean: the repair must not touch them.
    let mut untouched = 0;
    let opts = CheckOptions::default();
    let repair = CheckOptions {
        repair: Some(RepairMode::All),
        ..CheckOptions::default()
    };
    let (mut checked, mut refused, mut repaired, mut corrupt) = (0, 0, 0, 0);
    for round in 0..400 {
        let mut b = orig.clone();
        for _ in 0..=rnd() % 8 {
            let at = (rnd() % meta_end as u64) as usize;
            b[at] = if round % 3 == 0 { 0xff } else { rnd() as u8 };
        }
        if round % 50 == 0 {
            b.truncate((rnd() % orig.len() as u64) as usize);
        }
        let Ok(before) = check_image(&MemFile::new(b.clone()), "fuzz", &opts) else {
            // Refused as QEMU refuses to open it: also a verdict, not a panic.
            refused += 1;
            continue;
        };
        checked += 1;
        if before.corruptions > 0 {
            corrupt += 1;
        }
        // The fuzz target's oracles: a repair never panics, leaves a clean image
        // untouched and never adds corruptions.
        let f = MemFile::new(b.clone());
        if let Ok(after) = repair_image(&f, "fuzz", &repair) {
            repaired += 1;
            if before.is_clean() && before.relaxed_copied == 0 {
                assert_eq!(f.contents(), b);
                untouched += 1;
            }
            assert!(after.corruptions <= before.corruptions, "{}", after.human());
        }
    }
    // The mutations must reach the checker and the repair, and find damage: a
    // run in which every round is refused at open would show nothing.
    let counts = format!(
        "checked {checked}, refused {refused}, repaired {repaired}, corrupt {corrupt}, \
         clean and untouched {untouched}"
    );
    eprintln!("{counts}");
    assert_eq!(checked + refused, 400);
    assert!(
        checked >= 200 && repaired >= 200 && corrupt >= 50 && untouched >= 50,
        "{counts}"
    );
}

#[test]
fn luks_header_area_is_counted() {
    let dir = Scratch::new();
    let secret = "secret,id=sec0,data=123456";
    let p = create_qcow2(
        dir.join("luks.qcow2"),
        Some("4M"),
        &[
            "--object",
            secret,
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        ],
    );
    let image_opts = format!(
        "driver=qcow2,file.filename={},encrypt.key-secret=sec0",
        p.display()
    );
    qemu_ok(
        "qemu-io",
        [
            "--object",
            secret,
            "--image-opts",
            "-c",
            "write -P 0x11 0 128k",
            &image_opts,
        ],
    );
    let r = ours(&p);
    assert!(r.is_clean(), "{}", r.human());
    let q = qemu_check_json(["--object", secret, "--image-opts", &image_opts]);
    assert_same_as(q, &p, &r);
}

#[test]
fn json_report_uses_qemus_names_and_ours_in_kebab_case() {
    let dir = Scratch::new();
    let p = populated(dir.path(), "json.qcow2", "compat=1.1");
    let img = Img::open(&p);
    img.set_refcount(0, 2);
    let entry = img.l2_entry(0, 0);
    img.put_u64(entry, img.u64_at(entry) & !QCOW_OFLAG_COPIED);
    let r = ours(&p);
    let json = serde_json::to_value(&r).unwrap();
    assert_eq!(json["filename"], p.to_str().unwrap());
    assert_eq!(json["format"], "qcow2");
    assert_eq!(json["check-errors"], 0);
    assert_eq!(json["leaks"], 1);
    assert!(
        json.get("corruptions").is_none(),
        "zero qemu fields are omitted: {json:#}"
    );
    assert_eq!(json["relaxed-copied"], 1);
    for k in [
        "shared-clusters",
        "max-refcount",
        "bytes-saved-by-sharing",
        "image-end-offset",
        "total-clusters",
        "allocated-clusters",
    ] {
        assert!(json[k].is_u64(), "{k} in {json:#}");
    }
    let findings = &json["findings"];
    assert_eq!(findings[0]["class"], "leak");
    assert_eq!(findings[0]["kind"], "leaked-cluster");
    assert_eq!(findings[0]["structure"], "cluster");
    assert_eq!(findings[0]["offset"], 0);
    assert!(findings[0]["message"]
        .as_str()
        .unwrap()
        .contains("refcount=2 reference=1"));
    assert_eq!(findings[1]["class"], "relaxed-copied");
    assert_eq!(findings[1]["offset"], entry);
    assert_eq!(r.exit_code(), 3);
    let human = r.human();
    assert!(
        human.contains("1 leaked clusters were found on the image."),
        "{human}"
    );
    assert!(human.contains("Image end offset: "), "{human}");
    assert!(
        human.contains("1 entries have refcount 1 without QCOW_OFLAG_COPIED"),
        "{human}"
    );
}

/// Interrupting a repair after any number of writes never leaves corruptions.
#[test]
fn an_interrupted_repair_leaves_a_sound_image() {
    let dir = Scratch::new();
    let p = populated(dir.path(), "crash.qcow2", "compat=1.1,cluster_size=4096");
    let img = Img::open(&p);
    img.set_refcount(0, 3);
    let last = img.len() / img.cs() - 1;
    img.set_refcount(last + 3, 1);
    for i in [0, 1, 2, 16] {
        let e = img.l2_entry(0, i);
        img.put_u64(e, img.u64_at(e) & !QCOW_OFLAG_COPIED);
    }
    let damaged = fs::read(&p).unwrap();
    let opts = CheckOptions {
        repair: Some(RepairMode::All),
        ..CheckOptions::default()
    };
    let plain = CheckOptions::default();
    let (mut completed, mut interrupted) = (false, 0);
    for fail_after in 0..10 {
        let mut f = MemFile::new(damaged.clone());
        f.fail_after_writes = Some(fail_after);
        let res = repair_image(&f, "crash", &opts);
        let after = check_image(&MemFile::new(f.contents()), "after", &plain).unwrap();
        assert_eq!(
            after.corruptions,
            0,
            "after {fail_after} writes: {}",
            after.human()
        );
        match res {
            Ok(r) => {
                assert!(r.is_clean(), "{}", r.human());
                assert_eq!((r.leaks_fixed, r.relaxed_copied_fixed), (2, 4));
                completed = true;
                break;
            }
            Err(_) => interrupted += 1,
        }
    }
    assert!(completed, "the repair finishes with enough writes");
    // Interrupted at every write but the last: 2 refcounts and 4 L2 entries to
    // write, maybe in fewer blocks.
    assert!(interrupted >= 2, "only {interrupted} interrupted repairs");
}

// ---------------------------------------------------------------- CLI

#[test]
fn cli_check_prints_like_qemu_img_and_exits_with_its_codes() {
    let dir = Scratch::new();
    let p = populated(dir.path(), "cli.qcow2", "compat=1.1");
    let check = |extra: &[&str], img: &Path| {
        let o = qdedup(
            ["check"]
                .iter()
                .chain(extra)
                .map(OsStr::new)
                .chain([img.as_os_str()]),
        );
        (exit_code(&o), stdout(&o), stderr(&o))
    };
    let (code, out, _) = check(&[], &p);
    assert_eq!(code, 0);
    assert!(
        out.starts_with("No errors were found on the image.\n"),
        "{out}"
    );

    Img::open(&p).set_refcount(0, 2);
    let (code, out, err) = check(&[], &p);
    assert_eq!(code, 3);
    assert!(out.contains("1 leaked clusters were found"), "{out}");
    assert!(
        err.contains("Leaked cluster at 0x0: cluster 0 refcount=2 reference=1"),
        "{err}"
    );

    let (code, out, _) = check(&["--output", "json", "--repair", "leaks"], &p);
    assert_eq!(code, 0, "{out}");
    let j: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(j["leaks-fixed"], 1);
    assert_eq!(j["repair"], "leaks");

    let img = Img::open(&p);
    let e = img.l2_entry(0, 0);
    img.put_u64(e, img.u64_at(e) & !QCOW_OFLAG_COPIED);
    assert_eq!(check(&[], &p).0, 0);
    assert_eq!(check(&["--strict"], &p).0, 2);

    let raw = write_raw(dir.path(), "not.qcow2", &[0u8; 4096]);
    let (code, _, err) = check(&[], &raw);
    // Not qcow2: qemu-img's "format does not support checks", with its exit code.
    assert_eq!(
        code,
        exit_code(&qemu("qemu-img", ["check".as_ref(), raw.as_os_str()]))
    );
    assert_eq!(code, 63);
    assert!(err.contains("is not a qcow2 image"), "{err}");
}

#[test]
fn images_qdedup_converts_check_clean_with_their_sharing_measured() {
    let dir = Scratch::new();
    let block = semi_compressible(256 << 10, 5);
    let mut data = block.clone();
    data.extend(vec![0u8; 128 << 10]);
    data.extend(&block);
    data.extend(&block);
    let raw = write_raw(dir.path(), "dup.raw", &data);
    for compress in [false, true] {
        let out = dir.join(format!("out-{compress}.qcow2"));
        let args: &[&str] = if compress {
            &["--force", "-c"]
        } else {
            &["--force"]
        };
        convert_json(args, &raw, &out);
        let r = ours(&out);
        assert!(r.is_clean(), "{}", r.human());
        assert_eq!(r.relaxed_copied, 0);
        if compress {
            assert_eq!(r.shared_compressed_streams, 4, "{}", r.human());
        } else {
            assert_eq!(r.shared_clusters, 4, "{}", r.human());
            assert_eq!(r.bytes_saved_by_sharing, 8 * r.cluster_size);
            assert_eq!(r.max_refcount, 3);
        }
        assert_same_figures(&out, &r);
    }
}
