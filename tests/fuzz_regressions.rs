//! Replays committed fuzz inputs (seeds and minimized crashers) through the same
//! oracles the cargo-fuzz targets use, so plain `cargo test` guards against
//! regressions. Add a crasher by copying it into the matching folder.

use std::path::Path;

fn inputs(dir: &str) -> Vec<(String, Vec<u8>)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz-regressions")
        .join(dir);
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (p.display().to_string(), std::fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    assert!(!v.is_empty(), "no inputs in {}", dir.display());
    v
}

#[test]
fn image_inputs_pass_the_decode_open_read_and_check_oracles() {
    for (name, data) in inputs("images") {
        eprintln!("replaying {name}");
        qdedup::oracle::decode(&data);
        qdedup::oracle::open_read(&data);
        qdedup::oracle::check(&data);
        // Every single-byte truncation of the header area too.
        for cut in [8, 71, 72, 103, 104, 111, 112, 200] {
            if cut < data.len() {
                qdedup::oracle::open_read(&data[..cut]);
                qdedup::oracle::check(&data[..cut]);
            }
        }
    }
}

#[test]
fn convert_inputs_round_trip() {
    for (name, data) in inputs("convert") {
        eprintln!("replaying {name}");
        qdedup::oracle::convert_roundtrip(&data);
    }
}
