//! `convert -B BACKING`: overlays that store only what differs from the backing
//! file by content, `-o compat=0.10`, `-S`, and the qemu-img options refused
//! by name. qemu-img is the oracle: `check`, `compare NEW OVERLAY`, `info`, and
//! `map` to count what the overlay allocates.

mod common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

/// The cluster size of every image here (qdedup's and qemu-img's default).
const CS: usize = 65536;

/// Guest clusters of the "new" disks.
const CLUSTERS: usize = 48;

/// A base disk and a new one made from it: `changed` clusters get new contents
/// (three of them the same, so the overlay deduplicates them), `zeroed` clusters
/// of base data become zeros, `filled` clusters that are zero in the base get
/// data, the rest stays. The base is `base_clusters` long (shorter than the new
/// disk: beyond its end it reads as zeros).
fn base_and_new(seed: u64, base_clusters: usize) -> (Vec<u8>, Vec<u8>) {
    let mut base = random_bytes(seed, base_clusters * CS);
    // Some zero clusters and some duplicates in the base too.
    for i in (0..base_clusters).step_by(7) {
        base[i * CS..(i + 1) * CS].fill(0);
    }
    for i in (3..base_clusters).step_by(11) {
        let (a, b) = base.split_at_mut(i * CS);
        b[..CS].copy_from_slice(&a[..CS]);
    }
    let mut new = base.clone();
    new.resize(CLUSTERS * CS, 0);
    let fresh = random_bytes(seed + 1, 4 * CS);
    for (k, i) in [2usize, 9, 17, 30, 40].into_iter().enumerate() {
        // Changed: 9, 17 and 30 get the same new content.
        let src = if (1..=3).contains(&k) { 1 } else { k % 4 };
        new[i * CS..(i + 1) * CS].copy_from_slice(&fresh[src * CS..(src + 1) * CS]);
    }
    for i in [5usize, 12, 13, 45] {
        new[i * CS..(i + 1) * CS].fill(0); // zeroed (45 may be past the base)
    }
    new[14 * CS + 100] = 0x5a; // one byte differs
    for i in [21usize, 35] {
        // Zero in the base (7 divides 21 and 35) or past its end: filled.
        new[i * CS..(i + 1) * CS].copy_from_slice(&fresh[3 * CS..4 * CS]);
    }
    (base, new)
}

/// (clusters whose content differs from `base` and are not zero, clusters of
/// zeros over non-zero base data): what the overlay must allocate and mark zero.
fn expected_counts(base: &[u8], new: &[u8]) -> (u64, u64) {
    let (mut data, mut zero) = (0, 0);
    for (i, n) in new.chunks(CS).enumerate() {
        let mut b = base.get(i * CS..).unwrap_or(&[]).to_vec();
        b.resize(CS, 0);
        let mut n = n.to_vec();
        n.resize(CS, 0);
        if n == b {
            continue;
        }
        if n.iter().all(|x| *x == 0) {
            zero += 1;
        } else {
            data += 1;
        }
    }
    (data, zero)
}

/// (data clusters, zero-flag clusters) the overlay `img` itself holds, by
/// `qemu-img map`: depth 0 extents with data, and depth 0 zero extents.
fn overlay_clusters(img: &Path) -> (u64, u64) {
    let (mut data, mut zero) = (0, 0);
    for e in qemu_map(img).as_array().expect("map array") {
        if e["depth"] != 0 || e["present"] != true {
            continue;
        }
        let n = e["length"].as_u64().unwrap().div_ceil(CS as u64);
        if e["data"] == true {
            data += n;
        } else if e["zero"] == true {
            zero += n;
        }
    }
    (data, zero)
}

/// Asserts what every overlay must be: clean for `qemu-img check`, identical
/// to `new` (format `new_fmt`) for `qemu-img compare`, naming `backing` (stored
/// as `stored`) of format `fmt` in `qemu-img info`.
fn assert_overlay(ov: &Path, new: &Path, new_fmt: &str, stored: &str, fmt: &str) -> Value {
    assert_qemu_check_clean(ov);
    assert_qemu_compare_same(new, new_fmt, ov);
    // qdedup's own checker and comparison agree.
    let (code, report) = check_json([ov]);
    assert_eq!(code, 0, "{report}");
    qdedup_ok([
        OsStr::new("compare"),
        OsStr::new("-f"),
        OsStr::new(new_fmt),
        new.as_os_str(),
        ov.as_os_str(),
    ]);
    let info = qemu_info(ov);
    assert_eq!(info["backing-filename"], stored, "{info}");
    assert_eq!(info["backing-filename-format"], fmt, "{info}");
    info
}

/// The base as a raw file, a qcow2 image, or a chain of two (a qcow2 overlay
/// holding part of the base over a raw file holding the rest): the path and its
/// format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BaseKind {
    Raw,
    Qcow2,
    Chain,
}

fn make_base(dir: &Path, kind: BaseKind, base: &[u8]) -> (PathBuf, &'static str) {
    match kind {
        BaseKind::Raw => (write_raw(dir, "base.raw", base), "raw"),
        BaseKind::Qcow2 => {
            let raw = write_raw(dir, "base-src.raw", base);
            let q = dir.join("base.qcow2");
            qcow2_from_raw(&raw, &q, &[]);
            (q, "qcow2")
        }
        BaseKind::Chain => {
            // The lower half of the base's clusters in the raw file, the rest
            // written by qemu-io into the qcow2 over it.
            let half = base.len() / 2 / CS * CS;
            let mut lower = base.to_vec();
            lower[half..].fill(0xee); // overwritten below
            write_raw(dir, "lower.raw", &lower);
            let top = create_qcow2(
                dir.join("mid.qcow2"),
                None,
                &["-b", "lower.raw", "-F", "raw"],
            );
            let upper = write_raw(dir, "upper.bin", &base[half..]);
            let cmd = format!("write -s {} {half} {}", upper.display(), base.len() - half);
            qemu_io(&top, &[&cmd]);
            (top, "qcow2")
        }
    }
}

#[test]
fn overlays_hold_only_the_clusters_that_differ_from_the_base() {
    let mut cases = 0;
    for (base_clusters, label) in [(CLUSTERS, "same size"), (CLUSTERS - 10, "base shorter")] {
        let (base, new) = base_and_new(7 + base_clusters as u64, base_clusters);
        let (want_data, want_zero) = expected_counts(&base, &new);
        assert!(want_data >= 6 && want_zero >= 3, "{want_data} {want_zero}");
        for kind in [BaseKind::Raw, BaseKind::Qcow2, BaseKind::Chain] {
            let dir = Scratch::new();
            let (bpath, bfmt) = make_base(dir.path(), kind, &base);
            // The base as QEMU reads it is what the test meant.
            assert_eq!(
                qemu_view(bpath.as_os_str(), &[]),
                base,
                "{kind:?} base ({label})"
            );
            let new_raw = write_raw(dir.path(), "new.raw", &new);
            let new_q = dir.join("new.qcow2");
            qcow2_from_raw(&new_raw, &new_q, &[]);
            for (src, sfmt) in [(&new_raw, "raw"), (&new_q, "qcow2")] {
                for compress in [false, true] {
                    let ov = dir.join(format!("ov-{sfmt}-{compress}.qcow2"));
                    let b = bpath.to_str().unwrap();
                    let mut args = vec!["-B", b, "-F", bfmt];
                    if compress {
                        args.push("-c");
                    }
                    let r = convert_json(&args, src, &ov);
                    let what = format!("{label}, {kind:?} base, {sfmt} source, -c {compress}");
                    assert_overlay(&ov, &new_raw, "raw", b, bfmt);
                    let (data, zero) = overlay_clusters(&ov);
                    assert_eq!((data, zero), (want_data, want_zero), "{what}");
                    // The report says the same, and dedup shared the three equal
                    // changed clusters.
                    assert_eq!(r["zero-flag-clusters"], want_zero, "{what}: {r}");
                    assert_eq!(
                        r["stored-copies"].as_u64().unwrap()
                            + r["duplicate-clusters"].as_u64().unwrap(),
                        want_data,
                        "{what}: {r}"
                    );
                    assert!(
                        r["duplicate-clusters"].as_u64().unwrap() >= 2,
                        "{what}: {r}"
                    );
                    assert_eq!(r["backing-file"], b, "{what}");
                    assert_eq!(r["backing-format"], bfmt, "{what}");
                    assert!(r["backing-clusters"].as_u64().unwrap() > 20, "{what}: {r}");
                    // Random data does not compress; cluster 14 (zero in the base,
                    // one byte set in the new disk) does.
                    assert_eq!(r["compressed-clusters"], u64::from(compress), "{what}: {r}");
                    cases += 1;
                }
            }
        }
    }
    assert_eq!(cases, 24);
}

#[test]
fn overlays_at_small_clusters_span_many_l2_tables_and_stay_clean() {
    // The 64 KiB changes of `base_and_new` over clusters of 512 B to 4 KiB: each
    // change, zeroed range and filled range covers several output clusters and
    // (at 512 B and 1 KiB, whose L2 tables cover 32 and 128 KiB) several L2
    // tables, some holding only zero-flag entries or only unallocated ones.
    let (base, new) = base_and_new(99, CLUSTERS);
    // (bytes of clusters of `cs` bytes that differ from the base and are not
    // zero, bytes of zero clusters over non-zero base data).
    let expected_bytes = |cs: usize| {
        let (mut data, mut zero) = (0u64, 0u64);
        for (i, n) in new.chunks(cs).enumerate() {
            let b = base.get(i * cs..(i + 1) * cs).unwrap_or(&[]);
            if n == b || (b.is_empty() && n.iter().all(|x| *x == 0)) {
                continue;
            }
            if n.iter().all(|x| *x == 0) {
                zero += cs as u64;
            } else {
                data += cs as u64;
            }
        }
        (data, zero)
    };
    // The same from `qemu-img map` of the overlay: its own extents.
    let overlay_bytes = |img: &Path| {
        let (mut data, mut zero) = (0u64, 0u64);
        for e in qemu_map(img).as_array().expect("map array") {
            if e["depth"] != 0 || e["present"] != true {
                continue;
            }
            let n = e["length"].as_u64().unwrap();
            if e["data"] == true {
                data += n;
            } else if e["zero"] == true {
                zero += n;
            }
        }
        (data, zero)
    };
    let dir = Scratch::new();
    let (bpath, bfmt) = make_base(dir.path(), BaseKind::Qcow2, &base);
    let new_raw = write_raw(dir.path(), "new.raw", &new);
    let b = bpath.to_str().unwrap();
    let mut cases = 0;
    for (cs, opts) in [
        (512, "cluster_size=512"),
        (1024, "cluster_size=1k,refcount_bits=1"),
        (2048, "cluster_size=2k,refcount_bits=2"),
        (4096, "cluster_size=4k,refcount_bits=64"),
        (4096, "cluster_size=4k,compat=0.10"),
    ] {
        for compress in [false, true] {
            let ov = dir.join(format!("ov-{cases}.qcow2"));
            let mut args = vec!["-B", b, "-F", bfmt, "-o", opts, "--verify"];
            if compress {
                args.push("-c");
            }
            let r = convert_json(&args, &new_raw, &ov);
            assert_overlay(&ov, &new_raw, "raw", b, bfmt);
            let (data, zero) = expected_bytes(cs);
            assert!(data > 0 && zero > 0, "{data} {zero}");
            // Version 2 has no zero flag: the zeros over base data are data.
            let want = if opts.contains("compat=0.10") {
                (data + zero, 0)
            } else {
                (data, zero)
            };
            assert_eq!(overlay_bytes(&ov), want, "{opts} -c {compress}: {r}");
            cases += 1;
        }
    }
    assert_eq!(cases, 10);
}

#[test]
fn compressible_changes_are_stored_compressed_in_the_overlay() {
    let dir = Scratch::new();
    let base = text_bytes(3, 16 * CS);
    let mut new = base.clone();
    let t = text_bytes(4, 3 * CS);
    new[4 * CS..7 * CS].copy_from_slice(&t);
    let b = write_raw(dir.path(), "base.raw", &base);
    let n = write_raw(dir.path(), "new.raw", &new);
    let ov = dir.join("ov.qcow2");
    let r = convert_json(&["-c", "-B", b.to_str().unwrap()], &n, &ov);
    // Format probed: raw, and so recorded.
    assert_overlay(&ov, &n, "raw", b.to_str().unwrap(), "raw");
    assert_eq!(r["compressed-clusters"], 3, "{r}");
    assert_eq!(r["backing-clusters"], 13, "{r}");
    let map = qemu_map(&ov);
    let compressed: u64 = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["compressed"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(compressed, 3 * CS as u64, "{map}");
}

#[test]
fn the_backing_file_is_named_as_given_and_resolved_against_the_output() {
    let dir = Scratch::new();
    let (base, new) = base_and_new(11, CLUSTERS);
    let sub = dir.subdir("images");
    write_raw(&sub, "base.raw", &base);
    let n = write_raw(dir.path(), "new.raw", &new);
    // Every spelling: -B, -b, --backing, -o backing_file=,backing_fmt=. The
    // name is relative to the output's directory, not to the working directory.
    for (i, opts) in [
        vec!["-B", "base.raw"],
        vec!["-b", "base.raw", "-F", "raw"],
        vec!["--backing", "base.raw", "--backing-format", "raw"],
        vec!["-o", "backing_file=base.raw,backing_fmt=raw"],
    ]
    .into_iter()
    .enumerate()
    {
        let ov = sub.join(format!("ov{i}.qcow2"));
        let r = convert_json(&opts, &n, &ov);
        assert_eq!(r["backing-file"], "base.raw", "{opts:?}");
        let info = assert_overlay(&ov, &n, "raw", "base.raw", "raw");
        assert_eq!(
            info["full-backing-filename"],
            sub.join("base.raw").to_str().unwrap(),
            "{opts:?}"
        );
        assert_eq!(
            overlay_clusters(&ov),
            expected_counts(&base, &new),
            "{opts:?}"
        );
    }
    // A name must fit in the header cluster: 600 bytes do not in 512-byte
    // clusters (refused before anything is written), they do in 4 KiB ones.
    let long = format!("{}base.raw", "./".repeat(296));
    let small = sub.join("small.qcow2");
    let e = qdedup_fails_in_one_line([
        OsStr::new("convert"),
        OsStr::new("-o"),
        OsStr::new("cluster_size=512"),
        OsStr::new("-B"),
        OsStr::new(&long),
        n.as_os_str(),
        small.as_os_str(),
    ]);
    assert!(e.contains("does not fit"), "{e}");
    assert!(!small.exists());
    let ov = sub.join("long.qcow2");
    convert_json(&["-o", "cluster_size=4k", "-B", &long], &n, &ov);
    assert_overlay(&ov, &n, "raw", &long, "raw");
}

#[test]
fn a_missing_or_unreadable_backing_file_fails_before_anything_is_written() {
    let dir = Scratch::new();
    let n = write_raw(dir.path(), "new.raw", &random_bytes(1, 4 * CS));
    let ov = dir.join("ov.qcow2");
    let e = qdedup_fails_in_one_line([
        OsStr::new("convert"),
        OsStr::new("-B"),
        OsStr::new("nowhere.raw"),
        n.as_os_str(),
        ov.as_os_str(),
    ]);
    assert!(e.contains("nowhere.raw"), "{e}");
    // A file that is not the format given.
    let junk = write_raw(dir.path(), "junk.raw", &[1u8; 4096]);
    let e = qdedup_fails_in_one_line([
        OsStr::new("convert"),
        OsStr::new("-B"),
        junk.as_os_str(),
        OsStr::new("-F"),
        OsStr::new("qcow2"),
        n.as_os_str(),
        ov.as_os_str(),
    ]);
    assert!(e.contains("junk.raw"), "{e}");
    assert_eq!(
        dir.entries(),
        ["junk.raw", "new.raw"],
        "no output, no temporary file"
    );
    // -F without a backing file is a usage error.
    let o = qdedup([
        OsStr::new("convert"),
        OsStr::new("-F"),
        OsStr::new("raw"),
        n.as_os_str(),
        ov.as_os_str(),
    ]);
    assert_eq!(exit_code(&o), 2, "{}", said(&o));
    assert!(stderr(&o).contains("backing file"), "{}", said(&o));
}

#[test]
fn every_worker_count_writes_the_same_overlay() {
    let dir = Scratch::new();
    let (base, new) = base_and_new(5, CLUSTERS);
    let b = write_raw(dir.path(), "base.raw", &base);
    let n = write_raw(dir.path(), "new.raw", &new);
    let b = b.to_str().unwrap();
    let ov = assert_any_worker_count_writes_the_same(&n, dir.path(), &["-B", b, "-c"], "128k");
    assert_overlay(&ov, &n, "raw", b, "raw");
}

#[test]
fn a_flattened_source_gives_an_overlay_a_tenth_of_qemu_imgs() {
    let dir = Scratch::new();
    let clusters = 200;
    let base = random_bytes(21, clusters * CS);
    let mut new = base.clone();
    // 5% of the clusters changed.
    let fresh = random_bytes(22, clusters / 20 * CS);
    for k in 0..clusters / 20 {
        let i = k * 20 + 3;
        new[i * CS..(i + 1) * CS].copy_from_slice(&fresh[k * CS..(k + 1) * CS]);
    }
    let b = write_raw(dir.path(), "base.raw", &base);
    let n = write_raw(dir.path(), "new.raw", &new);
    let ours = dir.join("ours.qcow2");
    let theirs = dir.join("theirs.qcow2");
    let bs = b.to_str().unwrap();
    convert_json(&["-B", bs, "-F", "raw"], &n, &ours);
    let theirs_size = qemu_convert_qcow2(&n, &theirs, &["-f", "raw", "-B", bs, "-F", "raw"]);
    let ours_size = std::fs::metadata(&ours).unwrap().len();
    println!("qemu-img convert -B: {theirs_size} bytes; qdedup convert -B: {ours_size} bytes");
    assert_overlay(&ours, &n, "raw", bs, "raw");
    assert_qemu_compare_same(&n, "raw", &theirs);
    assert_eq!(overlay_clusters(&ours), ((clusters / 20) as u64, 0));
    assert!(
        ours_size * 10 <= theirs_size,
        "qdedup {ours_size} bytes, qemu-img {theirs_size}"
    );
}

#[test]
fn compat_0_10_writes_version_2_images_qemu_reads() {
    let dir = Scratch::new();
    let (base, new) = base_and_new(31, CLUSTERS);
    let b = write_raw(dir.path(), "base.raw", &base);
    let n = write_raw(dir.path(), "new.raw", &new);
    let bs = b.to_str().unwrap();
    let (want_data, want_zero) = expected_counts(&base, &new);
    let mut cases = 0;
    for backing in [false, true] {
        for compress in [false, true] {
            let ov = dir.join(format!("v2-{backing}-{compress}.qcow2"));
            let mut args = vec!["-o", "compat=0.10"];
            if backing {
                args.extend(["-B", bs]);
            }
            if compress {
                args.push("-c");
            }
            let r = convert_json(&args, &n, &ov);
            let what = format!("backing {backing}, -c {compress}");
            assert_qemu_check_clean(&ov);
            assert_qemu_compare_same(&n, "raw", &ov);
            let info = qemu_info(&ov);
            assert_eq!(
                info["format-specific"]["data"]["compat"], "0.10",
                "{what}: {info}"
            );
            assert_eq!(header_field(&ov, 4), 2, "version field");
            assert_eq!(r["qcow2-version"], 2);
            if backing {
                assert_eq!(info["backing-filename"], bs);
                // No zero flag in v2: the zeros over base data are stored, and
                // with dedup they share one host cluster.
                let (data, zero) = overlay_clusters(&ov);
                assert_eq!((data, zero), (want_data + want_zero, 0), "{what}");
                assert_eq!(r["zero-data-clusters"], want_zero, "{what}: {r}");
                assert_eq!(r["zero-flag-clusters"], 0, "{what}");
                let notes = r["notes"].to_string();
                assert!(notes.contains("sharing one host zero cluster"), "{notes}");
            } else {
                assert!(info.get("backing-filename").is_none());
            }
            cases += 1;
        }
    }
    assert_eq!(cases, 4);
    // What version 2 cannot hold is refused, as qemu-img refuses it.
    for (bad, word) in [
        (
            vec!["-c", "-o", "compat=0.10,compression_type=zstd"],
            "zstd",
        ),
        (vec!["-o", "compat=0.10,refcount_bits=8"], "refcount_bits"),
    ] {
        let out = dir.join("bad.qcow2");
        let o = qdedup(argv(&["convert"], &bad, &[n.as_os_str(), out.as_os_str()]));
        assert_eq!(exit_code(&o), 2, "{bad:?}: {}", said(&o));
        assert!(stderr(&o).contains(word), "{}", said(&o));
        assert!(!out.exists());
    }
}

#[test]
fn sparse_size_0_allocates_every_cluster_and_others_change_nothing() {
    let dir = Scratch::new();
    let data = mixed_clusters(CS, 40, 0, 9, Fill::Random);
    let zeros = data
        .chunks(CS)
        .filter(|c| c.iter().all(|b| *b == 0))
        .count() as u64;
    assert!(zeros >= 8, "{zeros}");
    let n = write_raw(dir.path(), "in.raw", &data);
    let all = dir.join("all.qcow2");
    let r = convert_json(&["-S", "0"], &n, &all);
    assert_qemu_check_clean(&all);
    assert_qemu_compare_same(&n, "raw", &all);
    assert_eq!(overlay_clusters(&all), (40, 0), "every cluster allocated");
    assert_eq!(r["zero-data-clusters"], zeros, "{r}");
    assert_eq!(
        r["stored-copies"].as_u64().unwrap(),
        distinct_nonzero(&data, CS) as u64 + 1,
        "one shared zero cluster: {r}"
    );
    let notes = r["notes"].to_string();
    assert!(
        notes.contains("-S 0") && notes.contains("sharing one host zero cluster"),
        "{notes}"
    );
    // Other sizes up to the cluster size: the same bytes as without -S.
    let plain = dir.join("plain.qcow2");
    convert_json(&[], &n, &plain);
    for s in ["512", "4k", "64k"] {
        let o = dir.join(format!("s{s}.qcow2"));
        convert_json(&["-S", s], &n, &o);
        assert!(
            std::fs::read(&o).unwrap() == std::fs::read(&plain).unwrap(),
            "-S {s}"
        );
    }
    for s in ["128k", "1000"] {
        let o = qdedup([
            OsStr::new("convert"),
            OsStr::new("-S"),
            OsStr::new(s),
            n.as_os_str(),
            dir.join("bad.qcow2").as_os_str(),
        ]);
        assert_eq!(exit_code(&o), 2, "-S {s}: {}", said(&o));
        assert!(stderr(&o).contains("cluster size"), "{}", said(&o));
    }
}

#[test]
fn writing_into_an_existing_target_is_refused_with_the_reason() {
    let dir = Scratch::new();
    let n = write_raw(dir.path(), "in.raw", &random_bytes(2, CS));
    let out = dir.join("out.qcow2");
    for opt in ["-n", "--target-is-zero"] {
        let o = qdedup([
            OsStr::new("convert"),
            OsStr::new(opt),
            n.as_os_str(),
            out.as_os_str(),
        ]);
        assert_eq!(exit_code(&o), 2, "{opt}: {}", said(&o));
        let e = stderr(&o);
        assert!(e.contains(opt) && e.contains("always creates OUT"), "{e}");
        assert!(!out.exists());
    }
}

#[test]
fn a_truncated_qcow2_converts_with_salvage_and_fails_cleanly_without() {
    let dir = Scratch::new();
    let mut cases = 0;
    for compress in [false, true] {
        // 8 MiB of text (compressible), then the file cut in the middle of its
        // data: clusters (or compressed streams) past the cut cannot be read.
        let raw = write_raw(dir.path(), "src.raw", &text_bytes(40, 8 << 20));
        let img = dir.join(format!("t-{compress}.qcow2"));
        qcow2_from_raw(&raw, &img, if compress { &["-c"] } else { &[] });
        let len = std::fs::metadata(&img).unwrap().len();
        set_file_len(&img, len / 2 / 512 * 512);
        let out = dir.join(format!("out-{compress}.qcow2"));
        let err =
            qdedup_fails_in_one_line([OsStr::new("convert"), img.as_os_str(), out.as_os_str()]);
        assert!(
            err.contains("past the end of the file") || err.contains("compressed"),
            "{err}"
        );
        assert!(!out.exists());
        // With --salvage: what QEMU's --salvage makes of it, and the ranges listed.
        let r = convert_json(&["--salvage"], &img, &out);
        assert_qemu_check_clean(&out);
        let view = dir.join(format!("qemu-{compress}.raw"));
        qemu_raw_view(img.as_os_str(), &view, &["--salvage"]);
        assert_qemu_compare_same(&view, "raw", &out);
        let ranges = r["salvaged"].as_array().expect("salvaged ranges");
        assert!(!ranges.is_empty(), "{r}");
        let salvaged: u64 = ranges.iter().map(|x| x["length"].as_u64().unwrap()).sum();
        // About half of the data was cut off, and the ranges are where the
        // QEMU view reads zeros.
        assert!((2 << 20..8 << 20).contains(&salvaged), "{r}");
        let qemu_bytes = std::fs::read(&view).unwrap();
        for x in ranges {
            let (o, l) = (
                x["offset"].as_u64().unwrap() as usize,
                x["length"].as_u64().unwrap() as usize,
            );
            assert!(qemu_bytes[o..o + l].iter().all(|b| *b == 0), "{x}");
            assert!(!x["error"].as_str().unwrap().is_empty());
        }
        // The human report names them.
        let out2 = dir.join(format!("h-{compress}.qcow2"));
        let o = qdedup_ok([
            OsStr::new("convert"),
            OsStr::new("--salvage"),
            img.as_os_str(),
            out2.as_os_str(),
        ]);
        let first = format!("{:#x}+", ranges[0]["offset"].as_u64().unwrap());
        assert!(
            stdout(&o).contains("salvaged:") && stdout(&o).contains(&first),
            "{}",
            said(&o)
        );
        cases += 1;
    }
    assert_eq!(cases, 2);
}
