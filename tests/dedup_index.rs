//! The compact dedup index from the command line: `index-bytes` in the report
//! stays within 24 bytes per stored copy, and `--verify` (byte comparison before
//! sharing) writes the same image as the fingerprint alone when nothing
//! collides. The forced-collision cases are unit tests in `src/writer`.

mod common;

use std::ffi::OsStr;

use common::*;
use qdedup::sample::{generate, Mix};

#[test]
fn index_bytes_stay_within_24_per_stored_copy_at_4k_and_64k_clusters() {
    let dir = Scratch::new();
    let input = dir.join("unique.raw");
    unique_blocks(&input, 48);
    let mut checked = 0;
    for cs in ["4k", "64k"] {
        let out = dir.join(format!("out-{cs}.qcow2"));
        let r = convert_json(&["-o", &format!("cluster_size={cs}")], &input, &out);
        let copies = r["stored-copies"].as_u64().unwrap();
        let bytes = r["index-bytes"].as_u64().unwrap();
        assert_eq!(copies, (48 << 20) / if cs == "4k" { 4096 } else { 65536 });
        assert!(
            bytes > 0 && bytes <= 24 * copies,
            "{cs}: {bytes} bytes for {copies} copies"
        );
        assert_qemu_check_clean(&out);
        checked += 1;
    }
    assert_eq!(checked, 2);
}

#[test]
fn the_human_report_gives_the_index_size_per_stored_copy() {
    let dir = Scratch::new();
    let input = dir.join("in.raw");
    generate(&input, 4 << 20, 3, Mix::MIXED).unwrap();
    let out = dir.join("out.qcow2");
    let o = qdedup_ok([OsStr::new("convert"), input.as_os_str(), out.as_os_str()]);
    let human = stdout(&o);
    let j = convert_json(&["--force"], &input, &out);
    let (bytes, copies) = (
        j["index-bytes"].as_u64().unwrap(),
        j["stored-copies"].as_u64().unwrap(),
    );
    let want = format!(
        "dedup index:       {:.1} MiB ({:.1} bytes per stored copy)",
        bytes as f64 / f64::from(1 << 20),
        bytes as f64 / copies as f64
    );
    assert!(
        human.lines().any(|l| l == want),
        "missing {want:?} in:\n{human}"
    );
    assert_eq!(j["verify"], false);
}

#[test]
fn verify_writes_the_same_image_for_any_worker_count_when_nothing_collides() {
    let dir = Scratch::new();
    let input = dir.join("in.raw");
    generate(&input, 6 << 20, 7, Mix::MIXED).unwrap();
    let mut checked = 0;
    for opts in [
        &[][..],
        &["-c"],
        &["-c", "-o", "compression_type=zstd,cluster_size=4k"],
    ] {
        let plain = dir.join(format!("plain{checked}.qcow2"));
        let r = convert_json(opts, &input, &plain);
        let sub = dir.join(format!("v{checked}"));
        std::fs::create_dir(&sub).unwrap();
        let with: Vec<&str> = opts.iter().copied().chain(["--verify"]).collect();
        let verified = assert_any_worker_count_writes_the_same(&input, &sub, &with, "4M");
        assert!(
            std::fs::read(&verified).unwrap() == std::fs::read(&plain).unwrap(),
            "--verify changed the output ({opts:?})"
        );
        let v = convert_json(&with, &input, &sub.join("report.qcow2"));
        assert_eq!(v["verify"], true);
        assert_eq!(v["verify-mismatches"], 0);
        assert!(v["duplicate-clusters"].as_u64().unwrap() > 0);
        assert_eq!(v["duplicate-clusters"], r["duplicate-clusters"]);
        assert_qemu_check_clean(&verified);
        assert_qemu_compare_same(&input, "raw", &verified);
        checked += 1;
    }
    assert_eq!(checked, 3);
}
