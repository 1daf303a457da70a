//! Oracle: opening any bytes as a qcow2 image and reading the guest never panics,
//! never loops forever, and stays within libFuzzer's memory limit
//! (run with `-malloc_limit_mb`, see docs/testing.md).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| qdedup::oracle::open_read(data));
