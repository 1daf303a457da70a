//! Reading a qcow2 image's metadata independently of the code under test, with
//! the format modules only.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use qdedup::format::header::{Header, V3_HEADER_LENGTH};
use qdedup::format::l1l2::{L1Entry, L2Entry};
use qdedup::format::refcount;

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
    pub streams: HashSet<u64>,
    /// Stored refcount of a host cluster index.
    pub refcounts: HashMap<u64, u64>,
}

fn read(f: &File, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    f.read_exact_at(&mut b, off).unwrap();
    b
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b.try_into().unwrap())
}

/// Reads the active L1/L2 tree and the refcounts of every referenced cluster.
pub fn read_layout(path: &Path) -> Layout {
    let f = File::open(path).unwrap();
    let header = Header::decode(&read(&f, 0, V3_HEADER_LENGTH as usize)).unwrap();
    header.validate(f.metadata().unwrap().len()).unwrap();
    let cb = header.cluster_bits;
    let cs = header.cluster_size() as usize;
    let l1 = read(&f, header.l1_table_offset, header.l1_size as usize * 8);
    let mut data_refs = HashMap::new();
    let mut copied = Vec::new();
    let mut compressed = 0;
    let mut compressed_copied = 0;
    let mut stream_refs: HashMap<u64, u64> = HashMap::new();
    let mut streams = HashSet::new();
    for e in l1.chunks_exact(8) {
        let l1e = L1Entry::decode(be64(e));
        if l1e.l2_offset == 0 {
            continue;
        }
        let l2 = read(&f, l1e.l2_offset, cs);
        for e in l2.chunks_exact(8) {
            match L2Entry::decode(be64(e), cb, false) {
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
        let i = (c / epb) as usize * 8;
        let rb = be64(&rt[i..i + 8]);
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
