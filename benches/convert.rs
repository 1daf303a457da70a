//! Whole conversions (reader → workers → writer) of generated raw images into an
//! in-memory qcow2, at 64 KiB and 4 KiB clusters.
//!
//! Inputs are 64 MiB (32 MiB for the text input, whose generator is slower) so that
//! `cargo bench --bench convert` finishes in a few minutes. Throughput is guest
//! bytes per second. The side-by-side comparison with `qemu-img convert` on 2 GiB
//! inputs is `scripts/compare-qemu.sh`; results are in docs/benchmarks.md.

use std::path::Path;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qdedup::convert::{convert_to, ConvertOptions};
use qdedup::format::header::CompressionType;
use qdedup::io::MemFile;
use qdedup::sample::{generate, Mix};
use qdedup::source::raw::RawSource;

const SIZE: u64 = 64 << 20;

/// The inputs: name, mix, size.
fn inputs() -> Vec<(&'static str, Mix, u64)> {
    let base = Mix {
        zero: 0,
        repeat: 0,
        text: 0,
        templates: 64,
        sparse: false,
    };
    vec![
        (
            "zero-heavy",
            Mix {
                zero: 90,
                repeat: 5,
                ..base
            },
            SIZE,
        ),
        (
            "repeat-heavy",
            Mix {
                zero: 5,
                repeat: 85,
                ..base
            },
            SIZE,
        ),
        ("compressible", Mix { text: 100, ..base }, SIZE / 2),
        ("random", Mix::RANDOM, SIZE),
        ("mixed", Mix::MIXED, SIZE),
    ]
}

fn convert_once(path: &Path, opts: &ConvertOptions, out_capacity: usize) -> u64 {
    let src = RawSource::open(path).expect("open the input");
    // Preallocated so that growing the in-memory file does not dominate.
    let out = MemFile::new(Vec::with_capacity(out_capacity));
    let stats = convert_to(&src, &out, opts).expect("convert");
    stats.writer.file_size
}

fn bench_convert(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut group = c.benchmark_group("convert");
    group.sample_size(10);
    for (name, mix, size) in inputs() {
        let path = dir.path().join(format!("{name}.raw"));
        generate(&path, size, 42, mix).expect("generate the input");
        group.throughput(Throughput::Bytes(size));
        for cluster_bits in [16u32, 12] {
            let opts = ConvertOptions {
                cluster_bits,
                sync: false,
                ..ConvertOptions::default()
            };
            let id = BenchmarkId::new(name, format!("{}k", (1u32 << cluster_bits) >> 10));
            group.bench_with_input(id, &path, |b, p| {
                b.iter(|| convert_once(p, &opts, size as usize + (8 << 20)));
            });
        }
    }
    group.finish();
}

fn bench_compressed(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut group = c.benchmark_group("convert-compressed");
    group.sample_size(10);
    let path = dir.path().join("mixed.raw");
    let size = SIZE / 2;
    generate(&path, size, 42, Mix::MIXED).expect("generate the input");
    group.throughput(Throughput::Bytes(size));
    for codec in [CompressionType::Zlib, CompressionType::Zstd] {
        let opts = ConvertOptions {
            compression: Some(codec),
            sync: false,
            ..ConvertOptions::default()
        };
        group.bench_with_input(BenchmarkId::new("mixed", codec.name()), &path, |b, p| {
            b.iter(|| convert_once(p, &opts, size as usize + (8 << 20)));
        });
    }
    group.finish();
}

mod group {
    // criterion_group! makes an undocumented `pub fn`.
    #![allow(missing_docs)]
    use super::{bench_compressed, bench_convert, criterion_group};
    criterion_group!(benches, bench_convert, bench_compressed);
}
criterion_main!(group::benches);
