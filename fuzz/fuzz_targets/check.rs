//! Oracles: checking any bytes as a qcow2 image never panics; repairing never
//! panics, writes nothing to an image the check found clean, and never leaves
//! more corruptions than it found.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qdedup::check::{check_image, repair_image, CheckOptions, RepairMode};
use qdedup::io::MemFile;

fuzz_target!(|data: &[u8]| {
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
});
