//! Oracle: decoding any bytes as any on-disk structure never panics, and what
//! decodes re-encodes to the same fields.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qdedup::oracle::decode(data));
