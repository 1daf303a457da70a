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
    const CUTS: [usize; 8] = [8, 71, 72, 103, 104, 111, 112, 200];
    let (mut replayed, mut cut) = (0, 0);
    for (name, data) in inputs("images") {
        eprintln!("replaying {name}");
        qdedup::oracle::decode(&data);
        qdedup::oracle::open_read(&data);
        qdedup::oracle::check(&data);
        replayed += 1;
        // Every single-byte truncation of the header area too.
        for at in CUTS.into_iter().filter(|at| *at < data.len()) {
            qdedup::oracle::open_read(&data[..at]);
            qdedup::oracle::check(&data[..at]);
            cut += 1;
        }
    }
    // The truncations really ran: each input holds at least a v3 header (all
    // cuts but the one at 200 bytes apply).
    assert!(
        cut >= replayed * (CUTS.len() - 1),
        "{cut} truncations of {replayed} inputs"
    );
}

#[test]
fn convert_inputs_round_trip() {
    for (name, data) in inputs("convert") {
        eprintln!("replaying {name}");
        qdedup::oracle::convert_roundtrip(&data);
    }
}
