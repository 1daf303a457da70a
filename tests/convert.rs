//! `qdedup convert` from the command line, with qemu-img as the oracle.

mod common;

use std::ffi::{OsStr, OsString};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use common::*;

#[test]
fn every_cluster_size_and_refcount_width_gives_a_clean_identical_image() {
    let dir = Scratch::new();
    for (cs, n) in [(512usize, 700usize), (4096, 300), (65536, 60), (2 << 20, 9)] {
        let input = dir.join(format!("in-{cs}.raw"));
        // A tail that is not a multiple of the cluster size (nor of 512).
        let distinct = make_input(&input, cs, n, 777, cs as u64);
        for bits in [2u32, 16, 64] {
            let out = dir.join(format!("out-{cs}-{bits}.qcow2"));
            let r = convert_json(
                &["-o", &format!("cluster_size={cs},refcount_bits={bits}")],
                &input,
                &out,
            );
            assert_qemu_check_clean(&out);
            assert_qemu_compare_same(&input, "raw", &out);
            let layout = read_layout(&out);
            assert_eq!(layout.header.cluster_size(), cs as u64);
            assert_eq!(layout.header.refcount_bits(), bits);
            // One host cluster per distinct content, plus saturation copies.
            let sat = r["saturation-copies"].as_u64().unwrap() as usize;
            assert_eq!(
                layout.data_refs.len(),
                distinct + sat,
                "cs={cs} bits={bits}"
            );
            assert_eq!(
                r["host-data-clusters"].as_u64().unwrap() as usize,
                distinct + sat
            );
            // Refcount = number of references; COPIED iff refcount 1.
            for (off, refs) in &layout.data_refs {
                assert_eq!(
                    layout.refcounts[&(off >> layout.header.cluster_bits)],
                    *refs
                );
            }
            for (off, copied) in &layout.copied {
                assert_eq!(*copied, layout.data_refs[off] == 1, "COPIED iff refcount 1");
            }
            if bits == 16 {
                assert_eq!(sat, 0);
            }
        }
    }
}

#[test]
fn refcount_bits_2_saturates_at_3_references_per_copy() {
    let dir = Scratch::new();
    let input = dir.join("in.raw");
    let cs = 4096;
    std::fs::write(&input, random_bytes(7, cs).repeat(10)).unwrap();
    let out = dir.join("out.qcow2");
    let r = convert_json(&["-o", "cluster_size=4k,refcount_bits=2"], &input, &out);
    assert_qemu_check_clean(&out);
    assert_qemu_compare_same(&input, "raw", &out);
    let layout = read_layout(&out);
    assert_eq!(layout.data_refs.len(), 4, "ceil(10/3) host copies");
    assert!(layout.refcounts.values().all(|r| *r <= 3));
    assert_eq!(layout.data_refs.values().sum::<u64>(), 10);
    assert_eq!(r["saturation-copies"], 3);
}

#[test]
fn refcount_bits_1_stores_copies_and_says_so() {
    let dir = Scratch::new();
    let input = dir.join("in.raw");
    std::fs::write(&input, vec![0x5au8; 65536 * 4]).unwrap();
    let out = dir.join("out.qcow2");
    let r = convert_json(&["-o", "refcount_bits=1"], &input, &out);
    assert_qemu_check_clean(&out);
    assert_qemu_compare_same(&input, "raw", &out);
    assert_eq!(read_layout(&out).data_refs.len(), 4);
    assert!(r["notes"][0].as_str().unwrap().contains("no sharing"));
}

#[test]
fn no_dedup_stores_every_non_zero_cluster() {
    let dir = Scratch::new();
    let input = raw_input(dir.path(), 65536, 40, 0, 3);
    let data = std::fs::read(&input).unwrap();
    let nonzero = data
        .chunks(65536)
        .filter(|c| c.iter().any(|b| *b != 0))
        .count();
    let out = dir.join("out.qcow2");
    let r = convert_json(&["--no-dedup"], &input, &out);
    assert_qemu_check_clean(&out);
    assert_qemu_compare_same(&input, "raw", &out);
    assert_eq!(read_layout(&out).data_refs.len(), nonzero);
    assert_eq!(r["duplicate-clusters"], 0);
}

#[test]
fn output_is_identical_for_any_number_of_workers() {
    let dir = Scratch::new();
    let input = dir.join("in.raw");
    // Several batches, so that workers finish out of order.
    make_input(&input, 4096, 6000, 100, 11);
    let reference = assert_any_worker_count_writes_the_same(
        &input,
        dir.path(),
        &["-o", "cluster_size=4k"],
        "4M",
    );
    assert_qemu_check_clean(&reference);
    assert_qemu_compare_same(&input, "raw", &reference);
}

#[test]
fn empty_and_tiny_inputs_convert() {
    let dir = Scratch::new();
    for (name, bytes) in [
        ("empty", vec![]),
        ("one", vec![1u8]),
        ("zeros", vec![0u8; 70000]),
    ] {
        let input = dir.join(format!("{name}.raw"));
        std::fs::write(&input, &bytes).unwrap();
        let out = dir.join(format!("{name}.qcow2"));
        let r = convert_json(&[], &input, &out);
        assert_eq!(
            r["virtual-size"].as_u64().unwrap(),
            (bytes.len() as u64).div_ceil(512) * 512
        );
        assert_qemu_check_clean(&out);
        assert_qemu_compare_same(&input, "raw", &out);
    }
}

#[test]
fn sparse_terabyte_converts_about_as_fast_as_its_data() {
    let dir = Scratch::new();
    let dense = dir.join("dense.raw");
    let sparse = dir.join("sparse.raw");
    let mut rng = qdedup::sample::Rng::new(5);
    let mut chunk = vec![0u8; 1 << 20];
    let f = std::fs::File::create(&sparse).unwrap();
    f.set_len(1 << 40).unwrap();
    let mut all = Vec::new();
    for i in 0..64u64 {
        rng.fill(&mut chunk);
        std::os::unix::fs::FileExt::write_all_at(&f, &chunk, i * (16 << 30) + (i << 20)).unwrap();
        all.extend_from_slice(&chunk);
    }
    drop(f);
    std::fs::write(&dense, &all).unwrap();
    let t = Instant::now();
    convert_json(&["--no-sync"], &dense, &dir.join("dense.qcow2"));
    let dense_time = t.elapsed();
    let t = Instant::now();
    let out = dir.join("sparse.qcow2");
    let r = convert_json(&["--no-sync"], &sparse, &out);
    let sparse_time = t.elapsed();
    assert_eq!(
        r["bytes-read"].as_u64().unwrap(),
        64 << 20,
        "holes are not read"
    );
    assert!(
        sparse_time < dense_time * 10 + std::time::Duration::from_secs(2),
        "sparse {sparse_time:?} vs dense {dense_time:?}"
    );
    assert_qemu_check_clean(&out);
}

/// `qdedup ARGS` fails with a one-line error, and `dir` still holds only `before`.
fn assert_fails_cleanly(args: &[&OsStr], dir: &Path, before: &[String]) -> String {
    let err = qdedup_fails_in_one_line(args);
    assert_eq!(dir_entries(dir), before, "no file left behind");
    err
}

#[test]
fn bad_paths_give_one_line_errors_and_leave_nothing_behind() {
    let dir = Scratch::new();
    let d = dir.path();
    let input = d.join("in.raw");
    std::fs::write(&input, vec![1u8; 4096]).unwrap();
    let existing = d.join("existing.qcow2");
    std::fs::write(&existing, b"keep me").unwrap();
    let before = dir_entries(d);
    let c = |s: &str| OsString::from(s);

    let e = assert_fails_cleanly(
        &[
            c("convert").as_os_str(),
            d.join("missing.raw").as_os_str(),
            d.join("o.qcow2").as_os_str(),
        ],
        d,
        &before,
    );
    assert!(e.contains("missing.raw"), "{e}");
    let e = assert_fails_cleanly(
        &[
            c("convert").as_os_str(),
            d.as_os_str(),
            d.join("o.qcow2").as_os_str(),
        ],
        d,
        &before,
    );
    assert!(e.contains("directory"), "{e}");
    let e = assert_fails_cleanly(
        &[
            c("convert").as_os_str(),
            input.as_os_str(),
            existing.as_os_str(),
        ],
        d,
        &before,
    );
    assert!(e.contains("exists"), "{e}");
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep me");
    let e = assert_fails_cleanly(
        &[
            c("convert").as_os_str(),
            input.as_os_str(),
            input.as_os_str(),
            c("--force").as_os_str(),
        ],
        d,
        &before,
    );
    assert!(e.contains("is the input"), "{e}");
    // The same file under another name is still the input.
    let other = d.join(".").join("in.raw");
    assert_fails_cleanly(
        &[
            c("convert").as_os_str(),
            input.as_os_str(),
            other.as_os_str(),
            c("--force").as_os_str(),
        ],
        d,
        &before,
    );
    assert_eq!(
        std::fs::read(&input).unwrap(),
        vec![1u8; 4096],
        "input untouched"
    );
    let e = assert_fails_cleanly(
        &[
            c("convert").as_os_str(),
            input.as_os_str(),
            d.join("no/such/dir/o.qcow2").as_os_str(),
        ],
        d,
        &before,
    );
    assert!(e.contains("no/such/dir"), "{e}");
    let e = assert_fails_cleanly(
        &[
            c("convert").as_os_str(),
            c("-o").as_os_str(),
            c("cluster_size=1000").as_os_str(),
            input.as_os_str(),
            d.join("o.qcow2").as_os_str(),
        ],
        d,
        &before,
    );
    assert!(e.contains("cluster_size"), "{e}");
}

#[test]
fn force_replaces_an_existing_output() {
    let dir = Scratch::new();
    let input = raw_input(dir.path(), 65536, 20, 0, 9);
    let out = dir.join("out.qcow2");
    std::fs::write(&out, b"old").unwrap();
    convert_json(&["--force"], &input, &out);
    assert_qemu_check_clean(&out);
    assert_qemu_compare_same(&input, "raw", &out);
    assert_eq!(dir.entries(), vec!["in.raw", "out.qcow2"]);
}

#[test]
fn human_report_gives_the_same_figures_as_the_json_report() {
    let dir = Scratch::new();
    let input = dir.join("in.raw");
    // 20 clusters drawn from a few contents, some of them zero.
    make_input(&input, 65536, 20, 0, 2);
    let out = dir.join("out.qcow2");
    let o = qdedup_ok([OsStr::new("convert"), input.as_os_str(), out.as_os_str()]);
    let human = String::from_utf8_lossy(&o.stdout).to_string();
    let j = convert_json(&["--force"], &input, &out);
    let n = |k: &str| j[k].as_u64().unwrap_or_else(|| panic!("{k} in {j}"));
    let mib = |k: &str| format!("{:.1} MiB", n(k) as f64 / f64::from(1 << 20));
    assert!(n("stored-copies") > 0 && n("duplicate-clusters") > 0 && n("unallocated-clusters") > 0);
    let want = [
        format!(
            "virtual size:      {} ({} bytes), cluster size {}, refcount bits {}",
            mib("virtual-size"),
            n("virtual-size"),
            n("cluster-size"),
            n("refcount-bits")
        ),
        format!(
            "clusters:          {} guest, {} unallocated (zeros), {} stored copies, {} duplicate",
            n("guest-clusters"),
            n("unallocated-clusters"),
            n("stored-copies"),
            n("duplicate-clusters")
        ),
        format!(
            "read:              {}   written: {}",
            mib("bytes-read"),
            mib("bytes-written")
        ),
        format!(
            "duplicate data:    {} stored once ({:.1}% of the non-zero clusters), max refcount {}",
            mib("duplicate-bytes"),
            j["duplicate-percent"].as_f64().unwrap(),
            n("max-refcount")
        ),
    ];
    for w in &want {
        assert!(
            human.lines().any(|l| l == w),
            "missing line {w:?} in:\n{human}"
        );
    }
    assert!(
        human
            .lines()
            .any(|l| l.starts_with("time:") && l.ends_with("MB/s read")),
        "{human}"
    );
    // The figures are the image's: clusters add up, and the file holds the
    // unique clusters plus metadata.
    assert_eq!(
        n("unallocated-clusters") + n("stored-copies") + n("duplicate-clusters"),
        n("guest-clusters")
    );
    assert_eq!(std::fs::metadata(&out).unwrap().len(), n("bytes-written"));
}

/// The writer reserves the output ahead of its writes (`fallocate`, 64 MiB at a
/// time); what it did not use must be given back: the finished file occupies no
/// more blocks than its length, with and without compression.
#[test]
fn reserved_space_past_the_end_is_given_back() {
    use std::os::unix::fs::MetadataExt;
    let dir = Scratch::new();
    let input = raw_input(dir.path(), 65536, 160, 1000, 3);
    for (name, args) in [("plain", &[][..]), ("zlib", &["-c"][..])] {
        let out = dir.join(format!("{name}.qcow2"));
        convert_json(args, &input, &out);
        let m = std::fs::metadata(&out).unwrap();
        assert!(
            m.blocks() * 512 <= m.len().next_multiple_of(65536),
            "{name}: {} bytes allocated for a {}-byte file",
            m.blocks() * 512,
            m.len()
        );
        assert_qemu_check_clean(&out);
        assert_qemu_compare_same(&input, "raw", &out);
    }
}

#[test]
fn qemu_img_option_spellings_are_accepted_or_refused_with_the_reason() {
    let dir = Scratch::new();
    let input = raw_input(dir.path(), 65536, 20, 0, 9);
    let o = qdedup_ok(["convert", "-o", "help", "x", "y"]);
    let help = String::from_utf8_lossy(&o.stdout);
    for k in [
        "cluster_size",
        "refcount_bits",
        "compression_type",
        "compat",
    ] {
        assert!(help.contains(k), "{help}");
    }
    // What qemu-img users pass for a v3 image works and changes nothing.
    let out = dir.join("out.qcow2");
    let plain = dir.join("plain.qcow2");
    qdedup_ok([
        "convert".as_ref(),
        "-q".as_ref(),
        "-o".as_ref(),
        "compat=1.1,lazy_refcounts=off,preallocation=off".as_ref(),
        input.as_os_str(),
        out.as_os_str(),
    ]);
    qdedup_ok([
        "convert".as_ref(),
        "-q".as_ref(),
        input.as_os_str(),
        plain.as_os_str(),
    ]);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&plain).unwrap());
    assert_qemu_check_clean(&out);
    // What qdedup cannot write is refused by name, and nothing is created.
    for (opt, says) in [
        ("compat=0.5", "compat"),
        ("lazy_refcounts=on", "lazy_refcounts"),
        ("extended_l2=on", "extended_l2"),
        ("preallocation=full", "preallocation"),
        ("cluster_size=1000", "power of two"),
    ] {
        let bad = dir.join("bad.qcow2");
        let o = qdedup([
            "convert".as_ref(),
            "-o".as_ref(),
            opt.as_ref(),
            input.as_os_str(),
            bad.as_os_str(),
        ]);
        assert_eq!(o.status.code(), Some(2), "{opt}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(says), "{opt}: {err}");
        assert!(!bad.exists());
    }
}

#[test]
fn an_output_behind_a_symlink_is_replaced_through_it_and_devices_are_refused() {
    let dir = Scratch::new();
    let d = dir.path();
    let input = raw_input(d, 65536, 12, 0, 5);
    std::fs::write(d.join("target.qcow2"), b"old").unwrap();
    std::os::unix::fs::symlink("target.qcow2", d.join("link.qcow2")).unwrap();
    let conv = |out: &Path, force: bool| {
        let mut args: Vec<&OsStr> = vec!["convert".as_ref(), "-q".as_ref()];
        if force {
            args.push("--force".as_ref());
        }
        args.push(input.as_os_str());
        args.push(out.as_os_str());
        qdedup(args)
    };
    let o = conv(&d.join("link.qcow2"), false);
    assert!(!o.status.success(), "the target exists");
    let o = conv(&d.join("link.qcow2"), true);
    assert!(o.status.success(), "{}", said(&o));
    let link = std::fs::symlink_metadata(d.join("link.qcow2")).unwrap();
    assert!(link.file_type().is_symlink(), "the link stays a link");
    assert_qemu_compare_same(&input, "raw", &d.join("target.qcow2"));
    // A dangling link, a FIFO and a device are refused by name; nothing is created.
    std::os::unix::fs::symlink("missing.qcow2", d.join("dangling.qcow2")).unwrap();
    let fifo = d.join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    for (out, says) in [
        (d.join("dangling.qcow2"), "missing file"),
        (fifo.clone(), "FIFO"),
        (PathBuf::from("/dev/null"), "character device"),
    ] {
        let o = conv(&out, true);
        assert_eq!(o.status.code(), Some(1));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(says), "{err}");
    }
    assert!(!d.join("missing.qcow2").exists());
    assert!(std::fs::metadata("/dev/null")
        .unwrap()
        .file_type()
        .is_char_device());
    let mut names = dir_entries(d);
    names.sort();
    assert_eq!(
        names,
        [
            "dangling.qcow2",
            "fifo",
            "in.raw",
            "link.qcow2",
            "target.qcow2"
        ]
    );
}

#[test]
fn a_pipe_as_input_is_refused_with_the_reason() {
    let dir = Scratch::new();
    let out = dir.join("out.qcow2");
    let mut child = Command::new(qdedup_bin())
        .args(["convert".as_ref(), "/dev/stdin".as_ref(), out.as_os_str()])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Write some bytes and close the pipe; qdedup refuses before reading them.
    let mut stdin = child.stdin.take().unwrap();
    let _ = std::io::Write::write_all(&mut stdin, &[1u8; 4096]);
    drop(stdin);
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("is a pipe"), "{err}");
    assert!(!out.exists());
}

/// `QDEDUP_THREAD_CPU=1` prints the CPU time of each thread role on stderr (a
/// profile without perf); the pipelined converter's data writes are the I/O
/// thread's, the sequential converter has none.
#[test]
fn thread_cpu_times_are_printed_when_asked() {
    let dir = Scratch::new();
    let input = dir.join("in.raw");
    make_input(&input, 65536, 200, 0, 3);
    let mut cases = 0;
    for workers in ["0", "2"] {
        let out = dir.join(format!("out{workers}.qcow2"));
        let run = std::process::Command::new(qdedup_bin())
            .args(["convert", "-q", "--no-sync", "-m", workers])
            .arg(&input)
            .arg(&out)
            .env("QDEDUP_THREAD_CPU", "1")
            .output()
            .unwrap();
        assert!(run.status.success(), "{run:?}");
        let err = String::from_utf8_lossy(&run.stderr);
        let secs = |role: &str| -> f64 {
            let line = err
                .lines()
                .find(|l| l.starts_with(&format!("thread-cpu: {role} ")))
                .unwrap_or_else(|| panic!("no {role} line in {err}"));
            line.split_whitespace().nth(2).unwrap().parse().unwrap()
        };
        assert!(secs("writer") > 0.0, "{err}");
        assert!(secs("total") > 0.0, "{err}");
        if workers == "0" {
            assert!(secs("io") <= 0.0, "{err}");
            assert!(secs("workers") <= 0.0, "{err}");
        } else {
            assert!(secs("io") > 0.0, "{err}");
            assert!(secs("workers") > 0.0, "{err}");
        }
        assert!(err.contains("writer share"), "{err}");
        // Without the variable, nothing.
        std::fs::remove_file(&out).unwrap();
        let quiet = std::process::Command::new(qdedup_bin())
            .args(["convert", "-q", "--no-sync", "-m", workers])
            .arg(&input)
            .arg(&out)
            .env_remove("QDEDUP_THREAD_CPU")
            .output()
            .unwrap();
        assert!(
            quiet.status.success() && quiet.stderr.is_empty(),
            "{quiet:?}"
        );
        cases += 1;
    }
    assert_eq!(cases, 2);
}

/// Whether the file system holding `dir` takes O_DIRECT at all (tmpfs before
/// 6.6 and some network file systems do not): where it does not, qdedup falls
/// back to the page cache and says so with direct-io-bytes 0.
fn fs_takes_o_direct(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let probe = dir.join("probe");
    std::fs::write(&probe, b"").unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(i32::try_from(rustix::fs::OFlags::DIRECT.bits()).unwrap())
        .open(&probe)
        .is_ok()
}

/// The first output of a series is checked with qemu-img (clean, same content
/// as the raw `input`) and kept in `reference`; every later one must have its
/// bytes.
fn same_bytes_as_the_first(reference: &mut Option<Vec<u8>>, input: &Path, out: &Path, what: &str) {
    let bytes = std::fs::read(out).unwrap();
    if let Some(r) = reference {
        assert!(*r == bytes, "{what}: other bytes");
    } else {
        assert_qemu_check_clean(out);
        assert_qemu_compare_same(input, "raw", out);
        *reference = Some(bytes);
    }
}

/// A synced conversion through the page cache (the default, `-t writeback`,
/// `-m 0`) starts the writeback of its output as it goes (write-behind), in
/// 8 MiB steps up to two steps behind the end of the data; an unsynced one, one
/// with `--verify` and one whose data goes with direct I/O do not. The bytes are
/// the same.
#[test]
fn synced_conversions_through_the_page_cache_write_behind() {
    let dir = Scratch::new();
    let input = dir.join("in.raw");
    // 48 MiB of unique 64 KiB clusters: 48 MiB of data in the output.
    std::fs::write(&input, random_bytes(9, 48 << 20)).unwrap();
    let out = dir.join("out.qcow2");
    let fs_direct = fs_takes_o_direct(dir.path());
    let mut reference: Option<Vec<u8>> = None;
    let mut cases = 0;
    for (extra, behind) in [
        (&[][..], true),
        (&["-t", "writeback"][..], true),
        (&["-m", "0"][..], true),
        (&["--no-direct"][..], true),
        (&["--no-sync"][..], false),
        (&["-t", "unsafe"][..], false),
        (&["--verify"][..], false),
        // Where the file system refuses O_DIRECT the data goes through the
        // page cache after all, and is written behind.
        (&["--direct"][..], !fs_direct),
        (&["-t", "none"][..], !fs_direct),
    ] {
        let report = convert_json(extra, &input, &out);
        let behind_bytes = report["write-behind-bytes"].as_u64().unwrap();
        if behind {
            // Every 8 MiB step of the 48 MiB but the last two or three.
            assert!(
                (24 << 20..=48 << 20).contains(&behind_bytes) && behind_bytes % (8 << 20) == 0,
                "{extra:?}: {behind_bytes}"
            );
        } else {
            assert_eq!(behind_bytes, 0, "{extra:?}");
        }
        same_bytes_as_the_first(&mut reference, &input, &out, &format!("{extra:?}"));
        std::fs::remove_file(&out).unwrap();
        cases += 1;
    }
    assert_eq!(cases, 9);
}

/// Direct I/O for the data (`--direct`, `-t none`, where the output's file
/// system allows it) writes the same bytes as the page cache, whatever the cluster size (512 B
/// clusters give unaligned runs, which stay buffered) and with compressed
/// streams (unaligned).
#[test]
fn direct_io_writes_the_same_bytes_as_buffered_writes() {
    let dir = Scratch::new();
    let input = dir.join("in.raw");
    let distinct = make_input(&input, 4096, 3000, 100, 5) as u64;
    let fs_direct = fs_takes_o_direct(dir.path());
    let mut cases = 0;
    for args in [
        &["-o", "cluster_size=64k"][..],
        &["-o", "cluster_size=4k"],
        &["-o", "cluster_size=512"],
        &["-c", "-o", "cluster_size=4k"],
    ] {
        let direct = dir.join("direct.qcow2");
        // Buffered five ways: the default, --no-direct, and the qemu-img cache
        // modes that go through the page cache; direct three ways.
        let mut reference: Option<Vec<u8>> = None;
        for (extra, is_direct) in [
            (&[][..], false),
            (&["--direct"][..], true),
            (&["-t", "none"][..], true),
            (&["--no-sync", "--direct"][..], true),
            (&["--no-direct"][..], false),
            (&["--no-sync"][..], false),
            (&["-t", "writeback"][..], false),
            (&["-t", "unsafe"][..], false),
        ] {
            let all: Vec<&str> = ["-m", "2"]
                .iter()
                .chain(args)
                .chain(extra)
                .copied()
                .collect();
            let report = convert_json(&all, &input, &direct);
            let direct_bytes = report["direct-io-bytes"].as_u64().unwrap();
            if is_direct && fs_direct {
                // Uncompressed 4 KiB and 64 KiB clusters: each distinct
                // block's data goes in whole aligned blocks (at least half of
                // it: the gathered runs' unaligned edges go through the page
                // cache); compressed and 512-byte clusters at least some.
                let min = if args.contains(&"-c") || args.contains(&"cluster_size=512") {
                    1
                } else {
                    distinct * 4096 / 2
                };
                assert!(
                    direct_bytes >= min,
                    "{args:?} {extra:?}: {direct_bytes} < {min}"
                );
            } else {
                assert_eq!(direct_bytes, 0, "{args:?} {extra:?}");
            }
            let what = format!("{args:?} {extra:?}");
            same_bytes_as_the_first(&mut reference, &input, &direct, &what);
            std::fs::remove_file(&direct).unwrap();
            cases += 1;
        }
    }
    assert_eq!(cases, 32);
    // Direct and not direct at once is refused.
    for args in [
        &["-t", "none", "--no-direct"][..],
        &["-t", "writeback", "--direct"],
        &["--direct", "--no-direct"],
    ] {
        let run = std::process::Command::new(qdedup_bin())
            .arg("convert")
            .args(args)
            .arg(&input)
            .arg(direct_out(&dir))
            .output()
            .unwrap();
        assert!(!run.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(err.contains("direct"), "{args:?}: {err}");
        assert!(!direct_out(&dir).exists());
    }
}

fn direct_out(dir: &Scratch) -> std::path::PathBuf {
    dir.join("refused.qcow2")
}
