//! The library's entry points (`qdedup::convert`, `check`, `info`, `map`,
//! `compare`, `estimate`) give what the command line gives for the same options:
//! the CLI is a thin layer over them.

mod common;

use common::{convert_json, make_input, qdedup_ok, raw_input, report_json, Scratch};
use qdedup::source::{Format, OpenOptions};
use qdedup::{
    CheckOptions, CompareOptions, ConvertOptions, EstimateOptions, InfoOptions, MapOptions,
};

#[test]
fn library_entry_points_agree_with_the_command_line() {
    let dir = Scratch::new();
    let raw = dir.join("in.raw");
    let distinct = make_input(&raw, 4096, 300, 1000, 11);

    // convert: same bytes and the same report figures as `qdedup convert -o cluster_size=4k`.
    let by_cli = dir.join("cli.qcow2");
    let cli = convert_json(&["-o", "cluster_size=4k"], &raw, &by_cli);
    let by_lib = dir.join("lib.qcow2");
    let opts = ConvertOptions {
        cluster_bits: 12,
        ..ConvertOptions::default()
    };
    let lib = qdedup::convert(&raw, &by_lib, &opts).unwrap();
    assert_eq!(
        std::fs::read(&by_cli).unwrap(),
        std::fs::read(&by_lib).unwrap()
    );
    assert_eq!(lib.input, raw.display().to_string());
    assert_eq!(lib.stored_copies as usize, distinct);
    for (field, value) in [
        ("stored-copies", lib.stored_copies),
        ("duplicate-clusters", lib.duplicate_clusters),
        ("unallocated-clusters", lib.unallocated_clusters),
        ("bytes-written", lib.bytes_written),
    ] {
        assert_eq!(cli[field], value, "{field}");
    }

    // check, info, estimate: the JSON the CLI prints is the library's report.
    let check = qdedup::check(&by_lib, &CheckOptions::default()).unwrap();
    assert!(check.is_clean());
    let mut check_cli = report_json(&["check"], &by_lib);
    check_cli["filename"] = serde_json::json!(check.filename);
    assert_eq!(check_cli, serde_json::to_value(&check).unwrap());

    let info = qdedup::info(&by_lib, &InfoOptions::default()).unwrap();
    let info_cli = report_json(&["info"], &by_lib);
    assert_eq!(info_cli, serde_json::to_value(&info).unwrap());
    // A forced format is honoured: the qcow2 file read as raw.
    let as_raw = InfoOptions {
        format: Some(Format::Raw),
        ..InfoOptions::default()
    };
    let info_raw = qdedup::info(&by_lib, &as_raw).unwrap();
    assert_eq!(
        (info_raw.format.as_str(), info_raw.virtual_size),
        ("raw", std::fs::metadata(&by_lib).unwrap().len())
    );

    let est = qdedup::estimate(
        &raw,
        &EstimateOptions {
            convert: opts.clone(),
            extra_cluster_bits: Vec::new(),
            sample: None,
            seed: 1,
        },
    )
    .unwrap();
    assert_eq!(est.estimated_size, lib.bytes_written);
    let est_cli = report_json(&["estimate", "-o", "cluster_size=4k"], &raw);
    assert_eq!(est_cli["estimated-size"], est.estimated_size);

    // map and compare.
    let map = qdedup::map(&by_lib, &MapOptions::default()).unwrap();
    let o = qdedup_ok([
        "map".as_ref(),
        "--output".as_ref(),
        "json".as_ref(),
        by_lib.as_os_str(),
    ]);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim_end(),
        qdedup::inspect::map::to_json(&map.entries)
    );
    let same = qdedup::compare(&raw, &by_lib, &CompareOptions::default()).unwrap();
    assert_eq!((same.mismatch_offset, same.size_mismatch), (None, false));
}

#[test]
fn convert_opens_its_input_as_the_options_say() {
    let dir = Scratch::new();
    let raw = raw_input(dir.path(), 65536, 8, 0, 3);
    let out = dir.join("out.qcow2");
    // An input converted onto itself is refused, whatever the path says.
    let opts = ConvertOptions {
        force: true,
        ..ConvertOptions::default()
    };
    let e = qdedup::convert(&raw, &dir.join(".").join("in.raw"), &opts).unwrap_err();
    assert!(
        matches!(&e, qdedup::Error::InvalidArgument(m) if m.contains("is the input file")),
        "{e}"
    );
    // A snapshot asked of a raw input: the open options reach the opener.
    let opts = ConvertOptions {
        input: OpenOptions {
            snapshot: Some("s1".into()),
            ..OpenOptions::default()
        },
        ..ConvertOptions::default()
    };
    let e = qdedup::convert(&raw, &out, &opts).unwrap_err();
    assert!(
        matches!(&e, qdedup::Error::InvalidArgument(m) if m.contains("raw image")),
        "{e}"
    );
    assert!(!out.exists());
}
