//! A run of consecutive guest clusters on its way into the [`ImageWriter`](super::ImageWriter),
//! and the work done on it before the writer places it: zero detection, BLAKE3,
//! compression of the first occurrence of each content ([`process`]). The
//! conversion pipeline's workers and the streaming [`ImageWriter`](super::ImageWriter)
//! both run [`process`]; [`Batch::clusters`] is the one conversion into what the
//! writer takes.

use crate::compress::CompressFn;
use crate::dedup::{hash_cluster, is_zero, Hash};
use crate::error::Error;

use super::ClusterIn;

/// Target size of one batch.
pub const BATCH_BYTES: usize = 2 << 20;

/// Per-cluster result of the worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Reads as zeros.
    Zero,
    /// Not yet looked at by a worker.
    Unprocessed,
    /// Data with its hash and what compression made of it.
    Data {
        /// BLAKE3 of the cluster.
        hash: Hash,
        /// Compression outcome; a stream is a range in `Batch::streams`.
        stream: Stream<(u32, u32)>,
    },
    /// Equal to the backing file's content at the same guest offset: left
    /// unallocated, read through to the backing file (overlays only).
    Backing,
    /// Zeros over backing data that is not zero: a zero-flag entry (overlays,
    /// version 3 only).
    ZeroFlag,
}

/// What a worker's compression attempt gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream<T> {
    /// Not compressed (compression off, or another worker claimed this content).
    NotTried,
    /// Compressed, but the stream would not save space.
    NotWorth,
    /// A stream worth storing.
    Some(T),
}

/// Contents (by 64-bit hash prefix) some worker has already compressed.
pub type Claims = dashmap::DashSet<u64>;

/// A run of consecutive guest clusters travelling through the pipeline.
#[derive(Debug, Default)]
pub struct Batch {
    /// Order of the batch (the writer consumes them by `seq`).
    pub seq: u64,
    /// Guest cluster index of the first cluster.
    pub first_cluster: u64,
    /// The clusters' bytes (`kinds.len()` clusters).
    pub data: Vec<u8>,
    /// Per-cluster state.
    pub kinds: Vec<Kind>,
    /// Compressed streams, concatenated.
    pub streams: Vec<u8>,
    /// Runs of the batch as planned by the conversion pipeline: (guest offset,
    /// length, holds data).
    pub(crate) runs: Vec<(u64, u64, bool)>,
    /// Guest bytes read from the source for this batch.
    pub(crate) bytes_read: u64,
    /// A read error, carried to the writer so that it still gets this batch.
    pub(crate) error: Option<Error>,
    /// The backing file's bytes for this batch (overlays only; reused).
    pub(crate) backing_data: Vec<u8>,
    /// Guest bytes read from the backing file for this batch.
    pub(crate) backing_bytes_read: u64,
    /// Ranges of the source that could not be read and were converted as zeros
    /// (`--salvage`): guest offset, length, the first error.
    pub(crate) salvaged: Vec<(u64, u64, String)>,
    /// `convert --checksum`: the digests of the whole 64 KiB blocks inside the
    /// batch, where the cluster hashes are not them
    /// ([`crate::checksum::block_digests`]).
    pub block_digests: Vec<crate::checksum::BlockDigest>,
}

impl Batch {
    /// What the writer takes for each cluster of this processed batch (`cs`:
    /// cluster size); unprocessed clusters count as zeros.
    pub fn clusters(&self, cs: usize) -> impl Iterator<Item = ClusterIn<'_>> + '_ {
        self.kinds.iter().enumerate().map(move |(i, k)| match *k {
            Kind::Zero | Kind::Unprocessed | Kind::Backing => ClusterIn::Zero,
            Kind::ZeroFlag => ClusterIn::ZeroFlag,
            Kind::Data { hash, stream } => ClusterIn::Data {
                hash,
                data: &self.data[i * cs..(i + 1) * cs],
                stream: match stream {
                    Stream::Some((s, l)) => {
                        Stream::Some(&self.streams[s as usize..(s + l) as usize])
                    }
                    Stream::NotWorth => Stream::NotWorth,
                    Stream::NotTried => Stream::NotTried,
                },
            },
        })
    }
}

/// The worker's job: detect zeros, hash, and compress the first occurrence of each
/// content (the first worker to claim its hash prefix in `claims`; every cluster
/// when `claims` is `None`).
pub fn process(
    batch: &mut Batch,
    cs: usize,
    compress: Option<&CompressFn>,
    claims: Option<&Claims>,
) {
    batch.streams.clear();
    for (i, k) in batch.kinds.iter_mut().enumerate() {
        if *k != Kind::Unprocessed {
            continue;
        }
        let c = &batch.data[i * cs..(i + 1) * cs];
        if is_zero(c) {
            *k = Kind::Zero;
            continue;
        }
        let hash = hash_cluster(c);
        let prefix = u64::from_le_bytes(hash[..8].try_into().expect("8 bytes"));
        let stream = match compress {
            Some(f) if claims.is_none_or(|cl| cl.insert(prefix)) => match f(c) {
                Some(s) => {
                    let start = batch.streams.len() as u32;
                    batch.streams.extend_from_slice(&s);
                    Stream::Some((start, s.len() as u32))
                }
                None => Stream::NotWorth,
            },
            _ => Stream::NotTried,
        };
        *k = Kind::Data { hash, stream };
    }
}
