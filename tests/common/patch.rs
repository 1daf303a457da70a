//! Patching qcow2 files the way QEMU's iotests damage them: one named field at a
//! time. Header fields go by their `qdedup::format::header::off` name; table
//! entries are found through the image's own header and tables, never at
//! hard-coded host offsets.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use qdedup::format::compressed::CompressedDescriptor;
use qdedup::format::extensions::QCOW2_EXT_MAGIC_END;
use qdedup::format::header::{off, Header, V3_HEADER_LENGTH};
use qdedup::format::l1l2::{
    L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED,
};
use qdedup::format::refcount::{self, REFT_OFFSET_MASK};

// ---------------------------------------------------------------- bytes of a file

/// The big-endian number of `width` bytes at `at` of the file `path`.
pub fn read_be(path: &Path, at: u64, width: usize) -> u64 {
    assert!(width <= 8);
    let mut b = [0u8; 8];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut b[8 - width..], at)
        .unwrap();
    u64::from_be_bytes(b)
}

/// Writes `value` big-endian in `width` bytes at `at` of the file `img`.
pub fn patch_be(img: &Path, at: u64, width: usize, value: u64) {
    assert!(width <= 8 && (width == 8 || value >> (8 * width) == 0));
    patch_bytes(img, at, &value.to_be_bytes()[8 - width..]);
}

/// Writes `bytes` at `at` of the file `img` (growing it if they end past its end).
pub fn patch_bytes(img: &Path, at: u64, bytes: &[u8]) {
    let f = OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(bytes, at).unwrap();
}

/// Cuts (or extends with zeros) the file `path` to `len` bytes.
pub fn set_file_len(path: &Path, len: u64) {
    OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Copies the file `from` to `to` and returns `to`.
pub fn copy_file(from: &Path, to: PathBuf) -> PathBuf {
    std::fs::copy(from, &to).unwrap();
    to
}

/// One way of damaging an image, for tables of cases.
pub type Patch = Box<dyn Fn(&Img)>;

/// A copy of the qcow2 image `base` at `to`, changed by `patch`.
pub fn patched_copy(base: &Path, to: PathBuf, patch: impl FnOnce(&Img)) -> PathBuf {
    let p = copy_file(base, to);
    patch(&Img::open(&p));
    p
}

// ---------------------------------------------------------------- the header

/// Width in bytes of the header field at `offset` (one of
/// `qdedup::format::header::off`).
pub fn header_field_width(offset: usize) -> usize {
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

/// Sets the header field at `field` (a `qdedup::format::header::off` constant) of
/// `img` to `value`, in the field's width.
pub fn patch_header(img: &Path, field: usize, value: u64) {
    patch_be(img, field as u64, header_field_width(field), value);
}

/// The header field at `field` (a `qdedup::format::header::off` constant) of
/// `img`, as stored.
pub fn header_field(img: &Path, field: usize) -> u64 {
    read_be(img, field as u64, header_field_width(field))
}

/// The decoded header of `img` (not validated).
pub fn header_of(img: &Path) -> Header {
    let f = File::open(img).unwrap();
    let mut b = vec![0u8; V3_HEADER_LENGTH as usize];
    let n = f.read_at(&mut b, 0).unwrap();
    Header::decode(&b[..n]).unwrap()
}

// ---------------------------------------------------------------- header extensions

/// File offset of the first header extension of `img` (where the header ends).
pub fn extensions_start(img: &Path) -> u64 {
    u64::from(header_of(img).header_length)
}

/// File offset of the header extension of type `kind` of `img` (its type field;
/// its length follows, then its data), if it has one.
pub fn find_extension(img: &Path, kind: u32) -> Option<u64> {
    let mut at = extensions_start(img);
    loop {
        let (k, len) = (read_be(img, at, 4) as u32, read_be(img, at + 4, 4));
        if k == kind {
            return Some(at);
        }
        if k == QCOW2_EXT_MAGIC_END {
            return None;
        }
        at += 8 + len.div_ceil(8) * 8;
    }
}

/// Replaces the header extensions of `img` by one extension of type `kind` with
/// `data`, then the end marker (qemu-img's images keep only a feature name
/// table there, which nothing needs).
pub fn set_only_extension(img: &Path, kind: u32, data: &[u8]) {
    let mut e = Vec::new();
    qdedup::format::extensions::encode(kind, data, &mut e);
    e.extend_from_slice(&[0u8; 8]);
    patch_bytes(img, extensions_start(img), &e);
}

/// File offset of the first non-zero entry of the first bitmap's table in the
/// bitmaps extension of `img` (the bitmap must have a data cluster).
pub fn first_bitmap_table_entry(img: &Path) -> u64 {
    let (_, dir) = super::bitmaps_extension(img);
    // A directory entry starts with its bitmap table's offset.
    let table = read_be(img, dir, 8);
    (0..512)
        .map(|i| table + 8 * i)
        .find(|&at| read_be(img, at, 8) != 0)
        .expect("the bitmap has a data cluster")
}

// ---------------------------------------------------------------- tables

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
        Img {
            path: path.to_path_buf(),
            h: header_of(path),
        }
    }
    pub fn cs(&self) -> u64 {
        self.h.cluster_size()
    }
    pub fn u64_at(&self, off: u64) -> u64 {
        read_be(&self.path, off, 8)
    }
    pub fn put_u64(&self, off: u64, v: u64) {
        patch_be(&self.path, off, 8, v);
    }
    pub fn len(&self) -> u64 {
        std::fs::metadata(&self.path).unwrap().len()
    }
    /// Sets the header field `field` (a `qdedup::format::header::off` constant).
    pub fn set_header(&self, field: usize, value: u64) {
        patch_header(&self.path, field, value);
    }
    /// File offset of active L1 entry `i`.
    pub fn l1_entry(&self, i: u64) -> u64 {
        self.h.l1_table_offset + 8 * i
    }
    /// File offset of the L2 table under active L1 entry `l1i`.
    pub fn l2_table(&self, l1i: u64) -> u64 {
        let l2 = self.u64_at(self.l1_entry(l1i)) & L1E_OFFSET_MASK;
        assert_ne!(l2, 0, "no L2 table under L1 entry {l1i}");
        l2
    }
    /// File offset of L2 entry `i` of the L2 table under L1 entry `l1i`.
    pub fn l2_entry(&self, l1i: u64, i: u64) -> u64 {
        self.l2_table(l1i) + i * self.h.l2_entry_size()
    }
    /// File offset of refcount table entry `i`.
    pub fn reftable_entry(&self, i: u64) -> u64 {
        self.h.refcount_table_offset + 8 * i
    }
    /// (file offset of the slot's refcount block, the block bytes) for `cluster`.
    pub fn refblock_of(&self, cluster: u64) -> (u64, Vec<u8>) {
        let epb = refcount::entries_per_block(self.h.cluster_bits, self.h.refcount_order);
        let off = self.u64_at(self.reftable_entry(cluster / epb)) & REFT_OFFSET_MASK;
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
        patch_bytes(&self.path, off, &b);
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
