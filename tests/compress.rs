//! `qdedup convert -c`: compressed clusters, checked by qemu-img.

mod common;

use common::*;

#[test]
fn zlib_and_zstd_at_every_cluster_size_are_clean_and_identical() {
    let dir = Scratch::new();
    for (cs, n) in [(512usize, 900usize), (4096, 300), (65536, 40), (2 << 20, 6)] {
        let input = dir.join(format!("in-{cs}.raw"));
        // Clusters of text (compressible), some repeated, some random, some zero.
        let data = mixed_clusters(cs, n, 32, cs as u64, Fill::Text);
        std::fs::write(&input, data).unwrap();
        for codec in ["zlib", "zstd"] {
            let out = dir.join(format!("out-{cs}-{codec}.qcow2"));
            let r = convert_json(
                &[
                    "-c",
                    "-o",
                    &format!("cluster_size={cs},compression_type={codec}"),
                ],
                &input,
                &out,
            );
            assert_qemu_check_clean(&out);
            assert_qemu_compare_same(&input, "raw", &out);
            let info = qemu_info(&out);
            assert_eq!(info["format-specific"]["data"]["compression-type"], codec);
            let layout = read_layout(&out);
            assert!(
                layout.compressed > 0,
                "{codec} {cs}: some clusters compressed"
            );
            assert_eq!(
                layout.compressed_copied, 0,
                "compressed entries never carry COPIED"
            );
            assert_eq!(
                r["compressed-streams"].as_u64().unwrap(),
                layout.streams.len() as u64,
                "each content compressed once"
            );
            assert!(r["compression-ratio"].as_f64().unwrap() > 1.5);
            // Stored refcount of every stream cluster = references through streams + plain refs.
            for (h, refs) in &layout.stream_refs {
                let plain = layout
                    .data_refs
                    .get(&(h << layout.header.cluster_bits))
                    .copied()
                    .unwrap_or(0);
                assert_eq!(layout.refcounts[h], refs + plain, "cluster {h}");
            }
        }
    }
}

#[test]
fn refcount_bits_2_with_many_shared_streams_per_cluster_stays_at_most_3() {
    let dir = Scratch::new();
    let input = dir.join("in.raw");
    // 20 small contents (a few hundred bytes compressed), each repeated 7 times.
    let cs = 4096;
    let mut rng = qdedup::sample::Rng::new(99);
    let contents: Vec<Vec<u8>> = (0..20)
        .map(|i| {
            let mut c = vec![b' '; cs];
            qdedup::sample::fill_text(&mut rng, &mut c[..200 + i * 10]);
            c
        })
        .collect();
    let mut data = Vec::new();
    for round in 0..7 {
        for (i, c) in contents.iter().enumerate() {
            if (i + round) % 3 != 0 || round < 5 {
                data.extend_from_slice(c);
            }
        }
    }
    std::fs::write(&input, &data).unwrap();
    let out = dir.join("out.qcow2");
    let r = convert_json(
        &["-c", "-o", "cluster_size=4k,refcount_bits=2"],
        &input,
        &out,
    );
    assert_qemu_check_clean(&out);
    assert_qemu_compare_same(&input, "raw", &out);
    let layout = read_layout(&out);
    assert!(
        layout.refcounts.values().all(|r| *r <= 3),
        "{:?}",
        layout.refcounts
    );
    assert!(
        layout.stream_refs.values().any(|r| *r >= 2),
        "streams share host clusters"
    );
    assert!(r["saturation-copies"].as_u64().unwrap() > 0);
    for zstd in [false, true] {
        let out = dir.join(format!("out-{zstd}.qcow2"));
        let o = if zstd {
            "cluster_size=4k,refcount_bits=2,compression_type=zstd"
        } else {
            "cluster_size=4k,refcount_bits=2"
        };
        convert_json(&["-c", "-o", o, "-m", "2"], &input, &out);
        assert_qemu_check_clean(&out);
        assert_qemu_compare_same(&input, "raw", &out);
    }
}

#[test]
fn compressed_output_is_identical_for_any_number_of_workers() {
    let dir = Scratch::new();
    let input = dir.join("in.raw");
    std::fs::write(&input, mixed_clusters(4096, 3000, 32, 5, Fill::Text)).unwrap();
    let reference = assert_any_worker_count_writes_the_same(
        &input,
        dir.path(),
        &["-c", "-o", "cluster_size=4k"],
        "2M",
    );
    assert_qemu_check_clean(&reference);
}

#[test]
fn incompressible_data_is_stored_plain() {
    let dir = Scratch::new();
    let input = dir.join("in.raw");
    std::fs::write(&input, random_bytes(1, 65536 * 8)).unwrap();
    let out = dir.join("out.qcow2");
    let r = convert_json(&["-c"], &input, &out);
    assert_eq!(r["compressed-streams"], 0);
    assert_eq!(read_layout(&out).data_refs.len(), 8);
    assert_qemu_compare_same(&input, "raw", &out);
}

/// The incompressibility probe skips deflate on random clusters without changing
/// a byte of the output: the same image with and without `--no-compress-probe`,
/// at 4 KiB and 64 KiB clusters, on clusters that are random, text, random with
/// a zero run or a repeat inside, and zero.
#[test]
fn compress_probe_skips_random_clusters_and_changes_no_byte() {
    let dir = Scratch::new();
    let input = dir.join("in.raw");
    let cs = 65536;
    let mut rng = qdedup::sample::Rng::new(11);
    let mut data = vec![0u8; cs * 24];
    let mut random_64k = 0;
    for (i, c) in data.chunks_mut(cs).enumerate() {
        match i % 6 {
            0 => qdedup::sample::fill_text(&mut rng, c),
            1 => {
                rng.fill(c);
                c[5000..7000].fill(0); // compressible at either cluster size
            }
            2 => {
                rng.fill(c);
                c.copy_within(9000..11000, 12000); // a repeat 3000 bytes back
            }
            3 => {}
            _ => {
                rng.fill(c);
                random_64k += 1;
            }
        }
    }
    std::fs::write(&input, &data).unwrap();
    for o in ["cluster_size=4096", "cluster_size=65536"] {
        let probed = dir.join(format!("probed-{o}.qcow2"));
        let tried = dir.join(format!("tried-{o}.qcow2"));
        let a = convert_json(&["-c", "-o", o], &input, &probed);
        let b = convert_json(&["-c", "--no-compress-probe", "-o", o], &input, &tried);
        assert_eq!(
            std::fs::read(&probed).unwrap(),
            std::fs::read(&tried).unwrap(),
            "{o}: the probe changed the output"
        );
        assert_eq!(b["probe-skipped"], 0, "{o}");
        // Every random 64 KiB cluster is skipped (16 units of 4 KiB each at 4 KiB
        // clusters); the zero-run and repeat clusters are compressed, not skipped.
        let per = (cs as u64) / a["cluster-size"].as_u64().unwrap();
        let skipped = a["probe-skipped"].as_u64().unwrap();
        assert!(skipped >= random_64k * per, "{o}: {skipped} skipped");
        assert_eq!(a["compressed-streams"], b["compressed-streams"], "{o}");
        assert!(
            a["compressed-streams"].as_u64().unwrap() >= 12 * per / 4,
            "{o}"
        );
        assert_qemu_check_clean(&probed);
        assert_qemu_compare_same(&input, "raw", &probed);
    }
}
