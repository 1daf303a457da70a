//! Oracle: decoding any bytes as any on-disk structure never panics, and what
//! decodes re-encodes to the same fields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qdedup::format::{compressed, extensions, header, l1l2, refcount, snapshot};

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = header::Header::decode(data) {
        let _ = h.validate(data.len() as u64);
        let _ = h.check_features();
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
            if l1l2::L2Entry::reserved_bits(raw) == 0 && !matches!(e, l1l2::L2Entry::Compressed { .. }) {
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
});
