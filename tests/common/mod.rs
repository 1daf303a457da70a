//! Shared helpers for the CLI tests: running the binary and qemu-img, generating
//! inputs, and reading qcow2 metadata independently of the writer.
#![allow(dead_code)]

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use qdedup::format::compressed::CompressedDescriptor;
use qdedup::format::header::Header;
use qdedup::format::l1l2::{
    L1Entry, L2Entry, L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED,
};
use qdedup::format::refcount;
use qdedup::sample::Rng;

/// Path of the qdedup binary under test.
pub fn qdedup_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_qdedup"))
}

/// Runs qdedup with `args`.
pub fn qdedup<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(qdedup_bin())
        .args(args)
        .output()
        .expect("qdedup runs")
}

/// Runs a qemu tool; a missing tool fails the test (it must not silently skip).
pub fn qemu<I, S>(tool: &str, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(tool).args(args).output().unwrap_or_else(|e| {
        panic!("{tool} is required for this test (apt-get install qemu-utils): {e}")
    })
}

/// A command line: the fixed words `head`, the caller's options `extra`, then
/// `tail` (paths, mostly).
fn argv<'a>(head: &[&'a str], extra: &[&'a str], tail: &[&'a OsStr]) -> Vec<&'a OsStr> {
    head.iter()
        .chain(extra)
        .map(|s| OsStr::new(*s))
        .chain(tail.iter().copied())
        .collect()
}

/// Runs a qemu tool like [`qemu`] and asserts it exits 0, showing the command and
/// its output if not.
pub fn qemu_ok<I, S>(tool: &str, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let o = qemu(tool, &args);
    assert!(
        o.status.success(),
        "{tool} {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Runs `qemu-img ARGS` and asserts it succeeded.
pub fn qemu_img<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    qemu_ok("qemu-img", args)
}

/// Runs qemu-io commands (qemu-io's own syntax, one per `-c`) on the qcow2 image
/// `img`, and asserts they all succeeded: exit 0 and no "error" or "failed" in
/// the output.
pub fn qemu_io(img: &Path, cmds: &[&str]) -> Output {
    let mut args: Vec<&OsStr> = vec!["-f".as_ref(), "qcow2".as_ref()];
    for c in cmds {
        args.push("-c".as_ref());
        args.push(c.as_ref());
    }
    args.push(img.as_os_str());
    let o = qemu_ok("qemu-io", &args);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !said.contains("error") && !said.contains("failed"),
        "qemu-io {cmds:?} on {} failed: {said}",
        img.display()
    );
    o
}

/// `qemu-img create -q -f qcow2 [EXTRA] PATH [SIZE]` (no size: the backing
/// file's). Returns `path`.
pub fn create_qcow2(path: PathBuf, size: Option<&str>, extra: &[&str]) -> PathBuf {
    let mut args = argv(&["create", "-q", "-f", "qcow2"], extra, &[path.as_os_str()]);
    args.extend(size.map(OsStr::new));
    qemu_img(args);
    path
}

/// `qemu-img convert -f raw -O qcow2 [EXTRA] RAW IMG`.
pub fn qcow2_from_raw(raw: &Path, img: &Path, extra: &[&str]) {
    qemu_img(argv(
        &["convert", "-f", "raw", "-O", "qcow2"],
        extra,
        &[raw.as_os_str(), img.as_os_str()],
    ));
}

/// `qemu-img convert -O raw [EXTRA] SRC OUT`: QEMU's view of the guest, as a raw
/// file. `src` may be a `json:` spec.
pub fn qemu_raw_view(src: &OsStr, out: &Path, extra: &[&str]) {
    qemu_img(argv(
        &["convert", "-O", "raw"],
        extra,
        &[src, out.as_os_str()],
    ));
}

/// A `json:` image spec QEMU reads as the qcow2 image `img` alone, without its
/// backing file (`"backing": null`).
pub fn top_alone_spec(img: &Path) -> String {
    let spec = serde_json::json!({
        "driver": "qcow2",
        "backing": null,
        "file": {"driver": "file", "filename": img.to_str().unwrap()},
    });
    format!("json:{spec}")
}

/// `qemu-img snapshot -c NAME IMG`.
pub fn qemu_snapshot(img: &Path, name: &str) {
    qemu_img([
        "snapshot".as_ref(),
        "-c".as_ref(),
        name.as_ref(),
        img.as_os_str(),
    ]);
}

/// `qemu-img resize [EXTRA] IMG SIZE` (e.g. `--shrink` in `extra`).
pub fn qemu_resize(img: &Path, size: &str, extra: &[&str]) {
    qemu_img(argv(
        &["resize", "-q"],
        extra,
        &[img.as_os_str(), OsStr::new(size)],
    ));
}

/// The virtual size `qemu-img info` reports for `img` (format probed).
pub fn qemu_virtual_size(img: &Path) -> u64 {
    let o = qemu_img(["info".as_ref(), "--output=json".as_ref(), img.as_os_str()]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("qemu-img info JSON");
    v["virtual-size"].as_u64().expect("virtual-size")
}

/// Writes `data` to `dir/name` and returns the path.
pub fn write_raw(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// Runs `qdedup convert -q --output json ARGS INPUT OUTPUT`, asserts success and
/// returns the parsed report.
pub fn convert_json(args: &[&str], input: &Path, output: &Path) -> serde_json::Value {
    let o = qdedup(argv(
        &["convert", "-q", "--output", "json"],
        args,
        &[input.as_os_str(), output.as_os_str()],
    ));
    assert!(
        o.status.success(),
        "qdedup convert {} failed: {}",
        input.display(),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("JSON report")
}

/// Asserts `qemu-img check` finds `img` clean.
pub fn assert_qemu_check_clean(img: &Path) {
    let o = qemu("qemu-img", ["check".as_ref(), img.as_os_str()]);
    assert!(
        o.status.success(),
        "qemu-img check {} failed:\n{}{}",
        img.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Asserts `qemu-img compare` finds the guest contents identical.
pub fn assert_qemu_compare_same(a: &Path, a_fmt: &str, b: &Path) {
    let o = qemu(
        "qemu-img",
        [
            "compare".as_ref(),
            "-f".as_ref(),
            a_fmt.as_ref(),
            "-F".as_ref(),
            "qcow2".as_ref(),
            a.as_os_str(),
            b.as_os_str(),
        ],
    );
    assert!(
        o.status.success(),
        "qemu-img compare {} {} failed:\n{}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Writes a raw input of `n_clusters` clusters of `cs` bytes plus `tail` bytes:
/// a deterministic mix of zero clusters, repeats of a few templates, and unique
/// random clusters. Returns the number of distinct non-zero cluster contents
/// (the tail counted as a zero-padded cluster).
pub fn make_input(path: &Path, cs: usize, n_clusters: usize, tail: usize, seed: u64) -> usize {
    let mut rng = Rng::new(seed);
    let templates: Vec<Vec<u8>> = (0..5)
        .map(|_| {
            let mut t = vec![0u8; cs];
            rng.fill(&mut t);
            t
        })
        .collect();
    let mut data = Vec::with_capacity(n_clusters * cs + tail);
    for _ in 0..n_clusters {
        match rng.below(10) {
            0..=2 => data.extend(std::iter::repeat_n(0u8, cs)),
            3..=6 => data.extend_from_slice(&templates[rng.below(5) as usize]),
            _ => {
                let mut c = vec![0u8; cs];
                rng.fill(&mut c);
                // Sometimes only one byte is non-zero: still data.
                if rng.below(4) == 0 {
                    c.fill(0);
                    c[rng.below(cs as u64) as usize] = 1 + rng.below(255) as u8;
                }
                data.extend_from_slice(&c);
            }
        }
    }
    let mut t = vec![0u8; tail];
    rng.fill(&mut t);
    data.extend_from_slice(&t);
    std::fs::write(path, &data).unwrap();
    distinct_nonzero(&data, cs)
}

/// Writes a sparse raw file of `size` bytes with `pieces` random writes: at
/// sector-aligned or unaligned offsets, of 1 byte to 70 KB, most of random bytes,
/// some of zeros (allocated zeros, not holes). The rest are holes.
pub fn random_sparse_raw(path: &Path, size: u64, pieces: u64, rng: &mut Rng) {
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    let lens = [1u64, 512, 1024, 3000, 4096, 5000, 20_000, 70_000];
    for _ in 0..pieces {
        let mut off = rng.below(size / 512) * 512;
        if rng.below(5) == 0 {
            off += rng.below(512);
        }
        let len = lens[rng.below(lens.len() as u64) as usize].min(size - off);
        let mut buf = vec![0u8; len as usize];
        if rng.below(5) != 0 {
            rng.fill(&mut buf);
        }
        f.write_all_at(&buf, off).unwrap();
    }
}

/// qemu-io commands for `n` random requests into an image of `size` bytes:
/// pattern writes (mostly), zero writes, writes of zero bytes and discards, of
/// 512 B to 64 KiB at sector-aligned offsets.
pub fn random_qemu_io_cmds(size: u64, n: u64, rng: &mut Rng) -> Vec<String> {
    let lens = [512u64, 1024, 2048, 3072, 4096, 6144, 8192, 65536];
    (0..n)
        .map(|_| {
            let off = rng.below(size / 512) * 512;
            let len = lens[rng.below(lens.len() as u64) as usize].min(size - off);
            match rng.below(10) {
                0..=5 => format!("write -P {} {off} {len}", 1 + rng.below(255)),
                6 | 7 => format!("write -z {off} {len}"),
                8 => format!("write -P 0 {off} {len}"),
                _ => format!("discard {off} {len}"),
            }
        })
        .collect()
}

/// Distinct non-zero cluster contents of `data` (last cluster zero-padded).
pub fn distinct_nonzero(data: &[u8], cs: usize) -> usize {
    let mut set = std::collections::HashSet::new();
    for c in data.chunks(cs) {
        let mut v = c.to_vec();
        v.resize(cs, 0);
        if v.iter().any(|b| *b != 0) {
            set.insert(v);
        }
    }
    set.len()
}

/// What a qcow2 image's metadata says, read with the format modules only.
#[derive(Debug)]
pub struct Layout {
    pub header: Header,
    /// Host data offsets referenced by normal L2 entries → number of references.
    pub data_refs: HashMap<u64, u64>,
    /// Normal L2 entries with COPIED set, by host offset.
    pub copied: Vec<(u64, bool)>,
    /// Compressed L2 entries.
    pub compressed: u64,
    /// Compressed L2 entries with COPIED set (never allowed).
    pub compressed_copied: u64,
    /// Host clusters touched by compressed streams → references through streams.
    pub stream_refs: HashMap<u64, u64>,
    /// Distinct compressed streams (by descriptor).
    pub streams: std::collections::HashSet<u64>,
    /// Stored refcount of a host cluster index.
    pub refcounts: HashMap<u64, u64>,
}

fn read(f: &File, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

/// Reads the active L1/L2 tree and the refcounts of every referenced cluster.
pub fn read_layout(path: &Path) -> Layout {
    let f = File::open(path).unwrap();
    let header = Header::decode(&read(&f, 0, 112)).unwrap();
    header.validate(f.metadata().unwrap().len()).unwrap();
    let cb = header.cluster_bits;
    let cs = header.cluster_size() as usize;
    let l1 = read(&f, header.l1_table_offset, header.l1_size as usize * 8);
    let mut data_refs = HashMap::new();
    let mut copied = Vec::new();
    let mut compressed = 0;
    let mut compressed_copied = 0;
    let mut stream_refs: HashMap<u64, u64> = HashMap::new();
    let mut streams = std::collections::HashSet::new();
    for e in l1.chunks_exact(8) {
        let l1e = L1Entry::decode(u64::from_be_bytes(e.try_into().unwrap()));
        if l1e.l2_offset == 0 {
            continue;
        }
        let l2 = read(&f, l1e.l2_offset, cs);
        for e in l2.chunks_exact(8) {
            match L2Entry::decode(u64::from_be_bytes(e.try_into().unwrap()), cb, false) {
                L2Entry::Normal { offset, copied: c } => {
                    *data_refs.entry(offset).or_insert(0) += 1;
                    copied.push((offset, c));
                }
                L2Entry::Compressed { desc, copied: c } => {
                    compressed += 1;
                    compressed_copied += u64::from(c);
                    streams.insert(desc.encode(cb));
                    let (a, b) = desc.clusters(cb);
                    for h in a..=b {
                        *stream_refs.entry(h).or_insert(0) += 1;
                    }
                }
                _ => {}
            }
        }
    }
    let rt = read(
        &f,
        header.refcount_table_offset,
        (header.refcount_table_clusters as usize) << cb,
    );
    let epb = refcount::entries_per_block(cb, header.refcount_order);
    let mut refcounts = HashMap::new();
    for c in data_refs
        .keys()
        .map(|o| o >> cb)
        .chain(stream_refs.keys().copied())
    {
        let rb = u64::from_be_bytes(
            rt[(c / epb) as usize * 8..(c / epb) as usize * 8 + 8]
                .try_into()
                .unwrap(),
        );
        let block = read(&f, rb, cs);
        refcounts.insert(c, refcount::get(&block, header.refcount_order, c % epb));
    }
    Layout {
        header,
        data_refs,
        copied,
        compressed,
        compressed_copied,
        stream_refs,
        streams,
        refcounts,
    }
}

/// Lists the entries of `dir`, sorted.
pub fn dir_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// A qcow2 file patched in place: field offsets are read from its own header and
/// tables (never hard-coded).
pub struct Img {
    pub path: PathBuf,
    pub h: Header,
}

/// One L2 entry of the active tables: its file offset, its first word and (with
/// extended L2 entries) its subcluster bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Slot {
    /// Guest cluster index.
    pub cluster: u64,
    /// File offset of the entry.
    pub at: u64,
    /// The entry's first 8 bytes.
    pub raw: u64,
    /// The subcluster bitmap (0 without extended L2 entries).
    pub bitmap: u64,
}

impl L2Slot {
    /// Whether the entry describes a compressed cluster.
    pub fn compressed(&self) -> bool {
        self.raw & QCOW_OFLAG_COMPRESSED != 0
    }
    /// Host cluster offset of a plain entry (data or preallocated zero), if any.
    pub fn host(&self) -> Option<u64> {
        let h = self.raw & L2E_OFFSET_MASK;
        (!self.compressed() && h != 0).then_some(h)
    }
}

impl Img {
    pub fn open(path: &Path) -> Img {
        let b = std::fs::read(path).unwrap();
        let h = Header::decode(&b).unwrap();
        Img {
            path: path.to_path_buf(),
            h,
        }
    }
    pub fn cs(&self) -> u64 {
        self.h.cluster_size()
    }
    pub fn u64_at(&self, off: u64) -> u64 {
        let f = File::open(&self.path).unwrap();
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, off).unwrap();
        u64::from_be_bytes(b)
    }
    pub fn put_u64(&self, off: u64, v: u64) {
        let f = OpenOptions::new().write(true).open(&self.path).unwrap();
        f.write_all_at(&v.to_be_bytes(), off).unwrap();
    }
    pub fn len(&self) -> u64 {
        std::fs::metadata(&self.path).unwrap().len()
    }
    /// File offset of active L1 entry `i`.
    pub fn l1_entry(&self, i: u64) -> u64 {
        self.h.l1_table_offset + 8 * i
    }
    /// File offset of L2 entry `i` of the L2 table under L1 entry `l1i`.
    pub fn l2_entry(&self, l1i: u64, i: u64) -> u64 {
        let l2 = self.u64_at(self.l1_entry(l1i)) & L1E_OFFSET_MASK;
        assert_ne!(l2, 0, "no L2 table under L1 entry {l1i}");
        l2 + i * self.h.l2_entry_size()
    }
    /// (file offset of the slot's refcount block, the block bytes) for `cluster`.
    pub fn refblock_of(&self, cluster: u64) -> (u64, Vec<u8>) {
        let epb = refcount::entries_per_block(self.h.cluster_bits, self.h.refcount_order);
        let rt = self.u64_at(self.h.refcount_table_offset + 8 * (cluster / epb));
        let off = rt & !0x1ff;
        assert_ne!(off, 0, "no refcount block for cluster {cluster}");
        let mut b = vec![0u8; self.cs() as usize];
        File::open(&self.path)
            .unwrap()
            .read_exact_at(&mut b, off)
            .unwrap();
        (off, b)
    }
    pub fn refcount(&self, cluster: u64) -> u64 {
        let epb = refcount::entries_per_block(self.h.cluster_bits, self.h.refcount_order);
        let (_, b) = self.refblock_of(cluster);
        refcount::get(&b, self.h.refcount_order, cluster % epb)
    }
    pub fn set_refcount(&self, cluster: u64, v: u64) {
        let epb = refcount::entries_per_block(self.h.cluster_bits, self.h.refcount_order);
        let (off, mut b) = self.refblock_of(cluster);
        refcount::set(&mut b, self.h.refcount_order, cluster % epb, v);
        let f = OpenOptions::new().write(true).open(&self.path).unwrap();
        f.write_all_at(&b, off).unwrap();
    }

    /// Every L2 entry of the active tables for guest clusters inside the virtual
    /// size, in guest order (clusters under empty L1 entries are left out).
    pub fn l2_slots(&self) -> Vec<L2Slot> {
        let cs = self.cs();
        let per_table = self.h.l2_entries();
        let clusters = self.h.size.div_ceil(cs);
        let mut slots = Vec::new();
        for l1i in 0..u64::from(self.h.l1_size) {
            let l2 = self.u64_at(self.l1_entry(l1i)) & L1E_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            for i in 0..per_table {
                let cluster = l1i * per_table + i;
                if cluster >= clusters {
                    break;
                }
                let at = l2 + i * self.h.l2_entry_size();
                let bitmap = if self.h.extended_l2() {
                    self.u64_at(at + 8)
                } else {
                    0
                };
                slots.push(L2Slot {
                    cluster,
                    at,
                    raw: self.u64_at(at),
                    bitmap,
                });
            }
        }
        slots
    }

    /// The host clusters (indices) one L2 entry references: its cluster for plain
    /// entries, every cluster its stream touches for compressed ones.
    pub fn referenced_clusters(&self, raw: u64) -> Vec<u64> {
        let cb = self.h.cluster_bits;
        if raw & QCOW_OFLAG_COMPRESSED != 0 {
            let (a, b) = CompressedDescriptor::decode(raw, cb).clusters(cb);
            (a..=b).collect()
        } else {
            let h = raw & L2E_OFFSET_MASK;
            if h == 0 {
                Vec::new()
            } else {
                vec![h >> cb]
            }
        }
    }

    /// References from the active L2 tables to each host cluster.
    pub fn l2_references(&self) -> HashMap<u64, u64> {
        let mut refs = HashMap::new();
        for s in self.l2_slots() {
            for c in self.referenced_clusters(s.raw) {
                *refs.entry(c).or_insert(0) += 1;
            }
        }
        refs
    }

    /// Rewrites L2 entries (`(file offset, first word, bitmap)`; the bitmap is
    /// left alone when `None`), then makes refcounts and COPIED flags consistent
    /// again as a dedup writer would: every data cluster referenced before or after
    /// gets a refcount equal to its references (0 frees it), and COPIED is set on
    /// plain entries exactly when their cluster's refcount is 1 (never on compressed
    /// ones). For images without snapshots whose refcounts were clean.
    pub fn rewrite_l2(&self, edits: &[(u64, u64, Option<u64>)]) {
        let before = self.l2_references();
        for &(at, raw, bitmap) in edits {
            self.put_u64(at, raw);
            if let Some(b) = bitmap {
                assert!(self.h.extended_l2(), "a bitmap needs extended L2 entries");
                self.put_u64(at + 8, b);
            }
        }
        let after = self.l2_references();
        let mut clusters: Vec<u64> = before.keys().chain(after.keys()).copied().collect();
        clusters.sort_unstable();
        clusters.dedup();
        for c in clusters {
            self.set_refcount(c, after.get(&c).copied().unwrap_or(0));
        }
        for s in self.l2_slots() {
            let want = if s.compressed() {
                s.raw & !QCOW_OFLAG_COPIED
            } else if let Some(h) = s.host() {
                if after[&(h >> self.h.cluster_bits)] == 1 {
                    s.raw | QCOW_OFLAG_COPIED
                } else {
                    s.raw & !QCOW_OFLAG_COPIED
                }
            } else {
                s.raw
            };
            if want != s.raw {
                self.put_u64(s.at, want);
            }
        }
    }
}

// ---------------------------------------------------------------- patching images

/// Width in bytes of the header field at `offset` (one of
/// `qdedup::format::header::off`).
pub fn header_field_width(offset: usize) -> usize {
    use qdedup::format::header::off;
    match offset {
        off::BACKING_FILE_OFFSET
        | off::SIZE
        | off::L1_TABLE_OFFSET
        | off::REFCOUNT_TABLE_OFFSET
        | off::SNAPSHOTS_OFFSET
        | off::INCOMPATIBLE_FEATURES
        | off::COMPATIBLE_FEATURES
        | off::AUTOCLEAR_FEATURES => 8,
        off::MAGIC
        | off::VERSION
        | off::BACKING_FILE_SIZE
        | off::CLUSTER_BITS
        | off::CRYPT_METHOD
        | off::L1_SIZE
        | off::REFCOUNT_TABLE_CLUSTERS
        | off::NB_SNAPSHOTS
        | off::REFCOUNT_ORDER
        | off::HEADER_LENGTH => 4,
        off::COMPRESSION_TYPE => 1,
        _ => panic!("no header field starts at offset {offset}"),
    }
}

/// Writes `value` big-endian in `width` bytes at `at` of the file `img`.
pub fn patch_be(img: &Path, at: u64, width: usize, value: u64) {
    assert!(width <= 8 && (width == 8 || value >> (8 * width) == 0));
    let bytes = &value.to_be_bytes()[8 - width..];
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

/// Sets the header field at `field` (a `qdedup::format::header::off` constant) of
/// `img` to `value`, in the field's width.
pub fn patch_header(img: &Path, field: usize, value: u64) {
    patch_be(img, field as u64, header_field_width(field), value);
}

/// The decoded header of `img` (not validated).
pub fn header_of(img: &Path) -> Header {
    let f = File::open(img).unwrap();
    let mut b = vec![0u8; 112];
    let n = f.read_at(&mut b, 0).unwrap();
    Header::decode(&b[..n]).unwrap()
}

/// Replaces the header extensions of `img` by one extension of type `kind` with
/// `data`, then the end marker (qemu-img's images keep only a feature name
/// table there, which nothing needs).
pub fn set_only_extension(img: &Path, kind: u32, data: &[u8]) {
    let at = u64::from(header_of(img).header_length);
    let mut e = Vec::new();
    qdedup::format::extensions::encode(kind, data, &mut e);
    e.extend_from_slice(&[0u8; 8]);
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(&e, at).unwrap();
}

/// Exit code of a finished command (a signal fails the test).
pub fn exit_code(o: &Output) -> i32 {
    o.status.code().expect("exited, not killed by a signal")
}

/// stdout and stderr of `o`, for assertion messages.
pub fn said(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// (offset of the bitmaps extension's data, bitmap directory offset) of a qcow2
/// file that has one.
pub fn bitmaps_extension(p: &Path) -> (u64, u64) {
    let b = std::fs::read(p).unwrap();
    let be32 = |at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    let mut pos = be32(100) as usize;
    loop {
        let (kind, len) = (be32(pos), be32(pos + 4) as usize);
        assert_ne!(kind, 0, "no bitmaps extension");
        if kind == qdedup::format::extensions::QCOW2_EXT_MAGIC_BITMAPS {
            let dir = u64::from_be_bytes(b[pos + 24..pos + 32].try_into().unwrap());
            return (pos as u64 + 8, dir);
        }
        pos += 8 + len.div_ceil(8) * 8;
    }
}

/// Runs qdedup with `args` in the working directory `dir` (for relative names).
pub fn qdedup_in<I, S>(dir: &Path, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    Command::new(qdedup_bin())
        .current_dir(dir)
        .args(args)
        .output()
        .expect("qdedup runs")
}

/// Runs a qemu tool in the working directory `dir` and asserts it exits 0 (a
/// missing tool fails the test).
pub fn qemu_ok_in<I, S>(dir: &Path, tool: &str, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let args: Vec<OsString> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let o = Command::new(tool)
        .current_dir(dir)
        .args(&args)
        .output()
        .unwrap_or_else(|e| {
            panic!("{tool} is required for this test (apt-get install qemu-utils): {e}")
        });
    assert!(
        o.status.success(),
        "{tool} {args:?} in {} failed:\n{}",
        dir.display(),
        said(&o)
    );
    o
}
