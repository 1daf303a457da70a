//! Oracles: checking any bytes as a qcow2 image never panics; repairing never
//! panics, writes nothing to an image the check found clean, and never leaves
//! more corruptions than it found.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qdedup::oracle::check(data));
