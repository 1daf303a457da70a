//! Corrupted images made the way QEMU's iotests (060, 080, 138, 214) make them:
//! patch one header or table field. `convert` and `check` must fail with one line
//! naming the structure and offset, quickly, without a panic or a big allocation.

#![allow(clippy::many_single_char_names)] // terse test fixtures

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use qdedup::format::compressed::CompressedDescriptor;
use qdedup::format::extensions::{QCOW2_EXT_MAGIC_BACKING_FORMAT, QCOW2_EXT_MAGIC_END};
use qdedup::format::header::off;
use qdedup::format::l1l2::{QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED};

const CS: u64 = 65536;

/// A 64 KiB-cluster image with data, a compressed cluster (of several sectors)
/// and a snapshot-free layout: header @0, L1 @0x30000 (qemu-img's default
/// layout), refcount table @0x10000, refcount block @0x20000.
fn base(dir: &Path) -> PathBuf {
    let p = create_qcow2(dir.join("base.qcow2"), Some("4M"), &[]);
    // Text of 8 letters: compressed to about a third of the cluster.
    let src = write_raw(dir, "letters.src", &letters(0x22, CS as usize, 8));
    let compressed = format!("write -c -s {} 1M 64k", src.display());
    qemu_io(&p, &["write -P 0x11 0 128k", &compressed]);
    p
}

/// A copy of `dir/base.qcow2` named `name`, changed by `patch`.
fn patched(dir: &Path, name: &str, patch: impl FnOnce(&Img)) -> PathBuf {
    patched_copy(&dir.join("base.qcow2"), dir.join(name), patch)
}

struct Outcome {
    code: i32,
    err: String,
}

/// Runs qdedup, asserting it finishes within 5 s without a panic.
fn run(args: &[&OsStr]) -> Outcome {
    let t = Instant::now();
    let o = qdedup(args);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    let code = exit_code(&o);
    assert_ne!(code, 101, "panic: {}", said(&o));
    Outcome {
        code,
        err: said(&o),
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

/// Sets the header field `field` (an `off::` constant) to `value`.
fn field(field: usize, value: u64) -> Patch {
    Box::new(move |i: &Img| i.set_header(field, value))
}

/// Makes the first header extension one of type `kind` and `len` bytes.
fn first_extension(kind: u32, len: u32) -> Patch {
    Box::new(move |i: &Img| {
        let at = extensions_start(&i.path);
        patch_be(&i.path, at, 4, kind.into());
        patch_be(&i.path, at + 4, 4, len.into());
    })
}

#[test]
fn header_field_corruptions_are_refused_by_name() {
    let d = Scratch::new();
    let d = d.path();
    let h = header_of(&base(d));
    let l1 = h.l1_table_offset;
    assert_eq!(l1, 0x30000, "qemu-img's usual layout");
    let cases: Vec<(&str, Patch, &str, i32)> = vec![
        (
            "cluster_bits_8",
            field(off::CLUSTER_BITS, 8),
            "cluster_bits",
            1,
        ),
        (
            "cluster_bits_30",
            field(off::CLUSTER_BITS, 30),
            "cluster_bits",
            1,
        ),
        (
            "l1_unaligned",
            field(off::L1_TABLE_OFFSET, l1 + 0x200),
            "L1 table",
            1,
        ),
        (
            "l1_past_eof",
            field(off::L1_TABLE_OFFSET, 1 << 40),
            "L1 table",
            2,
        ),
        (
            "l1_near_2_63",
            field(off::L1_TABLE_OFFSET, 0x7fff_ffff_ffff_0000),
            "L1 table",
            1,
        ),
        (
            "l1_past_2_63",
            field(off::L1_TABLE_OFFSET, 0xffff_ffff_ffff_0000),
            "L1 table",
            1,
        ),
        (
            "l1_at_2_62",
            field(off::L1_TABLE_OFFSET, 0x4000_0000_0000_0000),
            "L1 table",
            2,
        ),
        (
            "reftable_past_2_63",
            field(off::REFCOUNT_TABLE_OFFSET, 0x8000_0000_0000_0000),
            "refcount table",
            1,
        ),
        (
            "l1_size_huge",
            field(off::L1_SIZE, 0x1000_0000),
            "l1_size",
            1,
        ),
        ("l1_size_too_small", field(off::SIZE, 1 << 40), "l1_size", 1),
        (
            "reftable_clusters_huge",
            field(off::REFCOUNT_TABLE_CLUSTERS, 0x00ff_ffff),
            "refcount_table_clusters",
            1,
        ),
        (
            "snapshots_huge_count",
            Box::new(move |i: &Img| {
                i.set_header(off::NB_SNAPSHOTS, 0x0100_0000);
                i.set_header(off::SNAPSHOTS_OFFSET, l1);
            }),
            "snapshots",
            1,
        ),
        (
            "header_length_odd",
            field(off::HEADER_LENGTH, 105),
            "header_length",
            1,
        ),
        (
            "header_length_huge",
            field(off::HEADER_LENGTH, 0x20000),
            "header_length",
            1,
        ),
        (
            "extension_too_long",
            first_extension(QCOW2_EXT_MAGIC_BACKING_FORMAT, 0x10000),
            "header extension",
            1,
        ),
        (
            "end_extension_too_long",
            first_extension(QCOW2_EXT_MAGIC_END, 0x1_0000),
            "header extension",
            1,
        ),
        (
            "crypt_method_3",
            field(off::CRYPT_METHOD, 3),
            "encryption method 3",
            1,
        ),
        (
            "snapshot_offset_unaligned_without_snapshots",
            field(off::SNAPSHOTS_OFFSET, 0x80),
            "snapshot table",
            1,
        ),
        (
            "refcount_order_7",
            field(off::REFCOUNT_ORDER, 7),
            "refcount_order",
            1,
        ),
    ];
    let mut exercised = 0;
    for (name, patch, what, code) in cases {
        let img = patched(d, &format!("{name}.qcow2"), patch);
        assert_refused(d, &img, what, code);
        // `check` exits as `qemu-img check` does: 1 where QEMU cannot open the
        // image, 2 where it opens it and finds corruptions, except that we follow
        // the spec on header_length (a multiple of 8), which QEMU does not enforce.
        let q = qemu_img_check(&img);
        let qemu_code = if name == "header_length_odd" { 0 } else { code };
        assert_eq!(q.status.code(), Some(qemu_code), "{name}: qemu-img check");
        exercised += 1;
    }
    assert_eq!(exercised, 19);
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
    let q = qemu_img_check(img);
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
    let d = Scratch::new();
    let d = d.path();
    base(d);
    for (name, at) in [("reftable_past_eof", 1u64 << 40), ("reftable_on_header", 0)] {
        let img = patched(d, &format!("{name}.qcow2"), |i| {
            i.set_header(off::REFCOUNT_TABLE_OFFSET, at);
        });
        assert_read_like_qemu(d, &img, "refcount", 2);
    }
}

#[test]
fn table_corruptions_are_refused_by_name() {
    let d = Scratch::new();
    let d = d.path();
    let img = Img::open(&base(d));
    let cb = img.h.cluster_bits;
    let l1 = img.l1_entry(0);
    let l2 = img.l2_table(0);
    // L2 table at the L1 table, past EOF, unaligned. (An L2 offset of 0 means "no
    // table"; the header-overlap recipes are the refcount-table cases above.)
    for (name, l2_off, what) in [
        (
            "l2_at_l1",
            img.h.l1_table_offset,
            "both as metadata and as guest data",
        ),
        ("l2_past_eof", 1 << 40, "L1"),
        ("l2_unaligned", l2 + 512, "L1"),
    ] {
        let p = patched(d, &format!("{name}.qcow2"), |i| {
            i.put_u64(l1, l2_off | QCOW_OFLAG_COPIED);
        });
        assert_refused2(d, &p, "L1 table", what, 2);
    }
    // A data cluster past EOF.
    let data = img.l2_entry(0, 0);
    let p = patched(d, "data_past_eof.qcow2", |i| {
        i.put_u64(data, (1 << 40) | QCOW_OFLAG_COPIED);
    });
    assert_refused2(d, &p, "L2", "past the end", 2);
    // Reserved bits in an L2 entry.
    let p = patched(d, "l2_reserved.qcow2", |i| {
        i.put_u64(data, i.u64_at(data) | 0x2);
    });
    let k = run(&["check".as_ref(), p.as_os_str()]);
    assert_eq!(k.code, 2, "{}", k.err);
    // Compressed descriptor past EOF, and one sector too short (iotest 214).
    let slot = img.l2_entry(0, 16); // guest 1 MiB = cluster 16
    let c = img.u64_at(slot);
    assert_ne!(c & QCOW_OFLAG_COMPRESSED, 0, "cluster 16 is compressed");
    let desc = CompressedDescriptor::decode(c, cb);
    let past = CompressedDescriptor {
        host_offset: 1 << 40,
        ..desc
    };
    let p = patched(d, "compressed_past_eof.qcow2", |i| {
        i.put_u64(slot, QCOW_OFLAG_COMPRESSED | past.encode(cb));
    });
    let k = run(&["check".as_ref(), p.as_os_str()]);
    assert_eq!(k.code, 2, "{}", k.err);
    let out = d.join("o.qcow2");
    let cv = run(&["convert".as_ref(), p.as_os_str(), out.as_os_str()]);
    assert_ne!(cv.code, 0, "{}", cv.err);
    assert!(!out.exists());
    assert!(
        desc.extra_sectors > 0,
        "the stream spans several sectors: {desc:?}"
    );
    let short = CompressedDescriptor {
        extra_sectors: desc.extra_sectors - 1,
        ..desc
    };
    let p = patched(d, "compressed_short.qcow2", |i| {
        i.put_u64(slot, QCOW_OFLAG_COMPRESSED | short.encode(cb));
    });
    let k = run(&["check".as_ref(), p.as_os_str()]);
    assert_eq!(k.code, 2, "qemu-img misses it, we don't: {}", k.err);
    let cv = run(&["convert".as_ref(), p.as_os_str(), out.as_os_str()]);
    assert_ne!(cv.code, 0, "{}", cv.err);
    assert!(cv.err.contains("compressed"), "{}", cv.err);
    assert!(!out.exists());
}

#[test]
fn many_tiny_header_extensions_are_read_quickly() {
    let d = Scratch::new();
    let d = d.path();
    base(d);
    // Unknown extensions of length 0 fill cluster 0 after the header: 8 bytes each.
    let img = patched(d, "many_ext.qcow2", |i| {
        let start = extensions_start(&i.path);
        let one = (0x1234_5678u64 << 32).to_be_bytes();
        let all: Vec<u8> = (start..CS - 8).step_by(8).flat_map(|_| one).collect();
        patch_bytes(&i.path, start, &all);
    });
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
    let d = Scratch::new();
    let d = d.path();
    qemu_snapshot(&base(d), "s1");
    for (name, at) in [("v3", 1u64 << 40), ("v3_unreadable", 0x7fff_ffff_0000_0000)] {
        let img = patched(d, &format!("{name}.qcow2"), |i| {
            i.set_header(off::SNAPSHOTS_OFFSET, at);
        });
        let q = qemu_img_check(&img);
        let k = run(&["check".as_ref(), img.as_os_str()]);
        assert_eq!(k.code, q.status.code().unwrap(), "{name}: {}", k.err);
        assert!(k.err.contains("snapshot table"), "{}", k.err);
        // QEMU reads the table as zeros past the end of the file (an empty entry)
        // and converts the guest data; so does qdedup.
        let out = d.join("o.qcow2");
        let _ = std::fs::remove_file(&out);
        let qo = d.join("q.raw");
        let _ = std::fs::remove_file(&qo);
        qemu_raw_view(img.as_os_str(), &qo, &[]);
        let c = run(&["convert".as_ref(), img.as_os_str(), out.as_os_str()]);
        assert_eq!(c.code, 0, "{name}: {}", c.err);
        assert_qemu_compare_same(&img, "qcow2", &out);
    }
}
