//! Corrupted images made the way QEMU's iotests (060, 080, 138, 214) make them:
//! patch one header or table field. `convert` and `check` must fail with one line
//! naming the structure and offset, quickly, without a panic or a big allocation.

#![allow(clippy::many_single_char_names, clippy::type_complexity)] // terse test fixtures

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const CS: u64 = 65536;

/// A 64 KiB-cluster image with data, a compressed cluster and a snapshot-free
/// layout: header @0, L1 @0x30000 (qemu-img's default layout), refcount table
/// @0x10000, refcount block @0x20000.
fn base(dir: &Path) -> PathBuf {
    let p = dir.join("base.qcow2");
    let o = qemu(
        "qemu-img",
        [
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            p.as_os_str(),
            "4M".as_ref(),
        ],
    );
    assert!(o.status.success());
    let o = qemu(
        "qemu-io",
        [
            "-c".as_ref(),
            "write -P 0x11 0 128k".as_ref(),
            "-c".as_ref(),
            "write -c -P 0x22 1M 64k".as_ref(),
            p.as_os_str(),
        ],
    );
    assert!(o.status.success());
    p
}

fn be64(b: &[u8], at: u64) -> u64 {
    u64::from_be_bytes(b[at as usize..at as usize + 8].try_into().unwrap())
}

fn patched(dir: &Path, name: &str, edits: &[(u64, Vec<u8>)]) -> PathBuf {
    let mut b = std::fs::read(dir.join("base.qcow2")).unwrap();
    for (at, bytes) in edits {
        let at = *at as usize;
        if b.len() < at + bytes.len() {
            b.resize(at + bytes.len(), 0);
        }
        b[at..at + bytes.len()].copy_from_slice(bytes);
    }
    let p = dir.join(name);
    std::fs::write(&p, b).unwrap();
    p
}

struct Outcome {
    code: i32,
    err: String,
}

fn run(args: &[&OsStr]) -> Outcome {
    let t = Instant::now();
    let o = qdedup(args);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    let code = o.status.code().expect("exited, not killed");
    assert_ne!(code, 101, "panic: {}", String::from_utf8_lossy(&o.stderr));
    Outcome {
        code,
        err: format!(
            "{}{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        ),
    }
}

/// `convert` refuses with one line naming `what`; `check` exits with `check_code`
/// (1: could not check, 2: corruption) and names `what` too.
fn assert_refused(dir: &Path, img: &Path, what: &str, check_code: i32) {
    assert_refused2(dir, img, what, what, check_code);
}

fn assert_refused2(dir: &Path, img: &Path, what: &str, check_what: &str, check_code: i32) {
    let out = dir.join("out.qcow2");
    let c = run(&["convert".as_ref(), img.as_os_str(), out.as_os_str()]);
    assert_ne!(c.code, 0, "{}: convert accepted it", img.display());
    assert_eq!(c.err.trim().lines().count(), 1, "{}", c.err);
    assert!(
        c.err.contains(what),
        "{}: convert error lacks {what:?}: {}",
        img.display(),
        c.err
    );
    assert!(!out.exists());
    let k = run(&["check".as_ref(), img.as_os_str()]);
    assert_eq!(k.code, check_code, "{}: check: {}", img.display(), k.err);
    assert!(
        k.err.contains(check_what),
        "{}: check output lacks {check_what:?}: {}",
        img.display(),
        k.err
    );
}

#[test]
fn header_field_corruptions_are_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    let d = d.path();
    let b = std::fs::read(base(d)).unwrap();
    assert_eq!(be64(&b, 40), 0x30000, "qemu-img's usual layout");
    let cases: Vec<(&str, Vec<(u64, Vec<u8>)>, &str, i32)> = vec![
        (
            "cluster_bits_8",
            vec![(20, 8u32.to_be_bytes().to_vec())],
            "cluster_bits",
            1,
        ),
        (
            "cluster_bits_30",
            vec![(20, 30u32.to_be_bytes().to_vec())],
            "cluster_bits",
            1,
        ),
        (
            "l1_unaligned",
            vec![(40, 0x30200u64.to_be_bytes().to_vec())],
            "L1 table",
            1,
        ),
        (
            "l1_past_eof",
            vec![(40, (1u64 << 40).to_be_bytes().to_vec())],
            "L1 table",
            2,
        ),
        (
            "l1_near_2_63",
            vec![(40, 0x7fff_ffff_ffff_0000u64.to_be_bytes().to_vec())],
            "L1 table",
            1,
        ),
        (
            "l1_past_2_63",
            vec![(40, 0xffff_ffff_ffff_0000u64.to_be_bytes().to_vec())],
            "L1 table",
            1,
        ),
        (
            "l1_at_2_62",
            vec![(40, 0x4000_0000_0000_0000u64.to_be_bytes().to_vec())],
            "L1 table",
            2,
        ),
        (
            "reftable_past_2_63",
            vec![(48, 0x8000_0000_0000_0000u64.to_be_bytes().to_vec())],
            "refcount table",
            1,
        ),
        (
            "l1_size_huge",
            vec![(36, 0x1000_0000u32.to_be_bytes().to_vec())],
            "l1_size",
            1,
        ),
        (
            "l1_size_too_small",
            vec![(24, (1u64 << 40).to_be_bytes().to_vec())],
            "l1_size",
            1,
        ),
        (
            "reftable_clusters_huge",
            vec![(56, 0x00ff_ffffu32.to_be_bytes().to_vec())],
            "refcount_table_clusters",
            1,
        ),
        (
            "snapshots_huge_count",
            vec![
                (60, 0x0100_0000u32.to_be_bytes().to_vec()),
                (64, 0x30000u64.to_be_bytes().to_vec()),
            ],
            "snapshots",
            1,
        ),
        (
            "header_length_odd",
            vec![(100, 105u32.to_be_bytes().to_vec())],
            "header_length",
            1,
        ),
        (
            "header_length_huge",
            vec![(100, 0x20000u32.to_be_bytes().to_vec())],
            "header_length",
            1,
        ),
        (
            "extension_too_long",
            vec![
                (112, 0xe279_2acau32.to_be_bytes().to_vec()),
                (116, 0x10000u32.to_be_bytes().to_vec()),
            ],
            "header extension",
            1,
        ),
        (
            "end_extension_too_long",
            vec![(112, [0u8, 0, 0, 0, 0, 1, 0, 0].to_vec())],
            "header extension",
            1,
        ),
        (
            "crypt_method_3",
            vec![(32, 3u32.to_be_bytes().to_vec())],
            "encryption method 3",
            1,
        ),
        (
            "snapshot_offset_unaligned_without_snapshots",
            vec![(64, 0x80u64.to_be_bytes().to_vec())],
            "snapshot table",
            1,
        ),
        (
            "refcount_order_7",
            vec![(96, 7u32.to_be_bytes().to_vec())],
            "refcount_order",
            1,
        ),
    ];
    for (name, edits, what, code) in cases {
        let img = patched(d, &format!("{name}.qcow2"), &edits);
        assert_refused(d, &img, what, code);
        // `check` exits as `qemu-img check` does: 1 where QEMU cannot open the
        // image, 2 where it opens it and finds corruptions, except that we follow
        // the spec on header_length (a multiple of 8), which QEMU does not enforce.
        let q = qemu("qemu-img", ["check".as_ref(), img.as_os_str()]);
        let qemu_code = if name == "header_length_odd" { 0 } else { code };
        assert_eq!(q.status.code(), Some(qemu_code), "{name}: qemu-img check");
    }
}

/// `qdedup convert` reads `img` as `qemu-img convert` does (the same guest bytes),
/// and `check` exits as `qemu-img check` does with `check_code`, naming `what`.
fn assert_read_like_qemu(dir: &Path, img: &Path, what: &str, check_code: i32) {
    let out = dir.join("out.qcow2");
    let _ = std::fs::remove_file(&out);
    let c = run(&["convert".as_ref(), img.as_os_str(), out.as_os_str()]);
    assert_eq!(
        c.code,
        0,
        "{}: convert refused it: {}",
        img.display(),
        c.err
    );
    assert_qemu_compare_same(img, "qcow2", &out);
    let k = run(&["check".as_ref(), img.as_os_str()]);
    assert_eq!(k.code, check_code, "{}: check: {}", img.display(), k.err);
    assert!(
        k.err.contains(what),
        "{}: check lacks {what:?}: {}",
        img.display(),
        k.err
    );
    let q = qemu("qemu-img", ["check".as_ref(), img.as_os_str()]);
    assert_eq!(
        q.status.code(),
        Some(check_code),
        "{}: qemu-img check",
        img.display()
    );
}

/// Damage to the refcount table, which reading guest data does not use: QEMU opens
/// and reads such images (its check finds the corruption), and so does qdedup.
#[test]
fn refcount_table_damage_is_read_like_qemu_and_checked_as_corruption() {
    let d = tempfile::tempdir().unwrap();
    let d = d.path();
    base(d);
    for (name, at) in [("reftable_past_eof", 1u64 << 40), ("reftable_on_header", 0)] {
        let img = patched(
            d,
            &format!("{name}.qcow2"),
            &[(48, at.to_be_bytes().to_vec())],
        );
        assert_read_like_qemu(d, &img, "refcount", 2);
    }
}

#[test]
fn table_corruptions_are_refused_by_name() {
    let d = tempfile::tempdir().unwrap();
    let d = d.path();
    let b = std::fs::read(base(d)).unwrap();
    let l1 = be64(&b, 40);
    let l2 = be64(&b, l1) & 0x00ff_ffff_ffff_fe00;
    let copied = 1u64 << 63;
    // L2 table at the L1 table, past EOF, unaligned. (An L2 offset of 0 means "no
    // table"; the header-overlap recipes are the refcount-table cases above.)
    for (name, l2_off, what) in [
        ("l2_at_l1", l1, "both as metadata and as guest data"),
        ("l2_past_eof", 1 << 40, "L1"),
        ("l2_unaligned", l2 + 512, "L1"),
    ] {
        let v = (l2_off | copied).to_be_bytes().to_vec();
        let img = patched(d, &format!("{name}.qcow2"), &[(l1, v)]);
        assert_refused2(d, &img, "L1 table", what, 2);
    }
    // A data cluster past EOF.
    let v = ((1u64 << 40) | copied).to_be_bytes().to_vec();
    let img = patched(d, "data_past_eof.qcow2", &[(l2, v)]);
    assert_refused2(d, &img, "L2", "past the end", 2);
    // Reserved bits in an L2 entry.
    let e = be64(&b, l2) | 0x2;
    let img = patched(d, "l2_reserved.qcow2", &[(l2, e.to_be_bytes().to_vec())]);
    let k = run(&["check".as_ref(), img.as_os_str()]);
    assert_eq!(k.code, 2, "{}", k.err);
    // Compressed descriptor past EOF, and one sector too short (iotest 214).
    let slot = l2 + 16 * 8; // guest 1 MiB = cluster 16
    let c = be64(&b, slot);
    assert_ne!(c & (1 << 62), 0, "cluster 16 is compressed");
    let x = 62 - (16 - 8);
    let past = (c & !((1u64 << x) - 1)) | (1u64 << 40);
    let img = patched(
        d,
        "compressed_past_eof.qcow2",
        &[(slot, past.to_be_bytes().to_vec())],
    );
    let k = run(&["check".as_ref(), img.as_os_str()]);
    assert_eq!(k.code, 2, "{}", k.err);
    let out = d.join("o.qcow2");
    let cv = run(&["convert".as_ref(), img.as_os_str(), out.as_os_str()]);
    assert_ne!(cv.code, 0, "{}", cv.err);
    assert!(!out.exists());
    let sectors = (c >> x) & 0xff;
    if sectors > 0 {
        let short = (c & !(0xffu64 << x)) | ((sectors - 1) << x);
        let img = patched(
            d,
            "compressed_short.qcow2",
            &[(slot, short.to_be_bytes().to_vec())],
        );
        let k = run(&["check".as_ref(), img.as_os_str()]);
        assert_eq!(k.code, 2, "qemu-img misses it, we don't: {}", k.err);
        let cv = run(&["convert".as_ref(), img.as_os_str(), out.as_os_str()]);
        assert_ne!(cv.code, 0, "{}", cv.err);
        assert!(cv.err.contains("compressed"), "{}", cv.err);
        assert!(!out.exists());
    }
}

#[test]
fn many_tiny_header_extensions_are_read_quickly() {
    let d = tempfile::tempdir().unwrap();
    let d = d.path();
    base(d);
    // Unknown extensions of length 0 fill cluster 0 after the header: 8 bytes each.
    let mut edits: Vec<(u64, Vec<u8>)> = Vec::new();
    for at in (112..CS - 8).step_by(8) {
        edits.push((
            at,
            0x1234_5678u32
                .to_be_bytes()
                .iter()
                .chain(&[0u8; 4])
                .copied()
                .collect(),
        ));
    }
    let img = patched(d, "many_ext.qcow2", &edits);
    let out = d.join("o.qcow2");
    let c = run(&["convert".as_ref(), img.as_os_str(), out.as_os_str()]);
    assert_eq!(
        c.code, 0,
        "unknown extensions are ignored, as QEMU does: {}",
        c.err
    );
    assert_qemu_compare_same(&img, "qcow2", &out);
}

#[test]
fn a_snapshot_table_past_the_end_of_the_file_is_a_corruption_qemu_and_qdedup_still_read() {
    let d = tempfile::tempdir().unwrap();
    let d = d.path();
    let p = base(d);
    let o = qemu(
        "qemu-img",
        [
            "snapshot".as_ref(),
            "-c".as_ref(),
            "s1".as_ref(),
            p.as_os_str(),
        ],
    );
    assert!(o.status.success());
    for (name, at) in [("v3", 1u64 << 40), ("v3_unreadable", 0x7fff_ffff_0000_0000)] {
        let img = patched(
            d,
            &format!("{name}.qcow2"),
            &[(64, at.to_be_bytes().to_vec())],
        );
        let q = qemu("qemu-img", ["check".as_ref(), img.as_os_str()]);
        let k = run(&["check".as_ref(), img.as_os_str()]);
        assert_eq!(k.code, q.status.code().unwrap(), "{name}: {}", k.err);
        assert!(k.err.contains("snapshot table"), "{}", k.err);
        // QEMU reads the table as zeros past the end of the file (an empty entry)
        // and converts the guest data; so does qdedup.
        let out = d.join("o.qcow2");
        let _ = std::fs::remove_file(&out);
        let qo = d.join("q.raw");
        let _ = std::fs::remove_file(&qo);
        let qc = qemu(
            "qemu-img",
            [
                "convert".as_ref(),
                "-O".as_ref(),
                "raw".as_ref(),
                img.as_os_str(),
                qo.as_os_str(),
            ],
        );
        assert!(qc.status.success(), "{name}: qemu-img convert refused it");
        let c = run(&["convert".as_ref(), img.as_os_str(), out.as_os_str()]);
        assert_eq!(c.code, 0, "{name}: {}", c.err);
        assert_qemu_compare_same(&img, "qcow2", &out);
    }
}
