//! Oracle: converting a raw image generated from the fuzz input gives a qcow2 image
//! that reads back byte for byte (through qdedup's own reader), with the same
//! output whether sequential or pipelined.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qdedup::oracle::convert_roundtrip(data));
