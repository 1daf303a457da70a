//! The public streaming writer (`qdedup::writer`): an image written cluster by
//! cluster through the library is sound for qemu-img, reads back as what was
//! written, and is byte-identical to what `qdedup convert` writes for the same
//! disk (one writer serves both).

mod common;

use common::{
    assert_qemu_check_clean, assert_qemu_compare_same, mixed_clusters, qdedup_ok, write_raw, Fill,
    Scratch,
};
use qdedup::format::header::CompressionType;
use qdedup::io::MemFile;
use qdedup::writer::WriterBuilder;
use qdedup::Error;

#[test]
fn streamed_image_is_sound_and_identical_to_convert_output() {
    let dir = Scratch::new();
    let mut cases = 0;
    for (cs, n, tail, compression) in [
        (65536usize, 40usize, 0usize, None),
        (4096, 700, 1000, None),
        (512, 300, 100, Some(CompressionType::Zlib)),
        (65536, 20, 4096, Some(CompressionType::Zstd)),
    ] {
        let data = mixed_clusters(cs, n, tail, cases, Fill::Random);
        let raw = write_raw(dir.path(), &format!("in{cases}.raw"), &data);
        let img = dir.join(format!("streamed{cases}.qcow2"));
        let file = std::fs::File::create(&img).unwrap();
        let mut w = WriterBuilder::new(data.len() as u64)
            .cluster_size(cs as u64)
            .refcount_bits(2)
            .compression(compression)
            .create(&file)
            .unwrap();
        let mut zeros = 0u64;
        for c in data.chunks(cs) {
            if c.iter().all(|b| *b == 0) {
                // Zero runs may be declared instead of written.
                zeros += 1;
                w.write_zero_clusters(1).unwrap();
            } else {
                w.write_cluster(c).unwrap();
            }
        }
        let stats = w.finish().unwrap();
        drop(file);
        assert!(zeros > 0 && stats.duplicate_clusters > 0, "case {cases}");
        assert_qemu_check_clean(&img);
        assert_qemu_compare_same(&raw, "raw", &img);

        // `convert` with the same settings writes the same bytes.
        let conv = dir.join(format!("converted{cases}.qcow2"));
        let mut args = vec![
            "convert".to_string(),
            "-o".into(),
            format!("cluster_size={cs},refcount_bits=2"),
        ];
        if let Some(c) = compression {
            args.push("-c".into());
            if c == CompressionType::Zstd {
                args.extend(["-o".into(), "compression_type=zstd".into()]);
            }
        }
        args.extend([raw.to_str().unwrap().into(), conv.to_str().unwrap().into()]);
        qdedup_ok(&args);
        assert_eq!(
            std::fs::read(&img).unwrap(),
            std::fs::read(&conv).unwrap(),
            "case {cases}: streamed and converted images differ"
        );
        cases += 1;
    }
    assert_eq!(cases, 4);
}

#[test]
fn the_writer_refuses_wrong_sizes_and_clusters_past_the_end() {
    let out = MemFile::new(Vec::new());
    assert!(matches!(
        WriterBuilder::new(1 << 20).cluster_size(3000).create(&out),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        WriterBuilder::new(1 << 20).refcount_bits(3).create(&out),
        Err(Error::InvalidArgument(_))
    ));
    // 2.5 clusters of 64 KiB.
    let mut w = WriterBuilder::new(5 << 15).create(&out).unwrap();
    assert!(matches!(
        w.write_cluster(&[1u8; 100]),
        Err(Error::InvalidArgument(_))
    ));
    w.write_cluster(&vec![1u8; 65536]).unwrap();
    w.write_zero_clusters(1).unwrap();
    // The last cluster may be given whole or cut at the disk's end.
    w.write_cluster(&vec![2u8; 32768]).unwrap();
    assert!(matches!(
        w.write_cluster(&vec![3u8; 65536]),
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        w.write_zero_clusters(1),
        Err(Error::InvalidArgument(_))
    ));
    let stats = w.finish().unwrap();
    assert_eq!(
        (stats.unique_clusters, stats.zero_clusters),
        (2, 1),
        "{stats:?}"
    );
}
