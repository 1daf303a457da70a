//! Oracle: converting a raw image generated from the fuzz input gives a qcow2 image
//! that reads back byte for byte (through qdedup's own reader), with the same
//! output whether sequential or pipelined.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qdedup::convert::{convert_to, ConvertOptions};
use qdedup::format::header::CompressionType;
use qdedup::io::MemFile;
use qdedup::source::qcow2::Qcow2Source;
use qdedup::source::raw::RawSource;
use qdedup::source::Source;

fuzz_target!(|data: &[u8]| {
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
            1..=4 => c.iter_mut().enumerate().for_each(|(i, x)| *x = (i as u8).wrapping_mul(b % 5)),
            _ => c.iter_mut().enumerate().for_each(|(i, x)| *x = b"fuzzing qcow2 "[i % 14] ^ b),
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
});
