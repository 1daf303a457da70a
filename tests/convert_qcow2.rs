//! `qdedup convert` of qcow2 inputs made by qemu-img/qemu-io: the output must pass
//! `qemu-img check` and `qemu-img compare` against the input as QEMU sees it.

mod common;

use std::path::Path;

use common::*;
use qdedup::format::header::off;

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Converts with qdedup (extra args first), then checks and compares with qemu-img.
fn convert_and_verify(input: &Path, out: &Path, extra: &[&str]) -> serde_json::Value {
    let r = convert_json(extra, input, out);
    assert_qemu_check_clean(out);
    assert_qemu_compare_same(input, "qcow2", out);
    assert_eq!(r["input-format"], "qcow2");
    r
}

/// Writes data with duplicates, unique clusters and text into a qcow2 image.
fn fill(path: &Path, cs: u64) {
    let c = cs.max(4096);
    let cmds = [
        format!("write -P 0xab 0 {}", 3 * c),
        format!("write -P 0xab {} {}", 8 * c, 2 * c),
        format!("write -P 0x11 {} {}", 5 * c, c),
        format!("write -P 0xcd {} 1000", 12 * c + 100),
        format!("write -P 0x11 {} {}", 20 * c, c),
    ];
    let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
    qemu_io(path, &cmds);
}

#[test]
fn v2_and_v3_images_at_every_cluster_size_convert_clean() {
    let d = Scratch::new();
    let v2 = create_qcow2(d.join("v2.qcow2"), Some("4M"), &["-o", "compat=0.10"]);
    fill(&v2, 65536);
    let r = convert_and_verify(&v2, &d.join("v2.out"), &[]);
    assert!(
        r["duplicate-clusters"].as_u64().unwrap() > 0,
        "duplicates shared: {r}"
    );
    for cs in ["512", "4096", "65536", "2M"] {
        let p = create_qcow2(
            d.join(format!("v3-{cs}.qcow2")),
            Some("64M"),
            &["-o", &format!("cluster_size={cs}")],
        );
        fill(&p, 65536);
        convert_and_verify(&p, &d.join(format!("v3-{cs}.out")), &[]);
    }
}

#[test]
fn compressed_inputs_in_zlib_and_zstd_convert_clean() {
    let d = Scratch::new();
    let raw = raw_input(d.path(), 65536, 40, 0, 1);
    for codec in ["zlib", "zstd"] {
        let c = d.join(format!("{codec}.qcow2"));
        qcow2_from_raw(
            &raw,
            &c,
            &["-c", "-o", &format!("compression_type={codec}")],
        );
        convert_and_verify(&c, &d.join(format!("{codec}.out")), &[]);
        convert_and_verify(&c, &d.join(format!("{codec}.c.out")), &["-c"]);
    }
}

#[test]
fn zero_clusters_with_and_without_unmap_read_as_zero() {
    let d = Scratch::new();
    let base = create_qcow2(d.join("base.qcow2"), Some("4M"), &[]);
    qemu_io(&base, &["write -P 0x55 0 4M"]);
    let top = create_qcow2(d.join("top.qcow2"), None, &["-b", s(&base), "-F", "qcow2"]);
    qemu_io(
        &top,
        &[
            "write -P 0x66 0 1M",
            "write -z 64k 128k",
            "write -z -u 512k 256k",
            "write -z 2M 64k",
            "write -z -u 3M 64k",
        ],
    );
    let r = convert_and_verify(&top, &d.join("top.out"), &[]);
    assert!(r["unallocated-clusters"].as_u64().unwrap() >= 8, "{r}");
}

#[test]
fn extended_l2_partial_subcluster_writes_over_a_backing_file() {
    let d = Scratch::new();
    let base = create_qcow2(d.join("base.qcow2"), Some("8M"), &[]);
    qemu_io(&base, &["write -P 0x77 0 8M"]);
    let top = create_qcow2(
        d.join("top.qcow2"),
        None,
        &[
            "-o",
            "extended_l2=on,cluster_size=64k",
            "-b",
            s(&base),
            "-F",
            "qcow2",
        ],
    );
    qemu_io(
        &top,
        &[
            "write -P 0x88 2k 2k",
            "write -P 0x99 70k 5k",
            "write -z 200k 4k",
            "write -P 0x88 1M 64k",
        ],
    );
    convert_and_verify(&top, &d.join("top.out"), &[]);
}

#[test]
fn backing_chains_raw_three_levels_and_shorter_backing_are_flattened() {
    let d = Scratch::new();
    // Raw backing.
    let raw = d.join("base.raw");
    make_input(&raw, 65536, 32, 0, 4);
    let top = create_qcow2(
        d.join("over-raw.qcow2"),
        None,
        &["-b", s(&raw), "-F", "raw"],
    );
    qemu_io(&top, &["write -P 0x12 64k 64k"]);
    convert_and_verify(&top, &d.join("over-raw.out"), &[]);
    // Three qcow2 levels, relative backing names.
    let l1 = create_qcow2(d.join("l1.qcow2"), Some("8M"), &[]);
    qemu_io(&l1, &["write -P 0x01 0 8M"]);
    let l2 = create_qcow2(d.join("l2.qcow2"), None, &["-b", "l1.qcow2", "-F", "qcow2"]);
    qemu_io(&l2, &["write -P 0x02 1M 1M"]);
    let l3 = create_qcow2(d.join("l3.qcow2"), None, &["-b", "l2.qcow2", "-F", "qcow2"]);
    qemu_io(&l3, &["write -P 0x03 1536k 1M", "write -P 0x01 6M 64k"]);
    let r = convert_and_verify(&l3, &d.join("l3.out"), &[]);
    assert!(
        r["duplicate-clusters"].as_u64().unwrap() > 100,
        "the chain's repeated pattern is shared: {r}"
    );
    // The top layer alone equals QEMU's view with "backing": null.
    let alone = d.join("l3-alone.out");
    qdedup_ok([
        "convert".as_ref(),
        "--backing-chain".as_ref(),
        "none".as_ref(),
        l3.as_os_str(),
        alone.as_os_str(),
    ]);
    let view = d.join("alone.raw");
    qemu_raw_view(top_alone_spec(&l3).as_ref(), &view, &[]);
    assert_qemu_compare_same(&view, "raw", &alone);
    assert_qemu_check_clean(&alone);
    // A backing file shorter than the overlay reads as zeros past its end.
    let short = create_qcow2(d.join("short.qcow2"), Some("1M"), &[]);
    qemu_io(&short, &["write -P 0x44 0 1M"]);
    let long = create_qcow2(
        d.join("long.qcow2"),
        Some("4M"),
        &["-b", s(&short), "-F", "qcow2"],
    );
    qemu_io(&long, &["write -P 0x45 3M 64k"]);
    convert_and_verify(&long, &d.join("long.out"), &[]);
}

#[test]
fn snapshots_convert_the_active_layer_or_a_named_view() {
    let d = Scratch::new();
    let p = create_qcow2(d.join("snap.qcow2"), Some("4M"), &[]);
    qemu_io(&p, &["write -P 0x21 0 2M"]);
    qemu_snapshot(&p, "first");
    qemu_io(&p, &["write -P 0x22 1M 2M"]);
    convert_and_verify(&p, &d.join("active.out"), &[]);
    for sel in ["first", "1"] {
        let out = d.join(format!("snap-{sel}.out"));
        qdedup_ok([
            "convert".as_ref(),
            "-l".as_ref(),
            sel.as_ref(),
            p.as_os_str(),
            out.as_os_str(),
        ]);
        let view = d.join(format!("view-{sel}.raw"));
        qemu_raw_view(p.as_os_str(), &view, &["-l", "snapshot.name=first"]);
        assert_qemu_compare_same(&view, "raw", &out);
        assert_qemu_check_clean(&out);
    }
    let o = qdedup([
        "convert".as_ref(),
        "-l".as_ref(),
        "nope".as_ref(),
        p.as_os_str(),
        d.join("x.out").as_os_str(),
    ]);
    assert!(!o.status.success());
    assert!(!d.join("x.out").exists());
}

#[test]
fn converting_a_qdedup_output_again_keeps_content_and_host_clusters() {
    let d = Scratch::new();
    let raw = raw_input(d.path(), 4096, 500, 0, 8);
    let once = d.join("once.qcow2");
    let r1 = convert_and_verify_raw(&raw, &once);
    let twice = d.join("twice.qcow2");
    let r2 = convert_and_verify(&once, &twice, &["-o", "cluster_size=4k"]);
    assert_qemu_compare_same(&raw, "raw", &twice);
    assert!(r2["host-data-clusters"].as_u64() <= r1["host-data-clusters"].as_u64());
    assert_eq!(
        read_layout(&once).data_refs.len(),
        read_layout(&twice).data_refs.len()
    );
}

fn convert_and_verify_raw(raw: &Path, out: &Path) -> serde_json::Value {
    let r = convert_json(&["-o", "cluster_size=4k"], raw, out);
    assert_qemu_check_clean(out);
    r
}

#[test]
fn a_mostly_empty_terabyte_qcow2_converts_in_seconds() {
    let d = Scratch::new();
    let p = create_qcow2(d.join("big.qcow2"), Some("1T"), &[]);
    qemu_io(
        &p,
        &[
            "write -P 0x31 0 1M",
            "write -P 0x32 500G 1M",
            "write -P 0x31 1023G 1M",
        ],
    );
    let t = std::time::Instant::now();
    let r = convert_and_verify(&p, &d.join("big.out"), &["--no-sync"]);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(30),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(
        r["bytes-read"].as_u64().unwrap(),
        3 << 20,
        "only allocated clusters are read"
    );
}

fn assert_refused(input: &Path, d: &Scratch, what: &str) {
    let out = d.join("refused.out");
    let err = qdedup_fails_in_one_line(["convert".as_ref(), input.as_os_str(), out.as_os_str()]);
    assert!(
        err.to_lowercase().contains(what),
        "expected {what:?} in {err}"
    );
    assert!(!out.exists());
    assert!(!d.entries().iter().any(|n| n.ends_with(".qdedup-tmp")));
}

#[test]
fn encrypted_unknown_feature_and_truncated_images_are_refused_by_name() {
    let d = Scratch::new();
    let enc = create_qcow2(
        d.join("enc.qcow2"),
        Some("1M"),
        &[
            "--object",
            "secret,id=sec0,data=abc",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
        ],
    );
    assert_refused(&enc, &d, "encrypt");
    let unk = create_qcow2(d.join("unknown.qcow2"), Some("1M"), &[]);
    let bits = header_field(&unk, off::INCOMPATIBLE_FEATURES);
    patch_header(&unk, off::INCOMPATIBLE_FEATURES, bits | 1 << 7);
    assert_refused(&unk, &d, "incompatible feature");
    let tr = create_qcow2(d.join("truncated.qcow2"), Some("4M"), &[]);
    qemu_io(&tr, &["write -P 0x5a 0 4M"]);
    set_file_len(&tr, std::fs::metadata(&tr).unwrap().len() / 2);
    assert_refused(&tr, &d, "corrupt");
}

/// `qdedup convert -l SNAP` of `img` equals `qemu-img convert -l SNAP`, size included.
fn assert_snapshot_view_like_qemu(img: &Path, snap: &str, out: &Path) {
    let r = convert_json(&["-l", snap], img, out);
    let view = out.with_extension("view.raw");
    qemu_raw_view(img.as_os_str(), &view, &["-l", snap]);
    assert_eq!(
        r["virtual-size"].as_u64().unwrap(),
        std::fs::metadata(&view).unwrap().len(),
        "{} -l {snap}: virtual size",
        img.display()
    );
    assert_eq!(qemu_virtual_size(out), qemu_virtual_size(&view));
    assert_qemu_compare_same(&view, "raw", out);
    assert_qemu_check_clean(out);
}

#[test]
fn a_snapshot_view_keeps_the_current_size_like_qemu_img_after_a_resize() {
    let d = Scratch::new();
    // The recipe: the image grew after the snapshot; past the snapshot's
    // 1 MiB the backing file shows through (qemu-img: 2 MiB of 0x11).
    let base = write_raw(d.path(), "base.raw", &vec![0x11; 2 << 20]);
    let top = create_qcow2(
        d.join("top.qcow2"),
        Some("1M"),
        &["-b", s(&base), "-F", "raw"],
    );
    qemu_io(&top, &["write -P 0x22 64k 64k"]);
    qemu_snapshot(&top, "s1");
    qemu_resize(&top, "2M", &[]);
    qemu_io(&top, &["write -P 0x33 1536k 64k"]);
    assert_snapshot_view_like_qemu(&top, "s1", &d.join("grown.out"));
    let r = convert_json(&["-l", "1"], &top, &d.join("grown-id.out"));
    assert_eq!(r["virtual-size"], 2 << 20);

    // Without a backing file the grown part reads as zeros; a snapshot taken
    // after the resize is unaffected.
    let alone = create_qcow2(d.join("alone.qcow2"), Some("1M"), &[]);
    qemu_io(&alone, &["write -P 0x44 0 1M"]);
    qemu_snapshot(&alone, "small");
    qemu_resize(&alone, "3M", &[]);
    qemu_io(&alone, &["write -P 0x45 2M 64k"]);
    qemu_snapshot(&alone, "big");
    assert_snapshot_view_like_qemu(&alone, "small", &d.join("small.out"));
    assert_snapshot_view_like_qemu(&alone, "big", &d.join("big.out"));

    // QEMU also shrinks images with snapshots: the view is cut to the current
    // size, even below the snapshot's own.
    let shrunk = create_qcow2(d.join("shrunk.qcow2"), Some("2M"), &[]);
    qemu_io(&shrunk, &["write -P 0x55 0 2M"]);
    qemu_snapshot(&shrunk, "full");
    qemu_resize(&shrunk, "768k", &["--shrink"]);
    assert_snapshot_view_like_qemu(&shrunk, "full", &d.join("shrunk.out"));
    assert_eq!(qemu_virtual_size(&d.join("shrunk.out")), 768 << 10);
}
