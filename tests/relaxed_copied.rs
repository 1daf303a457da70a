//! The relaxed OFLAG_COPIED scenario end to end: QEMU writes over one sharer of a
//! deduplicated image, `qemu-img check` calls the remaining sharer corrupt,
//! `qdedup check` knows it is safe, and `--repair copied` makes qemu-img happy.

mod common;

use std::ffi::OsStr;

use common::*;
use qdedup::format::l1l2::QCOW_OFLAG_COPIED;

#[test]
#[allow(clippy::many_single_char_names)]
fn a_guest_write_over_one_sharer_is_relaxed_copied_and_repairable() {
    let dir = Scratch::new();
    let cs = 65536;
    let mut rng = qdedup::sample::Rng::new(17);
    let mut a = vec![0u8; cs];
    rng.fill(&mut a);
    let mut b = vec![0u8; cs];
    rng.fill(&mut b);
    let raw = dir.join("in.raw");
    std::fs::write(&raw, [a.clone(), a.clone(), b.clone()].concat()).unwrap();
    let img = dir.join("img.qcow2");
    qdedup_ok([OsStr::new("convert"), raw.as_os_str(), img.as_os_str()]);
    let (code, r) = check_json([img.as_os_str()]);
    assert_eq!(code, 0);
    assert_eq!(r["shared-clusters"], 1);
    assert_eq!(r["relaxed-copied"], 0);

    // The guest overwrites the first sharer: QEMU copies on write.
    qemu_io(&img, &["write -P 0xab 0 64k"]);
    let q = qemu_img_check(&img);
    assert_eq!(
        q.status.code(),
        Some(2),
        "qemu-img calls the refcount-1 sharer corrupt"
    );
    assert!(String::from_utf8_lossy(&q.stderr).contains("OFLAG_COPIED"));

    let (code, r) = check_json([img.as_os_str()]);
    assert_eq!(code, 0, "{r}");
    assert!(r["relaxed-copied"].as_u64().unwrap() >= 1, "{r}");
    let (code, _) = check_json([OsStr::new("--strict"), img.as_os_str()]);
    assert_eq!(code, 2, "--strict applies qemu-img's rule");

    let (code, r) = check_json([
        OsStr::new("--repair"),
        OsStr::new("copied"),
        img.as_os_str(),
    ]);
    assert_eq!(code, 0, "{r}");
    assert!(r["relaxed-copied-fixed"].as_u64().unwrap() >= 1, "{r}");
    assert_qemu_check_clean(&img);
    let expected = dir.join("expected.raw");
    std::fs::write(&expected, [vec![0xab; cs], a, b].concat()).unwrap();
    assert_qemu_compare_same(&expected, "raw", &img);
    let (code, r) = check_json([img.as_os_str()]);
    assert_eq!((code, r["relaxed-copied"].as_u64()), (0, Some(0)));
}

#[test]
fn copied_on_a_shared_cluster_is_a_corruption_naming_the_l2_entry() {
    let dir = Scratch::new();
    let raw = dir.join("in.raw");
    let mut rng = qdedup::sample::Rng::new(3);
    let mut a = vec![0u8; 65536];
    rng.fill(&mut a);
    std::fs::write(&raw, a.repeat(2)).unwrap();
    let img = dir.join("img.qcow2");
    qdedup_ok([OsStr::new("convert"), raw.as_os_str(), img.as_os_str()]);
    // Set COPIED on the second L2 entry (refcount 2).
    let patched = Img::open(&img);
    let entry = patched.l2_entry(0, 1);
    patched.put_u64(entry, patched.u64_at(entry) | QCOW_OFLAG_COPIED);
    let o = qdedup([OsStr::new("check"), img.as_os_str()]);
    assert_eq!(o.status.code(), Some(2));
    let all = said(&o);
    assert!(
        all.contains(&format!("{entry:#x}")) || all.contains(&entry.to_string()),
        "names the L2 entry offset {entry:#x}: {all}"
    );
}
