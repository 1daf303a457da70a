//! What keeps memory flat on big images, from the command line: the compact
//! dedup index (`index-bytes` within 24 bytes per stored copy; `--verify`, byte
//! comparison before sharing, writes the same image as the fingerprint alone when
//! nothing collides), L2 tables written as soon as the writer passes their range
//! (COPIED cleared later in tables already written) and compact refcounts. The
//! forced-collision cases are unit tests in `src/writer`.

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
    unique_blocks(&input, 8);
    let out = dir.join("out.qcow2");
    let o = qdedup_ok([
        OsStr::new("convert"),
        OsStr::new("-o"),
        OsStr::new("cluster_size=4k"),
        input.as_os_str(),
        out.as_os_str(),
    ]);
    let human = stdout(&o);
    let line = human
        .lines()
        .find_map(|l| l.strip_prefix("dedup index:       "))
        .unwrap_or_else(|| panic!("no dedup index line in:\n{human}"));
    // "0.0 MiB (23.4 bytes per stored copy)"
    let per: f64 = line
        .split_once(" MiB (")
        .and_then(|(_, r)| r.strip_suffix(" bytes per stored copy)"))
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("bad dedup index line {line:?}"));
    assert!(per > 20.0 && per <= 24.0, "{line}");
    // The JSON report of another run: the same figure, give or take the few
    // spill slots past the last home slot (their number depends on the
    // per-process key).
    let j = convert_json(&["--force", "-o", "cluster_size=4k"], &input, &out);
    let (bytes, copies) = (
        j["index-bytes"].as_u64().unwrap(),
        j["stored-copies"].as_u64().unwrap(),
    );
    assert_eq!(copies, 2048);
    assert!(
        (bytes as f64 / copies as f64 - per).abs() < 1.0,
        "{bytes} vs {line}"
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

/// Clusters of table 0 and table 1 come back in table 3 (and one content 5 times):
/// the tables already written lose COPIED on the clusters shared later, every
/// refcount (1, 2 and 5) is exact, and the tables sit among the data.
#[test]
fn tables_written_early_lose_copied_when_a_later_duplicate_shares_their_cluster() {
    let dir = Scratch::new();
    let cs = 4096usize;
    let per_table = cs / 8;
    // Tables 0..3 of unique blocks, then table 3 repeats blocks of tables 0 and 1.
    let mut data = random_bytes(21, 3 * per_table * cs);
    for (i, c) in data.chunks_mut(cs).enumerate() {
        c[..8].copy_from_slice(&(i as u64).to_le_bytes());
    }
    let block = |i: usize| data[i * cs..(i + 1) * cs].to_vec();
    let mut tail = Vec::new();
    for i in [5, 7, per_table + 3, 7, 7, 7] {
        tail.extend(block(i));
    }
    data.extend(tail);
    let input = write_raw(dir.path(), "in.raw", &data);
    let out = dir.join("out.qcow2");
    let r = convert_json(&["-o", "cluster_size=4k"], &input, &out);
    assert_eq!(r["duplicate-clusters"], 6);
    assert_eq!(r["max-refcount"], 5);
    assert_qemu_check_clean(&out);
    assert_qemu_compare_same(&input, "raw", &out);
    let layout = read_layout(&out);
    let mut by_refs = std::collections::BTreeMap::new();
    for (off, refs) in &layout.data_refs {
        assert_eq!(layout.refcounts[&(off >> 12)], *refs);
        *by_refs.entry(*refs).or_insert(0) += 1;
    }
    assert_eq!(
        by_refs.into_iter().collect::<Vec<_>>(),
        vec![(1, 3 * per_table - 3), (2, 2), (5, 1)]
    );
    let mut cleared = 0;
    for (off, copied) in &layout.copied {
        assert_eq!(*copied, layout.data_refs[off] == 1, "COPIED iff refcount 1");
        cleared += usize::from(!copied);
    }
    assert_eq!(cleared, 6 + 3);
    // The first table lies before the last data cluster: written early.
    let l1 = qdedup::format::l1l2::L1Entry::decode(read_be(&out, layout.header.l1_table_offset, 8));
    let last_data = layout.data_refs.keys().max().copied().unwrap();
    assert!(
        l1.l2_offset < last_data,
        "{:#x} vs {last_data:#x}",
        l1.l2_offset
    );
}
