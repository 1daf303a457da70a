//! The relaxed OFLAG_COPIED scenario end to end: QEMU writes over one sharer of a
//! deduplicated image, `qemu-img check` calls the remaining sharer corrupt,
//! `qdedup check` knows it is safe, and `--repair copied` makes qemu-img happy.

mod common;

use std::ffi::OsStr;

use common::*;

fn json_check(args: &[&OsStr]) -> (i32, serde_json::Value) {
    let mut a: Vec<&OsStr> = vec!["check".as_ref(), "--output".as_ref(), "json".as_ref()];
    a.extend_from_slice(args);
    let o = qdedup(&a);
    (
        o.status.code().unwrap(),
        serde_json::from_slice(&o.stdout).expect("JSON"),
    )
}

#[test]
#[allow(clippy::many_single_char_names)]
fn a_guest_write_over_one_sharer_is_relaxed_copied_and_repairable() {
    let dir = tempfile::tempdir().unwrap();
    let cs = 65536;
    let mut rng = qdedup::sample::Rng::new(17);
    let mut a = vec![0u8; cs];
    rng.fill(&mut a);
    let mut b = vec![0u8; cs];
    rng.fill(&mut b);
    let raw = dir.path().join("in.raw");
    std::fs::write(&raw, [a.clone(), a.clone(), b.clone()].concat()).unwrap();
    let img = dir.path().join("img.qcow2");
    let o = qdedup([OsStr::new("convert"), raw.as_os_str(), img.as_os_str()]);
    assert!(o.status.success());
    let (code, r) = json_check(&[img.as_os_str()]);
    assert_eq!(code, 0);
    assert_eq!(r["shared-clusters"], 1);
    assert_eq!(r["relaxed-copied"], 0);

    // The guest overwrites the first sharer: QEMU copies on write.
    let w = qemu(
        "qemu-io",
        [
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-c".as_ref(),
            "write -P 0xab 0 64k".as_ref(),
            img.as_os_str(),
        ],
    );
    assert!(w.status.success());
    let q = qemu("qemu-img", ["check".as_ref(), img.as_os_str()]);
    assert_eq!(
        q.status.code(),
        Some(2),
        "qemu-img calls the refcount-1 sharer corrupt"
    );
    assert!(String::from_utf8_lossy(&q.stderr).contains("OFLAG_COPIED"));

    let (code, r) = json_check(&[img.as_os_str()]);
    assert_eq!(code, 0, "{r}");
    assert!(r["relaxed-copied"].as_u64().unwrap() >= 1, "{r}");
    let (code, _) = json_check(&[OsStr::new("--strict"), img.as_os_str()]);
    assert_eq!(code, 2, "--strict applies qemu-img's rule");

    let (code, r) = json_check(&[
        OsStr::new("--repair"),
        OsStr::new("copied"),
        img.as_os_str(),
    ]);
    assert_eq!(code, 0, "{r}");
    assert!(r["relaxed-copied-fixed"].as_u64().unwrap() >= 1, "{r}");
    assert_qemu_check_clean(&img);
    let expected = dir.path().join("expected.raw");
    std::fs::write(&expected, [vec![0xab; cs], a, b].concat()).unwrap();
    assert_qemu_compare_same(&expected, "raw", &img);
    let (code, r) = json_check(&[img.as_os_str()]);
    assert_eq!((code, r["relaxed-copied"].as_u64()), (0, Some(0)));
}

#[test]
fn copied_on_a_shared_cluster_is_a_corruption_naming_the_l2_entry() {
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("in.raw");
    let mut rng = qdedup::sample::Rng::new(3);
    let mut a = vec![0u8; 65536];
    rng.fill(&mut a);
    std::fs::write(&raw, a.repeat(2)).unwrap();
    let img = dir.path().join("img.qcow2");
    assert!(
        qdedup([OsStr::new("convert"), raw.as_os_str(), img.as_os_str()])
            .status
            .success()
    );
    // Set COPIED on the second L2 entry (refcount 2).
    let layout = read_layout(&img);
    let bytes = std::fs::read(&img).unwrap();
    let l1 = layout.header.l1_table_offset as usize;
    let l2 = (u64::from_be_bytes(bytes[l1..l1 + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00)
        as usize;
    let entry = l2 + 8;
    let mut patched = bytes.clone();
    patched[entry] |= 0x80;
    std::fs::write(&img, &patched).unwrap();
    let o = qdedup([OsStr::new("check"), img.as_os_str()]);
    assert_eq!(o.status.code(), Some(2));
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        all.contains(&format!("{entry:#x}")) || all.contains(&entry.to_string()),
        "names the L2 entry offset {entry:#x}: {all}"
    );
}
