//! `qdedup::check` against images made by qemu-img/qemu-io, with `qemu-img check`
//! as the oracle. Corruption cases patch a named field at an offset read from the
//! image's own header and tables. A missing qemu-img fails these tests.

use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use qdedup::check::{
    check_file, check_image, CheckOptions, CheckReport, FindingClass, FindingKind, RepairMode,
};
use qdedup::format::compressed::CompressedDescriptor;
use qdedup::format::header::Header;
use qdedup::format::l1l2::{L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED};
use qdedup::format::refcount;
use qdedup::io::MemFile;
use serde_json::Value;

// ---------------------------------------------------------------- qemu tools

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?} (is QEMU installed?): {e}"));
    out
}

fn qemu_img(args: &[&str]) {
    let out = run(Command::new("qemu-img").args(args));
    assert!(
        out.status.success(),
        "qemu-img {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn create(path: &Path, opts: &str, size: &str) {
    let p = path.to_str().unwrap();
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, p, size]);
}

fn qemu_io(path: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg("qcow2");
    for cmd in cmds {
        c.arg("-c").arg(cmd);
    }
    c.arg(path);
    let out = run(&mut c);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("error") && !stdout.contains("failed"),
        "qemu-io {cmds:?} failed: {stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img check --output=json`: exit code and the JSON document.
fn qemu_check(path: &Path) -> (i32, Value) {
    let out = run(Command::new("qemu-img")
        .arg("check")
        .arg("--output=json")
        .arg(path));
    let code = out.status.code().expect("qemu-img exited normally");
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img check printed no JSON ({e}): {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (code, json)
}

fn ours(path: &Path) -> CheckReport {
    check_file(path, &CheckOptions::default()).expect("check runs")
}

fn ours_with(path: &Path, strict: bool, repair: Option<RepairMode>) -> CheckReport {
    let opts = CheckOptions {
        strict,
        repair,
        ..CheckOptions::default()
    };
    check_file(path, &opts).expect("check runs")
}

const QEMU_FIELDS: [&str; 8] = [
    "check-errors",
    "corruptions",
    "leaks",
    "image-end-offset",
    "total-clusters",
    "allocated-clusters",
    "fragmented-clusters",
    "compressed-clusters",
];

/// Our JSON has every figure qemu-img reports, with the same value, and omits the
/// zero-valued ones it omits.
fn assert_same_figures(path: &Path, r: &CheckReport) {
    let (code, q) = qemu_check(path);
    let o = serde_json::to_value(r).unwrap();
    for f in QEMU_FIELDS {
        assert_eq!(o.get(f), q.get(f), "{f} differs for {}: ours {o:#}\nqemu {q:#}", path.display());
    }
    assert_eq!(r.exit_code(), code, "exit code differs: {}", r.human());
}

fn fields(path: &Path) -> (i32, u64, u64) {
    let (code, q) = qemu_check(path);
    let n = |k: &str| q.get(k).and_then(Value::as_u64).unwrap_or(0);
    (code, n("corruptions"), n("leaks"))
}

// ---------------------------------------------------------------- raw patching

struct Img {
    path: PathBuf,
    h: Header,
}

impl Img {
    fn open(path: &Path) -> Img {
        let b = fs::read(path).unwrap();
        let h = Header::decode(&b).unwrap();
        Img {
            path: path.to_path_buf(),
            h,
        }
    }
    fn cs(&self) -> u64 {
        self.h.cluster_size()
    }
    fn u64_at(&self, off: u64) -> u64 {
        let f = fs::File::open(&self.path).unwrap();
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, off).unwrap();
        u64::from_be_bytes(b)
    }
    fn put_u64(&self, off: u64, v: u64) {
        let f = OpenOptions::new().write(true).open(&self.path).unwrap();
        f.write_all_at(&v.to_be_bytes(), off).unwrap();
    }
    fn len(&self) -> u64 {
        fs::metadata(&self.path).unwrap().len()
    }
    /// File offset of active L1 entry `i`.
    fn l1_entry(&self, i: u64) -> u64 {
        self.h.l1_table_offset + 8 * i
    }
    /// File offset of L2 entry `i` of the L2 table under L1 entry `l1i`.
    fn l2_entry(&self, l1i: u64, i: u64) -> u64 {
        let l2 = self.u64_at(self.l1_entry(l1i)) & L1E_OFFSET_MASK;
        assert_ne!(l2, 0, "no L2 table under L1 entry {l1i}");
        l2 + i * self.h.l2_entry_size()
    }
    /// (file offset of the slot's refcount block, the block bytes) for `cluster`.
    fn refblock_of(&self, cluster: u64) -> (u64, Vec<u8>) {
        let epb = refcount::entries_per_block(self.h.cluster_bits, self.h.refcount_order);
        let rt = self.u64_at(self.h.refcount_table_offset + 8 * (cluster / epb));
        let off = rt & !0x1ff;
        assert_ne!(off, 0, "no refcount block for cluster {cluster}");
        let mut b = vec![0u8; self.cs() as usize];
        fs::File::open(&self.path).unwrap().read_exact_at(&mut b, off).unwrap();
        (off, b)
    }
    fn refcount(&self, cluster: u64) -> u64 {
        let epb = refcount::entries_per_block(self.h.cluster_bits, self.h.refcount_order);
        let (_, b) = self.refblock_of(cluster);
        refcount::get(&b, self.h.refcount_order, cluster % epb)
    }
    fn set_refcount(&self, cluster: u64, v: u64) {
        let epb = refcount::entries_per_block(self.h.cluster_bits, self.h.refcount_order);
        let (off, mut b) = self.refblock_of(cluster);
        refcount::set(&mut b, self.h.refcount_order, cluster % epb, v);
        let f = OpenOptions::new().write(true).open(&self.path).unwrap();
        f.write_all_at(&b, off).unwrap();
    }
}

/// Bytes that deflate to roughly a third of their size.
fn semi_compressible(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b"abcdefgh"[(x % 8) as usize] ^ if x % 97 == 0 { (x >> 8) as u8 } else { 0 }
        })
        .collect()
}

fn has_finding(r: &CheckReport, kind: FindingKind, offset: u64) -> bool {
    r.findings.iter().any(|f| f.kind == kind && f.offset == offset)
}

/// A 4 MiB image with data, duplicates, zeroed and unmapped ranges.
fn populated(dir: &Path, name: &str, opts: &str) -> PathBuf {
    let p = dir.join(name);
    create(&p, opts, "4M");
    qemu_io(
        &p,
        &[
            "write -P 0x11 0 192k",
            "write -P 0x22 1M 64k",
            "write -P 0x11 2M 128k",
            "write -P 0x33 3M 3k",
            "write -z 64k 64k",
            "write -z -u 2M 64k",
        ],
    );
    p
}

// ---------------------------------------------------------------- clean images

#[test]
fn clean_images_of_every_geometry_are_clean_with_qemus_figures() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        "compat=0.10,cluster_size=65536",
        "compat=0.10,cluster_size=512",
        "compat=1.1,cluster_size=512,refcount_bits=1",
        "compat=1.1,cluster_size=4096,refcount_bits=2",
        "compat=1.1,cluster_size=65536,refcount_bits=4",
        "compat=1.1,cluster_size=2097152,refcount_bits=8",
        "compat=1.1,cluster_size=4096,refcount_bits=16",
        "compat=1.1,cluster_size=65536,refcount_bits=32",
        "compat=1.1,cluster_size=512,refcount_bits=64",
        "compat=1.1,cluster_size=65536,lazy_refcounts=on",
        "compat=1.1,cluster_size=65536,preallocation=metadata",
    ];
    for (i, opts) in cases.iter().enumerate() {
        let p = populated(dir.path(), &format!("img{i}.qcow2"), opts);
        let r = ours(&p);
        assert!(r.is_clean(), "{opts}: {}", r.human());
        assert_eq!(r.relaxed_copied, 0, "{opts}");
        assert_same_figures(&p, &r);
        let h = Img::open(&p).h;
        assert_eq!(r.cluster_size, h.cluster_size());
        assert_eq!(r.refcount_bits, h.refcount_bits());
    }
}
