//! `checksum`: blkhash digests of an image's guest content, as `blksum` prints
//! them.
//!
//! # The construction (blkhash ≥ 0.10.1)
//!
//! The guest content (the virtual disk as QEMU reads it, backing chain included)
//! is cut into blocks of `B` bytes (default [`BLOCK_SIZE`], 64 KiB); the last
//! block may be short and is hashed as it is. With one hash function `H`
//! (sha256 or BLAKE3, 32 bytes each):
//!
//! ```text
//! D(b)   = H(b)                                   (a block's digest)
//! digest = H(D(b0) ‖ D(b1) ‖ … ‖ D(bn−1) ‖ le64(length))
//! ```
//!
//! where `length` is the number of guest bytes (the virtual size) as a
//! little-endian u64. An empty disk has the digest `H(le64(0))`. A full block of
//! zeros has the digest of `B` zero bytes, computed once and used without
//! reading. This is the "flat" construction of blkhash 0.10.1 and later (blkhash
//! 0.8 and 0.9 spread the blocks over several streams and give other digests).
//!
//! # What is read
//!
//! [`checksum`] walks the image layer by layer: zero and unallocated clusters
//! are not read; a block whose bytes come from the same host bytes as an earlier
//! block (a host cluster that several guest clusters share, in a deduplicated
//! image; a compressed stream shared likewise) is hashed once and its digest
//! reused; a compressed cluster is decompressed once per worker. Blocks are
//! hashed on every core; the digests are then combined in guest order.
//!
//! `convert` computes the same digest of its input from the data it reads
//! anyway ([`ConvertChecksum`]), so `qdedup checksum OUT` can confirm the output
//! later without the input.
//!
//! ```
//! use qdedup::checksum::{Algorithm, BlockHash, BLOCK_SIZE};
//! let mut h = BlockHash::new(Algorithm::Sha256, BLOCK_SIZE)?;
//! h.update(b"hello");
//! h.zeros(1 << 20);
//! let digest = h.finish();
//! assert_eq!(digest.len(), 32);
//! # Ok::<(), qdedup::Error>(())
//! ```

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::bounded;
use serde::Serialize;
use sha2::Digest as _;

use crate::convert::options::ProgressFn;
use crate::error::{Error, Result};
use crate::image::refcounts::{Refcounts, Stored};
use crate::source::chain::{open_layers, Layer, LayerKind};
use crate::source::qcow2::LayerExtent;
use crate::source::{BlockStatus, OpenOptions, Source};
use crate::writer::batch::{Batch, Kind};

/// blkhash's default block size: 64 KiB.
pub const BLOCK_SIZE: u64 = 64 << 10;
/// Smallest block size taken (blksum takes multiples of the page size).
pub const MIN_BLOCK_SIZE: u64 = 4 << 10;
/// Largest block size taken (each worker holds one block in memory).
pub const MAX_BLOCK_SIZE: u64 = 64 << 20;

/// A block digest or a root digest: 32 bytes for both algorithms.
pub type BlockDigest = [u8; 32];

/// The hash function `H`, named as `blksum -d` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Algorithm {
    /// SHA-256 (blksum's default).
    #[default]
    Sha256,
    /// BLAKE3 (256-bit output).
    Blake3,
}

impl Algorithm {
    /// The name `blksum -d` takes.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Blake3 => "blake3",
        }
    }

    /// `H(data)`.
    pub fn hash(self, data: &[u8]) -> BlockDigest {
        match self {
            Algorithm::Sha256 => sha2::Sha256::digest(data).into(),
            Algorithm::Blake3 => *blake3::hash(data).as_bytes(),
        }
    }

    fn hasher(self) -> Hasher {
        match self {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Blake3 => Hasher::Blake3(Box::new(blake3::Hasher::new())),
        }
    }
}

impl std::str::FromStr for Algorithm {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "sha256" => Ok(Algorithm::Sha256),
            "blake3" => Ok(Algorithm::Blake3),
            other => Err(Error::InvalidArgument(format!(
                "unknown digest {other:?} (expected sha256 or blake3)"
            ))),
        }
    }
}

/// The root hash, fed block digests in guest order.
enum Hasher {
    Sha256(sha2::Sha256),
    Blake3(Box<blake3::Hasher>),
}

impl Hasher {
    fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Blake3(h) => {
                h.update(data);
            }
        }
    }

    fn finish(self) -> BlockDigest {
        match self {
            Hasher::Sha256(h) => h.finalize().into(),
            Hasher::Blake3(h) => *h.finalize().as_bytes(),
        }
    }
}

/// The digest of a [`BLOCK_SIZE`] block of zeros (computed once).
pub fn zero_block_digest(alg: Algorithm) -> BlockDigest {
    static DIGESTS: std::sync::OnceLock<[BlockDigest; 2]> = std::sync::OnceLock::new();
    let d = DIGESTS.get_or_init(|| {
        let zeros = vec![0u8; BLOCK_SIZE as usize];
        [
            Algorithm::Sha256.hash(&zeros),
            Algorithm::Blake3.hash(&zeros),
        ]
    });
    match alg {
        Algorithm::Sha256 => d[0],
        Algorithm::Blake3 => d[1],
    }
}

/// Checks a block size: a multiple of 4 KiB from [`MIN_BLOCK_SIZE`] to
/// [`MAX_BLOCK_SIZE`].
pub fn check_block_size(block_size: u64) -> Result<()> {
    if !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) || block_size % MIN_BLOCK_SIZE != 0
    {
        return Err(Error::InvalidArgument(format!(
            "block size {block_size}: give a multiple of 4 KiB from 4 KiB to 64 MiB \
             (blkhash's default is 64 KiB)"
        )));
    }
    Ok(())
}

/// A blkhash computed as the guest content streams by, in guest order: bytes
/// ([`update`](Self::update)), known zeros ([`zeros`](Self::zeros)) and digests
/// of whole blocks hashed elsewhere ([`block`](Self::block)).
pub struct BlockHash {
    alg: Algorithm,
    block_size: u64,
    zero_digest: BlockDigest,
    root: Hasher,
    /// Bytes of the current, unfinished block.
    pending: Vec<u8>,
    length: u64,
}

impl std::fmt::Debug for BlockHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockHash")
            .field("algorithm", &self.alg)
            .field("block_size", &self.block_size)
            .field("length", &self.length)
            .finish_non_exhaustive()
    }
}

impl BlockHash {
    /// A new hash; `block_size` as [`check_block_size`] takes it.
    pub fn new(alg: Algorithm, block_size: u64) -> Result<Self> {
        check_block_size(block_size)?;
        let zero_digest = if block_size == BLOCK_SIZE {
            zero_block_digest(alg)
        } else {
            // ≤ 64 MiB: fits usize.
            alg.hash(&vec![0u8; block_size as usize])
        };
        Ok(BlockHash {
            alg,
            block_size,
            zero_digest,
            root: alg.hasher(),
            pending: Vec::new(),
            length: 0,
        })
    }

    /// The digest of a full block of zeros.
    pub fn zero_digest(&self) -> BlockDigest {
        self.zero_digest
    }

    /// Guest bytes taken so far.
    pub fn length(&self) -> u64 {
        self.length
    }

    /// Whether the bytes taken so far end on a block boundary.
    pub fn aligned(&self) -> bool {
        self.pending.is_empty()
    }

    fn block_bytes(&self) -> usize {
        self.block_size as usize
    }

    /// Adds guest bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        self.length += data.len() as u64;
        let bs = self.block_bytes();
        if !self.pending.is_empty() {
            let take = (bs - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() == bs {
                let d = self.alg.hash(&self.pending);
                self.root.update(&d);
                self.pending.clear();
            }
        }
        while data.len() >= bs {
            let d = self.alg.hash(&data[..bs]);
            self.root.update(&d);
            data = &data[bs..];
        }
        self.pending.extend_from_slice(data);
    }

    /// Adds `len` guest bytes of zeros (full blocks without hashing them).
    pub fn zeros(&mut self, mut len: u64) {
        let bs = self.block_size;
        if !self.pending.is_empty() {
            let take = (bs - self.pending.len() as u64).min(len);
            // take < block size: fits usize.
            let zeros = vec![0u8; take as usize];
            self.update(&zeros);
            len -= take;
        }
        self.length += len / bs * bs;
        for _ in 0..len / bs {
            let d = self.zero_digest;
            self.root.update(&d);
        }
        let rest = len % bs;
        if rest > 0 {
            self.update(&vec![0u8; rest as usize]);
        }
    }

    /// Adds a block of `len` bytes (a full block, or the short last one) whose
    /// digest was computed elsewhere. The bytes taken so far must end on a
    /// block boundary.
    pub fn block(&mut self, digest: &BlockDigest, len: u64) -> Result<()> {
        if !self.aligned() || len == 0 || len > self.block_size {
            return Err(Error::InvalidArgument(format!(
                "a block digest of {len} bytes at guest offset {} is not a block",
                self.length
            )));
        }
        self.root.update(digest);
        self.length += len;
        Ok(())
    }

    /// The digest: the pending short block is hashed, then the length is added.
    pub fn finish(mut self) -> BlockDigest {
        if !self.pending.is_empty() {
            let d = self.alg.hash(&self.pending);
            self.root.update(&d);
        }
        self.root.update(&self.length.to_le_bytes());
        self.root.finish()
    }
}

/// Lower-case hex, as `blksum` and `sha256sum` print digests.
pub fn to_hex(d: &BlockDigest) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(64);
    for b in d {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Options of [`checksum`].
#[derive(Clone)]
pub struct ChecksumOptions {
    /// The hash function (default sha256, as blksum).
    pub algorithm: Algorithm,
    /// Block size (default [`BLOCK_SIZE`]; another size gives another digest).
    pub block_size: u64,
    /// How the image is opened (format probed by default, through its backing
    /// chain, QEMU's read locks; a snapshot's view with `snapshot`). The backing
    /// chain is always read: the digest is of the guest view.
    pub input: OpenOptions,
    /// Hashing threads (default: available cores; 0 hashes on the calling thread).
    pub workers: usize,
    /// Called with (guest bytes done, guest bytes total).
    pub progress: Option<Arc<ProgressFn>>,
    /// Set from outside to stop: the call fails with [`Error::Interrupted`].
    pub cancel: Option<Arc<AtomicBool>>,
}

impl Default for ChecksumOptions {
    fn default() -> Self {
        ChecksumOptions {
            algorithm: Algorithm::default(),
            block_size: BLOCK_SIZE,
            input: OpenOptions::default(),
            workers: std::thread::available_parallelism().map_or(2, std::num::NonZero::get),
            progress: None,
            cancel: None,
        }
    }
}

impl std::fmt::Debug for ChecksumOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChecksumOptions")
            .field("algorithm", &self.algorithm)
            .field("block_size", &self.block_size)
            .field("input", &self.input)
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

/// The digest of one image, for humans (`Display`: `DIGEST  IMAGE`, as blksum
/// and sha256sum print it) and JSON.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ChecksumReport {
    /// The image as named (empty for [`checksum_source`]).
    pub image: String,
    /// The digest in lower-case hex.
    pub checksum: String,
    /// The hash function's name ("sha256" or "blake3").
    pub algorithm: String,
    /// Block size.
    pub block_size: u64,
    /// Guest bytes hashed (the virtual size).
    pub virtual_size: u64,
    /// Blocks (the last one may be short).
    pub blocks: u64,
    /// Blocks known to be zeros without reading them.
    pub zero_blocks: u64,
    /// Blocks read (and hashed, except a full block that reads as zeros: it
    /// takes the zero-block digest).
    pub hashed_blocks: u64,
    /// Blocks whose digest was reused: their bytes are host bytes an earlier
    /// block was hashed from (shared clusters of a deduplicated image).
    pub reused_blocks: u64,
    /// Guest bytes read (zero ranges are not read).
    pub bytes_read: u64,
    /// Wall time in seconds.
    pub seconds: f64,
}

impl std::fmt::Display for ChecksumReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}  {}", self.checksum, self.image)
    }
}

/// Where one run of a block's bytes comes from; two blocks made of equal
/// pieces (with equal lengths) hold equal bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Piece {
    /// Reads as zeros.
    Zero,
    /// Plain data of a layer, at this host offset of its file.
    Data { layer: u32, host: u64 },
    /// Bytes of a compressed cluster of a layer: the stream at `host` (`len`
    /// bytes read), from byte `at` of the decompressed cluster.
    Compressed {
        layer: u32,
        host: u64,
        len: u64,
        at: u64,
    },
    /// Data read by guest offset from a raw layer (or from a source known only
    /// by its guest view): never shared.
    Guest { layer: u32 },
}

/// The image as [`checksum`] reads it: layer by layer (host offsets known), or a
/// source known by its guest view alone.
enum View<'a> {
    Layers(&'a [Layer]),
    Source(&'a dyn Source),
}

impl View<'_> {
    fn size(&self) -> u64 {
        match self {
            View::Layers(l) => l[0].size(),
            View::Source(s) => s.virtual_size(),
        }
    }

    /// The piece at guest `offset` (< size) and its length (1..=`max_len`).
    fn piece(&self, offset: u64, max_len: u64) -> Result<(Piece, u64)> {
        let layers = match self {
            View::Source(s) => {
                let (st, len) = s.block_status(offset, max_len)?;
                let len = len.clamp(1, max_len);
                return Ok(match st {
                    BlockStatus::Zero => (Piece::Zero, len),
                    BlockStatus::Data => (Piece::Guest { layer: 0 }, len),
                });
            }
            View::Layers(l) => l,
        };
        let mut bytes = max_len;
        for (i, layer) in layers.iter().enumerate() {
            if offset >= layer.size() {
                // Past the end of a shorter backing file: zeros.
                return Ok((Piece::Zero, bytes));
            }
            let (ext, len) = layer.extent(offset, bytes)?;
            bytes = len.clamp(1, bytes);
            // A chain has at most MAX_CHAIN_DEPTH (64) layers.
            let layer_no = i as u32;
            match ext {
                LayerExtent::Unallocated { .. } => {}
                LayerExtent::Zero { .. } => return Ok((Piece::Zero, bytes)),
                LayerExtent::Data { host } => match layer.kind {
                    LayerKind::Raw(_) => return Ok((Piece::Guest { layer: layer_no }, bytes)),
                    LayerKind::Qcow2(_) => {
                        return Ok((
                            Piece::Data {
                                layer: layer_no,
                                host,
                            },
                            bytes,
                        ))
                    }
                },
                LayerExtent::Compressed { host, len } => {
                    let cs = layer.source().cluster_size().unwrap_or(1);
                    return Ok((
                        Piece::Compressed {
                            layer: layer_no,
                            host,
                            len,
                            at: offset % cs,
                        },
                        bytes,
                    ));
                }
            }
        }
        Ok((Piece::Zero, bytes))
    }

    /// Reads guest bytes `[offset, offset + buf.len())` of the piece `p`.
    fn read(&self, p: Piece, buf: &mut [u8], offset: u64, cache: &mut Decompressed) -> Result<()> {
        match (self, p) {
            (_, Piece::Zero) => {
                buf.fill(0);
                Ok(())
            }
            (View::Source(s), _) => s.read_at(buf, offset),
            (View::Layers(l), Piece::Guest { layer } | Piece::Data { layer, .. }) => {
                l[layer as usize].source().read_at(buf, offset)
            }
            (
                View::Layers(l),
                Piece::Compressed {
                    layer, host, len, ..
                },
            ) => {
                let src = l[layer as usize].source();
                let cs = src.cluster_size().unwrap_or(1);
                let start = offset - offset % cs;
                let n = cs.min(src.virtual_size() - start);
                let key = (layer, host, len);
                if cache.key != Some(key) {
                    // n ≤ cluster size ≤ 2 MiB.
                    cache.data.resize(n as usize, 0);
                    src.read_at(&mut cache.data, start)?;
                    cache.key = Some(key);
                    cache.clusters += 1;
                }
                let at = (offset - start) as usize;
                buf.copy_from_slice(&cache.data[at..at + buf.len()]);
                Ok(())
            }
        }
    }
}

/// A worker's last decompressed cluster.
#[derive(Default)]
struct Decompressed {
    key: Option<(u32, u64, u64)>,
    data: Vec<u8>,
    clusters: u64,
}

/// One planned block or run.
enum Entry {
    /// Zeros: whole zero blocks, or the short last block.
    Zeros(u64),
    /// A block hashed from the job's pieces `pieces` (guest `offset`, `len`
    /// bytes); its digest goes to `slot` when later blocks reuse it.
    Read {
        offset: u64,
        len: u64,
        pieces: std::ops::Range<usize>,
        slot: Option<u32>,
        digest: BlockDigest,
    },
    /// A block of `len` bytes equal to the block remembered in `slot`.
    Reuse { slot: u32, len: u64 },
}

/// A run of planned blocks: planned in order under a lock, hashed by one worker.
#[derive(Default)]
struct Job {
    seq: u64,
    end: u64,
    entries: Vec<Entry>,
    pieces: Vec<(Piece, u64)>,
    bytes_read: u64,
    error: Option<Error>,
}

/// Data bytes a job plans before it may end.
const JOB_BYTES: u64 = 4 << 20;
/// Jobs end on a multiple of this (the largest cluster size), so that a
/// compressed cluster is not decompressed by two workers.
const JOB_ALIGN: u64 = 2 << 20;

/// Plans jobs: classifies each block by its pieces.
struct Planner<'a> {
    view: &'a View<'a>,
    bs: u64,
    size: u64,
    pos: u64,
    seq: u64,
    /// Blocks seen whose bytes may appear again: their pieces → slot.
    seen: HashMap<Box<[(Piece, u64)]>, u32>,
    /// Each layer's refcounts (`None`: not qcow2, or unreadable).
    refcounts: Vec<Option<Refcounts>>,
    next_slot: u32,
    failed: bool,
}

impl Planner<'_> {
    fn plan(&mut self, job: &mut Job) -> Result<bool> {
        let r = self.plan_inner(job);
        if r.is_err() {
            self.failed = true;
        }
        r
    }

    fn plan_inner(&mut self, job: &mut Job) -> Result<bool> {
        if self.failed || self.pos >= self.size {
            return Ok(false);
        }
        job.entries.clear();
        job.pieces.clear();
        job.bytes_read = 0;
        job.error = None;
        let (bs, size) = (self.bs, self.size);
        let mut data = 0u64;
        let mut one = Vec::new();
        while self.pos < size {
            if data >= JOB_BYTES * 16 || (data >= JOB_BYTES && self.pos % JOB_ALIGN == 0) {
                break;
            }
            let pos = self.pos;
            let (p, len) = self.view.piece(pos, size - pos)?;
            if p == Piece::Zero {
                // Whole zero blocks, or the zero tail of the disk.
                let n = if pos + len == size {
                    size - pos
                } else {
                    len / bs * bs
                };
                if n > 0 {
                    match job.entries.last_mut() {
                        Some(Entry::Zeros(z)) => *z += n,
                        _ => job.entries.push(Entry::Zeros(n)),
                    }
                    self.pos += n;
                    continue;
                }
            }
            // One block: its pieces.
            let blen = bs.min(size - pos);
            one.clear();
            one.push((p, len.min(blen)));
            let mut off = pos + len.min(blen);
            while off < pos + blen {
                let (p, len) = self.view.piece(off, pos + blen - off)?;
                match one.last_mut() {
                    Some((Piece::Zero, l)) if p == Piece::Zero => *l += len,
                    _ => one.push((p, len)),
                }
                off += len;
            }
            self.pos += blen;
            if one.iter().all(|(p, _)| *p == Piece::Zero) {
                match job.entries.last_mut() {
                    Some(Entry::Zeros(z)) => *z += blen,
                    _ => job.entries.push(Entry::Zeros(blen)),
                }
                continue;
            }
            data += blen;
            let shareable = self.may_repeat(&one);
            if shareable {
                if let Some(&slot) = self.seen.get(one.as_slice()) {
                    job.entries.push(Entry::Reuse { slot, len: blen });
                    continue;
                }
            }
            let slot = if shareable {
                let s = self.next_slot;
                self.next_slot = s
                    .checked_add(1)
                    .ok_or_else(|| Error::LimitExceeded("more than 2^32 distinct blocks".into()))?;
                self.seen.insert(one.clone().into_boxed_slice(), s);
                Some(s)
            } else {
                None
            };
            let start = job.pieces.len();
            job.pieces.extend_from_slice(&one);
            job.entries.push(Entry::Read {
                offset: pos,
                len: blen,
                pieces: start..job.pieces.len(),
                slot,
                digest: [0; 32],
            });
        }
        job.end = self.pos;
        job.seq = self.seq;
        self.seq += 1;
        Ok(true)
    }
}

impl Planner<'_> {
    /// Whether another block may be made of the same pieces: not where a piece is
    /// read by guest offset (raw), nor where a plain piece lies in a host cluster
    /// whose stored refcount is below 2 (no other L2 entry points there). The
    /// refcounts only save memory: a stale one (a dirty image) costs a read, never
    /// a wrong digest, since equal pieces are equal bytes whatever the refcounts.
    fn may_repeat(&mut self, pieces: &[(Piece, u64)]) -> bool {
        let View::Layers(layers) = self.view else {
            return false;
        };
        for &(p, len) in pieces {
            let (layer, host) = match p {
                Piece::Guest { .. } => return false,
                Piece::Zero | Piece::Compressed { .. } => continue,
                Piece::Data { layer, host } => (layer as usize, host),
            };
            let LayerKind::Qcow2(q) = &layers[layer].kind else {
                return false;
            };
            let Some(rc) = self.refcounts.get_mut(layer).and_then(Option::as_mut) else {
                continue;
            };
            let bits = q.header().cluster_bits;
            // A piece lies inside the file (the mapper checked it): no overflow.
            for c in host >> bits..=(host + len - 1) >> bits {
                if let Ok(Stored::Count(n)) = rc.get(q.file(), c) {
                    if n < 2 {
                        return false;
                    }
                }
            }
        }
        true
    }
}

/// How the workers hash a block.
struct Hashing {
    alg: Algorithm,
    /// Block size (≤ [`MAX_BLOCK_SIZE`]).
    block_size: usize,
    /// The digest of a full block of zeros.
    zero: BlockDigest,
}

/// Reads and hashes the blocks of a planned job.
fn hash_job(
    view: &View<'_>,
    how: &Hashing,
    job: &mut Job,
    buf: &mut Vec<u8>,
    cache: &mut Decompressed,
) -> Result<()> {
    let Job {
        entries,
        pieces,
        bytes_read,
        ..
    } = job;
    for e in entries.iter_mut() {
        let Entry::Read {
            offset,
            len,
            pieces: range,
            digest,
            ..
        } = e
        else {
            continue;
        };
        // len ≤ block size ≤ 64 MiB.
        buf.resize(*len as usize, 0);
        let mut at = 0usize;
        for &(p, plen) in &pieces[range.clone()] {
            let chunk = &mut buf[at..at + plen as usize];
            view.read(p, chunk, *offset + at as u64, cache)?;
            if p != Piece::Zero {
                *bytes_read += plen;
            }
            at += plen as usize;
        }
        // A full block of zeros read from data (a dense raw file, zeros
        // written into a qcow2 image): its digest is known.
        *digest = if buf.len() == how.block_size && crate::dedup::is_zero(buf) {
            how.zero
        } else {
            how.alg.hash(buf)
        };
    }
    Ok(())
}

/// Counters of a run.
#[derive(Default)]
struct Counts {
    zero_blocks: u64,
    hashed_blocks: u64,
    reused_blocks: u64,
    bytes_read: u64,
}

/// Adds a hashed job to the digest, in guest order.
fn accumulate(
    h: &mut BlockHash,
    job: &Job,
    slots: &mut Vec<BlockDigest>,
    counts: &mut Counts,
) -> Result<()> {
    let bs = h.block_size;
    for e in &job.entries {
        match e {
            Entry::Zeros(n) => {
                counts.zero_blocks += n.div_ceil(bs);
                h.zeros(*n);
            }
            Entry::Read {
                len, slot, digest, ..
            } => {
                counts.hashed_blocks += 1;
                h.block(digest, *len)?;
                if slot.is_some() {
                    slots.push(*digest);
                }
            }
            Entry::Reuse { slot, len } => {
                counts.reused_blocks += 1;
                let d = *slots.get(*slot as usize).ok_or_else(|| {
                    Error::InvalidArgument(format!("block slot {slot} used before it was hashed"))
                })?;
                h.block(&d, *len)?;
            }
        }
    }
    counts.bytes_read += job.bytes_read;
    Ok(())
}

fn cancelled(opts: &ChecksumOptions) -> bool {
    opts.cancel
        .as_ref()
        .is_some_and(|c| c.load(Ordering::Relaxed))
}

/// Computes the digest of `view` (planning under a lock, hashing on
/// `opts.workers` threads, combining in guest order on this one).
fn run(view: &View<'_>, opts: &ChecksumOptions, image: String) -> Result<ChecksumReport> {
    let start = Instant::now();
    let mut h = BlockHash::new(opts.algorithm, opts.block_size)?;
    let size = view.size();
    let planner = Mutex::new(Planner {
        view,
        bs: opts.block_size,
        size,
        pos: 0,
        seq: 0,
        seen: HashMap::new(),
        refcounts: match view {
            View::Layers(layers) => layers
                .iter()
                .map(|l| match &l.kind {
                    LayerKind::Qcow2(q) => Refcounts::load(q.file(), q.header()).ok(),
                    LayerKind::Raw(_) => None,
                })
                .collect(),
            View::Source(_) => Vec::new(),
        },
        next_slot: 0,
        failed: false,
    });
    let mut slots = Vec::new();
    let mut counts = Counts::default();
    let how = Hashing {
        alg: opts.algorithm,
        // ≤ MAX_BLOCK_SIZE: fits usize.
        block_size: opts.block_size as usize,
        zero: h.zero_digest(),
    };
    let how = &how;
    if opts.workers == 0 {
        let (mut job, mut buf, mut cache) = (Job::default(), Vec::new(), Decompressed::default());
        while planner.lock().expect("not poisoned").plan(&mut job)? {
            if cancelled(opts) {
                return Err(Error::Interrupted);
            }
            hash_job(view, how, &mut job, &mut buf, &mut cache)?;
            accumulate(&mut h, &job, &mut slots, &mut counts)?;
            if let Some(p) = &opts.progress {
                p(job.end, size);
            }
        }
    } else {
        let workers = opts.workers;
        let (done_tx, done_rx) = bounded::<Job>(2 * workers);
        let stop = AtomicBool::new(false);
        let mut first_error = None;
        std::thread::scope(|s| {
            for _ in 0..workers {
                let done_tx = done_tx.clone();
                let (planner, stop) = (&planner, &stop);
                std::thread::Builder::new()
                    .name("qdedup-sum".into())
                    .spawn_scoped(s, move || {
                        let (mut buf, mut cache) = (Vec::new(), Decompressed::default());
                        loop {
                            if stop.load(Ordering::Relaxed) {
                                break;
                            }
                            let mut job = Job::default();
                            if cancelled(opts) {
                                job.error = Some(Error::Interrupted);
                                let _ = done_tx.send(job);
                                break;
                            }
                            match planner.lock().expect("not poisoned").plan(&mut job) {
                                Ok(true) => {}
                                Ok(false) => break,
                                Err(e) => {
                                    job.error = Some(e);
                                    let _ = done_tx.send(job);
                                    break;
                                }
                            }
                            if let Err(e) = hash_job(view, how, &mut job, &mut buf, &mut cache) {
                                job.error = Some(e);
                            }
                            if done_tx.send(job).is_err() {
                                break;
                            }
                        }
                    })
                    .expect("cannot spawn a checksum thread");
            }
            drop(done_tx);
            let mut pending: BTreeMap<u64, Job> = BTreeMap::new();
            let mut next = 0u64;
            'recv: while let Ok(mut job) = done_rx.recv() {
                if let Some(e) = job.error.take() {
                    first_error = Some(e);
                    break;
                }
                pending.insert(job.seq, job);
                while let Some(job) = pending.remove(&next) {
                    if let Err(e) = accumulate(&mut h, &job, &mut slots, &mut counts) {
                        first_error = Some(e);
                        break 'recv;
                    }
                    next += 1;
                    if let Some(p) = &opts.progress {
                        p(job.end, size);
                    }
                }
            }
            stop.store(true, Ordering::SeqCst);
            drop(done_rx);
        });
        if let Some(e) = first_error {
            return Err(e);
        }
    }
    let len = h.length();
    if len != size {
        return Err(Error::InvalidArgument(format!(
            "hashed {len} bytes of a {size}-byte disk"
        )));
    }
    let digest = h.finish();
    Ok(ChecksumReport {
        image,
        checksum: to_hex(&digest),
        algorithm: opts.algorithm.name().to_string(),
        block_size: opts.block_size,
        virtual_size: size,
        blocks: size.div_ceil(opts.block_size),
        zero_blocks: counts.zero_blocks,
        hashed_blocks: counts.hashed_blocks,
        reused_blocks: counts.reused_blocks,
        bytes_read: counts.bytes_read,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The blkhash digest of the guest content of the image at `path` (opened as
/// `opts.input` says, always through its backing chain).
pub fn checksum(path: &Path, opts: &ChecksumOptions) -> Result<ChecksumReport> {
    check_block_size(opts.block_size)?;
    let input = OpenOptions {
        backing_chain: true,
        ..opts.input.clone()
    };
    let layers = open_layers(path, &input)?;
    run(&View::Layers(&layers), opts, path.display().to_string())
}

/// The blkhash digest of any source's guest content (zero runs by
/// [`Source::block_status`]; no host offsets known, so nothing is shared).
pub fn checksum_source(src: &dyn Source, opts: &ChecksumOptions) -> Result<ChecksumReport> {
    check_block_size(opts.block_size)?;
    run(&View::Source(src), opts, String::new())
}

/// The blkhash digest `convert` computes of its input, from the batches its
/// pipeline reads anyway (in guest order, with the gaps of zeros between them).
///
/// With BLAKE3 and a cluster size equal to the block size, a full cluster's
/// digest is the BLAKE3 hash the pipeline computed for deduplication; otherwise
/// the workers compute the digest of each whole block inside a batch
/// ([`block_digests`]) and only the blocks that straddle batches are hashed here.
#[derive(Debug)]
pub struct ConvertChecksum {
    h: BlockHash,
    cs: u64,
    size: u64,
}

impl ConvertChecksum {
    /// A digest of a disk of `size` bytes read in clusters of `cs` bytes, with
    /// blocks of [`BLOCK_SIZE`].
    pub fn new(alg: Algorithm, cs: u64, size: u64) -> Result<Self> {
        Ok(ConvertChecksum {
            h: BlockHash::new(alg, BLOCK_SIZE)?,
            cs,
            size,
        })
    }

    /// Whether the cluster hashes are the block digests.
    fn from_cluster_hashes(alg: Algorithm, cs: u64) -> bool {
        alg == Algorithm::Blake3 && cs == BLOCK_SIZE
    }

    /// Adds a processed batch (batches come in guest order).
    pub fn batch(&mut self, b: &Batch) -> Result<()> {
        let (cs, size) = (self.cs, self.size);
        let start = b.first_cluster * cs;
        let end = (start + b.kinds.len() as u64 * cs).min(size);
        let pos = self.h.length();
        if start < pos {
            return Err(Error::InvalidArgument(format!(
                "batch at {start:#x} before the checksum position {pos:#x}"
            )));
        }
        self.h.zeros(start - pos);
        if start >= end {
            return Ok(());
        }
        // The batch's guest range [start, end) lies in its buffer (end - start
        // ≤ the buffer's length).
        let data = &b.data[..(end - start) as usize];
        if Self::from_cluster_hashes(self.h.alg, cs) {
            for (i, k) in b.kinds.iter().enumerate() {
                let off = i as u64 * cs;
                if start + off >= end {
                    break;
                }
                let len = cs.min(end - start - off);
                match k {
                    Kind::Data { hash, .. } if len == cs && self.h.aligned() => {
                        self.h.block(hash, cs)?;
                    }
                    // Zeros of the source (a zero-flag entry of an overlay too).
                    Kind::Zero | Kind::Unprocessed | Kind::ZeroFlag => self.h.zeros(len),
                    // Data (equal to an overlay's backing file or not, the
                    // batch holds the source's bytes).
                    Kind::Data { .. } | Kind::Backing => {
                        self.h.update(&data[off as usize..(off + len) as usize]);
                    }
                }
            }
            return Ok(());
        }
        let bs = BLOCK_SIZE;
        let first = start.div_ceil(bs) * bs;
        let full = if first < end { (end - first) / bs } else { 0 };
        if full == 0 || b.block_digests.len() as u64 != full {
            self.h.update(data);
            return Ok(());
        }
        self.h.update(&data[..(first - start) as usize]);
        for d in &b.block_digests {
            self.h.block(d, bs)?;
        }
        self.h.update(&data[(first - start + full * bs) as usize..]);
        Ok(())
    }

    /// The digest of the whole disk (zeros after the last batch).
    pub fn finish(mut self) -> BlockDigest {
        let pos = self.h.length();
        self.h.zeros(self.size.saturating_sub(pos));
        self.h.finish()
    }
}

/// The worker's share of [`ConvertChecksum`]: the digest of every whole block
/// inside the batch (`cs`: cluster size, `size`: virtual size), into
/// `b.block_digests`; nothing where the cluster hashes serve.
pub fn block_digests(alg: Algorithm, b: &mut Batch, cs: u64, size: u64) {
    b.block_digests.clear();
    if ConvertChecksum::from_cluster_hashes(alg, cs) {
        return;
    }
    let bs = BLOCK_SIZE;
    let start = b.first_cluster * cs;
    let end = (start + b.kinds.len() as u64 * cs).min(size);
    let first = start.div_ceil(bs) * bs;
    if first >= end {
        return;
    }
    let zero = zero_block_digest(alg);
    let mut off = first;
    while off + bs <= end {
        let block = &b.data[(off - start) as usize..(off - start + bs) as usize];
        b.block_digests.push(if crate::dedup::is_zero(block) {
            zero
        } else {
            alg.hash(block)
        });
        off += bs;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference: hash every block, then the length.
    fn reference(alg: Algorithm, bs: usize, data: &[u8]) -> BlockDigest {
        let mut root = alg.hasher();
        for b in data.chunks(bs) {
            root.update(&alg.hash(b));
        }
        root.update(&(data.len() as u64).to_le_bytes());
        root.finish()
    }

    #[test]
    fn empty_input_hashes_the_length_alone() {
        let h = BlockHash::new(Algorithm::Sha256, BLOCK_SIZE).unwrap();
        assert_eq!(h.finish(), Algorithm::Sha256.hash(&0u64.to_le_bytes()));
    }

    #[test]
    fn streaming_in_any_pieces_equals_the_reference() {
        let mut data = vec![0u8; 300_000];
        for (i, b) in data.iter_mut().enumerate().skip(70_000).take(90_000) {
            *b = (i % 251) as u8;
        }
        for alg in [Algorithm::Sha256, Algorithm::Blake3] {
            let want = reference(alg, BLOCK_SIZE as usize, &data);
            let mut cases = 0;
            for step in [1000usize, 4096, 65536, 100_000] {
                let mut h = BlockHash::new(alg, BLOCK_SIZE).unwrap();
                for c in data.chunks(step) {
                    if c.iter().all(|b| *b == 0) {
                        h.zeros(c.len() as u64);
                    } else {
                        h.update(c);
                    }
                }
                assert_eq!(h.finish(), want, "{alg:?} in chunks of {step}");
                cases += 1;
            }
            assert_eq!(cases, 4);
        }
    }

    /// A disk in memory; runs of 4 KiB zeros are reported as zero.
    struct Mem(Vec<u8>);

    impl Source for Mem {
        fn virtual_size(&self) -> u64 {
            self.0.len() as u64
        }
        fn block_status(&self, offset: u64, max_len: u64) -> Result<(BlockStatus, u64)> {
            let end = (offset + max_len).min(self.virtual_size());
            let zero_at = |o: u64| {
                let e = ((o / 4096 + 1) * 4096).min(end);
                self.0[o as usize..e as usize].iter().all(|b| *b == 0)
            };
            let first = zero_at(offset);
            let mut o = offset;
            while o < end && zero_at(o) == first {
                o = ((o / 4096 + 1) * 4096).min(end);
            }
            let st = if first {
                BlockStatus::Zero
            } else {
                BlockStatus::Data
            };
            Ok((st, o - offset))
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
            buf.copy_from_slice(&self.0[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn format_name(&self) -> &'static str {
            "mem"
        }
    }

    /// 3 MiB + 1000 bytes: zeros, repeats and unique data at odd offsets.
    fn disk() -> Vec<u8> {
        let mut d = vec![0u8; (3 << 20) + 1000];
        let mut x = 1u32;
        for (i, b) in d.iter_mut().enumerate() {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            if (i / 70_000) % 3 != 1 {
                *b = (x >> 24) as u8;
            }
        }
        d.copy_within(0..200_000, 2_000_000);
        d
    }

    #[test]
    fn sources_and_conversions_give_the_reference_digest() {
        let d = disk();
        let src = Mem(d.clone());
        let mut cases = 0;
        for alg in [Algorithm::Sha256, Algorithm::Blake3] {
            let want = to_hex(&reference(alg, BLOCK_SIZE as usize, &d));
            for workers in [0, 1, 3] {
                let opts = ChecksumOptions {
                    algorithm: alg,
                    workers,
                    ..ChecksumOptions::default()
                };
                assert_eq!(checksum_source(&src, &opts).unwrap().checksum, want);
                cases += 1;
            }
            for cluster_bits in [9, 12, 16, 21] {
                for workers in [0, 2] {
                    let opts = crate::ConvertOptions {
                        cluster_bits,
                        workers,
                        checksum: Some(alg),
                        ..crate::ConvertOptions::default()
                    };
                    let out = crate::io::MemFile::default();
                    let stats = crate::convert::convert_to(&src, &out, &opts).unwrap();
                    assert_eq!(
                        stats.checksum.map(|c| to_hex(&c)).as_deref(),
                        Some(want.as_str()),
                        "{alg:?} cluster_bits {cluster_bits} workers {workers}"
                    );
                    cases += 1;
                }
            }
        }
        assert_eq!(cases, 22);
    }

    #[test]
    fn block_sizes_outside_the_range_are_refused() {
        for bs in [0, 512, 4095, 6000, (64 << 20) + 4096] {
            assert!(matches!(
                check_block_size(bs),
                Err(Error::InvalidArgument(_))
            ));
        }
        for bs in [4096, 65536, 192 << 10, 64 << 20] {
            check_block_size(bs).unwrap();
        }
    }
}
