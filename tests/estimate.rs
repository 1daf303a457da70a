//! `estimate --sample` on real file-system images of two kinds (ext4 and FAT):
//! the true size (what `convert` writes) lies inside the printed 95% interval
//! for at least 19 of 20 seeds.

mod common;

use std::path::Path;

use common::{convert_json, real_files_fs, report_json, FsKind, Scratch};

/// Sizes `qdedup convert -c` writes at 4 KiB and 64 KiB clusters.
fn true_sizes(img: &Path, dir: &Path) -> [u64; 2] {
    ["4k", "64k"].map(|cs| {
        let out = dir.join(format!("out-{cs}.qcow2"));
        let opt = format!("cluster_size={cs}");
        convert_json(&["--force", "-c", "-o", &opt], img, &out);
        std::fs::metadata(&out).unwrap().len()
    })
}

/// Runs `estimate -c --sample P` for seeds 1..=20 at 4 KiB and 64 KiB; returns,
/// per cluster size, how many intervals hold the truth and the largest error.
/// Per cluster size over seeds 1..=20: (intervals holding the truth, largest
/// relative error, mean relative error).
fn coverage(img: &Path, truth: [u64; 2], p: &str) -> [(usize, f64, f64); 2] {
    let mut out = [(0, 0f64, 0f64); 2];
    for seed in 1..=20 {
        let seed = seed.to_string();
        let e = report_json(
            &[
                "estimate",
                "-c",
                "-o",
                "cluster_size=4k",
                "--cluster-sizes",
                "4k,64k",
                "--sample",
                p,
                "--seed",
                &seed,
            ],
            img,
        );
        let table = e["table"].as_array().unwrap();
        assert_eq!(table.len(), 2);
        for (i, row) in table.iter().enumerate() {
            let t = truth[i] as f64;
            let est = row["estimated-size"].as_f64().unwrap();
            let ci = row["estimated-size-95"].as_array().unwrap();
            let (lo, hi) = (ci[0].as_f64().unwrap(), ci[1].as_f64().unwrap());
            if lo <= t && t <= hi {
                out[i].0 += 1;
            }
            out[i].1 = out[i].1.max((est - t).abs() / t);
            out[i].2 += (est - t).abs() / t / 20.0;
        }
    }
    out
}

/// The bar: the truth inside at least 19 of the 20 intervals, at both
/// cluster sizes.
fn assert_intervals_hold(truth: [u64; 2], in4: usize, in64: usize) {
    assert!(
        in4 >= 19,
        "4 KiB: truth {} inside {in4}/20 intervals",
        truth[0]
    );
    assert!(
        in64 >= 19,
        "64 KiB: truth {} inside {in64}/20 intervals",
        truth[1]
    );
}

/// Two copies of the same 12 MiB of real files in a 64 MiB file system of
/// `kind`: the intervals at p = 0.2 hold the truth, the estimate stays close.
fn small_image_of_real_files(kind: FsKind) {
    let d = Scratch::new();
    let (img, files) = real_files_fs(d.path(), kind, 2, 12 << 20, 64 << 20);
    assert!(files >= 100, "only {files} files copied");
    let truth = true_sizes(&img, d.path());
    // Without compression, sampling is exact.
    let plain = report_json(&["estimate", "--sample", "0.2"], &img);
    let exact = report_json(&["estimate"], &img);
    assert_eq!(plain["estimated-size"], exact["estimated-size"]);
    // The copies share clusters at 4 KiB: the file system keeps them aligned.
    let at4k = report_json(&["estimate", "-o", "cluster_size=4k"], &img);
    let dup = at4k["table"][0]["duplicate-clusters"].as_u64().unwrap();
    assert!(dup > 1000, "{kind:?}: only {dup} duplicate 4 KiB clusters");
    let [(in4, err4, _), (in64, _, mean64)] = coverage(&img, truth, "0.2");
    assert_intervals_hold(truth, in4, in64);
    assert!(err4 < 0.05, "4 KiB: error up to {:.1}%", 100.0 * err4);
    // At 64 KiB this small image has few distinct contents, so one seed can be
    // off by more (the interval says so and holds the truth); on average the
    // estimate stays close.
    assert!(mean64 < 0.05, "64 KiB: mean error {:.1}%", 100.0 * mean64);
}

#[test]
fn sampled_interval_holds_the_truth_on_an_ext4_image_of_real_files() {
    small_image_of_real_files(FsKind::Ext4);
}

#[test]
fn sampled_interval_holds_the_truth_on_a_fat_image_of_real_files() {
    small_image_of_real_files(FsKind::Vfat);
}

/// Four copies of the same 240 MiB of real files in a 2 GiB file system of
/// `kind`, sampled at p = 0.05.
fn two_gib_image_of_real_files(kind: FsKind) {
    let d = Scratch::new();
    let (img, files) = real_files_fs(d.path(), kind, 4, 240 << 20, 2 << 30);
    assert!(files >= 1000, "only {files} files copied");
    let truth = true_sizes(&img, d.path());
    let [(in4, err4, _), (in64, err64, _)] = coverage(&img, truth, "0.05");
    assert_intervals_hold(truth, in4, in64);
    assert!(err4 <= 0.05, "4 KiB: error up to {:.1}%", 100.0 * err4);
    assert!(err64 <= 0.05, "64 KiB: error up to {:.1}%", 100.0 * err64);
}

#[test]
#[ignore = "builds a 2 GiB file system and converts it"]
fn sampled_interval_holds_the_truth_on_a_2_gib_ext4_image() {
    two_gib_image_of_real_files(FsKind::Ext4);
}

#[test]
#[ignore = "builds a 2 GiB file system and converts it"]
fn sampled_interval_holds_the_truth_on_a_2_gib_fat_image() {
    two_gib_image_of_real_files(FsKind::Vfat);
}
