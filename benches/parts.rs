//! The pipeline's stages alone: hashing and zero detection (the workers' job),
//! the writer (dedup index, allocation, writes, metadata) fed precomputed hashes,
//! the dedup index (a plain map with a seeded key hasher, owned by the writer)
//! against std's SipHash map and a DashMap, and compression of one cluster (zlib
//! with and without the incompressibility probe, zstd) on random and text data.

use std::collections::HashMap;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use qdedup::dedup::{hash_cluster, is_zero, DedupIndex, Hash, Target};
use qdedup::io::MemFile;
use qdedup::sample::{generate, Mix};
use qdedup::writer::batch::{Batch, Kind, Stream};
use qdedup::writer::WriterBuilder;

const SIZE: usize = 64 << 20;
const BATCH: usize = 2 << 20;

fn mixed_bytes(size: usize) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("mixed.raw");
    generate(&path, size as u64, 7, Mix::MIXED).expect("generate");
    std::fs::read(&path).expect("read back")
}

fn bench_hash(c: &mut Criterion) {
    let mut rng = qdedup::sample::Rng::new(3);
    let mut data = vec![0u8; SIZE];
    rng.fill(&mut data);
    let mut group = c.benchmark_group("worker");
    group.throughput(Throughput::Bytes(SIZE as u64));
    for cs in [64usize << 10, 4 << 10] {
        group.bench_with_input(
            BenchmarkId::new("blake3", format!("{}k", cs >> 10)),
            &cs,
            |b, &cs| {
                b.iter(|| {
                    data.chunks_exact(cs)
                        .fold(0u8, |a, c| a ^ hash_cluster(c)[0])
                });
            },
        );
    }
    let zeros = vec![0u8; SIZE];
    group.bench_function("is_zero/zeros-64k", |b| {
        b.iter(|| zeros.chunks_exact(64 << 10).filter(|c| is_zero(c)).count());
    });
    group.finish();
}

/// Per-cluster inputs of the writer: (zero?, hash), computed once.
fn precompute(data: &[u8], cs: usize) -> Vec<Option<Hash>> {
    data.chunks_exact(cs)
        .map(|c| (!is_zero(c)).then(|| hash_cluster(c)))
        .collect()
}

fn bench_writer(c: &mut Criterion) {
    let data = mixed_bytes(SIZE);
    let mut group = c.benchmark_group("writer");
    group.sample_size(20);
    group.throughput(Throughput::Bytes(SIZE as u64));
    for cluster_bits in [16u32, 12] {
        let cs = 1usize << cluster_bits;
        let hashes = precompute(&data, cs);
        group.bench_function(format!("mixed/{}k", cs >> 10), |b| {
            b.iter(|| {
                let out = MemFile::new(Vec::with_capacity(SIZE));
                let mut w = WriterBuilder::new(SIZE as u64)
                    .cluster_size(cs as u64)
                    .create(&out)
                    .expect("writer");
                let per_batch = BATCH / cs;
                let mut b = Batch::default();
                for (k, batch) in data.chunks(BATCH).enumerate() {
                    b.first_cluster = (k * per_batch) as u64;
                    b.data.clear();
                    b.data.extend_from_slice(batch);
                    b.kinds.clear();
                    b.kinds.extend(
                        hashes[k * per_batch..k * per_batch + batch.len() / cs]
                            .iter()
                            .map(|h| match h {
                                None => Kind::Zero,
                                Some(hash) => Kind::Data {
                                    hash: *hash,
                                    stream: Stream::NotTried,
                                },
                            }),
                    );
                    w.accept_batch(&b).expect("accept");
                }
                w.finish().expect("finish").file_size
            });
        });
    }
    group.finish();
}

fn bench_index(c: &mut Criterion) {
    // 1 M keys (4 GiB of unique data at 4 KiB clusters), each looked up once
    // before being inserted, as the writer does for a unique cluster.
    const N: usize = 1 << 20;
    let keys: Vec<Hash> = (0..N as u64)
        .map(|i| *blake3::hash(&i.to_le_bytes()).as_bytes())
        .collect();
    let mut group = c.benchmark_group("dedup-index");
    group.sample_size(10);
    group.throughput(Throughput::Elements(N as u64));
    group.bench_function("DedupIndex", |b| {
        b.iter(|| {
            let mut m = DedupIndex::new();
            for (i, k) in keys.iter().enumerate() {
                if m.lookup(k).is_none() {
                    m.insert(*k, (i as u64) << 16);
                }
            }
            m.len()
        });
    });
    group.bench_function("HashMap-SipHash", |b| {
        b.iter(|| {
            let mut m: HashMap<Hash, Target> = HashMap::new();
            for (i, k) in keys.iter().enumerate() {
                if !m.contains_key(k) {
                    m.insert(*k, (i as u64) << 16);
                }
            }
            m.len()
        });
    });
    group.bench_function("DashMap", |b| {
        b.iter(|| {
            let m: dashmap::DashMap<Hash, Target> = dashmap::DashMap::new();
            for (i, k) in keys.iter().enumerate() {
                if !m.contains_key(k) {
                    m.insert(*k, (i as u64) << 16);
                }
            }
            m.len()
        });
    });
    group.finish();
}

fn bench_compress(c: &mut Criterion) {
    use qdedup::compress::{compress, looks_incompressible};
    use qdedup::format::header::CompressionType::{Zlib, Zstd};
    const CS: usize = 64 << 10;
    const N: usize = 64; // clusters per iteration: 4 MiB
    let mut rng = qdedup::sample::Rng::new(5);
    let mut random = vec![0u8; CS * N];
    rng.fill(&mut random);
    let mut text = vec![0u8; CS * N];
    for c in text.chunks_mut(CS) {
        qdedup::sample::fill_text(&mut rng, c);
    }
    let mut group = c.benchmark_group("compress-64k");
    group.sample_size(10);
    group.throughput(Throughput::Bytes((CS * N) as u64));
    for (name, data) in [("random", &random), ("text", &text)] {
        group.bench_function(format!("probe-alone/{name}"), |b| {
            b.iter(|| data.chunks(CS).filter(|c| looks_incompressible(c)).count());
        });
        for (label, codec, probe) in [
            ("zlib", Zlib, false),
            ("zlib+probe", Zlib, true),
            ("zstd", Zstd, false),
        ] {
            group.bench_function(format!("{label}/{name}"), |b| {
                b.iter(|| {
                    data.chunks(CS)
                        .filter_map(|c| compress(codec, None, c, CS, probe))
                        .count()
                });
            });
        }
    }
    group.finish();
}

mod group {
    // criterion_group! makes an undocumented `pub fn`.
    #![allow(missing_docs)]
    use super::{bench_compress, bench_hash, bench_index, bench_writer, criterion_group};
    criterion_group!(
        benches,
        bench_hash,
        bench_writer,
        bench_index,
        bench_compress
    );
}
criterion_main!(group::benches);
