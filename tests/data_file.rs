//! qcow2 images whose guest data lives in an external data file (`qemu-img create
//! -o data_file=..[,data_file_raw=on]`) as input: `convert`, `compare` and `map`
//! read them as qemu-img does; the data file name is resolved like a backing file
//! name (a relative one against the image's directory).

mod common;

use std::ffi::OsStr;
use std::path::Path;

use common::*;
use serde_json::Value;

/// Creates `name` (2 MiB, 64 KiB clusters) in `dir` with the data file `data`
/// named relatively, as a user in `dir` would, and writes data (two equal
/// clusters, so the output shares one), zeros over data, and a partial cluster
/// with qemu-io.
fn data_file_image(dir: &Path, name: &str, data: &str, raw: bool) {
    let opt = format!(
        "data_file={data},data_file_raw={}",
        if raw { "on" } else { "off" }
    );
    qemu_ok_in(
        dir,
        "qemu-img",
        ["create", "-q", "-f", "qcow2", "-o", &opt, name, "2M"],
    );
    qemu_ok_in(
        dir,
        "qemu-io",
        [
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 64k",
            "-c",
            "write -P 0x11 192k 64k",
            "-c",
            "write -P 0x22 512k 100k",
            "-c",
            "write -P 0x33 1M 128k",
            "-c",
            "write -z 1M 64k",
            name,
        ],
    );
}

/// `qemu-img ARGS` run in `dir` (where the relative data file names resolve),
/// its stdout parsed as JSON.
fn qemu_json_in(dir: &Path, args: &[&OsStr]) -> Value {
    let o = qemu_ok_in(dir, "qemu-img", args);
    serde_json::from_slice(&o.stdout).expect("qemu-img JSON")
}

#[test]
fn images_with_external_data_files_convert_to_identical_images() {
    let dir = Scratch::new();
    let d = dir.path();
    let mut cases = 0;
    for raw in [false, true] {
        let name = format!("img-{raw}.qcow2");
        let data = format!("data-{raw}.bin");
        data_file_image(d, &name, &data, raw);
        let img = d.join(&name);
        // qdedup is run from elsewhere with the image's full path: the relative
        // data file name still resolves against the image's directory.
        let out = d.join(format!("out-{raw}.qcow2"));
        let r = convert_json(&[], &img, &out);
        assert_eq!(r["duplicate-clusters"], 1, "{r}");
        assert_qemu_check_clean(&out);
        let same = qemu_ok_in(
            d,
            "qemu-img",
            ["compare", name.as_str(), out.to_str().unwrap()],
        );
        assert!(stdout(&same).contains("identical"), "{}", said(&same));
        qdedup_ok([OsStr::new("compare"), img.as_os_str(), out.as_os_str()]);
        // map gives qemu-img's answer, info describes the data file without a
        // problem, check passes.
        let q = qemu_json_in(
            d,
            &["map".as_ref(), "--output=json".as_ref(), name.as_ref()],
        );
        assert_eq!(report_json(&["map"], &img), q, "data_file_raw={raw}");
        let info = report_json(&["info"], &img);
        assert_eq!(info["format-specific"]["data"]["data-file"], data.as_str());
        assert_eq!(info["format-specific"]["data"]["data-file-raw"], raw);
        assert!(
            info.get("problems")
                .is_none_or(|p| p.as_array().unwrap().is_empty()),
            "{info}"
        );
        cases += 1;
    }
    assert_eq!(cases, 2);
}

#[test]
fn a_missing_data_file_fails_naming_it() {
    let dir = Scratch::new();
    let d = dir.path();
    data_file_image(d, "img.qcow2", "gone.bin", false);
    std::fs::remove_file(d.join("gone.bin")).unwrap();
    let out = d.join("out.qcow2");
    let e = qdedup_fails_in_one_line([
        OsStr::new("convert"),
        d.join("img.qcow2").as_os_str(),
        out.as_os_str(),
    ]);
    assert!(e.contains("gone.bin") && e.contains("data file"), "{e}");
    assert!(!out.exists());
}
