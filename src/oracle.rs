//! Fuzzing oracles, shared by the cargo-fuzz targets under `fuzz/` and by
//! `tests/fuzz_regressions.rs`, which replays committed inputs with plain
//! `cargo test`. Each function panics if (and only if) its oracle is violated.
//!
//! Hidden from the documentation: not part of the library's API.
#![allow(clippy::missing_panics_doc)]

use crate::check::{check_image, repair_image, CheckOptions, RepairMode};
use crate::convert::{convert_to, ConvertOptions};
use crate::format::header::CompressionType;
use crate::format::{compressed, extensions, header, l1l2, refcount, snapshot};
use crate::io::MemFile;
use crate::source::qcow2::Qcow2Source;
use crate::source::raw::RawSource;
use crate::source::{BlockStatus, Source};

/// Decoding any bytes as any on-disk structure never panics; what decodes re-encodes.
pub fn decode(data: &[u8]) {
    if let Ok(h) = header::Header::decode(data) {
        let _ = h.validate(data.len() as u64);
        let _ = h.validate_open(header::OpenMode::Check);
        if h.version == 3 && h.header_length >= 112 {
            let mut buf = [0u8; 112];
            h.encode(&mut buf);
            assert_eq!(header::Header::decode(&buf).unwrap(), h);
        }
    }
    let start = data.first().copied().unwrap_or(0) as usize;
    let _ = extensions::decode(data, start, data.len());
    let _ = extensions::decode_feature_names(data);
    let _ = snapshot::decode_table(data, 0, u32::from(data.get(1).copied().unwrap_or(0)), 3);
    for w in data.chunks_exact(8) {
        let raw = u64::from_be_bytes(w.try_into().unwrap());
        for cb in 9..=21 {
            let e = l1l2::L2Entry::decode(raw, cb, false);
            if l1l2::L2Entry::reserved_bits(raw) == 0
                && !matches!(e, l1l2::L2Entry::Compressed { .. })
            {
                assert_eq!(l1l2::L2Entry::decode(e.encode(cb), cb, false), e);
            }
            let d = compressed::CompressedDescriptor::decode(raw, cb);
            let _ = d.clusters(cb);
        }
        let _ = l1l2::L1Entry::decode(raw);
    }
    if data.len() >= 512 {
        for order in 0..=6 {
            let n = refcount::entries_per_block(9, order);
            for i in 0..n.min(64) {
                let _ = refcount::get(&data[..512], order, i);
            }
        }
    }
}

/// Opening any bytes as a qcow2 image and reading the guest never panics or loops.
pub fn open_read(data: &[u8]) {
    let Ok(src) = Qcow2Source::from_reader(Box::new(MemFile::new(data.to_vec())), None) else {
        return;
    };
    let size = src.virtual_size();
    let mut off = 0u64;
    let mut budget = 1 << 22; // guest bytes to read at most
    let mut steps = 0;
    let mut buf = vec![0u8; 65536];
    while off < size && steps < 10_000 {
        steps += 1;
        let Ok((st, len)) = src.block_status(off, size - off) else {
            return;
        };
        assert!(
            len >= 1 && len <= size - off,
            "block_status run out of range"
        );
        if st == BlockStatus::Data && budget > 0 {
            let n = len.min(buf.len() as u64) as usize;
            if src.read_at(&mut buf[..n], off).is_err() {
                return;
            }
            budget -= n.min(budget);
        }
        off += len;
    }
}

/// Checking any bytes never panics; repair never modifies a clean image nor adds corruptions.
pub fn check(data: &[u8]) {
    let opts = CheckOptions::default();
    let Ok(before) = check_image(&MemFile::new(data.to_vec()), "fuzz", &opts) else {
        return;
    };
    let f = MemFile::new(data.to_vec());
    let repair = CheckOptions {
        repair: Some(RepairMode::All),
        ..CheckOptions::default()
    };
    if let Ok(after) = repair_image(&f, "fuzz", &repair) {
        if before.is_clean() && before.relaxed_copied == 0 {
            assert_eq!(f.contents(), data, "a clean image was modified");
        }
        assert!(after.corruptions <= before.corruptions);
    }
}

/// A raw image generated from the input converts and reads back byte for byte, the same sequentially and pipelined.
pub fn convert_roundtrip(data: &[u8]) {
    if data.len() < 4 {
        return;
    }
    let cluster_bits = 9 + u32::from(data[0] % 4) * 2; // 512 B .. 32 KiB
    let refcount_order = u32::from(data[1] % 7);
    let compression = match data[2] % 3 {
        0 => None,
        1 => Some(CompressionType::Zlib),
        _ => Some(CompressionType::Zstd),
    };
    // Guest: each input byte picks a cluster: zero, one of 4 patterns, or text.
    let cs = 1usize << cluster_bits;
    let mut guest = Vec::new();
    for &b in &data[3..data.len().min(3 + 64)] {
        let mut c = vec![0u8; cs];
        match b % 6 {
            0 => {}
            1..=4 => c
                .iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = (i as u8).wrapping_mul(b % 5)),
            _ => c
                .iter_mut()
                .enumerate()
                .for_each(|(i, x)| *x = b"fuzzing qcow2 "[i % 14] ^ b),
        }
        guest.extend_from_slice(&c);
    }
    guest.truncate(guest.len().saturating_sub(usize::from(data[3])));
    let dir = tempfile::tempdir().unwrap();
    let raw_path = dir.path().join("in.raw");
    std::fs::write(&raw_path, &guest).unwrap();
    let src = RawSource::open(&raw_path).unwrap();
    let mut outs = Vec::new();
    for workers in [0, 2] {
        let opts = ConvertOptions {
            cluster_bits,
            refcount_order,
            compression,
            workers,
            max_in_flight: 1 << 20,
            ..ConvertOptions::default()
        };
        let out = MemFile::new(Vec::new());
        convert_to(&src, &out, &opts).unwrap();
        outs.push(out.contents());
    }
    assert_eq!(outs[0], outs[1], "sequential and pipelined outputs differ");
    let img = Qcow2Source::from_reader(Box::new(MemFile::new(outs.remove(0))), None).unwrap();
    let mut back = vec![0u8; img.virtual_size() as usize];
    img.read_at(&mut back, 0).unwrap();
    guest.resize(back.len(), 0);
    assert_eq!(back, guest, "round trip");
}
