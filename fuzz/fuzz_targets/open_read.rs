//! Oracle: opening any bytes as a qcow2 image and reading the guest never panics,
//! never loops forever, and stays within libFuzzer's memory limit
//! (run with `-malloc_limit_mb`, see docs/testing.md).
#![no_main]

use libfuzzer_sys::fuzz_target;
use qdedup::io::MemFile;
use qdedup::source::qcow2::Qcow2Source;
use qdedup::source::{BlockStatus, Source};

fuzz_target!(|data: &[u8]| {
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
        let Ok((st, len)) = src.block_status(off, size - off) else { return };
        assert!(len >= 1 && len <= size - off, "block_status run out of range");
        if st == BlockStatus::Data && budget > 0 {
            let n = len.min(buf.len() as u64) as usize;
            if src.read_at(&mut buf[..n], off).is_err() {
                return;
            }
            budget -= n.min(budget);
        }
        off += len;
    }
});
