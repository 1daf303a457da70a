//! `qdedup checksum` and `convert --checksum` against an independent reference:
//! a few lines of Python (hashlib, and the `blake3` package from PyPI) that hash
//! QEMU's raw view of the image (`qemu-img convert -O raw`) block by block, as
//! blkhash's own reference implementation (test/blkhash.py) does. A missing
//! python3 or blake3 module fails the tests (`.ci/run` installs the module).

mod common;

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use common::*;

/// blkhash ≥ 0.10.1: H(H(b0) ‖ … ‖ H(bn−1) ‖ le64(length)), the last block as
/// it is. argv: digest name, block size, raw file.
const REFERENCE: &str = r#"
import hashlib, struct, sys
import blake3
alg, bs, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
new = {"sha256": hashlib.sha256, "blake3": blake3.blake3}[alg]
root, length = new(), 0
with open(path, "rb") as f:
    while True:
        block = f.read(bs)
        if not block:
            break
        root.update(new(block).digest())
        length += len(block)
root.update(struct.pack("<Q", length))
print(root.hexdigest())
"#;

/// The reference digest of the raw file `raw`.
fn reference(alg: &str, block_size: u64, raw: &Path) -> String {
    let o = Command::new("python3")
        .arg("-c")
        .arg(REFERENCE)
        .arg(alg)
        .arg(block_size.to_string())
        .arg(raw)
        .output()
        .expect("python3 runs (the reference checksum needs it)");
    assert!(
        o.status.success(),
        "the Python reference failed (is the blake3 module installed? \
         python3 -m pip install --user blake3):\n{}",
        said(&o)
    );
    stdout(&o).trim().to_string()
}

/// The digest `qdedup checksum ARGS IMG` prints (checking the line's shape).
fn qdedup_checksum(args: &[&str], img: &Path) -> String {
    let mut argv: Vec<&OsStr> = vec!["checksum".as_ref()];
    argv.extend(args.iter().map(OsStr::new));
    argv.push(img.as_os_str());
    let out = succeeded(&qdedup(&argv), "qdedup checksum");
    let line = out.trim_end();
    assert_eq!(line.lines().count(), 1, "{out}");
    let (digest, name) = line.split_once("  ").expect("DIGEST  IMAGE");
    assert_eq!(name, img.display().to_string());
    assert_eq!(digest.len(), 64, "{line}");
    digest.to_string()
}

/// Asserts that `qdedup checksum [QDEDUP_ARGS] IMG` equals the reference over
/// QEMU's view of `img` (`qemu-img convert [QEMU_ARGS]`) for both digests, and
/// returns the blake3 digest.
fn assert_like_reference(img: &Path, qdedup_args: &[&str], qemu_args: &[&str]) -> String {
    let dir = Scratch::new();
    let view = dir.join("view.raw");
    qemu_raw_view(img.as_os_str(), &view, qemu_args);
    let mut blake3 = String::new();
    for alg in ["sha256", "blake3"] {
        let mut args = vec!["-d", alg];
        args.extend_from_slice(qdedup_args);
        let got = qdedup_checksum(&args, img);
        assert_eq!(
            got,
            reference(alg, 65536, &view),
            "{alg} of {} {qdedup_args:?}",
            img.display()
        );
        if alg == "blake3" {
            blake3 = got;
        }
    }
    blake3
}

/// Converts `img` with `convert --checksum=ALG` (each digest, at 64 KiB and at
/// the other cluster size `other_cs`) and asserts that the reported digest is
/// `qdedup checksum` of the input and of the output. Returns how many
/// conversions were checked.
fn assert_convert_checksums(img: &Path, extra: &[&str], other_cs: &str) -> usize {
    let dir = Scratch::new();
    let mut cases = 0;
    for (alg, opts) in [
        ("blake3", vec![]),
        ("sha256", vec![]),
        ("blake3", vec!["-o", other_cs]),
        ("sha256", vec!["-c", "-o", other_cs]),
    ] {
        let out = dir.join(format!("out{cases}.qcow2"));
        let flag = format!("--checksum={alg}");
        let mut args = vec![flag.as_str()];
        args.extend_from_slice(&opts);
        args.extend_from_slice(extra);
        let report = convert_json(&args, img, &out);
        let said = report["checksum"]
            .as_str()
            .expect("a checksum in the report");
        assert_eq!(report["checksum-algorithm"], alg);
        let mut sum_args = vec!["-d", alg];
        sum_args.extend_from_slice(extra);
        assert_eq!(
            said,
            qdedup_checksum(&sum_args, img),
            "{alg} {opts:?}: convert's digest of the input"
        );
        assert_eq!(
            said,
            qdedup_checksum(&["-d", alg], &out),
            "{alg} {opts:?}: the output's digest"
        );
        cases += 1;
    }
    cases
}

#[test]
fn raw_images_of_any_size_hash_like_the_reference() {
    let dir = Scratch::new();
    let mut cases = 0;
    // A multiple of 512 and of the block, a multiple of 512 only, an odd size
    // (qemu-img rounds it up to 512), a tiny one and an empty one.
    for (n, tail) in [
        (40usize, 0usize),
        (37, 3 * 512),
        (33, 1000),
        (0, 100),
        (0, 0),
    ] {
        let data = mixed_clusters(65536, n, tail, n as u64, Fill::Random);
        let raw = write_raw(dir.path(), &format!("in{n}.raw"), &data);
        assert_like_reference(&raw, &[], &[]);
        if tail == 1000 {
            // Forced format, hashed on the calling thread.
            assert_like_reference(&raw, &["-f", "raw", "-m", "0"], &["-f", "raw"]);
        }
        cases += 1;
    }
    assert_eq!(cases, 5);
}

#[test]
fn other_block_sizes_hash_like_the_reference() {
    let dir = Scratch::new();
    let data = mixed_clusters(4096, 700, 1000, 3, Fill::Text);
    let raw = write_raw(dir.path(), "in.raw", &data);
    let img = dir.join("in.qcow2");
    qcow2_from_raw(&raw, &img, &["-c", "-o", "cluster_size=4k"]);
    let view = dir.join("view.raw");
    qemu_raw_view(img.as_os_str(), &view, &[]);
    let mut cases = 0;
    for bs in [4096u64, 12288, 131_072, 1 << 20] {
        let text = bs.to_string();
        for path in [&raw, &img] {
            let got = qdedup_checksum(&["-d", "sha256", "--block-size", &text], path);
            assert_eq!(got, reference("sha256", bs, &view), "block size {bs}");
            cases += 1;
        }
    }
    assert_eq!(cases, 8);
    // Not a multiple of 4 KiB: refused before anything is read.
    let e = qdedup_fails_in_one_line(["checksum", "--block-size", "1000", "x"]);
    assert!(e.contains("block size"), "{e}");
}

#[test]
fn qcow2_images_of_every_kind_hash_like_the_reference_and_like_their_raw_view() {
    let dir = Scratch::new();
    let data = mixed_clusters(65536, 48, 0, 7, Fill::Text);
    let raw = write_raw(dir.path(), "in.raw", &data);
    let raw_sum = assert_like_reference(&raw, &[], &[]);
    let mut cases = 0;
    // Plain, compressed (zlib, zstd at 4 KiB, 2 MiB clusters), extended L2.
    for (name, opts) in [
        ("plain", vec![]),
        ("zlib", vec!["-c"]),
        (
            "zstd4k",
            vec!["-c", "-o", "compression_type=zstd,cluster_size=4k"],
        ),
        ("big", vec!["-c", "-o", "cluster_size=2M"]),
        ("ext", vec!["-o", "extended_l2=on,cluster_size=128k"]),
    ] {
        let img = dir.join(format!("{name}.qcow2"));
        qcow2_from_raw(&raw, &img, &opts);
        // Same content, same digest, whatever the format.
        assert_eq!(assert_like_reference(&img, &[], &[]), raw_sum, "{name}");
        cases += 1;
    }
    // Zero clusters and subclusters written over data.
    let ext = dir.join("ext.qcow2");
    qemu_io(
        &ext,
        &[
            "write -z 0 64k",
            "write -z 200k 8k",
            "write -P 0x11 300k 2k",
            "write -z -u 1M 128k",
        ],
    );
    let zero = dir.join("zero.qcow2");
    qcow2_from_raw(&raw, &zero, &[]);
    qemu_io(&zero, &["write -z 64k 192k", "write -z -u 1M 64k"]);
    for img in [&ext, &zero] {
        assert_like_reference(img, &[], &[]);
        cases += 1;
    }
    assert_eq!(cases, 7);
}

#[test]
fn snapshots_and_backing_chains_hash_like_the_reference() {
    let dir = Scratch::new();
    let data = mixed_clusters(65536, 40, 0, 11, Fill::Random);
    let raw = write_raw(dir.path(), "base.raw", &data);
    // A snapshot, then the active layer changed.
    let snap = dir.join("snap.qcow2");
    qcow2_from_raw(&raw, &snap, &[]);
    qemu_snapshot(&snap, "s1");
    qemu_io(&snap, &["write -P 0x21 0 100k", "write -z 1M 64k"]);
    let s1 = assert_like_reference(&snap, &["-l", "s1"], &["-l", "snapshot.name=s1"]);
    let active = assert_like_reference(&snap, &[], &[]);
    assert_ne!(s1, active);
    // A raw base, a qcow2 middle shorter than the top, a top with 4 KiB clusters.
    let mid = create_qcow2(
        dir.join("mid.qcow2"),
        Some("3M"),
        &["-b", "base.raw", "-F", "raw"],
    );
    qemu_io(&mid, &["write -P 0x31 512k 72k", "write -z 2M 128k"]);
    let top = create_qcow2(
        dir.join("top.qcow2"),
        Some("5M"),
        &["-b", "mid.qcow2", "-F", "qcow2", "-o", "cluster_size=4k"],
    );
    qemu_io(&top, &["write -P 0x41 4k 8k", "write -P 0x42 4000k 8k"]);
    let mut cases = 0;
    for img in [&mid, &top] {
        assert_like_reference(img, &[], &[]);
        cases += 1;
    }
    assert_eq!(cases, 2);
    assert_eq!(assert_convert_checksums(&top, &[], "cluster_size=4k"), 4);
    assert_eq!(
        assert_convert_checksums(&snap, &["-l", "s1"], "cluster_size=2M"),
        4
    );
}

#[test]
fn convert_prints_the_digest_checksum_prints_for_input_and_output() {
    let dir = Scratch::new();
    let mut cases = 0;
    // Sizes: blocks straddling batches and clusters, an odd raw size.
    let data = mixed_clusters(65536, 50, 0, 20, Fill::Text);
    let raw = write_raw(dir.path(), "in50.raw", &data);
    cases += assert_convert_checksums(&raw, &[], "cluster_size=4k");
    // qdedup's own compressed, deduplicated output as an input.
    let out = dir.join("dedup.qcow2");
    qdedup_ok([
        "convert".as_ref(),
        "-c".as_ref(),
        raw.as_os_str(),
        out.as_os_str(),
    ]);
    assert_like_reference(&out, &[], &[]);
    cases += assert_convert_checksums(&out, &[], "cluster_size=2M");
    // An odd size, 512-byte clusters, the sequential converter.
    let data = mixed_clusters(65536, 21, 1000, 21, Fill::Text);
    let odd = write_raw(dir.path(), "odd.raw", &data);
    cases += assert_convert_checksums(&odd, &["-m", "0"], "cluster_size=512");
    assert_eq!(cases, 12);
    // The human report names the digest.
    let raw = dir.join("in50.raw");
    let out = dir.join("human.qcow2");
    let o = qdedup_ok([
        "convert".as_ref(),
        "--checksum".as_ref(),
        raw.as_os_str(),
        out.as_os_str(),
    ]);
    let digest = qdedup_checksum(&["-d", "blake3"], &raw);
    assert!(
        stdout(&o).contains(&format!("checksum:          {digest} (blake3, blkhash)")),
        "{}",
        stdout(&o)
    );
}

#[test]
fn convert_checksum_of_an_overlay_is_the_sources_digest() {
    let dir = Scratch::new();
    // A base, and a new disk equal to it but for changed clusters, zeroed
    // clusters over base data, and data where the base has zeros.
    let cs = 65536;
    let base_data = mixed_clusters(cs, 40, 0, 7, Fill::Text);
    let mut new_data = base_data.clone();
    new_data[3 * cs..4 * cs].fill(0x5a);
    new_data[10 * cs..12 * cs].fill(0);
    new_data[20 * cs + 100..20 * cs + 200].fill(7);
    let base = write_raw(dir.path(), "base.raw", &base_data);
    let new = write_raw(dir.path(), "new.raw", &new_data);
    let base_q = dir.join("base.qcow2");
    qemu_img(
        ["convert", "-q", "-O", "qcow2"]
            .map(OsStr::new)
            .into_iter()
            .chain([base.as_os_str(), base_q.as_os_str()]),
    );
    let mut cases = 0;
    for (alg, backing, opts) in [
        ("blake3", &base, vec![]),
        ("sha256", &base, vec!["-m", "0"]),
        ("blake3", &base_q, vec!["-o", "compat=0.10"]),
        ("sha256", &base_q, vec!["-c", "-o", "cluster_size=4k"]),
        ("blake3", &base_q, vec!["-S", "0"]),
    ] {
        let out = dir.join(format!("ov{cases}.qcow2"));
        let flag = format!("--checksum={alg}");
        let mut args = vec![flag.as_str(), "-B", backing.to_str().unwrap()];
        args.extend_from_slice(&opts);
        let report = convert_json(&args, &new, &out);
        assert!(
            report["backing-clusters"].as_u64().unwrap() > 0,
            "{opts:?}: an overlay: {report}"
        );
        let said = report["checksum"].as_str().expect("a checksum");
        assert_eq!(
            said,
            qdedup_checksum(&["-d", alg], &new),
            "{alg} {opts:?}: the source's"
        );
        assert_eq!(
            said,
            qdedup_checksum(&["-d", alg], &out),
            "{alg} {opts:?}: the overlay's"
        );
        assert_eq!(
            said,
            reference(alg, 65536, &new),
            "{alg} {opts:?}: the reference"
        );
        cases += 1;
    }
    assert_eq!(cases, 5);
}

#[test]
fn a_deduplicated_image_is_hashed_once_per_shared_cluster() {
    let dir = Scratch::new();
    // One 64 KiB content 32 times, and 8 distinct ones.
    let mut data = Vec::new();
    let one = random_bytes(1, 65536);
    for i in 0..40u64 {
        if i % 5 == 4 {
            data.extend_from_slice(&random_bytes(100 + i, 65536));
        } else {
            data.extend_from_slice(&one);
        }
    }
    let raw = write_raw(dir.path(), "in.raw", &data);
    let out = dir.join("out.qcow2");
    qdedup_ok(["convert".as_ref(), raw.as_os_str(), out.as_os_str()]);
    let r = qdedup_json([
        "checksum".as_ref(),
        "--output".as_ref(),
        "json".as_ref(),
        raw.as_os_str(),
        out.as_os_str(),
    ]);
    let (raw_r, out_r) = (&r[0], &r[1]);
    assert_eq!(raw_r["checksum"], out_r["checksum"]);
    assert_eq!(raw_r["hashed-blocks"], 40);
    assert_eq!(out_r["hashed-blocks"], 9);
    assert_eq!(out_r["reused-blocks"], 31);
    assert_eq!(out_r["bytes-read"], 9 * 65536);
    assert_eq!(out_r["algorithm"], "sha256");
    assert_eq!(out_r["block-size"], 65536);
}

#[test]
fn an_unreadable_image_is_reported_and_the_others_still_hashed() {
    let dir = Scratch::new();
    let raw = write_raw(dir.path(), "in.raw", &random_bytes(3, 5000));
    let missing = dir.join("missing.raw");
    let o = qdedup(["checksum".as_ref(), missing.as_os_str(), raw.as_os_str()]);
    assert_eq!(exit_code(&o), 1, "{}", said(&o));
    assert!(stderr(&o).contains("missing.raw"), "{}", said(&o));
    assert!(
        stdout(&o)
            .trim_end()
            .ends_with(&format!("  {}", raw.display())),
        "{}",
        said(&o)
    );
}

#[test]
fn an_image_a_writer_holds_is_refused_unless_force_share() {
    let dir = Scratch::new();
    let raw = write_raw(dir.path(), "in.raw", &random_bytes(4, 256 << 10));
    let img = dir.join("held.qcow2");
    qcow2_from_raw(&raw, &img, &[]);
    let want = qdedup_checksum(&[], &raw);
    let _holder = QemuHolder::qemu_io(&img, &[]);
    let o = qdedup(["checksum".as_ref(), img.as_os_str()]);
    assert_eq!(exit_code(&o), 1, "{}", said(&o));
    assert!(stderr(&o).contains("lock"), "{}", said(&o));
    // As qemu-img -U: read anyway (nothing writes it here, so the digest holds).
    assert_eq!(qdedup_checksum(&["-U"], &img), want);
}
