//! Guest data for the tests, all drawn from one seeded generator
//! ([`qdedup::sample::Rng`]): the same seed gives the same bytes on every run.

use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use qdedup::sample::{fill_text, Rng};

/// Writes `data` to `dir/name` and returns the path.
pub fn write_raw(dir: &Path, name: &str, data: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, data).unwrap();
    p
}

/// `len` random (incompressible) bytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    Rng::new(seed).fill(&mut v);
    v
}

/// `len` bytes of log-like text (compresses about 3–4×).
pub fn text_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_text(&mut Rng::new(seed), &mut v);
    v
}

/// `len` bytes drawn evenly from `letters` distinct letters: deflate stores each
/// in about log2(letters) bits (8 letters: a third of the size, 16: a half).
pub fn letters(seed: u64, len: usize, letters: u8) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    (0..len)
        .map(|_| b'a' + rng.below(u64::from(letters)) as u8)
        .collect()
}

/// What fills the clusters of [`mixed_clusters`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Random bytes; a quarter of the unique clusters hold a single non-zero byte.
    Random,
    /// Log-like text; a quarter of the unique clusters are random bytes.
    Text,
}

/// `n_clusters` clusters of `cs` bytes plus `tail` bytes: a deterministic mix of
/// zero clusters (3 in 10), repeats of five templates (4 in 10) and unique
/// clusters, filled as `fill` says.
pub fn mixed_clusters(cs: usize, n_clusters: usize, tail: usize, seed: u64, fill: Fill) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let fresh = |rng: &mut Rng, len: usize| {
        let mut c = vec![0u8; len];
        match fill {
            Fill::Random => rng.fill(&mut c),
            Fill::Text => fill_text(rng, &mut c),
        }
        c
    };
    let templates: Vec<Vec<u8>> = (0..5).map(|_| fresh(&mut rng, cs)).collect();
    let mut data = Vec::with_capacity(n_clusters * cs + tail);
    for _ in 0..n_clusters {
        match rng.below(10) {
            0..=2 => data.extend(std::iter::repeat_n(0u8, cs)),
            3..=6 => data.extend_from_slice(&templates[rng.below(5) as usize]),
            _ => {
                let mut c = fresh(&mut rng, cs);
                if rng.below(4) == 0 {
                    match fill {
                        // Only one byte is non-zero: still data.
                        Fill::Random => {
                            c.fill(0);
                            c[rng.below(cs as u64) as usize] = 1 + rng.below(255) as u8;
                        }
                        // Incompressible: stored plain even with -c.
                        Fill::Text => rng.fill(&mut c),
                    }
                }
                data.extend_from_slice(&c);
            }
        }
    }
    data.extend_from_slice(&fresh(&mut rng, tail));
    data
}

/// Writes [`mixed_clusters`] of random bytes to `path`. Returns the number of
/// distinct non-zero cluster contents (the tail counted as a zero-padded
/// cluster).
pub fn make_input(path: &Path, cs: usize, n_clusters: usize, tail: usize, seed: u64) -> usize {
    let data = mixed_clusters(cs, n_clusters, tail, seed, Fill::Random);
    std::fs::write(path, &data).unwrap();
    distinct_nonzero(&data, cs)
}

/// Writes [`make_input`]'s mix to `dir/in.raw` and returns the path.
pub fn raw_input(dir: &Path, cs: usize, n_clusters: usize, tail: usize, seed: u64) -> PathBuf {
    let p = dir.join("in.raw");
    make_input(&p, cs, n_clusters, tail, seed);
    p
}

/// Distinct non-zero cluster contents of `data` (last cluster zero-padded).
pub fn distinct_nonzero(data: &[u8], cs: usize) -> usize {
    let mut set = HashSet::new();
    for c in data.chunks(cs) {
        let mut v = c.to_vec();
        v.resize(cs, 0);
        if v.iter().any(|b| *b != 0) {
            set.insert(v);
        }
    }
    set.len()
}

/// Writes `mib` MiB of unique (non-repeating, non-zero) 4 KiB blocks to `path`,
/// quickly: one random MiB, each block stamped with its index.
pub fn unique_blocks(path: &Path, mib: usize) {
    let mut chunk = random_bytes(3, 1 << 20);
    let mut f = std::io::BufWriter::new(File::create(path).unwrap());
    for i in 0..mib {
        for (j, block) in chunk.chunks_mut(4096).enumerate() {
            block[..8].copy_from_slice(&((i * 256 + j) as u64).to_le_bytes());
        }
        std::io::Write::write_all(&mut f, &chunk).unwrap();
    }
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

/// The kinds of file system [`real_files_fs`] makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsKind {
    /// `mkfs.ext4 -d` (e2fsprogs).
    Ext4,
    /// `mkfs.vfat` with 4 KiB clusters (FAT16 or FAT32 by size), filled with
    /// `mcopy -s` (dosfstools, mtools).
    Vfat,
}

/// Real files of this machine (`/usr/share/doc`, `/usr/lib/python3*`, then
/// `/usr/share`, walked in name order) copied into `dir/tree/c0` up to `budget`
/// bytes, then `copies − 1` more copies of that tree beside it, every time stamp
/// set to one fixed time, and a file system of `image_size` bytes of the given
/// kind made from the tree. Returns the image and the number of files in one copy.
pub fn real_files_fs(
    dir: &Path,
    kind: FsKind,
    copies: usize,
    budget: u64,
    image_size: u64,
) -> (PathBuf, usize) {
    let (tree, files) = real_files_tree(dir, copies, budget);
    let img = match kind {
        FsKind::Ext4 => mkfs_ext4(dir, &tree, image_size),
        FsKind::Vfat => mkfs_vfat(dir, &tree, image_size),
    };
    (img, files)
}

/// [`real_files_fs`] with ext4.
pub fn real_files_ext4(
    dir: &Path,
    copies: usize,
    budget: u64,
    image_size: u64,
) -> (PathBuf, usize) {
    real_files_fs(dir, FsKind::Ext4, copies, budget, image_size)
}

/// The tree of [`real_files_fs`]: `dir/tree/c0 … c{copies-1}`.
fn real_files_tree(dir: &Path, copies: usize, budget: u64) -> (PathBuf, usize) {
    fn walk(from: &Path, to: &Path, budget: &mut u64, files: &mut usize) {
        let Ok(rd) = std::fs::read_dir(from) else {
            return;
        };
        let mut entries: Vec<_> = rd.filter_map(Result::ok).collect();
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for e in entries {
            let Ok(t) = e.file_type() else { continue };
            let dest = to.join(e.file_name());
            if t.is_dir() {
                if std::fs::create_dir_all(&dest).is_ok() {
                    walk(&e.path(), &dest, budget, files);
                }
            } else if t.is_file() {
                let len = e.metadata().map_or(u64::MAX, |m| m.len());
                if len <= *budget && std::fs::copy(e.path(), &dest).is_ok() {
                    *budget -= len;
                    *files += 1;
                }
            }
            if *budget == 0 {
                return;
            }
        }
    }
    let tree = dir.join("tree");
    let first = tree.join("c0");
    std::fs::create_dir_all(&first).unwrap();
    let (mut left, mut files) = (budget, 0);
    let mut roots = vec![PathBuf::from("/usr/share/doc")];
    if let Ok(rd) = std::fs::read_dir("/usr/lib") {
        let mut py: Vec<PathBuf> = rd
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("python3"))
            })
            .collect();
        py.sort();
        roots.extend(py);
    }
    roots.push(PathBuf::from("/usr/share"));
    for (i, r) in roots.iter().enumerate() {
        let to = first.join(format!("r{i}"));
        std::fs::create_dir_all(&to).unwrap();
        walk(r, &to, &mut left, &mut files);
    }
    for c in 1..copies {
        let o = std::process::Command::new("cp")
            .arg("-a")
            .arg(&first)
            .arg(tree.join(format!("c{c}")))
            .output()
            .expect("cp");
        assert!(o.status.success(), "cp -a: {o:?}");
    }
    // One time stamp everywhere, so that the file systems made from the tree
    // (which store the files' times) are the same on every run.
    let o = std::process::Command::new("find")
        .arg(&tree)
        .args(["-exec", "touch", "-h", "-d", "@1700000000", "{}", "+"])
        .output()
        .expect("find");
    assert!(o.status.success(), "find -exec touch: {o:?}");
    (tree, files)
}

fn mkfs_ext4(dir: &Path, tree: &Path, image_size: u64) -> PathBuf {
    let img = dir.join("fs.ext4");
    // A fixed UUID, hash seed and clock make the image the same on every run
    // (mkfs.ext4 draws them at random otherwise), so a test on it is repeatable.
    let o = std::process::Command::new("mkfs.ext4")
        .env("E2FSPROGS_FAKE_TIME", "1700000000")
        .args([
            "-q",
            "-F",
            "-U",
            "6b0c7a52-8c1e-4d1e-9a53-2f4a6a1e0d11",
            "-E",
            "hash_seed=3f1d0c9e-5b7a-4e2c-8d6f-1a2b3c4d5e6f",
            "-d",
        ])
        .arg(tree)
        .arg(&img)
        .arg(format!("{}k", image_size >> 10))
        .output()
        .expect("mkfs.ext4 (e2fsprogs) must be installed");
    assert!(o.status.success(), "mkfs.ext4: {o:?}");
    img
}

fn mkfs_vfat(dir: &Path, tree: &Path, image_size: u64) -> PathBuf {
    let img = dir.join("fs.vfat");
    // 4 KiB clusters (8 sectors of 512 B), structures aligned to them (the
    // default), a fixed volume id and time (--invariant).
    let o = std::process::Command::new("mkfs.vfat")
        .args([
            "--invariant",
            "-S",
            "512",
            "-s",
            "8",
            "-n",
            "QDEDUPTEST",
            "-C",
        ])
        .arg(&img)
        .arg((image_size >> 10).to_string())
        .output()
        .expect("mkfs.vfat (dosfstools) must be installed");
    assert!(o.status.success(), "mkfs.vfat: {o:?}");
    let mut copies: Vec<PathBuf> = std::fs::read_dir(tree)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    copies.sort();
    // -s: recursive; -m: keep the files' (fixed) times; -Q: stop at the first
    // error; -D a: a name FAT cannot tell from another (it ignores case, e.g.
    // README and readme in one directory) is renamed, not asked about (mcopy
    // asks on the terminal and, with none, fails without a word).
    let o = std::process::Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .stdin(std::process::Stdio::null())
        .args(["-D", "a", "-s", "-m", "-Q", "-i"])
        .arg(&img)
        .args(&copies)
        .arg("::/")
        .output()
        .expect("mcopy (mtools) must be installed");
    assert!(o.status.success(), "mcopy: {o:?}");
    img
}
