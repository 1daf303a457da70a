//! `compare` on images whose L2 entries share host clusters, with `qemu-img compare`
//! as the oracle: the skips of already-compared host clusters must never hide a
//! difference (issue 18 C).

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Output;

use common::{
    assert_qemu_check_clean, convert_json, create_qcow2, letters, qcow2_from_raw, qdedup, qemu,
    qemu_io, qemu_raw_view, raw_input, write_raw, Img, L2Slot, Scratch,
};
use qdedup::format::compressed::CompressedDescriptor;
use qdedup::format::l1l2::{L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_ZERO};
use qdedup::inspect::compare::{compare, CompareOptions, CompareReport};
use qdedup::sample::Rng;

/// Exit code and stdout of a command.
fn verdict(o: &Output) -> (Option<i32>, String) {
    (
        o.status.code(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
    )
}

/// `qemu-img compare A B` and `qdedup compare A B`: (QEMU's verdict, ours).
fn both_compares(a: &Path, b: &Path) -> ((Option<i32>, String), (Option<i32>, String)) {
    let args = ["compare".as_ref(), a.as_os_str(), b.as_os_str()];
    (verdict(&qemu("qemu-img", args)), verdict(&qdedup(args)))
}

/// The library's figures for the same comparison.
fn library_compare(a: &Path, b: &Path) -> CompareReport {
    compare(a, b, &CompareOptions::default()).expect("compare runs")
}

/// The recipe: over a raw backing file of 64 KiB of zeros and 64 KiB of
/// 0x22, an extended-L2 image whose guest cluster 1 maps only its first half (16
/// of 32 subclusters) and shares guest cluster 0's host cluster; the second half
/// falls through to the backing file's 0x22.
fn half_mapped_sharer(dir: &Path) -> PathBuf {
    let mut base = vec![0u8; 64 << 10];
    base.extend(std::iter::repeat_n(0x22u8, 64 << 10));
    write_raw(dir, "base.raw", &base);
    let a = create_qcow2(
        dir.join("A.qcow2"),
        Some("128K"),
        &[
            "-o",
            "cluster_size=65536,extended_l2=on",
            "-b",
            "base.raw",
            "-F",
            "raw",
        ],
    );
    qemu_io(&a, &["write -P 0x11 0 64k", "write -P 0x11 64k 32k"]);
    let img = Img::open(&a);
    let (e0, e1) = (img.l2_entry(0, 0), img.l2_entry(0, 1));
    let (r0, r1) = (img.u64_at(e0), img.u64_at(e1));
    let (h0, h1) = (r0 & L2E_OFFSET_MASK, r1 & L2E_OFFSET_MASK);
    assert!(h0 != 0 && h1 != 0 && h0 != h1, "{r0:#x} {r1:#x}");
    assert_eq!(img.u64_at(e1 + 8), 0xffff, "first 16 subclusters allocated");
    // Entry 1 keeps its bitmap and points at entry 0's cluster; refcounts and
    // COPIED follow (the shared cluster 2, entry 1's old cluster freed).
    img.rewrite_l2(&[(e1, (r1 & !L2E_OFFSET_MASK) | h0, None)]);
    let cb = img.h.cluster_bits;
    assert_eq!(img.refcount(h0 >> cb), 2);
    assert_eq!(img.refcount(h1 >> cb), 0);
    assert_eq!(img.u64_at(e0), h0, "COPIED cleared on both entries");
    assert_eq!(img.u64_at(e1), h0);
    assert_qemu_check_clean(&a);
    a
}

#[test]
fn a_half_mapped_cluster_sharing_a_compared_host_cluster_is_still_compared() {
    let d = Scratch::new();
    let a = half_mapped_sharer(d.path());
    let raw = write_raw(d.path(), "c.raw", &vec![0x11u8; 128 << 10]);
    let c = d.join("C.qcow2");
    convert_json(&[], &raw, &c);
    let (theirs, ours) = both_compares(&a, &c);
    assert_eq!(
        theirs,
        (Some(1), "Content mismatch at offset 98304!\n".to_string())
    );
    assert_eq!(ours, theirs);
    // The other way round, and against the same content with the 0x22 half.
    assert_eq!(both_compares(&c, &a).1, theirs);
    let mut same = vec![0x11u8; 96 << 10];
    same.extend(std::iter::repeat_n(0x22u8, 32 << 10));
    let same = write_raw(d.path(), "same.raw", &same);
    let same_q = d.join("same.qcow2");
    convert_json(&[], &same, &same_q);
    for b in [&same, &same_q] {
        let (theirs, ours) = both_compares(&a, b);
        assert_eq!(theirs, (Some(0), "Images are identical.\n".to_string()));
        assert_eq!(ours, theirs, "{}", b.display());
    }
}

/// 64 KiB whose 4 KiB blocks alternate between zeros and bytes that deflate to
/// about half their size, so that a 4 KiB-cluster image of it alternates data
/// and zero runs.
fn striped_cluster(seed: u64) -> Vec<u8> {
    let mut c = vec![0u8; 64 << 10];
    for (i, block) in c.chunks_mut(8 << 10).enumerate() {
        block[..4 << 10].copy_from_slice(&letters(seed + i as u64, 4 << 10, 16));
    }
    c
}

#[test]
fn a_shorter_descriptor_of_an_already_read_stream_fails_as_in_qemu() {
    let d = Scratch::new();
    let cluster = striped_cluster(5);
    let data = [cluster.clone(), cluster].concat();
    let raw = write_raw(d.path(), "in.raw", &data);
    let a = d.join("a.qcow2");
    qcow2_from_raw(&raw, &a, &["-c", "-o", "cluster_size=64k"]);
    let img = Img::open(&a);
    let cb = img.h.cluster_bits;
    let (e0, e1) = (img.l2_entry(0, 0), img.l2_entry(0, 1));
    let d0 = CompressedDescriptor::decode(img.u64_at(e0), cb);
    assert!(img.u64_at(e0) & QCOW_OFLAG_COMPRESSED != 0);
    assert!(d0.extra_sectors > 2, "{d0:?}");
    // Entry 1 shares entry 0's stream but reads only its first sector.
    let short = CompressedDescriptor {
        host_offset: d0.host_offset,
        extra_sectors: 0,
    };
    img.rewrite_l2(&[(e1, QCOW_OFLAG_COMPRESSED | short.encode(cb), None)]);
    assert_qemu_check_clean(&a);
    // A 4 KiB-cluster copy of the intended contents: its data and zero runs make
    // compare read each compressed cluster of `a` in pieces.
    let b = d.join("b.qcow2");
    convert_json(&["-o", "cluster_size=4k"], &raw, &b);
    let ((q_code, q_out), (code, out)) = both_compares(&a, &b);
    assert!(
        matches!(q_code, Some(c) if c > 1),
        "qemu-img compare fails to read guest cluster 1: {q_code:?} {q_out}"
    );
    assert_eq!((code, out.as_str()), (Some(2), ""), "qdedup fails too");
    let e = compare(&a, &b, &CompareOptions::default()).unwrap_err();
    assert!(
        matches!(
            e,
            qdedup::Error::Corrupt {
                structure: "compressed cluster",
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn deduplicated_images_still_skip_repeated_host_pairs() {
    let dir = Scratch::new();
    let cs = 64 << 10;
    let raw = raw_input(dir.path(), cs, 64, 3000, 21);
    let data = std::fs::read(&raw).unwrap();
    // Full clusters only (the partial tail cluster is always read).
    let full: Vec<&[u8]> = data
        .chunks_exact(cs)
        .filter(|c| c.iter().any(|b| *b != 0))
        .collect();
    let distinct = full.iter().collect::<std::collections::HashSet<_>>().len() as u64;
    let repeats = full.len() as u64 - distinct;
    assert!(repeats > 10, "{repeats}");
    let path = |n: &str| dir.join(n);
    for (name, extra) in [("plain", &[][..]), ("compressed", &["-c"][..])] {
        let (a, b) = (
            path(&format!("{name}-a.qcow2")),
            path(&format!("{name}-b.qcow2")),
        );
        convert_json(extra, &raw, &a);
        convert_json(extra, &raw, &b);
        // Every repeated content is a pair of host sources already compared.
        let r = library_compare(&a, &b);
        assert_eq!(r.mismatch_offset, None, "{name}");
        assert_eq!(r.clusters_skipped_shared, repeats, "{name}");
        // One file against itself: plain clusters are never read; streams once.
        let r = library_compare(&a, &a);
        assert_eq!(r.mismatch_offset, None, "{name}");
        if extra.is_empty() {
            assert_eq!(r.clusters_skipped_shared, full.len() as u64, "{name}");
        } else {
            assert!(r.clusters_skipped_shared >= repeats, "{name}: {r:?}");
        }
    }
}

// ------------------------------------------------------------------ randomized

/// Fill patterns: few, so that equal contents (and so shared clusters) are common.
const PATTERNS: [u8; 3] = [0x11, 0x22, 0x33];

/// Every subcluster allocated.
const ALL: u64 = 0xffff_ffff;

/// A random subcluster bitmap: all, none, the first few (what a partial write
/// leaves) or random subclusters allocated, and sometimes some of the others zero.
fn random_bitmap(rng: &mut Rng) -> u64 {
    let alloc = match rng.below(5) {
        0 => ALL,
        1 => 0,
        2 | 3 => (1 << (1 + rng.below(31))) - 1,
        _ => rng.next_u64() & ALL,
    };
    let zero = if rng.below(3) == 0 {
        rng.next_u64() & ALL & !alloc
    } else {
        0
    };
    (zero << 32) | alloc
}

/// Points one random L2 entry of `img` at the host data of another: its plain
/// host cluster (with a random subcluster bitmap, or sometimes the zero flag:
/// zero-with-allocation), or its compressed stream (sometimes with one more
/// sector of the same host cluster: the same stream under another descriptor).
/// Refcounts and COPIED follow. Returns false when nothing could be shared.
fn share_patch(img: &Img, rng: &mut Rng) -> bool {
    let slots = img.l2_slots();
    let sources: Vec<L2Slot> = slots
        .iter()
        .copied()
        .filter(|s| s.compressed() || s.host().is_some())
        .collect();
    if sources.is_empty() {
        return false;
    }
    let ext = img.h.extended_l2();
    // Mostly the source maps a whole host cluster: the shape of issue 18 C
    // (a cluster compared whole, and a partial sharer of it elsewhere).
    let whole: Vec<L2Slot> = sources
        .iter()
        .copied()
        .filter(|s| s.host().is_some() && (!ext || s.bitmap & ALL == ALL))
        .collect();
    let pool = if whole.is_empty() || rng.below(3) == 0 {
        &sources
    } else {
        &whole
    };
    let from = pool[rng.below(pool.len() as u64) as usize];
    // Mostly a later cluster: compare meets the whole one first.
    let later: Vec<L2Slot> = slots
        .iter()
        .copied()
        .filter(|s| s.cluster > from.cluster)
        .collect();
    let targets = if later.is_empty() || rng.below(3) == 0 {
        &slots
    } else {
        &later
    };
    let to = targets[rng.below(targets.len() as u64) as usize];
    if from.cluster == to.cluster {
        return false;
    }
    let cb = img.h.cluster_bits;
    let (raw, bitmap) = if from.compressed() {
        let mut d = CompressedDescriptor::decode(from.raw, cb);
        let end = d.host_offset + d.read_len();
        if rng.below(2) == 0 && end % img.cs() != 0 && d.extra_sectors + 1 < 1 << (cb - 8) {
            d.extra_sectors += 1;
        }
        // A compressed entry's bitmap must be 0.
        (QCOW_OFLAG_COMPRESSED | d.encode(cb), ext.then_some(0))
    } else {
        let host = from.host().expect("a source with a host cluster");
        if ext {
            let keep = to.host().is_some() && rng.below(2) == 0;
            let bitmap = if keep { to.bitmap } else { random_bitmap(rng) };
            (host, Some(bitmap))
        } else {
            let zero = if rng.below(4) == 0 {
                QCOW_OFLAG_ZERO
            } else {
                0
            };
            (host | zero, None)
        }
    };
    img.rewrite_l2(&[(to.at, raw, bitmap)]);
    true
}

/// Changes what one plain entry of `img` maps of its host cluster: a new random
/// subcluster bitmap (half the time: a partial sharer made whole), or (without
/// extended L2) the zero flag toggled.
fn tweak_patch(img: &Img, rng: &mut Rng) -> bool {
    let plain: Vec<L2Slot> = img
        .l2_slots()
        .into_iter()
        .filter(|s| s.host().is_some())
        .collect();
    if plain.is_empty() {
        return false;
    }
    let s = plain[rng.below(plain.len() as u64) as usize];
    if img.h.extended_l2() {
        let shared = |x: &L2Slot| plain.iter().filter(|y| y.host() == x.host()).count() > 1;
        let partial: Vec<L2Slot> = plain
            .iter()
            .copied()
            .filter(|x| x.bitmap & ALL != ALL && shared(x))
            .collect();
        if !partial.is_empty() && rng.below(2) == 0 {
            let s = partial[rng.below(partial.len() as u64) as usize];
            img.rewrite_l2(&[(s.at, s.raw, Some(ALL))]);
        } else {
            img.rewrite_l2(&[(s.at, s.raw, Some(random_bitmap(rng)))]);
        }
    } else {
        img.rewrite_l2(&[(s.at, s.raw ^ QCOW_OFLAG_ZERO, None)]);
    }
    true
}

/// Ways in which an image's L2 entries share host data.
#[derive(Debug, Default)]
struct Sharing {
    /// Entries mapping some but not all subclusters of a shared host cluster.
    partial: u64,
    /// Of those, entries whose other subclusters fall through to a backing file.
    fall_through: u64,
    /// Entries reading as zeros over a shared host cluster (zero-with-allocation).
    zero_alloc: u64,
    /// Entries mapping all of a shared host cluster.
    full: u64,
    /// Compressed entries sharing a stream start with another entry.
    stream: u64,
    /// Entries (or subclusters) reading as zeros without a host cluster.
    zero_plain: u64,
}

impl Sharing {
    fn add(&mut self, img: &Img, backing: bool) {
        let slots = img.l2_slots();
        let mut hosts: HashMap<u64, u64> = HashMap::new();
        let mut streams: HashMap<u64, u64> = HashMap::new();
        let cb = img.h.cluster_bits;
        for s in &slots {
            if let Some(h) = s.host() {
                *hosts.entry(h).or_default() += 1;
            } else if s.compressed() {
                let start = CompressedDescriptor::decode(s.raw, cb).host_offset;
                *streams.entry(start).or_default() += 1;
            }
        }
        for s in &slots {
            if s.compressed() {
                let start = CompressedDescriptor::decode(s.raw, cb).host_offset;
                self.stream += u64::from(streams[&start] > 1);
                continue;
            }
            let Some(h) = s.host() else {
                let zero = if img.h.extended_l2() {
                    s.bitmap >> 32 != 0
                } else {
                    s.raw & QCOW_OFLAG_ZERO != 0
                };
                self.zero_plain += u64::from(zero);
                continue;
            };
            if hosts[&h] < 2 {
                continue;
            }
            let (alloc, zero) = if img.h.extended_l2() {
                (s.bitmap & ALL, s.bitmap >> 32)
            } else if s.raw & QCOW_OFLAG_ZERO != 0 {
                (0, ALL)
            } else {
                (ALL, 0)
            };
            match alloc {
                ALL => self.full += 1,
                0 if zero != 0 => self.zero_alloc += 1,
                0 => {}
                _ => {
                    self.partial += 1;
                    self.fall_through += u64::from(backing && (alloc | zero) != ALL);
                }
            }
        }
    }
}

/// Per full guest cluster of `img`: the source serving it whole (a host cluster
/// with every subcluster allocated, or a compressed stream's start), and the host
/// cluster it maps only partly, from its first subcluster on (extended L2).
fn whole_and_partial(img: &Img) -> (Vec<Option<u64>>, Vec<Option<u64>>) {
    let full = img.h.size / img.cs();
    let ext = img.h.extended_l2();
    let cb = img.h.cluster_bits;
    let mut whole = vec![None; full as usize];
    let mut partial = vec![None; full as usize];
    for s in img.l2_slots().into_iter().filter(|s| s.cluster < full) {
        let i = s.cluster as usize;
        if s.compressed() {
            whole[i] = Some(CompressedDescriptor::decode(s.raw, cb).host_offset);
        } else if let Some(h) = s.host() {
            let alloc = if ext {
                s.bitmap & ALL
            } else if s.raw & QCOW_OFLAG_ZERO == 0 {
                ALL
            } else {
                0
            };
            if alloc == ALL {
                whole[i] = Some(h);
            } else if alloc & 1 != 0 {
                partial[i] = Some(h);
            }
        }
    }
    (whole, partial)
}

/// Pairs `(from, to)` of guest clusters of `img` sharing host data where `from`
/// is served whole (and `to` maybe not).
fn sharing_pairs(img: &Img) -> Vec<(u64, u64)> {
    let (whole, partial) = whole_and_partial(img);
    let mut pairs = Vec::new();
    for (i, w) in whole.iter().enumerate() {
        for j in 0..whole.len() {
            if w.is_some() && i != j && (whole[j] == *w || partial[j] == *w) {
                pairs.push((i as u64, j as u64));
            }
        }
    }
    pairs
}

/// Whether `x` maps a guest cluster `j` partly over a host cluster it serves whole
/// at an earlier cluster `i`, while `y` serves `i` and `j` whole from one source:
/// the pair of sources at `i` is then the pair at `j` for a cache keyed on host
/// clusters alone (issue 18 C).
fn has_trap(x: &Img, y: &Img) -> bool {
    let ((wx, px), (wy, _)) = (whole_and_partial(x), whole_and_partial(y));
    let n = wx.len().min(wy.len());
    (0..n).any(|j| {
        px[j].is_some() && wy[j].is_some() && (0..j).any(|i| wx[i] == px[j] && wy[i] == wy[j])
    })
}

/// Random 512-byte-aligned runs of zeros, patterns and random bytes.
fn random_runs(rng: &mut Rng, len: u64, cs: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len as usize);
    while (v.len() as u64) < len {
        let n = (512 * (1 + rng.below(2 * cs / 512))).min(len - v.len() as u64) as usize;
        let start = v.len();
        match rng.below(5) {
            0 => v.resize(start + n, 0),
            4 => {
                v.resize(start + n, 0);
                rng.fill(&mut v[start..]);
            }
            k => v.resize(start + n, PATTERNS[k as usize - 1]),
        }
    }
    v
}

/// A random 512-byte-aligned run `(offset, length)` inside `size` bytes.
fn random_run(rng: &mut Rng, size: u64, cs: u64) -> (u64, u64) {
    let off = 512 * rng.below(size / 512);
    (off, (512 * (1 + rng.below(2 * cs / 512))).min(size - off))
}

/// How the second image of a pair is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Second {
    /// `qdedup convert` (deduplicated, maybe compressed) of QEMU's view of the
    /// first, maybe changed: a flipped byte, a cluster copied over another, a
    /// sector rewritten.
    Dedup,
    /// A copy of the first image's file with one more L2 patch.
    Twin,
    /// The first image's file itself under another name (a hard link) in another
    /// directory, whose backing file of the same relative name may differ.
    Relinked,
}

#[test]
fn compare_agrees_with_qemu_img_on_random_images_sharing_host_clusters() {
    const CASES: usize = 80;
    let top = Scratch::new();
    let mut rng = Rng::new(0x18c0);
    let mut sharing = Sharing::default();
    let mut seconds: HashMap<Second, u64> = HashMap::new();
    let (mut identical, mut differing) = (0, 0);
    let (mut skipped_other_file, mut skipped_same_file) = (0, 0);
    let (mut exercised, mut patched) = (0, 0);
    let mut traps = 0;
    for case in 0..CASES {
        let dir = top.subdir(format!("case{case}"));
        let ext = rng.below(5) < 3;
        let sizes: [u64; 2] = if ext {
            [16 << 10, 64 << 10]
        } else {
            [4 << 10, 64 << 10]
        };
        let cs = sizes[rng.below(2) as usize];
        let clusters = 8;
        let tail = if rng.below(4) == 0 {
            512 * (1 + rng.below(cs / 512 - 1))
        } else {
            0
        };
        let size = clusters * cs + tail;
        let zstd = rng.below(2) == 0;

        // The backing file: none, raw or qcow2, sometimes shorter than the image.
        let backing = ["", "raw", "raw", "qcow2"][rng.below(4) as usize];
        let base_len = if rng.below(4) == 0 {
            size / 1024 * 512
        } else {
            size
        };
        let base_name = format!("base.{backing}");
        if !backing.is_empty() {
            let bytes = random_runs(&mut rng, base_len, cs);
            if backing == "raw" {
                write_raw(&dir, &base_name, &bytes);
            } else {
                let src = write_raw(&dir, "base-src.raw", &bytes);
                qcow2_from_raw(&src, &dir.join(&base_name), &[]);
            }
        }
        let opts = format!(
            "cluster_size={cs},extended_l2={},compression_type={}",
            if ext { "on" } else { "off" },
            if zstd { "zstd" } else { "zlib" }
        );
        let mut create = vec!["-o", opts.as_str()];
        if !backing.is_empty() {
            create.extend(["-b", base_name.as_str(), "-F", backing]);
        }
        let size_s = size.to_string();
        let first = create_qcow2(dir.join("a.qcow2"), Some(&size_s), &create);

        // Guest writes: compressed clusters first (QEMU compresses only into
        // unallocated clusters), then data, zeros, unmapped zeros and discards.
        let mut ops = Vec::new();
        let mut fresh: Vec<u64> = (0..clusters).collect();
        for _ in 0..rng.below(4) {
            let c = fresh.remove(rng.below(fresh.len() as u64) as usize);
            let p = PATTERNS[rng.below(3) as usize];
            ops.push(format!("write -c -P {p} {} {cs}", c * cs));
        }
        for _ in 0..3 + rng.below(6) {
            let (off, len) = random_run(&mut rng, size, cs);
            let p = PATTERNS[rng.below(3) as usize];
            ops.push(match rng.below(10) {
                0..=3 => format!("write -P {p} {off} {len}"),
                4 | 5 => format!("write -z {off} {len}"),
                6 => format!("write -z -u {off} {len}"),
                7 => format!("discard {off} {len}"),
                _ => format!("write -P {p} {} {cs}", rng.below(clusters) * cs),
            });
        }
        let ops: Vec<&str> = ops.iter().map(String::as_str).collect();
        qemu_io(&first, &ops);
        let img = Img::open(&first);
        for _ in 0..=rng.below(4) {
            patched += u64::from(share_patch(&img, &mut rng));
        }
        assert_qemu_check_clean(&first);
        sharing.add(&img, !backing.is_empty());

        let mut kinds = vec![Second::Dedup, Second::Twin];
        if !backing.is_empty() {
            kinds.push(Second::Relinked);
        }
        let kind = kinds[rng.below(kinds.len() as u64) as usize];
        let second = match kind {
            Second::Dedup => {
                let view = dir.join("a.raw");
                qemu_raw_view(first.as_os_str(), &view, &[]);
                let mut bytes = std::fs::read(&view).unwrap();
                match rng.below(6) {
                    0 => {}
                    1 => {
                        let at = rng.below(size) as usize;
                        bytes[at] ^= 1 + rng.below(255) as u8;
                    }
                    2..=4 => {
                        // Mostly between two clusters sharing host data in `a`: the
                        // copy makes `b` share where `a`'s bytes may differ.
                        let mut pairs = sharing_pairs(&img);
                        if rng.below(3) != 0 {
                            pairs.retain(|(from, to)| from < to);
                        }
                        let (from, to) = if pairs.is_empty() || rng.below(4) == 0 {
                            (rng.below(clusters), rng.below(clusters))
                        } else {
                            pairs[rng.below(pairs.len() as u64) as usize]
                        };
                        let (from, to) = ((from * cs) as usize, (to * cs) as usize);
                        bytes.copy_within(from..from + cs as usize, to);
                    }
                    _ => {
                        let at = (512 * rng.below(size / 512)) as usize;
                        bytes[at..at + 512].fill(PATTERNS[rng.below(3) as usize]);
                    }
                }
                let raw = write_raw(&dir, "b.raw", &bytes);
                let out = dir.join("b.qcow2");
                let o = match rng.below(4) {
                    0 => format!("cluster_size={cs},compression_type=zlib"),
                    1 => format!("cluster_size={cs},compression_type=zstd"),
                    _ => format!("cluster_size={cs}"),
                };
                let mut extra = vec!["-o", o.as_str()];
                if o.contains("compression") {
                    extra.push("-c");
                }
                convert_json(&extra, &raw, &out);
                out
            }
            Second::Twin => {
                let out = dir.join("b.qcow2");
                std::fs::copy(&first, &out).unwrap();
                let twin = Img::open(&out);
                patched += u64::from(if rng.below(2) == 0 {
                    share_patch(&twin, &mut rng)
                } else {
                    tweak_patch(&twin, &mut rng)
                });
                assert_qemu_check_clean(&out);
                out
            }
            Second::Relinked => {
                let other = dir.join("other");
                std::fs::create_dir(&other).unwrap();
                let out = other.join("a.qcow2");
                std::fs::hard_link(&first, &out).unwrap();
                let base2 = other.join(&base_name);
                std::fs::copy(dir.join(&base_name), &base2).unwrap();
                if rng.below(2) == 0 && base_len > 0 {
                    let at = 512 * rng.below(base_len / 512);
                    let p = PATTERNS[rng.below(3) as usize];
                    if backing == "raw" {
                        let mut bytes = std::fs::read(&base2).unwrap();
                        bytes[at as usize..at as usize + 512].fill(p);
                        std::fs::write(&base2, bytes).unwrap();
                    } else {
                        qemu_io(&base2, &[&format!("write -P {p} {at} 512")]);
                    }
                }
                out
            }
        };
        *seconds.entry(kind).or_default() += 1;

        let (img1, img2) = (Img::open(&first), Img::open(&second));
        traps += u64::from(has_trap(&img1, &img2) || has_trap(&img2, &img1));
        let (left, right) = if rng.below(2) == 0 {
            (&first, &second)
        } else {
            (&second, &first)
        };
        let (theirs, ours) = both_compares(left, right);
        assert_eq!(
            ours,
            theirs,
            "case {case} ({kind:?}, {opts}, backing {backing:?}): {} vs {}",
            left.display(),
            right.display()
        );
        match theirs.0 {
            Some(0) => identical += 1,
            Some(1) => differing += 1,
            other => panic!(
                "case {case}: qemu-img compare exited {other:?}: {}",
                theirs.1
            ),
        }
        let r = library_compare(left, right);
        if kind == Second::Relinked {
            skipped_same_file += r.clusters_skipped_shared;
        } else {
            skipped_other_file += r.clusters_skipped_shared;
        }
        exercised += 1;
    }
    assert_eq!(exercised, CASES);
    eprintln!(
        "{identical} identical, {differing} differing; {seconds:?}; {sharing:?}; \
         skipped {skipped_other_file} (other file) {skipped_same_file} (same file); \
         {traps} traps; {patched} L2 patches"
    );
    // The images really were patched (a patch finds nothing to share on an image
    // without data): on average more than one patch a case.
    assert!(patched as usize > CASES, "only {patched} L2 patches");
    assert!(
        identical >= 5 && differing >= 5,
        "{identical} / {differing}"
    );
    assert!(
        seconds.len() == 3 && seconds.values().all(|n| *n >= 3),
        "{seconds:?}"
    );
    assert!(
        sharing.partial > 0
            && sharing.fall_through > 0
            && sharing.zero_alloc > 0
            && sharing.full > 0
            && sharing.stream > 0
            && sharing.zero_plain > 0,
        "{sharing:?}"
    );
    assert!(skipped_other_file > 0 && skipped_same_file > 0);
    assert!(traps >= 3, "{traps} pairs shaped like issue 18 C");
}
